import pytest
import torch
import torch.nn.functional as F

from mmssl.data.units import default_units
from mmssl.errors import ConfigError, DataError
from mmssl.objectives.ctc import feasible, make_targets
from mmssl.registry import OBJECTIVES
from mmssl.testing import tiny_audio_batch, tiny_av_batch

QUIET = {"layer_drop": 0.0}


def build(encoder="hubert", **kw):
    torch.manual_seed(0)
    return OBJECTIVES.build("ctc", size="tiny", encoder=encoder, encoder_options=QUIET, **kw)


def two_utterances():
    batch = tiny_audio_batch((8000, 4800))
    batch["transcript"] = ["a big star", "hi"]
    return batch


def test_loss_is_sentence_averaged_ctc_and_padding_does_not_change_it():
    obj = build().eval()
    batch = two_utterances()
    out = obj(batch)
    log_probs, lengths = obj.logits(batch)
    targets, target_lens = make_targets(batch, obj.units)
    by_hand = (
        F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            lengths,
            target_lens,
            blank=0,
            reduction="sum",
            zero_infinity=True,
        )
        / 2
    )
    torch.testing.assert_close(out["loss"], by_hand)
    # each utterance alone, its padding cut: the same per-utterance losses
    alone = []
    for i in range(2):
        n = int(batch["audio_lens"][i])
        one = {
            "audio": batch["audio"][i : i + 1, :n],
            "audio_lens": batch["audio_lens"][i : i + 1],
            "transcript": batch["transcript"][i : i + 1],
            "ids": batch["ids"][i : i + 1],
        }
        alone.append(obj(one)["loss"])
    torch.testing.assert_close(out["loss"], (alone[0] + alone[1]) / 2, atol=1e-4, rtol=1e-4)


def test_targets_offset_units_by_one_and_name_bad_records():
    units = default_units()
    targets, lens = make_targets({"transcript": ["ab", "b"], "ids": ["x", "y"]}, units)
    assert lens.tolist() == [2, 1]
    assert targets[1, 1] == 0 and (targets[0] > 0).all()  # 0 (the blank) only pads
    assert units.decode(targets[0].tolist()) == "ab"
    with pytest.raises(DataError, match="'y'"):
        make_targets({"transcript": ["ab", "?!"], "ids": ["x", "y"]}, units)
    with pytest.raises(DataError, match="transcript"):
        make_targets({"ids": ["x"]}, units)


@pytest.mark.parametrize("encoder", ["hubert", "fbank", "av"])
def test_every_encoder_family_trains_and_the_hook_makes_targets_and_masks(encoder):
    obj = build(encoder, mask_channel_prob=0.5, mask_channel_length=8).train()
    batch = tiny_av_batch() if encoder == "av" else tiny_audio_batch()
    batch["transcript"] = ["one big star", "a cat", "hi"]
    batch = obj.batch_hook()(batch)
    assert batch["ctc_targets"].shape[0] == 3 and batch["time_mask"].any()
    assert batch["ctc_targets"][0, :3].tolist() == obj.units.encode("one")
    assert isinstance(batch["ctc_frame_lens"], list) and isinstance(batch["ctc_target_lens"], list)
    out = obj(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["blank_fraction"]) <= 1.0
    assert obj.head.weight.grad is not None
    # a fresh encoder (a from-scratch baseline) trains its conv frontend too
    if encoder == "hubert":
        assert all(p.requires_grad for p in obj.encoder.frontend.parameters())
    if encoder == "av":  # audio-only and video-only batches work on the same model
        obj.eval()
        a, _ = obj.logits({k: batch[k] for k in ("audio", "audio_lens")})
        v, _ = obj.logits({k: batch[k] for k in ("video", "video_lens")})
        assert a.shape[-1] == v.shape[-1] == obj.units.size


@pytest.mark.parametrize(
    "encoder, keys",
    [
        ("hubert", ("audio",)),
        ("fbank", ("audio",)),
        ("av", ("audio", "video")),
        ("av", ("audio",)),
        ("av", ("video",)),
    ],
)
def test_hook_counts_the_frames_the_encoder_gives(encoder, keys):
    obj = build(encoder).eval()
    full = tiny_av_batch((0.48, 0.36, 0.2)) if encoder == "av" else tiny_audio_batch((8000, 5000, 3300))
    if encoder == "av":  # one more audio than video frame: the fusion keeps the shorter stream
        full["video_lens"] = torch.tensor([12, 8, 5])
    batch = {k: v for k, v in full.items() if k.split("_")[0] in keys}
    batch["transcript"] = ["one big star", "a cat", "hi"]
    hooked = obj.batch_hook()(dict(batch))
    _, lengths = obj.logits(batch)
    assert hooked["ctc_frame_lens"] == lengths.tolist()
    assert hooked["ctc_target_lens"] == [len(obj.units.encode(t)) for t in batch["transcript"]]
    # the hook's host lengths give the loss of the slow path (lengths read from the device)
    torch.testing.assert_close(obj(hooked)["loss"], obj(batch)["loss"])


def test_feasibility_counts_a_blank_between_repeated_units():
    targets = torch.tensor([[1, 1, 2], [3, 4, 0], [5, 5, 5]])
    lens = torch.tensor([3, 2, 3])
    # [1, 1, 2] needs 4 frames; [3, 4] needs 2; [5, 5, 5] needs 5
    assert feasible(targets, lens, torch.tensor([4, 2, 4])).tolist() == [True, True, False]
    assert feasible(targets, lens, torch.tensor([3, 1, 5])).tolist() == [False, False, True]


def test_infeasible_utterances_leave_the_loss_and_its_denominator():
    obj = build().eval()
    batch = tiny_audio_batch((8000, 1600))  # 0.1 s: 4 frames at 50 Hz, fewer than 10 units
    batch["transcript"] = ["a big star", "a big star"]
    for b in (batch, obj.batch_hook()(dict(batch))):
        out = obj(b)
        assert float(out["infeasible_fraction"]) == pytest.approx(0.5)
        one = {
            "audio": batch["audio"][:1],
            "audio_lens": batch["audio_lens"][:1],
            "transcript": ["a big star"],
        }
        torch.testing.assert_close(out["loss"], obj(one)["loss"], atol=1e-4, rtol=1e-4)


def test_channel_masks_zero_feature_channels_in_every_frame(monkeypatch):
    obj = build(mask_prob=0.0, mask_channel_prob=1.0, mask_channel_length=8).train()
    batch = tiny_audio_batch((8000, 4800))
    batch["transcript"] = ["a big star", "hi"]
    hooked = obj.batch_hook()(batch)
    mask = hooked["channel_mask"]
    assert mask.shape == (2, obj.encoder.dim) and mask.any() and not mask.all()
    seen = {}
    real = obj.encoder.contextualize
    monkeypatch.setattr(
        obj.encoder, "contextualize", lambda x, lengths: seen.setdefault("x", x) is x and real(x, lengths)
    )
    obj(hooked)
    x = seen["x"]
    assert (x.abs().sum(1)[mask] == 0).all()  # masked channels are zero over all frames
    assert (x.abs().sum(1)[~mask] > 0).all()


def test_encoder_frozen_for_freeze_steps_then_trains_and_resume_knows():
    obj = build(freeze_steps=2).train()
    batch = two_utterances()
    obj(batch)["loss"].backward()
    assert obj.head.weight.grad is not None
    assert all(p.grad is None for p in obj.encoder.transformer.parameters())
    obj.zero_grad()
    obj.set_step(2)
    obj(batch)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.encoder.transformer.parameters())
    fresh = build(freeze_steps=2)
    assert fresh.encoder_frozen
    fresh.load_state_dict(obj.state_dict())
    assert not fresh.encoder_frozen  # the update count travels in the checkpoint


def test_noise_augmentation_in_the_hook_is_seeded_and_leaves_targets_alone(synth_tiny):
    obj = build(
        "av",
        noise_dir=str(synth_tiny / "noise" / "train"),
        noise_prob=1.0,  # default noise_snr: 0 dB
    )
    clean = tiny_av_batch()
    clean["transcript"] = ["one big star", "a cat", "hi"]

    def hooked(seed):
        torch.manual_seed(seed)  # the batch stream seeds each batch position like this
        return obj.batch_hook()({k: (v.clone() if torch.is_tensor(v) else v) for k, v in clean.items()})

    a, b, c = hooked(1), hooked(1), hooked(2)
    assert torch.equal(a["audio"], b["audio"]) and not torch.equal(a["audio"], c["audio"])
    for i, n in enumerate(clean["audio_lens"].tolist()):
        noise = a["audio"][i, :n] - clean["audio"][i, :n]
        snr = 20 * torch.log10(clean["audio"][i, :n].pow(2).mean().sqrt() / noise.pow(2).mean().sqrt())
        assert float(snr) == pytest.approx(0.0, abs=1e-3)  # AV-HuBERT fine-tuning noise_snr: 0 dB
        assert a["audio"][i, n:].abs().sum() == 0  # padding stays silent
    assert torch.equal(a["ctc_targets"], make_targets(clean, obj.units)[0])


def test_augment_after_trains_on_clean_audio_with_both_streams_until_that_update(synth_tiny):
    noisy = build(
        "av",
        noise_dir=str(synth_tiny / "noise" / "train"),
        noise_prob=1.0,
        mask_prob=0.0,
        modality_dropout=1.0,  # every utterance loses a stream once augmenting
        augment_after=3,
    ).train()
    plain = build("av", mask_prob=0.0, modality_dropout=0.0).train()
    plain.load_state_dict(noisy.state_dict())
    clean = tiny_av_batch()
    clean["transcript"] = ["one big star", "a cat", "hi"]
    torch.manual_seed(1)
    hooked = noisy.batch_hook()({k: (v.clone() if torch.is_tensor(v) else v) for k, v in clean.items()})
    assert not torch.equal(hooked["audio"], clean["audio"])
    assert torch.equal(hooked["clean_audio"], clean["audio"])
    assert not (hooked["keep_audio"] & hooked["keep_video"]).any()

    def log_probs(obj, batch, step):
        obj.set_step(step)
        torch.manual_seed(0)  # the same dropout draws
        return obj.logits(batch)[0]

    for step in (0, 2):  # clean audio, both streams: what the plain objective sees
        assert torch.allclose(log_probs(noisy, hooked, step), log_probs(plain, clean, step), atol=1e-6)
    assert not torch.allclose(log_probs(noisy, hooked, 3), log_probs(plain, clean, 3), atol=1e-3)
    assert not noisy.eval().augmenting


def test_augment_after_must_not_be_negative():
    with pytest.raises(ConfigError, match="augment_after"):
        build(augment_after=-1)
