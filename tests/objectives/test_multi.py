"""Several objectives in one run (objective ``multi``): the weighted sum of the parts, one shared
encoder that every part's gradient reaches, checkpoints that hold it once, the recipe, and
config errors that name the key."""

import copy

import pytest
import torch

from mmssl.cli import main
from mmssl.config import load_config
from mmssl.encoders.av import AVEncoder
from mmssl.errors import ConfigError
from mmssl.registry import OBJECTIVES
from mmssl.runs import build_objective, check_options, load_encoder_from_run, load_weights, save_weights
from mmssl.testing import overfit, save_tiny_run, synthetic_batch
from mmssl.train.optim import build_adamw

PARTS = {
    "av_hubert": {"weight": 1.0, "num_classes": 8, "final_dim": 16},
    "multiview": {"name": "multiview_contrastive", "weight": 0.5, "dim": 16},
    "dcca": {"weight": 0.1, "out_dim": 8},
}


def _multi(parts=PARTS, seed=0):
    torch.manual_seed(seed)
    return OBJECTIVES.build("multi", size="tiny", parts=copy.deepcopy(parts))


def _alone(label, multi):
    """The part ``label`` of ``multi`` built by its own builder, as a run of that objective alone
    builds it (the two-view objectives with an audio tower and a video tower of their own), with
    the weights it has in ``multi``."""
    options = {k: v for k, v in PARTS[label].items() if k != "weight"}
    objective = OBJECTIVES.build(options.pop("name", label), size="tiny", **options)
    # each of its towers (if any) takes the shared encoder's weights, less those of one stream
    missing, _ = objective.load_state_dict(multi.parts[label].state_dict(), strict=False)
    assert not missing, missing
    return objective.train(multi.training)


def test_the_loss_is_the_weighted_sum_of_each_part_run_alone():
    multi = _multi().train()
    batch = synthetic_batch(multi)
    torch.manual_seed(1)  # dropout draws alike in both passes: the parts run in the same order
    out = multi(batch)
    alone = {label: _alone(label, multi) for label in PARTS}
    torch.manual_seed(1)
    losses = {label: objective(dict(batch)) for label, objective in alone.items()}
    for label, got in losses.items():
        for key, value in got.items():
            torch.testing.assert_close(out[f"{label}/{key}"], value, rtol=1e-5, atol=1e-6)
    expected = sum(PARTS[label]["weight"] * got["loss"] for label, got in losses.items())
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss"} | {f"{label}/{key}" for label, got in losses.items() for key in got}


def _grads(multi, batch, weights):
    multi.weights.update(weights)
    multi.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    multi(batch)["loss"].backward()
    return {name: p.grad.clone() for name, p in multi.named_parameters() if p.grad is not None}


def test_every_part_trains_the_shared_encoder_and_its_own_head_only():
    multi = _multi().train()
    batch = synthetic_batch(multi)
    one_hot = {label: _grads(multi, batch, {k: float(k == label) for k in PARTS}) for label in PARTS}
    mixed = _grads(multi, batch, {label: spec["weight"] for label, spec in PARTS.items()})
    encoder = [f"encoder.{name}" for name, _ in multi.encoder.named_parameters()]
    heads = {
        "av_hubert": "parts.av_hubert.final_proj.weight",
        "multiview": "parts.multiview.audio_utt.weight",
        "dcca": "parts.dcca.views.audio_head.weight",
    }
    for label, grads in one_hot.items():
        # a part alone: its head learns, the other heads do not, the encoder does
        for other, head in heads.items():
            assert (grads[head].abs().sum() > 0) == (other == label), (label, head)
        assert sum(float(grads[name].norm()) for name in encoder if name in grads) > 0, label
    # the lip encoder learns from the video view of the contrastive part
    lips = [name for name in encoder if name.startswith("encoder.video_frontend.")]
    assert lips and sum(float(one_hot["multiview"][name].norm()) for name in lips) > 0
    # what reaches the encoder with every part is the weighted sum of what each part sends
    for name in encoder:
        parts = [PARTS[label]["weight"] * grads[name] for label, grads in one_hot.items() if name in grads]
        if parts:  # to float rounding: summed in another order
            expected = sum(parts)
            atol = 1e-3 * float(expected.abs().max()) + 1e-9
            torch.testing.assert_close(mixed[name], expected, rtol=1e-3, atol=atol)


def test_the_encoder_is_built_once_and_held_once_by_the_optimizer_and_the_checkpoint(tmp_path):
    multi = _multi()
    enc = multi.encoder
    assert multi.parts["av_hubert"].encoder is enc
    for label in ("multiview", "dcca"):
        assert multi.parts[label].views.audio_tower is enc and multi.parts[label].views.video_tower is enc
    assert len({id(m) for m in multi.modules() if isinstance(m, AVEncoder)}) == 1
    optimizer = build_adamw(multi, lr=1e-3)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(set(held)) == len(list(multi.parameters()))
    assert all(held.count(id(p)) == 1 for p in enc.parameters())

    state = multi.state_dict()
    assert {k for k in state if k.startswith("encoder.")} == {f"encoder.{k}" for k in enc.state_dict()}
    elsewhere = (
        "parts.av_hubert.encoder.",
        "parts.multiview.views.audio_tower.",
        "parts.dcca.views.video_tower.",
    )
    assert not any(k.startswith(elsewhere) for k in state)
    unique = {id(t): t.numel() for t in [*multi.parameters(), *multi.buffers()]}
    assert sum(v.numel() for v in state.values()) == sum(unique.values())

    save_weights(state, tmp_path / "model.safetensors")
    other = _multi(seed=1).eval()
    other.load_state_dict(load_weights(tmp_path / "model.safetensors"))  # strict: every name filled in
    batch = synthetic_batch(multi)
    torch.testing.assert_close(other(batch)["loss"], multi.eval()(batch)["loss"])
    assert torch.equal(other.parts["dcca"].views.video_tower.fusion.proj.weight, enc.fusion.proj.weight)


def test_step_hooks_reach_every_part_and_the_loader_reads_their_modalities():
    multi = _multi()
    assert multi.modalities == ("audio", "video")
    batch = synthetic_batch(multi)
    assert {"audio_mask", "video_mask", "video_source"} <= set(batch)  # AV-HuBERT's hook ran
    scale = multi.parts["multiview"].utterance_scale
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # past CLIP's cap: on_step clamps it
    multi.on_step(1)
    assert float(scale.log_scale.detach()) < 10.0


def test_a_tiny_multi_objective_lowers_its_loss():
    multi = _multi().train()
    batch = synthetic_batch(multi)
    losses = overfit(multi, batch, steps=15, lr=2e-3)
    assert losses[-1] < losses[0] - 0.5, losses


RECIPE = ["data.train=a.jsonl", "data.labels=x", "model.size=tiny"]


def test_the_recipe_builds_three_parts_and_takes_typed_overrides():
    cfg = load_config(
        "av_multi", [*RECIPE, "objective.parts.multiview.weight=0.2", "objective.parts.dcca.out_dim=16"]
    )
    multi = build_objective(cfg)
    assert multi.weights == {"av_hubert": 1.0, "multiview": 0.2, "dcca": 0.1}
    assert multi.parts["dcca"].views.audio_head.out_features == 16
    without = build_objective(load_config("av_multi", [*RECIPE, "objective.parts.dcca=null"]))
    assert list(without.parts) == ["av_hubert", "multiview"]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["objective.parts.foo.weight=1"], "objective.parts.foo: no objective is named 'foo'"),
        (["objective.parts.x.name=nope"], "objective.parts.x.name: unknown objective 'nope'"),
        (
            ["objective.parts.multiview.weight=-1"],
            r"objective.parts.multiview.weight must be a number >= 0, got -1",
        ),
        (["objective.parts.dcca.weight=heavy"], "objective.parts.dcca.weight must be a number >= 0"),
        (
            [
                "objective.parts.av_hubert.weight=0",
                "objective.parts.multiview.weight=0",
                "objective.parts.dcca.weight=0",
            ],
            "objective.parts: every part's weight is 0",
        ),
        (
            ["objective.parts.hub.name=hubert"],
            "objective.parts.hub: objective 'hubert' cannot train a shared encoder",
        ),
        (["objective.parts.dcca.depth=3"], "unknown config key objective.parts.dcca.depth"),
        (["objective.parts.dcca.out_dim=wide"], "config key objective.parts.dcca.out_dim must be an integer"),
        (
            ["objective.parts.av_hubert.masking_type=both"],
            "objective.parts.av_hubert.masking_type must be one of",
        ),
        (
            ["objective.parts.dcca.size=base"],
            "objective.parts.dcca.size: every part trains one encoder of model.size",
        ),
        (["objective.parts.dcca.shared_encoder=1"], "unknown config key objective.parts.dcca.shared_encoder"),
        (["objective.shared_encoder=1"], "unknown config key objective.shared_encoder"),
        (["objective.parts=[1]"], "config key objective.parts cannot change between a mapping and a list"),
        (["objective.parts.train.name=dcca"], "objective.parts.train: 'train' names a method"),
        # an encoder without a lip stream cannot give the contrastive part its video view
        (["objective.parts.av_hubert.encoder={video: false}"], "objective.parts.multiview .*audio and video"),
        # feature masking builds the encoder without the audio mask embedding input masking needs
        (
            [
                "objective.parts.av_hubert.masking_type=feature",
                "objective.parts.av_hubert.video_mask_prob=0.8",
                "objective.parts.av_hubert.video_mask_span=10",
                "objective.parts.again.name=av_hubert",
            ],
            "objective.parts.again.masking_type=input masks the audio stream",
        ),
    ],
)
def test_bad_parts_are_refused_in_one_line_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named) as err:
        cfg = load_config("av_multi", [*RECIPE, *overrides])
        check_options(cfg)
        build_objective(cfg)
    assert "\n" not in str(err.value)


def test_the_first_part_must_have_one_encoder_to_share():
    with pytest.raises(
        ConfigError, match="objective.parts.mv: objective 'multiview_contrastive' has no single encoder"
    ):
        OBJECTIVES.build("multi", size="tiny", parts={"mv": {"name": "multiview_contrastive"}, "dcca": {}})


def test_two_parts_that_make_masks_are_refused():
    parts = {"a": {"num_classes": 8, "name": "av_hubert"}, "b": {"num_classes": 8, "name": "av_hubert"}}
    with pytest.raises(ConfigError, match="objective.parts: a and b both make batch keys"):
        OBJECTIVES.build("multi", size="tiny", parts=parts)


def test_the_labels_are_checked_against_the_part_that_reads_them(tmp_path):
    torch.save({"k": 200, "label_rate": 100.0}, tmp_path / "kmeans.pt")  # what `mmssl kmeans` records
    cfg = load_config("av_multi", ["data.train=a.jsonl", f"data.labels={tmp_path}", "model.size=tiny"])
    with pytest.raises(
        ConfigError,
        match="objective.parts.av_hubert.num_classes=100 .* set objective.parts.av_hubert.num_classes=200",
    ):
        build_objective(cfg)


def test_downstream_commands_read_the_shared_encoder_of_a_run(tmp_path):
    objective, step = save_tiny_run(
        tmp_path / "run",
        "av_multi",
        tmp_path / "a.jsonl",
        ("data.labels=x", "objective.parts.av_hubert.num_classes=3"),
    )
    encoder = load_encoder_from_run(step)
    assert isinstance(encoder, AVEncoder)
    for name, tensor in objective.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


def test_pretrain_then_extract_on_the_built_in_corpus(synth_tiny, tmp_path):
    av = synth_tiny / "av"
    km, run = tmp_path / "km", tmp_path / "run"
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(av / "train.jsonl"),
                "--features",
                "mfcc",
                "--k",
                "5",
                "--out",
                str(km),
            ]
        )
        == 0
    )
    common = [f"data.train={av / 'train.jsonl'}", f"data.labels={km}", "model.size=tiny", "train.device=cpu"]
    common += [
        "data.num_workers=0",
        "data.max_seconds_per_batch=3",
        "train.progress=false",
        "train.log_every=1",
    ]
    assert (
        main(
            [
                "pretrain",
                "av_multi",
                *common,
                "objective.parts.av_hubert.num_classes=5",
                "train.max_steps=2",
                f"train.out_dir={run}",
            ]
        )
        == 0
    )
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "av_hubert/loss", "multiview/loss", "dcca/loss"} <= set(r) for r in records)
    feats = tmp_path / "feats"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(run),
                "--manifest",
                str(av / "valid.jsonl"),
                "--layer",
                "2",
                "--out",
                str(feats),
            ]
        )
        == 0
    )
    assert (feats / "index.jsonl").is_file()
