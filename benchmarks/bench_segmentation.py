"""Segmentation quality (AP@0.5) and single-core throughput of segment + measure + crops.

* ``ap50_synthetic``: pooled ``TP / (TP + FP + FN)`` of the default (label-free) backend
  over in-focus synthetic 512 x 512 fields (:func:`metascreen.synth.render_field`);
  ``ap50_synthetic_out_of_focus`` the same over strongly defocused fields.
* ``ap50_dsb``: the ``nuclei`` backend on the DSB 2018 nuclei image of the shared data
  (``../shared/data/dsb2018_nuclei``, 125 nuclei); NaN where that folder is absent.
* ``mpx_per_s_per_core``: megapixels per second of segmentation + measurement + crops
  (64 px, with mask) of 2048 x 2048 synthetic fields of ~600 cells, one thread (numpy /
  scipy / scikit-image run these single-threaded; BLAS threads are capped at 1), best of
  :data:`REPEATS` runs per field, so it is a per-core figure. Target >= 2.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # effective when numpy is not imported yet

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from metascreen import measure, segment, synth  # noqa: E402

DSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_nuclei"
SYNTHETIC_FIELDS = 6
BIG_SHAPE = (2048, 2048)
BIG_CELLS = 600
BIG_FIELDS = 2
REPEATS = 2


def _pooled_ap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    counts = np.zeros(3)
    for truth, labels in pairs:
        scores = segment.match_instances(truth, labels)
        counts += [scores["tp"], scores["fp"], scores["fn"]]
    return float(counts[0] / counts.sum()) if counts.sum() else 1.0


def _synthetic_ap(out_of_focus: bool) -> float:
    pairs = []
    for index in range(SYNTHETIC_FIELDS):
        rng = np.random.default_rng(1000 + index)
        image, truth, _ = synth.render_field(
            rng, fraction_positive=index / (SYNTHETIC_FIELDS - 1), n_cells=40, out_of_focus=out_of_focus
        )
        pairs.append((truth, segment.segment(image, "label_free")))
    return _pooled_ap(pairs)


def _dsb_ap() -> float:
    if not DSB.is_dir():
        return float("nan")
    image = tifffile.imread(DSB / "img2d.tif")
    truth = tifffile.imread(DSB / "mask2d.tif")
    return _pooled_ap([(truth, segment.segment(image, "nuclei"))])


def _throughput() -> dict[str, float]:
    stages = {"segment": 0.0, "measure": 0.0, "crops": 0.0}
    n_cells = 0
    for index in range(BIG_FIELDS):
        rng = np.random.default_rng(2000 + index)
        image, _, _ = synth.render_field(rng, fraction_positive=0.5, shape=BIG_SHAPE, n_cells=BIG_CELLS)
        best = dict.fromkeys(stages, np.inf)
        for _ in range(REPEATS):
            start = time.perf_counter()
            labels = segment.segment(image, "label_free")
            segmented = time.perf_counter()
            table = measure.measure_cells(labels, image)
            measured = time.perf_counter()
            measure.extract_crops(image, labels, table, size=64, with_mask=True)
            cropped = time.perf_counter()
            for name, seconds in zip(
                stages, (segmented - start, measured - segmented, cropped - measured), strict=True
            ):
                best[name] = min(best[name], seconds)
        n_cells += len(table)
        for name in stages:
            stages[name] += best[name]
    megapixels = BIG_FIELDS * BIG_SHAPE[0] * BIG_SHAPE[1] / 1e6
    total = sum(stages.values())
    return {
        "megapixels": megapixels,
        "cells": n_cells,
        **{f"{name}_s_per_field": seconds / BIG_FIELDS for name, seconds in stages.items()},
        "mpx_per_s_per_core": megapixels / total,
    }


def run(workdir: Path) -> dict:
    del workdir  # nothing is written
    return {
        "ap50_synthetic": _synthetic_ap(out_of_focus=False),
        "ap50_synthetic_out_of_focus": _synthetic_ap(out_of_focus=True),
        "ap50_dsb": _dsb_ap(),
        **_throughput(),
    }
