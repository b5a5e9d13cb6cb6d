import math

import pytest
import torch

from mmssl.errors import DataError
from mmssl.nn.prediction import cosine_logits, prediction_loss, resample_targets
from mmssl.registry import OBJECTIVES
from mmssl.testing import (
    noisy_padding,
    overfit,
    tiny_audio_batch,
    tiny_labelled_audio_batch,
    utterances_alone,
)

QUIET = dict(dropout=0.0, input_dropout=0.0, attention_dropout=0.0, layer_drop=0.0)


def test_resample_100hz_labels_onto_50hz_frames_by_index():
    targets = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, -1, -1, -1, -1]])
    out = resample_targets(targets, 5, 100.0, 50.0)
    assert out.tolist() == [[0, 2, 4, 6, -1], [7, 9, -1, -1, -1]]
    up = resample_targets(torch.tensor([[3, 4]]), 5, 25.0, 50.0)
    assert up.tolist() == [[3, 3, 4, 4, -1]]
    same = resample_targets(torch.tensor([[1, 2, 3]]), 3, 50.0, 50.0)
    assert same.tolist() == [[1, 2, 3]]


def test_cosine_logits_and_loss_match_hand_computation():
    x = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])  # (1, 2, 2)
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    logits = cosine_logits(x, emb, 0.1)
    r = 1 / math.sqrt(5)
    rows = [[10.0, 0.0, -10.0], [10 * r, 20 * r, -10 * r]]
    assert torch.allclose(logits, torch.tensor([rows]), atol=1e-5)
    every = torch.tensor([[True, True]])
    out = prediction_loss(logits, torch.tensor([[0, 1]]), every, every, 1.0, 0.0)
    nll = [-row[c] + math.log(sum(math.exp(v) for v in row)) for row, c in zip(rows, (0, 1))]
    assert abs(out["loss"].item() - sum(nll) / 2) < 1e-4 and out["masked_accuracy"].item() == 1.0
    # a frame without a target does not count, whatever its target value
    out = prediction_loss(logits, torch.tensor([[0, 2]]), every, torch.tensor([[True, False]]), 1.0, 0.0)
    assert abs(out["loss"].item() - nll[0]) < 1e-4 and out["masked_accuracy"].item() == 1.0


def _nll(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_unmasked_weight_sums_both_parts_over_the_count_of_all_frames():
    """fairseq hubert_criterion: (w_m * sum_m CE + w_u * sum_u CE) / sample_size, where
    sample_size counts the frames of every part whose weight is > 0."""
    rows = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0], [0.0, 2.0, 1.0]]
    targets = [0, 0, 2, 1, 1]
    masked = [True, True, True, False, False]
    nll = [_nll(r, c) for r, c in zip(rows, targets)]
    sum_m, sum_u = sum(nll[:3]), sum(nll[3:])
    logits, tgt = torch.tensor([rows]), torch.tensor([targets])
    pred_mask, labelled = torch.tensor([masked]), torch.ones(1, 5, dtype=torch.bool)
    out = prediction_loss(logits, tgt, pred_mask, labelled, 1.0, 0.5)
    assert abs(out["loss"].item() - (sum_m + 0.5 * sum_u) / 5) < 1e-5
    assert (
        abs(out["masked_loss"].item() - sum_m / 3) < 1e-5
        and abs(out["unmasked_loss"].item() - sum_u / 2) < 1e-5
    )
    assert (
        abs(out["masked_accuracy"].item() - 2 / 3) < 1e-6
        and abs(out["unmasked_accuracy"].item() - 0.5) < 1e-6
    )
    assert abs(prediction_loss(logits, tgt, pred_mask, labelled, 1.0, 0.0)["loss"].item() - sum_m / 3) < 1e-5
    assert abs(prediction_loss(logits, tgt, pred_mask, labelled, 0.0, 1.0)["loss"].item() - sum_u / 2) < 1e-5
    # no frame to predict: zero, not NaN
    none = prediction_loss(logits, tgt, pred_mask, torch.zeros(1, 5, dtype=torch.bool), 1.0, 0.5)
    assert none["loss"].item() == 0.0


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return OBJECTIVES.build("hubert", size="tiny", num_classes=7, encoder=QUIET, **kwargs)


def _batch(seed=0):
    return tiny_labelled_audio_batch(num_classes=7, seed=seed)  # 100 Hz labels


def test_forward_backward_and_masked_only_by_default():
    model = _model()
    batch = model.batch_hook()(_batch())
    out = model(batch)
    assert torch.isclose(out["loss"], out["masked_loss"] + 10 * out["feature_penalty_loss"])
    out["loss"].backward()
    assert model.label_embeddings.grad.abs().sum() > 0
    # changing the targets of unmasked frames changes nothing
    changed = dict(batch, targets=batch["targets"].clone())
    frames = batch["pred_mask"].shape[1]
    label_of = (torch.arange(frames) * 2).clamp(max=batch["targets"].shape[1] - 1)
    for i in range(3):
        for t in range(frames):
            if not batch["pred_mask"][i, t] and batch["targets"][i, label_of[t]] >= 0:
                changed["targets"][i, label_of[t]] = (batch["targets"][i, label_of[t]] + 1) % 7
    assert torch.allclose(model(changed)["loss"], out["loss"])
    both = _model(unmasked_weight=0.5)
    a, b = both(batch), both(changed)
    assert not torch.allclose(a["loss"], b["loss"])
    # fairseq hubert_criterion: both parts summed, over the count of every frame with a target
    lengths = both.encoder.frame_spec(batch["audio_lens"])
    targets = resample_targets(batch["targets"], frames, 100.0, 50.0)
    labelled = (torch.arange(frames)[None] < lengths[:, None]) & (targets >= 0)
    n_m, n_u = (labelled & batch["pred_mask"]).sum(), (labelled & ~batch["pred_mask"]).sum()
    parts = (n_m * a["masked_loss"] + 0.5 * n_u * a["unmasked_loss"]) / (n_m + n_u)
    assert torch.isclose(a["loss"], parts + 10 * a["feature_penalty_loss"])


def test_padding_values_change_no_loss():
    model = _model()
    batch = model.batch_hook()(_batch())
    noisy = noisy_padding(batch, 3.0)
    a, b = model(batch), model(noisy)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)


def test_missing_targets_is_a_data_error():
    with pytest.raises(DataError, match="data.labels"):
        _model()(tiny_audio_batch())


def test_loss_falls_when_overfitting_one_batch():
    model = _model(1)
    batch = model.batch_hook()(_batch())
    losses = overfit(model, batch, steps=30, lr=2e-3, key="masked_loss")
    assert losses[-1] < 0.5 * losses[0]


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = model.batch_hook()(_batch())
    out = model(batch)
    total, count = 0.0, 0
    for alone in utterances_alone(batch, model.encoder.frame_lengths(batch["audio_lens"])):
        masked = int(alone["pred_mask"].sum())
        total += model(alone)["masked_loss"].item() * masked
        count += masked
    assert abs(out["masked_loss"].item() - total / count) < 1e-4


def test_feature_grad_mult_scales_only_the_frontend_gradient():
    batch = _model().batch_hook()(_batch())
    grads = {}
    for mult in (1.0, 0.1):
        model = _model(feature_grad_mult=mult)
        model(batch)["loss"].backward()
        conv = model.encoder.frontend.blocks[0].conv.weight.grad.clone()
        grads[mult] = (conv, model.final_proj.weight.grad.clone())
    assert torch.allclose(grads[0.1][0], 0.1 * grads[1.0][0], rtol=1e-3, atol=1e-7)
    assert torch.allclose(grads[0.1][1], grads[1.0][1], rtol=1e-5, atol=1e-8)


def test_frontend_gradient_is_scaled_once_by_the_encoder():
    # the base presets carry fairseq's feature_grad_mult=0.1; objectives must not apply it again
    for name in ("hubert", "wavlm", "wav2vec2"):
        kwargs = {"num_classes": 7} if name != "wav2vec2" else {}
        model = OBJECTIVES.build(name, size="tiny", encoder={**QUIET, "feature_grad_scale": 0.1}, **kwargs)
        assert model.encoder.feature_grad_scale == 0.1
        model = OBJECTIVES.build(name, size="tiny", encoder=QUIET, feature_grad_mult=0.5, **kwargs)
        assert model.encoder.feature_grad_scale == 0.5
    batch = _model().batch_hook()(_batch())
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = OBJECTIVES.build(
            "hubert", size="tiny", num_classes=7, encoder={**QUIET, "feature_grad_scale": scale}
        )
        model(batch)["loss"].backward()
        grads[scale] = model.encoder.frontend.blocks[0].conv.weight.grad.clone()
    assert torch.allclose(grads[0.1], 0.1 * grads[1.0], rtol=1e-3, atol=1e-7)


def test_a_zero_length_utterance_changes_nothing():
    model = _model().eval()
    batch = tiny_audio_batch((8000, 200))  # 200 samples: shorter than one frame's window
    batch["targets"] = torch.randint(7, (2, 50), generator=torch.Generator().manual_seed(0))
    batch = model.batch_hook()(batch)
    assert batch["pred_mask"][1].sum() == 0
    alone = {k: batch[k][:1] for k in ("audio", "audio_lens", "targets", "pred_mask")}
    out = model(batch)
    assert torch.allclose(out["loss"], model(alone)["loss"], atol=1e-5)
