"""End to end: Snakemake runs the whole workflow on a small synthetic plate."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
import zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image

from metascreen.aggregate import CELL_KEYS

from .conftest import ROOT
from .small_plate import BIN, environment, planned_jobs, run, snakemake_command, write_config, write_plate

# Four pure wells per class (the minimum for a train/val/test split by well plus margin)
# and three mixed samples.
WELLS = ["A01", "B05", "C03", "D04", "A04", "B02", "C01", "D05", "A06", "B03", "D02", "A05", "C02", "D06"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("e2e")
    subprocess.run(
        [
            str(BIN / "metascreen"),
            "synth",
            str(workdir / "plate"),
            "--seed",
            "7",
            "--fields-per-well",
            "2",
            "--wells",
            *WELLS,
        ],
        check=True,
        capture_output=True,
    )
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["plates"] = {"demo": {"images": "plate/images"}}
    config["platemap"] = "plate/platemap.csv"
    config["aggregate"]["n_bootstrap"] = 200
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run(snakemake_command(workdir))
    return workdir


@pytest.mark.slow
def test_every_sample_fraction_is_within_ten_points_of_truth(finished_run):
    measured = pd.read_csv(finished_run / "results" / "summary" / "per_sample.csv").set_index("sample")
    truth = pd.read_csv(finished_run / "plate" / "truth" / "per_sample.csv").set_index("sample")
    assert sorted(measured.index) == sorted(truth.index)
    error = (measured["fraction_positive"] - truth["fraction_positive"]).abs()
    assert (error <= 0.10).all(), error.to_dict()
    assert (measured["n_cells_after_qc"] > 0).all()


@pytest.mark.slow
def test_outputs_follow_the_contract(finished_run):
    results = finished_run / "results"
    per_well = pd.read_parquet(results / "summary" / "per_well.parquet")
    assert sorted(per_well["well"]) == sorted(WELLS)
    for column in ("plate", "well", "sample", "n_cells_after_qc", "fraction_positive", "qc_flags"):
        assert column in per_well
    cells = pd.read_parquet(results / "demo" / "demo_cells.parquet")
    assert len(cells) == per_well["n_cells_before_qc"].sum()
    assert cells["Cells_probability"].between(0, 1).all()
    assert cells.set_index(CELL_KEYS).index.is_unique
    fields = pd.read_parquet(results / "demo" / "demo_fields.parquet")
    assert len(fields) == 2 * len(WELLS)
    evaluation = json.loads((results / "model" / "evaluation.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece", "baseline_accuracy"):
        assert 0 <= evaluation[key] <= 1
    assert (results / "model" / "model.safetensors").stat().st_size > 0
    plate = results / "demo" / "demo.ome.zarr"
    HCS.from_zarr(zarr.open_group(str(plate), mode="r"))
    field = Image.from_zarr(zarr.open_group(str(plate / "A" / "01" / "0"), mode="r"))
    assert field.labels is not None
    html = (results / "demo" / "report.html").read_text()
    assert "<img" in html and "http://" not in html


@pytest.mark.slow
def test_snakemake_report_bundles_the_marked_outputs(finished_run):
    run(snakemake_command(finished_run, "--report", "report.zip"))
    with zipfile.ZipFile(finished_run / "report.zip") as bundle:
        names = bundle.namelist()
    # the marked outputs, under report/data/raw/{hash}/: both reports and the three CSV tables
    marked = sorted(Path(name).name for name in names if name.startswith("report/data/raw/"))
    assert marked == ["per_plate.csv", "per_sample.csv", "per_well.csv", "report.html", "report.html"], names


@pytest.mark.slow
def test_rerun_redoes_only_the_unfinished_well(finished_run):
    assert planned_jobs(finished_run) == {}
    # A run interrupted while segmenting well C02: no manifest for it, nothing downstream
    # of it, and no plate-level tables or reports yet.
    results = finished_run / "results"
    for path in (
        "segment/C02.json",
        "measure/C02.parquet",
        "fields/C02.parquet",
        "classify/C02.parquet",
        "demo_cells.parquet",
        "report.html",
    ):
        (results / "demo" / path).unlink()
    shutil.rmtree(results / "demo" / "crops" / "C02.zarr")
    shutil.rmtree(results / "summary")
    counts = planned_jobs(finished_run)
    # The plate's segmentation check reruns with the well; nothing after it reruns for it.
    assert counts == {
        "segment_well": 1,
        "check_segmentation": 1,
        "measure_well": 1,
        "classify_well": 1,
        "collect_plate": 1,
        "summarize": 1,
        "report_plate": 1,
        "report_index": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_a_plate_whose_segmentation_finds_too_few_cells_stops_before_training(tmp_path):
    plate, workdir = tmp_path / "plate", tmp_path / "run"
    write_plate(plate, seed=3, wells=["A01", "A03", "A04"])  # a training well of each class, a mixture
    workdir.mkdir()
    write_config(workdir, {"demo": plate})
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    # No well reaches this many cells: a plate on which segmentation "finds nothing", without the
    # time of segmenting bad images; a set diameter skips the estimate.
    config["qc"]["min_cells_per_well"] = 100_000
    config["segment"]["learned"]["cell_diameter"] = 20
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(snakemake_command(workdir), env=environment(), capture_output=True, text=True)
    assert result.returncode != 0
    error = (workdir / "results" / "logs" / "demo" / "segment" / "check.log").read_text()
    assert error.startswith(
        "metascreen check-segmentation: error: plate demo: segmentation found fewer than 100000 cells "
        "(qc.min_cells_per_well) in 3 of 3 wells (A01, A03, A04), more than qc.max_low_cell_well_fraction "
        "= 0.5 of them; median "
    )
    assert "learned segmentation at a cell diameter of 20.0 px" in error and "`metascreen preview`" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert error.strip() in result.stdout + result.stderr  # Snakemake shows the failed job's log
    results = workdir / "results"
    assert sorted(path.name for path in (results / "demo" / "segment").glob("*.json")) == [
        "A01.json",
        "A03.json",
        "A04.json",
    ]
    # Training and classification never started.
    assert not (results / "logs" / "model").exists() and not (results / "model").exists()
    assert (
        not (results / "logs" / "demo" / "classify").exists() and not (results / "demo" / "classify").exists()
    )
