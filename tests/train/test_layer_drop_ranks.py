"""LayerDrop under FSDP2: two CPU processes (gloo) skip the same transformer layers at every
step, although their batches (and so their CPU dropout draws) differ."""

import json
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from mmssl.nn.padding import masked_mean
from mmssl.nn.transformer import build_transformer
from mmssl.objectives.base import Objective
from mmssl.train.distributed import DistEnv, wrap_model
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream
from tests.train.toy import FRAME, ToyBatchSampler, toy_collate, toy_dataset

LAYERS = 4


class DropObjective(Objective):
    """Frames of 40 samples -> linear -> a transformer with LayerDrop and dropout -> pooled
    regression onto a fixed projection. Records which layers ran at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FRAME, 8)
        self.transformer = build_transformer(
            8, LAYERS, 2, 16, dropout=0.2, attention_dropout=0.2, layer_drop=0.5, pos_conv_kernel=0
        )
        self.register_buffer("target_proj", torch.randn(FRAME, 8, generator=torch.Generator().manual_seed(0)))
        self.ran: list[int] = []
        self.steps: list[list[int]] = []
        for index, layer in enumerate(self.transformer.layers):
            layer.register_forward_pre_hook(lambda _module, _args, i=index: self.ran.append(i))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        audio, lens = batch["audio"], batch["audio_lens"]
        b, s = audio.shape
        frames = audio[:, : s // FRAME * FRAME].reshape(b, s // FRAME, FRAME)  # (B, T, C)
        lengths = torch.div(lens, FRAME, rounding_mode="floor")
        hidden = self.transformer(self.proj(frames), lengths).hidden
        loss = (masked_mean(hidden, lengths) - masked_mean(frames, lengths) @ self.target_proj).pow(2).mean()
        return {"loss": loss, "mse_loss": loss.detach()}

    def on_step(self, step: int) -> None:
        self.steps.append(sorted(self.ran))
        self.ran.clear()


def _train_rank(rank, run_dir):
    torch.set_num_threads(1)
    # ranks that ran different layers would wait on each other's collectives: fail, not hang
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        env = DistEnv(rank, 2, rank)
        torch.manual_seed(0)
        objective = DropObjective()
        model = wrap_model(objective, env, torch.device("cpu"), "fsdp")
        data = toy_dataset()
        stream = BatchStream(
            data, ToyBatchSampler(len(data), 2, rank=rank, world_size=2), toy_collate, rank=rank
        )
        opts = LoopOptions(max_steps=8, log_every=4, save_every=1000, progress=False)
        trainer = Trainer(
            objective,
            build_adamw(model, lr=1e-3),
            Schedule(peak_lr=1e-3, total_steps=8),
            stream,
            opts,
            run_dir,
            device=torch.device("cpu"),
            env=env,
            model=model,
        )
        trainer.fit()
        (run_dir / f"layers{rank}.json").write_text(json.dumps(objective.steps))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_ranks_skip_the_same_layers_every_step(tmp_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tests.train.toy"])
    mp.start_processes(_train_rank, args=(tmp_path,), nprocs=2, start_method="forkserver")
    ranks = [json.loads((tmp_path / f"layers{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == 8
    assert ranks[0] == ranks[1]
    # layers are dropped, not all of them every time, and the choice changes from step to step
    assert any(len(ran) < LAYERS for ran in ranks[0]) and any(ran for ran in ranks[0])
    assert len({tuple(ran) for ran in ranks[0]}) > 1
