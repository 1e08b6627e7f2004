"""One watcher pass: discover -> skip what the ledger and the lineage know -> policy -> merge -> gate -> push.

Crash safety rests on three facts:

- the merged repo's lineage (``merge_state.json``: every expert's repo id and commit sha) is the
  truth for what was merged: a candidate already in it is never merged again;
- a candidate is merged into a staging folder (``work/pending``), which becomes ``work/ready/<key>``
  in one rename once merged and admitted; a restart discards ``pending`` (the merge is
  deterministic, so redoing it gives the same bytes) and pushes ``ready`` results;
- every push names the commit it was computed from, so a result is never pushed on top of a repo
  that moved meanwhile (it is recomputed instead).

A lock file in the work folder serialises watchers sharing it, and a thread lock serialises the
passes and webhook deliveries of one watcher.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hf_merge.errors import (
    CheckpointError,
    HfMergeError,
    IncompatibleExpertError,
    MergeStateError,
    ModelNotFoundError,
    NotContinualError,
    PushError,
)
from hf_merge.hub import client as hub
from hf_merge.hub.push import RetryPolicy, StaleParentError, push_files
from hf_merge.hub.repo_ids import check_names
from hf_merge.log import get_logger
from hf_merge.recipe import EvalSpec
from hf_merge.watch.discovery import Candidate, Discovery, candidate_at
from hf_merge.watch.ledger import LEDGER_FILENAME, Ledger
from hf_merge.watch.mirror import HEAD_FILE, Mirror, edit_recipe
from hf_merge.watch.outcome import PAUSE_ENV, RETRIED_ERRORS, Outcome, first_line, pause_at
from hf_merge.watch.policy import AdmissionPolicy, Refusal
from hf_merge.watch.publish import push_result

logger = get_logger(__name__)

__all__ = ["PAUSE_ENV", "Outcome", "Watcher"]  # PAUSE_ENV and Outcome are imported from here too

_CANDIDATE_FILE = ".watch-candidate.json"


class Watcher:
    """Keeps ``merged_repo`` up to date with new fine-tunes of its base.

    Args:
        merged_repo: Repo id of a model made by hf-merge (it carries its merge state).
        work_dir: Folder for the watcher's mirror of the merged repo, staging results and ledger.
        token: Hub token with write access to ``merged_repo`` (never logged).
        policy: Admission policy; default: the ``watch:`` section of the repo's recipe, else defaults.
        review: ``commit`` (push to ``main``) or ``pr`` (open a pull request per candidate).
        authors, searches, allow_list, limit: Extra discovery sources (see :class:`Discovery`).
        retry: Backoff of failed pushes.
    """

    def __init__(self, merged_repo: str, *, work_dir: str | Path, token: str | None = None,
                 policy: AdmissionPolicy | None = None, review: str = "commit", authors: Sequence[str] = (),
                 searches: Sequence[str] = (), allow_list: str | Path | None = None, limit: int = 100,
                 retry: RetryPolicy | None = None):
        check_names(repo_ids={"merged repo": merged_repo})
        if review not in ("commit", "pr"):
            raise HfMergeError(f"--review must be 'commit' or 'pr', got {review!r}")
        self.merged_repo = merged_repo
        self.work_dir = Path(work_dir).expanduser()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.token = hub.resolve_token(token)
        self._policy = policy
        self.review = review
        self.authors, self.searches, self.allow_list, self.limit = list(authors), list(searches), allow_list, limit
        self.retry = retry or RetryPolicy()
        self.mirror = Mirror(self.work_dir / "mirror")
        self.ledger = Ledger.load(self.work_dir)
        self._lock = threading.Lock()
        self.last_timings: dict[str, float] = {}

    # ---- public ---------------------------------------------------------------------------------
    def run_once(self) -> list[Outcome]:
        """One pass over every discovered candidate; returns what happened to each new one."""
        with self._serialised():
            head = self._sync()
            started = time.perf_counter()
            candidates = self._discovery().find(self.token)
            self.last_timings = {"discovery": time.perf_counter() - started}
            outcomes = []
            for candidate in candidates:
                outcome = self._consider(candidate, head)
                if outcome.status != "skipped":
                    outcomes.append(outcome)
                    head = self._sync()  # a push moved the head: the next candidate builds on it
            return outcomes

    def consider(self, repo_id: str, sha: str | None = None, *, source: str = "webhook") -> Outcome:
        """Consider one repo at one commit (a webhook delivery): the same checks as a pass."""
        with self._serialised():
            head = self._sync()
            if repo_id == self.merged_repo:
                return Outcome(repo_id, sha or "", "skipped", "the merged repo itself")
            try:
                candidate = candidate_at(repo_id, sha, token=self.token, source=source)
            except ModelNotFoundError as error:
                return Outcome(repo_id, sha or "", "skipped", str(error))
            base_id = self.mirror.base_id()
            related = (f"base_model:{base_id}" in candidate.tags or repo_id.split("/")[0] in self.authors
                       or self._allow_listed(repo_id))
            if not related:
                return Outcome(repo_id, candidate.sha, "skipped", f"not a fine-tune of {base_id}")
            return self._consider(candidate, head)

    def watch(self, interval_s: float, stop: threading.Event | None = None) -> None:
        """Poll every ``interval_s`` seconds until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                for outcome in self.run_once():
                    logger.info("%s: %s%s", outcome.key, outcome.status, f" ({outcome.reason})" if outcome.reason else "")
            except NotContinualError:
                raise  # the merged repo can never take one more expert: no later pass would do better
            except HfMergeError as error:  # the Hub is down or refused: try again at the next pass
                logger.warning("Watch pass failed: %s", error)
            except Exception as error:  # a watcher outlives one bad pass; the type and first line say why
                logger.warning("Watch pass failed: %s: %s", type(error).__name__, str(error).strip().split("\n")[0][:200])
            stop.wait(interval_s)

    @property
    def policy(self) -> AdmissionPolicy:
        if self._policy is not None:
            return self._policy
        recipe = self.mirror.recipe()
        return recipe.watch if recipe is not None and recipe.watch is not None else AdmissionPolicy()

    # ---- one candidate ------------------------------------------------------------------------------
    def _consider(self, candidate: Candidate, head: str) -> Outcome:
        """Decide one candidate; whatever goes wrong with it, the pass goes on to the next.

        A failure the Hub may not repeat (network, token, push) is ``failed`` and tried again at
        the next pass. Any other failure, expected or not (a card field of an odd type, weights
        that break the merge), refuses the candidate at this commit with the reason: retrying the
        same bytes would fail the same way, and before this guard one bad card stopped every pass."""
        try:
            return self._consider_checked(candidate, head)
        except RETRIED_ERRORS as error:
            shutil.rmtree(self.work_dir / "pending", ignore_errors=True)
            self._forget_intent(candidate.repo_id, candidate.sha)
            logger.warning("Could not consider %s: %s", candidate.reference, first_line(error))
            return Outcome(candidate.repo_id, candidate.sha, "failed", first_line(error))
        except Exception as error:
            shutil.rmtree(self.work_dir / "pending", ignore_errors=True)
            shutil.rmtree(self._ready_dir(candidate.repo_id, candidate.sha), ignore_errors=True)  # never pushed later
            reason = first_line(error) if isinstance(error, HfMergeError) else f"{type(error).__name__}: {first_line(error)}"
            logger.warning("Refusing %s after an error while considering it: %s", candidate.reference, reason)
            return self._refuse(candidate, Refusal("error", reason), head)

    def _consider_checked(self, candidate: Candidate, head: str) -> Outcome:
        repo_id, sha = candidate.repo_id, candidate.sha
        if (repo_id, sha) in self.mirror.merged_commits():
            return Outcome(repo_id, sha, "skipped", "already merged")
        if self.ledger.decided(repo_id, sha) or repo_id in (self.merged_repo, self.mirror.base_id()):
            return Outcome(repo_id, sha, "skipped", "already considered")
        if self._ready_dir(repo_id, sha).exists():
            return Outcome(repo_id, sha, "failed", "merged, waiting for the Hub to accept the push")
        policy = self.policy
        refusal = policy.check_metadata(repo_id, license=candidate.license, tags=list(candidate.tags))
        if refusal is not None:
            return self._refuse(candidate, refusal, head)
        from hf_merge.hub.preflight import check_models

        timings: dict[str, float] = {}
        try:
            check_models(self.mirror.base_reference(), [candidate.reference], token=self.token, allow_pickle=policy.allow_pickle)
            started = time.perf_counter()
            from hf_merge.hub.sources import resolve

            resolve(candidate.reference, token=self.token, allow_pickle=policy.allow_pickle)
            timings["download"] = time.perf_counter() - started
        except IncompatibleExpertError as error:
            return self._refuse(candidate, Refusal("architecture", str(error)), head)
        except CheckpointError as error:
            return self._refuse(candidate, Refusal("weights", str(error)), head)
        self.ledger.record(repo_id, sha, "merging")
        self.ledger.save(self.work_dir)
        pending = self.work_dir / "pending"
        shutil.rmtree(pending, ignore_errors=True)
        started = time.perf_counter()
        try:
            task = self._merge_into(pending, candidate, policy)
        except (CheckpointError, IncompatibleExpertError, MergeStateError) as error:
            shutil.rmtree(pending, ignore_errors=True)
            kind = "weights" if isinstance(error, CheckpointError) else "tensors"
            return self._refuse(candidate, Refusal(kind, str(error)), head)
        timings["merge"] = time.perf_counter() - started
        pause_at("merged", self.work_dir)
        if policy.has_gate:
            started = time.perf_counter()
            verdict = self._gate(pending, candidate, policy, task)
            timings["gate"] = time.perf_counter() - started
            if verdict is not None:
                shutil.rmtree(pending, ignore_errors=True)
                return self._refuse(candidate, verdict, head, timings)
        ready = self._ready_dir(repo_id, sha)
        self._finish(pending, candidate, head)
        shutil.rmtree(ready, ignore_errors=True)
        ready.parent.mkdir(parents=True, exist_ok=True)
        os.replace(pending, ready)
        pause_at("ready", self.work_dir)
        outcome = self._push_ready(ready, head)
        outcome.timings = {**timings, **outcome.timings}
        return outcome

    def _merge_into(self, pending: Path, candidate: Candidate, policy: AdmissionPolicy) -> str | None:
        """``hf-merge add`` of the candidate into a copy of the mirror; its evaluation task, if known."""
        from hf_merge.api import add
        from hf_merge.watch.gate import candidate_task

        recipe = self.mirror.recipe()
        task = candidate_task(candidate.repo_id, candidate.card, policy)
        spec = None
        done = len(self.mirror.merged_commits())
        evaluation = recipe.eval if recipe is not None else None
        if evaluation is not None and evaluation.every_step and task and len(evaluation.tasks) == done:
            spec = EvalSpec(tasks=[task], every_step=True, limit=evaluation.limit)
        shutil.copytree(self.mirror.path, pending, ignore=shutil.ignore_patterns(".cache", HEAD_FILE, ".hf-merge-*"))
        # `add` on a local folder pushes nothing; the watcher pushes once the gate has admitted it.
        # Without a task for the candidate the per-step table cannot grow a row and --tune has nothing to
        # score on: this step is neither evaluated nor tuned, and the recipe's settings are restored after.
        edit_recipe(pending, push_to_hub=None, space=None, **({} if spec or evaluation is None else {"eval": None}))
        add(pending, [candidate.reference], token=self.token, eval=spec, allow_pickle=policy.allow_pickle, tune=None if spec else False)
        if spec is None and recipe is not None and (evaluation is not None or recipe.tune):  # what `add` changed
            edit_recipe(pending, eval=evaluation, tune=recipe.tune)
        return task

    def _gate(self, pending: Path, candidate: Candidate, policy: AdmissionPolicy, task: str | None) -> Refusal | None:
        from hf_merge.hub.sources import resolve
        from hf_merge.watch.gate import run_gate, tuned_scores

        recipe = self.mirror.recipe()
        old_tasks = list(recipe.eval.tasks) if recipe is not None and recipe.eval is not None else []
        base = resolve(self.mirror.base_reference(), token=self.token)
        after, before = tuned_scores(pending, self.mirror.path)
        return run_gate(policy, before=self.mirror.path, after=pending, base=base.path, old_tasks=old_tasks,
                        new_task=task, token=self.token, tuned_after=after, tuned_before=before).refusal

    def _finish(self, pending: Path, candidate: Candidate, head: str) -> None:
        """Restore the published recipe fields, record the decision in the ledger, rewrite the card."""
        from hf_merge.api import card

        recipe = self.mirror.recipe()
        space = recipe.space if recipe is not None else None
        edit_recipe(pending, push_to_hub=self.merged_repo, space=space)
        ledger = Ledger.load(pending)
        ledger.update(self.ledger)
        ledger.record(candidate.repo_id, candidate.sha, "merged" if self.review == "commit" else "proposed")
        ledger.save(pending)
        card(pending, repo_id=self.merged_repo, space=space)
        (pending / _CANDIDATE_FILE).write_text(json.dumps(
            {"repo_id": candidate.repo_id, "sha": candidate.sha, "parent": head}), encoding="utf-8")

    def _push_ready(self, ready: Path, head: str) -> Outcome:
        meta = json.loads((ready / _CANDIDATE_FILE).read_text(encoding="utf-8"))
        repo_id, sha = meta["repo_id"], meta["sha"]
        started = time.perf_counter()
        try:
            url = push_result(ready, self.merged_repo, token=self.token, parent_commit=meta["parent"],
                              message=f"hf-merge watch: add {repo_id}@{sha[:10]}", create_pr=self.review == "pr",
                              retry=self.retry)
        except StaleParentError as error:
            shutil.rmtree(ready, ignore_errors=True)
            self._forget_intent(repo_id, sha)
            return Outcome(repo_id, sha, "failed", str(error))
        except PushError as error:
            logger.warning("Push of %s@%s failed; the result is kept in %s: %s", repo_id, sha[:10], ready, error)
            return Outcome(repo_id, sha, "failed", f"{error} (kept in {ready})")
        status = "merged" if self.review == "commit" else "proposed"
        self.ledger.record(repo_id, sha, status, url=url)
        self.ledger.save(self.work_dir)
        shutil.rmtree(ready, ignore_errors=True)
        timings = {"push": time.perf_counter() - started}
        if status == "proposed":
            self._publish_ledger(head)  # main records the open pull request, so no watcher proposes it again
        self._refresh_space()
        logger.info("%s %s@%s: %s", "Merged" if status == "merged" else "Proposed", repo_id, sha[:10], url)
        return Outcome(repo_id, sha, status, url=url, timings=timings)

    def _refuse(self, candidate: Candidate, refusal: Refusal, head: str, timings: dict | None = None) -> Outcome:
        """Record the refusal locally, then in the merged repo's ledger and card (weights untouched)."""
        repo_id, sha = candidate.repo_id, candidate.sha
        logger.info("Not merging %s@%s: %s", repo_id, sha[:10], refusal)
        self.ledger.record(repo_id, sha, "refused", reason=refusal.reason, kind=refusal.kind)
        self.ledger.save(self.work_dir)
        self._publish_ledger(head)
        return Outcome(repo_id, sha, "refused", str(refusal), timings=dict(timings or {}))

    def _publish_ledger(self, head: str) -> bool:
        """A commit of only the ledger and card when the repo's lacks local refusals or proposals; pushed?"""
        from hf_merge.api import card

        remote = Ledger.load(self.mirror.path)

        def published(ledger: Ledger) -> set[str]:
            return {k for k, e in ledger.entries.items() if e.status in ("refused", "proposed")}

        if published(self.ledger) <= published(remote):
            return False
        remote.update(self.ledger)
        remote.save(self.mirror.path)
        recipe = self.mirror.recipe()
        try:
            card(self.mirror.path, repo_id=self.merged_repo, space=recipe.space if recipe is not None else None)
            push_files(self.mirror.path, self.merged_repo, [Path("README.md"), Path(LEDGER_FILENAME)], token=self.token,
                       parent_commit=head, message="hf-merge watch: record candidates considered", retry=self.retry)
        except PushError as error:  # the local ledger keeps the decision; the next pass publishes it
            logger.warning("Could not record the refusal in %s: %s", self.merged_repo, error)
            return False
        except Exception as error:  # the decisions stay in the local ledger; a card problem must not stop passes
            logger.warning("Could not record the refusal in %s: %s: %s", self.merged_repo, type(error).__name__,
                           first_line(error))
            return False
        self.mirror.invalidate()
        return True

    # ---- state ---------------------------------------------------------------------------------------
    def _sync(self) -> str:
        """Mirror the merged repo's head, adopt its ledger, finish results a crash left; the head sha."""
        with hub.hub_errors(self.merged_repo, token=self.token):
            head = hub.api_client(self.token).model_info(self.merged_repo).sha or ""
        self.mirror.update(self.merged_repo, head, self.token)
        self.ledger.update(Ledger.load(self.mirror.path))
        merged = self.mirror.merged_commits()
        for _key, entry in list(self.ledger.entries.items()):
            if (entry.repo_id, entry.sha) in merged and entry.status != "merged":
                self.ledger.record(entry.repo_id, entry.sha, "merged")
        self.ledger.save(self.work_dir)
        shutil.rmtree(self.work_dir / "pending", ignore_errors=True)  # an unfinished merge: redone if still wanted
        for ready in sorted((self.work_dir / "ready").glob("*")):
            meta_path = ready / _CANDIDATE_FILE
            meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
            if (meta.get("repo_id"), meta.get("sha")) in merged or meta.get("parent") != head:
                shutil.rmtree(ready, ignore_errors=True)  # pushed before the crash, or computed on an old head
                continue
            logger.info("Pushing %s@%s, merged before an interruption", meta["repo_id"], meta["sha"][:10])
            if self._push_ready(ready, head).status == "failed" and ready.exists():
                return head  # the Hub still refuses: the result waits for the next pass
            return self._sync()
        if self._publish_ledger(head):
            return self._sync()
        return head

    def _forget_intent(self, repo_id: str, sha: str) -> None:
        entry = self.ledger.get(repo_id, sha)
        if entry is not None and entry.status == "merging":
            del self.ledger.entries[entry.key]
            self.ledger.save(self.work_dir)

    def _discovery(self) -> Discovery:
        return Discovery(base=self.mirror.base_id(), exclude=(self.merged_repo, self.mirror.base_id()), authors=self.authors,
                         searches=self.searches, allow_list=self.allow_list, limit=self.limit)

    def _allow_listed(self, repo_id: str) -> bool:
        if self.allow_list is None:
            return False
        from hf_merge.watch.discovery import read_allow_list

        return any(ref.partition("@")[0] == repo_id for ref in read_allow_list(self.allow_list))

    def _ready_dir(self, repo_id: str, sha: str) -> Path:
        return self.work_dir / "ready" / f"{repo_id.replace('/', '--')}@{sha}"

    def _refresh_space(self) -> None:
        recipe = self.mirror.recipe()
        if recipe is None or not recipe.space or self.review != "commit":
            return
        from hf_merge.publish.space import publish_space

        try:
            publish_space(self.merged_repo, recipe.space, token=self.token, link_card=False)
        except HfMergeError as error:  # the model is published; the demo catches up at the next merge
            logger.warning("Could not update the Space %s: %s", recipe.space, error)

    @contextmanager
    def _serialised(self) -> Iterator[None]:
        with self._lock:
            with open(self.work_dir / ".lock", "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process is killed
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
