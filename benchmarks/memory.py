"""Peak memory of one job, measured in a fresh process of its own.

``getrusage(RUSAGE_CHILDREN)`` is the largest child so far, not the job at hand, and a
child's own ``ru_maxrss`` starts at its parent's peak: Linux carries the memory of the
process that forked it across ``exec``. The high-water mark of the child's own address
space (``VmHWM`` in ``/proc/self/status``, Linux) counts only what the job itself held.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def own_peak_rss_mb() -> float:
    """Peak resident memory (MB) of this process since it started (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM; peak memory is measured on Linux only")


def _measured(cwd: Path | None, function: Callable[..., Any], arguments: tuple) -> tuple[Any, float]:
    if cwd is not None:
        os.chdir(cwd)
    return function(*arguments), own_peak_rss_mb()


def in_fresh_process(
    function: Callable[..., Any], *arguments: Any, cwd: Path | None = None
) -> tuple[Any, float]:
    """Run ``function(*arguments)`` in a new (spawned) Python process, in folder ``cwd``.

    Returns its result and the process's peak resident memory (MB): the interpreter, the
    imports the job needs and the job, as when Snakemake starts it.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measured, cwd, function, arguments).result()
