"""Label-free segmentation and instance matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
import zarr

from metascreen import ngff, stages
from metascreen.config import validate_config
from metascreen.segment import (
    DEFAULT_METHOD,
    SEGMENTERS,
    error_types,
    match_instances,
    segment,
    segment_label_free,
    segment_nuclei,
)
from metascreen.synth import render_field

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def discs(
    centres: list[tuple[int, int]],
    *,
    radius: float = 14.0,
    contrast: float = -0.2,
    shape: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy image of uniform discs on a flat background, and their truth labels.

    Overlapping discs are cut along the line of equal distance to their centres.
    """
    rows, cols = np.indices(shape)
    distance = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    truth = np.where(distance.min(0) <= radius, distance.argmin(0) + 1, 0).astype(np.int32)
    image = np.full(shape, 1000.0) * np.where(truth > 0, 1.0 + contrast, 1.0)
    return image + np.random.default_rng(seed).normal(0.0, 10.0, shape), truth


# ------------------------------------------------------------------ segment_label_free


@pytest.mark.parametrize(
    ("centres", "contrast"),
    [
        ([(64, 50), (64, 78)], -0.2),  # dark discs touching at one point
        ([(64, 52), (64, 76)], -0.2),  # pressed together along a 15 px long contact
        ([(64, 50), (64, 78)], 0.2),  # bright discs (the other polarity)
    ],
)
def test_touching_discs_are_split_in_two(centres: list[tuple[int, int]], contrast: float):
    image, truth = discs(centres, contrast=contrast)
    labels = segment_label_free(image)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    assert labels.max() == 2
    scores = match_instances(truth, labels)
    assert scores["tp"] == 2 and scores["mean_matched_iou"] > 0.85


def test_separate_discs_with_uneven_illumination():
    image, truth = discs([(30, 30), (30, 98), (98, 64)], shape=(128, 128))
    rows, cols = np.indices(image.shape)
    image *= 1.0 - 0.3 * ((rows - 40) ** 2 + (cols - 90) ** 2) / 128**2  # strong vignetting
    labels = segment_label_free(image.astype(np.uint16))
    assert match_instances(truth, labels)["ap"] == 1.0


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((96, 96)),
        np.full((96, 96), 2000, np.uint16),
        np.random.default_rng(0).normal(2000.0, 40.0, (256, 256)),
        np.random.default_rng(1).poisson(2000.0, (256, 256)).astype(np.uint16)
        * np.linspace(0.7, 1.0, 256)[None, :],
    ],
    ids=["zeros", "constant", "gaussian-noise", "poisson-noise-with-gradient"],
)
def test_no_objects_without_cells(image: np.ndarray):
    labels = segment_label_free(image)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert labels.max() == 0


def test_empty_synthetic_fields_give_no_objects():
    for seed in range(3):
        image, _, _ = render_field(np.random.default_rng(seed), fraction_positive=0.5, n_cells=0)
        assert segment_label_free(image).max() == 0


def test_does_not_modify_its_input():
    image, _ = discs([(64, 64)])
    before = image.copy()
    segment_label_free(image)
    np.testing.assert_array_equal(image, before)


def test_area_limits():
    image, _ = discs([(30, 30), (90, 90)], radius=8.0)  # discs of ~200 px, masks of ~260 px
    assert segment_label_free(image).max() == 2
    assert segment_label_free(image, min_area=300).max() == 0
    assert segment_label_free(image, max_area=230).max() == 0


@pytest.mark.parametrize("image", [np.zeros((4, 8, 8)), np.zeros((8, 8), complex)])
def test_rejects_bad_images(image: np.ndarray):
    with pytest.raises(ValueError):
        segment_label_free(image)


def test_reaches_target_average_precision_on_synthetic_fields():
    totals = np.zeros(3)
    for seed in range(4):
        rng = np.random.default_rng(500 + seed)
        image, truth, _ = render_field(rng, fraction_positive=seed / 3, n_cells=40)
        scores = match_instances(truth, segment_label_free(image))
        totals += [scores["tp"], scores["fp"], scores["fn"]]
    tp, fp, fn = totals
    assert tp / (tp + fp + fn) >= 0.85  # target 0.90; measured ~0.97-0.99


# ------------------------------------------------------------------ match_instances


def test_match_instances_counts():
    truth = np.zeros((20, 40), np.int32)
    truth[0:10, 0:10] = 1  # predicted exactly
    truth[0:10, 15:25] = 2  # predicted shifted: IoU 60/140 < 0.5
    truth[12:20, 30:38] = 3  # missed
    pred = np.zeros_like(truth)
    pred[0:10, 0:10] = 7  # arbitrary, non-sequential ids
    pred[0:10, 19:29] = 3
    pred[12:16, 0:4] = 42  # spurious
    scores = match_instances(truth, pred)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 2, 2)
    assert scores["ap"] == pytest.approx(1 / 5)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["mean_matched_iou"] == 1.0


def test_error_types_tell_merges_splits_misses_and_shapes_apart():
    truth = np.zeros((40, 60), np.int32)
    truth[0:10, 0:10] = 1  # found
    truth[0:10, 12:20] = 2  # joined to its neighbour 3 by one prediction
    truth[0:10, 20:28] = 3
    truth[15:25, 0:10] = 4  # cut in two
    truth[15:25, 20:30] = 5  # not found
    truth[30:36, 30:36] = 6  # found shifted: IoU 24 / 48
    pred = np.zeros_like(truth)
    pred[0:10, 0:10] = 9
    pred[0:10, 12:28] = 4
    pred[15:25, 0:5], pred[15:25, 5:10] = 5, 6
    pred[32:38, 30:36] = 2
    pred[30:40, 50:60] = 7  # on background
    errors = error_types(truth, pred)
    assert errors == {
        "n_true": 6,
        "matched": 1,
        "missed": 1,
        "merged": 2,
        "split": 1,
        "shape": 1,
        "n_pred": 6,
        "spurious": 1,
    }
    assert error_types(truth, truth)["matched"] == 6
    assert error_types(truth, np.zeros_like(truth))["missed"] == 6
    with pytest.raises(ValueError, match="shape"):
        error_types(truth, pred[:4])


def test_match_instances_iou_threshold():
    truth = np.zeros((10, 30), np.int32)
    truth[:, 0:10] = 1
    pred = np.zeros_like(truth)
    pred[:, 2:12] = 1  # IoU = 80 / 120 = 2/3
    assert match_instances(truth, pred)["mean_matched_iou"] == pytest.approx(2 / 3)
    assert match_instances(truth, pred, iou_threshold=0.6)["tp"] == 1
    assert match_instances(truth, pred, iou_threshold=0.7)["tp"] == 0


def test_match_instances_edge_cases():
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 1
    assert match_instances(empty, empty)["ap"] == 1.0
    assert match_instances(one, one)["ap"] == 1.0
    scores = match_instances(one, empty)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["ap"]) == (0, 0, 1, 0.0)
    assert np.isnan(scores["mean_matched_iou"])
    with pytest.raises(ValueError, match="shape"):
        match_instances(one, one[:4])
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(one, one, iou_threshold=0.3)


# ------------------------------------------------------------------ segment_nuclei


def nuclei(
    centres: list[tuple[int, int]],
    *,
    radius: float = 9.0,
    brightness: list[float] | None = None,
    shape: tuple[int, int] = (160, 160),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fluorescence-like image of bright, soft-edged nuclei on a dark noisy background, and
    their truth labels (cut along the line of equal distance where they touch)."""
    rows, cols = np.indices(shape)
    distance = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    truth = np.where(distance.min(0) <= radius, distance.argmin(0) + 1, 0).astype(np.int32)
    brightness = brightness or [200.0] * len(centres)
    # a plateau with a soft rim: the profile falls to half at the truth radius
    profiles = np.stack(
        [level / (1.0 + np.exp((d - radius) / 1.0)) for level, d in zip(brightness, distance, strict=True)]
    )
    image = 20.0 + profiles.max(0) + np.random.default_rng(seed).normal(0.0, 3.0, shape)
    return image.astype(np.float32), truth


def test_nuclei_of_different_brightness_touching_and_apart():
    centres = [(40, 40), (40, 57), (110, 50), (60, 120), (120, 120)]
    image, truth = nuclei(centres, brightness=[200.0, 200.0, 40.0, 400.0, 80.0])
    labels = segment_nuclei(image, nucleus_radius=9.0)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    scores = match_instances(truth, labels)
    assert scores["tp"] == 5 and scores["fp"] == 0
    assert scores["mean_matched_iou"] > 0.8  # half-maximum edges fit dim and bright nuclei alike


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((96, 96)),
        np.full((96, 96), 2000, np.uint16),
        np.random.default_rng(0).normal(100.0, 5.0, (256, 256)),
        np.random.default_rng(1).poisson(50.0, (256, 256)).astype(np.uint16),
    ],
    ids=["zeros", "constant", "gaussian-noise", "poisson-noise"],
)
def test_nuclei_no_objects_without_nuclei(image: np.ndarray):
    labels = segment_nuclei(image)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert labels.max() == 0


def test_nuclei_on_a_noise_free_background():
    image, truth = nuclei([(40, 40), (110, 110)])
    image = np.clip(image - 40.0, 0.0, None)  # background clipped to exactly 0
    assert match_instances(truth, segment_nuclei(image))["tp"] == 2


def test_nuclei_area_limits_and_bad_inputs():
    image, _ = nuclei([(40, 40), (110, 110)])
    assert segment_nuclei(image).max() == 2
    assert segment_nuclei(image, min_area=400).max() == 0
    assert segment_nuclei(image, max_area=100).max() == 0
    with pytest.raises(ValueError):
        segment_nuclei(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="edge_fraction"):
        segment_nuclei(image, edge_fraction=1.0)
    with pytest.raises(ValueError, match="nucleus_radius"):
        segment_nuclei(image, nucleus_radius=0)


def test_nuclei_reach_target_average_precision_on_dsb2018(shared_data):
    folder = shared_data / "dsb2018_nuclei"
    image, truth = tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
    scores = match_instances(truth, segment(image, "nuclei"))
    assert scores["ap"] >= 0.72  # target 0.75; measured ~0.83 (plain Otsu + watershed ~0.6)


# ------------------------------------------------------------------ backend registry


def test_registry_dispatches_to_the_backends():
    assert set(SEGMENTERS) == {"learned", "label_free", "nuclei"}
    image, _ = discs([(64, 50), (64, 78)])
    np.testing.assert_array_equal(segment(image, "label_free"), segment_label_free(image))
    np.testing.assert_array_equal(
        segment(image, "label_free", min_area=50), segment_label_free(image, min_area=50)
    )
    blobs, _ = nuclei([(40, 40), (110, 110)])
    np.testing.assert_array_equal(
        segment(blobs, "nuclei", nucleus_radius=8), segment_nuclei(blobs, nucleus_radius=8)
    )
    assert SEGMENTERS["nuclei"].defaults["nucleus_radius"] == 10.0
    with pytest.raises(ValueError, match="unknown segmentation method"):
        segment(image, "stardist")
    with pytest.raises(ValueError, match="unknown parameter"):
        segment(image, "nuclei", texture_sigma=2.0)


def test_schema_documents_every_backend_parameter_with_its_default():
    section = yaml.safe_load(SCHEMA.read_text())["properties"]["segment"]
    assert section["additionalProperties"] is False
    properties = section["properties"]
    assert sorted(properties["method"]["enum"]) == sorted(SEGMENTERS)
    assert properties["method"]["default"] == DEFAULT_METHOD
    # keys the workflow turns into a backend parameter (a diameter in µm, via the pixel size;
    # fine-tuning, whose model becomes the backend's weights)
    workflow_only = {"learned": {"cell_diameter_um", "finetune"}}
    for name, backend in SEGMENTERS.items():
        schema = properties[name]
        assert schema["additionalProperties"] is False and schema["default"] == {}
        documented = {
            key: value["default"]
            for key, value in schema["properties"].items()
            if key not in workflow_only.get(name, set())
        }
        assert documented == backend.defaults, name
        assert all(value.get("description") for value in schema["properties"].values())


# ------------------------------------------------------------------ through the workflow stage


def test_segment_well_uses_the_configured_backend_and_writes_valid_ngff_labels(tmp_path):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    image, truth = nuclei([(40, 40), (40, 57), (110, 50), (60, 120)])
    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "P1_A01_s1_w1.TIF", np.round(image).astype(np.uint16))
    plate = tmp_path / "P1.ome.zarr"
    platemap = pd.DataFrame({"plate": ["P1"], "well": ["A01"]})
    # the ingest and segment settings of a validated config (defaults filled in)
    settings = validate_config(
        {
            "plates": {"P1": {"images": str(tmp_path / "img")}},
            "platemap": "platemap.csv",
            "ingest": {"preset": "imagexpress", "channel_names": ["dna"]},
            "segment": {"method": "nuclei", "nuclei": {"nucleus_radius": 9.0}},
        }
    )
    ingest = settings["ingest"]
    stages.plan("P1", tmp_path / "img", platemap, ingest, tmp_path / "plan.json", plate)
    stages.ingest_well(tmp_path / "plan.json", plate, "A01", ingest, tmp_path / "ingest.json")

    assert settings["segment"]["label_free"]["min_area"] == 120  # the other backend's defaults
    stages.segment_well(plate, "A01", settings["segment"], tmp_path / "segment.json")
    field = ngff.field_indices(plate, "A01")[0]
    labels = ngff.field_labels(plate, "A01", field)
    assert match_instances(truth, labels)["tp"] == 4
    assert stages.read_json(tmp_path / "segment.json")["cells_per_field"] == [4]

    group = zarr.open_group(str(plate / "A" / "01" / str(field)), mode="r")
    assert Image.from_zarr(group).labels is not None
    ImageLabel.from_zarr(group["labels"]["cells"])

    # and on to the per-cell table: one row per cell, id (plate, well, field, label)
    stages.measure_well(
        plate,
        "P1",
        "A01",
        settings["measure"],
        0,
        None,
        tmp_path / "cells.parquet",
        tmp_path / "crops.zarr",
        tmp_path / "fields.parquet",
    )
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(cells) == 4 and not cells.duplicated(["plate", "well", "field", "label"]).any()
    assert cells[["intensity_p10", "intensity_p50", "intensity_p90", "texture_gradient"]].notna().all().all()
    assert zarr.open_array(str(tmp_path / "crops.zarr"), mode="r").shape[0] == 4
    fields = pd.read_parquet(tmp_path / "fields.parquet")
    assert fields[["field", "n_cells"]].values.tolist() == [[field, 4]]
    assert fields["focus"].iloc[0] > 0 and fields["saturated_fraction"].iloc[0] == 0.0
