"""A small grammar of scene descriptions, and its parser.

A scene is one or two coloured shapes and, with two, a spatial relation between them
("a big red circle to the left of a small blue square"). ``describe`` writes one of several
phrasings of a scene (optional sizes, synonyms, fronted relations, the inverse relation with
the objects swapped); ``parse`` reads any sentence the grammar writes back into a
``Description`` so that a caption can be checked against its image's scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmssl.errors import DataError

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "hexagon")
SIZES: tuple[str, ...] = ("big", "small")
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "big": ("big", "large", "huge"),
    "small": ("small", "little", "tiny"),
}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "near", "far")
INVERSE: dict[str, str] = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "near": "near",
    "far": "far",
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "near", "beside", "close to"),
    "far": ("far from", "far away from"),
}
# "a" is written "an" before a vowel-initial word ("an orange heart"); both are in the
# vocabulary and ``parse`` reads either.
DETERMINERS: tuple[str, ...] = ("a", "the", "one")
VOWELS = "aeiou"
# Openers put before "NP REL NP"; a fronted relation ("above the star there is a circle")
# and a copula ("the circle is above the star") give the other phrasings.
OPENERS: tuple[str, ...] = (
    "",
    "there is",
    "i see",
    "we can see",
    "you can see",
    "the picture shows",
    "this image shows",
    "the photo shows",
)
VERBS: tuple[str, ...] = ("is", "sits", "lies", "appears")
MIN_WORDS, MAX_WORDS = 4, 14


@dataclass(frozen=True)
class Thing:
    """One mentioned object; ``size`` is None when the sentence does not say it."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Description:
    """What a sentence says: a subject and, optionally, a relation to a second object."""

    subject: Thing
    relation: str | None = None
    object: Thing | None = None


def vocabulary() -> list[str]:
    """Every word the grammar can write, sorted."""
    words: set[str] = set(COLOURS) | set(SHAPES) | set(DETERMINERS) | {"an"} | set(VERBS)
    for group in (SIZE_WORDS.values(), RELATION_PHRASES.values(), [OPENERS]):
        for phrases in group:
            for phrase in phrases:
                words.update(phrase.split())
    return sorted(words)


_VOCABULARY = frozenset(vocabulary())


def _noun_phrase(thing: Thing, rng: np.random.Generator, say_size: bool) -> list[str]:
    words = [str(rng.choice(DETERMINERS))]
    if say_size and thing.size is not None:
        words.append(str(rng.choice(SIZE_WORDS[thing.size])))
    words += [thing.colour, thing.shape]
    if words[0] == "a" and words[1][0] in VOWELS:
        words[0] = "an"
    return words


def describe(scene: Description, rng: np.random.Generator) -> str:
    """One phrasing of ``scene`` (4 to 14 words), chosen by ``rng``."""
    if scene.relation is None or scene.object is None:
        opener = str(rng.choice([o for o in OPENERS if o]))
        words = opener.split() + _noun_phrase(scene.subject, rng, bool(rng.random() < 0.7))
        return " ".join(words)
    first, relation, second = scene.subject, scene.relation, scene.object
    if rng.random() < 0.3:  # the same scene seen from the other object
        first, relation, second = second, INVERSE[relation], first
    np1 = _noun_phrase(first, rng, bool(rng.random() < 0.6))
    np2 = _noun_phrase(second, rng, bool(rng.random() < 0.6))
    rel = str(rng.choice(RELATION_PHRASES[relation])).split()
    style = int(rng.integers(3))
    if style == 0:  # "[opener] NP REL NP"
        words = str(rng.choice(OPENERS)).split() + np1 + rel + np2
    elif style == 1:  # "NP VERB REL NP"
        words = np1 + [str(rng.choice(VERBS))] + rel + np2
    else:  # fronted: "REL NP there is NP" / "REL NP is NP"
        words = rel + np2 + str(rng.choice(("there is", "is", "we can see"))).split() + np1
    if len(words) > MAX_WORDS:  # drop the optional opener words to fit
        words = np1 + rel + np2
    return " ".join(words)


def describe_distinct(scene: Description, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` different phrasings of ``scene`` (as SpokenCOCO's five captions per image):
    each is drawn with ``describe`` and drawn again from the same ``rng`` while it repeats
    an earlier one, so the result is still a function of the generator's state."""
    captions: list[str] = []
    for _ in range(count):
        for _attempt in range(1000):
            caption = describe(scene, rng)
            if caption not in captions:
                break
        else:
            raise DataError(f"could not find {count} different phrasings of {scene}")
        captions.append(caption)
    return captions


def _match_relation(words: list[str], start: int) -> tuple[str, int] | None:
    best: tuple[str, int] | None = None
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            toks = phrase.split()
            if words[start : start + len(toks)] == toks and (best is None or len(toks) > best[1]):
                best = (relation, len(toks))
    return best


def parse(sentence: str) -> Description:
    """Read a sentence the grammar wrote back into what it says; ``DataError`` otherwise."""
    words = sentence.lower().split()
    things: list[tuple[int, Thing]] = []
    rel: tuple[int, str] | None = None
    i = 0
    while i < len(words):
        word = words[i]
        matched = _match_relation(words, i)
        if matched is not None and rel is None:
            rel = (i, matched[0])
            i += matched[1]
            continue
        if word in SHAPES:
            j, size, colour = i - 1, None, None
            if j >= 0 and words[j] in COLOURS:
                colour = words[j]
                j -= 1
            if j >= 0:
                size = next((s for s, ws in SIZE_WORDS.items() if words[j] in ws), None)
            if colour is None:
                raise DataError(f"sentence {sentence!r}: {word!r} has no colour")
            things.append((i, Thing(colour, word, size)))
        elif word not in _VOCABULARY:
            raise DataError(f"sentence {sentence!r}: unknown word {word!r}")
        i += 1
    if rel is None and len(things) == 1:
        return Description(things[0][1])
    if rel is None or len(things) != 2:
        raise DataError(f"sentence {sentence!r}: expected two objects and one relation")
    (p1, a), (p2, b) = things
    if rel[0] < p1:  # fronted: the object comes right after the relation
        return Description(b, rel[1], a)
    return Description(a, rel[1], b)


def _thing_agrees(said: Thing, actual: Thing) -> bool:
    return (
        said.colour == actual.colour
        and said.shape == actual.shape
        and (said.size is None or said.size == actual.size)
    )


def agrees(said: Description, actual: Description) -> bool:
    """True when every attribute ``said`` mentions holds in ``actual`` (in either direction)."""
    if said.relation is None or said.object is None:
        return actual.relation is None and _thing_agrees(said.subject, actual.subject)
    if actual.relation is None or actual.object is None:
        return False
    forward = (
        said.relation == actual.relation
        and _thing_agrees(said.subject, actual.subject)
        and _thing_agrees(said.object, actual.object)
    )
    backward = (
        said.relation == INVERSE[actual.relation]
        and _thing_agrees(said.subject, actual.object)
        and _thing_agrees(said.object, actual.subject)
    )
    return forward or backward


def random_thing(rng: np.random.Generator, avoid: Thing | None = None) -> Thing:
    """A random coloured shape whose (colour, shape) differs from ``avoid``'s."""
    while True:
        thing = Thing(str(rng.choice(COLOURS)), str(rng.choice(SHAPES)), str(rng.choice(SIZES)))
        if avoid is None or (thing.colour, thing.shape) != (avoid.colour, avoid.shape):
            return thing


def random_description(rng: np.random.Generator, p_single: float = 0.0) -> Description:
    """A random scene: two distinct objects and a relation (one object with ``p_single``)."""
    subject = random_thing(rng)
    if rng.random() < p_single:
        return Description(subject)
    return Description(subject, str(rng.choice(RELATIONS)), random_thing(rng, avoid=subject))
