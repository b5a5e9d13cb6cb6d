"""VQ-APC (``vq_apc``, ``mmssl.objectives.apc``): the quantized layer holds codebook entries
that the next layer reads, the loss is APC's L1 through them (checked by hand), the code
usage and perplexity are those of the hard choices over valid frames, the gradient passes the
quantizer straight through, and it learns."""

import json
import math

import pytest
import torch

from mmssl.cli import main
from mmssl.errors import ConfigError
from mmssl.eval.extract import read_index
from mmssl.nn.context import run_recurrent
from mmssl.objectives.apc import vq_apc
from mmssl.testing import alone_average, meta_step, overfit, tiny_audio_batch


def _model(**kwargs):
    torch.manual_seed(0)
    return vq_apc(size="tiny", entries=16, **kwargs)


def test_loss_runs_through_the_chosen_codebook_entries_by_hand():
    model = _model(vq_layers=[1]).eval()  # quantize the first of the two layers
    batch = tiny_audio_batch()
    with torch.no_grad():
        out = model(batch)
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        x, lengths = feats.x, feats.lengths
        context = model.encoder.context
        quantizer = context.quantizers["0"]
        first = run_recurrent(context.layers[0], x)  # (B, T, C)
        codes = quantizer.weight_proj(first).argmax(-1)  # (B, T): the nearest in score
        q = quantizer.codebook[0][codes]  # (B, T, C)
        second = q + run_recurrent(context.layers[1], q)  # APC's residual connection
        pred = model.head(second)
        layers = model.encoder.contextualize(x, lengths).layers
    assert torch.allclose(layers[0], q, atol=1e-6) and torch.allclose(layers[1], second, atol=1e-5)
    total, count, picked = 0.0, 0, []
    for b, n in enumerate(lengths.tolist()):
        for t in range(n - 3):
            total += (pred[b, t] - x[b, t + 3]).abs().sum().item()
            count += x.shape[-1]
        picked += codes[b, :n].tolist()
    assert out["loss"].item() == pytest.approx(total / count, abs=1e-5)
    # usage: distinct entries over valid frames / V; perplexity: exp(entropy) of their histogram
    assert out["code_usage"].item() == pytest.approx(len(set(picked)) / 16)
    freq = torch.bincount(torch.tensor(picked), minlength=16).double() / len(picked)
    entropy = -sum(p * math.log(p) for p in freq.tolist() if p > 0)
    assert out["code_perplexity"].item() == pytest.approx(math.exp(entropy), rel=1e-4)


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = tiny_audio_batch()
    with torch.no_grad():
        out = model(batch)
    assert abs(out["loss"].item() - alone_average(model, batch, "predicted_frames")) < 1e-5


def test_the_gradient_passes_the_quantizer_straight_through():
    model = _model().train()
    model(tiny_audio_batch())["loss"].backward()
    context = model.encoder.context
    below = context.layers[1].weight_ih_l0.grad  # the last layer, under its quantizer
    assert below is not None and below.abs().sum() > 0
    assert context.quantizers["1"].weight_proj.weight.grad.abs().sum() > 0
    assert context.quantizers["1"].codebook.grad.abs().sum() > 0


def test_the_temperature_anneals_by_update():
    model = _model(max_temp=2.0, min_temp=0.5, temp_decay=0.5)
    model.set_step(1)
    assert model.encoder.context.quantizers["1"].temperature == 1.0
    model.set_step(10)
    out = model(tiny_audio_batch())
    assert out["temperature"].item() == 0.5


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = vq_apc(size="tiny", entries=64)  # 16 codes hold too little of the future to fall far
    losses = overfit(model, tiny_audio_batch(), steps=80, lr=1e-2, key="l1_loss")
    assert losses[-1] < 0.8 * losses[0]
    assert model(tiny_audio_batch())["code_usage"] > 0.2


def test_training_step_runs_on_the_meta_device():
    with torch.device("meta"):
        model = _model().train()
    meta_step(model, tiny_audio_batch())


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.vq_layers must list layers in 1\.\.2; got \[3\]"):
        _model(vq_layers=[3])
    with pytest.raises(ConfigError, match=r"objective\.vq_layers"):
        _model(vq_layers=[])
    with pytest.raises(ConfigError, match=r"objective\.entries must be an integer >= 2; got 1"):
        vq_apc(size="tiny", entries=1)
    with pytest.raises(ConfigError, match="time_shift"):
        _model(time_shift=0)


def test_recipe_pretrains_logs_code_usage_and_its_run_extracts(synth_tiny, tmp_path):
    run = tmp_path / "vq_apc"
    args = [
        "pretrain",
        "vq_apc",
        "model.size=tiny",
        f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
        "objective.entries=32",
        "train.max_steps=2",
        "train.log_every=1",
        f"train.out_dir={run}",
        "data.num_workers=0",
        "train.progress=false",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(0 < m["code_usage"] <= 1 and 1 <= m["code_perplexity"] <= 32 for m in lines)
    feats = tmp_path / "feats"
    extract = ["extract", "--checkpoint", str(run), "--manifest", str(synth_tiny / "av" / "valid.jsonl")]
    assert main([*extract, "--layer", "2", "--out", str(feats), "--device", "cpu"]) == 0
    assert {(x["layer"], x["dim"]) for x in read_index(feats)} == {(2, 32)}
