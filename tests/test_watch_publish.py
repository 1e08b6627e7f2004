"""A watcher's pushes: retried with backoff on server errors, never on refusals; tokens stay out of logs."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import HfHubHTTPError

from hf_merge.errors import PushError
from hf_merge.hub import client as hub
from hf_merge.hub import push as publish
from hf_merge.watch.publish import RetryPolicy, StaleParentError, push_files

TOKEN = "hf_secret_token_never_logged_123"


def _error(status: int) -> HfHubHTTPError:
    return HfHubHTTPError(f"{status} error", response=SimpleNamespace(status_code=status, headers={}, url="u", request=None))


class _Api:
    def __init__(self, failures: list[int]):
        self.failures, self.calls = list(failures), []

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(kwargs)
        if self.failures:
            raise _error(self.failures.pop(0))
        return SimpleNamespace(commit_url="http://hub/commit/1", pr_url=None)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text("card")
    return tmp_path


def _push(monkeypatch, folder, failures, sleeps):
    api = _Api(failures)
    monkeypatch.setattr(hub, "api_client", lambda token: api)
    monkeypatch.setattr(publish.time, "sleep", sleeps.append)
    url = push_files(folder, "alice/m", [Path("README.md")], token=TOKEN, parent_commit="a" * 40, message="m",
                     retry=RetryPolicy(attempts=4, first_delay_s=1.0, max_delay_s=3.0))
    return url, api


def test_server_errors_are_retried_with_exponential_backoff(monkeypatch, folder, caplog):
    sleeps: list[float] = []
    with caplog.at_level(logging.DEBUG):
        url, api = _push(monkeypatch, folder, [500, 503, 502], sleeps)
    assert url == "http://hub/commit/1" and len(api.calls) == 4
    assert sleeps == [1.0, 2.0, 3.0]
    assert all(call["parent_commit"] == "a" * 40 for call in api.calls)
    assert "retrying in" in caplog.text and TOKEN not in caplog.text


def test_refusals_and_a_moved_repo_are_not_retried(monkeypatch, folder):
    sleeps: list[float] = []
    with pytest.raises(PushError, match="the token was refused or lacks write access") as error:
        _push(monkeypatch, folder, [403], sleeps)
    assert not isinstance(error.value, StaleParentError) and TOKEN not in str(error.value)
    with pytest.raises(StaleParentError, match="changed since aaaaaaaaaa"):
        _push(monkeypatch, folder, [412], sleeps)
    with pytest.raises(PushError, match="server error 500"):
        _push(monkeypatch, folder, [500] * 4, sleeps)
    assert sleeps == [1.0, 2.0, 3.0]  # only the last push waited, and gave up after 4 attempts


def test_merge_and_add_push_through_the_same_retrying_path(monkeypatch, tmp_path):
    """``push_merge`` (merge, add, push) retries a server error like the watcher's pushes do."""
    from hf_merge.hub.push import push_merge

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    api = _Api([503])
    api.create_repo = lambda *args, **kwargs: None
    sleeps: list[float] = []
    monkeypatch.setattr(hub, "api_client", lambda token: api)
    monkeypatch.setattr(publish.time, "sleep", sleeps.append)
    url = push_merge(tmp_path, "alice/m", token=TOKEN, retry=RetryPolicy(attempts=3, first_delay_s=1.0))
    assert url == "http://hub/commit/1" and sleeps == [1.0] and len(api.calls) == 2
    api.failures = [403]
    with pytest.raises(PushError) as error:
        push_merge(tmp_path, "alice/m", token=TOKEN, retry=RetryPolicy(attempts=3, first_delay_s=1.0))
    assert error.value.retry_command == f"hf-merge push {tmp_path} --repo-id alice/m" and sleeps == [1.0]
