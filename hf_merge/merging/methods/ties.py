"""Continual TIES merging: M_1 = θ0 + λ·τ_1, then M_t = M_{t−1} + λ·TIES(M_{t−1} − θ0, τ_t).

TIES of two task vectors: keep each vector's top ``threshold`` fraction of entries by magnitude
(the cut is over the whole model, as the reference flattens the state dict), elect a sign per entry
from the sum of what is kept (zeros take the model-wide majority sign), then sum the kept entries
that agree with the elected sign.

A whole-model cut would need every magnitude at once. Instead its exact value is found by a radix
select over float32 bit patterns (non-negative floats sort like their bits): one pass histograms
the high 16 bits, a second the low 16 bits inside the chosen bucket, so memory stays at one tensor
plus two small histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, Parameter

_HIGH_BINS = 1 << 15  # sign bit is 0 for magnitudes
_LOW_BINS = 1 << 16


def _magnitude_bits(groups: Iterator[tuple[torch.Tensor, ...]], batch: int = 1 << 20) -> Iterator[list[torch.Tensor]]:
    """|x| as int32 bit patterns, per stream; small tensors are batched so each histogram call has
    real work, large ones pass alone (a batch is a copy: it bounds the memory a pass holds)."""
    pending: list[list[torch.Tensor]] = []
    size = 0
    for group in groups:
        bits = [tensor.abs().to(torch.float32).reshape(-1).view(torch.int32) for tensor in group]
        if group[0].numel() >= batch:
            yield bits
            continue
        if not pending:
            pending = [[] for _ in group]
        for bucket, tensor in zip(pending, bits, strict=False):
            bucket.append(tensor)
        size += group[0].numel()
        if size >= batch:
            yield [torch.cat(bucket) for bucket in pending]
            pending, size = [], 0
    if pending:
        yield [torch.cat(bucket) for bucket in pending]


def kth_smallest_magnitudes(groups: Callable[[], Iterator[tuple[torch.Tensor, ...]]], k: int) -> list[float]:
    """Exact k-th smallest |x| (1-based) of each stream of tensors, all streams in the same two
    passes: ``groups()`` yields one tuple of same-size tensors per name."""
    high: list[torch.Tensor] = []
    for bits_all in _magnitude_bits(groups()):
        if not high:
            high = [torch.zeros(_HIGH_BINS, dtype=torch.int64) for _ in bits_all]
        for hist, bits in zip(high, bits_all, strict=False):
            hist += torch.bincount(bits >> 16, minlength=_HIGH_BINS).cpu()
    buckets, below = [], []
    for hist in high:
        cumulative = hist.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(k)))
        buckets.append(bucket)
        below.append(int(cumulative[bucket - 1]) if bucket > 0 else 0)
    low = [torch.zeros(_LOW_BINS, dtype=torch.int64) for _ in high]
    for bits_all in _magnitude_bits(groups()):
        for hist, bits, bucket in zip(low, bits_all, buckets, strict=False):
            inside = bits[(bits >> 16) == bucket] & 0xFFFF
            hist += torch.bincount(inside, minlength=_LOW_BINS).cpu()
    values = []
    for hist, bucket, before in zip(low, buckets, below, strict=False):
        offset = int(torch.searchsorted(hist.cumsum(0), torch.tensor(k - before)))
        values.append(float(torch.tensor([(bucket << 16) | offset], dtype=torch.int32).view(torch.float32)))
    return values


def kth_smallest_magnitude(tensors: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """Exact k-th smallest |x| (1-based) over all tensors ``tensors()`` yields, in two passes."""
    return kth_smallest_magnitudes(lambda: ((t,) for t in tensors()), k)[0]


class ContinualTies(MergeMethod):
    """TIES merging of the merged task vector with each new one, scaled by ``scaling_factor``."""

    name = "ties"
    display_name = "TIES"
    paper = "https://arxiv.org/abs/2306.01708"
    summary = "Trims each task vector to its largest entries, elects a sign per entry, sums what agrees."
    card_title = "continual TIES-merging"
    description = (
        "TIES-merging trims task vectors to their largest entries, elects a sign per weight and "
        "adds the agreeing values ([Yadav et al., 2023, "
        "arXiv:2306.01708](https://arxiv.org/abs/2306.01708))."
    )
    parameters = (
        # No tune grid: λ enters the next step's TIES (M − θ0 is trimmed and votes on signs), so it
        # cannot be rescaled away as task arithmetic's can, and choosing it greedily at every step
        # scored 32.5 % on the offline zoo against 42.9 % for a fixed λ (benchmarks/results/merge_quality.md).
        Parameter("scaling_factor", 0.3, "λ, the scale of the merged task vector.", flags=("--scaling", "--lambda")),
        Parameter("threshold", 0.2, "Fraction of task-vector entries kept, in (0, 1] (or a percentage up to 100).",
                  minimum=0.0, maximum=100.0, exclusive_minimum=True, flags=("--keep",)),
    )

    def _keep_fraction(self) -> float:
        threshold = float(self.hyperparameters["threshold"])
        return threshold / 100 if threshold > 1 else threshold

    def _deltas(self, expert: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        theta0 = self._math(self.context.base.get(name))
        return self._math(self.buffer[name]) - theta0, self._math(expert.get(name)) - theta0

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        lam = float(self.hyperparameters["scaling_factor"])
        names = self.context.names
        if self.step_count == 1:
            for name in names:
                _, tau = self._deltas(expert, name)
                if tau.any():
                    self._assign(name, self._math(self.buffer[name]).add_(tau.mul_(lam)))
                self._done(name)
            return {}

        count = sum(self.buffer[n].numel() for n in names)
        k = max(count - int(count * self._keep_fraction()), 1)
        cut_merged, cut_task = kth_smallest_magnitudes(lambda: (self._deltas(expert, n) for n in names), k)

        def trimmed(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            delta, tau = self._deltas(expert, name)  # fresh tensors: trimmed in place
            return delta.mul_(delta.abs() >= cut_merged), tau.mul_(tau.abs() >= cut_task)

        votes = 0
        for name in names:
            delta, tau = trimmed(name)
            votes += int(torch.sign(delta + tau).sum(dtype=torch.int64))
        majority = float(torch.sign(torch.tensor(votes)))

        for name in names:
            delta, tau = trimmed(name)
            sign = torch.sign(delta + tau)
            sign[sign == 0] = majority
            agreed = delta.mul_(torch.where(sign > 0, delta > 0, delta < 0))
            agreed.add_(tau.mul_(torch.where(sign > 0, tau > 0, tau < 0)))
            if agreed.any():
                self._assign(name, self._math(self.buffer[name]).add_(agreed.mul_(lam)))
            self._done(name)
        return {"cut_merged": cut_merged, "cut_task": cut_task}
