"""Progress output: one bar per phase in a terminal, one line per step without one, none when disabled."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios


def _run(args, *, tty: bool, extra_env=None, cwd=None) -> str:
    """Run ``hf-merge ARGS``; returns what it wrote to stderr (through a pseudo-terminal if ``tty``)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update({"COLUMNS": "120", **(extra_env or {})})
    command = [sys.executable, "-m", "hf_merge.cli", *args]
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a pty starts 0 columns wide
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def _merge_args(seeded_hub, output):
    return ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--method", "average", "--output", str(output)]


def test_without_a_terminal_each_step_is_one_line(seeded_hub, tmp_path):
    stderr = _run(_merge_args(seeded_hub, tmp_path / "out"), tty=False)
    assert "\r" not in stderr and "%|" not in stderr  # no bar at all, the Hub client's included
    steps = [line for line in stderr.splitlines() if "Merging " in line and "/2" in line]
    assert [line.split("hf_merge.progress: ")[-1] for line in steps] == [
        f"Merging 1/2: {seeded_hub.experts[0]}", f"Merging 2/2: {seeded_hub.experts[1]}"
    ]


def test_in_a_terminal_one_bar_and_no_nested_download_bars(seeded_hub, tmp_path):
    stderr = _run(_merge_args(seeded_hub, tmp_path / "out"), tty=True)
    assert "Merging" in stderr and "2/2" in stderr and "%|" in stderr  # the phase's bar ...
    # ... and no bar of the Hub client inside it (its bars count files, "it/s", or bytes, "B/s").
    assert "Fetching" not in stderr and "it/s" not in stderr and "B/s" not in stderr
    bars = {line.split(":")[0].strip() for line in stderr.replace("\r", "\n").splitlines() if "%|" in line}
    assert bars == {"Downloading the base", "Merging"}  # one bar per phase
    assert "Merging 1/2:" not in stderr  # the bar replaces the step lines


def test_disabled_progress_bars_leave_only_lines(seeded_hub, tmp_path):
    stderr = _run(_merge_args(seeded_hub, tmp_path / "out"), tty=True, extra_env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert "%|" not in stderr
    assert f"Merging 2/2: {seeded_hub.experts[1]}" in stderr
