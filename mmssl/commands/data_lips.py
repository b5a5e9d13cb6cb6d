"""``mmssl data lips VIDEO|MANIFEST ... --out DIR``: 96x96 mouth crops at 25 fps (with the
clip's audio) from face video, by landmarks, an OpenCV face model or a cascade detector
(``mmssl.data.lip_roi``); a manifest is rewritten to point at the crops."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tqdm import tqdm

from mmssl.data.lip_roi import (
    CROP_SIZE,
    STORE_SIZE,
    MouthFinder,
    YuNetMouths,
    default_finder,
    landmark_file,
    process_video,
)
from mmssl.errors import DataError
from mmssl.files import read_text, write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", help="face videos, or JSON-lines manifests whose records have 'video'"
    )
    parser.add_argument(
        "--out", required=True, help="output folder: <stem>.mp4 per video; a rewritten manifest per manifest"
    )
    parser.add_argument(
        "--landmarks",
        help="folder of 68-point landmark files <record id>.pkl|.npy or <video stem>.pkl|.npy "
        "(AV-HuBERT style)",
    )
    parser.add_argument(
        "--face-model", help="OpenCV DNN face detector model (YuNet .onnx) instead of a cascade"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=STORE_SIZE,
        choices=(CROP_SIZE, STORE_SIZE),
        help="crop side kept (default 96, as AV-HuBERT stores them; training takes random 88x88 windows)",
    )
    parser.add_argument(
        "--smooth", type=int, default=5, help="moving-average window of the mouth track, frames"
    )


def _jobs(
    inputs: list[str], out: Path
) -> tuple[list[tuple[Path, Path, str | None]], list[tuple[Path, list[dict]]]]:
    """(source video, output crop, record id or None) per video, and the manifests to rewrite."""
    jobs, manifests = [], []
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"{item}: not found")
        if item.suffix == ".jsonl":
            records = [json.loads(line) for line in read_text(item).splitlines() if line.strip()]
            for i, rec in enumerate(records):
                if "video" not in rec:
                    raise DataError(f"{item}: record {i} ({rec.get('id', '?')}) has no 'video'")
                src = Path(rec["video"]) if os.path.isabs(rec["video"]) else item.parent / rec["video"]
                rid = str(rec["id"]) if rec.get("id") is not None else None
                jobs.append((src, out / "lips" / f"{rid or src.stem}.mp4", rid))
            manifests.append((item, records))
        else:
            jobs.append((item, out / f"{item.stem}.mp4", None))
    return jobs, manifests


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    finder: MouthFinder | None = None
    if args.landmarks is None:
        finder = YuNetMouths(args.face_model) if args.face_model else default_finder()
    jobs, manifests = _jobs(args.inputs, out)
    done: dict[Path, dict] = {}
    for src, dst, rid in tqdm(jobs, desc="lips", unit="video"):
        done[dst] = process_video(
            src, dst, finder, landmark_file(args.landmarks, src, rid), args.size, args.smooth
        )
    for path, records in manifests:
        lines = []
        for rec in records:
            dst = out / "lips" / f"{rec.get('id', Path(rec['video']).stem)}.mp4"
            rec = {**rec, "video": os.path.relpath(dst, out), "video_frames": done[dst]["video_frames"]}
            for key in ("audio", "image"):  # other relative paths now start from the output folder
                if isinstance(rec.get(key), str) and not os.path.isabs(rec[key]):
                    rec[key] = os.path.relpath(path.parent / rec[key], out)
            lines.append(json.dumps(rec) + "\n")
        write_text(out / path.name, "".join(lines))
    print(f"{len(jobs)} videos -> {out}")
    return 0
