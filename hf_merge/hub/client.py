"""Hub I/O: the client, checks of a repo before download, pushes of merge results. Tokens never leave here.

Every failure of the Hub client is turned into an :mod:`hf_merge.errors` type with a one-line
message that says what to do (the client's own messages span several lines and URLs). A token is
only ever passed to the client: it is not logged, printed, or written to any file hf-merge makes.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_merge.errors import AuthenticationError, CheckpointError, HfMergeError, ModelNotFoundError
from hf_merge.hub.conversion_pr import ConversionPR, find_conversion_pr, tensor_name_problem
from hf_merge.hub.remote_file import remote_tensor_table
from hf_merge.io.merge_folder import RESULT_FILES
from hf_merge.log import get_logger

logger = get_logger(__name__)

# What a merge needs from a model repo: weights, config, image processor and tokenizer files.
# Anything else (READMEs aside, which carry the license) is never downloaded.
MODEL_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "README.md",
    "adapter_config.json",  # a PEFT adapter's (its weights are *.safetensors)
)
PICKLE_PATTERNS = ("*.bin", "pytorch_model.bin.index.json")
# What continuing a merged repo additionally needs.
MERGE_RESULT_PATTERNS = RESULT_FILES

# Files a push sends: the model (as from_pretrained reads it) and what documents and continues it.
PUSH_PATTERNS = MODEL_PATTERNS + MERGE_RESULT_PATTERNS
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


def endpoint() -> str:
    """The Hub endpoint the client talks to (``HF_ENDPOINT``, default https://huggingface.co)."""
    return constants.ENDPOINT


def prepare_client(url: str | None = None) -> None:
    """Settings that depend on the endpoint (``url``, default ``HF_ENDPOINT``): a loopback Hub
    speaks plain LFS, not Xet."""
    host = urlparse(url or endpoint()).hostname or ""
    if host in _LOOPBACK_HOSTS or host.startswith("127."):
        # The client uploads through Xet whenever hf_xet is importable, whatever the server says.
        constants.HF_HUB_DISABLE_XET = True


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the argument, else ``HF_TOKEN``, else the stored login, else ``None``."""
    if token:
        return token
    return huggingface_hub.get_token()


def api_client(token: str | None) -> HfApi:
    prepare_client()
    return HfApi(endpoint=endpoint(), token=token if token else None, library_name="hf-merge")


def check_weights(repo_id: str, files: Sequence[str], allow_pickle: bool) -> None:
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if has_safetensors:
        return
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{repo_id} has only pickle weights ({pickles[0]}), which can run code when loaded; "
            "pass --allow-pickle to load them with torch.load(weights_only=True)"
        )
    if not pickles:
        raise CheckpointError(f"{repo_id} has no model weights (no .safetensors file)")


def fetch_config(repo_id: str, revision: str | None = None, token: str | None = None, *, reference: str | None = None) -> dict:
    """Read a repo's ``config.json`` without downloading its weights (checks before a long merge).
    ``reference`` is how errors name the repo (default ``repo_id@revision``)."""
    import json

    token = resolve_token(token)
    reference = reference or (repo_id if revision is None else f"{repo_id}@{revision}")
    with hub_errors(reference, token=token):
        path = huggingface_hub.hf_hub_download(
            repo_id, "config.json", revision=revision, token=token if token else False, endpoint=endpoint()
        )
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fetch_file(repo_id: str, filename: str, revision: str | None = None, token: str | None = None) -> Path | None:
    """Download one file of a model repo (``merge_state.json`` before a whole snapshot); ``None`` if
    the repo has no such file."""
    token = resolve_token(token)
    with hub_errors(repo_id if revision is None else f"{repo_id}@{revision}", token=token):
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, token=token if token else False,
                                                        endpoint=endpoint()))
        except huggingface_hub.errors.EntryNotFoundError:
            return None


def check_model(repo_id: str, revision: str | None = None, token: str | None = None, allow_pickle: bool = False) -> WeightsRevision:
    """Check that a repo exists, is readable with ``token`` and has usable weights; return where
    they are (see :func:`resolve_weights`)."""
    token = resolve_token(token)
    reference = repo_id if revision is None else f"{repo_id}@{revision}"
    with hub_errors(reference, token=token):
        return resolve_weights(repo_id, revision, token=token, allow_pickle=allow_pickle)


@dataclass(frozen=True)
class WeightsRevision:
    """The commit whose weights a merge reads, and its file list.

    Attributes:
        commit_sha: The commit to download: the revision's own, or the head of its conversion
            pull request when the revision has only pickle weights.
        files: The files of that commit.
        conversion_pr: The conversion pull request used, if any.
    """

    commit_sha: str
    files: list[str]
    conversion_pr: ConversionPR | None = None

    @property
    def has_safetensors(self) -> bool:
        return any(f.endswith(".safetensors") for f in self.files)


def resolve_weights(repo_id: str, revision: str | None, *, token: str | None, allow_pickle: bool) -> WeightsRevision:
    """Where a repo's weights are: the revision itself when it has safetensors; else the Hub's
    open safetensors conversion pull request on top of it (checked tensor by tensor); else its
    pickle weights when ``allow_pickle``. Raises :class:`CheckpointError` otherwise.

    Call inside :func:`hub_errors`."""
    api = api_client(token)
    info = api.model_info(repo_id, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    own = WeightsRevision(info.sha or "", files)
    if own.has_safetensors or not any(f.endswith(_PICKLE_SUFFIXES) for f in files):
        check_weights(repo_id, files, allow_pickle)
        return own
    pr = find_conversion_pr(api, repo_id, own.commit_sha)
    problem = None
    if pr is not None:
        pr_files = [s.rfilename for s in api.model_info(repo_id, revision=pr.commit_sha).siblings or []]
        converted = WeightsRevision(pr.commit_sha, pr_files, pr)
        problem = _conversion_problem(repo_id, converted, token) if converted.has_safetensors else "adds no safetensors file"
        if problem is None:
            return converted
        if not allow_pickle:
            pickle = next(f for f in files if f.endswith(_PICKLE_SUFFIXES))
            raise CheckpointError(
                f"{repo_id} has only pickle weights ({pickle}) and its safetensors conversion pull request "
                f"{pr.ref} {problem}, so it is refused; pass --allow-pickle to load {pickle} with torch.load(weights_only=True)"
            )
        logger.warning("%s: conversion pull request %s refused (%s); using the pickle weights", repo_id, pr.ref, problem)
    check_weights(repo_id, files, allow_pickle)
    return own


_CHECKED_CONVERSIONS: dict[tuple[str, str], str | None] = {}


def _conversion_problem(repo_id: str, weights: WeightsRevision, token: str | None) -> str | None:
    """What is wrong with a conversion pull request's tensors (``None``: nothing), read from the
    safetensors headers and config of its commit; remembered per commit for the process."""
    key = (repo_id, weights.commit_sha)
    if key not in _CHECKED_CONVERSIONS:
        headers = tensor_headers(repo_id, weights.commit_sha, token=token)
        config = fetch_config(repo_id, weights.commit_sha, token=token)
        _CHECKED_CONVERSIONS[key] = tensor_name_problem(config, headers)
    return _CHECKED_CONVERSIONS[key]


def tensor_headers(repo_id: str, revision: str, *, token: str | None) -> dict[str, str]:
    """Tensor name -> safetensors dtype string of a repo's safetensors weights, read from the
    files' headers with range requests (no weights downloaded). Call inside :func:`hub_errors`."""
    return {name: info[0] for name, info in tensor_table(repo_id, revision, token=token).items()}


def tensor_table(repo_id: str, revision: str, *, token: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype string, shape) from a repo's safetensors headers (range requests only),
    each header checked as the safetensors library checks it (:mod:`hf_merge.io.safetensors_header`)."""
    info = api_client(token).model_info(repo_id, revision=revision)
    return remote_tensor_table(repo_id, info.sha or revision, [s.rfilename for s in info.siblings or []], token=token)


# ---------------------------------------------------------------------------------------- push
def publishable_files(output_dir: str | Path) -> list[Path]:
    """The files of a merge folder that a push sends, relative to the folder, sorted."""
    import fnmatch

    root = Path(output_dir)
    patterns = PUSH_PATTERNS
    selected = []
    for path in sorted(root.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
            selected.append(path.relative_to(root))
    return selected


def retry_command(
    output_dir: str | Path, repo_id: str, *, private: bool = False, create_pr: bool = False, commit_message: str | None = None
) -> str:
    """The exact ``hf-merge push`` command that re-sends a merge folder (no token in it, ever)."""
    parts = ["hf-merge", "push", str(output_dir), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if create_pr:
        parts.append("--create-pr")
    if commit_message:
        parts += ["--commit-message", commit_message]
    return shlex.join(parts)


def push_failure(error: Exception, repo_id: str, output_dir: Path, token: str | None) -> str:
    """One line on why a push of ``output_dir`` to ``repo_id`` failed (never the token itself)."""
    kept = f"the merged model is intact in {output_dir}"
    status = status_of(error)
    if status in (401, 403) or isinstance(error, RepositoryNotFoundError):
        why = "no token was given" if not token else "the token was refused or lacks write access"
        return f"the Hub refused the push to {repo_id} ({status or 401}: {why}); {kept}"
    if status is not None and status >= 500:
        return f"the Hub failed while receiving {repo_id} (server error {status}); {kept}"
    if status is not None:
        return f"the Hub rejected the push to {repo_id} (HTTP {status}: {_server_message(error)}); {kept}"
    return f"could not push to {repo_id} at {endpoint()} ({one_line(error)}); {kept}"


# ---------------------------------------------------------------------------------------- errors
@contextmanager
def hub_errors(reference: str, *, token: str | None) -> Iterator[None]:
    """Translate the Hub client's errors for ``reference`` into one-line hf-merge errors."""
    try:
        yield
    except HfMergeError:
        raise
    except HFValidationError:
        raise ModelNotFoundError(
            f"{reference} is neither an existing folder nor a valid repo id (USER/NAME or USER/NAME@REVISION)"
        ) from None
    except GatedRepoError:
        raise AuthenticationError(
            f"{reference} is gated: accept its conditions on the Hub and use a token with access"
        ) from None
    except RevisionNotFoundError:
        repo_id, _, revision = reference.partition("@")
        raise ModelNotFoundError(f"revision {revision or 'main'!r} not found in {repo_id}") from None
    except RepositoryNotFoundError:
        hint = " (or it is private: pass --token, set HF_TOKEN or run `hf auth login`)" if not token else " (or the token has no access to it)"
        raise ModelNotFoundError(f"repository {reference} not found on {endpoint()}{hint}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise ModelNotFoundError(f"cannot download {reference}: {one_line(error)}") from None
    except HfHubHTTPError as error:
        status = status_of(error)
        if status == 401:
            raise AuthenticationError(f"the Hub refused the token while reading {reference} (401: invalid credentials)") from None
        if status == 403:
            raise AuthenticationError(f"the token has no access to {reference} (403 Forbidden)") from None
        raise ModelNotFoundError(f"cannot download {reference} (HTTP {status}: {_server_message(error)})") from None
    except OSError as error:  # network failures (connection refused, timeouts) are OSErrors in the client
        raise ModelNotFoundError(f"cannot reach {endpoint()} to download {reference} ({one_line(error)})") from None
    except Exception as error:
        if type(error).__module__.startswith(("httpx", "httpcore")):
            raise ModelNotFoundError(f"cannot reach {endpoint()} to download {reference} ({one_line(error)})") from None
        raise


def status_of(error: BaseException) -> int | None:
    """The HTTP status of a Hub client error, or ``None`` when it has none (network, validation)."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _server_message(error: BaseException) -> str:
    message = getattr(error, "server_message", None)
    return one_line(message) if message else "no details"


def one_line(error: object) -> str:
    """The first line of an error's message, cut short: a Hub error can carry a whole response."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first[:200]
