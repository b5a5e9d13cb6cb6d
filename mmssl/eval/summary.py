"""The demo's results as one summary a program can check, and the claims it must support.

``summary.json`` (written by ``mmssl demo``)::

    wer        [{"noise", "snr", "modality", "wer", "init", "labels"}, ...]
               wer in percent; snr "clean" or dB; modality audio | video | audio+video;
               init pretrained | scratch; labels all | subset
    pnmi       {"mfcc": x, "pretrained": y}            (valid split, corpus phone alignments)
    phone_purity {"mfcc": x, "pretrained": y}
    retrieval  {"speech_to_image": {"r1", "r5", "r10"}, "image_to_speech": {...},
                "chance": {"r1", "r5", "r10"}, "images": n}   (test split's unseen images)
    seconds    {stage title: s, ..., "total": s}   (total: wall time; stages side by side overlap)
    cores      CPU cores of the machine

:func:`check_claims` turns it into the six claims of the demo, each met, not met, or not
measured (``None``), with the numbers that decide it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from mmssl.eval.noisy import CLEAN, canonical_snr, read_results
from mmssl.files import read_text

# the demo's targets (README, "What `make demo` shows")
MAX_CLEAN_AUDIO_WER = 10.0
MAX_VIDEO_WER = 60.0
ROBUST_CELLS = (("babble", "0"), ("babble", "-5"), ("music", "0"), ("music", "-5"))
MIN_SSL_GAIN = 0.25  # relative WER: pretrained <= (1 - 0.25) x scratch on the labelled subset
SSL_CELLS = (("none", "clean", "audio"), ("babble", "-5", "audio+video"))
MIN_RECALL_OVER_CHANCE = 4.0


@dataclass
class Claim:
    """One claim: ``met`` is True / False, or None when the demo has not measured it."""

    number: int
    text: str
    met: bool | None
    detail: str


def wer_rows(results: Path, init: str, labels: str) -> list[dict]:
    """The cells of an ``eval-noisy`` ``results.jsonl`` as summary rows (WER in percent), with
    their decoding (``greedy``, or ``beam N`` and the language model's file name)."""
    found, cells = read_results(results)
    decoding = (found or {}).get("decoding") or {}
    how = "greedy"
    if decoding.get("kind") == "beam":
        lm = decoding.get("lm")  # [path, size, mtime] (mmssl.eval.noisy.fingerprint)
        how = f"beam {decoding.get('beam')}" + (f" + LM {Path(lm[0]).name}" if lm else "")
    return [
        {
            "noise": noise,
            "snr": snr if snr == CLEAN else float(snr),
            "modality": modality,
            "wer": round(100.0 * row["wer"], 3),
            "init": init,
            "labels": labels,
            "decoding": how,
        }
        for (noise, snr, modality), row in cells.items()
    ]


def retrieval_summary(recall: dict) -> dict:
    """``mmssl index``'s ``recall.json`` -> the summary's ``retrieval`` entry."""

    def short(d: dict) -> dict:
        return {f"r{key[2:]}": value for key, value in d.items()}

    return {
        "speech_to_image": short(recall["speech_to_image"]),
        "image_to_speech": short(recall["image_to_speech"]),
        "chance": short(recall["chance_speech_to_image"]),
        "chance_image_to_speech": short(recall["chance_image_to_speech"]),
        "images": recall["images"],
    }


def _find(rows: Iterable[dict], noise: str, snr: str, modality: str, init: str, labels: str) -> float | None:
    for row in rows:
        if (row["noise"], canonical_snr(row["snr"]), row["modality"], row["init"], row["labels"]) == (
            noise,
            canonical_snr(snr),
            modality,
            init,
            labels,
        ):
            return float(row["wer"])
    return None


def _claim_targets(summary: dict) -> Claim:
    pnmi, purity = summary.get("pnmi", {}), summary.get("phone_purity", {})
    if "mfcc" not in pnmi or "pretrained" not in pnmi:
        return Claim(1, "targets improve with iterations", None, "cluster quality not measured")
    met = pnmi["pretrained"] > pnmi["mfcc"]
    detail = f"PNMI {pnmi['pretrained']:.3f} (pretrained layer) vs {pnmi['mfcc']:.3f} (MFCC)"
    if "mfcc" in purity and "pretrained" in purity:
        met = met and purity["pretrained"] > purity["mfcc"]
        detail += f"; phone purity {purity['pretrained']:.3f} vs {purity['mfcc']:.3f}"
    return Claim(1, "targets improve with iterations", met, detail)


def _claim_below(number: int, text: str, wer: float | None, limit: float, what: str) -> Claim:
    if wer is None:
        return Claim(number, text, None, f"{what} not measured")
    return Claim(number, text, wer <= limit, f"{what} WER {wer:.1f} % (target <= {limit:.0f} %)")


def _claim_robust(rows: list[dict]) -> Claim:
    text = "audio-visual is robust to noise"
    parts, met = [], True
    for noise, snr in ROBUST_CELLS:
        audio = _find(rows, noise, snr, "audio", "pretrained", "all")
        both = _find(rows, noise, snr, "audio+video", "pretrained", "all")
        if audio is None or both is None:
            return Claim(4, text, None, f"{noise} {snr} dB not measured")
        ok = both < audio and (both <= audio / 2 if (noise, snr) == ("babble", "-5") else True)
        met = met and ok
        parts.append(f"{noise} {snr} dB: {both:.1f} vs {audio:.1f}")
    return Claim(
        4,
        text,
        met,
        "audio+video vs audio WER %: "
        + "; ".join(parts)
        + " (below everywhere, at most half at babble -5 dB)",
    )


def _claim_ssl(rows: list[dict]) -> Claim:
    text = "self-supervision pays on a small labelled subset"
    parts, met = [], True
    for noise, snr, modality in SSL_CELLS:
        pre = _find(rows, noise, snr, modality, "pretrained", "subset")
        scratch = _find(rows, noise, snr, modality, "scratch", "subset")
        if pre is None or scratch is None:
            return Claim(5, text, None, f"{noise} {snr} {modality} on the subset not measured")
        met = met and pre <= (1.0 - MIN_SSL_GAIN) * scratch
        parts.append(
            f"{modality} {snr if noise == 'none' else f'{noise} {snr} dB'}: {pre:.1f} vs {scratch:.1f}"
        )
    return Claim(
        5,
        text,
        met,
        "pretrained vs scratch WER %: " + "; ".join(parts) + f" (at least {100 * MIN_SSL_GAIN:.0f} % lower)",
    )


def _claim_retrieval(retrieval: dict | None) -> Claim:
    text = "retrieval generalises to unseen images"
    if not retrieval:
        return Claim(6, text, None, "retrieval not measured")
    s2i, i2s = retrieval["speech_to_image"]["r10"], retrieval["image_to_speech"]["r10"]
    c_s2i = retrieval["chance"]["r10"]
    c_i2s = retrieval.get("chance_image_to_speech", retrieval["chance"])["r10"]
    met = s2i >= MIN_RECALL_OVER_CHANCE * c_s2i and i2s >= MIN_RECALL_OVER_CHANCE * c_i2s
    return Claim(
        6,
        text,
        met,
        f"R@10 speech->image {100 * s2i:.1f} % (chance {100 * c_s2i:.1f} %), image->speech "
        f"{100 * i2s:.1f} % (chance {100 * c_i2s:.1f} %) on {retrieval['images']} images "
        f"(target {MIN_RECALL_OVER_CHANCE:.0f}x chance)",
    )


def check_claims(summary: dict) -> list[Claim]:
    """The demo's six claims from its summary, in order."""
    rows = summary.get("wer", [])
    return [
        _claim_targets(summary),
        _claim_below(
            2,
            "ASR works",
            _find(rows, "none", "clean", "audio", "pretrained", "all"),
            MAX_CLEAN_AUDIO_WER,
            "clean audio-only",
        ),
        _claim_below(
            3,
            "lip reading works",
            _find(rows, "none", "clean", "video", "pretrained", "all"),
            MAX_VIDEO_WER,
            "video-only",
        ),
        _claim_robust(rows),
        _claim_ssl(rows),
        _claim_retrieval(summary.get("retrieval")),
    ]


def claim_lines(claims: list[Claim]) -> list[str]:
    marks = {True: "met", False: "NOT MET", None: "not measured"}
    return [f"  {c.number}. {c.text}: {marks[c.met]} ({c.detail})" for c in claims]


def write_summary(out: Path, summary: dict) -> list[Claim]:
    """``summary.json`` (with the claims) in ``out``; returns the claims."""
    claims = check_claims(summary)
    data = {**summary, "claims": [asdict(c) for c in claims]}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "summary.json")
    return claims


def _quality(out: Path, folder: str) -> dict:
    path = out / folder / "quality.json"
    return json.loads(read_text(path))["by_manifest"].get("valid", {}) if path.is_file() else {}


def collect(out: Path, seconds: dict[str, float], total: float | None = None) -> dict:
    """The summary (:mod:`mmssl.eval.summary`) from the files the stages wrote; ``total``: the
    stages' wall time when some ran side by side (default: the sum of ``seconds``)."""
    rows = []
    for folder, init, labels in (
        ("asr", "pretrained", "all"),
        ("asr_subset", "pretrained", "subset"),
        ("asr_subset_scratch", "scratch", "subset"),
    ):
        rows += wer_rows(out / folder / "eval_noisy" / "results.jsonl", init, labels)
    mfcc, pretrained = _quality(out, "km_mfcc"), _quality(out, "km_av")
    summary: dict = {"wer": rows}
    greedy = out / "asr" / "eval_noisy_greedy" / "results.jsonl"
    if greedy.is_file():  # the same model decoded without the language model, for the report
        summary["wer_greedy"] = wer_rows(greedy, "pretrained", "all")
    for key in ("pnmi", "phone_purity"):
        summary[key] = {name: q[key] for name, q in (("mfcc", mfcc), ("pretrained", pretrained)) if key in q}
    recall = out / "index" / "recall.json"
    if recall.is_file():
        summary["retrieval"] = retrieval_summary(json.loads(read_text(recall)))
    summary["seconds"] = {**seconds, "total": round(sum(seconds.values()) if total is None else total, 1)}
    summary["cores"] = os.cpu_count()
    return summary


def write_report(out: Path, summary: dict, claims: list, commands: list[str]) -> Path:
    """``report.md``: the claims, the tables and plots, and the commands that made them."""
    lines = [
        "# mmssl demo",
        "",
        f"{summary['cores']} CPU cores; {summary['seconds']['total']:.0f} s of stages run this time.",
        "",
        "## Claims",
        "",
        *[line.strip() for line in claim_lines(claims)],
        "",
        "## Cluster quality (valid split)",
        "",
        "| targets | PNMI | phone purity |",
        "|---|---|---|",
    ]
    for name, label in (("mfcc", "MFCC (iteration 1)"), ("pretrained", "AV-HuBERT layer")):
        if name in summary.get("pnmi", {}):
            lines.append(f"| {label} | {summary['pnmi'][name]:.3f} | {summary['phone_purity'][name]:.3f} |")
    for folder, title in (
        ("asr/eval_noisy", "WER (%) on the test split, fine-tuned on every transcript"),
        ("asr/eval_noisy_greedy", "The same, decoded greedily (no language model)"),
        ("asr_subset/eval_noisy", "WER (%), fine-tuned from the pretrained model on the subset"),
        ("asr_subset_scratch/eval_noisy", "WER (%), fine-tuned from random weights on the subset"),
    ):
        table = out / folder / "wer.md"
        if table.is_file():
            how = wer_rows(table.parent / "results.jsonl", "", "")
            decoding = f" (decoding: {how[0]['decoding']})" if how else ""
            lines += ["", f"## {title}", "", read_text(table).strip() + decoding]
            if (table.parent / "wer_vs_snr.png").is_file():
                lines += ["", f"![WER vs SNR]({folder}/wer_vs_snr.png)"]
    if (out / "index" / "recall.md").is_file():
        lines += [
            "",
            "## Speech-image retrieval on the test split's unseen images",
            "",
            read_text(out / "index" / "recall.md").strip(),
            "",
            "![recall@K](index/recall_at_k.png)",
        ]
    lines += ["", "## How each number was made", "", "```", *[f"mmssl {c}" for c in commands], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
