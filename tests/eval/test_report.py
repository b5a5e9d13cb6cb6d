import numpy as np
from PIL import Image

from mmssl.eval.report import line_plot
from mmssl.tables import markdown_table


def test_markdown_table_formats_floats_and_gaps():
    text = markdown_table(["noise", "WER"], [["babble", 12.3456], ["music", None], ["clean", 3]], digits=1)
    assert text.splitlines() == [
        "| noise | WER |",
        "|---|---|",
        "| babble | 12.3 |",
        "| music |  |",
        "| clean | 3 |",
    ]


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels[..., :3].astype(int) - rgb).sum(-1) < 30).any())


def test_line_plot_draws_each_series_in_its_colour(tmp_path):
    path = line_plot(
        ["clean", "10", "0"],
        {"audio": [5.0, 20.0, None], "video": [40.0, 40.0, 40.0]},
        tmp_path / "p.png",
        xlabel="SNR (dB)",
        ylabel="WER (%)",
        colors={"audio": "#ff0000", "video": "#00ff00"},
        styles={"video": "--"},
    )
    pixels = np.asarray(Image.open(path))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert _has_colour(pixels, (255, 0, 0)) and _has_colour(pixels, (0, 255, 0))
    assert not _has_colour(pixels, (0, 0, 255))
