"""The sequential merge driver: resolve → open → check → step → save state, one expert at a time.

:class:`ContinualMerger` holds the merged weights (one model's worth of memory) and reads the base
and each expert lazily. After every expert the output folder holds a complete, loadable model
(``config.json``, weights, processor and tokenizer files from the base) and ``merge_state.json``,
replaced atomically; :meth:`ContinualMerger.resume` continues from it; :func:`merge` in one call. A method
that needs every expert at once is merged by the same driver (:mod:`hf_merge.merging.all_at_once`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hf_merge.errors import CheckpointError, MergeStateError, UsageError
from hf_merge.hub.sources import ModelSource, resolve
from hf_merge.io.checkpoint import Checkpoint, SafetensorsFile
from hf_merge.io.lora_checkpoint import lineage_record, open_expert, planning_view
from hf_merge.io.validation import MergePlan, check_compatible, linear_weight_names, merged_names, plan_merge
from hf_merge.log import get_logger
from hf_merge.merging.all_at_once import AllAtOnceSteps
from hf_merge.merging.distributed import Executor
from hf_merge.merging.methods import MergeContext, MergeMethod, get_method, release_scratch
from hf_merge.merging.state import STATE_NAME, STATE_TENSORS_NAME, MergeState, recover
from hf_merge.merging.step_results import EngineResult, StepResult, call_on_step
from hf_merge.merging.step_writer import PendingWrite, StepWriter
from hf_merge.merging.tuning import StepTuner, plain_step, record_tuning

logger = get_logger(__name__)

ModelRef = str | Path | ModelSource
OnStep = Callable[[int, Path, MergeState], None]
_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ContinualMerger(AllAtOnceSteps):
    """Merge experts into a base one at a time, saving a resumable state after each.

    Args:
        base: θ0: a folder, a repo id (``org/name[@rev]``) or a :class:`ModelSource`.
        output_dir: Where the merged model and ``merge_state.json`` are written after each step.
        method: A registered method name (see :func:`hf_merge.merging.methods.available_methods`).
        scope: ``"vision"`` (vision tower + ``visual_projection``), ``"all"`` or name prefixes.
        hyperparameters: The method's hyperparameters; missing ones take their defaults.
        on_step: Called as ``on_step(step, output_dir, state)`` after each step is saved (see :func:`call_on_step`).
        device: Device for the math (default: what ``accelerate`` picks for this process).
        compute_dtype: ``"float32"`` (default) or ``"float64"``.
        max_shard_size: Largest weight file written (``"5GB"``, bytes, ...).
        tuner: Chooses the method's tuned hyperparameter at every step (``--tune``; see
            :mod:`hf_merge.merging.tuning`); its choices go into ``state.tuning``.
        checkpoint_every: Write the output after every N-th step. ``None``: 1 with ``on_step``, else
            the method's ``checkpoint_every``, with step 1 written only if it is the last (it copies or
            scales θ_1: cheaper to redo than to write). The step passed ``final=True`` to :meth:`add`,
            the last of :meth:`add_all`, and :meth:`flush` always write; a crash loses at most the
            unwritten steps, and :meth:`resume` continues from the last written one with the same
            result. ``on_step`` is called only for written steps.
    """

    def __init__(
        self,
        base: ModelRef,
        output_dir: str | Path,
        method: str = "opcm",
        *,
        scope: str | list[str] = "vision",
        hyperparameters: dict[str, Any] | None = None,
        on_step: OnStep | None = None,
        device: str | torch.device | None = None,
        compute_dtype: str = "float32",
        max_shard_size: int | str = "5GB",
        token: str | None = None,
        allow_pickle: bool = False,
        checkpoint_every: int | None = None,
        tuner: StepTuner | None = None,
        _saved: MergeState | None = None,
    ):
        started = time.perf_counter()
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise UsageError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise UsageError(f"compute_dtype must be float32 or float64, got {compute_dtype!r}")
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.executor = Executor.from_accelerate(device)
        self._compute_dtype = _COMPUTE_DTYPES[compute_dtype]
        self.on_step, self.tuner = on_step, tuner
        self.max_shard_size = max_shard_size
        self.token = token
        self.allow_pickle = allow_pickle
        if _saved is None and (self.output_dir / STATE_NAME).is_file():
            raise MergeStateError(
                f"{self.output_dir} already holds a merge; continue it with ContinualMerger.resume() "
                "or choose another output folder"
            )
        self.executor.wait_for_everyone()  # no process may write before every process has checked
        self.base_source = resolve(base, token=token, allow_pickle=allow_pickle)
        self.base = Checkpoint.open(self.base_source.path, allow_pickle=allow_pickle)
        self.scope = scope
        self.method_name = method
        self.hyperparameters = hyperparameters or {}
        merged_names(self.base, scope)  # a scope that selects nothing fails before any expert is read
        self.method: MergeMethod = get_method(method)(**self.hyperparameters)  # bad hyperparameters fail here
        # A caller watching each step (on_step) sees each step written unless it asks otherwise.
        self.checkpoint_every = checkpoint_every or (1 if on_step is not None else self.method.checkpoint_every)
        self._write_first_step = checkpoint_every is not None or on_step is not None
        base_info = self.base_source.to_dict()
        if self.base_source.repo_id is None:  # a local base can only be found again by its path
            base_info["local_path"] = str(self.base_source.path)
        # Which tensors are merged is decided by the first expert (a CLIPVisionModel has no
        # visual_projection); a saved merge recorded it, older saves merged the whole scope.
        self.names: list[str] = []
        self.state = _saved or MergeState(
            method=method,
            hyperparameters=dict(self.method.hyperparameters),
            scope=scope,
            base=base_info,
            state_tensors=None if self.method.buffer_is_output else STATE_TENSORS_NAME,
        )
        if _saved is not None:
            self._plan(MergePlan(_saved.merged_names or merged_names(self.base, scope), dict(_saved.from_base or {})))
        self.steps: list[StepResult] = []
        self.setup_seconds = time.perf_counter() - started
        self._broken = False
        self._written_step = self.state.step  # the step the output folder holds
        self.writer = StepWriter(self.output_dir, self.base, self.base_source.path, max_shard_size,
                                 writes=self.executor.is_main_process)
        self._pending: PendingWrite | None = None  # the next written step's files, begun early
        self._gathered: list[tuple[ModelSource, dict[str, Any]]] = []  # an all-at-once method's, not merged yet
        if _saved is not None:
            self._restore(_saved)

    def _plan(self, plan: MergePlan) -> None:
        """Fix the merged tensor names for the run and initialise the method on them."""
        self.names = plan.names
        self.method = get_method(self.method_name)(**self.hyperparameters)
        self.context = MergeContext(
            base=self.base,
            names=self.names,
            linear_names=linear_weight_names(self.base.config, self.names),
            executor=self.executor,
            compute_dtype=self._compute_dtype,
        )
        self.method.init(self.context)
        self.state.hyperparameters = dict(self.method.hyperparameters)
        self.state.state_tensors = None if self.method.buffer_is_output else STATE_TENSORS_NAME
        self.state.merged_names = list(plan.names)
        self.state.from_base = dict(plan.from_base)

    @classmethod
    def resume(cls, output_dir: str | Path, base: ModelRef | None = None, **options: Any) -> ContinualMerger:
        """Continue the merge saved in ``output_dir`` (its method, hyperparameters and scope).

        ``base`` defaults to the one recorded in the state (repo id at its commit, else its folder).
        ``options`` are those of the constructor other than method, scope and hyperparameters.
        """
        output = Path(output_dir).expanduser().resolve()
        executor = Executor.from_accelerate(options.get("device"))
        if executor.is_main_process:
            recover(output)
        executor.wait_for_everyone()
        state = MergeState.load(output)
        if base is None:
            base = _recorded_base(state)
        return cls(base, output, state.method, scope=state.scope, hyperparameters=state.hyperparameters, _saved=state, **options)

    def _roll_back(self) -> None:
        """Put the method back to the last written step (θ0 before the first), after a failed step;
        steps merged since then and not written are dropped with it."""
        if self.unwritten_steps:
            self.state = MergeState.load(self.output_dir) if self._written_step else _fresh(self.state)
            self.steps = [s for s in self.steps if s.step <= self._written_step]
        self.method.buffer = {}
        if self.state.step == 0:  # the first expert decided the names; the next one decides again
            self.names = []
            self.state.merged_names, self.state.from_base = None, None
            self._broken = False
            return
        self.method = get_method(self.state.method)(**self.state.hyperparameters)
        self.method.init(self.context)
        self._restore(self.state)
        self._broken = False

    def _restore(self, state: MergeState) -> None:
        recorded = state.base.get("commit_sha")
        if recorded and self.base_source.commit_sha and recorded != self.base_source.commit_sha:
            raise MergeStateError(
                f"{self.output_dir}: the merge was started from base commit {recorded}, "
                f"not {self.base_source.commit_sha}"
            )
        self.method.buffer = {}  # θ0's copy goes before the saved buffer comes in: one buffer resident
        if state.state_tensors:
            stored = SafetensorsFile(self.output_dir / state.state_tensors)
            buffer = {name: stored.get(name) for name in self.names if name in stored.tensors}
            stored.close()
        else:
            with Checkpoint.open(self.output_dir) as merged:
                check_compatible(self.base, merged, f"saved merge {self.output_dir}", self.names, self.scope)
                buffer = {name: merged.get(name) for name in self.names}
        try:
            self.method.load_state_dict(state.method_state, buffer)
        except KeyError as err:
            raise MergeStateError(f"{self.output_dir}: saved merge lacks tensor {err}; the base or scope differ") from err

    @property
    def step(self) -> int:
        """How many experts have been merged."""
        return self.state.step

    def add(self, expert: ModelRef, *, final: bool = False) -> StepResult:
        """Check ``expert`` against the base, merge it, and save the new step atomically when it
        is due (every ``checkpoint_every`` steps, or ``final``).

        A rejected expert (:class:`~hf_merge.errors.IncompatibleExpertError`,
        :class:`~hf_merge.errors.CheckpointError`) leaves the merge, on disk and in memory, as it was.
        """
        self._check_not_broken()
        step = self.state.step + 1
        writes = final or (step - self._written_step >= self.checkpoint_every and (step > 1 or self._write_first_step))
        source = resolve(expert, token=self.token, allow_pickle=self.allow_pickle)
        if not self.method.continual:
            return self._gather(source, final=final)
        with open_expert(source.path, source.name, self.base, self.base_source, self.allow_pickle) as checkpoint:
            self._check_expert(checkpoint, source)
            started = time.perf_counter()
            self._broken = True  # until the step is both merged and saved
            # The next written step is written while it is merged (StepWriter.start), its file begun
            # with the first step after the last write: the tensors outside the merge go at once.
            if self._pending is None and self.writer.writes:
                self._pending = self.writer.start(self.names, self.method.output)
            self.method.ready = self._pending.ready if writes and self._pending else None
            try:
                metrics = self.tuner.step(self.method, checkpoint, step) if self.tuner else plain_step(self.method, checkpoint)
            except BaseException as err:
                self._cancel_pending()
                if not isinstance(err, CheckpointError):
                    raise
                # a NaN found midway: the buffer is half updated
                lost = self.unwritten_steps
                self._roll_back()
                if lost:
                    raise CheckpointError(
                        f"{err}; the merge is back at its last written step {self.state.step}, "
                        f"so the {lost} expert(s) merged after it must be added again"
                    ) from err
                raise
            finally:
                self.method.ready = None
            merge_seconds = time.perf_counter() - started
        self.state.step = step
        self.state.lineage.append({**source.to_dict(), **lineage_record(checkpoint), "step": step})
        self.state.method_state = self.method.state_dict()
        record_tuning(self.state, self.tuner, self.method)
        self._broken = False  # merged: memory is consistent, whether or not this step is written now
        result = StepResult(step, source, merge_seconds, 0.0, metrics)
        self.steps.append(result)
        logger.info("step %d: merged %s in %.2fs %s", step, source.name, merge_seconds, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if writes:
            self.flush()
        return result

    def _check_not_broken(self) -> None:
        if self._broken:
            raise MergeStateError(f"an earlier step failed midway; continue with ContinualMerger.resume({str(self.output_dir)!r})")

    def _check_expert(self, checkpoint: Checkpoint, source: ModelSource) -> None:
        """Check an expert against the base (the first one decides the merged names)."""
        source.require_tensors(self.names or merged_names(self.base, self.scope))  # a partial download
        if not self.names:
            self._plan(plan_merge(self.base, planning_view(checkpoint), self.scope, source.name))
        else:
            check_compatible(self.base, checkpoint, source.name, self.names, self.scope)
        checkpoint.require_finite(self.names, source.name)

    def add_all(self, experts: Iterable[ModelRef]) -> list[StepResult]:
        """:meth:`add` each expert in order; the last step is always written."""
        experts = list(experts)
        return [self.add(expert, final=i == len(experts) - 1) for i, expert in enumerate(experts)]

    @property
    def unwritten_steps(self) -> int:
        """Merged steps the output folder does not hold yet."""
        return self.state.step - self._written_step

    def flush(self) -> None:
        """Write the merged steps the output folder does not hold yet (nothing if none)."""
        self._check_not_broken()
        if self._gathered:
            self._merge_gathered()
        if not self.unwritten_steps:
            return
        started = time.perf_counter()
        self._save()
        self._written_step = self.state.step
        if self.steps and self.steps[-1].step == self.state.step:
            self.steps[-1].save_seconds = time.perf_counter() - started
        if self.on_step is not None and self.executor.is_main_process:
            call_on_step(self.on_step, self.output_dir, self.state, lambda: {n: self.method.output(n) for n in self.names})

    def result(self) -> EngineResult:
        """What has been merged so far in this run."""
        merge_s = sum(s.merge_seconds for s in self.steps)
        save_s = sum(s.save_seconds for s in self.steps)
        timings = {
            "setup_seconds": self.setup_seconds,
            "merge_seconds": merge_s,
            "save_seconds": save_s,
            "total_seconds": self.setup_seconds + merge_s + save_s,
            "seconds_per_expert": (merge_s + save_s) / max(len(self.steps), 1),
        }
        return EngineResult(self.output_dir, self.state, list(self.steps), timings)

    def _save(self) -> None:
        if self.executor.is_main_process:
            buffer = self.method.buffer
            state_tensors = {n: buffer[n] for n in self.names} if self.state.state_tensors else None
            pending, self._pending = self._pending or self.writer.start(self.names, self.method.output), None
            pending.finish(self.state, state_tensors)
        self.executor.wait_for_everyone()

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def close(self) -> None:
        """Release the base checkpoint, the spare weight files and the steps' scratch memory."""
        self._cancel_pending()
        self.writer.close()
        self.base.close()
        release_scratch()

    def __enter__(self) -> ContinualMerger:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and not self._broken:
                self.flush()  # a merge left by a `with` block ends written
        finally:
            self.close()


def _fresh(state: MergeState) -> MergeState:
    """``state`` before its first step."""
    return MergeState(state.method, state.hyperparameters, state.scope, base=state.base, state_tensors=state.state_tensors)


def _recorded_base(state: MergeState) -> ModelRef:
    base = state.base
    if base.get("repo_id"):
        pin = base.get("commit_sha") or base.get("revision")
        return f"{base['repo_id']}@{pin}" if pin else base["repo_id"]
    if base.get("local_path") and Path(base["local_path"]).is_dir():
        return base["local_path"]
    raise MergeStateError("the saved merge does not say where its base is; pass base= to resume()")


def merge_weights(
    base: ModelRef,
    experts: Iterable[ModelRef],
    method: str = "opcm",
    output_dir: str | Path | None = None,
    *,
    scope: str | list[str] = "vision",
    on_step: OnStep | None = None,
    device: str | torch.device | None = None,
    compute_dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    token: str | None = None,
    allow_pickle: bool = False,
    checkpoint_every: int | None = None,
    **hyperparameters: Any,
) -> EngineResult:
    """Merge ``experts`` into ``base`` in order with ``method``: the weights only, no card or push.

    Example: ``merge_weights("openai/clip-vit-base-patch32", ["org/a", "org/b"], alpha=0.5)`` (a whole recipe: api.merge).
    ``output_dir`` defaults to a new temporary folder. ``checkpoint_every`` as in
    :class:`ContinualMerger`. Extra keyword arguments are the method's hyperparameters.
    """
    experts = list(experts)
    if not experts:
        raise UsageError("merge needs at least one expert")
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="hf-merge-")
    merger = ContinualMerger(
        base, output_dir, method, scope=scope, hyperparameters=hyperparameters, on_step=on_step,
        device=device, compute_dtype=compute_dtype, max_shard_size=max_shard_size, token=token,
        allow_pickle=allow_pickle, checkpoint_every=checkpoint_every,
    )
    with merger:
        merger.add_all(experts)
        return merger.result()
