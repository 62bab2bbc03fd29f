"""Peak memory of jobs against plate size: a 24-well against a 384-well plate.

Each job runs as the workflow runs it (``metascreen ...``), in a fresh process of its own whose
peak resident memory is its own (see :mod:`benchmarks.memory`). Per-well job: ingest of one
well, whose plan lists every well of the plate. Plate-wide job: collect, which joins a plate's
per-well measurement, prediction and field QC tables (synthetic, ``CELLS_PER_WELL`` cells of
``FEATURES`` features each) into its per-cell and field tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from benchmarks.memory import in_fresh_process
from metascreen import cli, config

SIZES = (24, 384)
FIELDS = 2
SHAPE = (256, 256)
CELLS_PER_WELL = 300
FEATURES = 40
INGEST = {
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
QC = config.validate_config({"plates": {"plate": {"images": "images"}}, "platemap": "platemap.csv"})["qc"]


def _wells(n: int) -> list[str]:
    columns = 24 if n > 96 else 6
    return [f"{'ABCDEFGHIJKLMNOP'[index // columns]}{index % columns + 1:02d}" for index in range(n)]


def _peak_rss_mb(*arguments: str, cwd: Path) -> float:
    """Run ``metascreen ...`` in a fresh process of its own and return its peak resident memory (MB)."""
    status, peak = in_fresh_process(cli.main, list(arguments), cwd=cwd)
    if status:
        raise RuntimeError(f"metascreen {arguments[0]} failed with status {status}")
    return peak


def _ingest_peak(workdir: Path, wells: list[str]) -> float:
    images = workdir / "images"
    images.mkdir(parents=True)
    field = np.random.default_rng(0).integers(0, 4096, SHAPE, dtype=np.uint16)
    for well in wells:
        for index in range(FIELDS):
            tifffile.imwrite(images / f"plate_{well}_s{index + 1}_w1.TIF", field)
    pd.DataFrame({"plate": "plate", "well": wells}).to_csv(workdir / "platemap.csv", index=False)
    settings = json.dumps(INGEST)
    _peak_rss_mb(
        "plan",
        *("--plate", "plate", "--images", "images", "--platemap", "platemap.csv", "--settings", settings),
        *("--plan", "plan.json", "--zarr", "plate.ome.zarr"),
        cwd=workdir,
    )
    return _peak_rss_mb(
        "ingest",
        *("--plan", "plan.json", "--zarr", "plate.ome.zarr", "--well", wells[0], "--settings", settings),
        *("--manifest", "ingest.json"),
        cwd=workdir,
    )


def _collect_peak(workdir: Path, wells: list[str]) -> float:
    rng = np.random.default_rng(0)
    measurements, predictions, fields = [], [], []
    for well in wells:
        keys = pd.DataFrame(
            {"plate": "plate", "well": well, "field": 0, "label": np.arange(1, CELLS_PER_WELL + 1)}
        )
        features = pd.DataFrame(
            rng.random((CELLS_PER_WELL, FEATURES)), columns=[f"f{i}" for i in range(FEATURES)]
        )
        probability = rng.random(CELLS_PER_WELL)
        classes = np.where(probability > 0.5, "high_potential", "low_potential")
        measurements.append(workdir / f"measure_{well}.parquet")
        predictions.append(workdir / f"classify_{well}.parquet")
        pd.concat([keys, features], axis=1).to_parquet(measurements[-1])
        keys.assign(probability=probability, predicted_class=classes).to_parquet(predictions[-1])
        fields.append(workdir / f"fields_{well}.parquet")
        pd.DataFrame(
            {
                "plate": "plate",
                "well": well,
                "field": [0],
                "n_cells": CELLS_PER_WELL,
                "focus": rng.uniform(0.5, 1.0),
                "saturated_fraction": 0.0,
                "contrast": 0.1,
                "nan_fraction": 0.0,
            }
        ).to_parquet(fields[-1])
    platemap = pd.DataFrame({"plate": "plate", "well": wells, "sample": "s", "train_class": ""})
    platemap.to_csv(workdir / "collect_platemap.csv", index=False)
    return _peak_rss_mb(
        "collect",
        "--measurements",
        *map(str, measurements),
        "--predictions",
        *map(str, predictions),
        "--fields",
        *map(str, fields),
        *("--platemap", "collect_platemap.csv", "--positive-class", "high_potential"),
        *("--qc", json.dumps(QC)),
        *("--output", "cells.parquet", "--fields-output", "fields.parquet"),
        cwd=workdir,
    )


def run(workdir: Path) -> dict:
    figures = {}
    for n in SIZES:
        wells = _wells(n)
        folder = workdir / f"wells_{n}"
        figures[f"ingest_well_peak_mb_{n}_wells"] = _ingest_peak(folder, wells)
        figures[f"collect_plate_peak_mb_{n}_wells"] = _collect_peak(folder, wells)
    small, large = SIZES
    figures["ingest_well_growth"] = (
        figures[f"ingest_well_peak_mb_{large}_wells"] / figures[f"ingest_well_peak_mb_{small}_wells"]
    )
    figures["collect_plate_growth"] = (
        figures[f"collect_plate_peak_mb_{large}_wells"] / figures[f"collect_plate_peak_mb_{small}_wells"]
    )
    return figures
