import io
import json
import time

import pytest
from tqdm import tqdm

from mmssl.commands.together import Job, follow, latest_counter, run_together
from mmssl.errors import MmsslError


def test_latest_counter_reads_the_last_progress_bar_update(tmp_path):
    log = tmp_path / "run.log"
    assert latest_counter(log) is None  # no file yet
    log.write_bytes(
        b"starting\n  0%|   | 0/300 [00:00<?, ?step/s]\r 45%|###  | 135/300 [01:02<01:15, 2.1step/s]"
    )
    assert latest_counter(log) == (135, 300)
    log.write_bytes(b"x" * 10_000 + b"\r 99%| 297/300 [02:10<00:01]\r100%| 300/300 [02:11<00:00]\ndone\n")
    assert latest_counter(log) == (300, 300)


def test_a_bar_starts_over_when_the_command_moves_to_its_next_counter():
    bar = tqdm(total=1, file=io.StringIO(), mininterval=0)
    follow(bar, (400, 800))
    bar.start_t -= 100  # training has run for 100 s
    follow(bar, (800, 800))
    assert (bar.n, bar.total) == (800, 800) and bar.format_dict["elapsed"] >= 100
    follow(bar, (6, 200))  # the validation pass after training: a new counter
    assert (bar.n, bar.total) == (6, 200)
    assert bar.format_dict["elapsed"] < 50  # timed from its own start, not training's
    follow(bar, (3, 200))  # went back: another bar with the same total
    assert bar.n == 3 and bar.format_dict["elapsed"] < 50


def _manifest(path, words):
    path.write_text("".join(json.dumps({"id": f"u{i}", "transcript": w}) + "\n" for i, w in enumerate(words)))
    return path


def test_commands_run_side_by_side_each_into_its_log(tmp_path):
    first = _manifest(tmp_path / "a.jsonl", ["one two three", "two three four"])
    second = _manifest(tmp_path / "b.jsonl", ["five six", "six seven"])
    jobs = [
        Job(
            "first",
            ["lm", "--manifest", str(first), "--order", "2", "--out", str(tmp_path / "a.arpa")],
            tmp_path / "logs" / "a.log",
        ),
        Job(
            "second",
            ["lm", "--manifest", str(second), "--order", "2", "--out", str(tmp_path / "b.arpa")],
            tmp_path / "logs" / "b.log",
        ),
    ]
    start = time.time()
    seconds = run_together(jobs, cores=2)
    assert set(seconds) == {"first", "second"}
    assert all(0 < s <= time.time() - start for s in seconds.values())
    assert "three" in (tmp_path / "a.arpa").read_text() and "seven" in (tmp_path / "b.arpa").read_text()
    assert "a.arpa" in (tmp_path / "logs" / "a.log").read_text()  # each command's own output


def test_a_failed_command_is_named_with_its_log_and_the_other_still_finishes(tmp_path):
    good = _manifest(tmp_path / "a.jsonl", ["one two", "two three"])
    jobs = [
        Job(
            "missing",
            ["lm", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.arpa")],
            tmp_path / "x.log",
        ),
        Job(
            "good",
            ["lm", "--manifest", str(good), "--order", "2", "--out", str(tmp_path / "a.arpa")],
            tmp_path / "a.log",
        ),
    ]
    with pytest.raises(MmsslError, match=r"missing.*exited with 2.*x\.log"):
        run_together(jobs, cores=2)
    assert (tmp_path / "a.arpa").is_file()
    assert "none.jsonl" in (tmp_path / "x.log").read_text()
