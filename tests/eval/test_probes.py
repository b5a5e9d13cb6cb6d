import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.errors import ConfigError
from mmssl.eval.probes import cca_similarity, format_table, layerwise_similarity, plot_layers, svd_reduce


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_identical_up_to_a_linear_map_is_one_and_independent_is_near_zero():
    g = _gen()
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    mixed = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3.0
    noise = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    for method in ("cca", "svcca", "pwcca"):
        assert cca_similarity(x, mixed, method) == pytest.approx(1.0, abs=1e-4)  # up to the ridge
        assert cca_similarity(x, noise, method) < 0.1


def test_mean_cca_is_the_average_canonical_correlation():
    g = _gen(1)
    z = torch.randn(3000, 1, generator=g, dtype=torch.float64)
    # first dims share z with correlation 1/sqrt(2) each; the second dims are independent
    x = torch.cat(
        [
            z + torch.randn(3000, 1, generator=g, dtype=torch.float64),
            torch.randn(3000, 1, generator=g, dtype=torch.float64),
        ],
        1,
    )
    y = torch.cat(
        [
            z + torch.randn(3000, 1, generator=g, dtype=torch.float64),
            torch.randn(3000, 1, generator=g, dtype=torch.float64),
        ],
        1,
    )
    # canonical correlations: 0.5 (corr of z+e1 and z+e2) and ~0
    assert cca_similarity(x, y, "cca") == pytest.approx(0.25, abs=0.04)


def test_pwcca_weights_the_directions_that_carry_x():
    g = _gen(2)
    n = 3000
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    # x: one big direction shared with y, three small private ones
    x = torch.cat([10 * z, 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)], 1)
    y = torch.cat(
        [
            z + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64),
        ],
        1,
    )
    mean, pw = cca_similarity(x, y, "cca"), cca_similarity(x, y, "pwcca")
    assert mean < 0.4 and pw > 0.9


def test_svd_reduce_keeps_the_variance_asked_for():
    g = _gen(3)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.01], dtype=torch.float64)
    x = torch.randn(4000, 4, generator=g, dtype=torch.float64) * scales
    # variances 100, 25, 1, 1e-4 of 126: the top 1 / 2 / 3 directions keep 79% / 99.2% / ~100%
    assert svd_reduce(x, 0.70).shape[1] == 1
    assert svd_reduce(x, 0.99).shape[1] == 2
    assert svd_reduce(x, 0.995).shape[1] == 3


def test_layerwise_similarity_decreases_with_noise():
    g = _gen(4)
    inputs = torch.randn(500, 4, generator=g)
    layers = [inputs + level * torch.randn(500, 4, generator=g) for level in (0.1, 1.0, 3.0)]
    values = layerwise_similarity(layers, [inputs, layers[0]], "svcca")
    assert values.shape == (3, 2) and values[0, 1] == pytest.approx(1.0, abs=1e-4)
    assert values[0, 0] > values[1, 0] > values[2, 0]
    table = format_table(values, ["1", "2", "3"], ["fbank", "layer 1"])
    assert "| layer | fbank | layer 1 |" in table and f"{values[2, 0]:.3f}" in table


def _near(img, rgb, tol=40):
    return np.abs(img - np.array(rgb)).sum(-1) < tol


def test_plot_puts_high_values_high(tmp_path):
    path = plot_layers(
        np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), tmp_path / "p.png", ["high", "low"], "t"
    )
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue_rows = np.nonzero(_near(img, (0, 114, 178)))[0]  # series 1 (mmssl.eval.report.PALETTE)
    orange_rows = np.nonzero(_near(img, (213, 94, 0)))[0]  # series 2
    assert blue_rows.size > 100 and orange_rows.size > 100
    h = img.shape[0]
    # value 1 is drawn at the top of the axes, 0 at the bottom (the legend's short samples aside)
    assert np.median(blue_rows) < 0.25 * h and np.median(orange_rows) > 0.7 * h


def test_plot_takes_one_series_of_layer_values(tmp_path):
    path = plot_layers(np.array([0.0, 0.5, 1.0]), tmp_path / "one.png", ["rising"], "t")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rows, cols = np.nonzero(_near(img, (0, 114, 178)))
    left, right = cols < np.percentile(cols, 20), cols > np.percentile(cols, 80)
    assert rows[left].mean() > rows[right].mean() + 0.3 * img.shape[0]  # the line rises to the right


def test_format_table_and_bad_method():
    text = format_table(np.array([[0.12345], [0.5]]), ["1", "2"], ["input"])
    assert text.splitlines()[2] == "| 1 | 0.123 |"
    with pytest.raises(ConfigError, match="unknown CCA similarity"):
        cca_similarity(torch.zeros(5, 2), torch.zeros(5, 2), "cka")
