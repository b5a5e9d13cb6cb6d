"""Hugging Face import and export against ``transformers`` models built from small random
configs (no download): every layer within 1e-4, unpadded and padded; HF -> mmssl -> HF equals
the original; bad folders are one ``DataError`` naming the file and the key.

Padded batches: mmssl gives each utterance of a padded batch what it gets alone. ``transformers``
does too for the pre-norm layer-norm models (compared padded against padded, with its attention
mask); its group-norm frontends take statistics over padding and its data2vec position
convolutions see padded frames, so there the padded mmssl batch is compared with each
utterance run alone through ``transformers``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmssl.convert.hf import from_hf, to_hf
from mmssl.errors import DataError

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=8,
)
CASES = {
    "wav2vec2_base": ("Wav2Vec2Config", "Wav2Vec2Model", {}),
    "wav2vec2_large": (
        "Wav2Vec2Config",
        "Wav2Vec2Model",
        dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True),
    ),
    "hubert_base": ("HubertConfig", "HubertModel", {}),
    "hubert_large": (
        "HubertConfig",
        "HubertModel",
        dict(do_stable_layer_norm=True, feat_extract_norm="layer"),
    ),
    "wavlm_base": ("WavLMConfig", "WavLMModel", dict(num_buckets=16, max_bucket_distance=40)),
    "wavlm_large": (
        "WavLMConfig",
        "WavLMModel",
        dict(num_buckets=16, max_bucket_distance=40, do_stable_layer_norm=True, feat_extract_norm="layer"),
    ),
    "data2vec": (
        "Data2VecAudioConfig",
        "Data2VecAudioModel",
        dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=5),
    ),
}
LENGTHS = (1200, 800)


def hf_model(case: str, cls_name: str | None = None):
    config_name, model_name, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    model = getattr(transformers, cls_name or model_name)(config).eval()
    with torch.no_grad():  # non-trivial norms and position weights
        for name, p in model.named_parameters():
            if "norm" in name or "pos_conv" in name or "masked_spec" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_layers(model, audio, mask=None) -> list[torch.Tensor]:
    """Each layer's output as mmssl's ``EncoderOutput.layers`` (before a pre-norm final norm),
    the last replaced by the final hidden state."""
    with torch.no_grad():
        out = model(audio, attention_mask=mask, output_hidden_states=True)
    return [*out.hidden_states[1:-1], out.last_hidden_state]


def mmssl_layers(encoder, audio, lengths) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        out = encoder(audio, lengths)
    return [*out.layers[:-1], out.hidden], out.lengths


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    audio = torch.zeros(len(LENGTHS), max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        audio[i, :n] = torch.randn(n, generator=g)
    lengths = torch.tensor(LENGTHS)
    return audio, lengths, (torch.arange(max(LENGTHS))[None] < lengths[:, None]).long()


def assert_layers_close(ours, theirs, frames=None) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if frames is not None:
            a, b = a[:frames], b[:frames]
        assert a.shape == b.shape, f"layer {i + 1}"
        assert (a - b).abs().max() < 1e-4, f"layer {i + 1}: {(a - b).abs().max()}"


@pytest.mark.parametrize("case", CASES)
def test_every_layer_matches_transformers(case, tmp_path):
    model = hf_model(case)
    model.save_pretrained(tmp_path)
    encoder = from_hf(tmp_path).build()
    audio, lengths, mask = batch()
    ours, out_lens = mmssl_layers(encoder, audio, lengths)
    for i, n in enumerate(LENGTHS):  # each utterance alone through transformers
        alone = hf_layers(model, audio[i : i + 1, :n])
        assert_layers_close([x[i, : out_lens[i]] for x in ours], [x[0] for x in alone])
    if case.endswith("large"):  # layer-norm frontend: transformers' padded batch agrees too
        padded = hf_layers(model, audio, mask)
        for i in range(len(LENGTHS)):
            assert_layers_close([x[i, : out_lens[i]] for x in ours], [x[i, : out_lens[i]] for x in padded])


def test_weight_norm_saved_as_g_and_v_and_pickled_state(tmp_path):
    model = hf_model("wav2vec2_base")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    old = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith("weight_g") for k in old)
    (tmp_path / "model.safetensors").unlink()
    torch.save(old, tmp_path / "pytorch_model.bin")  # the older layout, pickled
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": true}')
    imported = from_hf(tmp_path)
    assert any("normalised" in note for note in imported.notes)
    encoder = imported.build()
    assert encoder.normalize_waveform
    # a quiet waveform with an offset: what do_normalize changes; the reference normalises it
    # with transformers' own feature extractor
    audio = 0.05 * batch()[0][:1] + 0.01
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    normalised = extractor(audio[0].numpy(), sampling_rate=16000, return_tensors="pt").input_values
    ours = mmssl_layers(encoder, audio, torch.tensor([audio.shape[1]]))[0]
    assert_layers_close(ours, hf_layers(model, normalised))
    assert (ours[-1] - hf_layers(model, audio)[-1]).abs().max() > 1e-3  # the raw input differs


@pytest.mark.parametrize(
    "case", ["wav2vec2_base", "wav2vec2_large", "hubert_large", "wavlm_base", "wavlm_large", "data2vec"]
)
def test_round_trip_hf_mmssl_hf(case, tmp_path):
    model = hf_model(case)
    model.save_pretrained(tmp_path / "src")
    encoder = from_hf(tmp_path / "src").build()
    family = {"wav2vec2": "wav2vec2", "hubert": "hubert", "wavlm": "wavlm", "data2vec": "data2vec"}[
        case.split("_")[0]
    ]
    config, state = to_hf(encoder, family)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(model).__name__
    audio = batch()[0][:1]
    assert_layers_close(hf_layers(back, audio), hf_layers(model, audio))


def test_ctc_head_and_vocab(tmp_path):
    from mmssl.convert.common import head_units

    model = hf_model("wav2vec2_base", "Wav2Vec2ForCTC")
    model.save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5, "B": 6, "'": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    imported = from_hf(tmp_path)
    assert imported.head is not None and imported.architecture == "Wav2Vec2ForCTC"
    units, weight, bias, dropped = head_units(imported.head, imported.source)
    assert set(dropped) == {"<s>", "</s>"}
    encoder = imported.build()
    audio = batch()[0][:1]
    with torch.no_grad():
        theirs = model(audio).logits[0]
        ours = encoder(audio, torch.tensor([audio.shape[1]])).hidden[0] @ weight.T + bias
    # each mmssl class is the source's class of the same symbol
    pieces = [units.sp.id_to_piece(i) for i in range(units.size - 1)]
    source = [0] + [{"\u2581": 4, "a": 5, "b": 6, "'": 7, "<unk>": 3}[p] for p in pieces]
    assert (ours - theirs[:, source]).abs().max() < 1e-4
    assert units.decode([1 + pieces.index("a"), 1 + pieces.index("\u2581"), 1 + pieces.index("b")]) == "a b"


def test_ctc_head_without_vocab_is_dropped(tmp_path):
    hf_model("hubert_base", "HubertForCTC").save_pretrained(tmp_path)
    imported = from_hf(tmp_path)
    assert imported.head is None and "lm_head" in imported.dropped and "vocab.json" in imported.notes[0]


def _saved(tmp_path, case="wav2vec2_base"):
    hf_model(case).save_pretrained(tmp_path)
    return tmp_path / "model.safetensors", load_file(tmp_path / "model.safetensors")


def test_missing_unexpected_and_misshapen_keys_name_file_and_key(tmp_path):
    file, state = _saved(tmp_path)
    key = "encoder.layers.1.feed_forward.output_dense.weight"
    save_file({k: v for k, v in state.items() if k != key}, file)
    with pytest.raises(DataError, match=r"model.safetensors: missing key .*feed_forward.fc2.weight"):
        from_hf(tmp_path)
    save_file({**state, "encoder.extra.weight": torch.zeros(2)}, file)
    with pytest.raises(DataError, match=r"model.safetensors: unexpected key 'encoder.extra.weight'"):
        from_hf(tmp_path)
    save_file({**state, key: torch.zeros(3, 3)}, file)
    with pytest.raises(DataError, match=r"model.safetensors: key .*fc2.weight' has shape \[3, 3\]"):
        from_hf(tmp_path)


def test_truncated_file_and_unknown_architecture(tmp_path):
    file, _ = _saved(tmp_path)
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(DataError, match=r"model.safetensors: cannot read weights"):
        from_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    with pytest.raises(DataError, match=r"config.json: model_type 'whisper'"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Wav2Vec2ForPreTraining"]}))
    with pytest.raises(DataError, match=r"config.json: architecture 'Wav2Vec2ForPreTraining'"):
        from_hf(tmp_path)
