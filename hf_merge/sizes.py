"""Byte counts as people read them (``5.0 MiB``), for messages and logs."""

from __future__ import annotations


def format_size(num_bytes: float) -> str:
    """``512 bytes``, ``5.0 MiB``, ``1.5 GiB`` (binary units; GiB is the largest)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"
