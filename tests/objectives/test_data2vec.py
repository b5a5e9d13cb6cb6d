import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.objectives.data2vec import ema_decay_at, instance_norm, layer_average_targets, regression_loss
from mmssl.registry import OBJECTIVES
from mmssl.testing import noisy_padding, tiny_audio_batch, utterances_alone
from mmssl.train.optim import param_groups

QUIET = dict(dropout=0.0, input_dropout=0.0, attention_dropout=0.0, layer_drop=0.0)


def test_instance_norm_ignores_padding_like_each_utterance_alone():
    x = torch.randn(2, 7, 3)
    lengths = torch.tensor([7, 4])
    out = instance_norm(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = F.instance_norm(x[i : i + 1, :n].transpose(1, 2)).transpose(1, 2)[0]
        assert torch.allclose(out[i, :n], alone, atol=1e-5)
    assert (out[1, 4:] == 0).all()


def test_targets_average_the_top_k_normalised_layers():
    lengths = torch.tensor([5, 3])
    layers = [torch.randn(2, 5, 4) * (i + 1) + i for i in range(4)]
    normed = [instance_norm(layer, lengths) for layer in layers]
    assert torch.allclose(layer_average_targets(layers, lengths, 2), (normed[2] + normed[3]) / 2)
    assert torch.allclose(layer_average_targets(layers, lengths, 8), sum(normed) / 4)


def test_regression_losses_match_hand_computation():
    pred = torch.tensor([[[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]]])
    weight = torch.tensor([[True, False]])
    # frame 0: squared errors 1 + 4 + 0 + 9 = 14, over sqrt(4)
    assert torch.isclose(regression_loss(pred, target, weight), torch.tensor(14 / 2))
    # smooth L1 with beta 1: 0.5 + 1.5 + 0 + 2.5 = 4.5, over sqrt(4)
    assert torch.isclose(regression_loss(pred, target, weight, beta=1.0), torch.tensor(4.5 / 2))
    both = regression_loss(pred, target, torch.tensor([[True, True]]))
    assert torch.isclose(both, torch.tensor((14 / 2 + 100 / 2) / 2))


def test_ema_decay_is_linear_then_flat():
    assert ema_decay_at(0, 0.999, 0.9999, 1000) == 0.999
    assert math.isclose(ema_decay_at(500, 0.999, 0.9999, 1000), 0.99945)
    assert ema_decay_at(1000, 0.999, 0.9999, 1000) == 0.9999
    assert ema_decay_at(10**6, 0.999, 0.9999, 1000) == 0.9999


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return OBJECTIVES.build("data2vec", size="tiny", encoder=QUIET, **kwargs)


def test_teacher_is_an_ema_of_the_student_and_never_trained():
    model = _model(ema_anneal_steps=10)
    trainable = {id(p) for g in param_groups(model, 0.01) for p in g["params"]}
    assert not any(id(p) in trainable for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    model.on_step(5)
    d = 0.999 + (0.9999 - 0.999) * 5 / 10
    names = [n for n, _ in model.teacher.named_parameters()]
    for name, old, new, student in zip(
        names, before, model.teacher.parameters(), model.encoder.transformer.parameters()
    ):
        expected = student if name.startswith("pos_conv.") else d * old + (1 - d) * student
        assert torch.allclose(new, expected, atol=1e-6), name
    model.train()
    assert model.encoder.training and not model.teacher.training


def test_loss_regresses_teacher_targets_of_the_unmasked_input():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    out = model(batch)
    with torch.no_grad():
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        layers = model.teacher(feats.x, feats.lengths, keep_ffn=True).ffn
        targets = layer_average_targets(layers, feats.lengths, 8)
        hidden = model.encoder.contextualize(
            model.encoder.mask(feats.x, batch["pred_mask"]), feats.lengths
        ).hidden
        expected = regression_loss(model.head(hidden), targets, batch["pred_mask"])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    out["loss"].backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_padding_values_change_no_loss():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    noisy = noisy_padding(batch)
    assert torch.allclose(model(batch)["loss"], model(noisy)["loss"], atol=1e-5)


def test_loss_falls_when_overfitting_one_batch():
    model = _model(1)
    batch = model.batch_hook()(tiny_audio_batch())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.on_step(step)
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = model.batch_hook()(tiny_audio_batch())
    out = model(batch)
    total, count = 0.0, 0
    for alone in utterances_alone(batch, model.encoder.frame_lengths(batch["audio_lens"])):
        masked = int(alone["pred_mask"].sum())
        total += model(alone)["loss"].item() * masked
        count += masked
    assert abs(out["loss"].item() - total / count) < 1e-4


def test_a_zero_length_utterance_changes_nothing():
    model = _model().eval()
    batch = model.batch_hook()(tiny_audio_batch((8000, 200)))  # 200 samples: no frame
    assert batch["pred_mask"][1].sum() == 0
    alone = {
        "audio": batch["audio"][:1],
        "audio_lens": batch["audio_lens"][:1],
        "pred_mask": batch["pred_mask"][:1],
    }
    out = model(batch)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], model(alone)["loss"], atol=1e-5)


def test_teacher_is_the_transformer_only_and_ema_touches_exactly_its_parameters():
    # data2vec ``ema_transformer_only``: no teacher frontend, projection or mask embedding
    model = _model()
    teacher = dict(model.teacher.named_parameters())
    student = dict(model.encoder.transformer.named_parameters())
    assert teacher.keys() == student.keys()
    assert all(a.shape == b.shape for a, b in zip(teacher.values(), student.values()))
    assert sum(p.numel() for p in model.teacher.parameters()) < sum(
        p.numel() for p in model.encoder.parameters()
    )
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    moved = {n: p.clone() for n, p in model.named_parameters()}
    model.on_step(0)
    for name, p in model.named_parameters():
        if name.startswith("teacher.pos_conv."):  # ``ema_layers_only``: copied, not averaged
            assert torch.equal(p, student[name[len("teacher.") :]]), name
        elif name.startswith("teacher."):
            key = name[len("teacher.") :]
            expected = 0.999 * before[name] + 0.001 * student[key]
            assert torch.allclose(p, expected, atol=1e-6), name
            assert not torch.equal(p, before[name]), name  # every teacher parameter moved
        else:
            assert torch.equal(p, moved[name]), name  # the EMA changes nothing else


def test_ema_copies_the_position_convolution_and_averages_the_rest_by_hand():
    # fairseq data2vec audio base: ``ema_transformer_only`` and ``ema_layers_only`` (the
    # ``pos_conv`` parameters are the EMA's skip keys: copied from the student each update)
    model = _model(ema_start=0.6, ema_end=0.8, ema_anneal_steps=4)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.fill_(1.0)
        for p in model.encoder.transformer.parameters():
            p.fill_(3.0)
    model.on_step(2)  # decay 0.6 + (0.8 - 0.6) * 2 / 4 = 0.7
    names = [n for n, _ in model.teacher.named_parameters()]
    copied = [n for n in names if n.startswith("pos_conv.")]
    assert copied and any(n.startswith("layers.") for n in names) and "norm.weight" in names
    for name, p in model.teacher.named_parameters():
        expected = 3.0 if name in copied else 0.7 * 1.0 + 0.3 * 3.0  # 1.6
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-6), name


@pytest.mark.parametrize("encoder", [{}, {"input_dropout": 0.3}], ids=["preset", "input_dropout"])
def test_targets_ignore_input_dropout_and_repeat_exactly_in_train_mode(encoder, monkeypatch):
    # fairseq data2vec audio: the teacher reads ``pre_encoder_features``, cloned before
    # ``dropout_input``; the student alone sees the dropped-out features
    torch.manual_seed(0)
    model = OBJECTIVES.build("data2vec", size="tiny", encoder=encoder).train()
    batch = model.batch_hook()(tiny_audio_batch())
    seen = []
    real = model.targets
    monkeypatch.setattr(model, "targets", lambda x, lengths: seen.append(real(x, lengths)) or seen[-1])
    for seed in (1, 2):
        torch.manual_seed(seed)  # other dropout draws on each pass
        model(batch)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    with torch.no_grad():
        feats = model.eval().encoder.extract(batch["audio"], batch["audio_lens"])
        assert torch.equal(seen[0], real(feats.x, feats.lengths))  # no dropout at all


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_presets_have_no_input_dropout_and_a_full_frontend_gradient(size):
    # fairseq data2vec audio/pretraining/base_librispeech.yaml: ``dropout_input: 0.0``,
    # ``feature_grad_mult: 1.0``
    from mmssl.registry import ENCODERS

    with torch.device("meta"):
        encoder = ENCODERS.build(f"data2vec_{size}")
    assert encoder.projection.dropout.p == 0.0
    assert encoder.feature_grad_scale == 1.0


@pytest.mark.parametrize("pre_norm", [False, True])
def test_targets_are_the_normalised_mean_of_the_top_k_ffn_outputs_by_hand(pre_norm):
    # data2vec audio: each block's FFN output before the last residual connection
    torch.manual_seed(0)
    model = OBJECTIVES.build(
        "data2vec", size="tiny", encoder=dict(QUIET, num_layers=3, pre_norm=pre_norm), top_k=2
    )
    batch = tiny_audio_batch()
    with torch.no_grad():
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        teacher, lengths = model.teacher, feats.lengths
        pad = torch.arange(feats.x.shape[1])[None] >= lengths[:, None]
        x = feats.x.masked_fill(pad[..., None], 0.0)
        x = x + teacher.pos_conv(x, pad)
        x = x if pre_norm else teacher.norm(x)
        ffn = []
        for layer in teacher.layers:
            if pre_norm:
                x = x + layer.attention(layer.attention_norm(x), pad)
                ff = layer.feed_forward(layer.ff_norm(x))
                x = x + ff
            else:
                x = layer.attention_norm(x + layer.attention(x, pad))
                ff = layer.feed_forward(x)
                x = layer.ff_norm(x + ff)
            ffn.append(ff)
        expected = (instance_norm(ffn[1], lengths) + instance_norm(ffn[2], lengths)) / 2
        got = model.targets(feats.x, lengths)
    valid = ~pad
    assert torch.allclose(got[valid], expected[valid], atol=1e-5)
    assert not torch.allclose(
        got[valid],
        layer_average_targets(model.teacher(feats.x, lengths).layers, lengths, 2)[valid],
        atol=1e-3,
    )  # not the residual stream
