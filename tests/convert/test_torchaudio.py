"""Parity of ``from_torchaudio`` with torchaudio's models, layer by layer, on random weights."""

import pytest
import torch
import torchaudio

import mmssl.encoders  # noqa: F401
from mmssl.convert import from_torchaudio, torchaudio_state_dict
from mmssl.errors import ConfigError, DataError
from mmssl.registry import ENCODERS
from mmssl.testing import tiny_audio_batch

CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2


def _small(kind: str, layer_norm: bool, layer_drop: float = 0.0):
    """A 3-layer torchaudio model: ``kind`` 'wav2vec2' (also HuBERT's architecture) or 'wavlm';
    ``layer_norm``: the large models' layer-norm conv stack with pre-LN layers."""
    args = dict(
        extractor_mode="layer_norm" if layer_norm else "group_norm",
        extractor_conv_layer_config=CONV,
        extractor_conv_bias=layer_norm,
        encoder_embed_dim=64,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=3,
        encoder_num_heads=4,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=128,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=layer_norm,
        encoder_layer_drop=layer_drop,
        aux_num_out=None,
    )
    torch.manual_seed(0)
    if kind == "wavlm":
        model = torchaudio.models.wavlm_model(encoder_num_buckets=320, encoder_max_distance=800, **args)
    else:
        model = torchaudio.models.wav2vec2_model(**args)
    with torch.no_grad():  # move every parameter off its initial value (norm weights of 1, zero biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


CASES = [("wav2vec2", False), ("wav2vec2", True), ("wavlm", False), ("wavlm", True)]


@pytest.mark.parametrize("kind,layer_norm", CASES)
def test_every_layer_matches_torchaudio_on_a_padded_batch(kind, layer_norm):
    model = _small(kind, layer_norm)
    enc = from_torchaudio(model)
    assert not enc.training
    batch = tiny_audio_batch(lengths=(8000, 5000, 2417))
    with torch.no_grad():
        out = enc(batch["audio"], batch["audio_lens"])
        for i, n in enumerate(batch["audio_lens"].tolist()):
            # torchaudio's reference is each utterance alone: its group norm pools over padding
            # and its WavLM attention takes no lengths
            ref_layers, _ = model.extract_features(batch["audio"][i : i + 1, :n])
            ref_hidden, _ = model(batch["audio"][i : i + 1, :n])
            t = ref_hidden.shape[1]
            assert out.lengths[i] == t and len(out.layers) == len(ref_layers) == 3
            for ours, ref in zip(out.layers, ref_layers):
                assert (ours[i, :t] - ref[0]).abs().max() < 1e-4
            assert (out.hidden[i, :t] - ref_hidden[0]).abs().max() < 1e-4


def test_layer_norm_model_matches_torchaudio_padded_batch_directly():
    model = _small("wav2vec2", layer_norm=True)
    enc = from_torchaudio(model)
    batch = tiny_audio_batch(lengths=(8000, 5000, 2417))
    with torch.no_grad():
        ref_layers, ref_lens = model.extract_features(batch["audio"], batch["audio_lens"])
        out = enc(batch["audio"], batch["audio_lens"])
    assert torch.equal(out.lengths, ref_lens)
    for ours, ref in zip(out.layers, ref_layers):
        for i, t in enumerate(ref_lens.tolist()):
            assert (ours[i, :t] - ref[i, :t]).abs().max() < 1e-4


def test_converted_options_and_mask_embedding_of_a_pretraining_model():
    model = _small("wavlm", layer_norm=False, layer_drop=0.1)
    enc = from_torchaudio(model)
    assert enc.transformer.layer_drop == 0.1 and enc.transformer.position_bias.num_buckets == 320
    torch.manual_seed(0)
    hubert = torchaudio.models.hubert_pretrain_model(
        "group_norm",
        CONV,
        False,
        64,
        0.0,
        16,
        4,
        2,
        4,
        0.0,
        128,
        0.0,
        0.0,
        False,
        0.0,
        0.8,
        "static",
        0.0,
        10,
        False,
        1,
        0.0,
        "static",
        0.0,
        10,
        False,
        1,
        False,
        False,
        10,
        32,
        0.1,
    )
    enc = from_torchaudio(hubert)
    assert torch.equal(enc.mask_embedding, hubert.mask_generator.mask_embedding)
    assert enc.feature_grad_scale == 0.1
    source = hubert.wav2vec2.encoder.feature_projection.projection.weight
    assert torch.equal(enc.projection.linear.weight, source)
    audio = tiny_audio_batch(lengths=(3000,))["audio"]
    with torch.no_grad():
        ref_layers, _ = hubert.wav2vec2.eval().extract_features(audio)
        out = enc.eval()(audio, torch.tensor([3000]))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(out.layers, ref_layers))
    with pytest.raises(ConfigError, match="Wav2Vec2Model"):
        from_torchaudio(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "builder,preset",
    [
        ("wav2vec2_base", "wav2vec2_base"),
        ("hubert_base", "hubert_base"),
        ("wavlm_base", "wavlm_base"),
        ("wav2vec2_large_lv60k", "wav2vec2_large"),
        ("hubert_large", "hubert_large"),
        ("wavlm_large", "wavlm_large"),
    ],
)
def test_real_size_mapping_matches_presets(builder, preset):
    """Every torchaudio parameter maps onto a preset parameter of the same shape (on the meta
    device: no memory, no weights)."""
    with torch.device("meta"):
        model = getattr(torchaudio.models, builder)()
        enc = ENCODERS.build(preset)
    mapped = torchaudio_state_dict(model)
    ours = enc.state_dict()
    assert set(ours) - set(mapped) == {"mask_embedding"} and not set(mapped) - set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in mapped)
    assert sum(p.numel() for p in model.parameters()) + enc.dim == sum(p.numel() for p in enc.parameters())


@pytest.mark.parametrize("builder", ["hubert_base", "wavlm_base"])
def test_real_size_base_model_matches_torchaudio(builder):
    torch.manual_seed(0)
    model = getattr(torchaudio.models, builder)().eval()
    enc = from_torchaudio(model)
    audio = tiny_audio_batch(lengths=(4800,))["audio"]
    with torch.no_grad():
        ref_layers, _ = model.extract_features(audio)
        out = enc(audio, torch.tensor([4800]))
    assert len(out.layers) == 12
    assert max((a - b).abs().max() for a, b in zip(out.layers, ref_layers)) < 1e-4


def test_a_saved_bundle_file_converts_with_its_labels(tmp_path, monkeypatch):
    """``--kind torchaudio``: the bundle is found by the file's name (a small stand-in bundle
    here; the real ones are base size and larger), its ASR output layer becomes a CTC head on
    the bundle's labels, without the unused fairseq rows the file still holds."""
    from types import SimpleNamespace

    import mmssl.convert.torchaudio as ta
    from mmssl.convert.common import head_units

    params = dict(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=CONV,
        extractor_conv_bias=True,
        encoder_embed_dim=64,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=2,
        encoder_num_heads=4,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=128,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=True,
        encoder_layer_drop=0.0,
        aux_num_out=5,
    )
    labels = ("|", "E", "T", "'")
    bundle = SimpleNamespace(
        _params=params,
        _normalize_waveform=True,
        _remove_aux_axis=(1, 2, 3),
        get_labels=lambda: ("-", *labels),
    )
    monkeypatch.setattr(
        ta, "find_bundle", lambda name: ("HUBERT_ASR_SMALL", bundle) if name == "small.pth" else None
    )
    torch.manual_seed(0)
    model = torchaudio.models.wav2vec2_model(**params).eval()
    state = model.state_dict()
    extra = torch.randn(3, 64)  # fairseq's <pad> </s> <unk> rows, saved in the file
    saved = {**state, "aux.weight": torch.cat([state["aux.weight"][:1], extra, state["aux.weight"][1:]])}
    saved["aux.bias"] = torch.cat([state["aux.bias"][:1], torch.zeros(3), state["aux.bias"][1:]])
    torch.save(saved, tmp_path / "small.pth")
    imported = ta.from_torchaudio_file(tmp_path / "small.pth")
    assert imported.family == "hubert" and imported.notes and "normalised" in imported.notes[0]
    units, weight, bias, _ = head_units(imported.head, imported.source)
    encoder = imported.build()
    x = 0.05 * torch.randn(1, 4000) + 0.01
    assert encoder.normalize_waveform  # the bundle's _normalize_waveform, as its pipeline does
    with torch.no_grad():
        emission, _ = model(torch.nn.functional.layer_norm(x, x.shape))
        ours = encoder(x, torch.tensor([4000])).hidden[0] @ weight.T + bias
    pieces = [units.sp.id_to_piece(i) for i in range(units.size - 1)]
    source = [0] + [{"\u2581": 1, "e": 2, "t": 3, "'": 4}[p] for p in pieces if p != "<unk>"]
    keep = [0] + [1 + i for i, p in enumerate(pieces) if p != "<unk>"]
    assert (ours[:, keep] - emission[0][:, source]).abs().max() < 1e-4
    with pytest.raises(DataError, match="other.pth: not the weights file of a torchaudio pipeline bundle"):
        (tmp_path / "other.pth").write_bytes(b"")
        ta.from_torchaudio_file(tmp_path / "other.pth")
