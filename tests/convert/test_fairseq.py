"""fairseq wav2vec 2.0 / HuBERT / data2vec checkpoints, built here without fairseq.

The reference: a torchaudio model with random weights, its state dict renamed to fairseq's
names by the inverse of torchaudio's own fairseq mapping (``import_fairseq._map_key``, which is
checked to map every name back), saved as fairseq saves (``model`` + ``cfg`` as a dict, an
omegaconf container, or legacy ``args``). The imported encoder must match the torchaudio model
layer by layer, and a fine-tuned checkpoint's head its ``aux`` output. data2vec has no
independent reference in torchaudio: its file is built from an mmssl encoder under fairseq's
names (checked: it loads, runs and gives that encoder's outputs).
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torchaudio
from omegaconf import OmegaConf
from torchaudio.models.wav2vec2.utils.import_fairseq import _map_key

from mmssl.convert.fairseq import conv_layers, from_fairseq
from mmssl.encoders.audio import data2vec_tiny
from mmssl.errors import DataError

CONV = [(16, 10, 5), (16, 3, 2)]
CONV_SPEC = "[(16, 10, 5)] + [(16, 3, 2)] * 1"
LENGTHS = (1200, 700)


def torchaudio_model(large: bool, classes: int | None = None):
    torch.manual_seed(0)
    model = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm" if large else "group_norm",
        extractor_conv_layer_config=CONV,
        extractor_conv_bias=large,
        encoder_embed_dim=32,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=2,
        encoder_num_heads=2,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=64,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=large,
        encoder_layer_drop=0.0,
        aux_num_out=classes,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def fairseq_key(key: str, large: bool) -> str:
    """torchaudio name -> fairseq name (the inverse of ``_map_key``, checked against it)."""
    subs = [
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.2.1."),
        (r"encoder\.feature_projection\.projection\.", "post_extract_proj."),
        (r"encoder\.feature_projection\.layer_norm\.", "layer_norm."),
        (
            r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
            "encoder.pos_conv.0.weight_g",
        ),
        (
            r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
            "encoder.pos_conv.0.weight_v",
        ),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.transformer\.layer_norm\.", "encoder.layer_norm."),
        (r"encoder\.transformer\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
        (r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
        (
            r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.",
            r"encoder.layers.\1.fc1.",
        ),
        (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
        (r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
        (r"aux\.", "proj."),
    ]
    for pattern, replacement in subs:
        new = re.sub("^" + pattern, replacement, key)
        if new != key:
            if not large:
                new = new.replace(
                    "feature_extractor.conv_layers.0.2.1.", "feature_extractor.conv_layers.0.2."
                )
            return new
    raise AssertionError(key)


def fairseq_state(model, large: bool, finetuned: bool) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        name = fairseq_key(key, large)
        expected = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        )
        assert _map_key(name) == expected, (key, name)  # torchaudio's own mapping reads it back
        if finetuned:
            name = "w2v_encoder." + ("proj." + name[5:] if name.startswith("proj.") else "w2v_model." + name)
        state[name] = value
    return state


def model_cfg(name: str, large: bool) -> dict:
    return dict(
        _name=name,
        extractor_mode="layer_norm" if large else "default",
        conv_feature_layers=CONV_SPEC,
        conv_bias=large,
        encoder_embed_dim=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_embed_dim=64,
        layer_norm_first=large,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        dropout_input=0.0,
        conv_pos=16,
        conv_pos_groups=4,
        activation_fn="gelu",
    )


def audio() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(len(LENGTHS), max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        x[i, :n] = torch.randn(n, generator=g)
    return x, torch.tensor(LENGTHS)


def assert_matches_torchaudio(encoder, model) -> None:
    """Layer by layer against torchaudio's model; an encoder that normalises its input
    (fairseq ``task.normalize``) against the model fed fairseq's ``F.layer_norm(wav, wav.shape)``
    of a quiet, offset waveform, where normalising matters."""
    x, lengths = audio()
    if encoder.normalize_waveform:
        x = (0.05 * x + 0.01) * (torch.arange(x.shape[1]) < lengths[:, None])
    with torch.no_grad():
        out = encoder(x, lengths)
        for i, n in enumerate(LENGTHS):  # torchaudio's group norm pools over padding: alone
            alone = x[i : i + 1, :n]
            if encoder.normalize_waveform:
                alone = torch.nn.functional.layer_norm(alone, alone.shape)
            ref, _ = model.extract_features(alone)
            t = int(out.lengths[i])
            assert len(ref) == len(out.layers)
            for layer, (a, b) in enumerate(zip(out.layers, ref), 1):
                assert (a[i, :t] - b[0]).abs().max() < 1e-4, f"layer {layer}"


@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
@pytest.mark.parametrize("layout", ["cfg_dict", "cfg_omegaconf", "legacy_args"])
def test_pretrained_layouts_match_torchaudio(large, layout, tmp_path):
    model = torchaudio_model(large)
    state = fairseq_state(model, large, finetuned=False)
    state["mask_emb"] = torch.randn(32)
    state["final_proj.weight"] = torch.randn(8, 32)  # HuBERT's pretraining head: dropped
    state["label_embs_concat"] = torch.randn(10, 8)
    cfg = model_cfg("hubert", large)
    checkpoint = {"model": state}
    if layout == "legacy_args":
        checkpoint["args"] = argparse.Namespace(
            arch="hubert", **{k: v for k, v in cfg.items() if k != "_name"}
        )
    elif layout == "cfg_omegaconf":
        checkpoint["cfg"] = OmegaConf.create({"model": cfg, "task": {"_name": "hubert_pretraining"}})
    else:
        checkpoint["cfg"] = {"model": cfg, "task": {"_name": "hubert_pretraining"}}
    torch.save(checkpoint, tmp_path / "hubert.pt")
    imported = from_fairseq(tmp_path / "hubert.pt")
    assert imported.family == "hubert" and imported.head is None
    assert set(imported.dropped) == {"final_proj.weight", "label_embs_concat"}
    encoder = imported.build()
    assert torch.equal(encoder.mask_embedding, state["mask_emb"])
    assert_matches_torchaudio(encoder, model)


def test_finetuned_ctc_checkpoint_with_its_dictionary(tmp_path):
    from mmssl.convert.common import head_units

    classes = 4 + 4  # <s> <pad> </s> <unk> | E T '
    model = torchaudio_model(large=True, classes=classes)
    state = fairseq_state(model, large=True, finetuned=True)
    cfg = {"_name": "wav2vec_ctc", "w2v_args": {"model": model_cfg("wav2vec2", True)}}
    torch.save({"model": state, "cfg": {"model": cfg, "task": {"normalize": True}}}, tmp_path / "ft.pt")
    imported = from_fairseq(tmp_path / "ft.pt")
    assert imported.head is None and "w2v_encoder.proj" in imported.dropped  # no dictionary yet
    assert any("normalised" in note for note in imported.notes)  # large LV-60k style input
    assert imported.build().normalize_waveform
    (tmp_path / "dict.ltr.txt").write_text("| 10\nE 9\nT 8\n' 1\n")
    imported = from_fairseq(tmp_path / "ft.pt")
    assert imported.family == "wav2vec2" and imported.head is not None
    encoder = imported.build()
    assert_matches_torchaudio(encoder, model)
    units, weight, bias, dropped = head_units(imported.head, imported.source)
    assert set(dropped) == {"<pad>", "</s>"}
    x = audio()[0][:1, : LENGTHS[0]]
    with torch.no_grad():
        emission, _ = model(torch.nn.functional.layer_norm(x, x.shape))  # task.normalize: true
        ours = encoder(x, torch.tensor([x.shape[1]])).hidden[0] @ weight.T + bias
    pieces = [units.sp.id_to_piece(i) for i in range(units.size - 1)]
    source = [0] + [{"\u2581": 4, "e": 5, "t": 6, "'": 7, "<unk>": 3}[p] for p in pieces]
    assert (ours - emission[0][:, source]).abs().max() < 1e-4


def test_finetuned_ctc_checkpoint_with_word_pieces_and_their_sentencepiece_model(tmp_path, capsys):
    """A word-piece dictionary (AV-HuBERT's fine-tuning: unigram pieces) keeps its head when
    the SentencePiece model is given: each piece's class takes the row of its token."""
    from mmssl import cli
    from mmssl.convert.common import head_units
    from mmssl.data.units import Units, train_units
    from mmssl.runs import load_objective_from_run

    train_units(["the red star sits near the green tree"] * 3, "unigram", vocab_size=24).save(
        tmp_path / "spm.model"
    )
    sp = Units.load(tmp_path / "spm.model").sp
    words = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)][::-1]
    tokens = [*words, "zzz"]  # a token of another model: dropped
    (tmp_path / "dict.wrd.txt").write_text("".join(f"{t} {9 - i % 5}\n" for i, t in enumerate(tokens)))
    model = torchaudio_model(large=True, classes=4 + len(tokens))
    state = fairseq_state(model, large=True, finetuned=True)
    cfg = {"_name": "wav2vec_ctc", "w2v_args": {"model": model_cfg("wav2vec2", True)}}
    torch.save({"model": state, "cfg": {"model": cfg}}, tmp_path / "ft.pt")
    with pytest.raises(DataError, match="word pieces; give their SentencePiece model"):
        head_units(from_fairseq(tmp_path / "ft.pt", tmp_path / "dict.wrd.txt").head, "ft.pt")

    pieces = Units.load(tmp_path / "spm.model")
    imported = from_fairseq(tmp_path / "ft.pt", tmp_path / "dict.wrd.txt", pieces=pieces)
    units, weight, bias, dropped = head_units(imported.head, imported.source)
    assert set(dropped) == {"<pad>", "</s>", "zzz"} and units.size == sp.get_piece_size() + 1
    x = audio()[0][:1, : LENGTHS[0]]
    with torch.no_grad():
        emission, _ = model(x)
        ours = imported.build()(x, torch.tensor([x.shape[1]])).hidden[0] @ weight.T + bias
    source = [0] + [
        3 if sp.is_unknown(i) else 4 + tokens.index(sp.id_to_piece(i)) for i in range(sp.get_piece_size())
    ]
    assert (ours - emission[0][:, source]).abs().max() < 1e-4

    argv = ["convert", str(tmp_path / "ft.pt"), "--dict", str(tmp_path / "dict.wrd.txt")]
    assert cli.main([*argv, "--units", str(tmp_path / "spm.model"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "units.model").read_bytes() == (tmp_path / "spm.model").read_bytes()
    objective, _ = load_objective_from_run(tmp_path / "run", expect="ctc")
    assert torch.equal(objective.head.weight, weight)
    assert cli.main([*argv, "--units", str(tmp_path / "nope.model"), "--out", str(tmp_path / "r2")]) == 2
    assert "nope.model" in capsys.readouterr().err


def data2vec_checkpoint(tmp_path):
    """A data2vec audio file under fairseq's names, from an mmssl encoder (no reference model)."""
    torch.manual_seed(0)
    encoder = data2vec_tiny(
        conv_channels=16,
        conv_kernels=(10, 3),
        conv_strides=(5, 2),
        dim=32,
        num_heads=2,
        ffn_dim=64,
        num_layers=2,
    )
    encoder.eval()
    names = {
        "frontend.blocks.{}.conv.": "feature_extractor.conv_layers.{}.0.",
        "frontend.blocks.{}.norm.": "feature_extractor.conv_layers.{}.2.1.",
        "projection.norm.": "layer_norm.",
        "projection.linear.": "post_extract_proj.",
        "mask_embedding": "mask_emb",
        "transformer.pos_conv.convs.{}.": "encoder.pos_conv.{}.0.",
        "transformer.norm.": "encoder.layer_norm.",
        "transformer.layers.{}.attention_norm.": "encoder.layers.{}.self_attn_layer_norm.",
        "transformer.layers.{}.attention.": "encoder.layers.{}.self_attn.",
        "transformer.layers.{}.feed_forward.fc1.": "encoder.layers.{}.fc1.",
        "transformer.layers.{}.feed_forward.fc2.": "encoder.layers.{}.fc2.",
        "transformer.layers.{}.ff_norm.": "encoder.layers.{}.final_layer_norm.",
    }
    from mmssl.convert.common import rename

    state = {rename(k, list(names.items())): v for k, v in encoder.state_dict().items()}
    assert None not in state
    state["_ema"] = torch.zeros(3)  # the EMA teacher: dropped
    cfg = {
        **model_cfg("data2vec_audio", False),
        "extractor_mode": "layer_norm",
        "conv_pos": 5 * 5,
        "pos_conv_depth": 5,
        "layer_norm_first": False,
    }
    torch.save({"model": state, "cfg": {"model": cfg}}, tmp_path / "d2v.pt")
    return encoder, tmp_path / "d2v.pt"


def test_data2vec_layout_loads_and_runs(tmp_path):
    reference, file = data2vec_checkpoint(tmp_path)
    imported = from_fairseq(file)
    assert imported.family == "data2vec" and imported.dropped == ["_ema"]
    assert imported.options["pos_conv_depth"] == 5 and imported.options["pos_conv_kernel"] == 5
    encoder = imported.build()
    x, lengths = audio()
    with torch.no_grad():
        a, b = encoder(x, lengths), reference(x, lengths)
    for layer_a, layer_b in zip(a.layers, b.layers):
        assert torch.allclose(layer_a, layer_b)


def test_conv_feature_layers_are_parsed_without_eval():
    assert (
        conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", "f")
        == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )
    with pytest.raises(DataError, match="conv_feature_layers"):
        conv_layers("__import__('os').system('true')", "f")


def _saved(tmp_path, edit):
    model = torchaudio_model(False)
    state = fairseq_state(model, False, finetuned=False)
    checkpoint = {"model": state, "cfg": {"model": model_cfg("wav2vec2", False)}}
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "w.pt")
    return tmp_path / "w.pt"


def test_bad_files_name_the_file_and_the_key(tmp_path):
    key = "encoder.layers.1.fc2.weight"
    cases = [
        (lambda c: c["model"].pop(key), r"w.pt: missing key .*fc2.weight"),
        (
            lambda c: c["model"].update({"encoder.extra": torch.zeros(1)}),
            r"w.pt: unexpected key 'encoder.extra'",
        ),
        (
            lambda c: c["model"].update({key: torch.zeros(2, 2)}),
            r"w.pt: key .*fc2.weight' has shape \[2, 2\]",
        ),
        (lambda c: c["cfg"]["model"].update(_name="wav2vec_seq2seq"), r"w.pt: model 'wav2vec_seq2seq'"),
        (lambda c: c["cfg"]["model"].pop("encoder_layers"), r"w.pt: no 'encoder_layers'"),
        (lambda c: c.pop("cfg"), r"w.pt: no 'cfg' or 'args'"),
    ]
    for edit, message in cases:
        with pytest.raises(DataError, match=message):
            from_fairseq(_saved(tmp_path, edit))
    file = _saved(tmp_path, lambda c: None)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"w.pt: cannot read the checkpoint \(truncated"):
        from_fairseq(file)
