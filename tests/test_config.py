"""Config and plate map validation: defaults filled, one-line errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from metascreen import synth
from metascreen.config import (
    ConfigError,
    read_platemap,
    resolve_paths,
    validate_config,
    validate_platemap,
)

from .conftest import ROOT

CLASSES = {"negative": "low_potential", "positive": "high_potential"}


def minimal_config() -> dict:
    return {"plates": {"p1": {"images": "img"}}, "platemap": "map.csv"}


def platemap(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["plate", "well", "sample", "train_class"])


def test_defaults_are_filled_in_nested_sections():
    config = validate_config(minimal_config())
    assert config["segment"]["channel"] == 0
    assert config["measure"]["crop_size"] == 64
    assert config["classes"] == CLASSES
    assert config["ingest"]["preset"] == "imagexpress"


def test_input_is_not_mutated():
    original = minimal_config()
    validate_config(original)
    assert original == minimal_config()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(segmnt={}), "'segmnt' was unexpected"),
        (lambda c: c.update(segment={"texture_sigm": 2}), "'texture_sigm' was unexpected"),
        (lambda c: c.update(measure={"crop_size": 4}), "measure.crop_size"),
        (lambda c: c.pop("platemap"), "'platemap' is a required property"),
        (lambda c: c.update(plates={"bad/plate": {"images": "x"}}), "bad/plate"),
        (lambda c: c.update(ingest={"preset": "regex"}), "needs a pattern"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(change, expected):
    config = minimal_config()
    change(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_platemap_fills_optional_columns_and_sorts():
    table = validate_platemap(
        platemap([("p1", "B02", "s1", ""), ("p1", "A01", "s1", "high_potential")]),
        plates=["p1"],
        classes=CLASSES,
    )
    assert table["well"].tolist() == ["A01", "B02"]
    assert table["condition"].tolist() == ["", ""]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([("p1", "A01", "s", ""), ("p1", "A01", "t", "")], "well p1/A01 is listed more than once"),
        ([("p1", "Z01", "s", "")], "platemap row 2: well"),
        ([("p1", "A1", "s", "")], "platemap row 2: well"),
        ([("p2", "A01", "s", "")], "plate 'p2' is not among"),
        ([("p1", "A01", "a/b", "")], "platemap row 2: sample"),
        ([("p1", "A01", "s", "mystery")], "train_class 'mystery'"),
    ],
)
def test_platemap_errors_name_the_well(rows, expected):
    with pytest.raises(ConfigError) as error:
        validate_platemap(platemap(rows), plates=["p1"], classes=CLASSES)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_config_plate_without_wells_is_an_error():
    with pytest.raises(ConfigError, match="config plate 'p2' has no wells"):
        validate_platemap(platemap([("p1", "A01", "s", "")]), plates=["p1", "p2"], classes=CLASSES)


def test_shipped_config_and_platemap_are_valid_and_match_the_demo_layout():
    config = resolve_paths(
        validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())), ROOT / "config"
    )
    assert Path(config["plates"]["demo"]["images"]).resolve() == ROOT / "resources" / "demo" / "images"
    table = validate_platemap(
        read_platemap(config["platemap"]), plates=list(config["plates"]), classes=config["classes"]
    )
    layout = synth.demo_layout().astype(str).sort_values(["plate", "well"], ignore_index=True)
    pd.testing.assert_frame_equal(table[layout.columns], layout)


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("plate,well,sample\np1,A01,s1\np1,B02,s2\n", "utf-8-sig"),  # a byte-order mark (Excel)
        ("plate;well;sample\np1;A01;s1\np1;B02;s2\n", "utf-8"),  # semicolons (comma-decimal locales)
        ("plate,well,sample\r\np1,A01,s1\r\np1,B02,s2\r\n", "utf-8"),  # Windows line ends
        ("plate\twell\tsample\np1\tA01\ts1\np1\tB02\ts2\n", "utf-8"),  # tabs in a .csv
    ],
    ids=["bom", "semicolons", "crlf", "tabs"],
)
def test_platemap_dialects_read_alike(tmp_path, text, encoding):
    path = tmp_path / "map.csv"
    path.write_bytes(text.encode(encoding))
    table = validate_platemap(read_platemap(path), plates=["p1"], classes=CLASSES)
    assert table[["plate", "well", "sample"]].values.tolist() == [["p1", "A01", "s1"], ["p1", "B02", "s2"]]


def test_relative_paths_are_relative_to_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"plates": {"p": {"images": "img"}, "q": {"images": "/data/q"}}, "platemap": "../map.csv"}
    resolved = resolve_paths(config, tmp_path / "runs" / "one")
    assert resolved["plates"]["p"]["images"] == str(Path("runs/one/img"))
    assert resolved["plates"]["q"]["images"] == "/data/q"
    assert resolved["platemap"] == str(Path("runs/map.csv"))
    assert resolve_paths(config, ".")["plates"]["p"]["images"] == "img"
    assert config["plates"]["p"]["images"] == "img"  # the input is left as it was
