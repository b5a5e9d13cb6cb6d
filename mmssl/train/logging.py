"""Training logs: ``metrics.jsonl``, TensorBoard scalars and a progress bar.

Values arrive as device tensors every step and are summed on the device; they become Python
floats only at log steps (one host sync per log step, not per step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmssl.train.distributed import DistEnv, all_reduce_mean


class MetricWindow:
    """Sums scalar tensors over the steps since the last log, per name, on the device.

    ``weight`` (a 0-dim bool/float tensor) leaves a step out when 0 (a skipped, non-finite
    step), without a host sync.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, values: dict[str, Tensor], weight: Tensor | None = None) -> None:
        for name, value in values.items():
            if not torch.is_tensor(value) or value.numel() != 1:
                continue
            value = value.detach().float().reshape(())
            w = torch.ones_like(value) if weight is None else weight.to(value.device, torch.float32)
            value = torch.where(w > 0, value * w, torch.zeros_like(value))  # NaN * 0 would be NaN
            if name in self.sums:
                self.sums[name], self.counts[name] = self.sums[name] + value, self.counts[name] + w
            else:
                self.sums[name], self.counts[name] = value, w.clone()

    def means(self, env: DistEnv) -> dict[str, float]:
        """Window means, averaged over ranks, as floats (the one sync); clears the window.
        A name with no counted step reads NaN."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        sums = all_reduce_mean(torch.stack([self.sums[n] for n in names]), env)
        counts = all_reduce_mean(torch.stack([self.counts[n] for n in names]), env)
        means = torch.where(counts > 0, sums / counts.clamp(min=1e-12), torch.full_like(sums, math.nan))
        self.sums, self.counts = {}, {}
        return dict(zip(names, means.tolist()))


class RunLogger:
    """Writes one JSON object per log step to ``metrics.jsonl`` and the same scalars to
    TensorBoard (``tb/``); shows a tqdm bar with ETA. Only rank 0 writes."""

    def __init__(
        self, run_dir: Path, env: DistEnv, total_steps: int, start_step: int, progress: bool = True
    ) -> None:
        self.env = env
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not env.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        # lazy: tensorboard takes a second to import; rank 0 only
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        record = {"step": step, **{k: _json_float(v) for k, v in values.items()}}
        assert self.jsonl is not None and self.tb is not None
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in values.items():
            self.tb.add_scalar(_tb_name(name), value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.env.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _tb_name(name: str) -> str:
    if name.endswith("loss"):
        return f"loss/{name}"
    if name.startswith(("valid_",)):
        return f"valid/{name[6:]}"
    if name in ("lr", "grad_norm", "nonfinite_steps", "epoch"):
        return f"optim/{name}"
    if name in ("audio_sec_per_sec", "steps_per_sec", "gpu_mem_gb", "gpu_max_mem_gb"):
        return f"perf/{name}"
    return f"metric/{name}"


class Throughput:
    """Audio seconds and steps per wall-clock second between log steps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.audio_s = 0.0
        self.steps = 0

    def add(self, audio_seconds: float) -> None:
        self.audio_s += audio_seconds

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = {"audio_sec_per_sec": self.audio_s / dt, "steps_per_sec": self.steps / dt}
        self.t0, self.audio_s, self.steps = now, 0.0, 0
        return out
