"""What a hostile or broken client may cost the local Hub: memory, threads, time and disk."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hf_merge.hub_server import LocalHubServer, objects
from hf_merge.hub_server.limits import HubLimits

TOKENS = {"alice": "alice-limits-token", "bob": "bob-limits-token"}
MiB = 1 << 20


# ---- bodies are not read for requests that are refused on their head ------------------------------
def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _raw_post(port: int, path: str, length: int, token: str | None, send_body: bool) -> tuple[str, str]:
    """Send a POST head announcing ``length`` bytes (and the bytes, when ``send_body``, from a
    thread that stops at the first refused write); returns the status line and the response head."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-ndjson\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    head += f"Content-Length: {length}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode())

    def send() -> None:
        chunk, sent = b"\0" * MiB, 0
        try:
            while sent < length:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: what it should do

    sender = threading.Thread(target=send) if send_body else None
    if sender:
        sender.start()
    response = b""
    try:
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except ConnectionResetError:
        pass
    finally:
        if sender:
            sender.join(timeout=120)
        sock.close()
    text = response.decode("latin-1")
    return text.split("\r\n", 1)[0], text.split("\r\n\r\n", 1)[0]


@pytest.fixture(scope="module")
def hub_process(tmp_path_factory):
    """A local Hub in its own process, so its memory can be read from /proc."""
    root = tmp_path_factory.mktemp("hub-limits-proc")
    code = ("import sys, json\nfrom hf_merge.hub_server import LocalHubServer\n"
            "server = LocalHubServer(sys.argv[1], tokens=json.loads(sys.argv[2]))\n"
            "print(server.port, flush=True)\nserver.serve_forever()\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(root), json.dumps(TOKENS)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        port = int(process.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        HfApi(endpoint=url, token=TOKENS["alice"]).create_repo("alice/target")
        yield process, port
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/api/models/alice/target/commit/main", None, "401"),  # no token
        ("/api/models/alice/target/commit/main", "hf_wrong", "401"),  # a token of nobody
        ("/api/no/such/route", None, "404"),  # unknown route
        ("/api/models/alice/target/commit/main", TOKENS["bob"], "403"),  # not bob's repo
        ("/api/models/alice/target/commit/main", TOKENS["alice"], "413"),  # over the 64 MiB commit cap
    ],
)
def test_refusals_are_answered_on_the_head_and_close_the_connection(hub_process, path, token, status):
    _, port = hub_process
    # Nothing of the 400 MB is sent: the answer must come without the server waiting for it.
    line, head = _raw_post(port, path, 400 * MiB, token, send_body=False)
    assert line.split()[1] == status, line
    assert "Connection: close" in head


def test_big_bodies_of_refused_requests_do_not_grow_the_server(hub_process):
    process, port = hub_process
    peak_before = _status(process.pid, "VmHWM")
    cases = [("/api/models/alice/target/commit/main", None), ("/api/models/alice/target/commit/main", "hf_wrong"),
             ("/api/no/such/route", None), ("/api/models/alice/target/commit/main", TOKENS["alice"])]
    for path, token in cases:
        _raw_post(port, path, 400 * MiB, token, send_body=True)
    growth = _status(process.pid, "VmHWM") - peak_before
    # 4 x 400 MB were offered; reading any one of them whole would show here.
    assert growth < 40 * MiB, f"server peak memory grew by {growth / MiB:.0f} MiB"
    # ...and it still serves.
    assert httpx.get(f"http://127.0.0.1:{port}/api/models/alice/target").status_code == 200


# ---- caps, timeouts and the connection limit, on a server with small limits -------------------------
@pytest.fixture()
def small_hub(tmp_path):
    limits = HubLimits(json_body_bytes=4096, commit_body_bytes=64 * 1024, header_timeout_s=1.0,
                       keepalive_timeout_s=0.5, io_timeout_s=2.0, max_connections=6)
    with LocalHubServer(tmp_path / "hub", tokens=TOKENS, limits=limits) as hub:
        yield hub


def test_json_and_commit_bodies_over_their_cap_are_413(small_hub):
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    response = httpx.post(f"{small_hub.url}/api/repos/create", headers=auth, json={"name": "x", "pad": "a" * 5000})
    assert response.status_code == 413 and "4096 bytes" in response.headers["X-Error-Message"]
    api = HfApi(endpoint=small_hub.url, token=TOKENS["alice"])
    api.create_repo("alice/capped")
    with pytest.raises(HfHubHTTPError) as too_big:
        api.upload_file(path_or_fileobj=b"x" * (80 * 1024), path_in_repo="big.txt", repo_id="alice/capped")
    assert too_big.value.response.status_code == 413
    api.upload_file(path_or_fileobj=b"x" * 1000, path_in_repo="small.txt", repo_id="alice/capped")
    assert "small.txt" in api.list_repo_files("alice/capped")
    # Chunked bodies are capped as they arrive.
    chunked = httpx.post(f"{small_hub.url}/api/repos/create", headers=auth, content=iter([b"{" + b" " * 3000, b" " * 3000]))
    assert chunked.status_code == 413


def test_deeply_nested_json_is_a_400_not_a_500(tmp_path):
    with LocalHubServer(tmp_path / "hub", tokens=TOKENS) as hub:
        auth = {"Authorization": f"Bearer {TOKENS['alice']}", "Content-Type": "application/json"}
        deep = b"[" * 100_000 + b"]" * 100_000
        for path in ("/api/settings/webhooks", "/api/repos/create", "/api/validate-yaml"):
            response = httpx.post(f"{hub.url}{path}", headers=auth, content=deep)
            assert response.status_code == 400, path
            assert "nested too deeply" in response.json()["error"]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_idle_and_slow_connections_are_closed_after_the_header_timeout(small_hub):
    idle = [socket.create_connection(("127.0.0.1", small_hub.port), timeout=10) for _ in range(3)]
    slow = socket.create_connection(("127.0.0.1", small_hub.port), timeout=10)
    start = time.monotonic()
    slow.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\n")
    for byte in b"Host: x\r\nX-Slow: 1234567890":  # a byte every 0.1 s: each read is quick, the head never ends
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    assert all(_closed_by_server(sock) for sock in [*idle, slow])
    # The slow client got no answer: it was cut at the 1 s deadline, before its 2.7 s of trickle ended.
    assert time.monotonic() - start < 8
    # A keep-alive connection that goes idle after a request is closed as well.
    keep = socket.create_connection(("127.0.0.1", small_hub.port), timeout=10)
    keep.sendall(b"GET /api/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep.recv(65536).startswith(b"HTTP/1.1 200")
    began = time.monotonic()
    assert _closed_by_server(keep)
    assert 0.2 < time.monotonic() - began < 8
    for sock in [*idle, slow, keep]:
        sock.close()


def test_connections_beyond_the_limit_get_503_and_threads_stay_bounded(small_hub):
    before = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", small_hub.port), timeout=10) for _ in range(6)]
    time.sleep(0.3)
    extra = [socket.create_connection(("127.0.0.1", small_hub.port), timeout=10) for _ in range(4)]
    answers = [sock.recv(1024) for sock in extra]
    assert all(answer.startswith(b"HTTP/1.1 503") and b"Retry-After" in answer for answer in answers)
    assert threading.active_count() - before <= 6 + 2  # the connection threads, the deadline watcher
    for sock in held + extra:
        sock.close()
    # Once the held connections are gone (closed here, or by the header timeout), it serves again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = httpx.get(f"{small_hub.url}/api/models")
        if response.status_code == 200:
            break
        time.sleep(0.2)
    assert response.status_code == 200


def test_expect_100_continue_is_answered_only_by_a_route_that_reads_the_body(small_hub):
    head = ("POST /api/models/alice/x/commit/main HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            "Content-Length: 300000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", small_hub.port), timeout=10) as sock:
        sock.sendall(head.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")  # the final answer, no "100 Continue"
    HfApi(endpoint=small_hub.url, token=TOKENS["alice"]).create_repo("alice/expect")
    body = json.dumps({"paths": ["README.md"]}).encode()
    head = ("POST /api/models/alice/expect/paths-info/main HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", small_hub.port), timeout=10) as sock:
        sock.sendall(head.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_lfs_upload_whose_length_is_not_the_announced_size_is_refused_unread(small_hub):
    api = HfApi(endpoint=small_hub.url, token=TOKENS["alice"])
    api.create_repo("alice/lfs-length")
    oid = "ab" * 32
    batch = httpx.post(f"{small_hub.url}/alice/lfs-length.git/info/lfs/objects/batch",
                       headers={"Authorization": f"Bearer {TOKENS['alice']}"},
                       json={"operation": "upload", "objects": [{"oid": oid, "size": 10}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    port = small_hub.port
    line, head = _raw_put(port, href.split(str(port), 1)[1], 300 * MiB)
    assert line.split()[1] == "400" and "Connection: close" in head


def _raw_put(port: int, path: str, length: int) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        text = sock.recv(65536).decode("latin-1")
    return text.split("\r\n", 1)[0], text.split("\r\n\r\n", 1)[0]


# ---- disk full, leftovers, garbage collection ----------------------------------------------------
class _FullDisk(types.SimpleNamespace):
    """``os`` as the object store sees it, on a disk with no space left."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_507_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    with LocalHubServer(tmp_path / "hub", tokens=TOKENS) as hub:
        api = HfApi(endpoint=hub.url, token=TOKENS["alice"])
        api.create_repo("alice/full")
        monkeypatch.setattr(objects, "os", _FullDisk())
        for data, name in ((b"regular file", "notes.txt"), (os.urandom(4096), "weights.safetensors")):
            with pytest.raises((HfHubHTTPError, RuntimeError)) as raised:
                api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id="alice/full")
            # The client wraps a failed LFS upload in a RuntimeError whose cause is the HTTP error.
            full = raised.value if isinstance(raised.value, HfHubHTTPError) else raised.value.__cause__
            assert isinstance(full, HfHubHTTPError) and full.response.status_code == 507
            assert "no space left" in full.response.headers["X-Error-Message"].lower()
        assert list((tmp_path / "hub" / "tmp").iterdir()) == []
        monkeypatch.undo()
        api.upload_file(path_or_fileobj=b"room again", path_in_repo="notes.txt", repo_id="alice/full")
        assert api.list_repo_files("alice/full") == [".gitattributes", "notes.txt"]


def test_leftover_temporaries_are_removed_at_startup(tmp_path):
    root = tmp_path / "hub"
    with LocalHubServer(root, tokens=TOKENS):
        pass
    for name in ("a" * 32, "b" * 32):
        (root / "tmp" / name).write_bytes(b"half a write")
    (root / "tmp" / ("c" * 32)).mkdir()  # a repo deletion cut short
    (root / "tmp" / ("c" * 32) / "refs.json").write_text("{}")
    with LocalHubServer(root, tokens=TOKENS) as hub:
        assert list((root / "tmp").iterdir()) == []
        assert hub.api.storage.objects.removed_temporaries == 3


def _objects(root: Path, kind: str) -> set[str]:
    return {path.name for path in (root / "objects" / kind).glob("*/*")}


def test_deleting_repos_collects_what_no_repo_references(tmp_path):
    root = tmp_path / "hub"
    shared, own = os.urandom(200_000), os.urandom(300_000)
    with LocalHubServer(root, tokens=TOKENS) as hub:
        alice = HfApi(endpoint=hub.url, token=TOKENS["alice"])
        bob = HfApi(endpoint=hub.url, token=TOKENS["bob"])
        for api, repo in ((alice, "alice/one"), (bob, "bob/two")):
            api.create_repo(repo)
            api.create_commit(repo, [CommitOperationAdd("shared.safetensors", shared),
                                     CommitOperationAdd(f"{repo.split('/')[1]}.txt", repo.encode())], commit_message="add")
        alice.upload_file(path_or_fileobj=own, path_in_repo="own.safetensors", repo_id="alice/one")
        lfs_before = _objects(root, "lfs")
        assert len(lfs_before) == 2  # the shared file is stored once
        alice.delete_repo("alice/one")
        assert len(_objects(root, "lfs")) == 1  # alice's own file is gone; bob's copy of the shared one stays
        assert bob.hf_hub_download("bob/two", "shared.safetensors", cache_dir=tmp_path / "c")
        bob.delete_repo("bob/two")
        assert _objects(root, "lfs") == set()
        assert _objects(root, "blobs") == set()
        # The freed space is usable again at once.
        alice.create_repo(f"alice/again-{uuid.uuid4().hex[:6]}")
