"""Runs of two small synthetic plates in one config: the outputs of several plates, resumption
after SIGKILL at seeded points of every stage, and what a change of the plate map or the config
reruns. The uninterrupted run is the reference of the killed ones."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
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
# (stage, its rule): a kill in each while a job of the rule runs.
KILL_STAGES = [
    ("ingest", "ingest_well"),
    ("segment", "segment_well"),
    ("measure", "measure_well"),
    ("train", "train"),
    ("classify", "classify_well"),
    ("aggregate", "collect_plate"),
]
# Snakemake's own progress lines on stderr: a job of a rule starts, a job of a rule finishes.
JOB_STARTED = re.compile(r"^(?:local)?rule (\w+):$", re.MULTILINE)
JOB_FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", re.MULTILINE)
PER_WELL_OUTPUTS = (
    "ingest/*.json",
    "segment/*.json",
    "measure/*.parquet",
    "fields/*.parquet",
    "classify/*.parquet",
)
KILL_SEED = 2026
# At most half the stage's shortest job: the same job can run a third faster in a resumed run than
# in the uninterrupted one (training 8 s against 12 s), and a kill after it ended misses the stage.
MAX_KILL_FRACTION = 0.5


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


def _job_counts(stderr: Path) -> tuple[Counter, Counter]:
    """Jobs per rule that a Snakemake run has started and finished so far, from its stderr."""
    text = stderr.read_text()
    return Counter(JOB_STARTED.findall(text)), Counter(JOB_FINISHED.findall(text))


def _shortest_job_s(workdir: Path) -> dict[str, float]:
    """The shortest job of each rule in a finished run, in seconds, from Snakemake's metadata
    (its start and end time per output)."""
    shortest: dict[str, float] = {}
    for record in (workdir / ".snakemake" / "metadata").glob("*"):
        metadata = json.loads(record.read_text())
        duration = metadata["endtime"] - metadata["starttime"]
        shortest[metadata["rule"]] = min(duration, shortest.get(metadata["rule"], duration))
    return shortest


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
    workdir: Path, stderr: Path, rule: str, n_started: int, delay_s: float, guarded_rules: list[str]
) -> set[str]:
    """Resume the run and SIGKILL Snakemake and every job it started (one process group) once
    n_started jobs of the rule have started and delay_s more has passed, or as soon as a job of
    a guarded rule runs (a later stage still owed a kill, which must not finish first). Returns
    the rules with a job running at the kill."""
    with stderr.open("w") as log:
        process = subprocess.Popen(
            _resume_command(workdir), env=environment(), stdout=log, stderr=log, start_new_session=True
        )
    deadline = None
    try:
        while deadline is None or time.monotonic() < deadline:
            assert process.poll() is None, f"the run ended before its kill:\n{stderr.read_text()[-3000:]}"
            started, finished = _job_counts(stderr)
            if deadline is None and started[rule] >= n_started:
                deadline = time.monotonic() + delay_s
            if any(started[guarded] > finished[guarded] for guarded in guarded_rules):
                break
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    started, finished = _job_counts(stderr)
    return {name for name in started if started[name] > finished[name]}


@pytest.mark.slow
def test_runs_killed_in_every_stage_resume_to_the_uninterrupted_tables(plates, uninterrupted_run, tmp_path):
    """A kill lands inside a job of every stage on a machine of any speed. Each run targets the
    earliest stage still owed a kill: a random fraction, at most half, of the stage's shortest
    job (timed in the uninterrupted run) after a random job of it starts, as Snakemake's own
    progress lines tell, or at once when a job of a later stage owed a kill starts (that kill
    then counts for the later stage)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, plates)
    shortest_job_s = _shortest_job_s(uninterrupted_run)
    rng = random.Random(KILL_SEED)
    kills, killed_stages, finished_before_a_kill = [], set(), {}
    for attempt in range(2 * len(KILL_STAGES)):
        pending = planned_jobs(workdir)
        owed = [
            (stage, rule) for stage, rule in KILL_STAGES if stage not in killed_stages and pending.get(rule)
        ]
        if not owed:
            break
        (stage, rule), later = owed[0], owed[1:]
        n_started, fraction = rng.randint(1, pending[rule]), rng.uniform(0.05, MAX_KILL_FRACTION)
        stderr = tmp_path / f"run_{attempt}.log"
        delay_s = fraction * shortest_job_s[rule]
        running = _run_until_killed(workdir, stderr, rule, n_started, delay_s, [r for _, r in later])
        kills.append((stage, n_started, round(fraction, 2), sorted(running)))
        killed_stages |= {s for s, r in KILL_STAGES if r in running}
        for path, mtime_ns in _finished_per_well_outputs(workdir).items():
            finished_before_a_kill.setdefault(path, mtime_ns)
    run(_resume_command(workdir))
    print(f"kills (stage targeted, its jobs started, fraction of its shortest job, rules running): {kills}")

    assert killed_stages == {stage for stage, _ in KILL_STAGES}, kills
    assert summary_tables(workdir) == summary_tables(uninterrupted_run), kills
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
