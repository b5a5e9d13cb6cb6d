"""One training loop for every objective.

The loop knows objectives only through ``mmssl.objectives.base.Objective``: ``forward(batch)``
-> ``{"loss", "*_loss", metrics}``, ``set_step(step)`` before and ``on_step(step)`` after each
optimizer step. Everything else (optimizer, schedule, batch stream, distributed wrapper) is
built outside and passed in.

Per optimizer step the host never waits for the device: loss parts are summed on the device
and read at log steps only; a step whose loss or gradient norm is not finite is skipped inside
the fused AdamW kernel (``found_inf``, the mechanism ``torch.amp.GradScaler`` uses), counted
on the device, and the count is checked against ``max_nonfinite_steps`` at log steps.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from mmssl import runs
from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError, MmsslError
from mmssl.files import read_text, write_text
from mmssl.objectives.base import Objective
from mmssl.train import checkpoint as ckpt
from mmssl.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    is_sharded,
    load_full_into_shards,
    set_grad_sync,
)
from mmssl.train.logging import MetricWindow, RunLogger, Throughput
from mmssl.train.optim import Schedule
from mmssl.train.stream import BatchStream, batch_seed, to_device

StepCallback = Callable[[int], None]


class NonFiniteLossError(MmsslError):
    """Too many steps had a NaN or infinite loss or gradient."""


@dataclass
class LoopOptions:
    """Plain options of ``Trainer`` (the ``train:`` config section maps onto these)."""

    max_steps: int
    log_every: int = 10
    save_every: int = 500
    valid_every: int = 0  # 0: no validation
    grad_clip: float = 0.0  # max global L2 norm; 0 turns clipping off (the norm is still logged)
    accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "bf16"  # bf16: autocast on CUDA (fp32 weights); fp32: no autocast
    max_nonfinite_steps: int = 100
    keep_checkpoints: int = 3  # newest checkpoint folders kept; 0 keeps all
    progress: bool = True
    seed: int = 0


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class Trainer:
    """Runs ``objective`` (maybe wrapped in DDP/FSDP as ``model``) for ``opts.max_steps``
    optimizer steps, logging to and checkpointing in ``run_dir``."""

    def __init__(
        self,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        stream: BatchStream,
        opts: LoopOptions,
        run_dir: Path,
        *,
        device: torch.device,
        env: DistEnv = DistEnv(),
        model: nn.Module | None = None,
        valid_stream: BatchStream | None = None,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        self.model = model if model is not None else objective
        self.objective = objective
        self.optimizer, self.schedule, self.stream, self.opts = optimizer, schedule, stream, opts
        self.valid_stream, self.callbacks = valid_stream, list(callbacks)
        self.run_dir, self.device, self.env = Path(run_dir), device, env
        self.ckpt_dir = self.run_dir / runs.CHECKPOINTS
        self.step = 0
        self.nonfinite = torch.zeros((), device=device)
        self.fused = all(g.get("fused") for g in optimizer.param_groups)
        use_bf16 = opts.precision == "bf16" and device.type == "cuda"
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )

    # ---------------------------------------------------------------- checkpoints
    def _state_dicts(self) -> tuple[dict, dict]:
        """The objective's and the optimizer's full state, on rank 0 (empty elsewhere).

        FSDP2 shards are gathered with ``torch.distributed.checkpoint.state_dict`` (a collective,
        keys by parameter name); unsharded models use their own ``state_dict`` (DDP replicas
        are identical, so rank 0 alone copies them).
        """
        if is_sharded(self.model):
            model_state = get_model_state_dict(self.model, options=_full_options())
            return model_state, get_optimizer_state_dict(self.model, self.optimizer, options=_full_options())
        if not self.env.is_main:
            return {}, {}
        return self.objective.state_dict(), self.optimizer.state_dict()

    def _load_state_dicts(self, weights: dict, optim_state: dict) -> None:
        if is_sharded(self.model):
            load_full_into_shards(self.model, weights)
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=options)
            return
        self.objective.load_state_dict(weights)
        self.optimizer.load_state_dict(optim_state)

    def save(self) -> None:
        """Collective: every rank takes part (FSDP gathers full tensors); rank 0 writes."""
        model_state, optim_state = self._state_dicts()
        folder = self.ckpt_dir / runs.step_dir_name(self.step)
        if self.env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        # each rank's own position in its data shard and its generators
        mine = {"data": self.stream.state_dict(), "rng": ckpt.capture_rng()}
        ckpt.save_state(mine, folder / ckpt.rank_file(self.env.rank))
        if self.env.is_main:
            runs.save_weights(model_state, folder / runs.MODEL_FILE)
            state = {
                "step": self.step,
                "optimizer": optim_state,
                "schedule": self.schedule.state_dict(),
                "nonfinite": self.nonfinite.cpu(),
                "world_size": self.env.world_size,
            }
            ckpt.save_state(state, folder / runs.STATE_FILE)
        barrier(self.env)  # every rank's file is on disk before `latest` moves
        if self.env.is_main:
            ckpt.write_latest(self.ckpt_dir, folder.name)
            ckpt.prune(self.ckpt_dir, self.opts.keep_checkpoints)
        barrier(self.env)

    def resume(self) -> bool:
        """Load the latest complete checkpoint, if any; True when one was loaded."""
        folder = runs.latest_step_dir(self.ckpt_dir)
        if folder is None:
            if self.env.is_main:
                _truncate_metrics(self.run_dir / "metrics.jsonl", 0)
            return False
        weights = runs.load_weights(folder / runs.MODEL_FILE)
        state = ckpt.load_state(folder / runs.STATE_FILE)
        if runs.CONVERTED_FROM in state:  # weights without an optimizer or a data position
            raise ConfigError(
                f"--resume: {self.run_dir} was written by `mmssl convert` "
                f"(from {state[runs.CONVERTED_FROM]}); "
                "it starts runs (finetune-asr --init RUN, pretrain --init RUN), it does not resume "
                "one: train in another train.out_dir"
            )
        self._load_state_dicts(weights, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        self.nonfinite = state["nonfinite"].to(self.device)
        mine = folder / ckpt.rank_file(self.env.rank)
        if int(state["world_size"]) == self.env.world_size and mine.is_file():
            rank_state = ckpt.load_state(mine)
            self.stream.load_state_dict(rank_state["data"])
            ckpt.restore_rng(rank_state["rng"])
        else:  # another world size shards the data differently: start the next epoch afresh
            rank0 = ckpt.load_state(folder / ckpt.rank_file(0))
            self.stream.load_state_dict({"epoch": rank0["data"]["epoch"] + 1, "offset": 0})
        if self.env.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return True

    # ---------------------------------------------------------------- one step
    def _forward_backward(self, micro: list[dict]) -> dict[str, Tensor]:
        """Forward and backward over the micro-batches; returns detached outputs averaged."""
        totals: dict[str, Tensor] = {}
        n = len(micro)
        for i, batch in enumerate(micro):
            set_grad_sync(self.model, i == n - 1)
            with self.autocast():
                out = self.model(to_device(batch, self.device))
            (out["loss"] / n).backward()
            for name, value in out.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    value = value.detach().float().reshape(()) / n
                    totals[name] = totals[name] + value if name in totals else value
        set_grad_sync(self.model, True)
        return totals

    def _grad_norm(self) -> Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.opts.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.opts.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor
        return (full() if full is not None else norm).float()

    def _seed_step(self) -> None:
        """Seed the generators from (seed, step): the CPU one alike on every rank, so choices
        that must agree across ranks agree (LayerDrop skipping a layer whose shards FSDP gathers,
        or whose gradients DDP reduces); the CUDA one per rank (dropout masks on the GPU). A
        resumed run draws the same numbers as an uninterrupted one."""
        torch.manual_seed(batch_seed(self.opts.seed, 0, self.step, -2))
        if self.device.type == "cuda":
            torch.cuda.manual_seed(batch_seed(self.opts.seed, self.env.rank + 1, self.step, -2))

    def train_step(self, micro: list[dict]) -> tuple[dict[str, Tensor], Tensor]:
        """One optimizer step over ``micro`` (``accum_steps`` batches). Returns the outputs and
        a 0-dim bool tensor, True when the step was applied (finite loss and gradients)."""
        self._seed_step()
        # the objective's schedules at this step, as the learning rate below: also right for
        # the first step after a resume, which no ``on_step`` came before in this process
        self.objective.set_step(self.step)
        out = self._forward_backward(micro)
        norm = self._grad_norm()
        bad = (~torch.isfinite(norm)) | (~torch.isfinite(out["loss"]))
        if self.env.enabled:  # every rank skips together (a collective, not a host sync)
            bad = all_reduce_sum(bad.float(), self.env) > 0
        self.schedule.apply(self.optimizer)
        if self.fused:
            self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(bad):  # a non-fused optimizer: one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.advance()
        self.nonfinite += bad.float()
        out["grad_norm"] = norm
        return out, ~bad

    # ---------------------------------------------------------------- the loop
    def _micro_batches(self) -> Iterator[list[dict]]:
        batches = iter(self.stream)
        while True:
            yield [next(batches) for _ in range(self.opts.accum_steps)]

    def fit(self) -> int:
        """Train until ``max_steps``; returns the last step. Checkpoints at ``save_every`` and
        at the end; ``callbacks`` run after each step (after its checkpoint)."""
        opts = self.opts
        logger = RunLogger(self.run_dir, self.env, opts.max_steps, self.step, opts.progress)
        window, speed = MetricWindow(), Throughput()
        self.model.train()
        try:
            micro_batches = self._micro_batches()
            while self.step < opts.max_steps:
                micro = next(micro_batches)
                for batch in micro:
                    if "audio_lens" in batch:
                        speed.add(float(batch["audio_lens"].sum()) / SAMPLE_RATE)  # a CPU tensor
                out, applied = self.train_step(micro)
                self.step += 1
                self.objective.on_step(self.step)
                window.add(out, applied)
                speed.step()
                logger.advance()
                validating = (
                    bool(opts.valid_every)
                    and self.valid_stream is not None
                    and self.step % opts.valid_every == 0
                )
                if validating or self.step % opts.log_every == 0 or self.step == opts.max_steps:
                    self._log(logger, window, speed, self.validate() if validating else {})
                if self.step % opts.save_every == 0 or self.step == opts.max_steps:
                    self.save()
                for callback in self.callbacks:
                    callback(self.step)
        finally:
            logger.close()
        return self.step

    def _log(self, logger: RunLogger, window: MetricWindow, speed: Throughput, extra: dict) -> None:
        values = {**window.means(self.env), **extra}
        perf = speed.read()
        values["audio_sec_per_sec"] = float(
            all_reduce_sum(torch.tensor(perf["audio_sec_per_sec"], device=self.device), self.env)
        )
        values["steps_per_sec"] = perf["steps_per_sec"]
        values["lr"] = self.schedule.lr_at(self.step - 1)
        values["epoch"] = float(self.stream.epoch)
        bad = float(self.nonfinite)
        values["nonfinite_steps"] = bad
        values["bad_records"] = float(
            all_reduce_sum(torch.tensor(float(self.stream.skipped), device=self.device), self.env)
        )
        if self.device.type == "cuda":
            values["gpu_mem_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            values["gpu_max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        logger.log(self.step, values)
        if bad > self.opts.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{int(bad)} steps had a NaN or infinite loss or gradient by step {self.step} "
                f"(train.max_nonfinite_steps={self.opts.max_nonfinite_steps}); lower the learning "
                f"rate, set train.grad_clip, or check the data"
            )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean outputs over one pass of the validation stream, as ``valid_<name>``."""
        assert self.valid_stream is not None
        self.objective.eval()
        window = MetricWindow()
        self.valid_stream.load_state_dict({"epoch": 0, "offset": 0})
        for batch in self.valid_stream.one_epoch():
            with self.autocast():
                out = self.objective(to_device(batch, self.device))
            window.add(out)
        self.objective.train()
        return {f"valid_{k}": v for k, v in window.means(self.env).items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` by a run that died before its next checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in read_text(path).splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    write_text(path, "".join(f"{line}\n" for line in keep))
