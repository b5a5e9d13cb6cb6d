import json
import math

import pytest
import torch

from mmssl.cli import main
from mmssl.errors import ConfigError
from mmssl.eval.extract import load_features, read_index
from mmssl.nn.quantizer import batch_perplexity, diversity_loss
from mmssl.objectives.decoar2 import decoar2, slice_l1
from mmssl.runs import load_encoder_from_run
from mmssl.testing import alone_average, meta_step, noisy_padding, overfit, tiny_audio_batch

QUIET = dict(dropout=0.0, input_dropout=0.0, attention_dropout=0.0, layer_drop=0.0)


def _model(**kwargs):
    torch.manual_seed(0)
    return decoar2(size="tiny", encoder=QUIET, **kwargs)


def _masked(model, batch: dict) -> dict:
    """``batch`` with the ``pred_mask`` the data workers would add."""
    torch.manual_seed(1)
    return model.batch_hook()(dict(batch))


def test_slice_l1_reads_the_slices_of_masked_frames_only():
    """K = 1 on a 4-frame utterance padded to 5, frames 1 and 3 masked: the slices are
    (x1, x2) predicted at frame 1 and x3 at frame 3 (x4 is padding): summed over each slice,
    averaged over the two masked frames."""
    frames = torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0]).view(1, 5, 1)
    pred = torch.tensor([[5.0, 5.0], [1.5, 4.0], [7.0, 7.0], [2.0, 8.0], [6.0, 6.0]]).view(1, 5, 2, 1)
    mask = torch.tensor([[False, True, False, True, False]])
    lengths = torch.tensor([4])
    loss, weight = slice_l1(pred, frames, lengths, mask)
    assert loss.item() == pytest.approx((0.5 + 2.0 + 1.0) / 2)  # |1.5-1| + |4-2|, |2-3|
    assert weight[0].tolist() == [[False, False], [True, True], [False, False], [True, False], [False, False]]

    def again(frames=frames, pred=pred):
        return slice_l1(pred, frames, lengths, mask)[0]

    outside = frames.clone()
    outside[0, 0] = -50.0  # in no masked frame's slice
    outside[0, 4] = float("nan")  # padding
    other = pred.clone()
    other[0, [0, 2, 4]] = 100.0  # predictions at unmasked frames
    other[0, 3, 1] = 100.0  # the offset past the end
    assert again(frames=outside).item() == pytest.approx(loss.item())
    assert again(pred=other).item() == pytest.approx(loss.item())
    inside = frames.clone()
    inside[0, 2] = 4.0  # unmasked, but in frame 1's slice: |4 - 4| replaces |4 - 2|
    assert again(frames=inside).item() == pytest.approx(1.5 / 2)


def test_diversity_loss_averages_the_code_distribution_over_masked_frames():
    # G = 2 codebooks of V = 4: the two masked frames pick entries (0, 0) and (1, 0), the
    # unmasked one (3, 3); codebook 0 is used half and half (perplexity 2), codebook 1 once (1)
    probs = torch.zeros(1, 3, 2, 4)
    probs[0, 0, 0, 0] = probs[0, 0, 1, 0] = 1.0
    probs[0, 1, 0, 1] = probs[0, 1, 1, 0] = 1.0
    probs[0, 2, 0, 3] = probs[0, 2, 1, 3] = 1.0
    perplexity = batch_perplexity(probs, torch.tensor([[1.0, 1.0, 0.0]]))
    assert perplexity.item() == pytest.approx(3.0, abs=1e-4)
    assert diversity_loss(perplexity, 2, 4).item() == pytest.approx((8 - 3) / 8, abs=1e-4)


def test_loss_is_the_l1_of_the_chosen_codes_plus_alpha_times_the_diversity():
    """Eval mode, by hand: the input log mels with masked frames replaced by the mask frame,
    projected; the best entry of each codebook at every frame, the heads on their
    concatenation, L1 summed over each masked frame's slice and averaged over the masked frames,
    and the diversity of the softmax averaged over the masked frames, weighted by alpha = 0.3."""
    model = _model(codebook_entries=4, slice_size=2, diversity_weight=0.3).eval()
    batch = _masked(model, tiny_audio_batch())
    mask = batch["pred_mask"]
    enc, q = model.encoder, model.quantizer
    with torch.no_grad():
        out = model(batch)
        feats = enc.extract(batch["audio"], batch["audio_lens"])
        masked = torch.where(mask.unsqueeze(-1), enc.mask_embedding, feats.raw)  # (B, T, 80)
        hidden = enc.contextualize(enc.projection.linear(masked), feats.lengths).hidden
        scores = q.weight_proj(hidden).view(*hidden.shape[:2], 2, 4)  # (B, T, G, V)
        codes = scores.argmax(-1)
        code = torch.cat([q.codebook[0][codes[..., 0]], q.codebook[1][codes[..., 1]]], dim=-1)
        pred = model.heads(code).view(*code.shape[:2], 3, 80)
    total, count, masked_frames = 0.0, 0, 0
    for b, n in enumerate(feats.lengths.tolist()):
        for t in range(n):
            masked_frames += int(mask[b, t])
            for i in range(3):
                if mask[b, t] and t + i < n:
                    total += (pred[b, t, i] - feats.raw[b, t + i]).abs().sum().item()
                    count += 1
    l1 = total / masked_frames
    average = scores.softmax(-1)[mask].mean(0)  # (G, V) over the masked frames
    perplexity = sum(math.exp(-(p * p.log()).sum().item()) for p in average)
    diversity = (8 - perplexity) / 8
    assert count > masked_frames > 0 and out["slice_frames"].item() == count
    assert out["masked_frames"].item() == masked_frames
    assert out["l1_loss"].item() == pytest.approx(l1, rel=1e-5)
    assert out["diversity_loss"].item() == pytest.approx(diversity, rel=1e-4)
    assert out["loss"].item() == pytest.approx(l1 + 0.3 * diversity, rel=1e-5)
    assert out["perplexity"].item() == pytest.approx(perplexity, rel=1e-4)


def test_masked_frames_are_replaced_before_the_transformer():
    """The predictions read nothing of a masked input frame (changing one changes only the
    targets), and do read the visible frames around it."""
    model = _model().eval()
    torch.manual_seed(2)
    raw = torch.randn(1, 30, 80)
    lengths = torch.tensor([30])
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 10:20] = True
    hidden_frames = raw.clone()
    hidden_frames[0, 10:20] = 3 * torch.randn(10, 80)
    visible_frame = raw.clone()
    visible_frame[0, 25] += 3.0

    def run(x):
        with torch.no_grad():
            pred, _ = model.predict(model.encoder.project(x)[1], lengths, mask)
        return pred, slice_l1(pred, x, lengths, mask)[0]

    pred, loss = run(raw)
    pred_hidden, loss_hidden = run(hidden_frames)
    pred_visible, _ = run(visible_frame)
    assert torch.equal(pred, pred_hidden) and loss_hidden.item() != pytest.approx(loss.item())
    assert not torch.allclose(pred[0, 10:20], pred_visible[0, 10:20], atol=1e-4)


def test_padded_batch_equals_each_utterance_alone():
    model = _model(diversity_weight=0.0).eval()
    batch = _masked(model, tiny_audio_batch())
    with torch.no_grad():
        out = model(batch)
        noisy = model(noisy_padding(batch))
    assert out["slice_frames"].item() > 0
    assert out["loss"].item() == pytest.approx(alone_average(model, batch, "masked_frames"), rel=1e-5)
    for key in ("loss", "perplexity", "code_perplexity"):
        assert noisy[key].item() == pytest.approx(out[key].item(), rel=1e-5, abs=1e-5)


def test_loss_falls_when_overfitting_one_batch():
    model = _model()
    batch = _masked(model, tiny_audio_batch())
    # 21-frame slices (K = 20): at lr 1e-2 the loss fell but jumped between steps (0.53 of the
    # start after 40 steps with AVX-512, 0.65 on an AVX2-only CPU); at 5e-3 it falls smoothly,
    # the same on both (0.37 after 60 steps)
    losses = overfit(model, batch, steps=60, lr=5e-3)
    assert losses[-1] < 0.6 * losses[0]


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.slice_size must be an integer >= 0; got -1"):
        decoar2(size="tiny", slice_size=-1)
    with pytest.raises(ConfigError, match=r"objective\.frame_skip must be an integer >= 1; got 0"):
        decoar2(size="tiny", frame_skip=0)
    with pytest.raises(ConfigError, match=r"objective\.code_dim 63 .*codebook_groups=2"):
        decoar2(size="tiny", code_dim=63)
    with pytest.raises(ConfigError, match="'nope'"):
        decoar2(size="tiny", encoder={"nope": 1})
    with pytest.raises(ConfigError, match="model.size"):
        decoar2(size="huge")


def test_the_base_size_is_the_released_model():
    """awslabs/speech-representations ``models/decoar2.py``: ``Linear(80, 768)``, 12 x 768
    post-LN layers with 12 heads and FFN 3072, position convolution 128 in 16 groups, LayerDrop
    0.05, input dropout 0.1; here on every second 10 ms frame (50 Hz)."""
    with torch.device("meta"):
        model = decoar2(size="base")
    enc = model.encoder
    assert enc.projection.linear.in_features == 80 and isinstance(enc.projection.norm, torch.nn.Identity)
    assert enc.projection.dropout.p == 0.1 and enc.frame_rate == 50.0
    layers = enc.transformer.layers
    assert len(layers) == 12 and enc.dim == 768 and not enc.transformer.pre_norm
    assert layers[0].attention.num_heads == 12 and layers[0].feed_forward.fc1.out_features == 3072
    conv = enc.transformer.pos_conv.conv
    assert conv.kernel_size == (128,) and conv.groups == 16 and enc.transformer.layer_drop == 0.05
    assert (model.quantizer.groups, model.quantizer.entries) == (2, 320)
    assert model.heads.out_features == 21 * 80  # K = 20
    assert enc.mask_input and enc.mask_embedding.shape == (80,)  # a log-mel frame


def test_recipe_pretrains_and_asr_fine_tuning_starts_from_its_encoder(synth_tiny, tmp_path):
    run, av = tmp_path / "decoar2", synth_tiny / "av"
    quick = ["train.device=cpu", "data.num_workers=0", "train.progress=false", "train.log_every=1"]
    code = main(
        ["pretrain", "decoar2", "model.size=tiny", f"data.train={av / 'train.jsonl'}", "train.max_steps=2"]
        + [f"train.out_dir={run}", *quick]
    )
    assert code == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(
        0 < m["l1_loss"] < 10 * 21 * 80 and 0 <= m["diversity_loss"] <= 1 and m["slice_frames"] > 0
        for m in lines
    )

    feats = tmp_path / "feats"
    code = main(
        ["extract", "--checkpoint", str(run), "--manifest", str(av / "valid.jsonl"), "--layer", "2"]
        + ["--out", str(feats), "--device", "cpu"]
    )
    assert code == 0
    assert {(x["layer"], x["dim"]) for x in read_index(feats)} == {(2, 64)}
    assert all(torch.isfinite(v).all() for v in load_features(feats, 2).values())

    # the encoder stays frozen through the fine-tuning steps, so its weights are the pretrained ones
    asr = tmp_path / "asr"
    code = main(
        ["finetune-asr", "--init", str(run), f"data.train={av / 'train.jsonl'}", "train.max_steps=2"]
        + ["objective.freeze_steps=5", "data.max_seconds_per_batch=20", f"train.out_dir={asr}", *quick]
    )
    assert code == 0
    pretrained = load_encoder_from_run(run).state_dict()
    finetuned = load_encoder_from_run(asr).state_dict()
    assert pretrained.keys() == finetuned.keys()
    assert all(torch.equal(pretrained[k], finetuned[k]) for k in pretrained)


def test_training_step_runs_on_the_meta_device():
    """A full step on meta tensors: the step needs no host sync (``mmssl.testing.meta_step``)."""
    with torch.device("meta"):
        model = _model().train()
    out = meta_step(model, _masked(model, tiny_audio_batch()))
    assert out["diversity_loss"].is_meta
