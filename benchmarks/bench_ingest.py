"""Ingest throughput (TIFF -> OME-Zarr, Blosc-zstd) against a plain copy of the same files."""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from metascreen import stages, synth

WELLS = 16
FIELDS = 8
SHAPE = (2048, 2048)
THREADS = 2
SETTINGS = {
    "preset": "imagexpress",
    "pattern": None,
    "channel_names": ["brightfield"],
    "pixel_size_um": 0.65,
    "compression_level": 3,
    "chunk_size": None,
    "shard": False,
    "bad_files": "error",
    "unexpected_wells": "warn",
}


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


def run(workdir: Path) -> dict:
    wells = _write_tiffs(workdir / "tiffs")
    total_mb = sum(path.stat().st_size for path in (workdir / "tiffs").iterdir()) / 1e6

    start = time.perf_counter()
    shutil.copytree(workdir / "tiffs", workdir / "copy")
    copy_seconds = time.perf_counter() - start

    # a fresh process, so that its peak memory is the ingest's alone
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        ingest_seconds = pool.submit(_ingest, workdir, wells).result()

    return {
        "input_mb": round(total_mb, 1),
        "threads": THREADS,
        "ingest_mb_s": total_mb / ingest_seconds,
        "copy_mb_s": total_mb / copy_seconds,
        "ratio": copy_seconds / ingest_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
