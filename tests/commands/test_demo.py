import json

import torch
from omegaconf import OmegaConf

from mmssl.cli import main


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
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
    assert "MFCC (iteration-1 targets)" in printed and "AV-HuBERT last layer" in printed
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
    # a second run finds every output and redoes nothing
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 5
    # pretraining goes on: the clustering of its layer, the fine-tuning and its noisy evaluation
    # are redone from the new checkpoint
    assert main([*argv[:4], "3", *argv[5:]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done, skipped") == 2 and "started from another checkpoint" in printed
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
