"""The demo summary: rows read back from eval-noisy and index outputs, and each claim decided
by its numbers (met, not met, not measured)."""

import json

import pytest

from mmssl.eval.summary import check_claims, retrieval_summary, wer_rows, write_summary


def _results(path, cells, decoding=None):
    lines = [json.dumps({"fingerprint": {"checkpoint": "c", "decoding": decoding}})]
    lines += [json.dumps({"noise": n, "snr": s, "modality": m, "wer": w}) for (n, s, m), w in cells.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _grid(audio, video, both, init="pretrained", labels="all"):
    """Summary rows: clean and babble/music at 0 and -5 dB, WER (%) per modality from the
    functions of the SNR given."""
    rows = []
    for noise, snr in [("none", "clean"), ("babble", 0.0), ("babble", -5.0), ("music", 0.0), ("music", -5.0)]:
        for modality, wer in (("audio", audio), ("video", video), ("audio+video", both)):
            rows.append(
                {
                    "noise": noise,
                    "snr": snr,
                    "modality": modality,
                    "wer": wer(noise, snr),
                    "init": init,
                    "labels": labels,
                }
            )
    return rows


def _retrieval(r10_s2i, r10_i2s, chance=0.1667):
    recall = {
        "speech_to_image": {"R@1": 0.1, "R@5": 0.3, "R@10": r10_s2i},
        "image_to_speech": {"R@1": 0.1, "R@5": 0.3, "R@10": r10_i2s},
        "chance_speech_to_image": {"R@1": 0.0167, "R@5": 0.0833, "R@10": chance},
        "chance_image_to_speech": {"R@1": 0.0167, "R@5": 0.0833, "R@10": chance},
        "images": 60,
        "captions": 300,
        "warnings": [],
    }
    return retrieval_summary(recall)


def _good_summary():
    clean = {"none": 1.0}
    rows = _grid(
        lambda n, s: 5.0 if n == "none" else 40.0 + (20 if s == -5.0 else 0),
        lambda n, s: 50.0,
        lambda n, s: clean.get(n, 12.0),
    )
    rows += _grid(lambda n, s: 20.0, lambda n, s: 80.0, lambda n, s: 30.0, labels="subset")
    rows += _grid(lambda n, s: 40.0, lambda n, s: 95.0, lambda n, s: 60.0, init="scratch", labels="subset")
    return {
        "wer": rows,
        "pnmi": {"mfcc": 0.48, "pretrained": 0.55},
        "phone_purity": {"mfcc": 0.47, "pretrained": 0.52},
        "retrieval": _retrieval(0.8, 0.7),
        "seconds": {"total": 1.0},
        "cores": 2,
    }


def test_wer_rows_read_eval_noisy_cells_in_percent(tmp_path):
    path = _results(
        tmp_path / "results.jsonl", {("none", "clean", "audio"): 0.05, ("babble", "-5", "video"): 0.5}
    )
    rows = sorted(wer_rows(path, "scratch", "subset"), key=lambda r: r["noise"])
    assert rows == [
        {
            "noise": "babble",
            "snr": -5.0,
            "modality": "video",
            "wer": 50.0,
            "init": "scratch",
            "labels": "subset",
            "decoding": "greedy",
        },
        {
            "noise": "none",
            "snr": "clean",
            "modality": "audio",
            "wer": 5.0,
            "init": "scratch",
            "labels": "subset",
            "decoding": "greedy",
        },
    ]


def test_wer_rows_name_a_beam_search_and_its_language_model(tmp_path):
    decoding = {"kind": "beam", "beam": 50, "lm": ["/x/lm/train_3gram.arpa", 10, 1], "lm_weight": 2.0}
    path = _results(tmp_path / "results.jsonl", {("none", "clean", "audio"): 0.05}, decoding)
    assert [r["decoding"] for r in wer_rows(path, "pretrained", "all")] == ["beam 50 + LM train_3gram.arpa"]
    path = _results(tmp_path / "results.jsonl", {("none", "clean", "audio"): 0.05}, {**decoding, "lm": None})
    assert [r["decoding"] for r in wer_rows(path, "pretrained", "all")] == ["beam 50"]


def test_every_claim_is_met_by_numbers_that_meet_it():
    claims = check_claims(_good_summary())
    assert [c.number for c in claims] == [1, 2, 3, 4, 5, 6]
    assert all(c.met is True for c in claims), [c.detail for c in claims if not c.met]


@pytest.mark.parametrize(
    "number, spoil",
    [
        (1, lambda s: s["pnmi"].update(pretrained=0.40)),
        (1, lambda s: s["phone_purity"].update(pretrained=0.40)),  # PNMI alone is not enough
        (2, lambda s: _set(s, "none", "clean", "audio", "pretrained", "all", 10.5)),
        (3, lambda s: _set(s, "none", "clean", "video", "pretrained", "all", 61.0)),
        (4, lambda s: _set(s, "music", 0.0, "audio+video", "pretrained", "all", 45.0)),  # above audio's 40
        (
            4,
            lambda s: _set(s, "babble", -5.0, "audio+video", "pretrained", "all", 31.0),
        ),  # more than half of 60
        (
            5,
            lambda s: _set(s, "babble", -5.0, "audio+video", "pretrained", "subset", 46.0),
        ),  # 23 % better only
        (6, lambda s: s.update(retrieval=_retrieval(0.8, 0.6))),  # image->speech 3.6x chance
    ],
)
def test_a_number_that_misses_its_target_fails_its_claim_only(number, spoil):
    summary = _good_summary()
    spoil(summary)
    claims = check_claims(summary)
    assert [c.number for c in claims if c.met is False] == [number]


def _set(summary, noise, snr, modality, init, labels, wer):
    for row in summary["wer"]:
        if (row["noise"], row["snr"], row["modality"], row["init"], row["labels"]) == (
            noise,
            snr,
            modality,
            init,
            labels,
        ):
            row["wer"] = wer
            return
    raise AssertionError("no such row")


def test_what_was_not_measured_is_said_not_hidden(tmp_path):
    claims = write_summary(tmp_path, {"wer": [], "seconds": {"total": 3.0}, "cores": 2})
    assert [c.met for c in claims] == [None] * 6
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["cores"] == 2 and [c["met"] for c in data["claims"]] == [None] * 6
