"""The quality gate: admit a candidate only if merging it keeps what the merged model knows.

The candidate has already been merged into a copy of the merged model (the watcher's staging
folder). The gate evaluates, with :mod:`hf_merge.evaluation`:

- the average accuracy on the tasks already merged, before and after: it may drop by at most
  ``max_forgetting`` points;
- the accuracy on the candidate's task after the merge, against the base's zero-shot accuracy: it
  must gain at least ``min_gain`` points.

The candidate's task comes from the policy (``watch.tasks``), else its card's ``model-index`` or
``datasets`` (the first one that names a registered task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.errors import EvaluationError
from hf_merge.log import get_logger
from hf_merge.watch.policy import AdmissionPolicy, Refusal

logger = get_logger(__name__)


@dataclass
class GateResult:
    """What the gate measured (points, 0-100) and decided."""

    refusal: Refusal | None = None
    old_before: float | None = None
    old_after: float | None = None
    new_task: str | None = None
    new_after: float | None = None
    new_base: float | None = None
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def candidate_task(repo_id: str, card: dict[str, Any], policy: AdmissionPolicy) -> str | None:
    """The evaluation task of a candidate: declared in the policy, else read from its card."""
    if repo_id in policy.tasks:
        return policy.tasks[repo_id]
    from hf_merge.evaluation import get_task

    # Card fields are someone else's YAML: any type may stand where a list of mappings is expected.
    names: list[str] = []
    for model in _list_of(card.get("model-index") or card.get("model_index")):
        for result in _list_of(model.get("results") if isinstance(model, dict) else None):
            dataset = result.get("dataset") if isinstance(result, dict) else None
            if isinstance(dataset, dict):
                names += [dataset[k] for k in ("name", "type") if isinstance(dataset.get(k), str) and dataset[k]]
    datasets = card.get("datasets")
    names += [d for d in ([datasets] if isinstance(datasets, str) else _list_of(datasets)) if isinstance(d, str) and d]
    for name in names:
        for spelling in (name, name.split("/")[-1]):
            try:
                return get_task(spelling).name
            except EvaluationError:
                continue
    return None


def _scores(evaluator: Any, model: Path, tasks: Sequence[str], known: Mapping[str, float] | None) -> dict[str, float]:
    """Accuracy of ``model`` on ``tasks``: those ``known`` already reused, the rest evaluated."""
    scores = {t: float(known[t]) for t in tasks if known and t in known}
    missing = [t for t in tasks if t not in scores]
    if missing:
        scores.update({t: float(r["accuracy"]) for t, r in evaluator.evaluate(str(model), tasks=missing).items()})
    return scores


def tuned_scores(pending: Path, merged: Path) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """``(after, before)`` for :func:`run_gate` from ``--tune``'s records: the validation scores of the
    candidate kept at the pending merge's last step and of the merged model's own last step
    (``(None, None)`` when that last step was not tuned)."""
    from hf_merge.io.merge_folder import MergeFolder
    from hf_merge.merging.tuning import tuning_records

    state = MergeFolder(pending).state()
    after = tuning_records(state.tuning)
    if not after or after[-1].step != state.step:
        return None, None
    before = tuning_records(MergeFolder(merged).state().tuning)
    return after[-1].kept_scores(), before[-1].kept_scores() if before else None


def _list_of(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def run_gate(
    policy: AdmissionPolicy,
    *,
    before: Path,
    after: Path,
    base: Path,
    old_tasks: Sequence[str],
    new_task: str | None,
    token: str | None = None,
    tuned_after: Mapping[str, float] | None = None,
    tuned_before: Mapping[str, float] | None = None,
) -> GateResult:
    """Evaluate and decide; ``before``/``after``/``base`` are model folders.

    A merge tuned with ``--tune`` has scored the kept candidate (``tuned_after``) and the merged model
    before it (``tuned_before``) on the tasks' validation splits, accuracy by validation task name:
    the gate then decides on the validation splits too and reuses those scores, evaluating only what
    they lack (the base on the new task's validation split).
    """
    from hf_merge.evaluation import Evaluator

    result = GateResult(new_task=new_task)
    if policy.min_gain is not None and new_task is None:
        result.refusal = Refusal("quality", "no evaluation task for it: declare one in `watch.tasks` or its card's model-index")
        return result
    old = list(dict.fromkeys(old_tasks))
    try:
        if tuned_after is not None:
            from hf_merge.evaluation import validation_task

            old = list(dict.fromkeys(validation_task(t).name for t in old))
            new_task = result.new_task = validation_task(new_task).name if new_task else None
        tasks = old + ([new_task] if new_task and new_task not in old else [])
        if not tasks:
            return result
        evaluator = Evaluator(tasks, limit=policy.eval_limit, token=token)
        after_scores = _scores(evaluator, after, tasks, tuned_after)
        if old and policy.max_forgetting is not None:
            before_scores = _scores(evaluator, before, old, tuned_before if tuned_after is not None else None)
            result.old_before = 100 * sum(before_scores[t] for t in old) / len(old)
            result.old_after = 100 * sum(after_scores[t] for t in old) / len(old)
        if new_task and policy.min_gain is not None:
            result.new_after = 100 * after_scores[new_task]
            result.new_base = 100 * _scores(evaluator, base, [new_task], None)[new_task]
    except EvaluationError as error:
        result.refusal = Refusal("quality", f"could not be evaluated: {error}")
        return result
    result.scores = dict(after_scores)
    if result.old_before is not None and result.old_after is not None:
        drop = result.old_before - result.old_after
        logger.info("Gate: merged tasks %.1f -> %.1f (%+.1f points)", result.old_before, result.old_after, -drop)
        if policy.max_forgetting is not None and drop > policy.max_forgetting + 1e-9:
            result.refusal = Refusal(
                "quality", f"forgetting {drop:.1f} points on the merged tasks ({result.old_before:.1f} -> "
                f"{result.old_after:.1f}), more than max_forgetting {policy.max_forgetting:g}")
            return result
    if result.new_after is not None and result.new_base is not None:
        gain = result.new_after - result.new_base
        logger.info("Gate: %s %.1f vs base %.1f (%+.1f points)", new_task, result.new_after, result.new_base, gain)
        if policy.min_gain is not None and gain < policy.min_gain - 1e-9:
            result.refusal = Refusal(
                "quality", f"gain {gain:+.1f} points on {new_task} over the base ({result.new_base:.1f} -> "
                f"{result.new_after:.1f}), less than min_gain {policy.min_gain:g}")
    return result
