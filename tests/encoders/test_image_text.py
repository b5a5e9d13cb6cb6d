import pickle
import socket

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import mmssl.encoders  # noqa: F401  (registers the presets)
from mmssl.data.io import load_image
from mmssl.encoders.image import ClipImageTransform, ImageTower, build_open_clip
from mmssl.encoders.text import ClipTokenizer, TextTower
from mmssl.errors import ConfigError, DataError
from mmssl.registry import ENCODERS


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return ENCODERS.build("clip_image_tiny"), ENCODERS.build("clip_text_tiny")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_image_transform_is_open_clips_preprocessing(tmp_path, tiny_clip):
    # a 90x60 PNG: resized on its shortest side, centre-cropped, normalised with CLIP's mean/std
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(path)
    image_tower, _ = tiny_clip
    transform = image_tower.transform()
    ours = transform(load_image(path))
    reference = open_clip.image_transform(
        64, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )(Image.open(path))
    assert ours.shape == (3, 64, 64) == reference.shape
    torch.testing.assert_close(ours, reference)
    # a plain white picture: every pixel is (1 - mean) / std per channel
    white = transform(torch.full((3, 100, 100), 255, dtype=torch.uint8))
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(white, ((1 - mean) / std)[:, None, None].expand(3, 64, 64))
    assert isinstance(pickle.loads(pickle.dumps(transform)), ClipImageTransform)  # data workers get a copy


def test_image_transform_rejects_non_rgb_uint8(tiny_clip):
    with pytest.raises(DataError, match="uint8"):
        tiny_clip[0].transform()(torch.rand(3, 8, 8))


def test_tokenizer_works_offline_and_cuts_after_the_end_token(no_network):
    tok = ClipTokenizer(context_length=32)
    ids = tok("a red circle near the blue star")
    full = open_clip.tokenize(["a red circle near the blue star"], context_length=32)[0]
    n = int((full != 0).sum())
    assert torch.equal(ids, full[:n])  # open_clip's ids, padding cut
    assert ids[0] == tok.tokenizer.sot_token_id and ids[-1] == tok.eot
    assert (
        open_clip.decode(ids).replace("<start_of_text>", "").replace("<end_of_text>", "").strip()
        == "a red circle near the blue star"
    )
    long = tok(" ".join(["word"] * 100))
    assert long.shape == (32,) and long[-1] == tok.eot  # truncated to the context, still ended
    text, lens = tok.batch(["a red circle", "two big blue squares left of a star"])
    assert lens.tolist() == [len(tok("a red circle")), len(tok("two big blue squares left of a star"))]
    assert (text[0, lens[0] :] == 0).all()
    assert isinstance(pickle.loads(pickle.dumps(tok)), ClipTokenizer)


def test_text_tower_padded_batch_equals_each_caption_alone(tiny_clip):
    _, text_tower = tiny_clip
    text_tower.eval()
    tok = text_tower.tokenizer()
    captions = ["a red circle", "the big blue square far from one tiny green star", "two stars"]
    text, lens = tok.batch(captions)
    batch = text_tower(text, lens)
    assert batch.shape == (3, text_tower.dim)
    for i, caption in enumerate(captions):
        alone = tok(caption).unsqueeze(0)
        torch.testing.assert_close(batch[i : i + 1], text_tower(alone, lens[i : i + 1]), atol=1e-5, rtol=1e-5)
    # whatever sits after text_lens never changes an embedding
    garbage = text.clone()
    garbage[0, lens[0] :] = 999
    torch.testing.assert_close(text_tower(garbage, lens), batch)


def test_image_tower_forward_and_freeze():
    torch.manual_seed(0)
    tower = ENCODERS.build("clip_image_tiny", freeze=True)
    assert isinstance(tower, ImageTower) and tower.dim == 64
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.visual.training  # a frozen tower stays in eval mode
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64) and not out.requires_grad
    trainable = ENCODERS.build("clip_image_tiny")
    trainable(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)
    text = ENCODERS.build("clip_text_tiny", freeze=True)
    assert isinstance(text, TextTower) and not any(p.requires_grad for p in text.parameters())


def test_pretrained_is_a_local_file_only(tmp_path):
    torch.manual_seed(1)
    source = build_open_clip("tiny")
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # other random weights: the file must replace them
    tower = ENCODERS.build("clip_image_tiny", pretrained=str(path))
    for (name, p), q in zip(tower.visual.state_dict().items(), source.visual.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    with pytest.raises(ConfigError, match="no such file.*never downloads"):
        ENCODERS.build("clip_image_vit_b_32", pretrained="openai")
    with pytest.raises(ConfigError, match="no such file"):
        ENCODERS.build("clip_text_tiny", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ConfigError, match="not one of open_clip's built-in configs"):
        build_open_clip("ViT-Q-99")


def test_real_preset_builds_offline_with_its_preprocessing(no_network):
    with torch.device("meta"):  # structure only: no memory, no download
        tower = ENCODERS.build("clip_image_vit_b_32")
    assert tower.dim == 512 and tower.image_size == 224
    assert tower.transform().size == 224
    assert sum(p.numel() for p in tower.parameters()) == pytest.approx(87.8e6, rel=0.01)  # ViT-B/32


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "convnext_base", "roberta-ViT-B-32", "coca_ViT-B-32"])
def test_clip_configs_other_than_plain_clip_are_refused_with_the_list(name, no_network):
    with pytest.raises(ConfigError, match=r"objective\.clip_model=.*not a plain CLIP.*ViT-B-16-quickgelu"):
        build_open_clip(name)


def test_plain_clip_configs_build_with_their_embed_dim(no_network):
    from mmssl.encoders.image import clip_configs, image_tower_from
    from mmssl.encoders.text import text_tower_from

    names = clip_configs()
    assert {"ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14", "RN50"} <= set(names)
    assert not [n for n in names if "SigLIP" in n or "roberta" in n or "convnext" in n or "coca" in n]
    for name in ("RN50", "ViT-B-16-plus-240"):  # a ModifiedResNet; a 640-d ViT
        with torch.device("meta"):
            model = build_open_clip(name)
        dim = open_clip.get_model_config(name)["embed_dim"]
        assert image_tower_from(model).dim == dim == text_tower_from(model).dim
        tower = image_tower_from(model)
        with torch.device("meta"):
            assert tower(torch.empty(1, 3, tower.image_size, tower.image_size)).shape == (1, dim)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.jit's own
def test_unreadable_or_torchscript_weights_are_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint " * 20)
    for name in ("tiny", "ViT-S-32"):
        with pytest.raises(DataError, match=f"{garbage}: cannot load open_clip weights.*open_clip-format"):
            build_open_clip(name, garbage)
    # OpenAI's .pt files are TorchScript archives: a weights-only load refuses them
    scripted = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(scripted))
    with pytest.raises(DataError, match=f"{scripted}: a TorchScript archive.*load_openai_model.*-quickgelu"):
        build_open_clip("tiny", scripted)
