import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmssl.cli import main


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--size",
        "tiny",
        "--steps",
        "2",
        "--asr-steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--retrieval-steps",
        "2",
        "--subset-steps",
        "2",
        "--model-size",
        "tiny",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "av_hubert" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    assert any("valid_loss" in r for r in rows)
    # both clusterings were scored against the corpus alignments and reported
    for folder in ("km_mfcc", "km_av"):
        quality = json.loads((out / folder / "quality.json").read_text())
        assert 0.0 < quality["by_manifest"]["valid"]["pnmi"] <= 1.0
    assert "MFCC (iteration-1 targets)" in printed and "AV-HuBERT middle layer" in printed
    assert (out / "km_av" / "valid.km").read_text().count("\n") == len(
        (out / "corpus" / "av" / "valid.jsonl").read_text().splitlines()
    )
    # CTC fine-tuning decoded the valid split; the noisy grid covers clean + 2 noises x 3 SNRs x 3 conditions
    wer = json.loads((out / "asr" / "wer.json").read_text())
    assert wer["utterances"] == len((out / "corpus" / "av" / "valid.jsonl").read_text().splitlines())
    cells = [
        json.loads(line)
        for line in (out / "asr" / "eval_noisy" / "results.jsonl").read_text().splitlines()[1:]
    ]
    assert len(cells) == (1 + 2 * 3) * 3 and {c["noise"] for c in cells} == {"none", "babble", "music"}
    assert "WER (%) on the test split under noise" in printed and "| music | -5 |" in printed
    # decoded by beam search with the trigram of the training transcripts, and greedily beside it
    header = json.loads((out / "asr" / "eval_noisy" / "results.jsonl").read_text().splitlines()[0])
    assert header["fingerprint"]["decoding"]["kind"] == "beam"
    assert header["fingerprint"]["decoding"]["lm"][0] == str((out / "lm" / "train_3gram.arpa").resolve())
    greedy = (out / "asr" / "eval_noisy_greedy" / "results.jsonl").read_text().splitlines()
    assert json.loads(greedy[0])["fingerprint"]["decoding"] is None and len(greedy) == 1 + len(cells)
    # clean updates with both streams first, then noise and modality dropout
    assert OmegaConf.load(out / "asr" / "config.yaml").objective.augment_after == 1
    # the summary: every WER row of the three fine-tunings, cluster quality, retrieval, times, claims
    summary = json.loads((out / "summary.json").read_text())
    kinds = {(r["init"], r["labels"]) for r in summary["wer"]}
    assert kinds == {("pretrained", "all"), ("pretrained", "subset"), ("scratch", "subset")}
    subset_cells = {
        (r["noise"], str(r["snr"]), r["modality"]) for r in summary["wer"] if r["init"] == "scratch"
    }
    assert ("none", "clean", "audio") in subset_cells and ("babble", "-5.0", "audio+video") in subset_cells
    assert {r["decoding"] for r in summary["wer"]} == {"beam 50 + LM train_3gram.arpa"}
    assert {r["decoding"] for r in summary["wer_greedy"]} == {"greedy"} and len(summary["wer_greedy"]) == 21
    assert set(summary["pnmi"]) == {"mfcc", "pretrained"} and summary["retrieval"]["images"] >= 1
    assert summary["seconds"]["total"] > 0 and summary["cores"] >= 1
    if (os.cpu_count() or 1) >= 2:
        # the two subset fine-tunings ran side by side, each into its log, and so did their
        # evaluations and the two decodings of the main run: the total counts them once
        assert printed.count("side by side; their output:") == 3
        assert len(list((out / "logs").glob("*_finetune-asr.log"))) == 2
        stage_seconds = [v for k, v in summary["seconds"].items() if k != "total"]
        assert max(stage_seconds) <= summary["seconds"]["total"] < sum(stage_seconds)
    assert [c["number"] for c in summary["claims"]] == [1, 2, 3, 4, 5, 6]
    assert "claims (summary.json, report.md):" in printed and (out / "report.md").is_file()
    # the scratch baseline used the same subset, from random weights of the same architecture
    scratch = OmegaConf.load(out / "asr_subset_scratch" / "config.yaml")
    assert scratch.data.train_subset == 0.1 and scratch.objective.encoder == "av"
    assert scratch.objective.encoder_init in (None, "none")
    # a second run finds every output and redoes nothing; the training runs it resumes (with
    # nothing left to do) add their seconds to the first run's
    seconds = json.loads((out / "seconds.json").read_text())
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 13
    again = json.loads((out / "seconds.json").read_text())
    for title in (t for t in seconds if t.startswith(("pretrain", "train speech-image"))):
        assert again[title] > seconds[title]
    assert {t: v for t, v in again.items() if not t.startswith(("pretrain", "train"))} == {
        t: v for t, v in seconds.items() if not t.startswith(("pretrain", "train"))
    }
    # pretraining goes on: the clustering of its layer, the fine-tuning and its noisy evaluation
    # are redone from the new checkpoint
    assert main([*argv[:4], "3", *argv[5:]]) == 0
    printed = capsys.readouterr().out
    # (the corpus, the packed splits, the MFCC clusters, the language model and the scratch baseline
    # with its evaluation stay; retrieval, whose speech tower is the redone CTC run's, and its
    # index are redone)
    assert printed.count("already done, skipped") == 6 and "started from another checkpoint" in printed
    retrieval = OmegaConf.load(out / "speech_image" / "config.yaml").objective
    assert retrieval.speech_init == str((out / "asr" / "checkpoints" / "step_00000002").resolve())
    made = json.loads((out / "index" / "index.json").read_text())
    assert made["weights"] == str(
        (out / "speech_image" / "checkpoints" / "step_00000002" / "model.safetensors").resolve()
    )
    clustered = torch.load(out / "km_av" / "kmeans.pt", weights_only=True)["weights"]
    assert clustered == str(
        (out / "av_hubert" / "checkpoints" / "step_00000003" / "model.safetensors").resolve()
    )
    started = OmegaConf.load(out / "asr" / "config.yaml").objective.encoder_init
    assert started == str((out / "av_hubert" / "checkpoints" / "step_00000003").resolve())
    # started with --resume into an empty folder, the run still keeps the pretraining config
    assert (out / "asr" / "init" / "encoder_init" / "config.yaml").is_file()
    header = json.loads((out / "asr" / "eval_noisy" / "results.jsonl").read_text().splitlines()[0])
    assert header["fingerprint"]["checkpoint"] == str(
        (out / "asr" / "checkpoints" / "step_00000002").resolve()
    )
    # another recipe for the labelled tenth (code that changed its rate): both of its runs and
    # their evaluations are redone from scratch, not resumed or skipped; the rest is kept
    import mmssl.commands.demo as demo

    before = (out / "asr" / "checkpoints" / "step_00000002" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(demo, "SUBSET_LR", 3e-3)
    assert main([*argv[:4], "3", *argv[5:]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done, skipped") == 9
    assert printed.count("made with another recipe (train.lr=0.002 -> train.lr=0.003): removed") == 2
    for run in ("asr_subset", "asr_subset_scratch"):
        assert OmegaConf.load(out / run / "config.yaml").train.lr == 3e-3
        assert (out / run / "eval_noisy" / "wer.md").is_file()
    assert (out / "asr" / "checkpoints" / "step_00000002" / "model.safetensors").stat().st_mtime_ns == before


def test_a_noisy_evaluation_counts_as_done_only_over_every_record_and_cell(tmp_path):
    from mmssl.commands.demo_done import noisy_done
    from mmssl.runs import LATEST, MODEL_FILE, STATE_FILE

    step = tmp_path / "asr" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    for name in (MODEL_FILE, STATE_FILE):
        (step / name).write_bytes(b"")
    (step.parent / LATEST).write_text(step.name)
    out = tmp_path / "asr" / "eval_noisy"
    out.mkdir()
    (out / "wer.md").write_text("table")

    def write(limit, cells):
        header = {"fingerprint": {"checkpoint": str(step.resolve()), "limit": limit}}
        rows = [{"noise": n, "snr": s, "modality": "audio", "wer": 0.5} for n, s in cells]
        (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [header, *rows]) + "\n")

    write(None, [("none", "clean"), ("babble", "-5")])
    assert noisy_done(tmp_path / "asr", out, "babble", "clean,-5")
    assert not noisy_done(tmp_path / "asr", out, "babble,music", "clean,-5")  # a noise type missing
    write(50, [("none", "clean"), ("babble", "-5")])
    assert not noisy_done(tmp_path / "asr", out, "babble", "clean,-5")  # only the first 50 records


def test_an_output_made_with_another_recipe_is_removed_with_what_was_made_from_it(
    tmp_path, capsys, monkeypatch
):
    from mmssl.commands.demo_done import RECIPES_FILE, clear_changed_recipes, record_recipe

    out = tmp_path / "demo"
    corpus, run, index, elsewhere = out / "corpus", out / "run", out / "index", tmp_path / "mine"
    stages = [
        ["synth", "--size", "tiny", "--out", str(corpus)],
        ["pretrain", "x", f"data.train={corpus / 'a.jsonl'}", "train.lr=1e-3", f"train.out_dir={run}"],
        ["index", "--run", str(run), "--out", str(index), "--device", "cpu"],
        ["lm", "--manifest", str(corpus / "a.jsonl"), "--out", str(elsewhere)],
    ]

    def make(argvs):
        assert clear_changed_recipes(out, argvs, "seconds.json") == []
        for argv, folder in zip(argvs, (corpus, run, index, elsewhere), strict=True):
            record_recipe(out, argv)  # as the demo does before it runs the stage
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "made").write_text("x")
        (out / "seconds.json").write_text("{}")

    make(stages)
    # more steps, another device, --resume: the same recipe
    again = [
        stages[0],
        [*stages[1][:4], "train.max_steps=9", "train.device=cuda", f"train.out_dir={run}", "--resume"],
        ["index", "--run", str(run), "--out", str(index), "--device", "cuda"],
        stages[3],
    ]
    assert clear_changed_recipes(out, again, "seconds.json") == []
    assert all((f / "made").is_file() for f in (corpus, run, index))
    # another rate: the run goes, and the index made from it; the corpus stays
    changed = [stages[0], [*stages[1][:3], "train.lr=2e-3", stages[1][4]], stages[2], stages[3]]
    assert clear_changed_recipes(out, changed, "seconds.json") == [run, index]
    assert (corpus / "made").is_file() and not run.exists() and not index.exists()
    printed = capsys.readouterr().out
    assert "made with another recipe (train.lr=1e-3 -> train.lr=2e-3)" in printed
    assert f"made from {run}, which is redone" in printed
    assert sorted(json.loads((out / RECIPES_FILE).read_text())) == ["corpus"]
    # the output of a stage the record does not name was not made by the demo: it stays
    make(changed)
    (out / "own").mkdir()
    assert clear_changed_recipes(out, [*changed, ["lm", "--out", str(out / "own")]], "seconds.json") == []
    # a demo folder with no record at all was made by older code: all of it is redone...
    (out / RECIPES_FILE).unlink()
    assert clear_changed_recipes(out, changed, "seconds.json") == [corpus, run, index]
    assert "did not record its recipe" in capsys.readouterr().out
    assert (elsewhere / "made").is_file()  # (never what lies outside the demo's folder)
    # ... but a folder no demo ran in keeps what it has
    make(changed)
    for name in (RECIPES_FILE, "seconds.json"):
        (out / name).unlink()
    assert clear_changed_recipes(out, [*changed[:1], stages[1]], "seconds.json") == []
    # the record does not depend on how the demo's folder is spelt
    make(changed)
    relative = [[arg.replace(f"{tmp_path}/", "") for arg in argv] for argv in changed]
    monkeypatch.chdir(tmp_path)
    assert clear_changed_recipes(Path("demo"), relative, "seconds.json") == []
    assert json.loads((out / RECIPES_FILE).read_text())["run"][-1] == "train.out_dir=<out>/run"
