"""Aggregate per-cell predictions into per-well, per-sample and per-plate tables.

Every function here is pure: DataFrames in, DataFrames out, no file I/O.

The per-cell table has one row per segmented cell with at least the columns
``plate``, ``well``, ``probability`` (calibrated probability of the positive class),
``is_positive`` (``probability >= 0.5``), ``elongation`` and ``area``. The plate map
has one row per plate and well with the columns ``plate``, ``well``, ``sample``,
``condition``, ``cell_line`` and ``train_class``; it is the authority for the well
metadata, so a plate-map well without any cell still gets a row.

Quality control
---------------
A well is flagged ``no_cells`` when it has no cell and ``too_few_cells`` when it has
fewer than ``min_cells``. Flagged wells keep their row in the per-well table but do
not contribute to the per-sample summary.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = [
    "PER_PLATE_COLUMNS",
    "PER_SAMPLE_COLUMNS",
    "PER_WELL_COLUMNS",
    "per_plate_summary",
    "per_sample_summary",
    "per_well_summary",
    "wilson_interval",
]

#: Confidence level of every interval in the summary tables.
CONFIDENCE = 0.95

_KEYS = ["plate", "well"]
_METADATA_COLUMNS = ["sample", "condition", "cell_line", "train_class"]
_CELL_COLUMNS = ["plate", "well", "probability", "is_positive", "elongation", "area"]
_CELL_STATISTICS = ["mean_probability", "median_probability", "mean_elongation", "median_area"]
_FRACTION_COLUMNS = ["fraction_positive", "fraction_ci_low", "fraction_ci_high"]

#: Columns of :func:`per_well_summary`, in order.
PER_WELL_COLUMNS = [
    *_KEYS,
    *_METADATA_COLUMNS,
    "n_cells",
    "n_positive",
    *_FRACTION_COLUMNS,
    *_CELL_STATISTICS,
    "qc_flags",
]

#: Columns of :func:`per_sample_summary`, in order.
PER_SAMPLE_COLUMNS = [
    "sample",
    "condition",
    "cell_line",
    "train_class",
    "n_plates",
    "n_wells",
    "n_wells_failed_qc",
    "n_cells",
    "n_positive",
    *_FRACTION_COLUMNS,
    "well_ci_low",
    "well_ci_high",
    *_CELL_STATISTICS,
]

#: Columns of :func:`per_plate_summary`, in order.
PER_PLATE_COLUMNS = [
    "plate",
    "n_wells",
    "n_wells_with_cells",
    "n_cells",
    "n_positive",
    "fraction_positive",
    "mean_probability",
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
    z = norm.ppf(0.5 + confidence / 2.0)
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


def per_well_summary(cells: pd.DataFrame, platemap: pd.DataFrame, *, min_cells: int = 20) -> pd.DataFrame:
    """Summarise the cells of every plate-map well.

    Parameters
    ----------
    cells
        Per-cell table (see the module docstring for the required columns).
    platemap
        One row per plate and well with ``plate``, ``well``, ``sample``,
        ``condition``, ``cell_line`` and ``train_class``.
    min_cells
        Wells with fewer cells are flagged ``too_few_cells``.

    Returns
    -------
    pandas.DataFrame
        One row per plate-map well with the columns :data:`PER_WELL_COLUMNS`,
        sorted by plate and well. ``fraction_positive`` is ``n_positive / n_cells``
        with a Wilson 95 % interval; ``qc_flags`` is a ";"-joined list of flags, the
        empty string for a well that passed. Fractions and cell statistics are NaN
        for wells without cells; metadata missing in the plate map becomes "".

    Raises
    ------
    ValueError
        If a required column is missing, a plate-map well is duplicated, a cell
        lies in a well absent from the plate map, or ``min_cells`` is negative.
    """
    platemap = _validated_platemap(platemap)
    cells = _validated_cells(cells, platemap)
    return _well_table(cells, platemap, min_cells)


def per_sample_summary(
    cells: pd.DataFrame,
    platemap: pd.DataFrame,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    min_cells: int = 20,
) -> pd.DataFrame:
    """Summarise every sample over its wells on all plates.

    Only wells that pass quality control (no ``qc_flags`` in
    :func:`per_well_summary` with the same ``min_cells``) contribute; plate-map
    wells without a sample name (e.g. empty wells) are ignored.

    Parameters
    ----------
    cells
        Per-cell table (see the module docstring for the required columns).
    platemap
        One row per plate and well (see :func:`per_well_summary`).
    n_bootstrap
        Number of bootstrap replicates for the between-well interval.
    seed
        Seed of the bootstrap. Each sample draws from its own stream derived from
        the seed and the sample name, so a sample's interval does not change when
        other samples are added or removed.
    min_cells
        Wells with fewer cells are excluded.

    Returns
    -------
    pandas.DataFrame
        One row per sample with the columns :data:`PER_SAMPLE_COLUMNS`, sorted by
        sample. ``fraction_positive`` pools all cells of the contributing wells,
        with a Wilson 95 % interval (``fraction_ci_*``) that treats cells as
        independent. ``well_ci_*`` is a 95 % percentile bootstrap that resamples
        wells with replacement and pools each replicate, so it reflects
        well-to-well variation; it is NaN with fewer than two contributing wells.
        ``condition``, ``cell_line`` and ``train_class`` join distinct non-empty
        values with ";" if the plate map disagrees with itself. A sample whose
        wells all fail QC keeps its row with zero counts and NaN statistics.
        ``n_wells_failed_qc`` counts the sample's wells left out.

    Raises
    ------
    ValueError
        As :func:`per_well_summary`, or if ``n_bootstrap < 1``.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap!r}")
    platemap = _validated_platemap(platemap)
    cells = _validated_cells(cells, platemap)
    wells = _well_table(cells, platemap, min_cells)
    wells = wells[wells["sample"] != ""]
    passing = wells[wells["qc_flags"] == ""]

    metadata = wells.groupby("sample").agg(
        condition=("condition", _join_distinct),
        cell_line=("cell_line", _join_distinct),
        train_class=("train_class", _join_distinct),
        n_wells_failed_qc=("qc_flags", lambda flags: int((flags != "").sum())),
    )
    counts = passing.groupby("sample").agg(n_plates=("plate", "nunique"), n_wells=("well", "size"))
    passing_cells = cells.merge(passing[[*_KEYS, "sample"]], on=_KEYS, how="inner")
    stats = _cell_stats(passing_cells, ["sample"]).set_index("sample")
    intervals = pd.DataFrame.from_dict(
        {
            sample: _bootstrap_interval(
                group["n_positive"].to_numpy(),
                group["n_cells"].to_numpy(),
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


def per_plate_summary(cells: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Summarise every plate of the plate map, pooling all of its cells.

    No well is excluded here: the numbers describe the plate as imaged.

    Parameters
    ----------
    cells
        Per-cell table (see the module docstring for the required columns).
    platemap
        One row per plate and well (see :func:`per_well_summary`).

    Returns
    -------
    pandas.DataFrame
        One row per plate with the columns :data:`PER_PLATE_COLUMNS`, sorted by
        plate: ``n_wells`` plate-map wells, ``n_wells_with_cells`` of them with at
        least one cell, pooled ``fraction_positive`` (NaN without cells) and
        ``mean_probability``.

    Raises
    ------
    ValueError
        As :func:`per_well_summary`.
    """
    platemap = _validated_platemap(platemap)
    cells = _validated_cells(cells, platemap)
    wells = _fill_counts(platemap[_KEYS].merge(_cell_stats(cells, _KEYS), on=_KEYS, how="left"), [])
    table = wells.groupby("plate").agg(
        n_wells=("well", "size"),
        n_wells_with_cells=("n_cells", lambda n: int((n > 0).sum())),
        n_cells=("n_cells", "sum"),
        n_positive=("n_positive", "sum"),
    )
    table = table.join(
        cells.groupby("plate").agg(mean_probability=("probability", "mean")), how="left"
    ).reset_index()
    table["fraction_positive"] = _fraction(table["n_positive"], table["n_cells"])
    return table[PER_PLATE_COLUMNS].sort_values("plate", ignore_index=True)


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
    """Per-cell columns used here, checked against the plate map."""
    _require_columns(
        cells,
        _CELL_COLUMNS,
        "the per-cell table",
        "pass the per-cell table with morphology features and classifier predictions",
    )
    table = cells[_CELL_COLUMNS].copy()
    for column in _KEYS:
        table[column] = table[column].astype(str)
    for column in ("probability", "is_positive"):
        if table[column].isna().any():
            raise ValueError(
                f"the per-cell table has missing values in '{column}'; classify every cell before aggregating"
            )
    table["probability"] = table["probability"].astype(np.float64)
    if ((table["probability"] < 0.0) | (table["probability"] > 1.0)).any():
        raise ValueError("the per-cell column 'probability' must lie in [0, 1]")
    table["is_positive"] = table["is_positive"].astype(bool)
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


def _cell_stats(cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Cell counts and probability/morphology statistics per group of ``keys``."""
    stats = (
        cells.groupby(keys, sort=True)
        .agg(
            n_cells=("probability", "size"),
            n_positive=("is_positive", "sum"),
            mean_probability=("probability", "mean"),
            median_probability=("probability", "median"),
            mean_elongation=("elongation", "mean"),
            median_area=("area", "median"),
        )
        .reset_index()
    )
    return stats[[*keys, "n_cells", "n_positive", *_CELL_STATISTICS]]


def _well_table(cells: pd.DataFrame, platemap: pd.DataFrame, min_cells: int) -> pd.DataFrame:
    """Per-well summary from validated tables (see :func:`per_well_summary`)."""
    if min_cells < 0:
        raise ValueError(f"min_cells must be non-negative, got {min_cells!r}")
    table = platemap.merge(_cell_stats(cells, _KEYS), on=_KEYS, how="left")
    table = _with_fractions(_fill_counts(table, []))
    n_cells = table["n_cells"]
    table["qc_flags"] = np.where(n_cells == 0, "no_cells", np.where(n_cells < min_cells, "too_few_cells", ""))
    table["qc_flags"] = table["qc_flags"].astype(str)
    return table[PER_WELL_COLUMNS].sort_values(_KEYS, ignore_index=True)


def _fill_counts(table: pd.DataFrame, extra_counts: list[str]) -> pd.DataFrame:
    """Zero-fill and int64-cast counts; float64-cast statistics (NaN stays NaN)."""
    table = table.copy()
    for column in ["n_cells", "n_positive", *extra_counts]:
        table[column] = table[column].fillna(0).astype(np.int64)
    for column in _CELL_STATISTICS:
        if column in table.columns:
            table[column] = table[column].astype(np.float64)
    return table


def _with_fractions(table: pd.DataFrame) -> pd.DataFrame:
    """Add the pooled positive fraction and its Wilson interval."""
    table = table.copy()
    table["fraction_positive"] = _fraction(table["n_positive"], table["n_cells"])
    low, high = wilson_interval(
        table["n_positive"].to_numpy(), table["n_cells"].to_numpy(), confidence=CONFIDENCE
    )
    table["fraction_ci_low"] = low.astype(np.float64)
    table["fraction_ci_high"] = high.astype(np.float64)
    return table


def _fraction(numerator: pd.Series, denominator: pd.Series) -> np.ndarray:
    """Element-wise ratio as float64, NaN where the denominator is zero."""
    num = numerator.to_numpy(dtype=np.float64)
    den = denominator.to_numpy(dtype=np.float64)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


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


def _join_distinct(values: pd.Series) -> str:
    """Distinct non-empty values, sorted and ";"-joined."""
    return ";".join(sorted({value for value in values if value != ""}))
