import json
import math

import pytest
import torch

from mmssl.cli import main
from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest
from mmssl.errors import ConfigError, DataError
from mmssl.eval.extract import load_features
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.transformer import SinusoidalPositions
from mmssl.objectives.masked_recon import (
    KEEP,
    RANDOM,
    ZERO,
    AlterationSampler,
    alter,
    loss_weight,
    weighted_reconstruction,
)
from mmssl.registry import OBJECTIVES
from mmssl.runs import load_encoder_from_run
from mmssl.testing import meta_step, overfit, tiny_audio_batch

QUIET = dict(dropout=0.0, attention_dropout=0.0)
TERA = dict(stack=1, channel_alteration=True, magnitude_alteration=True)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return OBJECTIVES.build("masked_recon", size="tiny", encoder=QUIET, **kwargs)


def _runs(row):
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, count = [], 0
    for v in row.tolist() + [False]:
        if v:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


def test_80_10_10_split_over_many_draws():
    sampler = AlterationSampler()
    g = torch.Generator().manual_seed(0)
    out = sampler(torch.full((20000,), 40), 40, g)
    share = [(out["alter_mode"] == m).float().mean().item() for m in (ZERO, RANDOM, KEEP)]
    # binomial standard deviations over 20000 utterances: 0.0028 and 0.0021
    assert abs(share[0] - 0.8) < 0.012 and abs(share[1] - 0.1) < 0.009 and abs(share[2] - 0.1) < 0.009
    assert not out["noise_mask"].any()  # Mockingjay: no magnitude alteration
    noisy = AlterationSampler(noise_prob=0.15)(torch.full((20000,), 40), 40, g)["noise_mask"]
    assert abs(noisy.float().mean().item() - 0.15) < 0.01  # TERA: 15% of the utterances get noise
    # what each mode does to an utterance's chosen frames
    frames = torch.tensor([12, 12, 12, 9])
    x = torch.randn(4, 12, 3) * (~lengths_to_padding_mask(frames, 12)).unsqueeze(-1)
    alt = AlterationSampler(num_mel_bins=3)(frames, 12, torch.Generator().manual_seed(1))
    alt["alter_mode"] = torch.tensor([ZERO, RANDOM, KEEP, RANDOM])
    alt["alter_shift"] = torch.tensor([0, 5, 0, 4])
    y = alter(x, frames, alt, stack=1, noise_std=0.0)
    chosen = alt["pred_mask"]
    assert chosen[:, :9].any(1).all()
    assert torch.equal(y[0][chosen[0]], torch.zeros(int(chosen[0].sum()), 3))
    assert torch.equal(y[0][~chosen[0]], x[0][~chosen[0]])
    for i, n, shift in ((1, 12, 5), (3, 9, 4)):
        for t in range(n):
            expected = x[i, (t + shift) % n] if chosen[i, t] else x[i, t]
            assert torch.equal(y[i, t], expected)
    assert torch.equal(y[2], x[2])
    assert torch.equal(y[3, 9:], torch.zeros(3, 3))


def _expected_coverage(n, mask_prob=0.15, span=7):
    """Exact expected fraction of frames covered by floor(mask_prob * n / span + u) spans of
    ``span`` frames, starts drawn without replacement among the n - span + 1 positions."""
    starts = n - span + 1
    x = mask_prob * n / span
    total = 0.0
    for k, p in ((math.floor(x), 1 - (x - math.floor(x))), (math.floor(x) + 1, x - math.floor(x))):
        for t in range(n):
            covering = min(t, starts - 1) - max(0, t - span + 1) + 1
            total += p * (1 - math.comb(starts - covering, k) / math.comb(starts, k))
    return total / n


def test_hook_is_picklable_and_a_function_of_the_global_seed():
    import pickle

    hook = pickle.loads(pickle.dumps(_model(**TERA).batch_hook()))
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append(hook(tiny_audio_batch()))
    for key in ("pred_mask", "alter_mode", "alter_shift", "channel_mask", "noise_mask"):
        assert torch.equal(draws[0][key], draws[1][key])
    assert any(not torch.equal(draws[0][k], draws[2][k]) for k in ("pred_mask", "channel_mask"))
    # frame counts of the 100 Hz TERA frontend: 1 + (S - 400) // 160
    assert draws[0]["pred_mask"].shape == (3, 48) and draws[0]["channel_mask"].shape == (3, 80)


def test_spans_of_7_cover_the_expected_share_of_long_utterances():
    sampler = AlterationSampler()
    mask = sampler(torch.full((200,), 1000), 1000, torch.Generator().manual_seed(0))["pred_mask"]
    # 0.15 * 1000 / 7 = 21.4 spans of 7 frames per utterance; overlaps make the covered share
    # a little under 15%
    expected = _expected_coverage(1000)
    assert 0.13 < expected < 0.15
    assert abs(mask.float().mean().item() - expected) < 0.004
    runs = [r for row in mask for r in _runs(row)]
    assert min(runs) >= 7 and runs.count(7) > 0.7 * len(runs)


def test_no_chosen_frame_in_padding_and_every_utterance_gets_a_span():
    sampler = AlterationSampler(span=7)
    frames = torch.tensor([300, 40, 8, 3, 1, 0])
    for seed in range(50):
        out = sampler(frames, 310, torch.Generator().manual_seed(seed))
        mask = out["pred_mask"]
        assert not (mask & lengths_to_padding_mask(frames, 310)).any()
        assert mask[:3].any(1).all()  # min_masks=1: long enough utterances always predict something
        assert not mask[4:].any()
        assert ((out["alter_shift"] >= 1) | (frames == 0)).all()


def test_channel_block_width_and_position_bounds():
    sampler = AlterationSampler(num_mel_bins=80, channel_fraction=0.2)
    assert sampler.max_channels == 16
    block = sampler(torch.full((8000,), 10), 10, torch.Generator().manual_seed(0))["channel_mask"]
    widths = block.sum(1)
    assert widths.min() == 0 and widths.max() == 16
    for w in range(17):  # uniform over 0..16: 8000 / 17 = 470.6 each, std ~ 21
        assert abs((widths == w).sum().item() - 8000 / 17) < 100
    for row in block[widths > 0][:500]:
        assert len(_runs(row)) == 1  # one contiguous block
    assert block[:, 0].any() and block[:, 79].any()
    assert not AlterationSampler(channel_fraction=0.0)(torch.full((50,), 10), 10)["channel_mask"].any()


def test_alter_zeroes_channels_in_every_stacked_frame_and_adds_noise_where_drawn():
    frames = torch.tensor([3, 2])
    x = torch.randn(2, 3, 2 * 4)  # stack 2 of 4 channels
    x[1, 2:] = 0
    alt = {
        "pred_mask": torch.zeros(2, 3, dtype=torch.bool),
        "alter_mode": torch.tensor([ZERO, ZERO]),
        "alter_shift": torch.tensor([1, 1]),
        "channel_mask": torch.tensor([[False, True, True, False], [False] * 4]),
        "noise_mask": torch.tensor([False, True]),
    }
    y = alter(x, frames, alt, stack=2, noise_std=1.0)
    zeroed = torch.tensor([False, True, True, False] * 2)
    assert torch.equal(y[0][:, zeroed], torch.zeros(3, 4)) and torch.equal(y[0][:, ~zeroed], x[0][:, ~zeroed])
    assert (y[1, :2] != x[1, :2]).all() and torch.equal(y[1, 2:], torch.zeros(1, 8))


def test_loss_weight_and_a_hand_computed_l1():
    # 2 stacked frames of K=2 sub-frames and M=2 channels; 3 valid 100 Hz frames
    alt = {"pred_mask": torch.tensor([[True, False]]), "channel_mask": torch.tensor([[False, True]])}
    weight = loss_weight(alt, torch.tensor([3]), frames=2, stack=2, num_mel_bins=2, reconstruct_all=False)
    # frame 0: all 4 elements; frame 1: channel 1 of sub-frame 0 only (sub-frame 1 is past the end)
    assert weight.tolist() == [[[True, True, True, True], [False, True, False, False]]]
    pred = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    loss = weighted_reconstruction(pred, target, weight, "l1")
    assert loss.item() == pytest.approx((1 + 2 + 3 + 4 + 3) / 5)
    mse = weighted_reconstruction(pred, target, weight, "mse")
    assert mse.item() == pytest.approx((1 + 4 + 9 + 16 + 9) / 5)
    every = loss_weight(None, torch.tensor([3]), frames=2, stack=2, num_mel_bins=2, reconstruct_all=False)
    assert every.tolist() == [[[True] * 4, [True, True, False, False]]]


class _Shifted(torch.nn.Module):
    """A head whose prediction is moved by ``offset (B, T, F)``."""

    def __init__(self, head, offset):
        super().__init__()
        self.head, self.offset = head, offset

    def forward(self, h):
        return self.head(h) + self.offset


def test_changing_the_prediction_at_an_unselected_frame_changes_no_loss():
    for kwargs in ({}, dict(TERA, magnitude_alteration=False)):
        model = _model(**kwargs)
        batch = model.batch_hook()(tiny_audio_batch())
        lengths = model.encoder.frame_lengths(batch["audio_lens"])
        t = batch["pred_mask"].shape[1]
        mel_lens = torch.div(batch["audio_lens"] - 400, 160, rounding_mode="floor") + 1
        stack, m = model.encoder.frontend.stack, 80
        weight = loss_weight(batch, mel_lens, t, stack, m, reconstruct_all=False)
        head = model.head
        base = model(batch)["loss"]
        for where, changes in ((~weight, False), (weight, True)):
            model.head = _Shifted(head, 5.0 * where.float())
            assert torch.isclose(model(batch)["loss"], base).item() is not changes
        model.head = head
        assert 0 < batch["pred_mask"].sum() < (~lengths_to_padding_mask(lengths, t)).sum()


def test_sinusoidal_positions_match_the_formula():
    table = SinusoidalPositions(6)(torch.zeros(2, 4, 6))
    assert table.shape == (1, 4, 6)
    t = 3
    expected = [
        math.sin(t),
        math.cos(t),
        math.sin(t / 10000 ** (2 / 6)),
        math.cos(t / 10000 ** (2 / 6)),
        math.sin(t / 10000 ** (4 / 6)),
        math.cos(t / 10000 ** (4 / 6)),
    ]
    assert torch.allclose(table[0, t], torch.tensor(expected), atol=1e-6)


def _alone(batch, i, frames):
    n, t = int(batch["audio_lens"][i]), int(frames[i])
    out = {"audio": batch["audio"][i : i + 1, :n], "audio_lens": batch["audio_lens"][i : i + 1]}
    if "pred_mask" in batch:
        out["pred_mask"] = batch["pred_mask"][i : i + 1, :t]
        for key in ("alter_mode", "alter_shift", "channel_mask", "noise_mask"):
            out[key] = batch[key][i : i + 1]
    return out


def _count(model, batch):
    frames = model.encoder.frame_lengths(batch["audio_lens"])
    t = int(frames.max()) if "pred_mask" not in batch else batch["pred_mask"].shape[1]
    mel_lens = torch.div(batch["audio_lens"] - 400, 160, rounding_mode="floor") + 1
    alt = batch if "pred_mask" in batch else None
    stack = model.encoder.frontend.stack
    return int(loss_weight(alt, mel_lens, t, stack, 80, model.reconstruct_all).sum())


@pytest.mark.parametrize("kwargs", [{}, dict(TERA, magnitude_alteration=False)])
def test_padded_batch_equals_each_utterance_alone(kwargs):
    model = _model(**kwargs).eval()
    batch = tiny_audio_batch((8000, 5121, 3200, 1000))
    frames = model.encoder.frame_lengths(batch["audio_lens"])
    with torch.no_grad():
        plain = model(batch)  # eval mode without hook tensors: no alteration, every valid frame
        hooked = model.batch_hook()(dict(batch))
        altered = model(hooked)
        for padded, full in ((plain, batch), (altered, hooked)):
            total, count = 0.0, 0
            for i in range(4):
                alone = _alone(full, i, frames)
                n = _count(model, alone)
                total += model(alone)["loss"].item() * n
                count += n
            assert count == _count(model, full)
            assert abs(padded["loss"].item() - total / count) < 1e-5
    assert plain["mask_fraction"] == 0 and plain["loss_element_fraction"] == 1


def test_a_zero_length_utterance_changes_nothing():
    model = _model(**TERA, noise_std=0.0).eval()
    batch = model.batch_hook()(tiny_audio_batch((8000, 200)))  # 200 samples: shorter than one window
    assert not batch["pred_mask"][1].any()
    alone = _alone(batch, 0, model.encoder.frame_lengths(batch["audio_lens"]))
    with torch.no_grad():
        assert torch.allclose(model(batch)["loss"], model(alone)["loss"], atol=1e-6)
        plain = tiny_audio_batch((8000, 200))
        assert torch.allclose(
            model(plain)["loss"], model(_alone(plain, 0, torch.tensor([50])))["loss"], atol=1e-6
        )


def test_loss_falls_when_overfitting_one_batch():
    model = _model(1)
    batch = model.batch_hook()(tiny_audio_batch())
    losses = overfit(model, batch, steps=40, lr=2e-3)
    assert losses[-1] < 0.6 * losses[0]


def test_training_forward_draws_alterations_without_the_hook():
    model = _model(**TERA).train()
    batch = tiny_audio_batch()
    out = model(batch)
    assert 0 < out["mask_fraction"] < 1 and 0 < out["loss_element_fraction"] <= 1
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_hook_tensors_and_options_are_clear_errors():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    bad = dict(batch, pred_mask=batch["pred_mask"][:, :-1])
    with pytest.raises(DataError, match="pred_mask"):
        model(bad)
    with pytest.raises(DataError, match="alter_mode"):
        model({k: v for k, v in batch.items() if k != "alter_mode"})
    with pytest.raises(ConfigError, match="sum to at most 1"):
        _model(zero_prob=0.8, random_prob=0.3)
    with pytest.raises(ConfigError, match="sizes"):
        OBJECTIVES.build("masked_recon", size="huge")
    with pytest.raises(ConfigError, match="nope"):
        OBJECTIVES.build("masked_recon", size="tiny", encoder={"nope": 1})


def test_mask_span_and_mask_prob_errors_name_their_option():
    with pytest.raises(ConfigError, match=r"objective\.mask_span must be an integer >= 1; got 0") as err:
        _model(mask_span=0)
    assert "mask_prob" not in str(err.value)
    with pytest.raises(ConfigError, match=r"objective\.mask_prob must be in \(0, objective\.mask_span=2\]"):
        _model(mask_span=2, mask_prob=3.0)
    with pytest.raises(ConfigError, match=r"objective\.stack"):
        _model(stack=0)


def test_fine_tuning_mask_gives_masked_frames_what_pretraining_gives_a_zeroed_frame():
    model = _model().eval()
    enc = model.encoder
    assert not hasattr(enc, "mask_embedding") and "mask_embedding" not in dict(model.named_parameters())
    batch = tiny_audio_batch()
    with torch.no_grad():
        feats = enc.extract(batch["audio"], batch["audio_lens"])  # what fine-tuning masks
        b, t, _ = feats.x.shape
        alterations = model.sampler(feats.lengths, t, torch.Generator().manual_seed(3))
        alterations["alter_mode"] = torch.full(
            (b,), ZERO
        )  # the chosen frames zeroed, as in 80% of pretraining
        chosen = alterations["pred_mask"]
        pretrain = enc.projection(alter(feats.raw, feats.lengths, alterations, enc.frontend.stack, 0.0))
        finetune = enc.mask(feats.x, chosen)
        torch.testing.assert_close(finetune, pretrain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(finetune[chosen], enc.projection.bias.expand(int(chosen.sum()), -1))
        assert not torch.allclose(finetune[~chosen], enc.projection.bias)


def test_weights_saved_with_the_old_mask_embedding_still_load():
    model = _model()
    state = dict(model.state_dict(), **{"encoder.mask_embedding": torch.rand(model.encoder.dim)})
    other = _model(seed=1)
    other.load_state_dict(state)  # strict: no missing, no unexpected key
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())


def test_training_step_runs_on_the_meta_device():
    """Meta tensors hold no data: ``.item()``, ``bool(tensor)`` and boolean-mask indexing raise
    there, so a full step on them (with the hook's alterations and with those drawn in
    ``forward``) shows the step needs no host sync (checked without a GPU)."""
    with torch.device("meta"):
        model = _model(**TERA).train()
    for batch in (model.batch_hook()(tiny_audio_batch()), tiny_audio_batch()):
        meta_step(model, batch)


def test_sizes_follow_the_papers():
    def layers(size):
        # base and large only need their shapes: build the transformer and count
        model = OBJECTIVES.build("masked_recon", size=size)
        t = model.encoder.transformer
        return (
            len(t.layers),
            t.dim,
            t.layers[0].attention.num_heads,
            t.layers[0].feed_forward.fc1.out_features,
        )

    assert layers("base") == (3, 768, 12, 3072)
    assert layers("large") == (12, 768, 12, 3072)


@pytest.mark.cuda
def test_training_step_has_no_host_sync():
    model = _model(**TERA).cuda()
    for batch in (model.batch_hook()(tiny_audio_batch()), tiny_audio_batch()):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        model(batch)["loss"].backward()  # warm-up: lazy CUDA initialisation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(batch)["loss"].backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("recipe", ["mockingjay", "tera"])
def test_recipe_pretrains_on_the_built_in_corpus_and_extracts(recipe, synth_tiny, tmp_path):
    manifest = synth_tiny / "av" / "train.jsonl"
    run = tmp_path / recipe
    assert (
        main(
            [
                "pretrain",
                recipe,
                "model.size=tiny",
                f"data.train={manifest}",
                "train.max_steps=2",
                "train.save_every=2",
                "train.log_every=1",
                f"train.out_dir={run}",
                "train.device=cpu",
                "train.progress=false",
                "data.num_workers=0",
                "data.max_seconds_per_batch=10",
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # normalised log mels: an untrained model's L1 is near E|N(0, 1)| = 0.80
        assert 0.3 < m["loss"] < 2.0 and m["reconstruction_loss"] == pytest.approx(m["loss"], rel=1e-5)
        assert 0 < m["mask_fraction"] < 0.6
    # the run's encoder is read back and its features extracted as any other speech run's
    encoder = load_encoder_from_run(run)
    assert encoder.frame_rate == (100 / 3 if recipe == "mockingjay" else 100)
    valid = synth_tiny / "av" / "valid.jsonl"
    out = tmp_path / "feats"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(run),
                "--manifest",
                str(valid),
                "--layer",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    record = read_manifest(valid)[0]
    wave = load_audio(record["audio"])
    with torch.no_grad():
        feats = encoder.extract(wave[None], torch.tensor([wave.shape[0]]))
        expected = encoder.contextualize(feats.x, feats.lengths).layers[1][0]
    torch.testing.assert_close(load_features(out, 2)[record["id"]], expected, atol=1e-5, rtol=1e-5)
