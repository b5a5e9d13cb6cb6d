"""WER of a CTC fine-tuning run over noise types x SNRs (``mmssl eval-noisy``,
``mmssl.commands.eval_noisy``), audio-only vs
video-only vs audio-visual (the noisy evaluation of AV-HuBERT, Shi et al., 2022, and of the
robustness tables of HuBERT / WavLM).

Noise is mixed on the waveform before any feature (``mmssl.data.noise.mix_at_snr``, RMS-based
SNR), deterministically per (record, noise type, SNR, seed): every modality condition hears
the very same noisy audio, and a rerun the same. Noise types come from the noise files' name
prefix (``babble_000.wav`` -> ``babble``; the built-in corpus writes babble, music, pink and
white under ``noise/test``) or from ``--noise TYPE=DIR`` pairs (MUSAN-style folders).
``video`` means video only (no audio key in the batch), ``audio`` no video key. Video alone
does not hear the noise, so it is decoded once and its WER repeated in every row.

WER is corpus-level per cell (jiwer over all utterances of the manifest). Each finished cell
is one line of ``results.jsonl``, after a first line that records what the cells depend on
(:func:`fingerprint`: the checkpoint and a hash of its weights, the manifest's path, size and
time, ``--limit``, ``--seed``, the settings of a beam search, ``--decoder beam``, with its
language model's path, size and time (``mmssl.eval.decoders``), and per noise type its files);
a rerun with the same fingerprint skips the cells already there, so a killed evaluation
resumes. When the checkpoint, manifest, limit, seed or decoding differ, the grid starts afresh
(it says so); when only a noise type's files differ, that type's cells are redone. SNRs are
spelled canonically (``10.0`` is ``10``). The table goes to ``wer.md`` (rows noise x SNR,
columns modalities) and the terminal, the curves to ``wer_vs_snr.png``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.data.noise import AUDIO_SUFFIXES, NoiseBank, mix_at_snr
from mmssl.data.units import normalize_text
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.asr import Clip, load_asr_model, load_clips, transcribe, word_errors
from mmssl.eval.decoders import Decoder, decoding_settings, make_decoder
from mmssl.eval.report import PALETTE, line_plot
from mmssl.files import read_text, sha256_file
from mmssl.runs import MODEL_FILE, latest_checkpoint
from mmssl.tables import markdown_table

MODALITY_KEYS = {"audio": ("audio",), "video": ("video",), "audio+video": ("audio", "video")}
CLEAN = "clean"
LINE_STYLES = ["-", "--", ":", "-."]


def canonical_snr(item: str) -> str:
    """``clean``, or a number of dB spelled one way (``10.0`` and ``+10`` -> ``10``)."""
    item = str(item).strip()
    if item == CLEAN:
        return item
    try:
        return f"{float(item):g}"
    except ValueError:
        raise ConfigError(f"--snrs: {item!r} is neither 'clean' nor a number of dB") from None


def parse_snrs(text: str) -> list[str]:
    """``clean,20,10.0,0,-5`` -> ``["clean", "20", "10", "0", "-5"]`` (numbers checked)."""
    out = [canonical_snr(item) for item in (s.strip() for s in text.split(",") if s.strip())]
    if not out:
        raise ConfigError("--snrs is empty")
    return out


def parse_modalities(text: str | None, encoder_modalities: Sequence[str]) -> list[str]:
    """Modality conditions, each checked against what the encoder has streams for; ``None``:
    every condition the encoder can read (audio alone for an audio-only run)."""
    if text is None:
        return [m for m, keys in MODALITY_KEYS.items() if all(k in encoder_modalities for k in keys)]
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in MODALITY_KEYS:
            raise ConfigError(f"--modalities: unknown condition {m!r} (audio, video, audio+video)")
        missing = [k for k in MODALITY_KEYS[m] if k not in encoder_modalities]
        if missing:
            raise ConfigError(
                f"--modalities {m}: the run's encoder has no {' or '.join(missing)} stream "
                f"(it reads {', '.join(encoder_modalities)})"
            )
    return out


def noise_banks(specs: Sequence[str], types: Sequence[str] | None) -> dict[str, NoiseBank]:
    """Noise type -> bank. Each spec is a folder whose files are named ``<type>_*.<ext>``, or
    ``TYPE=DIR`` (every audio file under DIR is of that type). ``types`` picks and orders them;
    an unknown one is a ``ConfigError`` naming it and the known ones."""
    files: dict[str, list[Path]] = {}
    for spec in specs:
        if "=" in spec:
            name, folder = spec.split("=", 1)
            found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise DataError(f"--noise {spec}: no audio files under {folder}")
            files.setdefault(name, []).extend(found)
            continue
        folder = Path(spec)
        if not folder.is_dir():
            raise DataError(f"--noise {spec}: folder not found")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            files.setdefault(path.stem.rsplit("_", 1)[0], []).append(path)
    if not files:
        raise DataError(f"--noise {', '.join(specs)}: no noise files")
    wanted = list(files) if not types else list(types)
    unknown = [t for t in wanted if t not in files]
    if unknown:
        raise ConfigError(
            f"--noise-types: unknown noise type {unknown[0]!r}; the noise has {', '.join(sorted(files))}"
        )
    banks = {t: NoiseBank(files[t]) for t in wanted}
    for bank in banks.values():
        bank.check()  # a silent file would make its noisy cells equal the clean one
    return banks


def noisy_audio(clip: Clip, bank: NoiseBank, noise: str, snr: str, seed: int) -> Tensor:
    """``clip.audio (S,)`` with ``noise`` at ``snr`` dB, the same for the same (record, noise,
    SNR, seed) on every call (its own generator, seeded from a stable hash)."""
    key = f"{seed}|{clip.id}|{noise}|{snr}".encode()
    g = torch.Generator().manual_seed(zlib.crc32(key))
    assert clip.audio is not None
    return mix_at_snr(clip.audio, bank.sample(clip.audio.shape[0], g), float(snr), g)


def _file_id(path: Path) -> list:
    path = Path(path).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(
    run: Path,
    manifest: Path,
    banks: dict[str, NoiseBank],
    limit: int | None,
    seed: int,
    decoding: dict | None = None,
) -> dict:
    """What the cells of a grid depend on besides their (noise, SNR, modality). ``decoding``
    (:func:`mmssl.eval.decoders.decoding_settings`) is recorded as None for greedy decoding,
    as grids written before beam search existed record it."""
    decoding = decoding_settings(decoding)
    decoded = None
    if decoding["kind"] != "greedy":
        decoded = {**decoding, "lm": _file_id(Path(decoding["lm"])) if decoding["lm"] else None}
    folder = latest_checkpoint(run)
    if folder is None:
        raise DataError(f"{run}: no checkpoint yet")
    return {
        "checkpoint": str(folder.resolve()),
        "weights_sha256": sha256_file(folder / MODEL_FILE),
        "manifest": _file_id(manifest),
        "limit": limit,
        "seed": seed,
        "decoding": decoded,
        "noise": {name: [_file_id(Path(f))[:2] for f in bank.files] for name, bank in banks.items()},
    }


def read_results(path: Path) -> tuple[dict | None, dict[tuple[str, str, str], dict]]:
    """``(fingerprint, finished cells by (noise, snr, modality))`` of ``results.jsonl``; a line
    cut by a kill is ignored."""
    found: dict | None = None
    done: dict[tuple[str, str, str], dict] = {}
    if path.is_file():
        for line in read_text(path).splitlines():
            try:
                row = json.loads(line)
                if "fingerprint" in row:
                    found = row["fingerprint"]
                    continue
                done[(row["noise"], canonical_snr(row["snr"]), row["modality"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ConfigError):
                continue
    return found, done


def reusable(path: Path, current: dict) -> dict[tuple[str, str, str], dict]:
    """The cells of ``path`` made under ``current``'s fingerprint; when the rest matches but a
    noise type's files differ, the other cells. Rewrites ``path`` (fingerprint first, the kept
    cells after) and says what it dropped."""
    old, done = read_results(path)
    if done or old is not None:
        same = old is not None and all(old.get(k) == v for k, v in current.items() if k != "noise")
        if not same:
            differ = sorted(k for k, v in current.items() if k != "noise" and (old or {}).get(k) != v)
            print(
                f"note: {path} was made with another {', '.join(differ) or 'version'}; "
                "starting the grid afresh"
            )
            done = {}
        else:
            stale = {n for n, files in current["noise"].items() if old["noise"].get(n, files) != files}
            if stale:
                print(
                    f"note: the files of noise {', '.join(sorted(stale))} changed since {path}; "
                    "redoing its cells"
                )
            done = {k: v for k, v in done.items() if k[0] not in stale}
            current = {**current, "noise": {**old.get("noise", {}), **current["noise"]}}
    lines = [json.dumps({"fingerprint": current})] + [json.dumps(row) for row in done.values()]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return done


def grid(noises: Sequence[str], snrs: Sequence[str], modalities: Sequence[str]) -> list[tuple[str, str, str]]:
    """Cells (noise, snr, modality); the clean condition is one row (noise ``none``)."""
    rows = ([("none", CLEAN)] if CLEAN in snrs else []) + [(n, s) for n in noises for s in snrs if s != CLEAN]
    return [(n, s, m) for n, s in rows for m in modalities]


def table(results: dict, noises: Sequence[str], snrs: Sequence[str], modalities: Sequence[str]) -> str:
    """Markdown: one row per noise x SNR (one clean row), one WER (%) column per modality."""
    rows = []
    for noise, snr, _ in grid(noises, snrs, modalities[:1]):
        cells = [results.get((noise, snr, m)) for m in modalities]
        rows.append([noise, snr] + [None if c is None else 100 * c["wer"] for c in cells])
    return markdown_table(["noise", "SNR (dB)"] + [f"WER % {m}" for m in modalities], rows)


def plot(
    results: dict, noises: Sequence[str], snrs: Sequence[str], modalities: Sequence[str], path: Path
) -> Path:
    """WER against SNR: one line per (modality, noise), a colour per modality and a line style
    per noise type; the clean point is shared."""
    series, styles, colors = {}, {}, {}
    for j, noise in enumerate(noises):
        for k, m in enumerate(modalities):
            name = f"{m} / {noise}"
            cells = [results.get(("none", s, m) if s == CLEAN else (noise, s, m)) for s in snrs]
            series[name] = [None if c is None else 100 * c["wer"] for c in cells]
            styles[name] = LINE_STYLES[j % len(LINE_STYLES)]
            colors[name] = PALETTE[k % len(PALETTE)]
    return line_plot(
        list(snrs),
        series,
        path,
        xlabel="SNR (dB)",
        ylabel="WER (%)",
        title="WER under noise",
        styles=styles,
        colors=colors,
    )


def _beam_description(decoding: dict) -> str:
    lm = f", LM {decoding['lm']} (weight {decoding['lm_weight']:g})" if decoding["lm"] else ", no LM"
    return f"beam search of {decoding['beam']}{lm}"


def _decode_cell(
    objective, clips, keys, device, batch_seconds, audios, progress, desc, decoder: Decoder
) -> dict:
    hyps = transcribe(objective, clips, keys, device, batch_seconds, audios, progress, desc, decoder)
    return word_errors([normalize_text(c.transcript) for c in clips], hyps)


def evaluate(
    run: Path,
    manifest: Path,
    noise_specs: Sequence[str],
    out: Path,
    noise_types: Sequence[str] | None = None,
    snrs: Sequence[str] = ("clean", "20", "10", "5", "0", "-5"),
    modalities_text: str | None = None,
    device_name: str = "auto",
    seed: int = 0,
    batch_seconds: float = 60.0,
    progress: bool = True,
    limit: int | None = None,
    decoding: dict | None = None,
) -> dict:
    """Run every missing cell; write ``results.jsonl``, ``wer.md``, ``wer_vs_snr.png``. Returns
    the results by (noise, snr, modality). ``decoding``: the keyword arguments of
    :func:`mmssl.eval.decoders.make_decoder` (greedy when None)."""

    device = pick_device(device_name)
    snrs = [canonical_snr(s) for s in snrs]
    objective = load_asr_model(run, device)
    modalities = parse_modalities(modalities_text, objective.modalities)  # checked before an LM loads
    decoding = decoding_settings(decoding)
    decoder = make_decoder(objective.units, **decoding)
    banks = noise_banks(noise_specs, noise_types) if any(s != CLEAN for s in snrs) else {}
    needed = sorted({k for m in modalities for k in MODALITY_KEYS[m]})
    clips = load_clips(manifest, needed, progress, limit)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = reusable(results_path, fingerprint(run, manifest, banks, limit, seed, decoding))
    cells = grid(list(banks), snrs, modalities)
    for noise, snr, modality in tqdm(cells, desc="eval-noisy cells", unit="cell", disable=not progress):
        if (noise, snr, modality) in results:
            continue
        keys = MODALITY_KEYS[modality]
        video_done = [r for (n, s, m), r in results.items() if m == "video"]
        if modality == "video" and video_done:  # video alone hears no noise: the same decoding
            score = {k: v for k, v in video_done[0].items() if k not in ("noise", "snr", "modality")}
        else:
            audios = None
            if "audio" in keys and snr != CLEAN:
                audios = [noisy_audio(c, banks[noise], noise, snr, seed) for c in clips]
            desc = f"{modality} {noise} {snr}"
            score = _decode_cell(
                objective, clips, keys, device, batch_seconds, audios, progress, desc, decoder
            )
        row = {"noise": noise, "snr": snr, "modality": modality, **score}
        results[(noise, snr, modality)] = row
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    text = table(results, list(banks), snrs, modalities)
    how = "greedy decoding" if decoding["kind"] == "greedy" else _beam_description(decoding)
    (out / "wer.md").write_text(f"WER of {run} on {manifest} ({how})\n\n{text}\n", encoding="utf-8")
    plot(results, list(banks) or ["none"], snrs, modalities, out / "wer_vs_snr.png")
    print(text)
    return results
