"""Ingest throughput (TIFF -> OME-Zarr, Blosc-zstd) against a plain copy of the same files.

Copy and ingest alternate ``REPEATS`` times on the same files and the median of the
per-pair ratios is reported: on a shared machine the copy's speed alone varies ~2x from
one minute to the next.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from metascreen import config, stages, synth

WELLS = 16
FIELDS = 8
SHAPE = (2048, 2048)
THREADS = 2
REPEATS = 3
# the ingest settings a user gets by default (compression on)
SETTINGS = config.validate_config({"plates": {"bench": {"images": "tiffs"}}, "platemap": "platemap.csv"})[
    "ingest"
]


def _write_tiffs(folder: Path) -> list[str]:
    """Realistic (label-free, noisy) uncompressed fields: one rendered field tiled with noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    tile, _, _ = synth.render_field(rng, fraction_positive=0.5, shape=(512, 512), n_cells=40)
    base = np.tile(tile, (SHAPE[0] // 512, SHAPE[1] // 512))
    wells = [f"{'ABCDEFGH'[index // 12]}{index % 12 + 1:02d}" for index in range(WELLS)]
    for well in wells:
        for field in range(FIELDS):
            noise = rng.poisson(2.0, SHAPE).astype(np.uint16)
            tifffile.imwrite(folder / f"bench_{well}_s{field + 1}_w1.TIF", base + noise)
    return wells


def _ingest(workdir: Path, wells: list[str]) -> float:
    """Plan and ingest every well; seconds taken (runs in a child process, see run)."""
    platemap = pd.DataFrame({"plate": "bench", "well": wells})
    plate = workdir / "bench.ome.zarr"
    start = time.perf_counter()
    stages.plan("bench", workdir / "tiffs", platemap, SETTINGS, workdir / "plan.json", plate)
    for well in wells:
        stages.ingest_well(
            workdir / "plan.json", plate, well, SETTINGS, workdir / f"{well}.json", threads=THREADS
        )
    return time.perf_counter() - start


def _settled() -> None:
    """Flush dirty pages, so that one phase's writeback does not slow the next."""
    os.sync()


def _copy(workdir: Path) -> float:
    _settled()
    start = time.perf_counter()
    shutil.copytree(workdir / "tiffs", workdir / "copy")
    seconds = time.perf_counter() - start
    shutil.rmtree(workdir / "copy")
    return seconds


def run(workdir: Path) -> dict:
    wells = _write_tiffs(workdir / "tiffs")
    total_mb = sum(path.stat().st_size for path in (workdir / "tiffs").iterdir()) / 1e6

    copy_seconds, ingest_seconds = [], []
    # a fresh process, so that its peak memory is the ingest's alone
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(REPEATS):
            copy_seconds.append(_copy(workdir))
            _settled()
            ingest_seconds.append(pool.submit(_ingest, workdir, wells).result())
            shutil.rmtree(workdir / "bench.ome.zarr")
    ratios = [copy / ingest for copy, ingest in zip(copy_seconds, ingest_seconds, strict=True)]

    return {
        "input_mb": round(total_mb, 1),
        "threads": THREADS,
        "compression_level": SETTINGS["compression_level"],
        "repeats": REPEATS,
        "ingest_mb_s": total_mb / float(np.median(ingest_seconds)),
        "copy_mb_s": total_mb / float(np.median(copy_seconds)),
        "ratio": float(np.median(ratios)),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
