"""Image towers from open_clip (Radford et al., 2021; Ilharco et al., open_clip), with
open_clip's own evaluation preprocessing.

``ImageTower`` wraps an open_clip vision transformer (``model.visual``): ``forward(image)``
maps ``(B, 3, H, W)`` pixels, already preprocessed, to ``(B, D)`` embeddings (not normalised).
``ImageTower.transform()`` gives the picklable per-image preprocessing the data workers run:
``(3, H, W)`` uint8 RGB -> PIL -> open_clip's ``image_transform`` (resize of the shortest
side with the model's interpolation, centre crop, ``[0, 1]`` scaling, normalisation with the
model's mean and std), so images reach a pretrained tower exactly as open_clip feeds them.

Models: ``"tiny"``, ``"small"`` or one of open_clip's plain CLIP configs (``clip_configs()``: a ViT or
ModifiedResNet image tower and open_clip's own text transformer with the 49408-token BPE
vocabulary, pooled at the end token, as ``ClipTokenizer`` and ``TextTower`` expect). Configs
with a timm image tower (SigLIP, ConvNeXt...), a Hugging Face text tower (``roberta-*``, which
would also download) or a multimodal decoder (CoCa) are a ``ConfigError`` listing what works.

Weights: random by default. ``pretrained`` is the path of a local checkpoint file in
open_clip's format (a state dict, ``.pt``/``.bin`` or ``.safetensors``, loaded with
``weights_only=True``); nothing is ever downloaded, and a path that is not a file is a
``ConfigError``, a file that does not load a ``DataError`` naming it. OpenAI's original ``.pt``
files are TorchScript archives, which a weights-only load refuses: convert one once with
``torch.save(open_clip.load_openai_model(FILE, device="cpu", jit=False).state_dict(), OUT)``
(that load runs the archive's code: only for a file from a trusted source) and use a
``-quickgelu`` config (``ViT-B-16-quickgelu``...), since OpenAI's models use QuickGELU.
``freeze=True`` keeps the tower fixed (SpeechCLIP, Shih et al., 2022, sec. 3: a frozen CLIP
image encoder): no gradient, always in eval mode.

Presets (``ENCODERS``): ``clip_image_tiny`` (a 2-layer ViT on 64x64 images, about 120k
parameters, for tests), ``clip_image_small`` (a ResNet on 64x64 images, about 1.4M parameters,
for CPU runs) and open_clip's ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``
configs as ``clip_image_vit_b_32`` / ``clip_image_vit_b_16`` / ``clip_image_vit_l_14``.

Shape legend: B batch, H/W pixels, D embedding dim.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.functional import to_pil_image

from mmssl.errors import ConfigError, DataError
from mmssl.registry import ENCODERS

# the tiny CLIP used by tests and CPU runs: a 2-layer ViT of width 64 on 64x64 images (8x8
# patches) and a 2-layer text transformer of width 32 over 32 tokens, both projecting to 64
TINY_EMBED_DIM = 64
TINY_VISION = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=64)
TINY_TEXT = dict(context_length=32, width=32, heads=4, layers=2)
TINY = "tiny"
# the small CLIP for CPU runs (the demo): open_clip's ModifiedResNet (CLIP's ResNet image tower:
# three-conv stem, anti-aliased strides, attention pooling) one block a stage, 16 channels wide,
# on 64x64 images, about 1.4M parameters. A convolutional tower learns colours and shapes from a
# few hundred images; a ViT trained from random weights on so few does not.
SMALL = "small"
SMALL_EMBED_DIM = 128
SMALL_VISION = dict(layers=(1, 1, 1, 1), width=16, image_size=64)
# open_clip models defined here, not in open_clip's configs: (embed dim, vision cfg, text cfg)
OWN_MODELS = {
    TINY: (TINY_EMBED_DIM, TINY_VISION, TINY_TEXT),
    SMALL: (SMALL_EMBED_DIM, SMALL_VISION, TINY_TEXT),
}


def check_pretrained(pretrained: str | os.PathLike | None) -> str | None:
    """``None``, or the path of an existing local weights file (never a tag to download)."""
    if pretrained is None:
        return None
    path = Path(pretrained)
    if not path.is_file():
        raise ConfigError(
            f"pretrained={pretrained}: no such file (give the path of a local open_clip or "
            "OpenAI CLIP checkpoint; mmssl never downloads weights)"
        )
    return str(path)


CLIP_VOCAB = 49408  # CLIP's BPE vocabulary (Radford et al., 2021, sec. 2.4), what ClipTokenizer emits


def is_plain_clip(config: dict) -> bool:
    """Whether an open_clip model config is one ``build_open_clip`` supports: no timm image
    tower, no Hugging Face text tower or tokenizer, no multimodal decoder, CLIP's vocabulary,
    a causal text transformer pooled at the end token (``argmax``)."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return (
        not vision.get("timm_model_name")
        and not text.get("hf_model_name")
        and not text.get("hf_tokenizer_name")
        and "multimodal_cfg" not in config
        and text.get("vocab_size", CLIP_VOCAB) == CLIP_VOCAB
        and text.get("pool_type", "argmax") == "argmax"
        and not text.get("no_causal_mask")
        and not text.get("embed_cls")
    )


def clip_configs() -> list[str]:
    """open_clip's built-in config names that ``build_open_clip`` supports."""
    # lazy: open_clip takes seconds to import; only its towers need it
    import open_clip

    return [name for name in open_clip.list_models() if is_plain_clip(open_clip.get_model_config(name))]


def _clip_config(model_name: str) -> dict:
    # lazy: open_clip takes seconds to import; only its towers need it
    import open_clip

    config = (
        None if model_name.startswith(("hf-hub:", "local-dir:")) else open_clip.get_model_config(model_name)
    )
    if config is None or not is_plain_clip(config):
        why = (
            "is not one of open_clip's built-in configs"
            if config is None
            else "is not a plain CLIP (timm image tower, Hugging Face text tower or another tokenizer)"
        )
        raise ConfigError(
            f"objective.clip_model={model_name!r} {why}; use {TINY!r}, {SMALL!r} or one of: "
            f"{', '.join(clip_configs())}"
        )
    return config


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_error(path: str, model_name: str, err: Exception) -> DataError:
    """A ``DataError`` naming the weights file that did not load, and what to do about it."""
    if _is_torchscript(path):
        return DataError(
            f"{path}: a TorchScript archive (OpenAI's original CLIP format), not an open_clip state "
            "dict: convert it once with torch.save(open_clip.load_openai_model(FILE, device='cpu', "
            "jit=False).state_dict(), OUT) and use a -quickgelu config (objective.clip_model)"
        )
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch.load's messages run long
    return DataError(
        f"{path}: cannot load open_clip weights for {model_name} ({type(err).__name__}: {first}); "
        "give an open_clip-format state dict (.pt, .bin or .safetensors) of that model"
    )


def build_open_clip(model_name: str, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """An open_clip model with a separate text module (``CustomTextCLIP``: ``.visual`` and
    ``.text``), its joint embedding dim as ``.embed_dim``. ``model_name``: ``"tiny"`` or a plain
    CLIP config of open_clip (``clip_configs()``); ``pretrained``: a local open_clip-format
    checkpoint file or None (random weights)."""
    # lazy: open_clip takes seconds to import; only its towers need it
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    path = check_pretrained(pretrained)
    if model_name in OWN_MODELS:
        # lazy: open_clip takes seconds to import; only its towers need it
        from open_clip.transform import PreprocessCfg

        embed_dim, vision, text = OWN_MODELS[model_name]
        model = CustomTextCLIP(embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text))
        open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=vision["image_size"])))
        if path is not None:  # the loader create_model uses for a checkpoint file
            try:
                open_clip.load_checkpoint(model, path)
            except Exception as err:  # torch.load raises pickle, zip and runtime errors alike
                raise _load_error(path, f"the {model_name} CLIP", err) from err
        model.embed_dim = embed_dim
        return model
    config = _clip_config(model_name)
    # on the current default device (create_model would move a model built on "meta" to the CPU)
    device = torch.empty(()).device
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=path,
            force_custom_text=True,
            device=device,
            pretrained_text=False,
            pretrained_image=False,
        )
    except Exception as err:
        if path is None:
            raise
        raise _load_error(path, model_name, err) from err
    model.embed_dim = int(config["embed_dim"])
    return model


def set_frozen(module: nn.Module, frozen: bool) -> None:
    """``requires_grad = not frozen`` for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(not frozen)


class ClipImageTransform:
    """Picklable per-image preprocessing for a data worker: ``(3, H, W)`` uint8 RGB ->
    ``(3, S, S)`` float, through open_clip's evaluation ``image_transform`` on a PIL image."""

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> None:
        # lazy: open_clip takes seconds to import; only its towers need it
        from open_clip.transform import image_transform

        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.transform = image_transform(
            size,
            is_train=False,
            mean=self.mean,
            std=self.std,
            interpolation=interpolation,
            resize_mode=resize_mode,
        )

    def __call__(self, image: Tensor) -> Tensor:
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise DataError(f"an image must be (3, H, W) uint8 RGB, got {tuple(image.shape)} {image.dtype}")
        return self.transform(to_pil_image(image))


class ImageTower(nn.Module):
    """open_clip's vision tower. ``forward(image (B, 3, S, S)) -> (B, D)``; ``dim`` is ``D``."""

    def __init__(self, visual: nn.Module, dim: int, preprocess: dict[str, Any], freeze: bool = False) -> None:
        super().__init__()
        self.visual, self.dim, self.preprocess, self.frozen = visual, dim, dict(preprocess), freeze
        set_frozen(self.visual, freeze)
        if freeze:
            self.visual.eval()

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode and not self.frozen)  # a frozen tower stays in eval mode
        return self

    @property
    def image_size(self) -> int:
        size = self.preprocess["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def transform(self) -> ClipImageTransform:
        """The preprocessing images need before ``forward`` (see ``ClipImageTransform``)."""
        p = self.preprocess
        return ClipImageTransform(
            self.image_size,
            p["mean"],
            p["std"],
            p.get("interpolation", "bicubic"),
            p.get("resize_mode", "shortest"),
        )

    def forward(self, image: Tensor) -> Tensor:
        """``image (B, 3, S, S)``, preprocessed -> ``(B, D)``."""
        if self.frozen:
            with torch.no_grad():
                return self.visual(image)
        return self.visual(image)


def image_tower_from(model: nn.Module, freeze: bool = False) -> ImageTower:
    """The vision half of an open_clip model built by ``build_open_clip``."""
    # lazy: open_clip takes seconds to import; only its towers need it
    import open_clip

    return ImageTower(model.visual, int(model.embed_dim), open_clip.get_model_preprocess_cfg(model), freeze)


def build_image_tower(
    model_name: str = TINY, pretrained: str | None = None, freeze: bool = False
) -> ImageTower:
    """An open_clip image tower: ``model_name`` ``"tiny"`` or an open_clip config name,
    ``pretrained`` a local checkpoint file (or None), ``freeze`` to keep it fixed."""
    return image_tower_from(build_open_clip(model_name, pretrained), freeze)


@ENCODERS.register
def clip_image_tiny(pretrained: str | None = None, freeze: bool = False) -> ImageTower:
    return build_image_tower(TINY, pretrained, freeze)


@ENCODERS.register
def clip_image_small(pretrained: str | None = None, freeze: bool = False) -> ImageTower:
    return build_image_tower(SMALL, pretrained, freeze)


@ENCODERS.register
def clip_image_vit_b_32(pretrained: str | None = None, freeze: bool = False) -> ImageTower:
    return build_image_tower("ViT-B-32", pretrained, freeze)


@ENCODERS.register
def clip_image_vit_b_16(pretrained: str | None = None, freeze: bool = False) -> ImageTower:
    return build_image_tower("ViT-B-16", pretrained, freeze)


@ENCODERS.register
def clip_image_vit_l_14(pretrained: str | None = None, freeze: bool = False) -> ImageTower:
    return build_image_tower("ViT-L-14", pretrained, freeze)
