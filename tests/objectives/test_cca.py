import numpy as np
import pytest
import scipy.linalg
import torch

from mmssl.errors import ConfigError, DataError
from mmssl.nn.cca import SoftDecorrelation, cca_correlation, linear_cca
from mmssl.objectives.cca import dcca, dccae, soft_cca
from mmssl.registry import OBJECTIVES
from mmssl.testing import overfit, tiny_av_batch


def _pair(n=200, dx=5, dy=4, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, dx)) + 0.5 * rng.standard_normal((n, dx))
    y = z @ rng.standard_normal((3, dy)) + 0.8 * rng.standard_normal((n, dy))
    return x, y


def _numpy_cca(x, y, reg):
    """Textbook reference: whiten with scipy's matrix square root, SVD with numpy."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    sxx = xc.T @ xc / (n - 1) + reg * np.eye(x.shape[1])
    syy = yc.T @ yc / (n - 1) + reg * np.eye(y.shape[1])
    sxy = xc.T @ yc / (n - 1)
    wx = np.linalg.inv(scipy.linalg.sqrtm(sxx).real)
    wy = np.linalg.inv(scipy.linalg.sqrtm(syy).real)
    u, s, vt = np.linalg.svd(wx @ sxy @ wy)
    return s, wx @ u, wy @ vt.T, sxx, syy, sxy


def test_linear_cca_matches_closed_form_reference():
    x, y = _pair()
    corrs, px, py = linear_cca(torch.tensor(x), torch.tensor(y), k=3, reg=1e-3)
    s, rx, ry, sxx, syy, sxy = _numpy_cca(x, y, 1e-3)
    assert corrs.dtype == torch.float64 and px.shape == (5, 3) and py.shape == (4, 3)
    np.testing.assert_allclose(corrs.numpy(), s[:3], rtol=1e-9, atol=1e-12)
    # same directions up to a joint sign per component
    signs = np.sign((px.numpy() * rx[:, :3]).sum(0))
    np.testing.assert_allclose(px.numpy() * signs, rx[:, :3], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(py.numpy() * signs, ry[:, :3], rtol=1e-7, atol=1e-9)
    # the projections whiten each view and diagonalise the cross-covariance
    np.testing.assert_allclose(px.numpy().T @ sxx @ px.numpy(), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(px.numpy().T @ sxy @ py.numpy(), np.diag(s[:3]), atol=1e-9)


def test_linear_cca_perfect_and_independent_views():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64)
    corrs, _, _ = linear_cca(x, x @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64), k=2, reg=0.0)
    torch.testing.assert_close(corrs, torch.ones(2, dtype=torch.float64))
    y = torch.randn(500, 2, generator=g, dtype=torch.float64)
    corrs, _, _ = linear_cca(x, y, k=2, reg=0.0)
    assert corrs.max() < 0.2  # ~ 1/sqrt(500) scale for independent views
    with pytest.raises(ValueError, match="k must be"):
        linear_cca(x, y, k=3)


def test_deep_cca_equals_sum_of_closed_form_correlations():
    x, y = _pair(seed=1)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for k in (None, 2):
        ours = cca_correlation(xt, yt, k=k, reg=1e-3, eps=1e-12)
        ref = linear_cca(xt, yt, k=k or 4, reg=1e-3)[0].sum()
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_deep_cca_excludes_padded_frames():
    x, y = _pair(n=30, seed=2)
    lengths = torch.tensor([12, 10, 8])
    xb = torch.full((3, 12, 5), 1e3, dtype=torch.float64)  # padding full of garbage
    yb = torch.full((3, 12, 4), -7.0, dtype=torch.float64)
    start = 0
    for i, n in enumerate(lengths.tolist()):
        xb[i, :n] = torch.tensor(x[start : start + n])
        yb[i, :n] = torch.tensor(y[start : start + n])
        start += n
    padded = cca_correlation(xb, yb, lengths, reg=1e-3)
    flat = cca_correlation(torch.tensor(x), torch.tensor(y), reg=1e-3)
    torch.testing.assert_close(padded, flat)


def test_deep_cca_gradients_match_finite_differences():
    x, y = _pair(n=20, dx=3, dy=2, seed=3)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cca_correlation(a, b, reg=1e-2), (xt, yt))


def test_deep_cca_gradients_finite_when_a_view_has_equal_eigenvalues():
    """Constant units (dead units, or too few frames for the dimensions) leave a covariance
    with equal eigenvalues, the ridge alone. The objective is smooth there, but differentiating
    ``S^-1/2`` through ``eigh`` divides by the eigenvalue gaps, and gave NaN gradients."""
    x, y = _pair(n=40, dx=6, dy=5, seed=4)
    x[:, 4:] = 0.3  # two constant units: two eigenvalues of Sxx are exactly reg
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cca_correlation(a, b, reg=1e-2), (xt, yt))
    x32, y32 = xt.detach().float().requires_grad_(), yt.detach().float().requires_grad_()
    grads = torch.autograd.grad(cca_correlation(x32, y32, reg=1e-3), (x32, y32))
    expected = torch.autograd.grad(cca_correlation(xt, yt, reg=1e-3), (xt, yt))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-4)  # float32 whitening


def test_deep_cca_needs_a_positive_ridge():
    x, y = _pair(n=20, seed=5)
    with pytest.raises(ConfigError, match="reg must be > 0"):
        cca_correlation(torch.tensor(x), torch.tensor(y), reg=0.0)


def test_soft_decorrelation_running_estimate():
    sdl = SoftDecorrelation(2, alpha=0.5).train()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    w = torch.ones(50)
    sdl(a, w)
    out = sdl(b, w)
    c1 = torch.cov(a.T)[0, 1]
    c2 = torch.cov(b.T)[0, 1]
    expected = ((0.5 * c1 + c2) / 1.5).abs()  # two off-diagonal entries, averaged
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "name,kwargs",
    [("dcca", {"out_dim": 4}), ("soft_cca", {"out_dim": 8}), ("dccae", {"out_dim": 4, "decoder_dim": 16})],
)
def test_objectives_forward_backward_and_overfit(name, kwargs):
    torch.manual_seed(0)
    objective = OBJECTIVES.build(name, size="tiny", **kwargs)
    batch = tiny_av_batch()
    out = objective(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert any(k.endswith("_loss") for k in out)
    out["loss"].backward()
    unused = [n for n, p in objective.named_parameters() if p.grad is None]
    assert not unused  # every parameter takes part (DDP without find_unused_parameters)
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters())
    losses = overfit(objective.eval(), batch, steps=16, lr=3e-3)  # no dropout: a fixed batch, a falling loss
    assert losses[-1] < losses[0] - 0.05  # after 15 updates


def test_dcca_reports_mean_correlation_in_range():
    torch.manual_seed(0)
    out = dcca(size="tiny", out_dim=3)(tiny_av_batch())
    assert 0.0 <= out["mean_corr"].item() <= 1.0 + 1e-5
    torch.testing.assert_close(out["loss"], -3 * out["mean_corr"])


def test_objectives_need_both_modalities():
    batch = tiny_av_batch()
    del batch["video"]
    for build in (dcca, soft_cca, dccae):
        with pytest.raises(DataError, match="video"):
            build(size="tiny", out_dim=4)(batch)


def test_recipe_builds():
    from mmssl.config import builder_kwargs, load_config, resolve

    cfg = resolve(load_config("dcca", ["data.train=m.jsonl", "model.size=tiny", "objective.out_dim=4"]))
    kwargs = {**builder_kwargs(cfg.objective), **builder_kwargs(cfg.model, drop=())}
    obj = OBJECTIVES.build(cfg.objective.name, **kwargs)
    assert torch.isfinite(obj(tiny_av_batch())["loss"])


def test_dccae_audio_target_is_normalised_per_utterance_over_valid_frames():
    from mmssl.objectives.cca import DCCAE

    g = torch.Generator().manual_seed(0)
    raw = 5 + 3 * torch.randn(2, 6, 4, generator=g)
    raw[1, 4:] = 1e4  # padding
    target = DCCAE._audio_target(raw, torch.tensor([6, 4]))
    valid = target[1, :4]
    torch.testing.assert_close(valid.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(valid.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        target[0], (raw[0] - raw[0].mean(0)) / raw[0].std(0, unbiased=False), atol=1e-3, rtol=0
    )
