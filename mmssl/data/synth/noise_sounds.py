"""The generated noise bank: babble, white, pink and music, 16 kHz mono.

Babble overlaps 3 to 7 utterances of speakers kept out of every split; music is synthesised
chords and a melody over a drum pattern. Train and test files are generated from different
random streams (and babble from different held-apart speakers), so no noise is shared. The
files are plain wavs in a folder, so a real noise corpus such as MUSAN is used the same way.
"""

from __future__ import annotations

import numpy as np

from mmssl.data.synth.grammar import describe, random_description
from mmssl.data.synth.speech import SAMPLE_RATE, Espeak

NOISE_KINDS: tuple[str, ...] = ("babble", "white", "pink", "music")


def _normalise(x: np.ndarray, rms: float = 0.1) -> np.ndarray:
    x = x - x.mean()
    return (x * (rms / max(float(np.sqrt(np.mean(x**2))), 1e-8))).astype(np.float32)


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return _normalise(rng.normal(0.0, 1.0, n))


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power spectrum: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spec = np.fft.rfft(rng.normal(0.0, 1.0, n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0.0
    return _normalise(np.fft.irfft(spec, n))


def babble(n: int, rng: np.random.Generator, voices: list[str]) -> np.ndarray:
    """3 to 7 overlapped talkers, each a chain of sentences by one held-apart voice."""
    es = Espeak.get()
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 8))):
        voice = str(rng.choice(voices))
        track = np.zeros(0)
        while len(track) < n:
            text = describe(random_description(rng, p_single=0.2), rng)
            utt = es.say(text, voice, int(rng.integers(130, 201)), int(rng.integers(30, 71)))
            track = np.concatenate([track, utt.audio / 32768.0, np.zeros(int(rng.integers(0, 3200)))])
        start = int(rng.integers(0, len(track) - n + 1))
        talker = track[start : start + n]
        out += talker * rng.uniform(0.6, 1.0) / max(float(np.sqrt(np.mean(talker**2))), 1e-8)
    return _normalise(out)


def _note(freq: float, n: int, decay: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    tone = (
        np.sin(2 * np.pi * freq * t) + 0.4 * np.sin(4 * np.pi * freq * t) + 0.2 * np.sin(6 * np.pi * freq * t)
    )
    attack = np.minimum(1.0, t / 0.01)
    return tone * attack * np.exp(-t / decay)


def music(n: int, rng: np.random.Generator) -> np.ndarray:
    """A chord progression, a melody in the same key and a kick/snare/hi-hat pattern."""
    tempo = rng.uniform(80, 150)
    beat = int(SAMPLE_RATE * 60 / tempo)
    root = 220.0 * 2 ** (rng.integers(-5, 6) / 12)
    major = [0, 2, 4, 5, 7, 9, 11]
    out = np.zeros(n + 4 * beat)
    chords = rng.choice([0, 3, 4, 5], size=n // (4 * beat) + 1)
    for k, degree in enumerate(chords):  # one chord a bar, root-third-fifth of the scale degree
        for step in (0, 2, 4):
            semis = major[(degree + step) % 7] + 12 * ((degree + step) // 7)
            out[k * 4 * beat : (k + 1) * 4 * beat] += 0.25 * _note(root * 2 ** (semis / 12), 4 * beat, 1.5)
    for k in range(n // beat * 2 + 1):  # eighth-note melody an octave up
        if rng.random() < 0.75:
            semis = major[int(rng.integers(7))] + 12
            out[k * beat // 2 : k * beat // 2 + beat // 2] += 0.35 * _note(
                root * 2 ** (semis / 12), beat // 2, 0.15
            )
    t = np.arange(beat) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * (50 + 80 * np.exp(-t / 0.03)) * t) * np.exp(-t / 0.12)
    snare = rng.normal(0, 1, beat) * np.exp(-t / 0.06) * 0.5
    half = beat - beat // 2
    hat = rng.normal(0, 1, half) * np.exp(-np.arange(half) / SAMPLE_RATE / 0.01) * 0.2
    for k in range(n // beat + 1):
        out[k * beat : (k + 1) * beat] += kick if k % 2 == 0 else snare
        out[k * beat + beat // 2 : k * beat + beat] += hat
    return _normalise(out[:n])


def make_noise(kind: str, seconds: float, rng: np.random.Generator, voices: list[str]) -> np.ndarray:
    """``(S,)`` float32 noise of one kind at RMS 0.1."""
    n = int(seconds * SAMPLE_RATE)
    if kind == "babble":
        return babble(n, rng, voices)
    if kind == "white":
        return white(n, rng)
    if kind == "pink":
        return pink(n, rng)
    if kind == "music":
        return music(n, rng)
    raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
