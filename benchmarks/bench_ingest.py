"""Ingest throughput (TIFF -> OME-Zarr HCS plate) against ome-zarr-py's own writer on the same files.

What a user would otherwise run: ``ome_zarr.writer.write_image`` with its default pyramid
(scale factors 2-16, resized) for every field, with the plate and well metadata writers.
Ours, ome-zarr-py's and a plain copy of the files (for information: its speed varies ~5x
with the page cache) alternate ``REPEATS`` times on the same files; the median of the
per-repeat ratios is reported. Each writer runs in a fresh process of its own, whose peak
resident memory is reported (see :mod:`benchmarks.memory`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import tifffile
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

from benchmarks.memory import in_fresh_process
from metascreen import config, ngff, stages, synth

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


def _ome_zarr_py(workdir: Path, wells: list[str]) -> float:
    """The same plate written by ome-zarr-py (default pyramid); seconds taken."""
    start = time.perf_counter()
    root = zarr.open_group(str(workdir / "ome_zarr_py.ome.zarr"), mode="w", zarr_format=3)
    rows, columns = sorted({well[0] for well in wells}), sorted({well[1:] for well in wells})
    write_plate_metadata(
        root, rows, columns, [ngff.well_path(well) for well in wells], fmt=FormatV05(), field_count=FIELDS
    )
    with dask.config.set(scheduler="threads", num_workers=THREADS):
        for well in wells:
            well_group = root.require_group(well[0]).require_group(well[1:])
            write_well_metadata(well_group, [str(field) for field in range(FIELDS)], fmt=FormatV05())
            for field in range(FIELDS):
                image = tifffile.imread(workdir / "tiffs" / f"bench_{well}_s{field + 1}_w1.TIF")
                write_image(image, well_group.require_group(str(field)), axes="yx", fmt=FormatV05())
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

    copy_seconds, ingest_seconds, reference_seconds = [], [], []
    ingest_peaks, reference_peaks = [], []
    for _ in range(REPEATS):
        copy_seconds.append(_copy(workdir))
        _settled()
        seconds, peak = in_fresh_process(_ingest, workdir, wells)
        ingest_seconds.append(seconds)
        ingest_peaks.append(peak)
        shutil.rmtree(workdir / "bench.ome.zarr")
        _settled()
        seconds, peak = in_fresh_process(_ome_zarr_py, workdir, wells)
        reference_seconds.append(seconds)
        reference_peaks.append(peak)
        shutil.rmtree(workdir / "ome_zarr_py.ome.zarr")
    versus_copy = [copy / ingest for copy, ingest in zip(copy_seconds, ingest_seconds, strict=True)]
    versus_reference = [
        reference / ingest for reference, ingest in zip(reference_seconds, ingest_seconds, strict=True)
    ]

    return {
        "input_mb": round(total_mb, 1),
        "threads": THREADS,
        "compression_level": SETTINGS["compression_level"],
        "repeats": REPEATS,
        "ingest_mb_s": total_mb / float(np.median(ingest_seconds)),
        "ome_zarr_py_mb_s": total_mb / float(np.median(reference_seconds)),
        "ratio_vs_ome_zarr_py": float(np.median(versus_reference)),
        "ratio_vs_ome_zarr_py_min": min(versus_reference),
        "ratio_vs_ome_zarr_py_max": max(versus_reference),
        "copy_mb_s": total_mb / float(np.median(copy_seconds)),
        "ratio_vs_copy": float(np.median(versus_copy)),
        "peak_rss_mb": max(ingest_peaks),
        "ome_zarr_py_peak_rss_mb": max(reference_peaks),
    }
