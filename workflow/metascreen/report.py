"""Self-contained HTML reports: one page per plate and a cross-plate index.

Every function here is pure: tables and dicts in, an HTML string out, no file I/O.
A page needs no network: plots, cell crops and segmentation overlays are embedded as
base64 PNG data URIs and the CSS is inline. Every piece of text that comes from data
(sample names, captions, provenance) goes through :func:`html.escape`.

Plots are drawn on plain :class:`matplotlib.figure.Figure` objects rendered by the
Agg backend, never through :mod:`matplotlib.pyplot`, so no figure is registered in
global state and nothing needs closing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from string import Template
from typing import Any
from urllib.parse import quote

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, ListedColormap, to_hex
from matplotlib.figure import Figure

from metascreen.aggregate import CONFIDENCE, wilson_interval
from metascreen.overlay import OUTLINE_COLOUR, contrast_stretch, encode_png

__all__ = [
    "figure_to_data_uri",
    "infer_plate_format",
    "render_index",
    "render_plate_report",
]

#: Resolution of embedded plots; modest, to keep pages small.
PLOT_DPI = 80

#: (wells, rows, columns) of the supported plate formats, smallest first.
PLATE_FORMATS = ((24, 4, 6), (96, 8, 12), (384, 16, 24), (1536, 32, 48))

#: Most per-sample histograms drawn on one page; more would make an unreadable figure.
MAX_HISTOGRAMS = 48

#: Colours of the QC map: passed, passed with flagged fields left out, failed.
_QC_COLOURS = ListedColormap(["#7fbf7b", "#f1c232", "#d6604d"])
#: One-letter codes of the QC flags written on the QC map.
_QC_CODES = {
    "empty_field": "E",
    "out_of_focus": "F",
    "saturated": "S",
    "too_few_cells": "L",
    "no_cells": "N",
}

_WELL_PATTERN = re.compile(r"^([A-Z]{1,2})0*([1-9][0-9]*)$")
_ABSENT_COLOUR = "#d0d0d0"
_MISSING = "–"

_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("roc_auc", "ROC AUC"),
    ("ece", "expected calibration error (ECE)"),
    ("baseline_accuracy", "baseline accuracy"),
    ("baseline_balanced_accuracy", "baseline balanced accuracy"),
    ("baseline_roc_auc", "baseline ROC AUC"),
    ("baseline_ece", "baseline ECE"),
)
_EVALUATION_PLOTTED = {"confusion_matrix", "reliability"}
#: Entries of the segmenter's fine-tuning evaluation, in the order shown.
_SEGMENTER_EVALUATION = (
    ("ap50_before", "AP@0.5 before fine-tuning"),
    ("ap50_after", "AP@0.5 after fine-tuning"),
    ("validation", "held out for validation"),
    ("n_annotated_fields", "annotated fields"),
    ("train_seconds", "training time (s)"),
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
.note { color: #555; font-size: 0.9em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.4em; }
figure.thumb { margin: 0; width: 96px; font-size: 0.7em; text-align: center; }
figure.thumb img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
figure.thumb figcaption { overflow-wrap: anywhere; }
figure.overlay { margin: 0; width: 512px; max-width: 100%; font-size: 0.8em; }
figure.overlay img { display: block; width: 100%; height: auto; image-rendering: pixelated; }
dl.provenance dt { font-weight: bold; margin-top: 0.5em; }
dl.provenance dd { margin-left: 1.5em; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; max-height: 30em; }
"""

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
<h1>$title</h1>
$body
</body>
</html>
""")


def figure_to_data_uri(fig: Figure, *, dpi: float = PLOT_DPI) -> str:
    """Render a figure as a base64 PNG data URI.

    Parameters
    ----------
    fig
        The figure; it is not closed (figures built in this module are not
        registered with pyplot, so they are simply garbage-collected).
    dpi
        Resolution of the PNG.

    Returns
    -------
    str
        ``"data:image/png;base64,..."``, usable as an ``<img src>``.
    """
    buffer = io.BytesIO()
    # No "Software" metadata: keeps the bytes independent of the matplotlib version.
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return _png_data_uri(buffer.getvalue())


def infer_plate_format(wells: Iterable[str]) -> tuple[int, int, int]:
    """Smallest standard plate format that holds every well.

    Parameters
    ----------
    wells
        Well ids such as ``"B03"`` (row letters, then the 1-based column).

    Returns
    -------
    n_wells, n_rows, n_columns : int
        One of :data:`PLATE_FORMATS`; 96 wells when ``wells`` is empty.

    Raises
    ------
    ValueError
        If a well id is malformed or lies beyond a 1536-well plate.
    """
    positions = [_well_position(well) for well in wells]
    if not positions:
        return PLATE_FORMATS[1]
    max_row = max(row for row, _ in positions) + 1
    max_column = max(column for _, column in positions) + 1
    for plate_format in PLATE_FORMATS:
        if max_row <= plate_format[1] and max_column <= plate_format[2]:
            return plate_format
    raise ValueError(f"wells reach row {max_row} and column {max_column}, beyond a 1536-well plate")


def render_plate_report(
    *,
    plate: str,
    per_well: pd.DataFrame,
    per_sample: pd.DataFrame,
    cells: pd.DataFrame,
    evaluation: Mapping[str, Any],
    gallery: Mapping[str, Sequence[tuple[str, np.ndarray]]],
    provenance: Mapping[str, Any],
    positive_class: str,
    negative_class: str,
    fields: pd.DataFrame | None = None,
    skipped_fields: pd.DataFrame | None = None,
    overlays: Sequence[tuple[str, np.ndarray]] = (),
    segmenter_evaluation: Mapping[str, Any] | None = None,
) -> str:
    """Render the self-contained HTML report of one plate.

    Parameters
    ----------
    plate
        Plate id; rows of the tables belonging to other plates are ignored.
    per_well
        Output of :func:`metascreen.aggregate.per_well_summary` (any plates).
    per_sample
        Output of :func:`metascreen.aggregate.per_sample_summary`; only samples with
        a well on this plate are shown.
    cells
        Per-cell table of :func:`metascreen.aggregate.cell_table` (at least
        ``Metadata_Plate``, ``Metadata_Sample`` and ``Cells_probability``; cells whose
        ``Metadata_field_qc_flags`` is not empty are left out of the distributions).
    evaluation
        Model evaluation; ``accuracy``, ``balanced_accuracy``, ``roc_auc``, ``ece``,
        ``baseline_accuracy``, ``baseline_balanced_accuracy`` and
        ``baseline_roc_auc`` are shown when present, ``confusion_matrix`` (rows
        true class, columns predicted class, negative class first; or a mapping
        with ``tn``, ``fp``, ``fn``, ``tp``) as a table and ``reliability`` (a list
        of ``{"confidence", "accuracy", "count"}`` bins, or a mapping of such per-bin
        lists, optionally with ``bin_lower`` and ``bin_upper``) as a reliability
        diagram. Other entries are listed as they are.
    gallery
        Caption -> list of ``(cell id, 2-D crop)``, shown as grey thumbnails.
    provenance
        Rendered as a definition list; nested values as JSON.
    positive_class, negative_class
        Class names.
    fields
        Output of :func:`metascreen.aggregate.field_table`; its flagged fields of this
        plate are listed in the quality-control section.
    skipped_fields
        Fields left out at ingest (columns well, field, file, reason), shown in the
        quality-control section.
    overlays
        ``(caption, (Y, X, 3) uint8 image)`` pairs: segmentation outlines on fields
        (:func:`metascreen.overlay.outline_overlay`), shown in the segmentation section.
    segmenter_evaluation
        The segmenter's fine-tuning evaluation, shown in the segmentation section:
        ``ap50_before``, ``ap50_after``, ``validation`` (what was held out),
        ``n_annotated_fields`` and ``train_seconds``.

    Returns
    -------
    str
        The HTML page.

    Raises
    ------
    ValueError
        If a required column or evaluation key is missing, a well id is malformed, a crop
        is not 2-D or an overlay not RGB.
    """
    _require_columns(
        per_well,
        [
            "plate",
            "well",
            "sample",
            "n_cells_before_qc",
            "n_cells_after_qc",
            "n_positive",
            "fraction_positive",
            "qc_flags",
            "passes_qc",
        ],
        "per_well",
    )
    _require_columns(per_sample, ["sample"], "per_sample")
    _require_columns(cells, ["Metadata_Plate", "Metadata_Sample", "Cells_probability"], "cells")
    wells = per_well[per_well["plate"].astype(str) == plate].sort_values("well")
    # Tables read back from CSV turn empty strings into NaN.
    wells = wells.assign(
        sample=wells["sample"].fillna("").astype(str),
        qc_flags=wells["qc_flags"].fillna("").astype(str),
    )
    plate_cells = cells[cells["Metadata_Plate"].astype(str) == plate]
    if "Metadata_field_qc_flags" in plate_cells:
        plate_cells = plate_cells[plate_cells["Metadata_field_qc_flags"].fillna("") == ""]
    plate_fields = None
    if fields is not None:
        plate_fields = fields[fields["Metadata_Plate"].astype(str) == plate]
    samples = sorted(set(wells["sample"]) - {""})

    sections = [
        _summary_section(plate, wells, plate_cells, positive_class, negative_class),
        _layout_section(wells, positive_class),
        _qc_section(wells, plate_fields, skipped_fields),
        _segmentation_section(overlays, segmenter_evaluation),
        _samples_section(per_sample, samples, plate_cells, positive_class),
        _wells_section(wells),
        _evaluation_section(evaluation, positive_class, negative_class),
        _gallery_section(gallery),
        _provenance_section(provenance),
    ]
    return _page(f"metascreen report: plate {plate}", "\n".join(sections))


def render_index(plates: list[str], per_plate: pd.DataFrame, per_sample: pd.DataFrame) -> str:
    """Render the cross-plate summary page linking each plate's report.

    Parameters
    ----------
    plates
        Plate ids, in the order to list them; each links to ``{plate}/report.html``.
    per_plate
        Output of :func:`metascreen.aggregate.per_plate_summary`.
    per_sample
        Output of :func:`metascreen.aggregate.per_sample_summary`.

    Returns
    -------
    str
        The HTML page.

    Raises
    ------
    ValueError
        If ``per_plate`` lacks the ``plate`` column.
    """
    _require_columns(per_plate, ["plate"], "per_plate")
    by_plate = per_plate.assign(plate=per_plate["plate"].astype(str)).set_index("plate")
    header = "".join(f"<th>{_escape(_header(c))}</th>" for c in ["plate", *by_plate.columns])
    rows = []
    for plate in plates:
        link = f'<a href="{_escape(quote(plate, safe="") + "/report.html")}">{_escape(plate)}</a>'
        # Column by column, so that integer counts are not upcast to float in a row Series.
        cells = "".join(_cell(by_plate[column].get(plate)) for column in by_plate.columns)
        rows.append(f"<tr><td>{link}</td>{cells}</tr>")
    body = [
        "<h2>Plates</h2>",
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        "<h2>Samples</h2>",
        _table(
            per_sample,
            caption="Pooled over each sample's wells on all plates that passed QC; "
            f"intervals are {_percent(CONFIDENCE)}: Wilson over cells (fraction) and "
            "bootstrap over wells (well).",
        ),
    ]
    return _page("metascreen: cross-plate summary", "\n".join(body))


# ---------------------------------------------------------------- sections
def _summary_section(
    plate: str,
    wells: pd.DataFrame,
    cells: pd.DataFrame,
    positive_class: str,
    negative_class: str,
) -> str:
    """Key numbers of the plate; after QC: cells in passing fields of passing wells."""
    passing = wells[wells["passes_qc"].astype(bool)]
    n_cells = int(passing["n_cells_after_qc"].sum())
    n_positive = int(passing["n_positive"].sum())
    low, high = wilson_interval(n_positive, n_cells, confidence=CONFIDENCE)
    fraction = n_positive / n_cells if n_cells else math.nan
    counted = cells[cells["Metadata_Well"].isin(passing["well"])] if "Metadata_Well" in cells else cells
    mean_probability = float(counted["Cells_probability"].mean()) if len(counted) else math.nan
    rows = [
        ("plate", plate),
        ("positive class", positive_class),
        ("negative class", negative_class),
        ("wells in the plate map", _format(len(wells))),
        ("wells failing QC", _format(len(wells) - len(passing))),
        ("wells with QC flags", _format(int((wells["qc_flags"] != "").sum()))),
        ("cells before QC", _format(int(wells["n_cells_before_qc"].sum()))),
        ("cells after QC", _format(n_cells)),
        (f"cells predicted {positive_class} after QC", _format(n_positive)),
        (
            f"fraction {positive_class} ({_percent(CONFIDENCE)} Wilson CI)",
            f"{_format(fraction)} {_interval(float(low), float(high))}",
        ),
        (f"mean probability of {positive_class}", _format(mean_probability)),
    ]
    body = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(value)}</td></tr>" for key, value in rows)
    return f"<h2>Summary</h2>\n<table>{body}</table>"


def _layout_section(wells: pd.DataFrame, positive_class: str) -> str:
    """Plate-layout heatmaps of the positive fraction, the cell count and the QC status."""
    n_wells, n_rows, n_columns = infer_plate_format(wells["well"])
    positions = [_well_position(well) for well in wells["well"]]
    shape = (n_rows, n_columns)
    fraction = _plate_heatmap(
        positions,
        wells["fraction_positive"].to_numpy(dtype=np.float64),
        shape=shape,
        title=f"fraction {positive_class} (after QC)",
        cmap="viridis",
        vmax=1.0,
        value_format="{:.2f}",
    )
    counts = wells["n_cells_after_qc"].to_numpy(dtype=np.float64)
    count_map = _plate_heatmap(
        positions,
        counts,
        shape=shape,
        title="cells per well (after QC)",
        cmap="magma",
        vmax=max(1.0, float(np.nanmax(counts, initial=0.0))),
        value_format="{:.0f}",
    )
    # 0: passed without flags, 1: flagged fields left out but the well passes, 2: well fails
    status = np.where(~wells["passes_qc"].astype(bool), 2.0, np.where(wells["qc_flags"] != "", 1.0, 0.0))
    qc_map = _plate_heatmap(
        positions,
        status,
        shape=shape,
        title="QC status",
        cmap=_QC_COLOURS,
        vmax=2.0,
        value_format="{:.0f}",
        annotations=[_qc_code(flags) for flags in wells["qc_flags"]],
        colorbar=False,
    )
    return (
        f"<h2>Plate layout ({n_wells}-well plate)</h2>\n"
        '<p class="note">Grey: well not in the plate map. '
        "&times;: plate-map well without cells after QC. QC status: green passed, amber passed "
        "with flagged fields left out, red failed (left out of the per-sample and per-plate "
        f"tables); letters: {_escape(', '.join(f'{code} {flag}' for flag, code in _QC_CODES.items()))}.</p>\n"
        f'<div class="plots"><img src="{fraction}" alt="heatmap of the fraction '
        f'{_escape(positive_class)} per well">'
        f'<img src="{count_map}" alt="heatmap of the cell count per well">'
        f'<img src="{qc_map}" alt="map of the QC status per well"></div>'
    )


def _qc_section(wells: pd.DataFrame, fields: pd.DataFrame | None, skipped_fields: pd.DataFrame | None) -> str:
    """Wells and fields with QC flags, and fields skipped at ingest."""
    parts = ["<h2>Quality control</h2>"]
    flagged = wells[wells["qc_flags"] != ""]
    if flagged.empty:
        parts.append("<p>All wells and fields passed quality control.</p>")
    else:
        columns = [
            "well",
            "sample",
            "n_fields",
            "n_fields_after_qc",
            "n_cells_before_qc",
            "n_cells_after_qc",
            "qc_flags",
            "passes_qc",
        ]
        n_failed = int((~flagged["passes_qc"].astype(bool)).sum())
        parts.append(
            _table(
                flagged[[c for c in columns if c in wells]],
                caption=f"{len(flagged)} well(s) with QC flags; the cells of flagged fields are left "
                f"out everywhere, and the {n_failed} well(s) failing QC are left out of the per-sample "
                "and per-plate tables.",
            )
        )
    if fields is not None:
        bad = fields[fields["qc_flags"].fillna("") != ""]
        if not bad.empty:
            # the raw focus is a small number of no meaning alone: the relative focus is shown
            shown = bad.drop(columns=["Metadata_Plate", "focus"]).rename(
                columns={"Metadata_Well": "well", "Metadata_Site": "field"}
            )
            parts.append(
                _table(
                    shown,
                    caption=f"{len(bad)} field(s) flagged: relative focus is the field's focus over the "
                    "plate's median; contrast is its std / mean; empty_reason says why a field is "
                    "empty_field (no_cells, low_contrast, nan: NaN pixels).",
                )
            )
    if skipped_fields is not None and not skipped_fields.empty:
        parts.append(
            _table(
                skipped_fields[["well", "field", "file", "reason"]],
                caption=f"{len(skipped_fields)} field(s) skipped at ingest (ingest.bad_files: skip).",
            )
        )
    return "\n".join(parts)


def _segmentation_section(
    overlays: Sequence[tuple[str, np.ndarray]], segmenter_evaluation: Mapping[str, Any] | None
) -> str:
    """Outline overlays of a few fields and, when given, the segmenter's fine-tuning evaluation."""
    parts = ["<h2>Segmentation</h2>"]
    if overlays:
        swatch = f'<span style="color: {to_hex(OUTLINE_COLOUR)}">&#9632;</span>'
        parts.append(
            f'<p class="note">Outlines ({swatch}) of the segmented cells on the segmented plane '
            "(not downsampled: fields may be cropped, never shrunk).</p>"
        )
        figures = "".join(
            f'<figure class="overlay"><img src="{_overlay_data_uri(image)}" alt="{_escape(caption)}">'
            f"<figcaption>{_escape(caption)}</figcaption></figure>"
            for caption, image in overlays
        )
        parts.append(f'<div class="gallery">{figures}</div>')
    else:
        parts.append("<p>No segmentation overlays.</p>")
    if segmenter_evaluation is not None:
        missing = [key for key, _ in _SEGMENTER_EVALUATION if key not in segmenter_evaluation]
        if missing:
            raise ValueError(f"the segmenter evaluation lacks key(s) {missing}")
        rows = "".join(
            f"<tr><th>{_escape(label)}</th>{_cell(segmenter_evaluation[key])}</tr>"
            for key, label in _SEGMENTER_EVALUATION
        )
        parts.append(f"<h3>Segmenter fine-tuning</h3>\n<table>{rows}</table>")
    return "\n".join(parts)


def _samples_section(
    per_sample: pd.DataFrame, samples: list[str], cells: pd.DataFrame, positive_class: str
) -> str:
    """Per-sample table and small-multiple histograms of the probability."""
    table = per_sample[per_sample["sample"].astype(str).isin(samples)]
    parts = [
        "<h2>Samples</h2>",
        _table(
            table,
            caption="Samples with a well on this plate, pooled over their wells that passed "
            f"QC; intervals are {_percent(CONFIDENCE)}: Wilson over cells (fraction) and "
            "bootstrap over wells (well).",
        ),
    ]
    cell_samples = cells["Metadata_Sample"].fillna("").astype(str)
    groups = [
        (sample, cells.loc[cell_samples == sample, "Cells_probability"].to_numpy(dtype=np.float64))
        for sample in samples
    ]
    groups = [(sample, values) for sample, values in groups if len(values)]
    if groups:
        shown = groups[:MAX_HISTOGRAMS]
        uri = _probability_histograms(shown, positive_class)
        parts.append(f"<h3>Probability of {_escape(positive_class)} per cell, by sample</h3>")
        if len(groups) > len(shown):
            parts.append(f'<p class="note">First {len(shown)} of {len(groups)} samples shown.</p>')
        parts.append(f'<img src="{uri}" alt="histograms of the probability per sample">')
    return "\n".join(parts)


def _wells_section(wells: pd.DataFrame) -> str:
    """Full per-well table, collapsed by default."""
    return (
        "<h2>Wells</h2>\n<details><summary>Per-well table "
        f"({len(wells)} wells)</summary>\n"
        + _table(wells.drop(columns=["plate"]), caption=None)
        + "</details>"
    )


def _evaluation_section(evaluation: Mapping[str, Any], positive_class: str, negative_class: str) -> str:
    """Model metrics, confusion matrix, reliability diagram and other entries."""
    parts = ["<h2>Model evaluation</h2>"]
    if not evaluation:
        parts.append("<p>No model evaluation available.</p>")
        return "\n".join(parts)
    metrics = [(label, evaluation[key]) for key, label in _METRICS if key in evaluation]
    if metrics:
        parts.append(
            "<table>"
            + "".join(f"<tr><th>{_escape(label)}</th>{_cell(value)}</tr>" for label, value in metrics)
            + "</table>"
        )
    if "confusion_matrix" in evaluation:
        parts.append(_confusion_table(evaluation["confusion_matrix"], negative_class, positive_class))
    if evaluation.get("reliability"):
        uri = _reliability_diagram(evaluation["reliability"])
        parts.append(f'<h3>Reliability diagram</h3>\n<img src="{uri}" alt="reliability diagram">')
    shown = {key for key, _ in _METRICS} | _EVALUATION_PLOTTED
    others = {key: value for key, value in evaluation.items() if key not in shown}
    if others:
        parts.append(
            "<details><summary>Other evaluation entries</summary>" + _definition_list(others) + "</details>"
        )
    return "\n".join(parts)


def _gallery_section(gallery: Mapping[str, Sequence[tuple[str, np.ndarray]]]) -> str:
    """Thumbnails of example cells, one grid per caption."""
    parts = ["<h2>Example cells</h2>"]
    if not any(gallery.values()):
        parts.append("<p>No example cells.</p>")
    for caption, examples in gallery.items():
        if not examples:
            continue
        thumbs = "".join(
            f'<figure class="thumb"><img src="{_crop_data_uri(crop)}" '
            f'alt="{_escape(cell_id)}"><figcaption>{_escape(cell_id)}</figcaption></figure>'
            for cell_id, crop in examples
        )
        parts.append(f'<h3>{_escape(caption)}</h3>\n<div class="gallery">{thumbs}</div>')
    return "\n".join(parts)


def _provenance_section(provenance: Mapping[str, Any]) -> str:
    """Configuration, versions and inputs behind the report."""
    return "<h2>Provenance</h2>\n" + _definition_list(provenance)


# ---------------------------------------------------------------- plots
def _new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas, outside pyplot."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plate_heatmap(
    positions: Sequence[tuple[int, int]],
    values: np.ndarray,
    *,
    shape: tuple[int, int],
    title: str,
    cmap: str | Colormap,
    vmax: float,
    value_format: str,
    annotations: Sequence[str] | None = None,
    colorbar: bool = True,
) -> str:
    """Heatmap of one value per well on the plate grid, as a data URI.

    Wells are labelled with their value (``value_format``), or with ``annotations``
    (one string per position) when given; labels are drawn up to 12 columns.
    """
    n_rows, n_columns = shape
    grid = np.full(shape, np.nan)
    present = np.zeros(shape, dtype=bool)
    labels = np.full(shape, "", dtype=object)
    for (row, column), value in zip(positions, values, strict=True):
        grid[row, column] = value
        present[row, column] = True
        labels[row, column] = value_format.format(value)
    if annotations is not None:
        for (row, column), text in zip(positions, annotations, strict=True):
            labels[row, column] = text
    # Sized so that the two heatmaps of a 96- or 384-well plate fit side by side.
    cell_inches = 0.42 if n_columns <= 12 else 0.22 if n_columns <= 24 else 0.11
    fig = _new_figure(n_columns * cell_inches + 1.6, n_rows * cell_inches + 0.9)
    ax = fig.add_subplot()
    colours = (matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap).with_extremes(
        bad=_ABSENT_COLOUR
    )
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0.0, vmax=vmax)
    # A plate-map well without a value (no cells) must not look like an absent well.
    rows, columns = np.nonzero(present & np.isnan(grid))
    ax.scatter(columns, rows, marker="x", color="#555555", s=20 if n_columns <= 24 else 6)
    if n_columns <= 12:
        for row, column in zip(*np.nonzero(~np.isnan(grid)), strict=True):
            red, green, blue, _ = colours(image.norm(grid[row, column]))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(
                column,
                row,
                labels[row, column],
                ha="center",
                va="center",
                fontsize=7,
                color=ink,
            )
    tick_size = 8 if n_columns <= 12 else 6 if n_columns <= 24 else 4
    ax.set_xticks(range(n_columns), labels=[str(c + 1) for c in range(n_columns)], fontsize=tick_size)
    ax.set_yticks(range(n_rows), labels=[_row_name(r) for r in range(n_rows)], fontsize=tick_size)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(n_columns + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="both", length=0)
    ax.set_title(title, parse_math=False, fontsize=10)
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.8)
    return figure_to_data_uri(fig)


def _probability_histograms(groups: Sequence[tuple[str, np.ndarray]], positive_class: str) -> str:
    """Small multiples: one probability histogram per sample, as a data URI."""
    n_columns = min(4, len(groups))
    n_rows = math.ceil(len(groups) / n_columns)
    fig = _new_figure(2.4 * n_columns, 1.8 * n_rows)
    axes = fig.subplots(n_rows, n_columns, squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, 21)
    for ax, (sample, values) in zip(axes.flat, groups, strict=False):
        ax.hist(values, bins=bins, color="#4c72b0")
        ax.axvline(0.5, color="#c44e52", linestyle="--", linewidth=1)
        ax.set_title(f"{sample} (n={len(values)})", parse_math=False, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(groups) :]:
        ax.set_axis_off()
    fig.supxlabel(f"probability of {positive_class}", fontsize=8)
    fig.supylabel("cells", fontsize=8)
    return figure_to_data_uri(fig)


def _reliability_diagram(
    bins: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
) -> str:
    """Observed accuracy against predicted confidence per bin, as a data URI.

    ``bins`` holds per-bin records or per-bin lists (as written by
    :func:`metascreen.training.evaluate_predictions`); ``bin_lower`` and ``bin_upper``,
    when present, set the widths of the count bars.
    """
    table = pd.DataFrame(bins)  # records and columns alike
    _require_columns(table, ["confidence", "accuracy", "count"], "evaluation['reliability']")
    table = table[table["count"].fillna(0) > 0].dropna(subset=["confidence", "accuracy"])
    # The confidence of a binary prediction is often that of the predicted class, >= 0.5.
    start = 0.5 if len(table) and table["confidence"].min() >= 0.5 else 0.0
    fig = _new_figure(3.6, 4.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([start, 1], [start, 1], color="#999999", linestyle="--", linewidth=1, label="perfect")
    top.plot(table["confidence"], table["accuracy"], marker="o", color="#4c72b0", label="model")
    top.set_ylabel("observed accuracy")
    top.set_xlim(start, 1.0)
    top.set_ylim(0.0, 1.0)
    top.legend(fontsize=8, loc="upper left")
    if {"bin_lower", "bin_upper"} <= set(table.columns):
        bottom.bar(
            table["bin_lower"],
            table["count"],
            width=table["bin_upper"] - table["bin_lower"],
            align="edge",
            color="#8c8c8c",
            edgecolor="white",
        )
    else:
        width = 0.8 * (1.0 - start) / max(len(table), 1)
        bottom.bar(table["confidence"], table["count"], width=width, color="#8c8c8c")
    bottom.set_xlabel("predicted confidence")
    bottom.set_ylabel("cells")
    return figure_to_data_uri(fig)


def _crop_data_uri(crop: np.ndarray) -> str:
    """A 2-D crop as a contrast-stretched grey PNG data URI."""
    image = np.asarray(crop)
    if image.ndim != 2:
        raise ValueError(f"gallery crops must be 2-D arrays, got shape {image.shape}")
    return _png_data_uri(encode_png(contrast_stretch(image)))


def _overlay_data_uri(image: np.ndarray) -> str:
    """An RGB overlay as a PNG data URI."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlays must be (Y, X, 3) uint8 images, got {image.dtype} {image.shape}")
    return _png_data_uri(encode_png(image))


# ---------------------------------------------------------------- HTML helpers
def _page(title: str, body: str) -> str:
    """Wrap a body in the page skeleton."""
    return _PAGE.substitute(title=_escape(title), css=_CSS, body=body)


def _table(frame: pd.DataFrame, *, caption: str | None) -> str:
    """A DataFrame as an HTML table; ``X_ci_low``/``X_ci_high`` pairs merged into one column."""
    columns: list[tuple[str, list[str]]] = []
    numeric: list[bool] = []
    for column in frame.columns:
        if column.endswith("_ci_high") and f"{column[:-5]}_low" in frame.columns:
            continue  # shown with its _ci_low partner
        partner = f"{column[:-4]}_high"
        if column.endswith("_ci_low") and partner in frame.columns:
            header = f"{column.removesuffix('_ci_low')} {_percent(CONFIDENCE)} CI"
            values = [_interval(lo, hi) for lo, hi in zip(frame[column], frame[partner], strict=True)]
            columns.append((header, values))
            numeric.append(True)
        else:
            columns.append((column, [_format(value) for value in frame[column]]))
            numeric.append(pd.api.types.is_numeric_dtype(frame[column]))
    head = "".join(f"<th>{_escape(_header(name))}</th>" for name, _ in columns)
    body = "".join(
        "<tr>"
        + "".join(
            (f'<td class="num">{_escape(values[i])}</td>' if is_numeric else f"<td>{_escape(values[i])}</td>")
            for (_, values), is_numeric in zip(columns, numeric, strict=True)
        )
        + "</tr>"
        for i in range(len(frame))
    )
    caption_html = f"<caption>{_escape(caption)}</caption>" if caption else ""
    return (
        f'<div class="scroll"><table>{caption_html}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _confusion_table(raw: Any, negative_class: str, positive_class: str) -> str:
    """Confusion matrix as a table: rows true class, columns predicted class."""
    if isinstance(raw, Mapping) and {"tn", "fp", "fn", "tp"} <= set(raw):
        matrix = np.array([[raw["tn"], raw["fp"]], [raw["fn"], raw["tp"]]])
    else:
        matrix = np.asarray(raw)
    if matrix.shape != (2, 2):
        raise ValueError(
            "evaluation['confusion_matrix'] must be 2x2 (rows true class, columns predicted "
            f"class, {negative_class!r} first) or a mapping with tn, fp, fn, tp; "
            f"got shape {matrix.shape}"
        )
    labels = (negative_class, positive_class)
    head = "".join(f"<th>predicted {_escape(label)}</th>" for label in labels)
    rows = "".join(
        f"<tr><th>true {_escape(label)}</th>{''.join(_cell(v) for v in matrix[i])}</tr>"
        for i, label in enumerate(labels)
    )
    return (
        "<h3>Confusion matrix</h3>\n"
        f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


def _definition_list(entries: Mapping[str, Any]) -> str:
    """Entries as a definition list; nested values as indented JSON."""
    items = []
    for key, value in entries.items():
        if isinstance(value, Mapping | list | tuple):
            rendered = f"<pre>{_escape(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"
        else:
            rendered = _escape(_format(value))
        items.append(f"<dt>{_escape(key)}</dt><dd>{rendered}</dd>")
    return f'<dl class="provenance">{"".join(items)}</dl>'


def _cell(value: Any) -> str:
    """One table cell holding a formatted value."""
    css = ' class="num"' if isinstance(value, int | float | np.number) else ""
    return f"<td{css}>{_escape(_format(value))}</td>"


def _format(value: Any) -> str:
    """Human-readable text of a scalar; missing values as a dash."""
    if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)):
        return _MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _interval(low: Any, high: Any) -> str:
    """``[low, high]``, or a dash when undefined."""
    if _format(low) == _MISSING or _format(high) == _MISSING:
        return _MISSING
    return f"[{_format(low)}, {_format(high)}]"


def _percent(level: float) -> str:
    """A confidence level as a percentage, e.g. ``95%``."""
    return f"{100 * level:g}%"


def _header(column: str) -> str:
    """Column name as a header."""
    return column.replace("_", " ")


def _escape(text: Any) -> str:
    """HTML-escape any value's text, quotes included."""
    return html.escape(str(text), quote=True)


def _png_data_uri(png: bytes) -> str:
    """PNG bytes as a data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise a ValueError naming the columns absent from ``table``."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {missing}; pass the table produced by "
            "metascreen.aggregate (or the per-cell table with these columns)"
        )


def _well_position(well: str) -> tuple[int, int]:
    """0-based (row, column) of a well id such as ``"B03"``."""
    match = _WELL_PATTERN.match(str(well).strip().upper())
    if match is None:
        raise ValueError(f"malformed well id {well!r}; expected row letters and a column, e.g. 'B03'")
    letters, digits = match.groups()
    row = 0
    for letter in letters:
        row = row * 26 + (ord(letter) - ord("A") + 1)
    return row - 1, int(digits) - 1


def _qc_code(flags: str) -> str:
    """Letters of a ";"-joined flag string (:data:`_QC_CODES`), "" when it has none."""
    return "".join(_QC_CODES.get(flag, "?") for flag in flags.split(";") if flag)


def _row_name(row: int) -> str:
    """Row letters of a 0-based row index (``0 -> "A"``, ``26 -> "AA"``)."""
    return _row_name(row // 26 - 1) + chr(ord("A") + row % 26) if row >= 26 else chr(ord("A") + row)
