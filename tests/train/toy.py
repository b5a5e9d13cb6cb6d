"""A tiny objective, dataset and batch sampler for the trainer's tests (kept out of the
global registries)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mmssl.nn.padding import masked_mean
from mmssl.objectives.base import Objective
from mmssl.train.distributed import DistEnv
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream

FRAME = 40  # samples per frame of the toy objective


class NoiseHook:
    """Adds a random ``noise (B, 4)`` tensor, as a masking hook would add a random mask."""

    def __call__(self, batch: dict) -> dict:
        batch["noise"] = torch.randn(batch["audio"].shape[0], 4)
        return batch


class ToyObjective(Objective):
    """Regress a fixed projection of each utterance's mean frame from the mean frame.

    Uses dropout (global RNG in forward), a hook tensor, a frozen EMA copy (``on_step``), an
    embedding and a norm (parameter groups). The loss is a mean over utterances. Records the
    steps ``set_step`` and ``on_step`` were called with.
    """

    def __init__(self, dropout: float = 0.1, noise: float = 0.01, nan_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(FRAME)
        self.same_norm = self.norm  # one module under two names, as objectives share parts
        self.proj = nn.Linear(FRAME, 8)
        self.emb = nn.Embedding(2, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8)])  # FSDP2 shards ModuleList children
        self.head = nn.Linear(8, 4)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("target_proj", torch.randn(FRAME, 4, generator=g))
        self.ema = nn.Linear(FRAME, 8)
        self.ema.requires_grad_(False)
        self.noise = noise
        self.nan_at = set(nan_at)
        self.calls = 0
        self.steps_seen: list[int] = []
        self.steps_set: list[int] = []

    def batch_hook(self):
        return NoiseHook()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        audio, lens = batch["audio"], batch["audio_lens"]
        b, s = audio.shape
        frames = audio[:, : s // FRAME * FRAME].reshape(b, s // FRAME, FRAME)  # (B, T, C)
        pooled = masked_mean(frames, torch.div(lens, FRAME, rounding_mode="floor"))  # (B, C)
        noise = batch["noise"] if "noise" in batch else torch.zeros(b, 4, device=audio.device)
        h = self.drop(torch.tanh(self.proj(self.norm(pooled)))) + self.emb.weight[0]
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        pred = self.head(h) + self.noise * noise
        target = pooled @ self.target_proj
        per_utt = ((pred - target) ** 2).mean(-1)  # (B,)
        mse = per_utt.mean()
        self.calls += 1
        if self.calls in self.nan_at:
            mse = mse * float("nan")
        gap = (self.ema.weight - self.proj.weight).abs().mean()
        return {"loss": mse, "mse_loss": mse, "ema_gap": gap}

    def set_step(self, step: int) -> None:
        self.steps_set.append(step)

    def on_step(self, step: int) -> None:
        self.steps_seen.append(step)
        with torch.no_grad():
            self.ema.weight.lerp_(self.proj.weight, 0.5)


def toy_dataset(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 20, (1,), generator=g)) * FRAME
        out.append({"audio": torch.randn(length, generator=g), "id": f"u{i}"})
    return out


def toy_collate(items: list[dict | None]) -> dict | None:
    items = [it for it in items if it is not None]
    if not items:
        return None
    lens = torch.tensor([len(it["audio"]) for it in items])
    audio = torch.zeros(len(items), int(lens.max()))
    for i, it in enumerate(items):
        audio[i, : len(it["audio"])] = it["audio"]
    return {"audio": audio, "audio_lens": lens, "ids": [it["id"] for it in items]}


class ToyBatchSampler:
    """Shuffled fixed-size batches; each global batch of ``batch_size * world_size`` indices is
    split into rank slices, so ranks together see what one process sees with the whole batch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.offset = 0, 0

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        size = self.batch_size * self.world_size
        full = [order[i : i + size] for i in range(0, self.n - size + 1, size)]
        lo = self.rank * self.batch_size
        return [b[lo : lo + self.batch_size] for b in full]

    def __iter__(self):
        batches = self._batches()[self.offset :]
        self.offset = 0
        yield from batches

    def __len__(self) -> int:
        return len(self._batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def make_trainer(
    run_dir: Path,
    *,
    max_steps: int = 6,
    batch_size: int = 4,
    env: DistEnv = DistEnv(),
    strategy: str = "none",
    num_workers: int = 0,
    dropout: float = 0.1,
    noise: float = 0.01,
    nan_at: tuple[int, ...] = (),
    callbacks=(),
    device: str = "cpu",
    **options,
) -> Trainer:
    """A trainer over the toy task with the same initial weights in every process."""
    torch.manual_seed(0)
    objective = ToyObjective(dropout=dropout, noise=noise, nan_at=nan_at).to(device)
    model = objective
    if env.enabled:
        from mmssl.train.distributed import wrap_model

        model = wrap_model(objective, env, torch.device("cpu"), strategy)
    optimizer = build_adamw(model, lr=3e-2, weight_decay=0.1)
    opts = LoopOptions(
        max_steps=max_steps, **{"log_every": 1, "save_every": 1000, "progress": False, **options}
    )
    schedule = Schedule(peak_lr=3e-2, total_steps=max_steps, kind="linear", warmup_steps=2)
    data = toy_dataset()
    sampler = ToyBatchSampler(len(data), batch_size, rank=env.rank, world_size=env.world_size)
    stream = BatchStream(
        data,
        sampler,
        toy_collate,
        hook=objective.batch_hook(),
        num_workers=num_workers,
        seed=0,
        rank=env.rank,
    )
    return Trainer(
        objective,
        optimizer,
        schedule,
        stream,
        opts,
        run_dir,
        device=torch.device(device),
        env=env,
        model=model,
        callbacks=callbacks,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def params(objective: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in objective.state_dict().items()}
