"""AV-HuBERT checkpoints, built here under the reference's names and shapes
(facebookresearch/av_hubert ``AVHubertModel``, ``ResEncoder``, ``HubertEncoder`` /
``HubertEncoderWrapper``) from an mmssl audio-visual encoder with random weights.

What is checked: every reference name maps (and nothing else is accepted), the shapes the
reference gives its tensors (``frontend3D.0`` 64x1x5x7x7, the 104-input audio projection, the
512-input video projection, a fusion LayerNorm over twice the model dim...), and that the
loaded encoder gives the outputs of the encoder the file was made from. There is no
independent numerical reference here (the av_hubert code needs fairseq), so the numbers are a
round trip through the reference's layout, not a parity with its implementation.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from mmssl import cli
from mmssl.convert.avhubert import from_avhubert
from mmssl.data.units import Units, train_units
from mmssl.encoders.av import build_av_encoder
from mmssl.runs import load_objective_from_run
from mmssl.testing import tiny_av_batch

DIM = 32
TRANSFORMER = {
    "transformer.pos_conv.conv.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "transformer.pos_conv.conv.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
    "transformer.pos_conv.conv.bias": "encoder.pos_conv.0.bias",
}
LAYER = {
    "attention_norm": "self_attn_layer_norm",
    "attention": "self_attn",
    "feed_forward.fc1": "fc1",
    "feed_forward.fc2": "fc2",
    "ff_norm": "final_layer_norm",
}
BLOCK = {"act1": "relu1", "act2": "relu2", "down_conv": "downsample.0", "down_bn": "downsample.1"}


def reference_name(key: str) -> str:
    """mmssl AV encoder name -> AV-HuBERT name (written from the reference code)."""
    if key in TRANSFORMER:
        return TRANSFORMER[key]
    for ours, theirs in (
        ("audio_proj.", "feature_extractor_audio.proj."),
        ("video_proj.", "feature_extractor_video.proj."),
        ("video_frontend.stem_conv.", "feature_extractor_video.resnet.frontend3D.0."),
        ("video_frontend.stem_bn.", "feature_extractor_video.resnet.frontend3D.1."),
        ("video_frontend.stem_act.", "feature_extractor_video.resnet.frontend3D.2."),
        ("fusion.norm.", "layer_norm."),
        ("fusion.proj.", "post_extract_proj."),
        ("transformer.norm.", "encoder.layer_norm."),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if key.startswith("video_frontend.trunk."):
        _, _, index, part, rest = key.split(".", 4)  # ResNet-18: two blocks a stage
        block, part = int(index), BLOCK.get(part, part)
        return f"feature_extractor_video.resnet.trunk.layer{block // 2 + 1}.{block % 2}.{part}.{rest}"
    if key.startswith("transformer.layers."):
        _, _, index, rest = key.split(".", 3)
        for ours, theirs in LAYER.items():
            if rest.startswith(ours + "."):
                return f"encoder.layers.{index}.{theirs}.{rest[len(ours) + 1 :]}"
    raise AssertionError(key)


def encoder():
    torch.manual_seed(0)
    enc = build_av_encoder(
        lip="resnet18",
        dim=DIM,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        pre_norm=True,
        layer_drop=0.0,
        mask_embedding=False,
        audio_features="psf",  # the reference model reads python_speech_features' filterbanks
    )
    with torch.no_grad():  # BatchNorm statistics and PReLU slopes off their initial values
        for name, t in enc.state_dict().items():
            if t.is_floating_point() and ("bn" in name or "act" in name or "norm" in name):
                t.add_(0.1 * torch.rand_like(t))
    return enc.eval()


def model_cfg() -> dict:
    return dict(
        _name="av_hubert",
        encoder_embed_dim=DIM,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_embed_dim=64,
        layer_norm_first=True,
        conv_pos=16,
        conv_pos_groups=4,
        audio_feat_dim=104,
        modality_fuse="concat",
        resnet_relu_type="prelu",
        sub_encoder_layers=0,
        masking_type="input",
        modality_dropout=0.5,
        audio_dropout=0.5,
    )


def reference_state(enc) -> dict:
    state = {reference_name(k): v for k, v in enc.state_dict().items()}
    # the shapes the reference code gives these tensors
    assert state["feature_extractor_video.resnet.frontend3D.0.weight"].shape == (64, 1, 5, 7, 7)
    assert state["feature_extractor_video.resnet.trunk.layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["feature_extractor_video.resnet.trunk.layer4.1.relu2.weight"].shape == (512,)
    assert state["feature_extractor_audio.proj.weight"].shape == (DIM, 104)
    assert state["feature_extractor_video.proj.weight"].shape == (DIM, 512)
    assert state["layer_norm.weight"].shape == (2 * DIM,) and state["post_extract_proj.weight"].shape == (
        DIM,
        2 * DIM,
    )
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)
    return state


def outputs(enc, batch):
    with torch.no_grad():
        return enc.encode(batch).layers


def test_pretrained_checkpoint_to_an_av_hubert_run(tmp_path):
    enc = encoder()
    state = reference_state(enc)
    state |= {
        "final_proj.weight": torch.randn(16, DIM),
        "final_proj.bias": torch.randn(16),
        "label_embs_concat": torch.randn(10, 16),
        "mask_emb": torch.rand(104),  # input masking: on the filterbanks, no place in mmssl
    }
    cfg = OmegaConf.create({"model": model_cfg(), "task": {"_name": "av_hubert_pretraining"}})
    torch.save({"model": state, "cfg": cfg}, tmp_path / "base_lrs3.pt")
    imported = from_avhubert(tmp_path / "base_lrs3.pt")
    assert imported.dropped == ["mask_emb"] and imported.objective_options["num_classes"] == 10
    batch = tiny_av_batch(seconds=(0.32, 0.2))
    for a, b in zip(outputs(imported.build(), batch), outputs(enc, batch)):
        assert torch.allclose(a, b, atol=1e-5)

    assert cli.main(["convert", str(tmp_path / "base_lrs3.pt"), "--out", str(tmp_path / "run")]) == 0
    objective, _ = load_objective_from_run(tmp_path / "run", expect="av_hubert")
    assert torch.equal(objective.label_embeddings, state["label_embs_concat"])
    assert torch.equal(objective.final_proj.weight, state["final_proj.weight"])
    for a, b in zip(outputs(objective.encoder, batch), outputs(enc, batch)):
        assert torch.allclose(a, b, atol=1e-5)
    assert objective.encoder.audio_frontend.kind == "psf"  # rebuilt from the run's config


def test_seq2seq_loads_its_encoder_only_and_ctc_with_word_pieces_drops_its_head(tmp_path, capsys):
    enc = encoder()
    body = reference_state(enc)
    ft_cfg = {"w2v_args": {"model": model_cfg(), "task": {}}}
    seq2seq = {f"encoder.w2v_model.{k}": v for k, v in body.items()}
    seq2seq["decoder.embed_tokens.weight"] = torch.randn(20, DIM)
    seq2seq["decoder.layers.0.fc1.weight"] = torch.randn(8, DIM)
    cfg = {"model": {"_name": "av_hubert_seq2seq", **ft_cfg}}
    torch.save({"model": seq2seq, "cfg": cfg}, tmp_path / "s2s.pt")
    imported = from_avhubert(tmp_path / "s2s.pt")
    assert "decoder.embed_tokens.weight" in imported.dropped and "encoder alone" in imported.notes[0]
    batch = tiny_av_batch(seconds=(0.2,))
    for a, b in zip(outputs(imported.build(), batch), outputs(enc, batch)):
        assert torch.allclose(a, b, atol=1e-5)

    ctc = {f"w2v_encoder.w2v_model.{k}": v for k, v in body.items()}
    ctc |= {"w2v_encoder.proj.weight": torch.randn(7, DIM), "w2v_encoder.proj.bias": torch.randn(7)}
    torch.save({"model": ctc, "cfg": {"model": {"_name": "av_hubert_ctc", **ft_cfg}}}, tmp_path / "ctc.pt")
    (tmp_path / "dict.ltr.txt").write_text("\u2581the 5\n\u2581a 4\ns 3\n")  # unigram pieces
    imported = from_avhubert(tmp_path / "ctc.pt")
    assert imported.head is None and "word pieces" in imported.notes[0]
    train_units(["the a the as"] * 3, "unigram", vocab_size=8).save(tmp_path / "spm.model")
    sp = Units.load(tmp_path / "spm.model").sp  # the dictionary's pieces, from their model
    tokens = [sp.id_to_piece(i) for i in (3, 1, 2)]
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{t} 5\n" for t in tokens))
    argv = ["convert", str(tmp_path / "ctc.pt"), "--units", str(tmp_path / "spm.model")]
    assert cli.main([*argv, "--out", str(tmp_path / "pieces")]) == 0
    objective, _ = load_objective_from_run(tmp_path / "pieces", expect="ctc")
    weight = ctc["w2v_encoder.proj.weight"]
    for row, piece in enumerate(tokens, 4):  # each piece's class has its token's row (after 4 specials)
        assert torch.equal(objective.head.weight[1 + sp.piece_to_id(piece)], weight[row])
    assert torch.equal(objective.head.weight[0], weight[0])  # the blank: <s>
    (tmp_path / "dict.ltr.txt").write_text("| 5\nA 4\nB 3\n")  # characters: a ctc run
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "ctc.pt"), "--out", str(tmp_path / "run")]) == 0
    objective, _ = load_objective_from_run(tmp_path / "run", expect="ctc")
    assert objective.units.size == 1 + 4 and objective.modalities == ("audio", "video")
