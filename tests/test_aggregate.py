"""Tests of metascreen.aggregate on a hand-made table whose every number is worked out here.

Plate map (6 wells, 2 plates, 2 samples; sample S1 spans both plates), one field (0) per well,
and a second, out-of-focus field (1) in P1/A01 whose three cells QC leaves out:

=====  ====  ======  ======================================  ==================================
plate  well  sample  probabilities of its cells in field 0   QC with min_cells = 3
=====  ====  ======  ======================================  ==================================
P1     A01   S1      0.9 x 8, 0.1 x 2       (8 of 10 >= 0.5)  passes; field 1 out_of_focus
P1     A02   S2      0.8, 0.2, 0.2, 0.4     (1 of 4)          passes
P1     B01   S2      no cells (empty field)                   empty_field;no_cells
P2     A01   S1      0.7, 0.6, 0.3, 0.2, 0.1 (2 of 5)         passes
P2     A02   S2      0.5, 0.95              (2 of 2; 0.5 counts as positive)  too_few_cells
P2     B01   S2      no cells (empty field)                   empty_field;no_cells
=====  ====  ======  ======================================  ==================================
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest

from metascreen import stages
from metascreen.aggregate import (
    CELL_KEYS,
    FIELD_COLUMNS,
    PER_PLATE_COLUMNS,
    PER_SAMPLE_COLUMNS,
    PER_WELL_COLUMNS,
    cell_column,
    cell_table,
    field_table,
    per_plate_summary,
    per_sample_summary,
    per_well_summary,
    segmentation_check,
    segmentation_check_failure,
    wilson_interval,
)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_by_hand(k: float, n: float) -> tuple[float, float]:
    """Textbook Wilson score interval, written out independently of the module."""
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return centre - half, centre + half


@pytest.fixture
def platemap() -> pd.DataFrame:
    # Deliberately unsorted, with a missing train_class, to check sorting and filling.
    return pd.DataFrame(
        {
            "plate": ["P2", "P1", "P1", "P1", "P2", "P2"],
            "well": ["A01", "A02", "A01", "B01", "A02", "B01"],
            "sample": ["S1", "S2", "S1", "S2", "S2", "S2"],
            "condition": ["dmso", "drug", "dmso", "drug", "drug", "drug"],
            "cell_line": ["L1", "L2", "L1", "L2", "L2", "L2"],
            "train_class": ["high_potential", "", "high_potential", None, "", ""],
            "nominal_fraction": [0.5, 0.2, 0.5, 0.2, 0.2, 0.2],
        }
    )


def _well_cells(plate: str, well: str, probability, elongation, area, field: int = 0) -> pd.DataFrame:
    """Measurements and predictions (the stages' column names) of one field's cells."""
    probability = np.asarray(probability, dtype=float)
    return pd.DataFrame(
        {
            "plate": plate,
            "well": well,
            "field": field,
            "label": np.arange(1, len(probability) + 1),
            "area": np.asarray(area, dtype=float),
            "elongation": np.asarray(elongation, dtype=float),
            "aspect_ratio": 1.0 / (1.0 - np.asarray(elongation, dtype=float)),
            "touches_border": False,
            "crop_index": np.arange(len(probability)),
            "probability": probability,
            "predicted_class": np.where(probability >= 0.5, "high_potential", "low_potential"),
            "model_sha256": "abc",
        }
    )


_PREDICTIONS = ["plate", "well", "field", "label", "probability", "predicted_class", "model_sha256"]


def _public(stage_cells: pd.DataFrame, platemap: pd.DataFrame, fields: pd.DataFrame) -> pd.DataFrame:
    """The per-cell table that collect_plate writes from these measurements and predictions."""
    measurements = stage_cells.drop(columns=_PREDICTIONS[4:])
    return cell_table(
        measurements, stage_cells[_PREDICTIONS], platemap, fields, positive_class="high_potential"
    )


def _raw_fields(stage_cells: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Field metrics: field 0 of every well, in focus; P1/A01 field 1 out of focus."""
    fields = platemap[["plate", "well"]].assign(field=0)
    fields = pd.concat([fields, pd.DataFrame({"plate": ["P1"], "well": ["A01"], "field": [1]})])
    counts = stage_cells.groupby(["plate", "well", "field"]).size().rename("n_cells")
    fields = fields.join(counts, on=["plate", "well", "field"]).fillna({"n_cells": 0})
    with_cells = fields["n_cells"] > 0
    out_of_focus = (fields["well"] == "A01") & (fields["plate"] == "P1") & (fields["field"] == 1)
    return fields.assign(
        focus=np.where(with_cells, np.where(out_of_focus, 0.1, 1.0), np.nan),
        saturated_fraction=0.0,
        contrast=0.05,
        nan_fraction=0.0,
    )


@pytest.fixture
def stage_cells() -> pd.DataFrame:
    return pd.concat(
        [
            _well_cells("P1", "A01", [0.9] * 8 + [0.1] * 2, [0.2] * 5 + [0.4] * 5, [100] * 5 + [300] * 5),
            _well_cells("P1", "A01", [0.9, 0.9, 0.9], [0.9] * 3, [900] * 3, field=1),
            _well_cells("P1", "A02", [0.8, 0.2, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4], [50, 60, 70, 80]),
            _well_cells("P2", "A01", [0.7, 0.6, 0.3, 0.2, 0.1], [0.5] * 5, [10, 20, 30, 40, 50]),
            _well_cells("P2", "A02", [0.5, 0.95], [0.6, 0.8], [400, 600]),
        ],
        ignore_index=True,
    )


@pytest.fixture
def fields(stage_cells, platemap) -> pd.DataFrame:
    return field_table(_raw_fields(stage_cells, platemap))


@pytest.fixture
def cells(stage_cells, platemap, fields) -> pd.DataFrame:
    return _public(stage_cells, platemap, fields)


# ---------------------------------------------------------------- wilson_interval
def test_wilson_matches_textbook_values():
    low, high = wilson_interval(8, 10)
    assert low.shape == () and high.shape == ()
    assert float(low) == pytest.approx(0.4902, abs=5e-5)
    assert float(high) == pytest.approx(0.9433, abs=5e-5)
    # 0/10: lower bound exactly 0, upper z^2/n / (1 + z^2/n) = 0.2775; 10/10 mirrors it.
    low, high = wilson_interval([0, 10], [10, 10])
    np.testing.assert_allclose(low, [0.0, 1 - 0.27754], atol=5e-5)
    np.testing.assert_allclose(high, [0.27754, 1.0], atol=5e-5)


def test_wilson_is_vectorised_and_nan_for_zero_trials():
    low, high = wilson_interval(np.array([[1, 0], [3, 0]]), np.array([4, 0]))
    assert low.shape == high.shape == (2, 2)
    assert low.dtype == np.float64
    np.testing.assert_allclose(low[:, 0], [wilson_by_hand(1, 4)[0], wilson_by_hand(3, 4)[0]])
    np.testing.assert_allclose(high[:, 0], [wilson_by_hand(1, 4)[1], wilson_by_hand(3, 4)[1]])
    assert np.isnan(low[:, 1]).all() and np.isnan(high[:, 1]).all()


def test_wilson_other_confidence_is_narrower():
    low90, high90 = wilson_interval(8, 10, confidence=0.90)
    low95, high95 = wilson_interval(8, 10)
    assert low95 < low90 < 0.8 < high90 < high95


@pytest.mark.parametrize(
    ("successes", "trials", "confidence"),
    [(11, 10, 0.95), (-1, 10, 0.95), (1, 10, 1.0), (1, 10, 0.0)],
)
def test_wilson_rejects_invalid_input(successes, trials, confidence):
    with pytest.raises(ValueError):
        wilson_interval(successes, trials, confidence=confidence)


# ---------------------------------------------------------------- field_table and cell_table
def test_field_table_flags(fields):
    assert list(fields.columns) == FIELD_COLUMNS
    keys = list(zip(fields["Metadata_Plate"], fields["Metadata_Well"], fields["Metadata_Site"], strict=True))
    assert keys == [
        ("P1", "A01", 0),
        ("P1", "A01", 1),
        ("P1", "A02", 0),
        ("P1", "B01", 0),
        ("P2", "A01", 0),
        ("P2", "A02", 0),
        ("P2", "B01", 0),
    ]
    # P1's fields with cells have focus 1.0, 0.1, 1.0: median 1.0.
    np.testing.assert_allclose(fields["relative_focus"], [1.0, 0.1, 1.0, np.nan, 1.0, 1.0, np.nan])
    assert fields["qc_flags"].tolist() == ["", "out_of_focus", "", "empty_field", "", "", "empty_field"]


def test_field_table_thresholds():
    raw = pd.DataFrame(
        {
            "plate": "P",
            "well": ["A01", "A02", "A03", "A04", "A05"],
            "field": 0,
            "n_cells": [10, 10, 10, 10, 10],
            "focus": [2.0, 2.0, 2.0, 0.6, 2.0],
            "saturated_fraction": [0.0, 0.02, 0.01, 0.0, np.nan],
            "contrast": [0.05, 0.05, 0.05, 0.05, 0.001],
            "nan_fraction": 0.0,
        }
    )
    flags = field_table(raw, min_relative_focus=0.25, max_saturated_fraction=0.01, min_contrast=0.005)
    # focus 0.6 / median 2.0 = 0.3 passes 0.25; 0.01 is not above 0.01; NaN is not flagged.
    assert flags["qc_flags"].tolist() == ["", "saturated", "", "", "empty_field"]
    assert flags["empty_reason"].tolist() == ["", "", "", "", "low_contrast"]
    flags = field_table(raw, min_relative_focus=0.5, max_saturated_fraction=0.0)
    assert flags["qc_flags"].tolist() == ["", "saturated", "saturated", "out_of_focus", "empty_field"]


def test_field_with_nan_pixels_is_empty_for_reason_nan():
    raw = pd.DataFrame(
        {
            "plate": "P",
            "well": ["A01", "A02", "A03"],
            "field": 0,
            "n_cells": [10, 0, 10],
            "focus": [2.0, np.nan, 2.0],
            "saturated_fraction": 0.0,
            "contrast": [0.05, 0.05, 0.05],
            "nan_fraction": [0.0, 1.0, 0.25],
        }
    )
    flags = field_table(raw)
    assert flags["qc_flags"].tolist() == ["", "empty_field", "empty_field"]
    assert flags["empty_reason"].tolist() == ["", "no_cells;nan", "nan"]
    assert flags["nan_fraction"].tolist() == [0.0, 1.0, 0.25]


def test_field_table_rejects_duplicates(stage_cells, platemap):
    raw = _raw_fields(stage_cells, platemap)
    with pytest.raises(ValueError, match="more than once"):
        field_table(pd.concat([raw, raw.iloc[[0]]]))


def test_cell_table_columns_follow_pycytominer(cells):
    assert (
        list(cells.columns[:4])
        == CELL_KEYS
        == [
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_ObjectNumber",
        ]
    )
    metadata = [c for c in cells.columns if c.startswith("Metadata_")]
    features = [c for c in cells.columns if c.startswith("Cells_")]
    assert len(metadata) + len(features) == len(cells.columns)
    assert cells.columns.tolist() == metadata + features
    for column in (
        "Metadata_Sample",
        "Metadata_condition",
        "Metadata_cell_line",
        "Metadata_train_class",
        "Metadata_nominal_fraction",
        "Metadata_predicted_class",
        "Metadata_is_positive",
        "Metadata_model_sha256",
        "Metadata_crop_index",
        "Metadata_touches_border",
        "Metadata_field_qc_flags",
    ):
        assert column in metadata
    assert features == ["Cells_area", "Cells_elongation", "Cells_aspect_ratio", "Cells_probability"]
    assert cells["Metadata_is_positive"].tolist() == (cells["Cells_probability"] >= 0.5).tolist()
    assert cells.set_index(CELL_KEYS).index.is_unique
    assert (cells["Metadata_field_qc_flags"] == "out_of_focus").sum() == 3


def test_cell_column_names():
    assert [cell_column(name) for name in ("plate", "well", "field", "label", "sample")] == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_ObjectNumber",
        "Metadata_Sample",
    ]
    assert cell_column("texture_gradient") == "Cells_texture_gradient"
    assert cell_column("probability") == "Cells_probability"
    assert cell_column("centroid_y") == "Metadata_centroid_y"


def test_cell_table_rejects_cells_without_prediction_or_field(stage_cells, platemap, fields):
    measurements = stage_cells.drop(columns=_PREDICTIONS[4:])
    with pytest.raises(ValueError, match="no prediction"):
        cell_table(
            measurements,
            stage_cells[_PREDICTIONS].iloc[1:],
            platemap,
            fields,
            positive_class="high_potential",
        )
    with pytest.raises(ValueError, match="absent from the field table"):
        cell_table(
            measurements,
            stage_cells[_PREDICTIONS],
            platemap,
            fields.iloc[1:],
            positive_class="high_potential",
        )


# ---------------------------------------------------------------- per_well_summary
def test_per_well_counts_fractions_and_statistics(cells, fields, platemap):
    table = per_well_summary(cells, fields, platemap, min_cells=3)
    assert list(table.columns) == PER_WELL_COLUMNS
    assert list(zip(table["plate"], table["well"], strict=True)) == [
        ("P1", "A01"),
        ("P1", "A02"),
        ("P1", "B01"),
        ("P2", "A01"),
        ("P2", "A02"),
        ("P2", "B01"),
    ]
    assert table["sample"].tolist() == ["S1", "S2", "S2", "S1", "S2", "S2"]
    assert table["train_class"].tolist() == ["high_potential", "", "", "high_potential", "", ""]
    assert table["n_fields"].tolist() == [2, 1, 1, 1, 1, 1]
    assert table["n_fields_after_qc"].tolist() == [1, 1, 0, 1, 1, 0]
    assert table["n_cells_before_qc"].tolist() == [13, 4, 0, 5, 2, 0]
    assert table["n_cells_after_qc"].tolist() == [10, 4, 0, 5, 2, 0]
    assert table["n_positive"].tolist() == [8, 1, 0, 2, 2, 0]
    np.testing.assert_allclose(
        table["fraction_positive"], [0.8, 0.25, np.nan, 0.4, 1.0, np.nan], equal_nan=True
    )
    np.testing.assert_allclose(
        table["mean_probability"],
        [(8 * 0.9 + 2 * 0.1) / 10, (0.8 + 0.2 + 0.2 + 0.4) / 4, np.nan, 1.9 / 5, 1.45 / 2, np.nan],
        equal_nan=True,
    )
    np.testing.assert_allclose(
        table["median_probability"], [0.9, 0.3, np.nan, 0.3, 0.725, np.nan], equal_nan=True
    )
    np.testing.assert_allclose(
        table["mean_elongation"], [0.3, 0.25, np.nan, 0.5, 0.7, np.nan], equal_nan=True
    )
    np.testing.assert_allclose(
        table["median_elongation"], [0.3, 0.25, np.nan, 0.5, 0.7, np.nan], equal_nan=True
    )
    np.testing.assert_allclose(table["mean_area"], [200.0, 65.0, np.nan, 30.0, 500.0, np.nan], equal_nan=True)
    np.testing.assert_allclose(
        table["median_area"], [200.0, 65.0, np.nan, 30.0, 500.0, np.nan], equal_nan=True
    )


def test_per_well_wilson_bounds(cells, fields, platemap):
    table = per_well_summary(cells, fields, platemap, min_cells=3).set_index(["plate", "well"])
    assert table.loc[("P1", "A01"), "fraction_ci_low"] == pytest.approx(0.4902, abs=5e-5)
    assert table.loc[("P1", "A01"), "fraction_ci_high"] == pytest.approx(0.9433, abs=5e-5)
    for key, (k, n) in {
        ("P1", "A02"): (1, 4),
        ("P2", "A01"): (2, 5),
        ("P2", "A02"): (2, 2),
    }.items():
        expected_low, expected_high = wilson_by_hand(k, n)
        assert table.loc[key, "fraction_ci_low"] == pytest.approx(expected_low)
        assert table.loc[key, "fraction_ci_high"] == pytest.approx(expected_high)
    assert np.isnan(table.loc[("P1", "B01"), "fraction_ci_low"])
    assert np.isnan(table.loc[("P1", "B01"), "fraction_ci_high"])


def test_per_well_qc_flags(cells, fields, platemap):
    table = per_well_summary(cells, fields, platemap, min_cells=3)
    assert table["qc_flags"].tolist() == [
        "out_of_focus",
        "",
        "empty_field;no_cells",
        "",
        "too_few_cells",
        "empty_field;no_cells",
    ]
    assert table["passes_qc"].tolist() == [True, True, False, True, False, False]
    # With the default min_cells of 20 every well is too small.
    table = per_well_summary(cells, fields, platemap)
    assert table["qc_flags"].tolist() == [
        "out_of_focus;too_few_cells",
        "too_few_cells",
        "empty_field;no_cells",
        "too_few_cells",
        "too_few_cells",
        "empty_field;no_cells",
    ]
    assert not table["passes_qc"].any()


def test_per_well_dtypes(cells, fields, platemap):
    table = per_well_summary(cells, fields, platemap, min_cells=3)
    for column in ("n_fields", "n_fields_after_qc", "n_cells_before_qc", "n_cells_after_qc", "n_positive"):
        assert table[column].dtype == np.int64
    for column in (
        "fraction_positive",
        "fraction_ci_low",
        "fraction_ci_high",
        "mean_probability",
        "median_probability",
        "mean_elongation",
        "median_elongation",
        "mean_area",
        "median_area",
    ):
        assert table[column].dtype == np.float64
    assert table["passes_qc"].dtype == bool


def test_per_well_without_any_cell(cells, fields, platemap):
    table = per_well_summary(cells.iloc[:0], fields, platemap, min_cells=3)
    assert len(table) == 6
    assert table["n_cells_after_qc"].tolist() == [0] * 6
    assert table["n_cells_before_qc"].dtype == np.int64
    assert table["qc_flags"].str.contains("no_cells").all()
    assert table["fraction_positive"].isna().all()


def test_per_well_reads_the_table_back_from_csv(cells, fields, platemap, tmp_path):
    # CSV turns the empty flag strings into NaN; the numbers must not change.
    cells.to_csv(tmp_path / "cells.csv", index=False)
    fields.to_csv(tmp_path / "fields.csv", index=False)
    again = per_well_summary(
        pd.read_csv(tmp_path / "cells.csv"), pd.read_csv(tmp_path / "fields.csv"), platemap, min_cells=3
    )
    pd.testing.assert_frame_equal(again, per_well_summary(cells, fields, platemap, min_cells=3))


def test_numeric_plate_names_join(cells, fields, platemap):
    # A plate map read from CSV may hold plate "1" as an integer.
    table = per_well_summary(
        cells.assign(Metadata_Plate=cells["Metadata_Plate"].str[1:]),
        fields.assign(Metadata_Plate=fields["Metadata_Plate"].str[1:]),
        platemap.assign(plate=platemap["plate"].str[1:].astype(int)),
        min_cells=3,
    )
    assert table["plate"].tolist() == ["1", "1", "1", "2", "2", "2"]
    assert table["n_cells_after_qc"].tolist() == [10, 4, 0, 5, 2, 0]


def test_missing_cell_column_is_named(cells, fields, platemap):
    with pytest.raises(ValueError, match="Cells_probability"):
        per_well_summary(cells.drop(columns="Cells_probability"), fields, platemap)


def test_missing_platemap_column_is_named(cells, fields, platemap):
    with pytest.raises(ValueError, match="train_class"):
        per_sample_summary(cells, fields, platemap.drop(columns="train_class"))


def test_cells_outside_the_platemap_are_rejected(cells, fields, platemap):
    stray = cells.copy()
    stray.loc[0, "Metadata_Well"] = "A1"
    with pytest.raises(ValueError, match=r"absent from the plate map.*'A1'"):
        per_well_summary(stray, fields, platemap)


def test_duplicated_platemap_well_is_rejected(cells, fields, platemap):
    with pytest.raises(ValueError, match="more than once"):
        per_plate_summary(cells, fields, pd.concat([platemap, platemap.iloc[[0]]]))


def test_missing_probability_is_rejected(cells, fields, platemap):
    broken = cells.copy()
    broken.loc[3, "Cells_probability"] = np.nan
    with pytest.raises(ValueError, match="missing values in 'Cells_probability'"):
        per_well_summary(broken, fields, platemap)


# ---------------------------------------------------------------- pycytominer
def test_per_well_means_and_medians_equal_pycytominer(cells, fields, platemap):
    pycytominer = pytest.importorskip(
        "pycytominer", reason="pycytominer is a test dependency (pip install -e .[test])"
    )
    ours = per_well_summary(cells, fields, platemap, min_cells=3).set_index(["plate", "well"])
    # The table as written goes in unchanged: default strata and inferred Cells_ features.
    counts = pycytominer.aggregate(cells, compute_object_count=True)
    counts = counts.set_index(["Metadata_Plate", "Metadata_Well"])
    assert counts["Metadata_Object_Count"].to_dict() == ours.loc[counts.index, "n_cells_before_qc"].to_dict()
    # Our statistics describe the cells after field QC: the same table, filtered on its own column.
    kept = cells[cells["Metadata_field_qc_flags"] == ""]
    for operation in ("mean", "median"):
        theirs = pycytominer.aggregate(kept, operation=operation).set_index(
            ["Metadata_Plate", "Metadata_Well"]
        )
        assert sorted(theirs.index) == sorted(ours.index[ours["n_cells_after_qc"] > 0])
        for feature in ("probability", "elongation", "area"):
            np.testing.assert_allclose(
                theirs[f"Cells_{feature}"], ours.loc[theirs.index, f"{operation}_{feature}"], rtol=1e-12
            )


# ---------------------------------------------------------------- per_sample_summary
def test_per_sample_pooled_values(cells, fields, platemap):
    table = per_sample_summary(cells, fields, platemap, min_cells=3)
    assert list(table.columns) == PER_SAMPLE_COLUMNS
    s1, s2 = (row for _, row in table.iterrows())

    # S1: P1/A01 (8 of 10 in field 0; field 1 left out) and P2/A01 (2 of 5), on two plates.
    assert (s1["sample"], s1["condition"], s1["cell_line"], s1["train_class"]) == (
        "S1",
        "dmso",
        "L1",
        "high_potential",
    )
    assert (s1["n_plates"], s1["n_wells"], s1["n_wells_failed_qc"]) == (2, 2, 0)
    assert (s1["n_cells_before_qc"], s1["n_cells_after_qc"], s1["n_positive"]) == (18, 15, 10)
    assert s1["fraction_positive"] == pytest.approx(10 / 15)
    assert (s1["fraction_ci_low"], s1["fraction_ci_high"]) == pytest.approx(wilson_by_hand(10, 15))
    assert s1["mean_probability"] == pytest.approx((7.4 + 1.9) / 15)
    # 15 sorted probabilities: 0.1 0.1 0.1 0.2 0.3 0.6 0.7 | 0.9 | 0.9 ... -> the 8th is 0.9.
    assert s1["median_probability"] == pytest.approx(0.9)
    assert s1["mean_elongation"] == pytest.approx((5 * 0.2 + 5 * 0.4 + 5 * 0.5) / 15)
    # 15 sorted elongations: 0.2 x 5, 0.4 x 5, 0.5 x 5 -> the 8th is 0.4.
    assert s1["median_elongation"] == pytest.approx(0.4)
    assert s1["mean_area"] == pytest.approx((500 + 1500 + 150) / 15)
    # 15 sorted areas: 10 20 30 40 50 100 100 | 100 | ... -> the 8th is 100.
    assert s1["median_area"] == pytest.approx(100.0)
    assert s1["qc_flags"] == "out_of_focus"

    # S2: only P1/A02 passes QC (P1/B01 and P2/B01 empty, P2/A02 has 2 < 3 cells).
    assert (s2["sample"], s2["condition"], s2["cell_line"], s2["train_class"]) == (
        "S2",
        "drug",
        "L2",
        "",
    )
    assert (s2["n_plates"], s2["n_wells"], s2["n_wells_failed_qc"]) == (1, 1, 3)
    assert (s2["n_cells_before_qc"], s2["n_cells_after_qc"], s2["n_positive"]) == (6, 4, 1)
    assert s2["fraction_positive"] == pytest.approx(0.25)
    assert (s2["fraction_ci_low"], s2["fraction_ci_high"]) == pytest.approx(wilson_by_hand(1, 4))
    assert s2["mean_probability"] == pytest.approx(0.4)
    assert s2["median_probability"] == pytest.approx(0.3)
    assert s2["mean_elongation"] == pytest.approx(0.25)
    assert s2["median_area"] == pytest.approx(65.0)
    assert s2["qc_flags"] == "empty_field;no_cells;too_few_cells"


def test_per_sample_well_bootstrap_by_hand(cells, fields, platemap):
    table = per_sample_summary(cells, fields, platemap, min_cells=3).set_index("sample")
    # Two wells (8/10 and 2/5): a replicate draws {A,A} -> 16/20 = 0.8, {B,B} -> 4/10 = 0.4
    # (each with probability 1/4) or {A,B} -> 10/15. The 2.5 % and 97.5 % quantiles of 2000
    # replicates are therefore exactly 0.4 and 0.8.
    assert table.loc["S1", "well_ci_low"] == pytest.approx(0.4)
    assert table.loc["S1", "well_ci_high"] == pytest.approx(0.8)
    # One contributing well says nothing about well-to-well variation.
    assert np.isnan(table.loc["S2", "well_ci_low"]) and np.isnan(table.loc["S2", "well_ci_high"])


def test_per_sample_dtypes(cells, fields, platemap):
    table = per_sample_summary(cells, fields, platemap, min_cells=3)
    for column in ("n_plates", "n_wells", "n_wells_failed_qc", "n_cells_before_qc", "n_cells_after_qc"):
        assert table[column].dtype == np.int64
    for column in (
        "fraction_positive",
        "fraction_ci_low",
        "fraction_ci_high",
        "well_ci_low",
        "well_ci_high",
        "mean_probability",
        "median_probability",
        "mean_elongation",
        "median_area",
    ):
        assert table[column].dtype == np.float64


def test_per_sample_all_wells_failing_keeps_a_row(cells, fields, platemap):
    table = per_sample_summary(cells, fields, platemap, min_cells=100).set_index("sample")
    assert table["n_wells"].tolist() == [0, 0]
    assert table["n_cells_after_qc"].tolist() == [0, 0]
    assert table["n_cells_before_qc"].tolist() == [18, 6]
    assert table["n_wells_failed_qc"].tolist() == [2, 4]
    assert table["fraction_positive"].isna().all()


def test_per_sample_ignores_wells_without_sample(cells, fields, platemap):
    blank = platemap.copy()
    blank.loc[blank["well"] == "A02", "sample"] = ""
    table = per_sample_summary(cells, fields, blank, min_cells=3).set_index("sample")
    assert table.index.tolist() == ["S1", "S2"]
    assert table.loc["S2", "n_wells_failed_qc"] == 2  # P2/A02 no longer belongs to S2
    assert table.loc["S2", "n_cells_after_qc"] == 0


def _many_wells(
    sample: str, n_wells: int, seed: int, plate: str = "P9"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cells, fields and plate map of one sample spread over wells with varying positive rates."""
    rng = np.random.default_rng(seed)
    wells = [f"B{column:02d}" for column in range(1, n_wells + 1)]
    stage_cells = pd.concat(
        [
            _well_cells(
                plate, well, rng.uniform(0, 1, size=40) ** rng.uniform(0.3, 3), [0.5] * 40, [100] * 40
            )
            for well in wells
        ],
        ignore_index=True,
    )
    platemap = pd.DataFrame(
        {"plate": plate, "well": wells, "sample": sample, "condition": "", "cell_line": "", "train_class": ""}
    )
    raw = platemap[["plate", "well"]].assign(
        field=0, n_cells=40, focus=1.0, saturated_fraction=0.0, contrast=0.05, nan_fraction=0.0
    )
    fields = field_table(raw)
    return _public(stage_cells, platemap, fields), fields, platemap


def test_per_sample_bootstrap_is_deterministic_and_covers_the_estimate():
    cells, fields, platemap = _many_wells("S", 10, seed=3)
    first = per_sample_summary(cells, fields, platemap, n_bootstrap=500, seed=7, min_cells=3)
    again = per_sample_summary(cells, fields, platemap, n_bootstrap=500, seed=7, min_cells=3)
    other = per_sample_summary(cells, fields, platemap, n_bootstrap=500, seed=8, min_cells=3)
    pd.testing.assert_frame_equal(first, again)
    row = first.iloc[0]
    assert row["well_ci_low"] < row["fraction_positive"] < row["well_ci_high"]
    assert (row["well_ci_low"], row["well_ci_high"]) != (
        other.iloc[0]["well_ci_low"],
        other.iloc[0]["well_ci_high"],
    )
    # Well-to-well spread here exceeds binomial noise, so the bootstrap is wider than Wilson.
    assert row["well_ci_high"] - row["well_ci_low"] > row["fraction_ci_high"] - row["fraction_ci_low"]


def test_per_sample_bootstrap_does_not_depend_on_other_samples():
    cells, fields, platemap = _many_wells("S", 6, seed=3)
    alone = per_sample_summary(cells, fields, platemap, n_bootstrap=300, min_cells=3)
    extra_cells, extra_fields, extra_map = _many_wells("A-other", 4, seed=4, plate="P8")
    both = per_sample_summary(
        pd.concat([cells, extra_cells]),
        pd.concat([fields, extra_fields]),
        pd.concat([platemap, extra_map]),
        n_bootstrap=300,
        min_cells=3,
    ).set_index("sample")
    assert both.loc["S", "well_ci_low"] == alone.iloc[0]["well_ci_low"]
    assert both.loc["S", "well_ci_high"] == alone.iloc[0]["well_ci_high"]


def test_per_sample_rejects_zero_bootstrap(cells, fields, platemap):
    with pytest.raises(ValueError, match="n_bootstrap"):
        per_sample_summary(cells, fields, platemap, n_bootstrap=0)


# ---------------------------------------------------------------- per_plate_summary
def test_per_plate_values(cells, fields, platemap):
    table = per_plate_summary(cells, fields, platemap, min_cells=3)
    assert list(table.columns) == PER_PLATE_COLUMNS
    assert table["plate"].tolist() == ["P1", "P2"]
    assert table["n_wells"].tolist() == [3, 3]
    assert table["n_wells_failed_qc"].tolist() == [1, 2]
    assert table["n_fields"].tolist() == [4, 3]
    assert table["n_fields_after_qc"].tolist() == [2, 2]
    assert table["n_cells_before_qc"].tolist() == [17, 7]
    # After QC: P1/A01 field 0 and P1/A02; P2/A01 only (P2/A02 fails too_few_cells).
    assert table["n_cells_after_qc"].tolist() == [14, 5]
    assert table["n_positive"].tolist() == [9, 2]
    np.testing.assert_allclose(table["fraction_positive"], [9 / 14, 2 / 5])
    np.testing.assert_allclose(table["fraction_ci_low"], [wilson_by_hand(9, 14)[0], wilson_by_hand(2, 5)[0]])
    np.testing.assert_allclose(table["mean_probability"], [(7.4 + 1.6) / 14, 1.9 / 5])
    np.testing.assert_allclose(table["median_area"], [100.0, 30.0])
    assert table["qc_flags"].tolist() == [
        "empty_field;no_cells;out_of_focus",
        "empty_field;no_cells;too_few_cells",
    ]
    for column in ("n_wells", "n_wells_failed_qc", "n_cells_before_qc", "n_cells_after_qc", "n_positive"):
        assert table[column].dtype == np.int64
    for column in ("fraction_positive", "mean_probability"):
        assert table[column].dtype == np.float64


def test_per_plate_without_cells(cells, fields, platemap):
    table = per_plate_summary(cells[cells["Metadata_Plate"] == "P1"], fields, platemap, min_cells=3)
    assert table["n_cells_after_qc"].tolist() == [14, 0]
    assert table["n_wells_failed_qc"].tolist() == [1, 3]
    assert np.isnan(table.loc[1, "fraction_positive"]) and np.isnan(table.loc[1, "mean_probability"])


# ------------------------------------------------------------------ segmentation check


def _manifest(well: str, cells_per_field: list[int], precision: str = "bfloat16") -> dict:
    """A learned backend's segment/{well}.json."""
    return {
        "well": well,
        "method": "learned",
        "cells_per_field": cells_per_field,
        "cell_diameter": 23.4,
        "precision": precision,
    }


# With min_cells_per_well 20: A01 has exactly 20 (not low), A02 19 and B01 none (low), B02 55.
# Fields 0, 0, 8, 9, 10, 12, 25, 30: median 9.5 cells per field.
SEGMENTED = [
    _manifest("B02", [30, 25]),
    _manifest("A01", [12, 8]),
    _manifest("B01", [0, 0]),
    _manifest("A02", [10, 9]),
]


def test_segmentation_check_counts_wells_below_the_threshold():
    check = segmentation_check(SEGMENTED, "P1", min_cells_per_well=20, max_low_cell_well_fraction=0.5)
    assert check["cells_per_well"] == {"A01": 20, "A02": 19, "B01": 0, "B02": 55}
    assert list(check["cells_per_well"]) == ["A01", "A02", "B01", "B02"]
    assert check["low_cell_wells"] == ["A02", "B01"]
    assert check["low_cell_well_fraction"] == 0.5
    assert check["median_cells_per_field"] == 9.5
    assert check["method"] == "learned" and check["cell_diameters"] == [23.4]
    assert check["precisions"] == ["bfloat16"]
    # 2 of 4 wells is at the limit of 0.5, not above it: the plate passes.
    assert check["passes"] is True and segmentation_check_failure(check) is None
    json.dumps(check)  # what the stage writes as check.json


@pytest.mark.parametrize(
    ("min_cells", "max_fraction", "passes"),
    [
        (20, 0.49, False),
        (20, 0.51, True),
        (19, 0.25, True),
        (21, 0.5, False),
        (0, 0.25, True),
        (0, 0.24, False),
    ],
)
def test_segmentation_check_passes_up_to_the_share_of_low_cell_wells(min_cells, max_fraction, passes):
    # min 19: only B01 is low (1 of 4); min 21: A01 too (3 of 4); min 0: a well without cells is low.
    check = segmentation_check(
        SEGMENTED, "P1", min_cells_per_well=min_cells, max_low_cell_well_fraction=max_fraction
    )
    assert check["passes"] is passes
    assert (segmentation_check_failure(check) is None) is passes


def test_segmentation_check_failure_names_cause_and_fix():
    check = segmentation_check(SEGMENTED, "P1", min_cells_per_well=20, max_low_cell_well_fraction=0.25)
    message = segmentation_check_failure(check)
    assert message.startswith(
        "plate P1: segmentation found fewer than 20 cells (qc.min_cells_per_well) in 2 of 4 wells "
        "(A02, B01), more than qc.max_low_cell_well_fraction = 0.25 of them; median 9.5 cells per field, "
        "learned segmentation at a cell diameter of 23.4 px."
    )
    for fix in (
        "`metascreen preview`",
        "segment.learned.cell_diameter",
        "segment.learned.finetune",
        "Your own plate",
    ):
        assert fix in message
    assert "\n" not in message


def test_segmentation_check_failure_of_an_empty_plate_counts_the_wells_it_does_not_name():
    manifests = [_manifest(f"A{column:02d}", [0, 1]) for column in range(1, 8)] + [_manifest("B01", [40])]
    check = segmentation_check(manifests, "P2", min_cells_per_well=20, max_low_cell_well_fraction=0.5)
    assert check["low_cell_well_fraction"] == 7 / 8 and check["median_cells_per_field"] == 1.0
    message = segmentation_check_failure(check, wells_named=3)
    assert "in 7 of 8 wells (A01, A02, A03 and 4 more)" in message


def test_segmentation_check_failure_of_a_classical_backend_suggests_its_own_settings():
    manifests = [{"well": "A01", "method": "label_free", "cells_per_field": [0]}]
    check = segmentation_check(manifests, "P1", min_cells_per_well=0, max_low_cell_well_fraction=0.5)
    assert check["cell_diameters"] == check["precisions"] == [] and check["low_cell_wells"] == ["A01"]
    message = segmentation_check_failure(check)
    assert "fewer than 1 cells" in message and "label_free segmentation." in message
    assert "segment.label_free" in message and "segment.method: learned" in message
    assert "cell diameter" not in message


def test_wells_segmented_in_different_precisions_are_a_warning(tmp_path, caplog):
    """A plate spread over nodes with and without bfloat16 units is segmented in both."""
    paths = []
    for manifest in [*SEGMENTED, _manifest("B03", [40, 35], precision="float32")]:
        paths.append(tmp_path / f"{manifest['well']}.json")
        paths[-1].write_text(json.dumps(manifest))
    qc = {"min_cells_per_well": 20, "max_low_cell_well_fraction": 0.5}
    with caplog.at_level(logging.WARNING, logger="metascreen"):
        stages.check_segmentation("P1", paths, qc, tmp_path / "check.json")
    assert json.loads((tmp_path / "check.json").read_text())["precisions"] == ["bfloat16", "float32"]
    assert "different precisions (bfloat16, float32)" in caplog.text
    assert "segment.learned.precision: float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metascreen"):
        stages.check_segmentation("P1", paths[:4], qc, tmp_path / "check.json")
    assert "precision" not in caplog.text


def test_segmentation_check_rejects_no_wells_and_bad_thresholds():
    with pytest.raises(ValueError, match="no segmentation manifests"):
        segmentation_check([], "P1", min_cells_per_well=20, max_low_cell_well_fraction=0.5)
    with pytest.raises(ValueError, match="max_low_cell_well_fraction in"):
        segmentation_check(SEGMENTED, "P1", min_cells_per_well=20, max_low_cell_well_fraction=1.5)
