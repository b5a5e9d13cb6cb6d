"""Utterance mixing (WavLM, Chen et al., 2022, sec. 3.2): a batch augmentation run in the data
workers before masking. With probability 0.2 an utterance gets a segment of another utterance
of the batch added on top of it, at an energy ratio drawn uniformly in [-5, 5] dB; the segment
is at most half as long as the primary utterance, so the primary speaker stays dominant and
the targets remain the primary's. Mixing happens only in the batch hook: a batch that did not
go through it is used unmixed.

Shape legend: B batch, S samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmssl.errors import ConfigError
from mmssl.nn.masking import hook_generator


@dataclass
class UtteranceMixer:
    """Batch hook: overlap segments of other utterances onto ``audio (B, S)`` (into a new tensor).

    For each utterance (``audio_lens`` valid samples), with probability ``prob``: pick another
    utterance of the batch, a mixing length ``m`` uniform in [1, ``max_fraction`` x length]
    (clipped to the other utterance's length), a random segment of ``m`` samples of the other
    utterance and a random place in the primary, and add the segment scaled so that the
    primary's mean power over the secondary segment's is ``10 ** (r / 10)``, ``r`` uniform in
    ``energy_db`` (the source segment is taken from the unmixed batch). Padding is untouched.
    Adds ``mixed (B,)`` bool. Picklable and stateless: draws from ``hook_generator(seed)``, a
    pure function of the batch position the batch stream seeded.
    """

    prob: float = 0.2  # WavLM, sec. 3.2
    max_fraction: float = 0.5  # mixing segment <= half the primary utterance
    energy_db: tuple[float, float] = (-5.0, 5.0)  # energy ratio range in dB
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0 or not 0.0 < self.max_fraction <= 1.0:
            raise ConfigError(
                f"utterance mixing: prob must be in [0, 1] and max_fraction in (0, 1]; "
                f"got {self.prob}, {self.max_fraction}"
            )
        self.energy_db = tuple(self.energy_db)  # type: ignore[assignment]

    def _int(self, low: int, high: int, g: torch.Generator) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=g))

    def __call__(self, batch: dict) -> dict:
        audio, lens = batch["audio"], batch["audio_lens"].tolist()
        g = hook_generator(self.seed)
        source = audio.clone()
        mixed = torch.zeros(len(lens), dtype=torch.bool)
        out = audio.clone()
        for i, n in enumerate(lens):
            others = [j for j, m in enumerate(lens) if j != i and m > 0]
            if n < 2 or not others or float(torch.rand(1, generator=g)) >= self.prob:
                continue
            j = others[self._int(0, len(others) - 1, g)]
            size = min(self._int(1, max(1, int(n * self.max_fraction)), g), lens[j])
            src = self._int(0, lens[j] - size, g)
            dst = self._int(0, n - size, g)
            segment = source[j, src : src + size]
            ratio_db = self.energy_db[0] + (self.energy_db[1] - self.energy_db[0]) * float(
                torch.rand(1, generator=g)
            )
            primary_power = source[i, :n].pow(2).mean()
            segment_power = segment.pow(2).mean().clamp(min=1e-10)
            scale = torch.sqrt(primary_power / (segment_power * 10 ** (ratio_db / 10)))
            out[i, dst : dst + size] += scale * segment
            mixed[i] = True
        batch["audio"], batch["mixed"] = out, mixed
        return batch
