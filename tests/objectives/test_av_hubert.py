import math
import wave

import numpy as np
import pytest
import torch
from torch import nn

from mmssl.errors import ConfigError, DataError
from mmssl.nn.masking import compute_span_mask
from mmssl.objectives.av_hubert import AVMasks, av_hubert, substitution_index
from mmssl.registry import OBJECTIVES
from mmssl.testing import overfit, tiny_av_batch


def _batch(seed=0):
    batch = tiny_av_batch(seed=seed)
    g = torch.Generator().manual_seed(seed)
    batch["targets"] = torch.randint(0, 8, (3, 12), generator=g)  # 25 Hz labels
    batch["targets"][1, 9:] = -1
    batch["targets"][2, 5:] = -1
    return batch


def _objective(**kw):
    torch.manual_seed(0)
    return OBJECTIVES.build("av_hubert", size="tiny", num_classes=8, label_rate=25.0, final_dim=16, **kw)


def _runs_of(row):
    """``[(start, end), ...]`` of the True runs of a 1-d bool list."""
    runs, start = [], None
    for t, m in enumerate(row + [False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_substitution_never_copies_a_masked_run_from_itself():
    """2,000 random clips and masks: every masked run copies a run of the same clip's valid
    frames that starts outside ``[max(0, s - L), e)`` (AV-HuBERT ``same_seq``), so no
    substituted frame comes from its own masked run; unmasked frames keep their own."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for prob, span in ((0.3, 5), (0.8, 10)):  # mask_prob_image / mask_length_image, iteration 1 settings
        lengths = torch.randint(2, 81, (1000,), generator=g)
        mask = compute_span_mask(lengths, 80, prob, span, 2, g, same_count=False)
        src = substitution_index(mask, lengths, g)
        for b in range(1000):
            n, row, got = int(lengths[b]), mask[b].tolist(), src[b].tolist()
            assert all(got[t] == t for t in range(80) if not row[t])
            for s, e in _runs_of(row):
                length, origin = e - s, got[s]
                low = max(0, s - length)
                assert all(0 <= got[t] < n and not s <= got[t] < e for t in range(s, e))
                if n - (e - low) > 0:  # a start is left outside [low, e)
                    assert not low <= origin < e
                    assert got[s:e] == [min(origin + i, n - 1) for i in range(length)]  # a copied run
                else:  # a short clip masked to its end: the run cycles through the frames before it
                    assert got[s:e] == [i % s for i in range(length)]
                checked += length
    assert checked > 20_000


def test_substitution_starts_are_uniform_over_the_allowed_starts():
    """T = 100 frames masked at 20-29: the copied run starts uniformly in 0-9 or 30-99."""
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(8000, 100, dtype=torch.bool)
    mask[:, 20:30] = True
    origins = substitution_index(mask, torch.full((8000,), 100), g)[:, 20]
    allowed = list(range(10)) + list(range(30, 100))
    counts = torch.bincount(origins, minlength=100).float()
    assert counts[10:30].sum() == 0
    expected = 8000 / len(allowed)
    chi2 = ((counts[allowed] - expected) ** 2 / expected).sum().item()
    assert chi2 < 79 + 5 * math.sqrt(2 * 79)  # 79 degrees of freedom: mean 79, sd 12.6


def test_substitution_when_no_other_start_is_left():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:] = True  # 7 frames to the end: every start would overlap or touch the run
    mask[1, :4] = True  # the whole clip of 4 frames
    src = substitution_index(mask, torch.tensor([10, 4]), torch.Generator().manual_seed(0))
    assert src[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # cycles through the frames before it
    assert src[1].tolist() == list(range(10))  # nothing else to copy


def test_masks_hook_shapes_and_rates():
    obj = _objective()
    hook = obj.batch_hook()
    batch = hook(_batch())
    assert batch["audio_mask"].shape == (3, 12) and batch["video_mask"].shape == (3, 12)
    assert batch["video_source"].shape == (3, 12)
    valid = torch.arange(12)[None] < torch.tensor([12, 9, 5])[:, None]
    assert not (batch["audio_mask"] & ~valid).any() and not (batch["video_mask"] & ~valid).any()
    # long clips: the masked fraction follows 1 - (1 - p / span)^span
    long = {
        "audio": torch.zeros(4, 200 * 640),
        "audio_lens": torch.full((4,), 200 * 640),
        "video": torch.zeros(4, 200, 1, 1, 1),
        "video_lens": torch.full((4,), 200),
    }
    fractions = []
    for _ in range(10):
        out = hook(dict(long))
        fractions.append([out["audio_mask"].float().mean().item(), out["video_mask"].float().mean().item()])
    audio_frac, video_frac = np.mean(fractions, axis=0)
    assert abs(audio_frac - (1 - (1 - 0.08) ** 10)) < 0.08
    assert abs(video_frac - (1 - (1 - 0.06) ** 5)) < 0.06


class _Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, None

    def forward(self, video, video_lens):
        self.seen = video.detach().clone()
        return self.inner(video, video_lens)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_masked_video_frames_come_from_the_same_clip():
    obj = _objective()
    obj.encoder.video_frontend = _Recorder(obj.encoder.video_frontend)
    batch = obj.batch_hook()(_batch())
    obj(batch)
    seen, original = obj.encoder.video_frontend.seen, batch["video"]
    lens = batch["video_lens"].tolist()
    masked = batch["video_mask"]
    assert masked.any()
    for b, n in enumerate(lens):
        for t in range(n):
            frame = seen[b, t]
            if masked[b, t]:
                matches = [s for s in range(n) if torch.equal(frame, original[b, s])]
                assert matches and t not in matches  # another frame of this clip, within its length
            else:
                assert torch.equal(frame, original[b, t])


def test_loss_counts_only_the_union_of_masks():
    obj = _objective().eval()
    batch = obj.batch_hook()(_batch())
    union = batch["audio_mask"] | batch["video_mask"]
    base = obj(batch)["loss"]
    changed = dict(batch)
    changed["targets"] = batch["targets"].clone()
    changed["targets"][~union & (batch["targets"] >= 0)] = (
        7 - changed["targets"][~union & (batch["targets"] >= 0)]
    )
    torch.testing.assert_close(obj(changed)["loss"], base)
    changed["targets"][union] = 7 - batch["targets"][union]
    assert not torch.allclose(obj(changed)["loss"], base)


def test_forward_without_hook_backward_and_overfit():
    obj = _objective(encoder={"modality_dropout": 0.0})
    batch = _batch()
    out = obj(batch)  # no hook: masks made inside forward
    assert abs(out["masked_loss"].item() - math.log(8)) < 1.5
    assert 0 < out["mask_fraction"].item() < 1
    out["loss"].backward()
    assert not [n for n, p in obj.named_parameters() if p.grad is None]
    losses = overfit(obj.eval(), obj.batch_hook()(batch), steps=16, lr=3e-3)
    assert losses[-1] < losses[0] - 0.2  # after 15 updates


def test_runs_audio_only_and_video_only():
    obj = _objective().eval()
    batch = _batch()
    audio_only = {k: batch[k] for k in ("audio", "audio_lens", "targets")}
    video_only = {k: batch[k] for k in ("video", "video_lens", "targets")}
    for b in (audio_only, video_only, obj.batch_hook()(dict(video_only))):
        out = obj(b)
        assert torch.isfinite(out["loss"])
    with pytest.raises(DataError, match="targets"):
        obj({k: batch[k] for k in ("audio", "audio_lens")})


def test_hook_rejects_masks_of_the_wrong_size():
    obj = _objective()
    batch = obj.batch_hook()(_batch())
    batch["audio_mask"] = batch["audio_mask"][:, :5]
    with pytest.raises(DataError, match="disagree"):
        obj(batch)


def _write_wav(path, samples):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_noise_hook_mixes_at_the_snr_in_the_valid_part(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    _write_wav(tmp_path / "noise" / "n.wav", 0.1 * rng.standard_normal(16000))
    obj = av_hubert(
        size="tiny", num_classes=8, noise_dir=str(tmp_path / "noise"), noise_prob=1.0, noise_snr=10.0
    )
    batch = _batch()
    clean = batch["audio"].clone()
    out = obj.batch_hook()(batch)
    for i, n in enumerate(out["audio_lens"].tolist()):
        added = out["audio"][i, :n] - clean[i, :n]
        snr = 20 * torch.log10(clean[i, :n].pow(2).mean().sqrt() / added.pow(2).mean().sqrt())
        assert abs(snr.item() - 10.0) < 0.2
        assert out["audio"][i, n:].abs().sum() == 0
    assert "audio_mask" in out


def test_fused_lengths_follow_the_shorter_stream():
    masks = AVMasks(av_hubert(size="tiny").encoder.frame_spec)
    batch = _batch()
    batch["video_lens"] = torch.tensor([10, 9, 5])
    lengths, t = masks.fused_lengths(batch)
    assert t == 12 and lengths.tolist() == [10, 9, 5]


def _recipe(name, *overrides):
    from mmssl.config import builder_kwargs, load_config, resolve

    cfg = resolve(load_config(name, ["data.train=m.jsonl", "data.labels=km", "model.size=tiny", *overrides]))
    assert list(cfg.data.modalities) == ["audio", "video"]
    kwargs = {**builder_kwargs(cfg.objective), **builder_kwargs(cfg.model, drop=())}
    return cfg, OBJECTIVES.build(cfg.objective.name, **kwargs)


def test_recipes_carry_the_reference_settings_and_train_a_step():
    cfg, first = _recipe("av_hubert_iter1", "objective.num_classes=8")
    assert cfg.objective.label_rate == 100.0 and cfg.train.out_dir == "runs/av_hubert_iter1"
    m = first.masks  # iteration 1: masking_type feature, 0.8 x 10 for both streams, modality_dropout 0
    assert (m.masking_type, m.audio_prob, m.audio_span, m.video_prob, m.video_span) == (
        "feature",
        0.8,
        10,
        0.8,
        10,
    )
    assert first.encoder.fusion.modality_dropout == 0.0 and m.modality_dropout == 0.0
    cfg, later = _recipe("av_hubert", "objective.num_classes=8")
    assert cfg.objective.label_rate == 25.0
    m = (
        later.masks
    )  # later iterations: input masking, audio 0.8 x 10, video 0.3 x 5, modality dropout 0.5 / 0.5
    assert (m.masking_type, m.audio_prob, m.audio_span, m.video_prob, m.video_span) == (
        "input",
        0.8,
        10,
        0.3,
        5,
    )
    assert (m.modality_dropout, m.audio_dropout) == (0.5, 0.5) == (later.encoder.fusion.modality_dropout, 0.5)
    for obj in (
        first,
        later,
    ):  # loss_weights [10], dropout_input 0.1, feature_grad_mult 0.1, 26 x 4 normalised
        assert (obj.penalty_weight, obj.input_dropout.p, obj.feature_grad_mult) == (10.0, 0.1, 0.1)
        assert obj.encoder.audio_frontend.out_dim == 104 and obj.encoder.audio_frontend.normalize
    batch = _batch()
    hundred_hz = dict(batch, targets=batch["targets"].repeat_interleave(4, dim=1))
    for obj, b in ((first, hundred_hz), (later, batch)):
        out = obj(obj.batch_hook()(dict(b)))
        assert torch.isfinite(out["loss"]) and out["masked_accuracy"] <= 1


def test_final_dim_is_256_for_base_and_large():
    with torch.device("meta"):
        for size in ("base", "large"):
            assert av_hubert(size=size).final_proj.out_features == 256  # AV-HuBERT final_dim: 256


def _no_masks(batch):
    b, t = batch["targets"].shape
    return dict(
        batch,
        audio_mask=torch.zeros(b, t, dtype=torch.bool),
        video_mask=torch.zeros(b, t, dtype=torch.bool),
        video_source=torch.arange(t).expand(b, t),
    )


def test_feature_penalty_is_ten_times_the_mean_square_of_the_fused_features():
    """``features_pen``: the mean square of both streams side by side before the fusion's
    LayerNorm (a dropped stream as zeros), over valid frames; with nothing masked the
    prediction loss is 0 and the loss is 10 x the penalty."""
    obj = _objective().train()
    enc = obj.encoder
    batch = _no_masks(_batch())
    batch["keep_audio"], batch["keep_video"] = (
        torch.tensor([False, True, True]),
        torch.ones(3, dtype=torch.bool),
    )
    torch.manual_seed(1)  # the same lip flips twice
    out = obj(batch)
    torch.manual_seed(1)
    with torch.no_grad():
        a, _, _ = enc.audio_features(batch["audio"], batch["audio_lens"])
        v, _ = enc.video_features(batch["video"], batch["video_lens"])
    a = a[:, :12] * batch["keep_audio"].view(3, 1, 1)  # modality dropout: 0 * features_audio
    squares = torch.cat([a, v[:, :12]], -1).pow(2)  # (B, T, Ca + Cv)
    expected = sum(squares[i, :n].sum() for i, n in enumerate((12, 9, 5))) / (
        (12 + 9 + 5) * squares.shape[-1]
    )
    torch.testing.assert_close(out["feature_penalty_loss"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], 10 * expected, rtol=1e-5, atol=1e-7)


def test_feature_grad_mult_scales_the_gradient_of_both_frontends_only():
    batch = _objective().batch_hook()(_batch())
    grads = {}
    for mult in (1.0, 0.1):
        obj = _objective(feature_grad_mult=mult).eval()
        obj(batch)["loss"].backward()
        enc = obj.encoder
        grads[mult] = [
            p.grad.clone()
            for p in (
                enc.audio_proj.weight,
                enc.video_proj.weight,
                next(enc.video_frontend.parameters()),
                enc.fusion.proj.weight,
                obj.final_proj.weight,
            )
        ]
    for scaled, full in zip(grads[0.1][:3], grads[1.0][:3]):  # the filterbank projection, the lip encoder
        torch.testing.assert_close(scaled, 0.1 * full, rtol=1e-4, atol=1e-9)
    for same, full in zip(grads[0.1][3:], grads[1.0][3:]):  # the fusion and what follows
        torch.testing.assert_close(same, full, rtol=1e-5, atol=1e-9)


def test_input_dropout_follows_the_fusion_projection(monkeypatch):
    obj = _objective(encoder={"modality_dropout": 0.0})
    seen = {}
    real = obj.encoder.contextualize
    monkeypatch.setattr(
        obj.encoder, "contextualize", lambda x, lengths: seen.update(x=x, n=lengths) or real(x, lengths)
    )
    batch = obj.batch_hook()(_batch())
    fractions = {}
    for mode in ("train", "eval"):
        getattr(obj, mode)()
        obj(batch)
        valid = torch.arange(seen["x"].shape[1])[None] < seen["n"][:, None]
        fractions[mode] = (seen["x"][valid] == 0).float().mean().item()
    assert abs(fractions["train"] - 0.1) < 0.04 and fractions["eval"] == 0.0  # dropout_input 0.1


def test_unmasked_weight_sums_both_parts_over_all_frames():
    obj = _objective(unmasked_weight=1.0).eval()
    batch = obj.batch_hook()(_batch())
    out = obj(batch)
    valid = torch.arange(12)[None] < torch.tensor([12, 9, 5])[:, None]
    labelled = valid & (batch["targets"] >= 0)
    union = batch["audio_mask"] | batch["video_mask"]
    n_m, n_u = (labelled & union).sum(), (labelled & ~union).sum()
    parts = (n_m * out["masked_loss"] + n_u * out["unmasked_loss"]) / (n_m + n_u)  # fairseq sample_size
    torch.testing.assert_close(out["loss"], parts + 10 * out["feature_penalty_loss"])


def test_feature_masking_masks_the_fused_frames_and_substitutes_no_video(monkeypatch):
    obj = _objective(masking_type="feature", video_mask_prob=0.8, video_mask_span=10).eval()
    assert obj.encoder.audio_mask_embedding is None and obj.feature_mask_embedding is not None
    batch = obj.batch_hook()(_batch())
    assert set(batch) >= {"feature_mask"} and not {"audio_mask", "video_mask", "video_source"} & set(batch)
    obj.encoder.video_frontend = _Recorder(obj.encoder.video_frontend)
    seen = {}
    real = obj.encoder.contextualize
    monkeypatch.setattr(obj.encoder, "contextualize", lambda x, lengths: seen.update(x=x) or real(x, lengths))
    out = obj(batch)
    assert torch.equal(obj.encoder.video_frontend.seen, batch["video"])  # no frame substituted
    mask = batch["feature_mask"]
    assert mask.any() and (~mask & (torch.arange(12)[None] < torch.tensor([12, 9, 5])[:, None])).any()
    assert torch.equal(seen["x"][mask], obj.feature_mask_embedding.detach().expand(int(mask.sum()), -1))
    assert not (seen["x"][~mask] == obj.feature_mask_embedding.detach()).all(-1).any()
    assert 0 < out["mask_fraction"] < 1
    out["loss"].backward()
    assert obj.feature_mask_embedding.grad.abs().sum() > 0


def test_feature_masking_needs_one_setting_for_both_streams():
    with pytest.raises(ConfigError, match="video_mask_prob"):
        av_hubert(size="tiny", masking_type="feature")  # video 0.3 x 5 by default
    with pytest.raises(ConfigError, match="masking_type"):
        av_hubert(size="tiny", masking_type="output")


def test_noise_defaults_to_a_quarter_of_the_utterances_at_0_db(tmp_path):
    (tmp_path / "noise").mkdir()
    _write_wav(tmp_path / "noise" / "n.wav", np.zeros(16000) + 0.01)
    obj = av_hubert(size="tiny", num_classes=8, noise_dir=str(tmp_path / "noise"))
    assert obj.noise.prob == 0.25 and obj.noise.snr_range == (0.0, 0.0)  # noise_prob: 0.25, noise_snr: 0
    ranged = av_hubert(size="tiny", num_classes=8, noise_dir=str(tmp_path / "noise"), noise_snr=[-5, 5])
    assert ranged.noise.snr_range == (-5.0, 5.0)
    with pytest.raises(ConfigError, match="noise_snr"):
        av_hubert(size="tiny", num_classes=8, noise_dir=str(tmp_path / "noise"), noise_snr=[1, 2, 3])


def test_modality_dropout_is_drawn_in_the_hook_per_batch_position(monkeypatch):
    obj = _objective().train()
    hook = obj.batch_hook()
    draws = []
    for seed in range(400):  # one global seed per batch position (and per rank), as the loader does
        torch.manual_seed(seed)
        out = hook(_batch())
        draws.append(torch.stack([out["keep_audio"], out["keep_video"]], 1))
    keep = torch.cat(draws).float()  # (N, 2)
    both = (keep.sum(1) == 2).float().mean()
    audio_only = ((keep[:, 0] == 1) & (keep[:, 1] == 0)).float().mean()
    video_only = ((keep[:, 0] == 0) & (keep[:, 1] == 1)).float().mean()
    assert abs(both - 0.5) < 0.06 and abs(audio_only - 0.25) < 0.06 and abs(video_only - 0.25) < 0.06
    assert (keep.sum(1) > 0).all()  # never both streams dropped
    # in training, forward uses the hook's draws instead of drawing its own
    torch.manual_seed(1)
    batch = hook(_batch())
    batch["targets"] = torch.randint(0, 8, batch["audio_mask"].shape)
    monkeypatch.setattr(obj.encoder.fusion, "sample_keep", lambda *a, **k: pytest.fail("drawn in forward"))
    fused = {}
    real_concat = obj.encoder.fusion.concat
    monkeypatch.setattr(
        obj.encoder.fusion, "concat", lambda *a: fused.setdefault("keep", a[-1]) and real_concat(*a)
    )
    obj(batch)
    assert torch.equal(fused["keep"][0], batch["keep_audio"]) and torch.equal(
        fused["keep"][1], batch["keep_video"]
    )
