"""A user's own plate: `metascreen init` writes a run folder, `check` and `run` use it from anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from metascreen import cli, config, scaffold

from .conftest import ROOT


def incucyte_export(
    folder, wells=("A7", "B3"), channels=("Phase", "Green"), stamps=("00d00h00m", "00d04h00m")
):
    folder.mkdir(parents=True)
    for well in wells:
        for channel in channels:
            for stamp in stamps:
                tifffile.imwrite(
                    folder / f"Exp1_{channel}_{well}_1_{stamp}.tif", np.zeros((16, 24), np.uint16)
                )
    (folder / "Exp1_metadata.xml").write_text("<a/>")
    return folder


def test_init_writes_a_config_and_a_platemap_of_every_well(tmp_path, capsys):
    images = incucyte_export(tmp_path / "export")
    assert cli.main(["init", str(images), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "8 files (incucyte naming) of plate Exp1" in printed
    assert "2 wells (A07 ... B03), 1 fields per well" in printed
    assert "2 channels, 1 planes, 2 time points, 16 x 24 px uint16" in printed
    assert "1 files match no naming pattern, e.g. Exp1_metadata.xml" in printed
    assert f"metascreen check --config {tmp_path / 'run' / 'config.yaml'}" in printed
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["plates"] == {"Exp1": {"images": str(images)}}
    assert written["ingest"]["preset"] == "incucyte"
    assert written["ingest"]["channel_names"] == ["Phase", "Green"]
    validated = config.validate_config(written)  # the rest is left to the schema's defaults
    assert validated["segment"]["channel"] == 0 and validated["ingest"]["compression_level"] == 1
    platemap = pd.read_csv(tmp_path / "run" / "platemap.csv", dtype=str, keep_default_na=False)
    assert platemap.values.tolist() == [["Exp1", "A07", "", "", "", ""], ["Exp1", "B03", "", "", "", ""]]


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    images = incucyte_export(tmp_path / "export")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "platemap.csv").write_text("mine")
    assert cli.main(["init", str(images), "--out", str(tmp_path / "run")]) == 1
    assert "platemap.csv exist; pass --force" in capsys.readouterr().err
    assert (tmp_path / "run" / "platemap.csv").read_text() == "mine"
    assert cli.main(["init", str(images), "--out", str(tmp_path / "run"), "--force"]) == 0
    assert (tmp_path / "run" / "platemap.csv").read_text().startswith("plate,well,sample")


def test_init_with_a_pattern_and_on_an_empty_folder(tmp_path, capsys):
    images = tmp_path / "my images ü"
    images.mkdir()
    for well in ("C05", "D06"):
        tifffile.imwrite(images / f"scan {well} f1.tif", np.zeros((8, 8), np.uint8))
    pattern = r"scan (?P<well>[A-P]\d\d) f(?P<field>\d)\.tif"
    found = scaffold.write_run_folder(images, tmp_path / "run", pattern=pattern)
    assert found["preset"] == "regex" and found["wells"] == ["C05", "D06"]
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["ingest"]["pattern"] == pattern
    assert written["plates"] == {"my_images": {"images": str(images)}}  # a valid plate id from the folder
    (tmp_path / "empty").mkdir()
    assert cli.main(["init", str(tmp_path / "empty"), "--out", str(tmp_path / "run2")]) == 1
    assert "image folder" in (err := capsys.readouterr().err) and "is empty" in err
    assert not (tmp_path / "run2").exists()


def filled_run_folder(tmp_path):
    images = incucyte_export(tmp_path / "export")
    scaffold.write_run_folder(images, tmp_path / "run")
    platemap = pd.read_csv(tmp_path / "run" / "platemap.csv", dtype=str, keep_default_na=False)
    platemap.assign(sample=["s1", "s2"], train_class=["low_potential", "high_potential"]).to_csv(
        tmp_path / "run" / "platemap.csv", index=False
    )
    return tmp_path / "run"


def test_check_reads_paths_relative_to_the_config_folder_from_anywhere(tmp_path, monkeypatch, capsys):
    run = filled_run_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["check", "--config", str(run / "config.yaml")]) == 0
    assert capsys.readouterr().out == "plate Exp1: 2 wells, 2 samples, 2 training wells\n"
    assert cli.main(["check", "--config", str(run / "absent.yaml")]) == 1
    assert "config: file not found" in capsys.readouterr().err


def test_run_wraps_the_documented_snakemake_command(tmp_path):
    command = scaffold.snakemake_command(tmp_path, "local", ["--cores", "4"])
    assert command == [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "config.yaml"),
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--cores",
        "4",
    ]


def _planned(command: list[str], cwd: Path) -> tuple[dict[str, str], str]:
    """Jobs per rule of a dry run (``--dry-run --quiet rules`` on 1 core) and its output."""
    result = subprocess.run(
        [sys.executable, "-m", *command, "--dry-run", "--quiet", "rules", "--cores", "1"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
    return counts, result.stdout + result.stderr


@pytest.mark.slow
def test_run_plans_the_workflow_in_the_run_folder_only(tmp_path):
    counts, output = _planned(["metascreen", "run", str(filled_run_folder(tmp_path))], tmp_path)
    assert counts["plan_plate"] == "1" and counts["ingest_well"] == "2"  # Exp1 only, not the demo plate
    assert "config/config.yaml" not in output


def test_a_configfile_of_ones_own_is_not_merged_into_the_demo_config(tmp_path):
    run = filled_run_folder(tmp_path)
    # from the project folder, where the demo's config/config.yaml sits
    counts, _ = _planned(["snakemake", "--configfile", str(run / "config.yaml"), "--nolock"], ROOT)
    assert counts["plan_plate"] == "1"  # the run folder's plate Exp1, not also the demo plate
