import json

from mmssl.cli import main


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
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
        (out / "corpus" / "av" / "valid.jsonl").read_text().splitlines())
    # a second run finds every output and redoes nothing
    assert main(["demo", "--size", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 3
