import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.errors import ConfigError, DataError
from mmssl.eval.layer_probe import (
    UNKNOWN,
    Example,
    LayerWeights,
    build_probe,
    collate_layers,
    encode_target,
    evaluate,
    fit,
    holdout_split,
    inventory,
    phone_error_rate,
    phone_sequence,
    probe_loss,
    record_targets,
)


def test_weighted_sum_equals_hand_computation():
    weights = LayerWeights(3, normalize=False)
    with torch.no_grad():
        weights.logits.copy_(torch.tensor([0.0, math.log(2.0), math.log(3.0)]))  # softmax: 1/6, 2/6, 3/6
    layers = torch.randn(3, 2, 5, 4)  # (L, B, T, C)
    expected = (1 * layers[0] + 2 * layers[1] + 3 * layers[2]) / 6
    torch.testing.assert_close(weights.weights(), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    torch.testing.assert_close(weights(layers), expected)


def test_weighted_sum_layer_normalises_each_layer_first():
    weights = LayerWeights(2)
    with torch.no_grad():
        weights.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # 1/4, 3/4
    layers = torch.randn(2, 1, 3, 6) * 5 + 2
    normed = (layers - layers.mean(-1, keepdim=True)) / torch.sqrt(
        layers.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(weights(layers), 0.25 * normed[0] + 0.75 * normed[1], atol=1e-5, rtol=1e-5)


def test_weights_start_equal_and_refuse_a_wrong_layer_count():
    weights = LayerWeights(4)
    torch.testing.assert_close(weights.weights(), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="3 layers for 4 weights"):
        weights(torch.zeros(3, 1, 2, 2))


@pytest.mark.parametrize("task", ["phones", "speaker"])
def test_padded_batch_equals_one_at_a_time(task):
    torch.manual_seed(0)
    probe = build_probe(task, num_layers=3, dim=8, num_classes=5, hidden=6).eval()
    examples = [Example(f"r{i}", torch.randn(3, t, 8), torch.tensor(0)) for i, t in enumerate((7, 3, 5))]
    layers, lengths = collate_layers(examples)
    assert layers.shape == (3, 3, 7, 8) and lengths.tolist() == [7, 3, 5]
    with torch.no_grad():
        batched = probe(layers, lengths)
        for i, example in enumerate(examples):
            alone_layers, alone_lengths = collate_layers([example])
            alone = probe(alone_layers, alone_lengths)
            if task == "phones":
                t = example.layers.shape[1]
                torch.testing.assert_close(batched[i, :t], alone[0], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


def test_phone_error_rate_hand_computed():
    # one substitution (b->x) out of 3, then one deletion (c) and one insertion (z) out of 2
    assert phone_error_rate([["a", "x", "c"]], [["a", "b", "c"]]) == pytest.approx(1 / 3)
    assert phone_error_rate([["a", "x", "c"], ["d", "z"]], [["a", "b", "c"], ["d", "c"]]) == pytest.approx(
        2 / 5
    )
    assert phone_error_rate([[1, 2, 3]], [[1, 3]]) == pytest.approx(1 / 2)  # an insertion
    assert phone_error_rate([[]], [[1, 2]]) == pytest.approx(1.0)  # all deleted
    assert phone_error_rate([[5]], [[UNKNOWN]]) == pytest.approx(1.0)  # a phone training never had
    with pytest.raises(DataError):
        phone_error_rate([[1]], [[]])


def test_phone_sequence_drops_silence_and_keeps_repeats():
    alignment = [("t", 300, 400), ("", 0, 100), ("a", 100, 200), ("t", 200, 300), ("", 400, 500)]
    assert phone_sequence(alignment) == ["a", "t", "t"]


def test_targets_name_the_missing_key(tmp_path):
    with pytest.raises(DataError, match=r"m\.jsonl: record 'r1' has no 'speaker' key"):
        record_targets([{"id": "r1", "audio": "a.wav"}], "speaker", "m.jsonl")
    with pytest.raises(DataError, match="'align'"):
        record_targets([{"id": "r1"}], "phones", "m.jsonl")


def test_encoding_with_the_training_inventory():
    names = inventory([["b", "a"], ["a", "c"]], "phones")
    assert names == ["a", "b", "c"]
    assert encode_target(["c", "a", "q"], names, "phones").tolist() == [3, 1, UNKNOWN]  # blank is 0
    speakers = inventory(["s2", "s1", "s2"], "speaker")
    assert int(encode_target("s2", speakers, "speaker")) == 1
    assert encode_target("s9", speakers, "speaker") is None


def test_holdout_keeps_every_held_speaker_in_training():
    records = [{"id": f"{s}{i}", "speaker": s} for s in "ab" for i in range(5)] + [
        {"id": "c0", "speaker": "c"}
    ]
    train, held = holdout_split(records, 0.4, "speaker")
    assert [r["id"] for r in held] == ["a3", "a4", "b3", "b4"]
    assert {r["speaker"] for r in train} == {"a", "b", "c"} and len(train) == 7
    with pytest.raises(ConfigError, match="--holdout"):
        holdout_split(records, 1.5)


def _speaker_data(n: int, generator: torch.Generator) -> list[Example]:
    """4 speakers; layer 1 carries the speaker (its mean), layers 0 and 2 are noise."""
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 2
    out = []
    for i in range(n):
        t = 5 + i % 4
        layers = torch.randn(3, t, 8, generator=generator)
        layers[1] += centres[i % 4]
        out.append(Example(str(i), layers, torch.tensor(i % 4)))
    return out


def test_speaker_probe_learns_and_weights_the_informative_layer():
    torch.manual_seed(0)
    train, valid = (
        _speaker_data(64, torch.Generator().manual_seed(2)),
        _speaker_data(32, torch.Generator().manual_seed(3)),
    )
    probe = build_probe("speaker", 3, 8, 4)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-2)
    losses = fit(probe, "speaker", train, optimizer, 150, 16, torch.device("cpu"), progress=False)
    scores = evaluate(probe, "speaker", valid, torch.device("cpu"))
    assert scores["accuracy"] >= 0.9  # chance: 0.25
    assert losses[-1] < losses[0] / 3
    assert int(probe.layer_weights.weights().argmax()) == 1


def _phone_data(n: int, generator: torch.Generator) -> list[Example]:
    """Utterances of 3-5 phones out of 5; each phone is 3 frames of its own vector (+ noise) in
    layer 2, the other layers are noise."""
    codes = torch.randn(5, 8, generator=torch.Generator().manual_seed(4)) * 2
    out = []
    for i in range(n):
        phones = torch.randint(0, 5, (3 + i % 3,), generator=generator)
        frames = codes[phones].repeat_interleave(3, 0)  # (T, C)
        layers = torch.randn(3, frames.shape[0], 8, generator=generator) * 0.5
        layers[2] += frames
        out.append(Example(str(i), layers, phones + 1))  # class 0 is the blank
    return out


def test_phone_probe_learns_below_chance_per():
    torch.manual_seed(0)
    train, valid = (
        _phone_data(64, torch.Generator().manual_seed(5)),
        _phone_data(24, torch.Generator().manual_seed(6)),
    )
    probe = build_probe("phones", 3, 8, 6)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-2)
    fit(probe, "phones", train, optimizer, 250, 16, torch.device("cpu"), progress=False)
    scores = evaluate(probe, "phones", valid, torch.device("cpu"))
    assert scores["per"] < 0.25  # an untrained probe decodes (almost) nothing: PER ~1
    assert int(probe.layer_weights.weights().argmax()) == 2
    untrained = evaluate(build_probe("phones", 3, 8, 6), "phones", valid, torch.device("cpu"))
    assert untrained["per"] > 0.6


def test_ctc_loss_of_a_batch_matches_torch():
    torch.manual_seed(0)
    probe = build_probe("phones", 2, 4, 4).eval()
    examples = [
        Example("a", torch.randn(2, 6, 4), torch.tensor([1, 2])),
        Example("b", torch.randn(2, 4, 4), torch.tensor([3])),
    ]
    loss = probe_loss(probe, "phones", examples, torch.device("cpu"))
    per_utt = []
    for e in examples:
        lp = probe(*collate_layers([e]))  # (1, T, V)
        per_utt.append(
            F.ctc_loss(
                lp.transpose(0, 1),
                e.target[None],
                torch.tensor([lp.shape[1]]),
                torch.tensor([e.target.numel()]),
                reduction="sum",
            )
            / e.target.numel()
        )
    torch.testing.assert_close(loss, torch.stack(per_utt).mean(), atol=1e-5, rtol=1e-5)
