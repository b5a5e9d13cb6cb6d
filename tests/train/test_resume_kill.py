"""A run killed with SIGKILL resumes into the same losses as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.train.toy import make_trainer, read_metrics

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from mmssl import runs
    from mmssl.train import checkpoint
    from tests.train.toy import make_trainer

    run_dir, kill_after, kill_in_save, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"

    def die(step):
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_in_save != "-":
        # die half-way through writing one checkpoint file: a partial temporary file is left
        real = checkpoint.atomic_write
        def dying_write(path, write):
            if kill_in_save in str(path) and path.name == runs.STATE_FILE:
                with open(path.parent / ".partial.tmp", "wb") as f:
                    f.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, write)
        checkpoint.atomic_write = dying_write

    trainer = make_trainer(run_dir, max_steps=8, save_every=2, num_workers=1, callbacks=[die])
    if resume:
        assert trainer.resume()
    trainer.fit()
    """
)


def _run(tmp_path, run_dir, kill_after=-1, kill_in_save="-", resume=False):
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(run_dir), str(kill_after), kill_in_save, "1" if resume else "0"]
    # output to a file, not a pipe: a killed run's orphaned data worker would hold a pipe open
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    done.stderr = (tmp_path / "log.txt").read_text()
    return done


def test_sigkill_in_a_checkpoint_write_and_after_a_step_then_resume(tmp_path):
    reference = make_trainer(tmp_path / "ref", max_steps=8, save_every=2, num_workers=1)
    reference.fit()
    expected = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"

    # 1. killed half-way through writing step 4's checkpoint: step 2's stays the latest
    killed = _run(tmp_path, run_dir, kill_in_save="step_00000004")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004" / "train_state.pt").exists()

    # 2. resumed from step 2, then killed right after step 5 (its checkpoint: step 4)
    killed = _run(tmp_path, run_dir, kill_after=5, resume=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"

    # 3. resumed from step 4 to the end: the same losses as the uninterrupted run
    resumed = _run(tmp_path, run_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == expected
