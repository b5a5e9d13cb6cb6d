import json
import shutil

import jiwer
import pytest
import torch
from omegaconf import OmegaConf

from mmssl.cli import main
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.data.ngram import arpa_words, build_arpa
from mmssl.data.units import Units, normalize_text
from mmssl.errors import ConfigError
from mmssl.eval.asr import (
    clip_batch,
    evaluate_run,
    load_asr_model,
    load_clips,
    transcribe,
    word_errors,
)
from mmssl.eval.decoders import greedy_decode
from mmssl.testing import save_tiny_run


def logits_for(paths, vocab=4):
    """(B, T, V) log-probabilities whose argmax follows each path (shorter paths padded with 3s)."""
    t = max(len(p) for p in paths)
    out = torch.full((len(paths), t, vocab), -5.0)
    for b, path in enumerate(paths):
        for i, c in enumerate(path + [3] * (t - len(path))):
            out[b, i, c] = 0.0
    return out


def test_greedy_decoding_collapses_repeats_and_blanks_split_them():
    paths = [[1, 1, 0, 1, 2, 2, 0, 0, 2], [0, 2, 2, 2, 0]]
    got = greedy_decode(logits_for(paths), torch.tensor([9, 5]))
    assert got == [[1, 1, 2, 2], [2]]
    # frames past the length are never read (they argmax to 3)
    assert greedy_decode(logits_for([[1, 2]]), torch.tensor([2])) == [[1, 2]]


def test_word_errors_against_a_hand_count():
    refs = ["the cat sat on the mat", "a big star", "hello"]
    hyps = ["the cat sat on mat", "a small big star", "yellow"]
    # 1: one deletion; 2: one insertion; 3: one substitution -> 3 errors over 10 words
    got = word_errors(refs, hyps)
    assert (got["deletions"], got["insertions"], got["substitutions"], got["hits"]) == (1, 1, 1, 8)
    assert got["words"] == 10 and got["errors"] == 3 and got["wer"] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def av_init(synth_tiny, tmp_path_factory):
    """A tiny AV-HuBERT pretraining run (weights at their seeded initialisation)."""
    folder = tmp_path_factory.mktemp("asr_init")
    _, step = save_tiny_run(folder / "av", "av_hubert", synth_tiny / "av" / "train.jsonl")
    return step


QUICK = [
    "train.device=cpu",
    "data.num_workers=0",
    "train.progress=false",
    "data.max_seconds_per_batch=20",
    "train.accum_steps=1",
    "train.lr=1e-3",
]


@pytest.fixture(scope="module")
def finetuned(synth_tiny, av_init, tmp_path_factory):
    out = tmp_path_factory.mktemp("asr_ft") / "ft"
    av = synth_tiny / "av"
    code = main(
        [
            "finetune-asr",
            "--init",
            str(av_init.parent.parent),
            f"data.train={av / 'train.jsonl'}",
            f"data.valid={av / 'valid.jsonl'}",
            "train.max_steps=2",
            f"train.out_dir={out}",
            "objective.freeze_steps=1",
            *QUICK,
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def av_init_latest(av_init):
    """``latest`` in the pretraining run, so ``--init`` can name the run folder."""
    (av_init.parent / "latest").write_text(av_init.name + "\n")
    (av_init / "train_state.pt").write_bytes(b"")


def test_the_config_records_the_checkpoint_it_started_from(finetuned, av_init):
    cfg = OmegaConf.load(finetuned / "config.yaml")
    assert cfg.objective.encoder_init == str(av_init.resolve())


def test_finetune_writes_units_config_and_a_wer_that_matches_its_hypotheses(finetuned, synth_tiny):
    for name in ("config.yaml", "units.model", "metrics.jsonl", "wer.json", "hyps.jsonl"):
        assert (finetuned / name).is_file(), name
    rows = [json.loads(line) for line in (finetuned / "hyps.jsonl").read_text().splitlines()]
    records = read_manifest(synth_tiny / "av" / "valid.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["ref"] for r in rows] == [normalize_text(r["transcript"]) for r in records]
    wer = json.loads((finetuned / "wer.json").read_text())
    expected = jiwer.wer([r["ref"] for r in rows], [r["hyp"] for r in rows])
    assert wer["wer"] == pytest.approx(expected)
    metrics = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == 2 and "ctc_loss" in metrics[-1]
    # the units were trained on the training transcripts: every character of them is a unit
    units = Units.load(finetuned / "units.model")
    assert units.sp.unk_id() not in [c - 1 for r in records for c in units.encode(r["transcript"])]


def test_beam_search_with_a_language_model_decodes_the_valid_set(finetuned, synth_tiny, tmp_path):
    run = shutil.copytree(finetuned, tmp_path / "ft")
    arpa = build_arpa(
        [r["transcript"] for r in read_manifest(synth_tiny / "av" / "train.jsonl")], tmp_path / "lm.arpa"
    )
    decoding = {"kind": "beam", "lm": str(arpa), "beam": 8}
    result = evaluate_run(run, synth_tiny / "av" / "valid.jsonl", torch.device("cpu"), decoding=decoding)
    saved = json.loads((run / "wer.json").read_text())
    assert saved["decoding"] == {**decoding, "lm": str(arpa.resolve()), "lm_weight": 2.0, "word_score": 0.0}
    assert saved["wer"] == pytest.approx(result["wer"])
    hyps = [json.loads(line)["hyp"] for line in (run / "hyps.jsonl").read_text().splitlines()]
    assert set(" ".join(hyps).split()) <= set(arpa_words(arpa))  # words of the model only
    assert json.loads((finetuned / "wer.json").read_text())["decoding"] == {"kind": "greedy"}


def test_padded_batches_decode_as_one_at_a_time(finetuned, synth_tiny):
    model = load_asr_model(finetuned, torch.device("cpu"))
    clips = load_clips(synth_tiny / "av" / "valid.jsonl", model.modalities, progress=False)
    together = transcribe(model, clips, model.modalities, torch.device("cpu"), 1000.0, progress=False)
    alone = transcribe(model, clips, model.modalities, torch.device("cpu"), 0.01, progress=False)
    assert together == alone
    # and the log-probabilities of valid frames agree, not only the argmax
    with torch.no_grad():
        lp, _ = model.logits(clip_batch(clips, model.modalities, torch.device("cpu")))
        one, n = model.logits(clip_batch(clips[:1], model.modalities, torch.device("cpu")))
    torch.testing.assert_close(lp[0, : int(n[0])], one[0, : int(n[0])], atol=1e-4, rtol=1e-4)


def test_fine_tuning_on_one_repeated_utterance_reaches_zero_wer(synth_tiny, tmp_path):
    record = min(read_manifest(synth_tiny / "av" / "train.jsonl"), key=lambda r: r["audio_samples"])
    manifest = write_manifest(tmp_path / "one.jsonl", [record])
    code = main(
        [
            "finetune-asr",
            "--init",
            "none",
            "objective.encoder=fbank",
            "model.size=tiny",
            "train.accum_steps=1",
            "objective.mask_channel_prob=0",
            f"data.train={manifest}",
            f"data.valid={manifest}",
            "train.max_steps=70",
            "train.lr=3e-3",
            "objective.freeze_steps=0",
            "objective.mask_prob=0",
            f"train.out_dir={tmp_path / 'run'}",
            "train.device=cpu",
            "data.num_workers=0",
            "train.progress=false",
            "train.log_every=10",
        ]
    )
    assert code == 0
    wer = json.loads((tmp_path / "run" / "wer.json").read_text())
    assert wer["wer"] == 0.0 and wer["words"] == len(record["transcript"].split())


def test_a_second_run_in_the_same_folder_needs_resume(finetuned, synth_tiny, capsys):
    av = synth_tiny / "av"
    code = main(
        ["finetune-asr", "--init", "none", f"data.train={av / 'train.jsonl'}", f"train.out_dir={finetuned}"]
    )
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_resume_keeps_the_units_and_continues_the_run(finetuned, synth_tiny, av_init):
    units = (finetuned / "units.model").stat().st_mtime_ns
    av = synth_tiny / "av"
    code = main(
        [
            "finetune-asr",
            "ctc",
            "--init",
            str(av_init),
            f"data.train={av / 'train.jsonl'}",
            f"data.valid={av / 'valid.jsonl'}",
            "train.max_steps=3",
            f"train.out_dir={finetuned}",
            "objective.freeze_steps=1",
            *QUICK,
            "--resume",
        ]
    )
    assert code == 0
    assert (finetuned / "units.model").stat().st_mtime_ns == units
    steps = [json.loads(line)["step"] for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_without_init_and_after_the_pretraining_run_moved(synth_tiny, tmp_path):
    av = synth_tiny / "av"
    _, step = save_tiny_run(tmp_path / "pre", "hubert", av / "train.jsonl")
    ft = tmp_path / "ft"
    base = [
        "finetune-asr",
        f"data.train={av / 'train.jsonl'}",
        f"data.valid={av / 'valid.jsonl'}",
        f"train.out_dir={ft}",
        "objective.freeze_steps=0",
        "train.save_every=1",
        *QUICK,
    ]
    assert main([*base, "--init", str(step), "train.max_steps=1"]) == 0
    before = load_asr_model(ft, torch.device("cpu"))
    # --resume alone: the saved config (encoder_init included) carries on, and the folder decodes
    assert main([*base, "train.max_steps=2", "--resume"]) == 0
    assert _steps(ft)[-1] == 2
    cfg = OmegaConf.load(ft / "config.yaml")
    assert cfg.objective.encoder_init == str(step.resolve())
    after = load_asr_model(ft, torch.device("cpu"))
    assert after.head.weight.shape == before.head.weight.shape
    assert json.loads((ft / "wer.json").read_text())["checkpoint"] == "step_00000002"
    # the pretraining run moved away: --resume --init PRE uses the copy and the checkpoint
    shutil.move(tmp_path / "pre", tmp_path / "elsewhere")
    assert main([*base, "--init", str(step), "train.max_steps=3", "--resume"]) == 0
    assert _steps(ft)[-1] == 3
    assert OmegaConf.load(ft / "config.yaml").objective.encoder_init == str(step.resolve())
    assert load_asr_model(ft, torch.device("cpu")).units.size == before.units.size


def test_no_init_is_an_error_that_says_what_to_pass(synth_tiny, tmp_path, capsys):
    code = main(
        ["finetune-asr", f"data.train={synth_tiny / 'av' / 'train.jsonl'}", f"train.out_dir={tmp_path / 'x'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--init RUN" in err and "--init none" in err
    assert not (tmp_path / "x").exists()


def test_a_frozen_encoder_for_the_whole_run_is_announced(synth_tiny, tmp_path, capsys):
    av = synth_tiny / "av"
    assert (
        main(
            [
                "finetune-asr",
                "--init",
                "none",
                "objective.encoder=fbank",
                "model.size=tiny",
                f"data.train={av / 'valid.jsonl'}",
                "train.max_steps=1",
                "objective.freeze_steps=1",
                f"train.out_dir={tmp_path / 'ft'}",
                *QUICK,
            ]
        )
        == 0
    )
    assert "objective.freeze_steps=1 >= train.max_steps=1" in capsys.readouterr().out


def test_the_conv_frontend_is_frozen_only_for_a_pretrained_encoder(synth_tiny, tmp_path):
    from mmssl.registry import OBJECTIVES
    from mmssl.runs import resolve_inits

    _, step = save_tiny_run(tmp_path / "pre", "hubert", synth_tiny / "av" / "train.jsonl")
    pretrained = OBJECTIVES.build("ctc", **resolve_inits("ctc", {"encoder_init": str(step)}))
    assert not any(p.requires_grad for p in pretrained.encoder.frontend.parameters())
    with pytest.raises(ConfigError, match="encoder_init: the ctc builder takes the encoder of a run"):
        OBJECTIVES.build("ctc", encoder_init=str(step))  # objectives never read run folders
    fresh = OBJECTIVES.build("ctc", size="tiny", encoder="hubert")
    assert all(p.requires_grad for p in fresh.encoder.frontend.parameters())
