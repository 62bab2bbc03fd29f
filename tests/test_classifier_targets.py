"""The classifier's targets on held-out wells of a small synthetic plate, through stages.train.

The full demo plate (made by ``metascreen synth``) must reach accuracy >= 0.97, at least 3
points above the logistic baseline on morphology features, and ECE <= 0.05 (measured with four
stages on a CPU without bfloat16: 0.978, baseline 0.915, ECE 0.011; with three stages: 0.982,
0.910, 0.018). That run takes minutes, so this test guards the same path on a smaller plate,
with margins: 4 + 4 pure wells of 12 rendered 256x256 fields each (~120 cells per well),
segmented, measured and cropped exactly as the pipeline does, trained with the config's
defaults except a narrower network (``width`` 8), smaller batches (16) and 40 epochs, so that
it runs in about a minute on 2 CPU cores. Measured (CPU, torch 2.13, seed 0, 2 held-out wells,
238 cells): accuracy 0.966 (three stages: 0.954), baseline 0.912, ECE 0.020 (baseline 0.026).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from metascreen import config, stages, synth
from metascreen.segment import segment_label_free

WELLS_PER_CLASS = 4
FIELDS_PER_WELL = 12
FIELD_SHAPE = (256, 256)
CELLS_PER_FIELD = 10
CLASSES = {"negative": "low", "positive": "high"}
# Overrides of the schema defaults that keep the test within its time budget.
FAST = {"width": 8, "batch_size": 16, "epochs": 40}

MIN_ACCURACY = 0.93
MIN_MARGIN_OVER_BASELINE = 0.02
MAX_ECE = 0.08


def _defaults(section: str) -> dict:
    properties = config.load_schema("config")["properties"][section]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def _write_well(tmp_path, well: str, positive: bool, crop_settings: dict) -> tuple:
    """Render, segment, measure and crop one pure well; write its table and crops."""
    rng = np.random.default_rng([int(positive), int(well[1:]), 2026])
    fields = []
    for field in range(FIELDS_PER_WELL):
        image, _, _ = synth.render_field(
            rng, fraction_positive=float(positive), shape=FIELD_SHAPE, n_cells=CELLS_PER_FIELD
        )
        fields.append((field, image, segment_label_free(image)))
    cells, crops = stages.measure_fields(fields, "synth", well, crop_settings)
    table_path, crops_path = tmp_path / f"{well}.parquet", tmp_path / f"{well}.zarr"
    stages.write_crops(crops_path, crops, {})
    stages.write_table(cells, table_path)
    return table_path, crops_path


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("targets")
    crop_settings = _defaults("measure")
    settings = {**_defaults("train"), **FAST}
    settings.pop("model")
    wells = [(f"A{i + 1:02d}", False) for i in range(WELLS_PER_CLASS)]
    wells += [(f"B{i + 1:02d}", True) for i in range(WELLS_PER_CLASS)]
    start = time.perf_counter()
    paths = [_write_well(tmp_path, well, positive, crop_settings) for well, positive in wells]
    data_seconds = time.perf_counter() - start
    platemap = pd.DataFrame(
        {
            "plate": "synth",
            "well": [well for well, _ in wells],
            "train_class": [CLASSES["positive" if positive else "negative"] for _, positive in wells],
        }
    )
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        stages.train(
            [table for table, _ in paths],
            [crops for _, crops in paths],
            platemap,
            CLASSES,
            settings,
            crop_settings,
            tmp_path / "model" / "model.safetensors",
            tmp_path / "model" / "evaluation.json",
            threads=2,
        )
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - start
    result = json.loads((tmp_path / "model" / "evaluation.json").read_text())
    print(
        f"\nsynthetic held-out wells: accuracy {result['accuracy']:.4f} (baseline "
        f"{result['baseline_accuracy']:.4f}), ECE {result['ece']:.4f} (baseline "
        f"{result['baseline_ece']:.4f}), ROC-AUC {result['roc_auc']:.4f}, "
        f"{result['n_test_cells']} test cells; data {data_seconds:.1f} s, training {train_seconds:.1f} s"
    )
    return result


def test_cnn_beats_targets_on_held_out_wells(evaluation: dict) -> None:
    assert evaluation["accuracy"] >= MIN_ACCURACY
    assert evaluation["balanced_accuracy"] >= MIN_ACCURACY
    assert evaluation["accuracy"] >= evaluation["baseline_accuracy"] + MIN_MARGIN_OVER_BASELINE
    assert evaluation["ece"] <= MAX_ECE


def test_evaluation_reports_model_and_baseline_side_by_side(evaluation: dict) -> None:
    n_test = evaluation["n_test_cells"]
    assert n_test >= 150
    for prefix in ("", "baseline_"):
        for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece"):
            assert 0.0 <= evaluation[prefix + key] <= 1.0, prefix + key
        matrix = np.asarray(evaluation[prefix + "confusion_matrix"])
        assert matrix.shape == (2, 2) and matrix.sum() == n_test
    baseline = evaluation["baseline"]
    assert baseline["accuracy"] == evaluation["baseline_accuracy"]
    assert baseline["ece"] == evaluation["baseline_ece"]
    assert sum(baseline["reliability"]["count"]) == sum(evaluation["reliability"]["count"]) == n_test
    # Split by well: the held-out wells are neither training nor validation wells.
    wells = evaluation["wells"]
    assert len(wells["test"]) == len(wells["val"]) == 2
    assert not set(wells["test"]) & (set(wells["train"]) | set(wells["val"]))
    assert 0 < evaluation["temperature"]
