"""Label-free segmentation and instance matching."""

from __future__ import annotations

import numpy as np
import pytest

from metascreen.segment import match_instances, segment_label_free
from metascreen.synth import render_field


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
