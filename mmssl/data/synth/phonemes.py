"""espeak-ng IPA phoneme names -> a small phoneme-class inventory and visemes.

Phoneme classes are what the audio distinguishes (used for probes); visemes are what the lips
show. The map from classes to visemes is many-to-one, as in real lip reading: p, b and m share
the bilabial closure; t, d, n, k, g and l look alike; voicing and nasality are invisible.
"""

from __future__ import annotations

SILENCE = "sil"
# Frame-level phoneme classes (index = class id). Audio separates all of them; video merges
# bilabial stop with nasal m, and alveolar/velar/nasal/lateral places.
CLASSES: tuple[str, ...] = (
    SILENCE,
    "bilabial",
    "nasal_m",
    "labiodental",
    "dental",
    "alveolar_stop",
    "nasal",
    "sibilant",
    "postalveolar",
    "velar",
    "lateral",
    "rhotic",
    "glide_w",
    "glide_j",
    "glottal",
    "vowel_front",
    "vowel_open",
    "vowel_round",
    "vowel_central",
)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

_CONSONANTS: dict[str, str] = {
    "p": "bilabial",
    "b": "bilabial",
    "m": "nasal_m",
    "f": "labiodental",
    "v": "labiodental",
    "θ": "dental",
    "ð": "dental",
    "t̪": "dental",
    "t": "alveolar_stop",
    "d": "alveolar_stop",
    "ɾ": "alveolar_stop",
    "ʔ": "alveolar_stop",
    "n": "nasal",
    "ŋ": "nasal",
    "n̩": "nasal",
    "s": "sibilant",
    "z": "sibilant",
    "ʃ": "postalveolar",
    "ʒ": "postalveolar",
    "tʃ": "postalveolar",
    "dʒ": "postalveolar",
    "k": "velar",
    "ɡ": "velar",
    "g": "velar",
    "x": "velar",
    "l": "lateral",
    "əl": "lateral",
    "ɫ": "lateral",
    "l̩": "lateral",
    "ɹ": "rhotic",
    "r": "rhotic",
    "ɻ": "rhotic",
    "w": "glide_w",
    "ʍ": "glide_w",
    "j": "glide_j",
    "ʲ": "glide_j",
    "h": "glottal",
}
_FRONT = set("iɪeɛᵻæy")
_OPEN = set("aɑɐʌɒɶ")
_ROUND = set("uʊoɔʉɵ")
_CENTRAL = set("əɜɚ")

# Viseme per class: mouth targets (opening, width, rounding, teeth, tongue), each in [0, 1].
VISEMES: dict[str, tuple[float, float, float, float, float]] = {
    "neutral": (0.06, 0.50, 0.10, 0.00, 0.00),
    "closed": (0.00, 0.50, 0.10, 0.00, 0.00),  # p b m (bilabial closure)
    "labiodental": (0.10, 0.50, 0.00, 1.00, 0.00),  # f v: upper teeth on the lower lip
    "dental": (0.22, 0.55, 0.00, 0.80, 1.00),  # th: tongue between the teeth
    "alveolar": (0.24, 0.55, 0.05, 0.70, 0.45),  # t d n l k g ... (look alike)
    "sibilant": (0.10, 0.68, 0.00, 1.00, 0.00),  # s z: teeth together, spread
    "postalveolar": (0.20, 0.34, 0.75, 0.80, 0.00),  # sh ch j: protruded
    "rhotic": (0.20, 0.38, 0.60, 0.30, 0.10),
    "rounded_glide": (0.10, 0.24, 1.00, 0.00, 0.00),  # w
    "spread": (0.34, 0.82, 0.00, 0.85, 0.20),  # i e
    "open": (0.85, 0.62, 0.05, 0.35, 0.35),  # a
    "rounded": (0.45, 0.30, 0.95, 0.10, 0.10),  # u o
    "mid": (0.40, 0.55, 0.10, 0.30, 0.20),  # schwa
}
CLASS_VISEME: dict[str, str] = {
    SILENCE: "neutral",
    "bilabial": "closed",
    "nasal_m": "closed",
    "labiodental": "labiodental",
    "dental": "dental",
    "alveolar_stop": "alveolar",
    "nasal": "alveolar",
    "sibilant": "sibilant",
    "postalveolar": "postalveolar",
    "velar": "alveolar",
    "lateral": "alveolar",
    "rhotic": "rhotic",
    "glide_w": "rounded_glide",
    "glide_j": "spread",
    "glottal": "mid",
    "vowel_front": "spread",
    "vowel_open": "open",
    "vowel_round": "rounded",
    "vowel_central": "mid",
}


def _vowel_class(char: str) -> str | None:
    for chars, name in (
        (_FRONT, "vowel_front"),
        (_OPEN, "vowel_open"),
        (_ROUND, "vowel_round"),
        (_CENTRAL, "vowel_central"),
    ):
        if char in chars:
            return name
    return None


def phoneme_classes(name: str) -> list[str]:
    """The class of an espeak IPA phoneme name; a diphthong gives its two parts in order.

    ``""`` (a pause) is silence. Stress and length marks are ignored. A name outside the
    inventory falls back to the class of its first recognisable character, else the
    central vowel.
    """
    name = name.replace("ˈ", "").replace("ˌ", "").replace("ː", "").replace("ˑ", "")
    if not name or name.startswith("_"):
        return [SILENCE]
    if name in _CONSONANTS:
        return [_CONSONANTS[name]]
    parts = [c for c in (_vowel_class(ch) for ch in name) if c is not None]
    if not parts:
        first = next((_CONSONANTS[ch] for ch in name if ch in _CONSONANTS), None)
        return [first or "vowel_central"]
    if name[-1] in "ɹr" and len(parts) == 1:  # r-coloured vowel: the vowel, then the r
        return [parts[0], "rhotic"]
    out = [parts[0]]
    if len(parts) > 1 and parts[-1] != parts[0]:
        out.append(parts[-1])
    return out


def phoneme_class(name: str) -> str:
    """The single class a frame inside this phoneme is labelled with (a diphthong's first part)."""
    return phoneme_classes(name)[0]


def visemes(name: str) -> list[str]:
    """The viseme targets a phoneme moves the mouth through (two for a diphthong)."""
    return [CLASS_VISEME[c] for c in phoneme_classes(name)]
