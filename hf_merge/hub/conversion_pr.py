"""Safetensors weights of a pickle-only repo, from the Hub's conversion pull request.

Many older popular repos (``openai/clip-vit-base-patch32`` among them) have only
``pytorch_model.bin`` on ``main``; the Hub's conversion bot has opened a pull request that adds
``model.safetensors``. transformers finds that pull request on its own
(``transformers/safetensors_conversion.py``: the first open pull request by ``SFconvertbot``
titled "Adding `safetensors` variant of this model", whose branch is one commit on top of
``main``); this module does the same, so hf-merge can stay safetensors-only without refusing them.

A pull request is data from the Hub, not from the repo's owner, so its tensors are checked
against the architecture its ``config.json`` describes (built on the meta device: no weights,
no remote code). A file whose floating-point tensor names differ is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from huggingface_hub import HfApi

from hf_merge.log import get_logger

logger = get_logger(__name__)

PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_BOT = "SFconvertbot"


@dataclass(frozen=True)
class ConversionPR:
    """An open conversion pull request whose safetensors replace a revision's pickle weights.

    Attributes:
        num: Pull request number (``66``).
        ref: Its git reference (``refs/pr/66``).
        commit_sha: The pull request's head commit: what is downloaded and recorded.
        revision_commit: The commit of the revision that was asked for (the PR's parent).
        author: Who opened it (the conversion bot).
    """

    num: int
    ref: str
    commit_sha: str
    revision_commit: str
    author: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_conversion_pr(api: HfApi, repo_id: str, revision_commit: str) -> ConversionPR | None:
    """The first open conversion pull request (in the Hub's order, newest first) whose branch is
    one commit on top of ``revision_commit``; ``None`` if there is none."""
    for discussion in api.get_repo_discussions(repo_id, repo_type="model"):
        if not (
            discussion.is_pull_request
            and discussion.status == "open"
            and discussion.author == CONVERSION_BOT
            and discussion.title == PR_TITLE
        ):
            continue
        commits = api.list_repo_commits(repo_id, revision=discussion.git_reference)
        if len(commits) < 2 or commits[1].commit_id != revision_commit:
            logger.debug("%s: %s does not branch from %s", repo_id, discussion.git_reference, revision_commit)
            continue
        return ConversionPR(
            num=discussion.num,
            ref=str(discussion.git_reference),
            commit_sha=commits[0].commit_id,
            revision_commit=revision_commit,
            author=discussion.author,
        )
    return None


def tensor_name_problem(config: dict[str, Any], names: dict[str, str]) -> str | None:
    """How the floating-point tensor names ``names`` (name -> safetensors dtype string) differ from
    those of the model ``config`` describes; ``None`` when they are the same set.

    Integer buffers (``position_ids``) are ignored: older checkpoints keep them, newer models
    do not save them."""
    expected = expected_float_names(config)
    if expected is None:
        return f"cannot be checked: transformers does not know the architecture {config.get('architectures')}"
    found = {name for name, dtype in names.items() if dtype.startswith(("F", "BF"))}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        return f"lacks tensor '{missing[0]}' of the model ({len(missing)} missing)"
    if extra:
        return f"has tensor '{extra[0]}', which the model does not have ({len(extra)} extra)"
    return None


def expected_float_names(config: dict[str, Any]) -> set[str] | None:
    """Floating-point tensor names of the model ``config`` describes (built on the meta device)."""
    import torch

    try:
        import transformers

        arch = (config.get("architectures") or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        fields = {k: v for k, v in config.items() if k != "model_type"}
        cfg = transformers.AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            model = model_cls._from_config(cfg) if model_cls is not None else transformers.AutoModel.from_config(cfg)
    except Exception as error:  # an unknown or malformed architecture cannot vouch for the file
        logger.debug("cannot build %s on the meta device: %s", config.get("architectures"), error)
        return None
    return {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
