"""``mmssl export RUN --to hf --out DIR [--overwrite]``: a run's speech encoder as a Hugging Face
model folder (``config.json`` + ``model.safetensors``) that
``transformers.AutoModel.from_pretrained(DIR)`` loads as ``Wav2Vec2Model``, ``HubertModel``,
``WavLMModel`` or ``Data2VecAudioModel``.

Only the encoder is written (waveform conv encoders: the wav2vec 2.0 / HuBERT / WavLM /
data2vec presets and converted checkpoints). Every head is dropped: a CTC head (its units are
SentencePiece pieces, which a ``transformers`` tokenizer does not read), HuBERT's projection and
label embeddings, wav2vec 2.0's quantizer, data2vec's teacher. The model type is the run's
encoder family (``objective.name`` of a pretraining run, ``objective.encoder`` of a fresh CTC
run, the run it started from otherwise); WavLM's and data2vec's are also told by their layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes

from mmssl.config import CONFIG_FILE, load_yaml
from mmssl.constants import SAMPLE_RATE
from mmssl.convert.common import FAMILIES
from mmssl.convert.hf import CONFIG, PREPROCESSOR, SAFETENSORS, to_hf
from mmssl.encoders.audio import AudioEncoder
from mmssl.errors import DataError
from mmssl.files import new_folder, write_bytes, write_text
from mmssl.nn.frontend import ConvFrontend
from mmssl.nn.transformer import StackedConvPositionalEmbedding
from mmssl.runs import INIT_DIR, load_encoder_from_run, run_dir_of

TARGETS = ("hf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, checkpoint folder or .safetensors file")
    parser.add_argument("--to", choices=TARGETS, default="hf", help="the format to write (default hf)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _named_family(run_dir: Path) -> str | None:
    """The encoder family a run's config names (following a CTC run to the run it started from)."""
    cfg = load_yaml(run_dir / CONFIG_FILE)
    name = str(cfg.objective.get("name"))
    if name in FAMILIES:
        return name
    if name == "ctc":
        init = run_dir / INIT_DIR / "encoder_init"
        if cfg.objective.get("encoder_init") and (init / CONFIG_FILE).is_file():
            return _named_family(init)
        family = cfg.objective.get("encoder")
        return str(family) if family in FAMILIES else None
    return None


def encoder_family(run_dir: Path, encoder: AudioEncoder) -> str:
    transformer = encoder.transformer
    if transformer.position_bias is not None:
        return "wavlm"
    if isinstance(transformer.pos_conv, StackedConvPositionalEmbedding):
        return "data2vec"
    named = _named_family(run_dir)
    return named if named in ("wav2vec2", "hubert") else "wav2vec2"


def feature_extractor(encoder: AudioEncoder, config: dict) -> dict:
    """``preprocessor_config.json`` of the exported model (``AutoFeatureExtractor`` reads it):
    ``do_normalize`` when the encoder normalises its waveforms (``normalize_waveform``), an
    attention mask for the layer-norm frontends, as the Hugging Face models of each kind have."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": bool(encoder.normalize_waveform),
        "return_attention_mask": config.get("feat_extract_norm") == "layer",
    }


def run(args: argparse.Namespace) -> int:
    path = Path(args.run)
    if not path.exists():
        raise DataError(f"{path}: not found")
    run_dir = run_dir_of(path if path.is_dir() else path.parent)
    encoder = load_encoder_from_run(path)
    if not isinstance(encoder, AudioEncoder) or not isinstance(encoder.frontend, ConvFrontend):
        raise DataError(
            f"{path}: its encoder ({type(encoder).__name__}) has no transformers equivalent; "
            "only waveform conv encoders (wav2vec 2.0, HuBERT, WavLM, data2vec) export"
        )
    family = encoder_family(run_dir, encoder)
    config, state = to_hf(encoder, family)
    with new_folder(args.out, args.overwrite) as folder:
        write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
        write_bytes(folder / SAFETENSORS, save_safetensors_bytes(state, metadata={"format": "pt"}))
        write_text(folder / PREPROCESSOR, json.dumps(feature_extractor(encoder, config), indent=2) + "\n")
    print(
        f"{path} -> {args.out}: {config['architectures'][0]}, "
        f"{config['num_hidden_layers']} layers (encoder only; heads dropped)"
    )
    return 0
