import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.encoders.base import EncoderOutput
from mmssl.errors import ConfigError
from mmssl.eval.probes import (
    av_layers_and_inputs,
    cca_similarity,
    collect_layers,
    format_table,
    layerwise_report,
    layerwise_similarity,
    plot_layers,
    svd_reduce,
    valid_frames,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_identical_up_to_a_linear_map_is_one_and_independent_is_near_zero():
    g = _gen()
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    mixed = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3.0
    noise = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    for method in ("mean", "svcca", "pwcca"):
        assert cca_similarity(x, mixed, method) == pytest.approx(1.0, abs=1e-4)  # up to the ridge
        assert cca_similarity(x, noise, method) < 0.1


def test_mean_cca_is_the_average_canonical_correlation():
    g = _gen(1)
    z = torch.randn(3000, 1, generator=g, dtype=torch.float64)
    # first dims share z with correlation 1/sqrt(2) each; the second dims are independent
    x = torch.cat([z + torch.randn(3000, 1, generator=g, dtype=torch.float64), torch.randn(3000, 1, generator=g, dtype=torch.float64)], 1)
    y = torch.cat([z + torch.randn(3000, 1, generator=g, dtype=torch.float64), torch.randn(3000, 1, generator=g, dtype=torch.float64)], 1)
    # canonical correlations: 0.5 (corr of z+e1 and z+e2) and ~0
    assert cca_similarity(x, y, "mean") == pytest.approx(0.25, abs=0.04)


def test_pwcca_weights_the_directions_that_carry_x():
    g = _gen(2)
    n = 3000
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    # x: one big direction shared with y, three small private ones
    x = torch.cat([10 * z, 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)], 1)
    y = torch.cat([z + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)], 1)
    mean, pw = cca_similarity(x, y, "mean"), cca_similarity(x, y, "pwcca")
    assert mean < 0.4 and pw > 0.9


def test_svd_reduce_keeps_the_variance_asked_for():
    g = _gen(3)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.01], dtype=torch.float64)
    x = torch.randn(4000, 4, generator=g, dtype=torch.float64) * scales
    # variances 100, 25, 1, 1e-4 of 126: the top 1 / 2 / 3 directions keep 79% / 99.2% / ~100%
    assert svd_reduce(x, 0.70).shape[1] == 1
    assert svd_reduce(x, 0.99).shape[1] == 2
    assert svd_reduce(x, 0.995).shape[1] == 3


def test_valid_frames_drop_padding():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    assert valid_frames(x, torch.tensor([2, 1])).flatten().tolist() == [0.0, 1.0, 3.0]


def test_layerwise_similarity_decreases_with_noise_and_report_files(tmp_path):
    g = _gen(4)
    feats = torch.randn(2, 300, 4, generator=g)
    lengths = torch.tensor([300, 200])
    noise = [torch.randn(2, 300, 4, generator=g) for _ in range(3)]

    def encode(batch):
        layers = [batch["x"] + level * noise[i] for i, level in enumerate((0.1, 1.0, 3.0))]
        padded = [torch.where(torch.arange(300)[None, :, None] < lengths[:, None, None], l, torch.full_like(l, 99.0)) for l in layers]
        return EncoderOutput(hidden=padded[-1], lengths=lengths, layers=padded, frame_rate=25.0)

    layers, inputs = collect_layers(encode, [{"x": feats}], inputs=lambda b: (b["x"], lengths))
    assert [l.shape for l in layers] == [(500, 4)] * 3 and inputs.shape == (500, 4)
    values = layerwise_similarity(layers, [inputs], "mean")
    assert values.shape == (3, 1)
    assert values[0, 0] > values[1, 0] > values[2, 0]
    report = layerwise_report(layers, {"fbank": inputs, "layer 1": layers[0]}, tmp_path, method="svcca")
    assert report.shape == (3, 2) and report[0, 1] == pytest.approx(1.0, abs=1e-4)
    table = (tmp_path / "cca_svcca.md").read_text()
    assert "| layer | fbank | layer 1 |" in table and f"{report[2, 0]:.3f}" in table
    assert Image.open(tmp_path / "cca_svcca.png").format == "PNG"


def _near(img, rgb, tol=40):
    return np.abs(img - np.array(rgb)).sum(-1) < tol


def test_plot_puts_high_values_high(tmp_path):
    path = plot_layers(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), tmp_path / "p.png", ["high", "low"], "t")
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


def test_av_encoder_layers_against_their_inputs(tmp_path):
    from mmssl.encoders.av import av_tiny
    from mmssl.testing import tiny_av_batch

    torch.manual_seed(0)
    enc = av_tiny()
    batches = [tiny_av_batch(seconds=(2.0, 1.6), seed=s) for s in range(2)]
    layers, inputs = av_layers_and_inputs(enc, batches)
    n = 2 * (50 + 40)
    assert len(layers) == 2 and all(l.shape == (n, 64) for l in layers)
    assert inputs["fbank"].shape == (n, 104) and inputs["lips"].shape == (n, 64)  # 26 filterbanks x 4
    # the frames line up: the lip features of clip 1 are the valid frames of video_features
    v, _ = enc.video_features(batches[0]["video"], batches[0]["video_lens"])
    torch.testing.assert_close(inputs["lips"][50:90], v[1, :40].detach())
    values = layerwise_report(layers, {"fbank": inputs["fbank"], "lips": inputs["lips"]}, tmp_path, method="svcca")
    assert values.shape == (2, 2) and ((values >= 0) & (values <= 1)).all()
    assert (tmp_path / "cca_svcca.png").is_file() and "| 2 |" in (tmp_path / "cca_svcca.md").read_text()
