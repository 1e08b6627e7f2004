"""The offline end-to-end demo (``hf-merge demo``, run by ``make demo``).

Everything a user does with the real Hub, on this machine alone:

1. build (or reuse) the offline model zoo: a small CLIP base and one fine-tuned expert per task;
2. start the embedded Hub-compatible server and publish the zoo there under readable repo ids;
3. run ``hf-merge merge`` by repo id, as a user would: OPCM, evaluation after every step, a model
   card, one push, and a Gradio Space published next to the model;
4. print where everything is, and optionally keep serving the Hub and the Space.

The merge runs as a real ``hf-merge`` subprocess pointed at the local server through ``HF_ENDPOINT``,
so the demo exercises exactly the code paths of a real Hub run.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.errors import HfMergeError
from hf_merge.log import get_logger

logger = get_logger(__name__)

DEMO_USER = "demo"


@dataclass
class DemoResult:
    """What the demo produced.

    Attributes:
        hub_url: Address of the embedded Hub server (gone once the demo returns, unless served).
        merged_repo: Repo id of the merged model on that server.
        space_repo: Repo id of the published Space.
        output_dir: Local merge result (weights, card, state, evaluation).
        commands: The ``hf-merge`` commands that were run, for a user to copy.
    """

    hub_url: str
    merged_repo: str
    space_repo: str
    output_dir: Path
    commands: list[str] = field(default_factory=list)


def run_demo(
    output_dir: str | Path = "demo-output",
    *,
    method: str = "tsv_m",
    tune: bool = True,
    eval_limit: int | None = 500,
    port: int = 0,
    serve: bool = False,
    space_port: int = 7860,
    zoo_config: Any = None,
) -> DemoResult:
    """Run the offline demo; with ``serve=True`` keep the Hub and the Space running until Ctrl-C.

    The default method is TSV-M with ``--tune``: the continual method that ranks first on the zoo's
    validation splits (``benchmarks/merge_quality.py``), its scaling chosen at every step on them.

    Each run starts from a clean demo Hub and merge folder under ``output_dir`` (both are rebuilt
    from the cached zoo in seconds), so the demo can be run again and again. ``zoo_config`` (a
    :class:`~hf_merge.zoo.ZooConfig`) picks another zoo than the default one.
    """
    from hf_merge.hub_server import LocalHubServer
    from hf_merge.zoo import build_zoo, push_zoo

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged_repo = f"{DEMO_USER}/zoo-clip-{method.replace('_', '-')}-merged"
    space_repo = f"{DEMO_USER}/zoo-clip-{method.replace('_', '-')}-demo"
    merged_dir = output_dir / merged_repo.split("/")[1]
    for previous in (output_dir / "hub", merged_dir):
        if previous.exists():
            print(f"Removing the previous demo run's {previous}", flush=True)
            shutil.rmtree(previous)
    print("[1/4] Building (or reusing) the offline model zoo ...", flush=True)
    zoo = build_zoo(config=zoo_config)
    # A fresh secret per run: the demo Hub lives only as long as this process, and no token is
    # ever written down or printed.
    token = secrets.token_hex(16)
    server = LocalHubServer(output_dir / "hub", port=port, tokens={DEMO_USER: token})
    server.start()
    try:
        print(f"[2/4] Local Hub running at {server.url}; publishing the zoo ...", flush=True)
        repos = push_zoo(server.url, token, DEMO_USER, paths=zoo)
        experts = [repos[task] for task in zoo.experts]
        tasks = [f"offline/{task}" for task in zoo.experts]
        argv = ["hf-merge", "merge", "--base", repos["base"], "--experts", *experts, "--method", method,
                "--eval", *tasks, "--eval-every-step", "--output", str(merged_dir),
                "--push-to-hub", merged_repo, "--space", space_repo]
        if tune:
            argv += ["--tune"]
        if eval_limit:
            argv += ["--eval-limit", str(eval_limit)]
        print("[3/4] Merging by repo id, as a user would:\n  " + shlex.join(argv), flush=True)
        _run_cli(argv, server.url, token)
        result = DemoResult(server.url, merged_repo, space_repo, merged_dir, [shlex.join(argv)])
        _print_summary(result)
        if serve:
            _serve(result, server.url, token, space_port)
        return result
    finally:
        server.stop()


def _client_env(endpoint: str, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HUB_DISABLE_XET="1", GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


def _run_cli(argv: list[str], endpoint: str, token: str) -> None:
    command = [sys.executable, "-m", "hf_merge.cli", *argv[1:]]
    completed = subprocess.run(command, env=_client_env(endpoint, token))
    if completed.returncode != 0:
        raise HfMergeError(f"the demo step `{shlex.join(argv[:2])}` failed (exit {completed.returncode}); "
                           "see the messages above")


def _print_summary(result: DemoResult) -> None:
    card = result.output_dir / "README.md"
    print("[4/4] Done.", flush=True)
    print(f"  merged model : {result.hub_url}/{result.merged_repo}")
    print(f"  Space        : {result.hub_url}/spaces/{result.space_repo}")
    print(f"  local result : {result.output_dir}")
    if card.is_file():
        print(f"  model card   : {card}")
    print("  Run `hf-merge demo --serve` to keep the Hub running and open the Space in a browser.")


def _serve(result: DemoResult, endpoint: str, token: str, space_port: int) -> None:
    print(f"Serving the Hub at {endpoint} and the Space at http://127.0.0.1:{space_port} (Ctrl-C stops).",
          flush=True)
    argv = ["hf-merge", "space", "run", result.merged_repo, "--port", str(space_port)]
    try:
        _run_cli(argv, endpoint, token)
    except KeyboardInterrupt:
        pass
