"""All-at-once merges in the engine: check each expert as it arrives, merge them all together.

A method that is not continual (:class:`~hf_merge.merging.methods.base.AllAtOnceMethod`: Iso-CTS,
WUDI) needs every expert's tensor to compute one merged tensor. :class:`AllAtOnceSteps`, a part of
:class:`~hf_merge.merging.engine.ContinualMerger`, checks each added expert exactly as a continual
step would (tensor names, shapes, config; the caller resolves and prefetches it the same way), keeps
its source, and when the last one is added (``final=True``) or at ``flush()`` merges them all in one
pass over the merged names: per name, θ0 and that one tensor of every expert are read, so never a
whole expert model is resident. The output is written once, and the lineage lists every expert at its
position, as a continual merge of the same experts would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_merge.errors import NotContinualError
from hf_merge.hub.sources import ModelSource
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.lora_checkpoint import lineage_record, open_expert
from hf_merge.log import get_logger
from hf_merge.merging.methods.base import AllAtOnceMethod
from hf_merge.merging.step_results import StepResult
from hf_merge.merging.tuning import StepTuner, record_tuning

if TYPE_CHECKING:
    from hf_merge.merging.methods import MergeMethod
    from hf_merge.merging.state import MergeState
    from hf_merge.merging.step_writer import PendingWrite, StepWriter

logger = get_logger(__name__)


class AllAtOnceSteps:
    """The engine's all-at-once path (mixed into :class:`~hf_merge.merging.engine.ContinualMerger`)."""

    # provided by the engine
    method: MergeMethod
    state: MergeState
    steps: list[StepResult]
    names: list[str]
    output_dir: Path
    allow_pickle: bool
    base: Checkpoint
    base_source: ModelSource
    writer: StepWriter
    _pending: PendingWrite | None
    tuner: StepTuner | None

    #: Experts checked and waiting for the merge, in order, each with what the lineage says of it
    #: as an adapter (``{}`` for a full checkpoint).
    _gathered: list[tuple[ModelSource, dict[str, Any]]]

    def _open(self, source: ModelSource) -> Checkpoint:
        return open_expert(source.path, source.name, self.base, self.base_source, self.allow_pickle)

    def _check_expert(self, checkpoint: Checkpoint, source: ModelSource) -> None:  # pragma: no cover - engine's
        raise NotImplementedError

    def _cancel_pending(self) -> None:  # pragma: no cover - engine's
        raise NotImplementedError

    def _gather(self, source: ModelSource, *, final: bool) -> StepResult:
        """Check ``source`` and keep it for the merge; merge every kept expert when ``final``."""
        if self.state.step:
            raise NotContinualError(
                f"{self.output_dir} was merged with '{self.state.method}', which merges every expert at once: "
                "it cannot take one more; re-run `hf-merge merge` with all the experts"
            )
        started = time.perf_counter()
        with self._open(source) as checkpoint:  # a LoRA adapter reads as the model it stands for
            self._check_expert(checkpoint, source)
            adapter = lineage_record(checkpoint)
        self._gathered.append((source, adapter))
        result = StepResult(len(self._gathered), source, time.perf_counter() - started, 0.0, {})
        self.steps.append(result)
        logger.info("checked %s (expert %d); %s merges every expert at once, after the last",
                    source.name, result.step, self.state.method)
        if final:
            self.flush()
        return result

    def flush(self) -> None:  # pragma: no cover - engine's
        raise NotImplementedError

    def _merge_gathered(self) -> None:
        """Merge every gathered expert at once into the method's buffer (the step is written by the
        caller). If it fails (an expert holds NaN, Ctrl-C), nothing was written and the gathered
        experts are dropped: the merge is back before its first expert."""
        gathered, self._gathered = self._gathered, []
        sources = [source for source, _ in gathered]
        method = self.method
        assert isinstance(method, AllAtOnceMethod)
        started = time.perf_counter()
        if self._pending is None and self.writer.writes:
            self._pending = self.writer.start(self.names, method.output)
        method.ready = self._pending.ready if self._pending is not None else None
        try:
            def run() -> dict[str, Any]:
                return merge_experts(method, sources, self.names, opener=self._open)

            metrics = self.tuner.merge_all(method, run, len(sources)) if self.tuner else run()
        except BaseException:
            self._cancel_pending()
            method.buffer = {}
            self.steps = [s for s in self.steps if s.step <= self.state.step]
            raise
        finally:
            method.ready = None
        seconds = time.perf_counter() - started
        self.state.step = len(sources)
        self.state.lineage.extend({**source.to_dict(), "step": i, **adapter}
                                  for i, (source, adapter) in enumerate(gathered, start=1))
        self.state.method_state = method.state_dict()
        record_tuning(self.state, self.tuner, method)
        if self.steps:
            self.steps[-1].merge_seconds += seconds
            self.steps[-1].metrics = metrics
        logger.info("merged %d experts at once with %s in %.2fs", len(sources), self.state.method, seconds)


def merge_experts(method: AllAtOnceMethod, sources: list[ModelSource], names: list[str], *,
                  opener: Callable[[ModelSource], Checkpoint]) -> dict[str, Any]:
    """Open every expert lazily (each checked for NaN and Inf as its tensors are read) and let
    ``method`` merge them, name by name."""
    with ExitStack() as stack:
        checkpoints = []
        for source in sources:
            checkpoint = stack.enter_context(opener(source))
            checkpoint.require_finite(names, source.name)
            checkpoints.append(checkpoint)
        return method.merge_all(checkpoints)
