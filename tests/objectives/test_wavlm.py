import math
import pickle

import torch

from mmssl.data.utterance_mixing import UtteranceMixer
from mmssl.registry import OBJECTIVES
from mmssl.testing import noisy_padding, overfit, tiny_audio_batch, tiny_labelled_audio_batch

QUIET = dict(dropout=0.0, input_dropout=0.0, attention_dropout=0.0, layer_drop=0.0)


def _changed_run(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int]:
    diff = (after - before).abs() > 0
    idx = diff.nonzero()[:, 0]
    return int(idx.min()), int(idx.max()) + 1


def test_mixing_overlaps_a_short_segment_at_a_bounded_energy_ratio():
    batch = tiny_audio_batch((8000, 6000, 4000, 3000))
    original = batch["audio"].clone()
    out = UtteranceMixer(prob=1.0, seed=3)(dict(batch))
    assert out["mixed"].all()
    for i, n in enumerate(batch["audio_lens"].tolist()):
        assert torch.equal(out["audio"][i, n:], original[i, n:])  # padding untouched
        start, end = _changed_run(original[i], out["audio"][i])
        assert end - start <= n // 2  # segment at most half the utterance
        added = out["audio"][i, start:end] - original[i, start:end]
        # the added signal is a scaled copy of another utterance's samples
        found = False
        for j, m in enumerate(batch["audio_lens"].tolist()):
            if j == i:
                continue
            for s in range(0, m - (end - start) + 1):
                seg = original[j, s : s + end - start]
                scale = (added @ seg) / (seg @ seg)
                if torch.allclose(added, scale * seg, atol=1e-5):
                    found = True
                    ratio_db = 10 * math.log10(original[i, :n].pow(2).mean() / seg.pow(2).mean() / scale**2)
                    assert -5.0 - 1e-3 <= ratio_db <= 5.0 + 1e-3
                    break
            if found:
                break
        assert found, f"utterance {i}: the added signal is no segment of another utterance"


def test_mixing_probability_and_pickling():
    batch = tiny_audio_batch()
    none = UtteranceMixer(prob=0.0)(dict(batch))
    assert torch.equal(none["audio"], batch["audio"]) and not none["mixed"].any()
    mixer = UtteranceMixer(prob=0.2, seed=1)
    rate = sum(int(mixer(dict(batch))["mixed"].sum()) for _ in range(200)) / 600
    assert 0.14 < rate < 0.26
    clone = pickle.loads(pickle.dumps(mixer))
    fresh = UtteranceMixer(prob=0.5, seed=1)
    torch.manual_seed(4)
    expected = fresh(dict(batch))
    torch.manual_seed(4)
    clone.prob = 0.5
    got = clone(dict(batch))
    assert torch.equal(got["mixed"], expected["mixed"]) and torch.equal(got["audio"], expected["audio"])


def test_wavlm_mixes_then_masks_and_keeps_primary_targets():
    torch.manual_seed(0)
    model = OBJECTIVES.build("wavlm", size="tiny", num_classes=5, mix_prob=1.0, encoder=QUIET)
    assert model.encoder.transformer.position_bias is not None  # gated relative position bias
    batch = tiny_audio_batch()
    batch["targets"] = torch.randint(5, (3, 50))
    targets = batch["targets"].clone()
    hooked = model.batch_hook()(dict(batch))
    assert hooked["mixed"].all() and "pred_mask" in hooked
    assert not torch.equal(hooked["audio"], batch["audio"])
    assert torch.equal(hooked["targets"], targets)
    out = model(hooked)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.label_embeddings.grad.abs().sum() > 0


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return OBJECTIVES.build("wavlm", size="tiny", num_classes=7, mix_prob=0.5, encoder=QUIET, **kwargs)


def _batch(seed=0):
    return tiny_labelled_audio_batch(num_classes=7, seed=seed)  # 100 Hz labels


def test_padding_values_change_no_loss():
    # noise in the padding before the hook: neither the mixing (energy, segments) nor the
    # gated relative position bias nor the loss may read it
    model = _model()
    batch = _batch()
    noisy = noisy_padding(batch, 3.0)
    torch.manual_seed(11)
    a = model.batch_hook()(dict(batch))
    torch.manual_seed(11)
    b = model.batch_hook()(noisy)
    assert a["mixed"].any() and torch.equal(a["mixed"], b["mixed"])
    assert torch.equal(a["pred_mask"], b["pred_mask"])
    for i, n in enumerate(batch["audio_lens"].tolist()):
        assert torch.equal(a["audio"][i, :n], b["audio"][i, :n])
    assert torch.allclose(model(a)["loss"], model(b)["loss"], atol=1e-5)


def test_loss_falls_when_overfitting_one_batch():
    model = _model(1)
    batch = model.batch_hook()(_batch())
    losses = overfit(model, batch, steps=30, lr=2e-3, key="masked_loss")
    assert losses[-1] < 0.5 * losses[0]
