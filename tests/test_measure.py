"""Per-cell morphology tables and single-cell crops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.measure import regionprops

from metascreen.measure import (
    COLUMNS,
    CONTEXT_MARGIN,
    FEATURE_COLUMNS,
    FIELD_QUALITY_COLUMNS,
    FOCUS_SIGMA,
    PERCENTILES,
    extract_crops,
    field_quality,
    measure_cells,
    normalise_field,
)

# our column -> regionprops attribute
REGIONPROPS = {
    "area": "area",
    "perimeter": "perimeter",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
    "major_axis_length": "axis_major_length",
    "minor_axis_length": "axis_minor_length",
    "orientation": "orientation",
    "intensity_mean": "intensity_mean",
    "intensity_std": "intensity_std",
}


@pytest.fixture
def shapes() -> tuple[np.ndarray, np.ndarray]:
    """An ellipse, an L shape, a rectangle on the border and a disc; labels out of order."""
    labels = np.zeros((100, 120), np.int32)
    labels[ellipse(30, 40, 8, 20, rotation=0.5)] = 5
    labels[60:90, 10:18] = 2
    labels[82:90, 10:40] = 2
    labels[0:12, 100:120] = 9
    labels[disk((70, 80), 10)] = 3
    image = np.random.default_rng(0).normal(1000.0, 50.0, labels.shape)
    return labels, image


def test_columns_and_order(shapes):
    labels, image = shapes
    table = measure_cells(labels, image)
    assert tuple(table.columns) == COLUMNS
    assert set(FEATURE_COLUMNS) < set(COLUMNS)
    assert table["label"].tolist() == [2, 3, 5, 9]


def test_values_equal_regionprops(shapes):
    labels, image = shapes
    table = measure_cells(labels, image).set_index("label")
    for region in regionprops(labels, intensity_image=image):
        row = table.loc[region.label]
        for column, attribute in REGIONPROPS.items():
            assert row[column] == pytest.approx(getattr(region, attribute), rel=1e-12), column
        assert (row["centroid_y"], row["centroid_x"]) == pytest.approx(region.centroid)
        bbox = tuple(row[["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]])
        assert bbox == region.bbox


def test_percentiles_and_texture_equal_their_definitions(shapes):
    labels, image = shapes
    image = image.astype(np.uint16)  # integer images too
    table = measure_cells(labels, image).set_index("label")
    gradient = np.hypot(ndi.sobel(image.astype(float), 0), ndi.sobel(image.astype(float), 1)) / 8.0
    for region in regionprops(labels, intensity_image=image):
        row = table.loc[region.label]
        pixels = region.image_intensity[region.image]
        assert row["intensity_mean"] == pytest.approx(region.intensity_mean, rel=1e-12)
        assert row["intensity_std"] == pytest.approx(region.intensity_std, rel=1e-12)
        for q in PERCENTILES:
            assert row[f"intensity_p{q}"] == pytest.approx(np.percentile(pixels, q), rel=1e-12)
        expected = gradient[labels == region.label].mean() / region.intensity_mean
        assert row["texture_gradient"] == pytest.approx(expected, rel=1e-9)


def test_intensity_features_of_known_values():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1  # flat: no texture
    labels[20:30, 20:30] = 2  # a ramp of slope 2 per column
    labels[0:3, 30:33] = 3  # zero intensity: relative texture undefined
    image = np.full(labels.shape, 100.0)
    image[18:32, 18:32] = 50.0 + 2.0 * np.arange(14)[None, :]
    image[labels == 3] = 0.0
    table = measure_cells(labels, image).set_index("label")
    assert table.loc[1, ["intensity_p10", "intensity_p50", "intensity_p90"]].tolist() == [100.0] * 3
    assert table.loc[1, "texture_gradient"] == 0.0
    values = image[labels == 2]
    assert table.loc[2, "intensity_p50"] == np.median(values)
    assert table.loc[2, "texture_gradient"] == pytest.approx(2.0 / values.mean())
    assert table.loc[3, "texture_gradient"] == 0.0  # undefined: 0, never NaN
    assert {"intensity_p10", "intensity_p50", "intensity_p90", "texture_gradient"} <= set(FEATURE_COLUMNS)


def test_aspect_ratio_and_elongation_of_known_shapes():
    labels = np.zeros((200, 200), np.int32)
    labels[ellipse(60, 100, 10, 30)] = 1  # 3:1 ellipse
    labels[disk((150, 60), 20)] = 2
    labels[150, 120:160] = 3  # one-pixel-wide line: zero minor axis
    labels[190, 190] = 4  # single pixel
    table = measure_cells(labels, np.ones(labels.shape)).set_index("label")
    assert table.loc[1, "aspect_ratio"] == pytest.approx(3.0, rel=0.02)
    assert table.loc[1, "elongation"] == pytest.approx(2 / 3, rel=0.02)
    assert table.loc[2, "aspect_ratio"] == pytest.approx(1.0, abs=0.01)
    assert table.loc[2, "elongation"] < 0.01
    # the minor axis is clipped to one pixel: finite aspect, elongation below 1
    assert table.loc[3, "minor_axis_length"] == 0.0
    assert table.loc[3, "aspect_ratio"] == pytest.approx(table.loc[3, "major_axis_length"])
    assert 0.9 < table.loc[3, "elongation"] < 1.0
    assert table.loc[4, "aspect_ratio"] == 1.0 and table.loc[4, "elongation"] == 0.0
    np.testing.assert_allclose(table["elongation"], 1 - 1 / table["aspect_ratio"])


def test_touches_border():
    labels = np.zeros((50, 60), np.int32)
    labels[0:5, 20:25] = 1  # top
    labels[20:25, 55:60] = 2  # right
    labels[45:50, 20:25] = 3  # bottom
    labels[20:25, 0:5] = 4  # left
    labels[20:25, 20:25] = 5  # inside
    labels[20:25, 50:54] = 6  # one pixel from the right edge
    table = measure_cells(labels, np.zeros(labels.shape))
    assert table["touches_border"].tolist() == [True, True, True, True, False, False]


def test_empty_labels_give_an_empty_frame_with_the_same_schema(shapes):
    labels, image = shapes
    full = measure_cells(labels, image)
    empty = measure_cells(np.zeros((30, 30), np.int32), np.zeros((30, 30)))
    assert empty.empty and tuple(empty.columns) == COLUMNS
    pd.testing.assert_series_equal(empty.dtypes, full.dtypes)
    assert full["touches_border"].dtype == bool and full["label"].dtype == np.int64


@pytest.mark.parametrize(
    ("labels", "image"),
    [
        (np.zeros((10, 10), float), np.zeros((10, 10))),
        (np.zeros((10, 10), int), np.zeros((10, 11))),
        (np.full((10, 10), -1), np.zeros((10, 10))),
    ],
)
def test_measure_rejects_bad_inputs(labels: np.ndarray, image: np.ndarray):
    with pytest.raises(ValueError):
        measure_cells(labels, image)


# ------------------------------------------------------------------ normalisation and crops


def vignetted_field() -> tuple[np.ndarray, np.ndarray]:
    """A quadratic illumination with two cells 20 % darker than the background."""
    rows, cols = np.indices((160, 200)) / 100.0
    background = 2000.0 * (1.0 - 0.2 * (rows - 0.7) ** 2 - 0.3 * (cols - 1.1) ** 2 + 0.05 * rows)
    labels = np.zeros(background.shape, np.int32)
    labels[disk((50, 60), 12)] = 1
    labels[ellipse(110, 140, 8, 25)] = 2
    return background * np.where(labels > 0, 0.8, 1.0), labels


def test_normalise_field_flattens_the_background():
    image, labels = vignetted_field()
    normalised = normalise_field(image, labels)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised[labels == 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(normalised[labels > 0], -2.0, atol=1e-4)  # -20 % / 0.1
    np.testing.assert_allclose(
        normalise_field(image, labels, contrast_scale=0.2)[labels > 0], -1.0, atol=1e-4
    )


def test_crops_are_centred_with_the_own_mask():
    image, labels = vignetted_field()
    neighbour = np.zeros(labels.shape, bool)
    neighbour[60:75, 60:75] = True  # inside cell 1's crop, touching it
    neighbour &= labels == 0
    labels[neighbour] = 3
    image = np.where(neighbour, 0.8 * image, image)
    table = measure_cells(labels, image)
    crops = extract_crops(image, labels, table, size=56)
    assert crops.shape == (3, 2, 56, 56) and crops.dtype == np.float32
    for crop, (_, cell) in zip(crops, table.iterrows(), strict=True):
        mask = crop[1]
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert mask.sum() == cell["area"]  # the whole cell, nothing of the neighbour
        rows, cols = np.nonzero(mask)
        # the centroid lands at the crop centre
        assert rows.mean() - cell["centroid_y"] == pytest.approx(28 - np.floor(cell["centroid_y"] + 0.5))
        assert cols.mean() - cell["centroid_x"] == pytest.approx(28 - np.floor(cell["centroid_x"] + 0.5))
        np.testing.assert_allclose(crop[0][mask == 1], -2.0, atol=1e-3)
    # cell 1's image channel shows cell 1 and its own background within CONTEXT_MARGIN px
    first = crops[0]
    r, c = np.floor(table.loc[0, ["centroid_y", "centroid_x"]].to_numpy() + 0.5).astype(int) - 28
    crop_of = (slice(r, r + 56), slice(c, c + 56))
    to_self = ndi.distance_transform_edt(labels != 1)[crop_of]
    to_others = ndi.distance_transform_edt((labels == 0) | (labels == 1))[crop_of]
    normalised = normalise_field(image, labels)[crop_of]
    context = (to_self <= CONTEXT_MARGIN) & (to_self < to_others)
    assert (context & (to_self > 0)).sum() > 100  # a ring of background
    np.testing.assert_array_equal(first[0][context], normalised[context])
    assert np.abs(first[0][context & (to_self > 0)]).max() < 0.5  # background ~0
    # ... and nothing else: not the neighbour (which lies whole in the crop), nor what lies further
    assert neighbour[crop_of].sum() == neighbour.sum() > 150
    assert np.all(first[0][neighbour[crop_of]] == 0.0)
    outside = (to_self > CONTEXT_MARGIN) | (to_others < to_self)
    assert np.all(first[0][outside] == 0.0)
    assert np.abs(normalised[outside & ~neighbour[crop_of]]).max() > 0  # there was something to blank


def test_crop_image_channel_is_the_normalised_field():
    image, labels = vignetted_field()
    table = measure_cells(labels, image)
    crops = extract_crops(image, labels, table, size=16, with_mask=False)
    assert crops.shape == (2, 1, 16, 16)
    normalised = normalise_field(image, labels)
    r, c = np.floor(table.loc[0, ["centroid_y", "centroid_x"]].to_numpy() + 0.5).astype(int)
    np.testing.assert_array_equal(crops[0, 0], normalised[r - 8 : r + 8, c - 8 : c + 8])


def test_crops_are_padded_at_the_border():
    image = np.full((80, 80), 1000.0)
    labels = np.zeros((80, 80), np.int32)
    labels[0:6, 0:6] = 1
    image[labels > 0] = 700.0
    table = measure_cells(labels, image)
    crop = extract_crops(image, labels, table, size=32)[0]
    r, c = np.floor(table.loc[0, ["centroid_y", "centroid_x"]].to_numpy() + 0.5).astype(int)
    outside = np.ones((32, 32), bool)
    outside[16 - r :, 16 - c :] = False  # the part of the crop inside the image
    assert np.all(crop[:, outside] == 0.0)
    assert crop[1].sum() == 36
    np.testing.assert_allclose(crop[0][crop[1] == 1], -3.0, atol=1e-4)


def test_cells_larger_than_the_crop_are_cut_not_resized():
    image = np.full((100, 100), 1000.0)
    labels = np.zeros((100, 100), np.int32)
    labels[10:90, 30:70] = 1  # 80 x 40 px cell
    table = measure_cells(labels, image)
    crop = extract_crops(image, labels, table, size=32)[0]
    assert np.all(crop[1] == 1.0)


def test_extract_crops_edge_cases():
    image, labels = vignetted_field()
    empty = measure_cells(np.zeros_like(labels), image)
    assert extract_crops(image, labels, empty).shape == (0, 2, 64, 64)
    assert extract_crops(image, labels, empty, with_mask=False).shape == (0, 1, 64, 64)
    with pytest.raises(ValueError, match="missing columns"):
        extract_crops(image, labels, pd.DataFrame({"label": [1]}))
    with pytest.raises(ValueError, match="size"):
        extract_crops(image, labels, measure_cells(labels, image), size=0)


# ---------------------------------------------------------------- field_quality
def _blob_field(blur: float) -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 96 uint16 field of 4 textured dark discs on a flat background, optionally blurred."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:96, :96]
    labels = np.zeros((96, 96), np.int32)
    for label, (r, c) in enumerate([(24, 24), (24, 72), (72, 24), (72, 72)], start=1):
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= 12**2] = label
    relative = np.where(labels > 0, -0.2 + 0.1 * rng.standard_normal((96, 96)), 0.0)
    if blur:
        relative = ndi.gaussian_filter(relative, blur)
    return np.round(1000 * (1 + relative)).astype(np.uint16), labels


def test_field_quality_of_known_fields():
    image, labels = _blob_field(0)
    quality = field_quality(image, labels)
    assert list(quality) == list(FIELD_QUALITY_COLUMNS)
    assert quality["n_cells"] == 4
    relative = image / image.mean()
    expected = np.mean(ndi.gaussian_gradient_magnitude(relative, FOCUS_SIGMA)[labels > 0] ** 2)
    assert quality["focus"] == pytest.approx(expected)
    assert quality["saturated_fraction"] == 0.0
    assert quality["contrast"] == pytest.approx(image.std() / image.mean())
    # Defocus lowers the focus several-fold; exposure does not change it.
    assert field_quality(*_blob_field(4.0))["focus"] < 0.2 * quality["focus"]
    assert field_quality(image * 3, labels)["focus"] == pytest.approx(quality["focus"])


def test_field_quality_saturation_and_empty_fields():
    image, labels = _blob_field(0)
    image[:10] = np.iinfo(np.uint16).max
    assert field_quality(image, labels)["saturated_fraction"] == pytest.approx(10 / 96)
    # 12-bit data in uint16: the level is given.
    assert field_quality(np.minimum(image, 4095), labels, saturation_level=4095)["saturated_fraction"] > 0.1
    assert np.isnan(field_quality(image.astype(np.float32), labels)["saturated_fraction"])
    black = field_quality(np.zeros((32, 32), np.uint16), np.zeros((32, 32), np.int32))
    assert black["n_cells"] == 0 and np.isnan(black["focus"]) and black["contrast"] == 0.0
