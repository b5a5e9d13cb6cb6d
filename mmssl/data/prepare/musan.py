"""MUSAN (Snyder, Chen & Povey, 2015): music, speech and noise recordings, 16 kHz wav, for
additive-noise augmentation and the noisy evaluation.

Layout: ``ROOT/{noise,music,speech}/<source>/*.wav``. Each type's files are split train/test
by a seeded shuffle (``test_fraction`` of them, at least one, to test). Records: ``id``
(``<type>_<n>``, numbered per type and split in path order), ``audio``, ``audio_samples``,
``noise_type`` (``noise``, ``music``, ``speech`` or ``babble``), ``source`` (the path inside
the corpus; ``babble`` for a mixture, whose ``mixed`` lists the files it averages).

Noise folders (what ``mmssl synth`` writes, read by ``mmssl.data.noise.NoiseBank`` and the
noisy evaluation, which takes the noise type from the file-name prefix):
``OUT/noise/{train,test}/<id>.wav``, symbolic links to the corpus files (``link``) and
babble mixtures (``babble`` per split). AV-HuBERT's noisy evaluation (Shi et al., 2022,
"Robust Self-Supervised Audio-Visual Speech Recognition", sec. 4.1;
``avhubert/preparation/musan_prepare.py``) makes babble by averaging 30 MUSAN speech clips of
10 s, drawn from speakers kept apart per split; here each babble file averages ``talkers``
(default 30) distinct speech files of its own split, each from a random offset and looped
when shorter, over ``seconds`` (default 10) seconds. (AV-HuBERT's ``speech`` type is a single
LRS3 talker; here it is MUSAN speech.)
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmssl.constants import SAMPLE_RATE
from mmssl.data.noise import NoiseBank, fit_length
from mmssl.data.prepare.common import Listing, pick_splits, require
from mmssl.data.synth.writers import write_wav
from mmssl.errors import ConfigError, DataError

CORPUS = "musan"
TYPES = ("noise", "music", "speech")
SPLITS = ("train", "test")
TALKERS = 30  # AV-HuBERT musan_prepare.py: num_per_mixture = 30
BABBLE_SECONDS = 10.0  # AV-HuBERT cuts MUSAN into 10 s clips before mixing


def split_files(files: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded train/test split of one type's files; each split in path order."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"musan test_fraction must be in (0, 1), got {test_fraction}")
    pool = sorted(files)
    random.Random(seed).shuffle(pool)
    n_test = max(1, round(test_fraction * len(pool))) if len(pool) > 1 else 0
    return {"train": sorted(pool[n_test:]), "test": sorted(pool[:n_test])}


def collect(
    root: Path, splits: list[str] | None = None, test_fraction: float = 0.1, seed: int = 0
) -> Listing:
    """List ``root`` (holding ``noise/``, ``music/``, ``speech/``) -> records per split."""
    require(root, CORPUS, "corpus folder")
    types = [t for t in TYPES if (root / t).is_dir()]
    if not types:
        raise DataError(
            f"{root}: none of the MUSAN folders ({', '.join(TYPES)}) found; "
            f"expected the layout of datasets/{CORPUS}/README.md"
        )
    chosen = pick_splits(list(SPLITS), SPLITS, splits, root, CORPUS)
    listing = Listing(CORPUS, {split: [] for split in chosen})
    for kind in types:
        files = [p.relative_to(root).as_posix() for p in (root / kind).rglob("*.wav")]
        for split, names in split_files(files, test_fraction, seed).items():
            if split not in listing.splits:
                continue
            width = max(3, len(str(len(names) - 1)))
            for n, name in enumerate(names):
                listing.splits[split].append(
                    {
                        "id": f"{kind}_{n:0{width}d}",
                        "audio": str((root / name).resolve()),
                        "noise_type": kind,
                        "source": name,
                    }
                )
    return listing


def _babble(
    index: int, files: list[str], talkers: int, num_samples: int, seed: int, split_index: int
) -> tuple[np.ndarray, list[str]]:
    """Babble file ``index``: the mean of ``talkers`` distinct files -> (``(S,)`` int16, the files)."""
    # one stream per (seed, split, file): the same file whichever splits or workers a run has
    generator = torch.Generator().manual_seed(seed * 1_000_003 + split_index * 100_003 + index)
    bank = NoiseBank(files, SAMPLE_RATE, cache_files=0)
    chosen = torch.randperm(len(files), generator=generator)[:talkers]
    mix = torch.stack([fit_length(bank.load(int(i)), num_samples, generator) for i in chosen]).mean(0)
    return np.round(mix.clamp(-1, 1).numpy() * 32767).astype(np.int16), [files[int(i)] for i in chosen]


def write_babble(
    folder: Path,
    speech: list[str],
    count: int,
    split_index: int,
    talkers: int = TALKERS,
    seconds: float = BABBLE_SECONDS,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> list[dict]:
    """``count`` babble files ``folder/babble_<n>.wav`` mixed from the ``speech`` files ->
    their records (``mixed``: the files each averages). The same inputs and seed give the
    same files with any ``workers``."""
    if count <= 0:
        return []
    if len(speech) < 2:
        raise DataError(f"{folder}: babble needs at least 2 speech files in the split, found {len(speech)}")
    num_samples = round(seconds * SAMPLE_RATE)
    make = partial(
        _babble,
        files=speech,
        talkers=min(talkers, len(speech)),
        num_samples=num_samples,
        seed=seed,
        split_index=split_index,
    )
    bar = dict(total=count, desc=f"babble {folder.name}", unit="file", disable=not progress, file=sys.stderr)
    width = max(3, len(str(count - 1)))
    records = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        mixes = pool.map(make, range(count)) if pool else map(make, range(count))
        for n, (audio, mixed) in enumerate(tqdm(mixes, **bar)):
            path = folder / f"babble_{n:0{width}d}.wav"
            write_wav(path, audio, SAMPLE_RATE)
            records.append(
                {
                    "id": path.stem,
                    "audio": str(path.resolve()),
                    "audio_samples": num_samples,
                    "noise_type": "babble",
                    "source": "babble",
                    "mixed": mixed,
                }
            )
    finally:
        if pool:
            pool.shutdown()
    return records


def build_noise_folders(
    out: Path,
    splits: dict[str, list[dict]],
    link: bool,
    babble: int,
    talkers: int = TALKERS,
    seconds: float = BABBLE_SECONDS,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, list[dict]]:
    """Make ``out/noise/<split>/`` (links to the measured files when ``link``, ``babble``
    mixtures per split), replacing an earlier one only once the new one is complete ->
    the babble records per split (paths inside ``out/noise``)."""
    out = out.resolve()
    final, tmp, old = out / "noise", out / ".noise.tmp", out / ".noise.old"
    shutil.rmtree(tmp, ignore_errors=True)
    added: dict[str, list[dict]] = {}
    for split, records in splits.items():
        folder = tmp / split
        folder.mkdir(parents=True)
        if link:
            for record in records:
                os.symlink(record["audio"], folder / f"{record['id']}.wav")
        speech = [r["audio"] for r in records if r["noise_type"] == "speech"]
        made = write_babble(
            folder, speech, babble, SPLITS.index(split), talkers, seconds, seed, workers, progress
        )
        added[split] = [{**r, "audio": str(final / split / Path(r["audio"]).name)} for r in made]
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return added
