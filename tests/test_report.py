"""Tests of metascreen.report: well-formed, self-contained, escaped HTML that shows the data."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from metascreen.aggregate import (
    PER_PLATE_COLUMNS,
    cell_table,
    field_table,
    per_plate_summary,
    per_sample_summary,
    per_well_summary,
)
from metascreen.overlay import outline_overlay
from metascreen.report import (
    figure_to_data_uri,
    infer_plate_format,
    render_index,
    render_plate_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NASTY = "<b>x&y</b>"
VOID_ELEMENTS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class PageParser(HTMLParser):
    """Collects images, links, table rows and text, and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str | None] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "a":
            self.links.append(attributes.get("href"))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return build_tables()


def build_tables() -> dict[str, pd.DataFrame]:
    """Plate P1: B02 has a second, out-of-focus field of 5 cells; C03 an empty field; D05 7 cells."""
    rng = np.random.default_rng(0)
    platemap = pd.DataFrame(
        {
            "plate": ["P1"] * 5 + ["P2"] * 2,
            "well": ["B02", "B03", "C02", "C03", "D05", "B02", "B03"],
            "sample": [NASTY, NASTY, "ctrl", "ctrl", "", NASTY, "ctrl"],
            "condition": ["drug & co", "drug & co", "dmso", "dmso", "", "drug & co", "dmso"],
            "cell_line": "MDA-MB-231",
            "train_class": "",
        }
    )
    n_cells = {("P1", "B02", 0): 30, ("P1", "B02", 1): 5, ("P1", "B03", 0): 25, ("P1", "C02", 0): 40}
    n_cells |= {("P1", "C03", 0): 0, ("P1", "D05", 0): 7, ("P2", "B02", 0): 22, ("P2", "B03", 0): 22}
    frames = []
    for (plate, well, field), n in n_cells.items():
        probability = rng.uniform(0, 1, n)
        frames.append(
            pd.DataFrame(
                {
                    "plate": plate,
                    "well": well,
                    "field": field,
                    "label": np.arange(1, n + 1),
                    "area": rng.uniform(200, 900, n),
                    "elongation": rng.uniform(0, 0.9, n),
                    "probability": probability,
                    "predicted_class": np.where(probability >= 0.5, "high_potential", "low_potential"),
                }
            )
        )
    stage_cells = pd.concat(frames, ignore_index=True)
    raw_fields = pd.DataFrame(
        [
            {
                "plate": plate,
                "well": well,
                "field": field,
                "n_cells": n,
                "focus": np.nan if n == 0 else 0.1 if field else 1.0,
            }
            for (plate, well, field), n in n_cells.items()
        ]
    ).assign(saturated_fraction=0.0, contrast=0.05, nan_fraction=0.0)
    fields = field_table(raw_fields)
    keys = ["plate", "well", "field", "label"]
    cells = cell_table(
        stage_cells[[*keys, "area", "elongation"]],
        stage_cells[[*keys, "probability", "predicted_class"]],
        platemap,
        fields,
        positive_class="high_potential",
    )
    return {
        "cells": cells,
        "fields": fields,
        "per_well": per_well_summary(cells, fields, platemap, min_cells=20),
        "per_sample": per_sample_summary(cells, fields, platemap, n_bootstrap=200, min_cells=20),
        "per_plate": per_plate_summary(cells, fields, platemap, min_cells=20),
    }


EVALUATION = {
    "accuracy": 0.8125,
    "balanced_accuracy": 0.7917,
    "roc_auc": 0.9031,
    "ece": 0.0421,
    "baseline_accuracy": 0.6875,
    "confusion_matrix": [[11, 3], [4, 17]],
    "reliability": [
        {"confidence": 0.55, "accuracy": 0.5, "count": 10},
        {"confidence": 0.75, "accuracy": 0.8, "count": 12},
        {"confidence": 0.95, "accuracy": 0.9, "count": 0},
    ],
    "temperature": 1.25,
    "wells": {"train": ["P1/B02"], "test": ["P1/C02"]},
}
GALLERY = {
    "most confident high_potential": [
        ("B02 f0 #3 p=0.99", np.random.default_rng(1).normal(size=(24, 24))),
        ('C02 f0 #7 "odd"', np.arange(400.0).reshape(20, 20)),
    ],
    "most uncertain <i>low</i>": [("C02 f0 #9", np.full((16, 16), np.nan))],
    "empty caption": [],
}
PROVENANCE = {
    "model_sha256": "0123abcd" * 8,
    "input_files": 42,
    "package_versions": {"numpy": "2.4.6", "pandas": "3.1.1"},
    "config": {"note": "<script>alert(1)</script>", "min_cells_per_well": 20},
}


def render_page(tables, **changes) -> str:
    arguments = dict(
        plate="P1",
        per_well=tables["per_well"],
        per_sample=tables["per_sample"],
        cells=tables["cells"],
        fields=tables["fields"],
        evaluation=EVALUATION,
        gallery=GALLERY,
        provenance=PROVENANCE,
        positive_class="high_potential",
        negative_class="low_potential",
    )
    return render_plate_report(**{**arguments, **changes})


@pytest.fixture(scope="module")
def page(tables) -> str:
    return render_page(tables)


def test_page_is_well_formed(page):
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse(page)
    assert parsed.errors == []
    assert parsed.stack == []
    assert "metascreen report: plate P1" in "".join(parsed.text)


def test_every_well_of_the_plate_is_in_the_page(page, tables):
    parsed = parse(page)
    wells = tables["per_well"][tables["per_well"]["plate"] == "P1"]
    assert len(wells) == 5
    for well in wells.itertuples():
        fraction = "–" if np.isnan(well.fraction_positive) else f"{well.fraction_positive:.3f}"
        matching = [
            row
            for row in parsed.rows
            if row
            and row[0] == well.well
            and str(well.n_cells_after_qc) in row
            and fraction in row
            and (well.qc_flags in row)
        ]
        assert matching, f"no table row with the data of well {well.well}"
    # Wells of the other plate are not listed.
    assert not any(row and row[0] == "B02" and "22" in row for row in parsed.rows)


def test_summary_numbers(page):
    rows = {row[0]: row[1] for row in parse(page).rows if len(row) == 2}
    assert rows["wells in the plate map"] == "5"
    assert rows["wells failing QC"] == "2"  # C03 (empty field, no cells) and D05 (7 < 20)
    assert rows["wells with QC flags"] == "3"  # and B02 (an out-of-focus field)
    assert rows["cells before QC"] == "107"
    assert rows["cells after QC"] == "95"  # B02 field 0, B03 and C02


def test_qc_table_lists_flagged_wells_and_fields(page):
    rows = parse(page).rows
    assert ["B02", NASTY, "2", "1", "35", "30", "out_of_focus", "yes"] in rows
    assert ["C03", "ctrl", "1", "0", "0", "0", "empty_field;no_cells", "no"] in rows
    assert ["D05", "", "1", "1", "7", "7", "too_few_cells", "no"] in rows
    # the flagged fields: well, field, n_cells, relative focus, saturated, contrast, NaN pixels, flags,
    # why a field is empty
    assert ["B02", "1", "5", "0.100", "0.000", "0.050", "0.000", "out_of_focus", ""] in rows
    assert ["C03", "0", "0", "–", "0.000", "0.050", "0.000", "empty_field", "no_cells"] in rows


def test_every_image_is_an_embedded_png(page):
    images = parse(page).images
    # Three heatmaps, the histograms, the reliability diagram and three thumbnails.
    assert len(images) == 8
    for image in images:
        source = image["src"]
        assert source.startswith("data:image/png;base64,")
        png = base64.b64decode(source.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_SIGNATURE)


def test_no_network_references(page):
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert not re.search(r'src="(?!data:)', page)


def test_text_from_data_is_escaped(page):
    assert NASTY not in page
    assert "&lt;b&gt;x&amp;y&lt;/b&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert "<i>low</i>" not in page
    text = "".join(parse(page).text)
    assert NASTY in text
    assert "most uncertain <i>low</i>" in text
    assert 'C02 f0 #7 "odd"' in text
    assert "drug & co" in text


def test_sample_table_shows_only_samples_on_the_plate(page, tables):
    rows = parse(page).rows
    per_sample = tables["per_sample"].set_index("sample")
    nasty_rows = [row for row in rows if row and row[0] == NASTY]
    assert len(nasty_rows) == 1
    assert f"{per_sample.loc[NASTY, 'fraction_positive']:.3f}" in nasty_rows[0]
    low, high = per_sample.loc[NASTY, ["fraction_ci_low", "fraction_ci_high"]]
    assert f"[{low:.3f}, {high:.3f}]" in nasty_rows[0]


def test_evaluation_is_shown(page):
    rows = parse(page).rows
    for label, value in [
        ("accuracy", "0.812"),
        ("balanced accuracy", "0.792"),
        ("ROC AUC", "0.903"),
        ("expected calibration error (ECE)", "0.042"),
        ("baseline accuracy", "0.688"),
    ]:
        assert [label, value] in rows
    assert ["true low_potential", "11", "3"] in rows
    assert ["true high_potential", "4", "17"] in rows
    assert "Reliability diagram" in page
    assert "temperature" in page  # other entries are listed too


def test_empty_evaluation_and_gallery(tables):
    page = render_page(tables, evaluation={}, gallery={})
    assert "No model evaluation available." in page
    assert "No example cells." in page
    assert len(parse(page).images) == 4  # heatmaps and histograms only


def test_confusion_matrix_as_counts_mapping(tables):
    page = render_page(
        tables, evaluation={"confusion_matrix": {"tn": 5, "fp": 1, "fn": 2, "tp": 8}}, gallery={}
    )
    rows = parse(page).rows
    assert ["true low_potential", "5", "1"] in rows
    assert ["true high_potential", "2", "8"] in rows


def test_malformed_confusion_matrix_is_rejected(tables):
    with pytest.raises(ValueError, match="confusion_matrix"):
        render_page(tables, evaluation={"confusion_matrix": [1, 2, 3]}, gallery={})


def test_per_well_read_back_from_csv(tables, tmp_path):
    # CSV turns empty strings (qc_flags, sample) into NaN and may read plates as numbers.
    path = tmp_path / "per_well.csv"
    tables["per_well"].to_csv(path, index=False)
    per_well = pd.read_csv(path, keep_default_na=False, na_values=[""])
    page = render_page(tables, per_well=per_well, gallery={})
    rows = parse(page).rows
    assert ["C03", "ctrl", "1", "0", "0", "0", "empty_field;no_cells", "no"] in rows
    assert not any(row and row[0] == "B02" and "no_cells" in row for row in rows)


def test_missing_column_is_named(tables):
    with pytest.raises(ValueError, match="qc_flags"):
        render_page(tables, per_well=tables["per_well"].drop(columns="qc_flags"))


def test_gallery_crop_must_be_2d(tables):
    with pytest.raises(ValueError, match="2-D"):
        render_page(tables, gallery={"bad": [("x", np.zeros((2, 8, 8)))]})


@pytest.mark.parametrize(
    ("wells", "expected"),
    [
        (["A01", "B03"], (24, 4, 6)),
        (["A01", "D06"], (24, 4, 6)),
        (["A07"], (96, 8, 12)),
        (["H12"], (96, 8, 12)),
        (["I01"], (384, 16, 24)),
        (["A13", "P24"], (384, 16, 24)),
        (["AF48"], (1536, 32, 48)),
        ([], (96, 8, 12)),
    ],
)
def test_infer_plate_format(wells, expected):
    assert infer_plate_format(wells) == expected


@pytest.mark.parametrize("well", ["3B", "B", "AAA01", "B00"])
def test_malformed_well_is_rejected(well):
    with pytest.raises(ValueError, match="malformed well id"):
        infer_plate_format([well])


def test_384_well_layout(tables):
    per_well = tables["per_well"].copy()
    per_well.loc[per_well["well"] == "D05", "well"] = "P24"
    page = render_page(tables, per_well=per_well, evaluation={}, gallery={})
    assert "Plate layout (384-well plate)" in page


def test_figure_to_data_uri():
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    uri = figure_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert figure_to_data_uri(fig) == uri  # no timestamp or version in the bytes


def test_index_links_each_plate(tables):
    page = render_index(["P1", "P2", "P 3"], tables["per_plate"], tables["per_sample"])
    parsed = parse(page)
    assert parsed.errors == [] and parsed.stack == []
    assert parsed.links == ["P1/report.html", "P2/report.html", "P%203/report.html"]
    rows = parsed.rows
    # wells, failing QC, fields, after QC, cells before and after QC; P3 is not in the table.
    assert rows[1][:7] == ["P1", "5", "2", "6", "4", "107", "95"]
    assert rows[2][:7] == ["P2", "2", "0", "2", "2", "44", "44"]
    assert rows[3] == ["P 3"] + ["–"] * (len(PER_PLATE_COLUMNS) - 1)
    assert NASTY not in page and "&lt;b&gt;x&amp;y&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page


def test_reliability_as_per_bin_lists(tables):
    # The layout metascreen.training.evaluate_predictions writes: NaN in empty bins.
    nan = float("nan")
    evaluation = {
        "reliability": {
            "bin_lower": [0.0, 0.5, 0.75],
            "bin_upper": [0.5, 0.75, 1.0],
            "confidence": [nan, 0.62, 0.9],
            "accuracy": [nan, 0.6, 0.85],
            "count": [0, 8, 20],
        },
        "nll": nan,
    }
    page = render_page(tables, evaluation=evaluation, gallery={})
    assert "Reliability diagram" in page
    assert len(parse(page).images) == 5
    assert "<dt>nll</dt><dd>–</dd>" in page  # NaN shown as a dash among the other entries


def test_reliability_without_required_key_is_rejected(tables):
    with pytest.raises(ValueError, match="count"):
        render_page(tables, evaluation={"reliability": [{"confidence": 0.6, "accuracy": 0.5}]}, gallery={})


def test_skipped_fields_are_listed_in_quality_control(tables):
    skipped = pd.DataFrame(
        [{"well": "A02", "field": 1, "file": "P1_A02_s2_w1.TIF", "reason": "empty file (0 bytes)"}]
    )
    html = render_page(tables, skipped_fields=skipped)
    assert "P1_A02_s2_w1.TIF" in html and "skipped at ingest" in html
    assert "skipped at ingest" not in render_page(tables)


def test_segmentation_section_shows_overlays_and_the_fine_tuning_evaluation(tables):
    labels = np.zeros((30, 40), np.int32)
    labels[5:15, 5:15] = 1
    rgb = outline_overlay(np.random.default_rng(2).normal(size=(30, 40)), labels)
    evaluation = {
        "ap50_before": 0.412,
        "ap50_after": 0.786,
        "validation": "right half of <each> field",
        "n_annotated_fields": 3,
        "train_seconds": 84.5,
    }
    page = render_page(
        tables, overlays=[(f"{NASTY} / B02 / field 0 / 1 cells", rgb)], segmenter_evaluation=evaluation
    )
    parsed = parse(page)
    assert parsed.errors == [] and "Segmentation" in parsed.text
    # the overlay is one more embedded PNG, of exactly the overlay's pixels, with its caption
    shown = [image for image in parsed.images if image["alt"] == f"{NASTY} / B02 / field 0 / 1 cells"]
    assert len(parsed.images) == 9 and len(shown) == 1
    png = base64.b64decode(shown[0]["src"].removeprefix("data:image/png;base64,"), validate=True)
    decoded = (imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(np.uint8)
    assert np.array_equal(decoded, rgb)
    assert f"{NASTY} / B02 / field 0 / 1 cells" in "".join(parsed.text)
    for row in (
        ["AP@0.5 before fine-tuning", "0.412"],
        ["AP@0.5 after fine-tuning", "0.786"],
        ["held out for validation", "right half of <each> field"],
        ["annotated fields", "3"],
        ["training time (s)", "84.500"],
    ):
        assert row in parsed.rows
    # without them the section says so, and has no fine-tuning table
    plain = render_page(tables)
    assert "No segmentation overlays." in plain and "fine-tuning" not in plain
    with pytest.raises(ValueError, match="train_seconds"):
        render_page(
            tables, segmenter_evaluation={k: v for k, v in evaluation.items() if k != "train_seconds"}
        )
    with pytest.raises(ValueError, match=r"\(Y, X, 3\) uint8"):
        render_page(tables, overlays=[("grey", labels.astype(np.uint8))])
