"""Speech from espeak-ng through its C API (ctypes), with sample-accurate phoneme and word events.

The shared library and its data come from the ``espeakng-loader`` wheel; nothing is needed
from the system. ``Espeak`` initialises the library once per process (it keeps global state)
in synchronous mode with phoneme events named in IPA; ``Espeak.say`` returns 16 kHz audio and
the alignment of every phoneme and word in 16 kHz samples.

espeak-ng keeps synthesis state between calls that no API resets (the pitch-flutter cycle in
its wave generator, for one), so the same sentence spoken twice in one process differs. To
make every utterance a pure function of its text and voice settings, ``say`` runs each
synthesis in a forked child of a process that has initialised the library but never spoken,
with the library's random seed fixed.
"""

from __future__ import annotations

import ctypes
import os
import pickle
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError

ESPEAK_RATE = 22_050  # what espeak_Initialize reports for its voices
# espeak_AUDIO_OUTPUT AUDIO_OUTPUT_SYNCHRONOUS; options: phoneme events (0x1) named in IPA (0x2)
_OUTPUT_SYNCHRONOUS = 2
_OPTIONS_PHONEME_EVENTS_IPA = 0x1 | 0x2
# espeak_PARAMETER ids
_RATE, _PITCH, _RANGE = 1, 3, 4
# espeak_EVENT_TYPE values used here
_EV_END_LIST, _EV_WORD, _EV_MSG_TERMINATED, _EV_PHONEME = 0, 1, 5, 7

LANGUAGES: tuple[str, ...] = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
VARIANTS: tuple[str, ...] = (
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
)


def all_voices() -> list[str]:
    """Every English voice times every variant, e.g. ``en-us+f3`` (104 speakers)."""
    return [f"{lang}+{variant}" for lang in LANGUAGES for variant in VARIANTS]


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass
class Utterance:
    """One spoken sentence: ``audio (S,)`` int16 at 16 kHz and its alignment in samples.

    ``phonemes`` and ``words`` are ``(label, start, end)`` with ``0 <= start < end <= S``;
    phonemes tile ``[0, S)`` (silence is the label ``""``).
    """

    audio: np.ndarray
    phonemes: list[tuple[str, int, int]]
    words: list[tuple[str, int, int]]


class Espeak:
    """The espeak-ng library, initialised once per process."""

    _instance: Espeak | None = None

    def __init__(self) -> None:
        try:
            # lazy: espeak-ng loads only to generate the corpus
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - a dependency of the package
            raise ConfigError("the synthetic corpus needs the espeakng-loader package") from err
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, data, _OPTIONS_PHONEME_EVENTS_IPA)
        if rate != ESPEAK_RATE:
            raise ConfigError(f"espeak-ng at {espeakng_loader.get_library_path()} reports {rate} Hz")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _Callback(self._collect)  # kept alive: the library holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)
        fn = self._lib.espeak_TextToPhonemes
        fn.restype, fn.argtypes = (
            ctypes.c_char_p,
            [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int],
        )

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EV_END_LIST:
            ev = events[i]
            name = ev.id.string.decode("utf-8", "replace") if ev.type == _EV_PHONEME else ""
            self._events.append((ev.type, ev.text_position, ev.length, ev.sample, name))
            i += 1
        return 0

    def _synth(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int
    ) -> tuple[np.ndarray, list]:
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ConfigError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        data = text.encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio, self._events

    def say(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50
    ) -> Utterance:
        """Speak ``text`` (words separated by single spaces) at ``rate`` words a minute.

        Runs in a forked child so that the result does not depend on what this process spoke
        before (see the module docstring).
        """
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak once from the pristine state, send the result, exit
            os.close(read_end)
            code = 0
            try:
                result: object = self._say_here(text, voice, rate, pitch, pitch_range)
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                result, code = f"{type(err).__name__}: {err}", 1
            try:
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pickle.dumps(result))
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        result = pickle.loads(payload) if payload else "no output"
        if status != 0 or not isinstance(result, Utterance):
            raise ConfigError(f"espeak-ng failed on {text!r} with voice {voice!r}: {result}")
        return result

    def _say_here(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> Utterance:
        if hasattr(self._lib, "espeak_ng_SetRandSeed"):
            self._lib.espeak_ng_SetRandSeed(1)
        raw, events = self._synth(text, voice, rate, pitch, pitch_range)
        audio = _to_16k(raw)
        n = len(audio)

        def at(sample: int) -> int:
            return min(n, int(round(sample * SAMPLE_RATE / ESPEAK_RATE)))

        phones = [
            (at(s), name.replace("ˈ", "").replace("ˌ", ""), tp)
            for t, tp, _, s, name in events
            if t == _EV_PHONEME
        ]
        end = max([at(s) for t, _, _, s, _ in events if t == _EV_MSG_TERMINATED] or [n])
        phonemes = _tile([(s, name) for s, name, _ in phones], end, n)
        words = self._word_spans(text, events, phones, phonemes)
        return Utterance(audio, phonemes, words)

    def _phoneme_count(self, word: str) -> int:
        """How many phonemes espeak-ng gives ``word`` said alone (``espeak_TextToPhonemes``)."""
        fn = self._lib.espeak_TextToPhonemes
        buf = ctypes.create_string_buffer(word.encode())
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        out = []
        while ptr.value:
            # phonememode: IPA names (0x02) separated by "_" (separator in bits 8-15)
            out.append((fn(ctypes.byref(ptr), 0, 0x02 | (ord("_") << 8)) or b"").decode("utf-8", "replace"))
        return max(1, sum(len(chunk.split("_")) for part in out for chunk in part.split()))

    def _word_spans(
        self, text: str, events: list, phones: list, phonemes: list
    ) -> list[tuple[str, int, int]]:
        """Word spans from WORD events. espeak-ng attributes a short function word to the
        word before it ("from the" gives one event); such a group is split by each word's
        phoneme count said alone, counted from the group's end."""
        starts, cursor = [], 1
        for word in text.split(" "):
            starts.append((cursor, word))
            cursor += len(word) + 1
        marks = [tp for t, tp, _, _, _ in events if t == _EV_WORD]
        spans: list[tuple[str, int, int]] = []
        for k, tp in enumerate(marks):
            stop = marks[k + 1] if k + 1 < len(marks) else len(text) + 2
            group = [w for pos, w in starts if tp <= pos < stop]
            owned = {s for s, name, ptp in phones if name and tp <= ptp < stop}
            seq = [(s, e) for name, s, e in phonemes if name and s in owned]
            if not group or not seq:
                continue
            bounds = [len(seq)]
            for word in reversed(group[1:]):
                bounds.insert(0, max(len(group) - len(bounds), bounds[0] - self._phoneme_count(word)))
            bounds.insert(0, 0)
            for word, a, b in zip(group, bounds[:-1], bounds[1:]):
                a, b = min(a, len(seq) - 1), max(b, a + 1)
                spans.append((word, seq[a][0], seq[min(b, len(seq)) - 1][1]))
        return spans


def _to_16k(raw: np.ndarray) -> np.ndarray:
    """int16 at 22050 Hz to int16 at 16 kHz (polyphase, 320/441)."""
    if len(raw) == 0:
        return raw.astype(np.int16)
    y = resample_poly(raw.astype(np.float64), 320, 441)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def _tile(starts: list[tuple[int, str]], end: int, n: int) -> list[tuple[str, int, int]]:
    """Phoneme starts to ``(label, start, end)`` intervals that tile ``[0, n)``; gaps are silence."""
    out: list[tuple[str, int, int]] = []
    cursor = 0
    bounds = [s for s, _ in starts[1:]] + [end]
    for (start, name), stop in zip(starts, bounds):
        start = max(start, cursor)
        if stop <= start:
            continue
        if start > cursor:
            out.append(("", cursor, start))
        out.append((name, start, stop))
        cursor = stop
    if cursor < n:
        out.append(("", cursor, n))
    merged: list[tuple[str, int, int]] = []
    for name, s, e in out:  # adjacent silences become one
        if merged and name == "" and merged[-1][0] == "":
            merged[-1] = ("", merged[-1][1], e)
        else:
            merged.append((name, s, e))
    return merged
