"""The generator's parts: grammar, phoneme classes, mouth trajectories, scenes, espeak-ng."""

import numpy as np
import pytest

from mmssl.data.synth import grammar, lips, phonemes, scenes
from mmssl.errors import DataError


def test_vocabulary_and_sentence_lengths():
    vocab = grammar.vocabulary()
    assert 55 <= len(vocab) <= 65
    assert len(grammar.COLOURS) == 8 and len(grammar.SHAPES) == 8 and len(grammar.RELATIONS) == 6
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(500):
        words = grammar.describe(grammar.random_description(rng, p_single=0.2), rng).split()
        assert set(words) <= set(vocab)
        lengths.append(len(words))
    assert min(lengths) >= grammar.MIN_WORDS and max(lengths) <= grammar.MAX_WORDS
    assert max(lengths) - min(lengths) >= 6  # short and long sentences both occur


def test_every_phrasing_parses_back_to_its_scene():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = grammar.random_description(rng, p_single=0.1)
        phrasings = {grammar.describe(scene, rng) for _ in range(8)}
        if scene.relation is not None:
            assert len(phrasings) >= 3  # several phrasings of one scene
        for sentence in phrasings:
            assert grammar.agrees(grammar.parse(sentence), scene), sentence


def test_an_before_vowels_and_no_verbless_away_from():
    rng = np.random.default_rng(2)
    saw_an = 0
    for _ in range(5000):
        scene = grammar.random_description(rng, p_single=0.15)
        sentence = grammar.describe(scene, rng)
        words = sentence.split()
        for det, nxt in zip(words, words[1:]):
            assert not (det == "a" and nxt[0] in "aeiou"), sentence
            assert not (det == "an" and nxt[0] not in "aeiou"), sentence
        saw_an += "an" in words
        assert "away" not in words or words[words.index("away") - 1] == "far", sentence
        assert grammar.agrees(grammar.parse(sentence), scene), sentence
    assert saw_an > 50  # "an orange ..." does occur
    assert "an" in grammar.vocabulary()
    said = grammar.parse("an orange star is far away from a big red circle")
    assert said == grammar.Description(
        grammar.Thing("orange", "star"), "far", grammar.Thing("red", "circle", "big")
    )


def test_distinct_phrasings_are_distinct_and_deterministic():
    rng = np.random.default_rng(4)
    for _ in range(2000):
        scene = grammar.random_description(rng)
        state = rng.bit_generator.state
        captions = grammar.describe_distinct(scene, rng, 5)
        assert len(set(captions)) == 5
        assert all(grammar.agrees(grammar.parse(c), scene) for c in captions)
        rng.bit_generator.state = state
        assert grammar.describe_distinct(scene, rng, 5) == captions


def test_parse_by_hand_and_mismatches():
    said = grammar.parse("above one little orange heart there is the blue star")
    assert said == grammar.Description(
        grammar.Thing("blue", "star"), "above", grammar.Thing("orange", "heart", "small")
    )
    scene = grammar.Description(
        grammar.Thing("red", "circle", "big"), "left", grammar.Thing("blue", "square", "small")
    )
    assert grammar.agrees(grammar.parse("a big red circle to the left of a small blue square"), scene)
    assert grammar.agrees(grammar.parse("the blue square is right of the red circle"), scene)  # inverse
    assert not grammar.agrees(grammar.parse("the blue square is left of the red circle"), scene)
    assert not grammar.agrees(grammar.parse("a small red circle to the left of a blue square"), scene)  # size
    assert not grammar.agrees(grammar.parse("a red star to the left of a blue square"), scene)  # shape
    with pytest.raises(DataError, match="unknown word 'pink'"):
        grammar.parse("a pink circle above a blue square")
    with pytest.raises(DataError, match="no colour"):
        grammar.parse("a circle above a blue square")


def test_visemes_are_many_to_one():
    assert phonemes.phoneme_class("p") == phonemes.phoneme_class("b") != phonemes.phoneme_class("m")
    assert phonemes.visemes("p") == phonemes.visemes("b") == phonemes.visemes("m") == ["closed"]
    assert phonemes.visemes("t") == phonemes.visemes("k") == phonemes.visemes("n")
    assert phonemes.phoneme_classes("aɪ") == ["vowel_open", "vowel_front"]  # a diphthong glides
    assert phonemes.phoneme_class("ˈɑːɹ") == "vowel_open"
    assert phonemes.phoneme_class("") == phonemes.SILENCE
    assert len(set(phonemes.CLASS_VISEME.values())) < len(phonemes.CLASSES)
    assert set(phonemes.CLASS_VISEME) == set(phonemes.CLASSES)


def _timeline(labels, step=1920):
    return [(name, i * step, (i + 1) * step) for i, name in enumerate(labels)]


def test_mouth_closes_for_bilabials_and_opens_for_open_vowels():
    # each phoneme lasts 3 video frames (1920 samples); frame 3k+1 is the middle of phoneme k
    tracks = lips.mouth_tracks(_timeline(["", "m", "ɑː", "p", "ɑː", ""]), 18)
    assert tracks.shape == (18, 5)
    assert tracks[4, lips.OPEN] < 0.05 and tracks[10, lips.OPEN] < 0.05  # m, p: lips closed
    assert tracks[7, lips.OPEN] > 0.6 and tracks[13, lips.OPEN] > 0.6  # ɑː: open
    assert np.all((tracks >= 0) & (tracks <= 1))


def test_rounding_is_anticipated():
    # same consonant, followed by a rounded vs a spread vowel: the lips round during the 't'
    def tracks(vowel):  # 't' is frames 10-11, the vowel starts at frame 12 (7680 samples)
        timeline = [("ɑː", 0, 6400), ("t", 6400, 7680), (vowel, 7680, 10240), ("", 10240, 12800)]
        return lips.mouth_tracks(timeline, 20)

    rounded, spread = tracks("uː"), tracks("iː")
    assert rounded[11, lips.ROUND] > spread[11, lips.ROUND] + 0.2
    assert np.allclose(rounded[:5], spread[:5], atol=0.02)  # 240 ms before: no effect


def test_open_mouth_shows_more_dark_cavity():
    rng = np.random.default_rng(0)
    look, jitter = lips.Appearance.sample(rng), lips.Jitter.sample(rng)
    light, noise = lips.lighting(jitter), np.zeros((lips.SIZE, lips.SIZE), np.float32)
    closed = lips.render_frame(np.array(lips.VISEMES["closed"]), look, jitter, 0.0, noise, light)
    wide = lips.render_frame(np.array(lips.VISEMES["open"]), look, jitter, 0.0, noise, light)
    assert closed.shape == wide.shape == (88, 88) and closed.dtype == np.uint8
    assert (wide < 60).sum() > (closed < 60).sum() + 100


def test_scene_layout_and_colours():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = grammar.random_description(rng)
        objects = scenes.layout(scene, rng)
        assert scenes.relation_holds(scene.relation, *objects)
        image, clutter = scenes.render_scene(objects, rng)
        assert image.shape == (224, 224, 3)
        mentioned = {(o.colour, o.shape) for o in objects}
        assert all((c.colour, c.shape) not in mentioned and c.r < objects[0].r for c in clutter)
        for obj in objects:  # the shape is drawn in its colour at its centre
            centre = image[int(round(obj.y)), int(round(obj.x))].astype(int)
            assert np.abs(centre - scenes.RGB[obj.colour]).max() <= 2, (obj, centre)
        record = scenes.scene_record(scene, objects)
        assert scenes.scene_from_record(record) == scene


def test_relations_by_hand():
    a = scenes.Placed("red", "circle", "small", 50, 100, 10)
    b = scenes.Placed("blue", "square", "small", 150, 110, 10)
    assert scenes.relation_holds("left", a, b) and scenes.relation_holds("right", b, a)
    assert not scenes.relation_holds("above", a, b) and not scenes.relation_holds("near", a, b)
    c = scenes.Placed("blue", "square", "small", 52, 130, 10)
    assert scenes.relation_holds("above", a, c) and scenes.relation_holds("near", a, c)


def test_espeak_is_deterministic_and_aligned():
    from mmssl.data.synth.speech import Espeak

    es = Espeak.get()
    text = "the picture shows a big red circle above one blue star"
    first = es.say(text, "en-us+f3", 150, 50)
    es.say("a white cross", "en-gb-x-rp+m2", 200, 70)  # whatever was said in between
    again = es.say(text, "en-us+f3", 150, 50)
    assert first.audio.dtype == np.int16 and first.audio.tobytes() == again.audio.tobytes()
    n = len(first.audio)
    assert 1.5 < n / 16000 < 6.0
    spans = first.phonemes
    assert spans[0][1] == 0 and spans[-1][2] == n
    assert all(e1 == s2 for (_, _, e1), (_, s2, _) in zip(spans, spans[1:]))  # they tile the audio
    assert [w for w, _, _ in first.words] == text.split()
    assert all(0 <= s < e <= n for _, s, e in first.words)
    slower = es.say(text, "en-us+f3", 130, 50)
    assert len(slower.audio) > n  # rate is words a minute


def test_sizes():
    from mmssl.data.synth import config_for
    from mmssl.errors import ConfigError

    tiny, demo = config_for("tiny"), config_for("demo", seed=3)
    assert 20 <= sum(tiny.av) <= 60 and sum(demo.av) >= 2000 and demo.seed == 3
    ten = config_for(hours=10)
    assert abs(sum(ten.av) * 3.5 / 3600 - 10) < 0.01  # 3.5 s: the measured mean utterance
    assert ten.av[1] == ten.av[2] == sum(ten.av) // 10 and sum(ten.images) * 4 <= sum(ten.av)
    with pytest.raises(ConfigError, match="--hours"):
        config_for(hours=0)
    with pytest.raises(ConfigError, match="unknown --size 'huge'"):
        config_for("huge")
