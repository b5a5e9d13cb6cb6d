import torch
import torch.nn.functional as F

from mmssl.nn.contrastive import gather_logits, info_nce, sample_negatives
from mmssl.nn.prediction import feature_penalty
from mmssl.objectives.wav2vec2 import wav2vec2
from mmssl.registry import OBJECTIVES
from mmssl.testing import noisy_padding, tiny_audio_batch

QUIET = dict(dropout=0.0, input_dropout=0.0, attention_dropout=0.0, layer_drop=0.0)


def test_negatives_come_from_other_candidates_of_the_same_utterance():
    g = torch.Generator().manual_seed(0)
    candidates = torch.zeros(3, 30, dtype=torch.bool)
    candidates[0, 3:13] = True
    candidates[1, [0, 7, 29]] = True
    candidates[2, 5] = True  # one candidate: no distractor exists
    positives = torch.arange(30).expand(3, 30)
    idx, usable = sample_negatives(candidates, positives, 200, g)
    assert idx.shape == (3, 30, 200)
    for b in range(2):
        picked = candidates[b].gather(0, idx[b].flatten())
        assert picked.all()
        masked_rows = candidates[b].nonzero()[:, 0]
        assert not (idx[b, masked_rows] == masked_rows[:, None]).any()  # never the positive
    assert usable[:2].all() and not usable[2].any()
    # uniform over the 9 other candidates of utterance 0
    counts = torch.bincount(idx[0, 5].flatten(), minlength=30)[3:13].float()
    assert counts[2] == 0 and counts.sum() == 200 and counts.max() < 45


def test_info_nce_equals_cross_entropy_on_explicit_logits():
    g = torch.Generator().manual_seed(1)
    pred, targets = torch.randn(2, 6, 5, generator=g), torch.randn(2, 9, 5, generator=g)
    positives = torch.randint(9, (2, 6), generator=g)
    negatives = torch.randint(9, (2, 6, 4), generator=g)
    weight = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for cosine, temp in ((False, 1.0), (True, 0.1)):
        logits = gather_logits(pred, targets, positives, negatives, temp, cosine)
        loss, acc = info_nce(logits, weight)
        rows, hits = [], []
        for b in range(2):
            for a in range(6):
                if not weight[b, a]:
                    continue
                cands = targets[b, torch.cat([positives[b, a : a + 1], negatives[b, a]])]
                if cosine:
                    row = F.cosine_similarity(pred[b, a][None], cands, dim=-1) / temp
                else:
                    row = cands @ pred[b, a]
                rows.append(row)
                hits.append(float(row.argmax() == 0))
        explicit = F.cross_entropy(torch.stack(rows), torch.zeros(len(rows), dtype=torch.long))
        assert torch.allclose(loss, explicit, atol=1e-5)
        assert abs(acc.item() - sum(hits) / len(hits)) < 1e-6


def test_excluded_negatives_drop_out_of_the_softmax():
    logits = gather_logits(
        torch.ones(1, 1, 2),
        torch.eye(2)[None],
        torch.tensor([[0]]),
        torch.tensor([[[1, 1]]]),
        exclude=torch.tensor([[[True, False]]]),
    )
    # positive logit 1, one remaining negative logit 1: loss = log 2
    loss, _ = info_nce(logits, torch.ones(1, 1))
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)))


def test_feature_penalty_ignores_padding():
    raw = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 2])
    expected = torch.cat([raw[0], raw[1, :2]]).pow(2).mean()
    assert torch.isclose(feature_penalty(raw, lengths), expected)
    raw[1, 2:] = 100.0
    assert torch.isclose(feature_penalty(raw, lengths), expected)


def _model(seed=0):
    torch.manual_seed(seed)
    return OBJECTIVES.build("wav2vec2", size="tiny", encoder=QUIET, dropout_features=0.0)


def test_forward_backward_and_metrics_on_a_padded_batch():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    out = model(batch)
    assert {"loss", "contrastive_loss", "diversity_loss", "feature_penalty_loss", "accuracy"} <= set(out)
    expected = out["contrastive_loss"] + 0.1 * out["diversity_loss"] + 10 * out["feature_penalty_loss"]
    assert torch.isclose(out["loss"], expected)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3]) and model.quantizer.codebook.grad.abs().sum() > 0
    counts = batch["pred_mask"].sum(1)
    assert (counts == counts[0]).all()


def test_padding_values_change_no_loss():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    noisy = noisy_padding(batch)
    torch.manual_seed(5)
    a = model(batch)
    torch.manual_seed(5)
    b = model(noisy)
    for key in ("loss", "contrastive_loss", "diversity_loss", "feature_penalty_loss"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_forward_makes_its_own_mask_without_the_hook():
    model = _model()
    out = model(tiny_audio_batch())
    assert 0.0 < out["mask_fraction"] < 1.0 and torch.isfinite(out["loss"])


def test_temperature_follows_set_step():
    model = wav2vec2(size="tiny", encoder=QUIET)
    model.set_step(100_000)
    assert abs(model(tiny_audio_batch())["temperature"].item() - 2.0 * 0.999995**100_000) < 1e-6


def test_loss_falls_when_overfitting_one_batch():
    model = _model(1)
    batch = model.batch_hook()(tiny_audio_batch())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.set_step(step + 1)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_code_perplexity_averages_over_masked_frames_only():
    # fairseq quantizes ``unmasked_features[mask_indices]``: the batch-averaged softmax behind
    # the perplexity and the diversity loss runs over masked frames, not every valid frame
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    out = model(batch)
    feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
    probs = model.quantizer(model.quantizer_norm(feats.raw)).probs  # (B, T, G, V), no noise
    masked = batch["pred_mask"] & (torch.arange(probs.shape[1]) < feats.lengths[:, None])

    def perplexity(rows):  # rows (N, G, V)
        avg = rows.mean(0)
        return torch.exp(-(avg * avg.clamp(min=1e-7).log()).sum(-1)).sum()

    expected = perplexity(probs[masked])
    assert torch.allclose(out["perplexity"], expected, atol=1e-4)
    valid = torch.arange(probs.shape[1]) < feats.lengths[:, None]
    assert not torch.allclose(out["perplexity"], perplexity(probs[valid]), atol=1e-4)
    total = model.quantizer.groups * model.quantizer.entries
    assert torch.allclose(out["diversity_loss"], (total - expected) / total, atol=1e-6)


def test_quantizer_reads_layer_normed_features_after_their_own_dropout(monkeypatch):
    # fairseq wav2vec 2.0: ``unmasked_features`` is ``layer_norm(features)``, then
    # ``dropout_features`` (0.1 in wav2vec2_base_librispeech.yaml) before the quantizer
    torch.manual_seed(0)
    model = wav2vec2(size="tiny", encoder=QUIET).train()
    batch = model.batch_hook()(tiny_audio_batch())
    seen = []
    real = model.quantizer.forward
    monkeypatch.setattr(model.quantizer, "forward", lambda x, weight=None: seen.append(x) or real(x, weight))
    model(batch)
    with torch.no_grad():
        normed = model.quantizer_norm(model.encoder.extract(batch["audio"], batch["audio_lens"]).raw)
    x = seen[0].detach()
    kept = x != 0
    assert 0.07 < 1 - kept.float().mean() < 0.13  # about a tenth of the values dropped
    assert torch.allclose(x[kept], normed[kept] / 0.9, atol=1e-5)  # the rest scaled by 1 / (1 - p)
    model.eval()(batch)
    assert torch.allclose(seen[1], normed, atol=1e-6)  # no dropout in evaluation


def test_dropout_features_follows_the_published_recipes():
    # wav2vec2_base_librispeech.yaml: 0.1; wav2vec2_large_librivox.yaml: 0.0
    assert wav2vec2(size="base").feature_dropout.p == 0.1
    with torch.device("meta"):
        assert wav2vec2(size="large").feature_dropout.p == 0.0
    assert wav2vec2(size="tiny", dropout_features=0.3).feature_dropout.p == 0.3
