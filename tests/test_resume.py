"""Runs of two small synthetic plates in one config: the outputs of several plates, resumption
after SIGKILL at seeded points of every stage, and what a change of the plate map or the config
reruns. The uninterrupted run is the reference of the killed ones."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .small_plate import (
    environment,
    planned_jobs,
    run,
    snakemake_command,
    summary_tables,
    write_config,
    write_plate,
)

# Training wells of both classes on both plates; samples ctrl_low, ctrl_high and mix50 span both.
PLATES = {
    "p1": (11, ["A01", "B05", "C03", "A04", "B02", "C01", "A03"]),
    "p2": (12, ["D04", "D05", "B04"]),
}
# (stage, the rule whose jobs' logs mark its progress): one kill in each, in this order.
KILL_STAGES = [
    ("ingest", "ingest_well"),
    ("segment", "segment_well"),
    ("measure", "measure_well"),
    ("train", "train"),
    ("classify", "classify_well"),
    ("aggregate", "collect_plate"),
]
LOGS = {
    "ingest_well": "results/logs/*/ingest/*.log",
    "segment_well": "results/logs/*/segment/*.log",
    "measure_well": "results/logs/*/measure/*.log",
    "train": "results/logs/model/train.log",
    "classify_well": "results/logs/*/classify/*.log",
    "collect_plate": "results/logs/*/collect.log",
}
PER_WELL_OUTPUTS = (
    "ingest/*.json",
    "segment/*.json",
    "measure/*.parquet",
    "fields/*.parquet",
    "classify/*.parquet",
)
KILL_SEED = 2026


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plates")
    for plate, (seed, wells) in PLATES.items():
        write_plate(folder / plate, seed, wells)
    return {plate: folder / plate for plate in PLATES}


@pytest.fixture(scope="module")
def uninterrupted_run(plates, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    write_config(workdir, plates)
    run(snakemake_command(workdir))
    return workdir


@pytest.mark.slow
def test_each_plate_has_its_outputs_and_samples_pool_across_plates(uninterrupted_run):
    results = uninterrupted_run / "results"
    for plate in PLATES:
        cells = pd.read_parquet(results / plate / f"{plate}_cells.parquet")
        assert set(cells["Metadata_Plate"]) == {plate}
        assert (results / plate / "report.html").stat().st_size > 0
    per_well = pd.read_csv(results / "summary" / "per_well.csv")
    assert sorted(zip(per_well["plate"], per_well["well"], strict=True)) == sorted(
        (plate, well) for plate, (_, wells) in PLATES.items() for well in wells
    )
    per_sample = pd.read_csv(results / "summary" / "per_sample.csv").set_index("sample")
    # (ctrl_low spans both plates too, but p2's D04 is one of synth's empty fields and fails QC.)
    assert per_sample.loc[["ctrl_high", "mix50"], "n_plates"].tolist() == [2, 2]
    assert sorted(pd.read_csv(results / "summary" / "per_plate.csv")["plate"]) == sorted(PLATES)
    index = (results / "summary" / "report.html").read_text()
    assert all(plate in index for plate in PLATES)


def _log_starts(workdir: Path, rule: str, since_ns: int) -> int:
    """Jobs of a rule started since a time: their logs are (re)written when they start."""
    return sum(path.stat().st_mtime_ns >= since_ns for path in workdir.glob(LOGS[rule]))


def _finished_per_well_outputs(workdir: Path) -> dict[Path, int]:
    """Per-well outputs that exist and that Snakemake does not mark incomplete, with their mtimes."""
    markers = workdir / ".snakemake" / "incomplete"
    incomplete = {
        workdir / base64.urlsafe_b64decode(marker.name).decode()
        for marker in markers.glob("*")
        if marker.is_file() and marker.name != "migration_underway"
    }
    outputs = (path for pattern in PER_WELL_OUTPUTS for path in workdir.glob(f"results/*/{pattern}"))
    return {path: path.stat().st_mtime_ns for path in outputs if path not in incomplete}


def _resume_command(workdir: Path) -> list[str]:
    """The README's resume: `--unlock` (a killed Snakemake leaves its lock behind), then the
    command of the run."""
    run(snakemake_command(workdir, "--unlock"))
    return snakemake_command(workdir)


def _run_until_killed(
    workdir: Path, rule: str, n_started: int, delay_s: float, next_rule: str | None
) -> None:
    """Resume the run; once n_started jobs of the rule have started and delay_s more has passed,
    or sooner when a job of next_rule starts (so that the next stage keeps work for its own kill
    on a fast machine), SIGKILL Snakemake and every job it started (one process group)."""
    since_ns = time.time_ns()
    process = subprocess.Popen(
        _resume_command(workdir),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while _log_starts(workdir, rule, since_ns) < n_started:
            assert process.poll() is None, f"the run ended before {n_started} {rule} job(s) started"
            time.sleep(0.05)
        deadline = time.monotonic() + delay_s
        while time.monotonic() < deadline:
            if next_rule and _log_starts(workdir, next_rule, since_ns):
                break
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_runs_killed_in_every_stage_resume_to_the_uninterrupted_tables(plates, uninterrupted_run, tmp_path):
    write_config(tmp_path, plates)
    rng = random.Random(KILL_SEED)
    kills, finished_before_a_kill = [], {}
    next_rules = [rule for _, rule in KILL_STAGES[1:]] + [None]
    for (stage, rule), next_rule in zip(KILL_STAGES, next_rules, strict=True):
        pending = planned_jobs(tmp_path).get(rule, 0)
        if not pending:  # the stage finished before the previous kill landed
            continue
        n_started, delay_s = rng.randint(1, pending), rng.uniform(0.0, 2.0)
        _run_until_killed(tmp_path, rule, n_started, delay_s, next_rule)
        kills.append((stage, n_started, round(delay_s, 2)))
        for path, mtime_ns in _finished_per_well_outputs(tmp_path).items():
            finished_before_a_kill.setdefault(path, mtime_ns)
    run(_resume_command(tmp_path))
    print(f"kills (stage, jobs of its rule started, seconds after): {kills}")

    assert len(kills) >= 5, kills
    assert summary_tables(tmp_path) == summary_tables(uninterrupted_run), kills
    redone = [path for path, mtime in finished_before_a_kill.items() if path.stat().st_mtime_ns != mtime]
    assert not redone, f"recomputed after a kill: {redone}"


def _edited_copy(source: Path, destination: Path) -> Path:
    """A copy of a finished run (outputs, metadata, config) to change something in."""
    subprocess.run(["cp", "-a", f"{source}/.", str(destination)], check=True)
    return destination


@pytest.mark.slow
def test_renaming_a_sample_reruns_only_aggregation_and_reports(uninterrupted_run, tmp_path):
    workdir = _edited_copy(uninterrupted_run, tmp_path)
    platemap = pd.read_csv(workdir / "platemap.csv", dtype=str, keep_default_na=False)
    platemap.loc[platemap["sample"] == "mix50", "sample"] = "mix_fifty"
    platemap.to_csv(workdir / "platemap.csv", index=False)
    assert planned_jobs(workdir) == {
        "collect_plate": 2,
        "summarize": 1,
        "report_plate": 2,
        "report_index": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_changing_a_segmentation_parameter_reruns_segmentation_onwards(uninterrupted_run, tmp_path):
    workdir = _edited_copy(uninterrupted_run, tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    # a recovery threshold: segmentation reruns, the plates' cell-diameter estimates do not
    config["segment"].setdefault("learned", {})["seed_threshold"] = 0.6
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    n_wells = sum(len(wells) for _, wells in PLATES.values())
    assert planned_jobs(workdir) == {
        "segment_well": n_wells,
        "check_segmentation": 2,
        "measure_well": n_wells,
        "train": 1,
        "classify_well": n_wells,
        "collect_plate": 2,
        "summarize": 1,
        "report_plate": 2,
        "report_index": 1,
        "all": 1,
    }
