"""Snakemake's overhead at scale: a dry run of 4 plates x 384 wells x 9 fields.

The image files are empty and only named (ImageXpress naming): a dry run reads no pixels.
One ``snakemake --dry-run`` process gives two times, both from its start: ``dag_seconds`` until
it prints its job counts (start-up, parsing, the DAG of every job: what any run pays before its
first job; target < 10 s) and ``dry_run_seconds`` until it exits (it then also describes every
job, as a run does while it goes).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PLATES = 4
FIELDS = 9
ROWS, COLUMNS = "ABCDEFGHIJKLMNOP", range(1, 25)
TRAINING_COLUMNS = {1: "low_potential", 24: "high_potential"}


def _plate(workdir: Path, plate: str) -> list[dict[str, str]]:
    """Empty image files of one 384-well plate; its plate-map rows (one sample per column)."""
    images = workdir / plate / "images"
    images.mkdir(parents=True)
    rows = []
    for row in ROWS:
        for column in COLUMNS:
            well = f"{row}{column:02d}"
            for field in range(1, FIELDS + 1):
                (images / f"{plate}_{well}_s{field}_w1.TIF").touch()
            rows.append(
                {
                    "plate": plate,
                    "well": well,
                    "sample": f"sample_{column:02d}",
                    "condition": "untreated",
                    "cell_line": "LoMet+HiMet",
                    "train_class": TRAINING_COLUMNS.get(column, ""),
                }
            )
    return rows


def _timed_dry_run(command: list[str]) -> tuple[int, float, float]:
    """Jobs planned, seconds until the job counts are printed, seconds until the process exits."""
    start = time.perf_counter()
    n_jobs, dag_seconds, lines = None, None, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(line)
            words = line.split()
            if dag_seconds is None and words == ["Job", "stats:"]:
                dag_seconds = time.perf_counter() - start
            if n_jobs is None and len(words) == 2 and words[0] == "total":
                n_jobs = int(words[1])
    dry_run_seconds = time.perf_counter() - start
    if process.returncode or n_jobs is None or dag_seconds is None:
        raise RuntimeError(f"dry run failed:\n{''.join(lines[-50:])}")
    return n_jobs, dag_seconds, dry_run_seconds


def run(workdir: Path) -> dict:
    plates = [f"plate{index + 1}" for index in range(PLATES)]
    rows = [row for plate in plates for row in _plate(workdir, plate)]
    pd.DataFrame(rows).to_csv(workdir / "platemap.csv", index=False)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["plates"] = {plate: {"images": f"{plate}/images"} for plate in plates}
    config["platemap"] = "platemap.csv"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        "--dry-run",
        "--quiet",
        "rules",
    ]
    n_jobs, dag_seconds, dry_run_seconds = _timed_dry_run(command)
    return {
        "plates": PLATES,
        "wells": len(rows),
        "fields": len(rows) * FIELDS,
        "n_jobs": n_jobs,
        "dag_seconds": dag_seconds,
        "dry_run_seconds": dry_run_seconds,
    }
