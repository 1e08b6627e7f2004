"""Processes and devices for the merge, through ``accelerate.PartialState``.

The same code runs in one process or under ``accelerate launch``: heavy per-tensor work (OPCM's
SVDs) is split across processes with ``split_between_processes``, every process receives every
result (a broadcast from the process that computed it), and scalar statistics are gathered and
summed in one fixed order, so all processes hold bit-identical merged weights and any of them
could write. Only the main process writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hf_merge.errors import CheckpointError
from hf_merge.log import get_logger

logger = get_logger(__name__)

TensorFn = Callable[[str], "tuple[torch.Tensor, dict[str, float]]"]
ResultFn = Callable[[str, torch.Tensor, dict[str, float]], None]


@dataclass
class Executor:
    """Where and by whom per-tensor work runs.

    Attributes:
        device: Device for the math (tensors are moved there one at a time; storage stays on CPU).
        process_index / num_processes: This process and how many take part.
        threads: On CPU, :meth:`map` runs this many tensors at once, each single-threaded (0: torch's
            thread count; ``HF_MERGE_THREADS`` overrides). Decompositions scale poorly inside one
            call (their reductions are matrix-vector work), so two single-threaded SVDs side by side
            beat one two-threaded SVD, and single-threaded calls cannot stall on a busy machine,
            where spinning OpenMP workers waiting for a core cost 3-10x (measured on 2 shared
            cores). Results do not depend on the count: every tensor's math runs on one thread.
    """

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    _state: Any = None  # accelerate's PartialState when several processes run
    threads: int = 0

    @classmethod
    def from_accelerate(cls, device: str | torch.device | None = None) -> Executor:
        """Use ``accelerate.PartialState`` (one process unless started by ``accelerate launch``)."""
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # PartialState only goes multi-process on CPU when told it is on CPU (AcceleratorState
        # reads ACCELERATE_USE_CPU itself; PartialState does not).
        wants_cpu = device is not None and torch.device(device).type == "cpu"
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or wants_cpu or not torch.accelerator.is_available()
        state = PartialState(cpu=cpu)
        chosen = torch.device(device) if device is not None else state.device
        if chosen.type == "mps":  # float64 SVDs and some linalg kernels are unavailable there
            chosen = torch.device("cpu")
        return cls(chosen, state.process_index, state.num_processes, state)

    @classmethod
    def local(cls, device: str | torch.device = "cpu") -> Executor:
        return cls(torch.device(device))

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            self._state.wait_for_everyone()

    def cpu_workers(self) -> int:
        """How many tensors :meth:`map` computes at once in this process."""
        if self.device.type != "cpu":
            return 1
        configured = int(os.environ.get("HF_MERGE_THREADS", "0") or 0) or self.threads
        return max(configured or torch.get_num_threads(), 1)

    def map(self, names: Sequence[str], compute: TensorFn, on_result: ResultFn) -> None:
        """Run ``compute(name)`` over ``names`` split across processes (and, on CPU, threads);
        ``on_result`` sees every name's result, in the order of ``names``, on every process."""
        workers = self.cpu_workers()
        if self.num_processes == 1 and workers > 1:
            with _single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
                # a bounded window, so finished results waiting for an earlier name stay few
                pending = [pool.submit(compute, name) for name in names[:workers * 2]]
                for i, name in enumerate(names):
                    tensor, stats = pending[i].result()
                    pending[i] = None  # type: ignore[call-overload]
                    if i + workers * 2 < len(names):
                        pending.append(pool.submit(compute, names[i + workers * 2]))
                    on_result(name, tensor, stats)
            return
        if self.num_processes == 1:
            for name in names:
                tensor, stats = compute(name)
                on_result(name, tensor, stats)
            return
        from accelerate.utils import gather_object

        state = self._state
        with state.split_between_processes(list(names)) as mine:
            mine = list(mine)
        local = {}
        failure: tuple[bool, str] | None = None
        try:
            for name in mine:
                local[name] = compute(name)
        except Exception as err:  # every process must learn of it, or the others wait forever below
            failure = (isinstance(err, CheckpointError), f"{err}")
            raised = err
        failures = [f for f in gather_object([failure]) if f is not None]
        if failure is not None:
            raise raised
        if failures:
            is_checkpoint_error, message = failures[0]
            raise (CheckpointError if is_checkpoint_error else RuntimeError)(message)
        owners: dict[str, int] = {}
        for rank, chunk in enumerate(gather_object([mine])):
            for name in chunk:
                owners[name] = rank
        stats_all: dict[str, dict[str, float]] = {}
        for chunk in gather_object([{n: s for n, (_, s) in local.items()}]):
            stats_all.update(chunk)
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for chunk in gather_object([{n: (tuple(t.shape), t.dtype) for n, (t, _) in local.items()}]):
            shapes.update(chunk)
        for name in names:
            owner = owners[name]
            if owner == self.process_index:
                tensor = local.pop(name)[0].to(self.device).contiguous()
            else:
                shape, dtype = shapes[name]
                tensor = torch.empty(shape, dtype=dtype, device=self.device)
            torch.distributed.broadcast(tensor, src=owner)
            on_result(name, tensor.cpu(), stats_all[name])


@contextmanager
def _single_threaded_ops():
    """torch's intra-op pool at one thread for the duration (it is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
