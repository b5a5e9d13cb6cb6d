"""The two pictures in ``datasets/synth/README.md``, rendered by the generator itself.

``lip_strip``: consecutive 25 fps mouth frames of one spoken sentence, each labelled with the
word and the phoneme class under its centre; ``scene_panel``: a scene image beside its five
spoken captions. ``mmssl synth --figures DIR`` writes both as small PNGs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mmssl.constants import VIDEO_FPS
from mmssl.data.synth import grammar, lips, scenes
from mmssl.data.synth.corpus import CAPTIONS_PER_IMAGE, SynthConfig, appearance, speak, speaker_splits
from mmssl.data.synth.phonemes import phoneme_class

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SHORT = {
    "sil": "-",
    "bilabial": "p/b",
    "nasal_m": "m",
    "labiodental": "f/v",
    "dental": "th",
    "alveolar_stop": "t/d",
    "nasal": "n",
    "sibilant": "s/z",
    "postalveolar": "sh",
    "velar": "k/g",
    "lateral": "l",
    "rhotic": "r",
    "glide_w": "w",
    "glide_j": "y",
    "glottal": "h",
    "vowel_front": "i/e",
    "vowel_open": "a",
    "vowel_round": "u/o",
    "vowel_central": "@",
}


def _label_at(spans: list, sample: int) -> str:
    return next((name for name, s, e in spans if s <= sample < e), "")


def lip_strip(
    text: str, speaker: str, seed: int = 0, columns: int = 12, rows: int = 2, start: float = 0.2
) -> np.ndarray:
    """``(rows * 118, columns * 88)`` uint8: frames from ``start`` seconds, labelled."""
    cfg = SynthConfig(seed=seed)
    rng = np.random.default_rng([seed, 99])
    audio, phonemes, words = speak(text, speaker, rng, cfg, frame_align=True)
    num_frames = len(audio) // lips.SAMPLES_PER_FRAME
    video = lips.render_video(phonemes, num_frames, appearance(seed, speaker), lips.Jitter.sample(rng), rng)
    first = int(start * VIDEO_FPS)
    cell_h = lips.SIZE + 30
    canvas = np.full((rows * cell_h, columns * lips.SIZE), 255, np.uint8)
    for k in range(rows * columns):
        f = min(first + k, num_frames - 1)
        r, c = divmod(k, columns)
        y, x = r * cell_h, c * lips.SIZE
        canvas[y : y + lips.SIZE, x : x + lips.SIZE] = video[f]
        centre = f * lips.SAMPLES_PER_FRAME + lips.SAMPLES_PER_FRAME // 2
        word = _label_at(words, centre) or "-"
        cls = _SHORT[phoneme_class(_label_at(phonemes, centre))]
        cv2.putText(canvas, word, (x + 3, y + lips.SIZE + 12), _FONT, 0.36, 0, 1, cv2.LINE_AA)
        cv2.putText(canvas, cls, (x + 3, y + lips.SIZE + 25), _FONT, 0.36, 90, 1, cv2.LINE_AA)
    return canvas


def scene_panel(seed: int = 0, index: int = 7) -> np.ndarray:
    """``(224, 224 + 470, 3)`` uint8 RGB: a scene image and five phrasings of its caption."""
    rng = np.random.default_rng([seed, 98, index])
    scene = grammar.random_description(rng)
    objects = scenes.layout(scene, rng)
    image, _ = scenes.render_scene(objects, rng, clutter_count=5)
    panel = np.full((scenes.SIZE, scenes.SIZE + 470, 3), 255, np.uint8)
    panel[:, : scenes.SIZE] = image
    voices = rng.choice(speaker_splits(SynthConfig(seed=seed))["train"], CAPTIONS_PER_IMAGE, replace=False)
    captions = grammar.describe_distinct(scene, rng, CAPTIONS_PER_IMAGE)
    for k, (voice, caption) in enumerate(zip(voices, captions)):
        y = 30 + k * 42
        cv2.putText(
            panel, f"{k + 1}. {caption}", (scenes.SIZE + 10, y), _FONT, 0.36, (0, 0, 0), 1, cv2.LINE_AA
        )
        cv2.putText(
            panel, f"   voice {voice}", (scenes.SIZE + 10, y + 15), _FONT, 0.33, (90, 90, 90), 1, cv2.LINE_AA
        )
    return panel


def write_figures(folder: Path, seed: int = 0) -> list[Path]:
    """Write ``synth_lips.png`` and ``synth_scene.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    speaker = speaker_splits(SynthConfig(seed=seed))["train"][0]
    strip = lip_strip("a big red circle to the left of a small blue square", speaker, seed)
    lips_path, scene_path = folder / "synth_lips.png", folder / "synth_scene.png"
    cv2.imwrite(str(lips_path), strip, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cv2.imwrite(
        str(scene_path), cv2.cvtColor(scene_panel(seed), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    )
    return [lips_path, scene_path]
