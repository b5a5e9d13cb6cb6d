import pytest
import torch
import torch.nn.functional as F

from mmssl.errors import DataError
from mmssl.eval.asr import default_units
from mmssl.objectives.ctc import make_targets
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
    by_hand = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lens, blank=0,
                         reduction="sum", zero_infinity=True) / 2
    torch.testing.assert_close(out["loss"], by_hand)
    # each utterance alone, its padding cut: the same per-utterance losses
    alone = []
    for i in range(2):
        n = int(batch["audio_lens"][i])
        one = {"audio": batch["audio"][i : i + 1, :n], "audio_lens": batch["audio_lens"][i : i + 1],
               "transcript": batch["transcript"][i : i + 1], "ids": batch["ids"][i : i + 1]}
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
    obj = build(encoder).train()
    batch = tiny_av_batch() if encoder == "av" else tiny_audio_batch()
    batch["transcript"] = ["one big star", "a cat", "hi"]
    batch = obj.batch_hook()(batch)
    assert batch["ctc_targets"].shape[0] == 3 and batch["time_mask"].any()
    assert batch["ctc_targets"][0, :3].tolist() == obj.units.encode("one")
    out = obj(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["blank_fraction"]) <= 1.0
    assert obj.head.weight.grad is not None
    if encoder == "hubert":  # the conv frontend stays frozen (fairseq feature_grad_mult 0.0)
        assert all(not p.requires_grad for p in obj.encoder.frontend.parameters())
    if encoder == "av":  # audio-only and video-only batches work on the same model
        obj.eval()
        a, _ = obj.logits({k: batch[k] for k in ("audio", "audio_lens")})
        v, _ = obj.logits({k: batch[k] for k in ("video", "video_lens")})
        assert a.shape[-1] == v.shape[-1] == obj.units.size


def test_encoder_frozen_for_freeze_steps_then_trains_and_resume_knows():
    obj = build(freeze_steps=2).train()
    batch = two_utterances()
    obj(batch)["loss"].backward()
    assert obj.head.weight.grad is not None
    assert all(p.grad is None for p in obj.encoder.transformer.parameters())
    obj.zero_grad()
    obj.on_step(2)
    obj(batch)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.encoder.transformer.parameters())
    fresh = build(freeze_steps=2)
    assert fresh.encoder_frozen
    fresh.load_state_dict(obj.state_dict())
    assert not fresh.encoder_frozen  # the update count travels in the checkpoint


def test_noise_augmentation_in_the_hook_is_seeded_and_leaves_targets_alone(synth_tiny):
    obj = build("av", noise_dir=str(synth_tiny / "noise" / "train"), noise_prob=1.0, snr_low=0.0, snr_high=0.0)
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
        assert float(snr) == pytest.approx(0.0, abs=1e-3)  # snr_low = snr_high = 0 dB
        assert a["audio"][i, n:].abs().sum() == 0  # padding stays silent
    assert torch.equal(a["ctc_targets"], make_targets(clean, obj.units)[0])
