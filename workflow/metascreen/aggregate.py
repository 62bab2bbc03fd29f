"""Per-cell, per-field, per-well, per-sample and per-plate tables.

Every function here is pure: DataFrames (or segmentation manifests) in, tables out, no file I/O.

The per-cell table
------------------
:func:`cell_table` joins a plate's measurements, predictions, plate map and field QC
into the public per-cell table, in pycytominer's convention so that it goes into
``pycytominer.aggregate`` unchanged: identifiers and annotations are ``Metadata_*``
columns (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (the field),
``Metadata_ObjectNumber`` (the cell's label in its field), ``Metadata_Sample``, every
other plate-map column ``c`` as ``Metadata_c``, the cell's position, predicted class,
model hash and field QC flags); the per-cell measurements are ``Cells_*`` columns, the
morphology of :data:`metascreen.measure.FEATURE_COLUMNS` and the calibrated probability
of the positive class, ``Cells_probability``. The summaries below read that table.

Quality control
---------------
QC acts on fields and wells; "after QC" counts what passes both. Before either, a plate
whose segmentation found too few cells in too many wells stops the run
(:func:`segmentation_check`).

* Fields (:func:`field_table`): ``empty_field`` when no cell was segmented, the field
  is nearly uniform (``contrast < min_contrast``: blank, black or fully saturated) or it
  has NaN pixels (``empty_reason`` says which: ``no_cells``, ``low_contrast``, ``nan``);
  ``out_of_focus`` when its focus is below ``min_relative_focus`` times the median focus
  of the plate's fields with cells (relative, so it holds for any modality and
  exposure); ``saturated`` when more than ``max_saturated_fraction`` of its pixels are
  at the camera's maximum. Cells of a flagged field are left out of every statistic.
* Wells (:func:`per_well_summary`): ``no_cells`` or ``too_few_cells`` when fewer than
  ``min_cells`` cells remain after field QC; such a well has ``passes_qc`` false and does
  not contribute to the per-sample and per-plate tables. A well also lists the flags of
  its fields, but keeps its remaining fields' cells.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from metascreen.measure import FEATURE_COLUMNS

__all__ = [
    "CELL_KEYS",
    "FIELD_COLUMNS",
    "PER_PLATE_COLUMNS",
    "PER_SAMPLE_COLUMNS",
    "PER_WELL_COLUMNS",
    "cell_column",
    "cell_table",
    "field_table",
    "per_plate_summary",
    "per_sample_summary",
    "per_well_summary",
    "segmentation_check",
    "segmentation_check_failure",
    "wilson_interval",
]

#: Confidence level of every interval in the summary tables.
CONFIDENCE = 0.95

#: Plate-map and measurement columns with a pycytominer name of their own.
_NAMED_METADATA = {
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "field": "Metadata_Site",
    "label": "Metadata_ObjectNumber",
    "sample": "Metadata_Sample",
}
#: Per-cell columns that are measurements (``Cells_*``); the rest are annotations.
_CELL_MEASUREMENTS = (*FEATURE_COLUMNS, "probability")

#: Identity of a cell in the per-cell table.
CELL_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]

#: Columns of :func:`field_table`, in order.
FIELD_COLUMNS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "n_cells",
    "focus",
    "relative_focus",
    "saturated_fraction",
    "contrast",
    "nan_fraction",
    "qc_flags",
    "empty_reason",
]

_KEYS = ["plate", "well"]
_FIELD_KEYS = ["plate", "well", "field"]
_METADATA_COLUMNS = ["sample", "condition", "cell_line", "train_class"]
# Internal name -> per-cell column of what the summaries read.
_CELL_INPUTS = {
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "field": "Metadata_Site",
    "probability": "Cells_probability",
    "is_positive": "Metadata_is_positive",
    "elongation": "Cells_elongation",
    "area": "Cells_area",
    "field_qc_flags": "Metadata_field_qc_flags",
}
_CELL_STATISTICS = [
    "mean_probability",
    "median_probability",
    "mean_elongation",
    "median_elongation",
    "mean_area",
    "median_area",
]
_FRACTION_COLUMNS = ["fraction_positive", "fraction_ci_low", "fraction_ci_high"]
_COUNTS = ["n_cells_before_qc", "n_cells_after_qc", "n_positive"]

#: Columns of :func:`per_well_summary`, in order.
PER_WELL_COLUMNS = [
    *_KEYS,
    *_METADATA_COLUMNS,
    "n_fields",
    "n_fields_after_qc",
    *_COUNTS,
    *_FRACTION_COLUMNS,
    *_CELL_STATISTICS,
    "qc_flags",
    "passes_qc",
]

#: Columns of :func:`per_sample_summary`, in order.
PER_SAMPLE_COLUMNS = [
    "sample",
    *_METADATA_COLUMNS[1:],
    "n_plates",
    "n_wells",
    "n_wells_failed_qc",
    *_COUNTS,
    *_FRACTION_COLUMNS,
    "well_ci_low",
    "well_ci_high",
    *_CELL_STATISTICS,
    "qc_flags",
]

#: Columns of :func:`per_plate_summary`, in order.
PER_PLATE_COLUMNS = [
    "plate",
    "n_wells",
    "n_wells_failed_qc",
    "n_fields",
    "n_fields_after_qc",
    *_COUNTS,
    *_FRACTION_COLUMNS,
    *_CELL_STATISTICS,
    "qc_flags",
]


def wilson_interval(
    successes: np.ndarray | Sequence[float] | float,
    trials: np.ndarray | Sequence[float] | float,
    *,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion.

    Parameters
    ----------
    successes, trials
        Counts; scalars or arrays that broadcast against each other.
    confidence
        Two-sided confidence level in (0, 1).

    Returns
    -------
    low, high : numpy.ndarray
        Float64 bounds with the broadcast shape of the inputs (0-d for scalars);
        NaN where ``trials == 0``.

    Raises
    ------
    ValueError
        If ``confidence`` is not in (0, 1), or a count is negative, or
        ``successes > trials``.

    Examples
    --------
    >>> low, high = wilson_interval(8, 10)
    >>> round(float(low), 4), round(float(high), 4)
    (0.4902, 0.9433)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    if np.any(k < 0) or np.any(n < 0):
        raise ValueError("successes and trials must be non-negative counts")
    if np.any(k > n):
        raise ValueError("successes must not exceed trials")
    # the standard library's quantile: scipy.stats costs every per-well job half a second to import
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    valid = n > 0
    n_safe = np.where(valid, n, 1.0)  # avoids 0/0 warnings; masked out below
    p = k / n_safe
    denominator = 1.0 + z**2 / n_safe
    centre = (p + z**2 / (2.0 * n_safe)) / denominator
    half_width = z / denominator * np.sqrt(p * (1.0 - p) / n_safe + z**2 / (4.0 * n_safe**2))
    # Clipping only removes rounding error at p = 0 and p = 1.
    low = np.where(valid, np.clip(centre - half_width, 0.0, 1.0), np.nan)
    high = np.where(valid, np.clip(centre + half_width, 0.0, 1.0), np.nan)
    return low, high


def cell_column(name: str) -> str:
    """Name in the per-cell table of a measurement, prediction or plate-map column.

    Parameters
    ----------
    name
        Column name as the stages and the plate map write it, e.g. ``"well"``,
        ``"area"``, ``"probability"``, ``"predicted_class"``, ``"condition"``.

    Returns
    -------
    str
        ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (field),
        ``Metadata_ObjectNumber`` (label) and ``Metadata_Sample`` for those five;
        ``Cells_{name}`` for the morphology features and ``probability``;
        ``Metadata_{name}`` for anything else.

    Examples
    --------
    >>> cell_column("field"), cell_column("elongation"), cell_column("cell_line")
    ('Metadata_Site', 'Cells_elongation', 'Metadata_cell_line')
    """
    if name in _NAMED_METADATA:
        return _NAMED_METADATA[name]
    return f"Cells_{name}" if name in _CELL_MEASUREMENTS else f"Metadata_{name}"


def field_table(
    fields: pd.DataFrame,
    *,
    min_relative_focus: float = 0.25,
    max_saturated_fraction: float = 0.01,
    min_contrast: float = 0.005,
) -> pd.DataFrame:
    """Quality-control flags of every field (see "Quality control" in the module docstring).

    Parameters
    ----------
    fields
        One row per field with ``plate``, ``well``, ``field`` and the metrics of
        :func:`metascreen.measure.field_quality` (``n_cells``, ``focus``,
        ``saturated_fraction``, ``contrast``, ``nan_fraction``).
    min_relative_focus
        Fields whose focus is below this fraction of the plate's median focus (over
        fields with cells) are flagged ``out_of_focus``.
    max_saturated_fraction
        Fields with a larger fraction of saturated pixels are flagged ``saturated``.
    min_contrast
        Fields without cells, with a lower coefficient of variation or with NaN pixels
        are flagged ``empty_field``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`FIELD_COLUMNS`, sorted by plate, well and field:
        ``relative_focus`` is the focus over the plate's median, ``qc_flags`` the
        ";"-joined flags ("" for a field that passed), ``empty_reason`` why a field is
        ``empty_field`` (";"-joined ``no_cells``, ``low_contrast``, ``nan``; "" otherwise).

    Raises
    ------
    ValueError
        If a column is missing or a field is listed twice.
    """
    _require_columns(
        fields,
        [*_FIELD_KEYS, "n_cells", "focus", "saturated_fraction", "contrast", "nan_fraction"],
        "the field table",
        "pass the per-field metrics written by the measure stage",
    )
    table = fields.copy()
    for column in _KEYS:
        table[column] = table[column].astype(str)
    if table.duplicated(_FIELD_KEYS).any():
        raise ValueError("the field table lists a plate/well/field more than once")
    with_cells = table["focus"].where(table["n_cells"] > 0)
    plate_focus = with_cells.groupby(table["plate"]).transform("median")
    table["relative_focus"] = (table["focus"] / plate_focus).astype(np.float64)
    empty_reasons = {
        "no_cells": table["n_cells"] == 0,
        "low_contrast": table["contrast"] < min_contrast,
        "nan": table["nan_fraction"] > 0,
    }
    table["empty_reason"] = _flag_strings(empty_reasons)
    flags = {
        "empty_field": table["empty_reason"] != "",
        "out_of_focus": table["relative_focus"] < min_relative_focus,  # NaN compares False
        "saturated": table["saturated_fraction"] > max_saturated_fraction,
    }
    table["qc_flags"] = _flag_strings(flags)
    table = table.rename(columns={key: cell_column(key) for key in _FIELD_KEYS})
    return table[FIELD_COLUMNS].sort_values(FIELD_COLUMNS[:3], ignore_index=True)


def cell_table(
    measurements: pd.DataFrame,
    predictions: pd.DataFrame,
    platemap: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    positive_class: str,
) -> pd.DataFrame:
    """Join a plate's measurements, predictions, plate map and field QC into its per-cell table.

    Parameters
    ----------
    measurements
        Per-cell morphology of the measure stage (``plate``, ``well``, ``field``,
        ``label``, features, position, ``crop_index``).
    predictions
        Per-cell ``probability``, ``predicted_class`` and ``model_sha256`` of the
        classify stage, keyed like ``measurements``.
    platemap
        One row per plate and well; every column is carried (``sample`` and the others).
    fields
        Output of :func:`field_table`; its ``qc_flags`` become ``Metadata_field_qc_flags``.
    positive_class
        Class name counted by ``Metadata_is_positive``.

    Returns
    -------
    pandas.DataFrame
        One row per cell, columns renamed by :func:`cell_column`: the ``Metadata_*``
        columns first (:data:`CELL_KEYS` leading), then the ``Cells_*`` columns.

    Raises
    ------
    ValueError
        If a cell lacks a prediction or its field's QC, or a key is duplicated.
    """
    keys = [*_FIELD_KEYS, "label"]
    cells = measurements.merge(predictions, on=keys, how="left", validate="one_to_one")
    if cells["probability"].isna().any():
        raise ValueError("some measured cells have no prediction; rerun the classify stage")
    cells["is_positive"] = cells["predicted_class"] == positive_class
    cells = cells.merge(platemap, on=_KEYS, how="left", validate="many_to_one")
    field_flags = fields.rename(columns={cell_column(key): key for key in _FIELD_KEYS})
    field_flags = field_flags[[*_FIELD_KEYS, "qc_flags"]].rename(columns={"qc_flags": "field_qc_flags"})
    cells = cells.merge(field_flags, on=_FIELD_KEYS, how="left", validate="many_to_one")
    if cells["field_qc_flags"].isna().any():
        raise ValueError("some cells lie in fields absent from the field table")
    cells = cells.rename(columns={name: cell_column(name) for name in cells.columns})
    metadata = [*CELL_KEYS, *(c for c in cells.columns if c.startswith("Metadata_") and c not in CELL_KEYS)]
    return cells[metadata + [c for c in cells.columns if c.startswith("Cells_")]]


def per_well_summary(
    cells: pd.DataFrame, fields: pd.DataFrame, platemap: pd.DataFrame, *, min_cells: int = 20
) -> pd.DataFrame:
    """Summarise the cells of every plate-map well.

    Parameters
    ----------
    cells
        Per-cell table of :func:`cell_table` (it needs ``Metadata_Plate``,
        ``Metadata_Well``, ``Metadata_Site``, ``Cells_probability``,
        ``Metadata_is_positive``, ``Cells_elongation``, ``Cells_area`` and
        ``Metadata_field_qc_flags``).
    fields
        Output of :func:`field_table`.
    platemap
        One row per plate and well with ``plate``, ``well``, ``sample``,
        ``condition``, ``cell_line`` and ``train_class``.
    min_cells
        Wells with fewer cells after field QC fail QC (``too_few_cells``).

    Returns
    -------
    pandas.DataFrame
        One row per plate-map well with the columns :data:`PER_WELL_COLUMNS`,
        sorted by plate and well. ``n_cells_before_qc`` counts all the well's cells;
        everything after it describes its cells in fields that passed QC:
        ``fraction_positive = n_positive / n_cells_after_qc`` with a Wilson 95 %
        interval, probability, elongation and area means and medians (NaN without
        cells). ``qc_flags`` is the ";"-joined flags of the well and its fields ("" when
        none); ``passes_qc`` says whether the well enters the per-sample and per-plate
        tables. Metadata missing in the plate map becomes "".

    Raises
    ------
    ValueError
        If a required column is missing, a plate-map well is duplicated, a cell
        lies in a well absent from the plate map, or ``min_cells`` is negative.
    """
    platemap = _validated_platemap(platemap)
    return _well_table(_validated_cells(cells, platemap), _validated_fields(fields), platemap, min_cells)


def per_sample_summary(
    cells: pd.DataFrame,
    fields: pd.DataFrame,
    platemap: pd.DataFrame,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    min_cells: int = 20,
) -> pd.DataFrame:
    """Summarise every sample over its wells on all plates.

    After QC, a sample pools the cells in passing fields of its wells that pass QC
    (:func:`per_well_summary` with the same ``min_cells``); plate-map wells without a
    sample name (e.g. empty wells) are ignored.

    Parameters
    ----------
    cells, fields, platemap, min_cells
        As :func:`per_well_summary`.
    n_bootstrap
        Number of bootstrap replicates for the between-well interval.
    seed
        Seed of the bootstrap. Each sample draws from its own stream derived from
        the seed and the sample name, so a sample's interval does not change when
        other samples are added or removed.

    Returns
    -------
    pandas.DataFrame
        One row per sample with the columns :data:`PER_SAMPLE_COLUMNS`, sorted by
        sample. ``n_wells`` counts the passing wells, ``n_wells_failed_qc`` the others,
        ``n_cells_before_qc`` all cells of all its wells. ``fraction_positive`` pools the
        cells after QC, with a Wilson 95 % interval (``fraction_ci_*``) that treats
        cells as independent. ``well_ci_*`` is a 95 % percentile bootstrap that
        resamples passing wells with replacement and pools each replicate, so it
        reflects well-to-well variation; it is NaN with fewer than two passing wells.
        ``condition``, ``cell_line`` and ``train_class`` join distinct non-empty values
        with ";" if the plate map disagrees with itself; ``qc_flags`` joins its wells'
        flags. A sample whose wells all fail QC keeps its row with zero counts after QC
        and NaN statistics.

    Raises
    ------
    ValueError
        As :func:`per_well_summary`, or if ``n_bootstrap < 1``.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap!r}")
    platemap = _validated_platemap(platemap)
    cells = _validated_cells(cells, platemap)
    wells = _well_table(cells, _validated_fields(fields), platemap, min_cells)
    wells = wells[wells["sample"] != ""]
    passing = wells[wells["passes_qc"]]

    metadata = wells.groupby("sample").agg(
        condition=("condition", _join_distinct),
        cell_line=("cell_line", _join_distinct),
        train_class=("train_class", _join_distinct),
        n_wells_failed_qc=("passes_qc", lambda passes: int((~passes).sum())),
        n_cells_before_qc=("n_cells_before_qc", "sum"),
        qc_flags=("qc_flags", _join_flags),
    )
    counts = passing.groupby("sample").agg(n_plates=("plate", "nunique"), n_wells=("well", "size"))
    stats = _cell_stats(_kept_cells(cells, passing[[*_KEYS, "sample"]]), ["sample"]).set_index("sample")
    intervals = pd.DataFrame.from_dict(
        {
            sample: _bootstrap_interval(
                group["n_positive"].to_numpy(),
                group["n_cells_after_qc"].to_numpy(),
                n_bootstrap=n_bootstrap,
                rng=np.random.default_rng([seed, zlib.crc32(str(sample).encode("utf-8"))]),
            )
            for sample, group in passing.groupby("sample")
        },
        orient="index",
        columns=["well_ci_low", "well_ci_high"],
        dtype=np.float64,
    )
    table = metadata.join([counts, stats, intervals], how="left").reset_index()
    table = _with_fractions(_fill_counts(table, ["n_plates", "n_wells"]))
    return table[PER_SAMPLE_COLUMNS].sort_values("sample", ignore_index=True)


def per_plate_summary(
    cells: pd.DataFrame, fields: pd.DataFrame, platemap: pd.DataFrame, *, min_cells: int = 20
) -> pd.DataFrame:
    """Summarise every plate of the plate map.

    Parameters
    ----------
    cells, fields, platemap, min_cells
        As :func:`per_well_summary`.

    Returns
    -------
    pandas.DataFrame
        One row per plate with the columns :data:`PER_PLATE_COLUMNS`, sorted by
        plate: plate-map wells (``n_wells``) and those failing QC, fields and those
        passing QC, all cells (``n_cells_before_qc``), and, pooled over the cells in
        passing fields of passing wells, the counts after QC, ``fraction_positive``
        with its Wilson 95 % interval and the cell statistics; ``qc_flags`` joins its
        wells' flags.

    Raises
    ------
    ValueError
        As :func:`per_well_summary`.
    """
    platemap = _validated_platemap(platemap)
    cells = _validated_cells(cells, platemap)
    wells = _well_table(cells, _validated_fields(fields), platemap, min_cells)
    table = wells.groupby("plate").agg(
        n_wells=("well", "size"),
        n_wells_failed_qc=("passes_qc", lambda passes: int((~passes).sum())),
        n_fields=("n_fields", "sum"),
        n_fields_after_qc=("n_fields_after_qc", "sum"),
        n_cells_before_qc=("n_cells_before_qc", "sum"),
        qc_flags=("qc_flags", _join_flags),
    )
    stats = _cell_stats(_kept_cells(cells, wells.loc[wells["passes_qc"], _KEYS]), ["plate"])
    table = table.join(stats.set_index("plate"), how="left").reset_index()
    table = _with_fractions(_fill_counts(table, []))
    return table[PER_PLATE_COLUMNS].sort_values("plate", ignore_index=True)


def segmentation_check(
    manifests: Sequence[Mapping[str, Any]],
    plate: str,
    *,
    min_cells_per_well: int,
    max_low_cell_well_fraction: float,
) -> dict[str, Any]:
    """Check that segmentation found cells in enough of a plate's wells to train and classify.

    Parameters
    ----------
    manifests
        The segmentation manifests of the plate's wells (``segment/{well}.json``): ``well``,
        ``method``, ``cells_per_field`` and, for the learned backend, ``cell_diameter`` (px)
        and ``precision`` (what the network computed in: ``bfloat16``, ``float32``, ...).
    plate
        The plate's id.
    min_cells_per_well
        A well with fewer segmented cells is a low-cell well (one without cells always is),
        as in the well QC of :func:`per_well_summary`.
    max_low_cell_well_fraction
        The plate passes when at most this share of its wells are low-cell wells.

    Returns
    -------
    dict
        JSON-ready: ``plate``, ``method`` (", "-joined if the wells differ),
        ``cell_diameters`` (the distinct diameters used, px; empty for backends without
        one), ``precisions`` (the distinct precisions the wells ran in; more than one when
        nodes of a cluster differ), both thresholds, ``cells_per_well`` (well -> segmented
        cells, sorted by well), ``low_cell_wells`` (sorted), ``low_cell_well_fraction``,
        ``median_cells_per_field`` (over all the plate's fields) and ``passes``.

    Raises
    ------
    ValueError
        If there are no manifests or a threshold is out of range.
    """
    if not manifests:
        raise ValueError(f"plate {plate}: no segmentation manifests to check")
    if min_cells_per_well < 0 or not 0 <= max_low_cell_well_fraction <= 1:
        raise ValueError(
            "min_cells_per_well must be >= 0 and max_low_cell_well_fraction in [0, 1], got "
            f"{min_cells_per_well!r} and {max_low_cell_well_fraction!r}"
        )
    cells_per_well = {
        manifest["well"]: int(sum(manifest["cells_per_field"]))
        for manifest in sorted(manifests, key=lambda manifest: manifest["well"])
    }
    threshold = _min_cells_to_pass(min_cells_per_well)
    low_cell_wells = [well for well, n_cells in cells_per_well.items() if n_cells < threshold]
    low_cell_well_fraction = len(low_cell_wells) / len(cells_per_well)
    cells_per_field = [n_cells for manifest in manifests for n_cells in manifest["cells_per_field"]]
    return {
        "plate": plate,
        "method": ", ".join(sorted({manifest["method"] for manifest in manifests})),
        "cell_diameters": sorted(
            {float(manifest["cell_diameter"]) for manifest in manifests if "cell_diameter" in manifest}
        ),
        "precisions": sorted({manifest["precision"] for manifest in manifests if "precision" in manifest}),
        "min_cells_per_well": min_cells_per_well,
        "max_low_cell_well_fraction": max_low_cell_well_fraction,
        "cells_per_well": cells_per_well,
        "low_cell_wells": low_cell_wells,
        "low_cell_well_fraction": low_cell_well_fraction,
        "median_cells_per_field": float(np.median(cells_per_field)) if cells_per_field else 0.0,
        "passes": low_cell_well_fraction <= max_low_cell_well_fraction,
    }


def segmentation_check_failure(check: Mapping[str, Any], *, wells_named: int = 5) -> str | None:
    """The one-line message that stops a plate failing :func:`segmentation_check`.

    Parameters
    ----------
    check
        Output of :func:`segmentation_check`.
    wells_named
        How many low-cell wells the message names; the rest are counted.

    Returns
    -------
    str or None
        None when the plate passes; else what segmentation found (low-cell wells of all
        wells, median cells per field), with which method and cell diameter, and what to do.
    """
    if check["passes"]:
        return None
    low = check["low_cell_wells"]
    named = ", ".join(low[:wells_named])
    if len(low) > wells_named:
        named += f" and {len(low) - wells_named} more"
    method = check["method"]
    used = f"{method} segmentation"
    if check["cell_diameters"]:
        diameters = ", ".join(f"{diameter:.1f}" for diameter in check["cell_diameters"])
        used += f" at a cell diameter of {diameters} px"
    if "learned" in method.split(", "):
        fix = (
            "set segment.learned.cell_diameter (px) to the cells' typical diameter, or fine-tune the "
            "segmenter on a few annotated fields of this plate with segment.learned.finetune "
            '(README "Your own plate")'
        )
    else:
        fix = (
            f"check segment.channel and the parameters under segment.{method}, or use segment.method: "
            'learned (README "Segmentation backends")'
        )
    return (
        f"plate {check['plate']}: segmentation found fewer than "
        f"{_min_cells_to_pass(check['min_cells_per_well'])} cells (qc.min_cells_per_well) in {len(low)} of "
        f"{len(check['cells_per_well'])} wells ({named}), more than qc.max_low_cell_well_fraction = "
        f"{check['max_low_cell_well_fraction']:g} of them; median {check['median_cells_per_field']:g} cells "
        f"per field, {used}. Look at the masks with `metascreen preview`, then {fix}. Training on "
        "its wells and its classification wait until it passes."
    )


def _min_cells_to_pass(min_cells: int) -> int:
    """The cells a well needs to pass QC: ``min_cells``, but a well without cells never passes."""
    return max(min_cells, 1)


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str, fix: str) -> None:
    """Raise a ValueError naming the columns of ``columns`` absent from ``table``."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; {fix}")


def _validated_platemap(platemap: pd.DataFrame) -> pd.DataFrame:
    """Plate map reduced to the key and metadata columns, as strings."""
    _require_columns(
        platemap,
        [*_KEYS, *_METADATA_COLUMNS],
        "the plate map",
        "give one row per plate and well with these columns (train_class may be empty)",
    )
    table = platemap[[*_KEYS, *_METADATA_COLUMNS]].copy()
    # Keys as strings so that a plate named "1" read from CSV as an int still joins.
    for column in _KEYS:
        table[column] = table[column].astype(str)
    for column in _METADATA_COLUMNS:
        table[column] = table[column].fillna("").astype(str)
    duplicated = table.duplicated(_KEYS, keep=False)
    if duplicated.any():
        examples = table.loc[duplicated, _KEYS].drop_duplicates().head(5)
        raise ValueError(
            "the plate map lists these plate/well pairs more than once: "
            f"{examples.to_records(index=False).tolist()}; keep one row per well"
        )
    return table


def _validated_cells(cells: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Per-cell columns used here, under their short names, checked against the plate map."""
    _require_columns(
        cells,
        list(_CELL_INPUTS.values()),
        "the per-cell table",
        "pass the per-cell table of metascreen.aggregate.cell_table (results/{plate}/{plate}_cells.parquet)",
    )
    table = cells[list(_CELL_INPUTS.values())].rename(columns={v: k for k, v in _CELL_INPUTS.items()})
    for column in _KEYS:
        table[column] = table[column].astype(str)
    for column in ("probability", "is_positive"):
        if table[column].isna().any():
            raise ValueError(
                f"the per-cell table has missing values in '{_CELL_INPUTS[column]}'; "
                "classify every cell before aggregating"
            )
    table["probability"] = table["probability"].astype(np.float64)
    if ((table["probability"] < 0.0) | (table["probability"] > 1.0)).any():
        raise ValueError("the per-cell column 'Cells_probability' must lie in [0, 1]")
    table["is_positive"] = table["is_positive"].astype(bool)
    # CSV round trips turn "" into NaN
    table["field_qc_flags"] = table["field_qc_flags"].fillna("").astype(str)
    known = table.merge(platemap[_KEYS], on=_KEYS, how="left", indicator=True)
    unknown = known["_merge"] == "left_only"
    if unknown.any():
        examples = known.loc[unknown, _KEYS].drop_duplicates().head(5)
        raise ValueError(
            "cells lie in plate/well pairs absent from the plate map: "
            f"{examples.to_records(index=False).tolist()}; add these wells to the plate "
            "map or check that well ids are spelled alike (e.g. 'B03', not 'B3')"
        )
    return table


def _validated_fields(fields: pd.DataFrame) -> pd.DataFrame:
    """Keys and QC flags of the field table, under their short names."""
    _require_columns(
        fields, FIELD_COLUMNS[:3] + ["qc_flags"], "the field table", "pass the output of field_table"
    )
    table = fields[[*FIELD_COLUMNS[:3], "qc_flags"]].rename(
        columns={cell_column(key): key for key in _FIELD_KEYS}
    )
    for column in _KEYS:
        table[column] = table[column].astype(str)
    table["qc_flags"] = table["qc_flags"].fillna("").astype(str)
    return table


def _kept_cells(cells: pd.DataFrame, wells: pd.DataFrame) -> pd.DataFrame:
    """Cells in passing fields of ``wells`` (key columns and any extra columns of ``wells``)."""
    return cells[cells["field_qc_flags"] == ""].merge(wells, on=_KEYS, how="inner")


def _cell_stats(cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Cell counts and probability/morphology statistics per group of ``keys``."""
    stats = (
        cells.groupby(keys, sort=True)
        .agg(
            n_cells_after_qc=("probability", "size"),
            n_positive=("is_positive", "sum"),
            mean_probability=("probability", "mean"),
            median_probability=("probability", "median"),
            mean_elongation=("elongation", "mean"),
            median_elongation=("elongation", "median"),
            mean_area=("area", "mean"),
            median_area=("area", "median"),
        )
        .reset_index()
    )
    return stats[[*keys, "n_cells_after_qc", "n_positive", *_CELL_STATISTICS]]


def _well_table(
    cells: pd.DataFrame, fields: pd.DataFrame, platemap: pd.DataFrame, min_cells: int
) -> pd.DataFrame:
    """Per-well summary from validated tables (see :func:`per_well_summary`)."""
    if min_cells < 0:
        raise ValueError(f"min_cells must be non-negative, got {min_cells!r}")
    field_counts = fields.groupby(_KEYS).agg(
        n_fields=("field", "size"),
        n_fields_after_qc=("qc_flags", lambda flags: int((flags == "").sum())),
        field_flags=("qc_flags", _join_flags),
    )
    before = cells.groupby(_KEYS).size().rename("n_cells_before_qc")
    table = platemap.join(field_counts, on=_KEYS).join(before, on=_KEYS)
    table = table.merge(_cell_stats(_kept_cells(cells, platemap[_KEYS]), _KEYS), on=_KEYS, how="left")
    table = _with_fractions(_fill_counts(table, ["n_fields", "n_fields_after_qc"]))
    n_cells = table["n_cells_after_qc"]
    table["passes_qc"] = n_cells >= _min_cells_to_pass(min_cells)
    well_flags = {"no_cells": n_cells == 0, "too_few_cells": (n_cells > 0) & (n_cells < min_cells)}
    table["qc_flags"] = [
        _join_flags([own, inherited])
        for own, inherited in zip(_flag_strings(well_flags), table["field_flags"].fillna(""), strict=True)
    ]
    return table[PER_WELL_COLUMNS].sort_values(_KEYS, ignore_index=True)


def _fill_counts(table: pd.DataFrame, extra_counts: list[str]) -> pd.DataFrame:
    """Zero-fill and int64-cast counts; float64-cast statistics (NaN stays NaN)."""
    table = table.copy()
    for column in [*_COUNTS, *extra_counts]:
        table[column] = table[column].fillna(0).astype(np.int64)
    for column in _CELL_STATISTICS:
        table[column] = table[column].astype(np.float64)
    return table


def _with_fractions(table: pd.DataFrame) -> pd.DataFrame:
    """Add the pooled positive fraction and its Wilson interval."""
    table = table.copy()
    successes = table["n_positive"].to_numpy(dtype=np.float64)
    trials = table["n_cells_after_qc"].to_numpy(dtype=np.float64)
    table["fraction_positive"] = np.divide(
        successes, trials, out=np.full(successes.shape, np.nan), where=trials > 0
    )
    low, high = wilson_interval(successes, trials, confidence=CONFIDENCE)
    table["fraction_ci_low"] = low.astype(np.float64)
    table["fraction_ci_high"] = high.astype(np.float64)
    return table


def _bootstrap_interval(
    successes: np.ndarray, trials: np.ndarray, *, n_bootstrap: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap of the pooled fraction, resampling wells with replacement."""
    n_wells = len(trials)
    if n_wells < 2:
        # One well says nothing about well-to-well variation.
        return np.nan, np.nan
    draws = rng.integers(0, n_wells, size=(n_bootstrap, n_wells))
    pooled = successes[draws].sum(axis=1) / trials[draws].sum(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(pooled, [tail, 1.0 - tail])
    return float(low), float(high)


def _flag_strings(flags: dict[str, pd.Series]) -> list[str]:
    """Per row, the names of the raised flags, ";"-joined in the order given."""
    names = np.array(list(flags))
    raised = np.column_stack([np.asarray(values, dtype=bool) for values in flags.values()])
    return [";".join(names[row]) for row in raised]


def _join_flags(values: Iterable[str]) -> str:
    """Distinct flags of ";"-joined flag strings, sorted and ";"-joined."""
    return ";".join(sorted({flag for value in values for flag in value.split(";") if flag}))


def _join_distinct(values: pd.Series) -> str:
    """Distinct non-empty values, sorted and ";"-joined."""
    return ";".join(sorted({value for value in values if value != ""}))
