"""The command-line programs: streaming-ssl-train (run_stream.py), streaming-ssl-evaluate (evaluate.py) and
streaming-ssl-compare (compare_runs.py)."""

from __future__ import annotations

import sys


def reexec_with_allocator(device: str) -> None:
    """On CPU, re-execute this program once with the faster allocator setting (streaming_ssl/allocator.py).

    Call first thing in a program's entry point, before any work; exits 2 with the reason if the setting
    asked for cannot be had."""
    from streaming_ssl import allocator

    try:
        allocator.reexec_if_needed(allocator.device_type_of(device))
    except allocator.AllocatorError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
