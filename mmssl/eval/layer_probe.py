"""Frozen-layer probes (SUPERB, Yang et al., 2021): a learned softmax-weighted sum of every
layer of a frozen encoder feeding a small downstream head, for ``mmssl probe``
(``mmssl.commands.probe``, whose docstring describes the command).

* :class:`LayerWeights`: ``sum_l softmax(w)_l * norm(h_l)`` over layers ``0..L`` (SUPERB's
  featurizer; s3prl layer-normalises each hidden state before weighting).
* Tasks: ``phones``, phone recognition: a per-frame head trained with CTC over the phone
  sequences of the corpus's alignments (the built-in corpus's ``align`` key; silence dropped),
  scored by phone error rate (:func:`phone_error_rate`, greedy CTC decoding); ``speaker``,
  speaker identification: the valid frames mean-pooled, a linear classifier over the training
  manifest's ``speaker`` values, cross-entropy, scored by accuracy (closed set: the evaluation
  utterances are other utterances of the training speakers).
* The encoder runs once per record (:func:`mmssl.eval.record_layers.record_layers`, batches
  of one, so no padding is ever computed); its layers are kept on the CPU (float16 by
  default) and only the probe trains.

Shape legend: B batch, T frames, C channels, L layers (``L + 1`` with the transformer's
input), N phones of one utterance, V CTC classes (phones + blank), K speakers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mmssl.data.collate import pad_sequences
from mmssl.errors import ConfigError, DataError
from mmssl.eval.cluster_quality import read_alignment
from mmssl.eval.decoders import greedy_decode
from mmssl.eval.record_layers import record_layers
from mmssl.nn.padding import masked_mean

TASKS = ("phones", "speaker")
TASK_KEY = {"phones": "align", "speaker": "speaker"}  # the manifest key each task reads
SILENCE = ""  # the alignments' name for silence (mmssl.eval.cluster_quality)
BLANK = 0  # CTC class 0; phone i of the inventory is class i + 1
UNKNOWN = -1  # a reference phone the training set never had: always an error


class LayerWeights(nn.Module):
    """Softmax-weighted sum of ``num_layers`` hidden states (SUPERB's featurizer); the weights
    start equal. ``normalize``: layer-normalise each state over channels first (no affine; a
    per-frame operation, so padded frames never change a valid one)."""

    def __init__(self, num_layers: int, normalize: bool = True) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))
        self.normalize = normalize

    def weights(self) -> Tensor:
        """``(L,)`` weights, summing to 1."""
        return self.logits.softmax(0)

    def forward(self, layers: Tensor) -> Tensor:
        """``layers (L, B, T, C)`` -> ``(B, T, C)``."""
        if layers.shape[0] != self.logits.shape[0]:
            raise ValueError(f"{layers.shape[0]} layers for {self.logits.shape[0]} weights")
        if self.normalize:
            layers = F.layer_norm(layers, layers.shape[-1:])
        return torch.einsum("l,lbtc->btc", self.weights().to(layers.dtype), layers)


def _mlp(dim: int, out: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(dim, out)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


class PhoneHead(nn.Module):
    """Per-frame CTC classifier (SUPERB's PR head is linear; ``hidden`` > 0 adds a ReLU layer):
    ``x (B, T, C)`` -> log-probabilities ``(B, T, V)``."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.proj = _mlp(dim, num_classes, hidden)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.proj(x).log_softmax(-1)


class SpeakerHead(nn.Module):
    """Mean over the valid frames, then a classifier (SUPERB's SID head):
    ``x (B, T, C)``, ``lengths (B,)`` -> logits ``(B, K)``."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.proj = _mlp(dim, num_classes, hidden)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.proj(masked_mean(x, lengths))


class Probe(nn.Module):
    """``LayerWeights`` then a head: ``layers (L, B, T, C)``, ``lengths (B,)`` -> the head's output."""

    def __init__(self, weights: LayerWeights, head: nn.Module) -> None:
        super().__init__()
        self.layer_weights = weights
        self.head = head

    def forward(self, layers: Tensor, lengths: Tensor) -> Tensor:
        return self.head(self.layer_weights(layers), lengths)


def build_probe(task: str, num_layers: int, dim: int, num_classes: int, hidden: int = 0) -> Probe:
    """The probe of ``task`` over ``num_layers`` states of ``dim`` channels; ``num_classes``:
    phones + blank, or speakers."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {task!r}")
    head = PhoneHead if task == "phones" else SpeakerHead
    return Probe(LayerWeights(num_layers), head(dim, num_classes, hidden))


# ---------------------------------------------------------------- targets and scores


def phone_sequence(alignment: Sequence[tuple[str, int, int]]) -> list[str]:
    """The phones of an alignment in time order, silence dropped (repeats kept: two equal
    phones in a row are two phones)."""
    return [name for name, _, _ in sorted(alignment, key=lambda item: item[1]) if name != SILENCE]


def phone_error_rate(hyps: Sequence[Sequence], refs: Sequence[Sequence]) -> float:
    """Edit distance (substitutions + deletions + insertions) summed over utterances, over the
    number of reference phones."""
    from torchaudio.functional import edit_distance  # lazy: torchaudio loads its extension

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise DataError("no reference phones to score")
    return sum(edit_distance(list(r), list(h)) for h, r in zip(hyps, refs)) / total


@dataclass
class Example:
    """One record: ``layers (L, T, C)`` on the CPU and its target (phone classes ``(N,)``, or a
    speaker class)."""

    id: str
    layers: Tensor
    target: Tensor


def record_targets(records: Sequence[dict], task: str, where: str) -> list[object]:
    """Each record's raw target: its phone sequence, or its speaker. ``DataError`` naming the
    manifest ``where`` and the key when a record lacks it."""
    key = TASK_KEY[task]
    out: list[object] = []
    for record in records:
        value = record.get(key)
        if value in (None, ""):
            raise DataError(
                f"{where}: record {record.get('id')!r} has no {key!r} key, which --task {task} needs"
                + (" (phone alignments, as `mmssl synth` writes them)" if task == "phones" else "")
            )
        out.append(phone_sequence(read_alignment(value)[0]) if task == "phones" else str(value))
    return out


def inventory(train_targets: Sequence[object], task: str) -> list[str]:
    """Sorted phone or speaker names of the training targets (phone ``i`` is CTC class ``i + 1``)."""
    names: set[str] = set()
    for target in train_targets:
        names.update(target if task == "phones" else [target])  # type: ignore[arg-type]
    return sorted(names)


def encode_target(target: object, names: Sequence[str], task: str) -> Tensor | None:
    """Class ids of a target: phones -> ``(N,)`` (``UNKNOWN`` for a phone not in ``names``);
    a speaker -> ``()``, or None for a speaker not in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    if task == "phones":
        return torch.tensor([index[p] + 1 if p in index else UNKNOWN for p in target], dtype=torch.long)  # type: ignore[union-attr]
    return torch.tensor(index[target]) if target in index else None


def layer_examples(
    encoder,
    records: Sequence[dict],
    targets: Sequence[Tensor],
    device: torch.device,
    modalities: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    desc: str = "layers",
    progress: bool = True,
    dtype: torch.dtype = torch.float16,
) -> list[Example]:
    """The ``layers`` (default all, ``0..L``) of the frozen ``encoder`` (eval mode, on ``device``)
    for each record, stored as ``dtype`` on the CPU, with its target."""
    out = []
    for record, target in zip(tqdm(records, desc=desc, unit="utt", disable=not progress), targets):
        upto = None if layers is None else max(layers)
        result = record_layers(encoder, record, device, modalities, upto=upto)
        chosen = result.layers if layers is None else [result.layers[i] for i in layers]
        out.append(Example(str(record["id"]), torch.stack(chosen).to("cpu", dtype), target))
    return out


# ---------------------------------------------------------------- training and evaluation


def collate_layers(examples: Sequence[Example]) -> tuple[Tensor, Tensor]:
    """``B`` examples -> ``layers (L, B, T, C)`` float32 zero-padded and ``lengths (B,)``."""
    x, lengths = pad_sequences([e.layers.float().transpose(0, 1) for e in examples])  # (B, T, L, C)
    return x.permute(2, 0, 1, 3), lengths


def probe_loss(probe: Probe, task: str, examples: Sequence[Example], device: torch.device) -> Tensor:
    """CTC (phones; blank 0, mean over utterances of the loss per target phone) or
    cross-entropy (speaker) of a batch."""
    layers, lengths = collate_layers(examples)
    layers, lengths = layers.to(device), lengths.to(device)
    out = probe(layers, lengths)
    if task == "speaker":
        return F.cross_entropy(out, torch.stack([e.target for e in examples]).to(device))
    targets = torch.cat([e.target for e in examples]).to(device)
    target_lens = torch.tensor([e.target.numel() for e in examples], device=device)
    return F.ctc_loss(out.transpose(0, 1), targets, lengths, target_lens, blank=BLANK, zero_infinity=True)


def fit(
    probe: Probe,
    task: str,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    report_every: int = 50,
) -> list[float]:
    """Train ``probe`` (only its parameters are in ``optimizer``) for ``steps`` random batches of
    ``batch_size`` examples (reshuffled each pass). Returns the loss of every step; the
    progress bar shows it every ``report_every`` steps (the only host syncs of the loop)."""
    if not examples:
        raise DataError("no training examples")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[Tensor] = []
    probe.train()
    bar = tqdm(range(steps), desc=f"probe {task}", unit="step", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        loss = probe_loss(probe, task, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if progress and (step + 1) % report_every == 0:
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}", refresh=False)
    probe.eval()
    return torch.stack(losses).cpu().tolist() if losses else []


@torch.no_grad()
def evaluate(
    probe: Probe, task: str, examples: Sequence[Example], device: torch.device, batch_size: int = 16
) -> dict[str, float]:
    """``{"per", "phones"}`` (greedy CTC decoding) or ``{"accuracy"}`` over ``examples``, with
    ``"utterances"``."""
    if not examples:
        raise DataError("no evaluation examples")
    probe.eval()
    hyps: list[list[int]] = []
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        layers, lengths = collate_layers(batch)
        out = probe(layers.to(device), lengths.to(device))
        if task == "phones":
            hyps += greedy_decode(out, lengths)
        else:
            predicted = out.argmax(-1).cpu()
            correct += int((predicted == torch.stack([e.target for e in batch])).sum())
    if task == "phones":
        refs = [e.target.tolist() for e in examples]
        return {
            "per": phone_error_rate(hyps, refs),
            "phones": sum(len(r) for r in refs),
            "utterances": len(examples),
        }
    return {"accuracy": correct / len(examples), "utterances": len(examples)}


def holdout_split(records: Sequence[dict], fraction: float, key: str | None = None) -> tuple[list, list]:
    """``(train, held out)``: the last ``fraction`` (rounded, at least one) of the records of each
    value of ``key`` (each speaker: speaker identification is closed-set), or of all records
    when ``key`` is None; a group of one record stays in training. Manifest order is kept."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--holdout must be between 0 and 1; got {fraction}")
    groups: dict[object, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.get(key) if key else None, []).append(i)
    held: set[int] = set()
    for members in groups.values():
        if len(members) > 1:
            count = min(len(members) - 1, max(1, round(fraction * len(members))))
            held.update(members[-count:])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )
