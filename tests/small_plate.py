"""Tiny synthetic plates and Snakemake runs on them, for the resume, multi-plate and SLURM tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from .conftest import ROOT

BIN = Path(sys.executable).parent
LOCAL_PROFILE = ROOT / "profiles" / "local"
SLURM_PROFILE = ROOT / "profiles" / "slurm"
# Four pure wells per class (the fewest for a train/validation/test split by well) and one
# sample of two wells.
WELLS = ["A01", "B05", "C03", "D04", "A04", "B02", "C01", "D05", "A03", "B04"]
TABLES = ("per_well.csv", "per_sample.csv", "per_plate.csv")


def write_plate(folder: Path, seed: int, wells: list[str] = WELLS) -> Path:
    """A synthetic plate of one field per well; returns its plate map."""
    subprocess.run(
        [str(BIN / "metascreen"), "synth", str(folder), "--seed", str(seed), "--fields-per-well", "1"]
        + ["--wells", *wells],
        check=True,
        capture_output=True,
    )
    return folder / "platemap.csv"


def write_config(workdir: Path, plates: dict[str, Path]) -> None:
    """config.yaml and platemap.csv in workdir for plates {id: synthetic plate folder}; training
    and bootstrap cut to what a test needs."""
    platemaps = (
        pd.read_csv(folder / "platemap.csv", dtype=str).assign(plate=id) for id, folder in plates.items()
    )
    pd.concat(platemaps).to_csv(workdir / "platemap.csv", index=False)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["plates"] = {plate: {"images": str(folder / "images")} for plate, folder in plates.items()}
    config["platemap"] = "platemap.csv"
    config["train"]["epochs"] = 3
    config["aggregate"]["n_bootstrap"] = 100
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def snakemake_command(
    workdir: Path, *arguments: str, profile: Path = LOCAL_PROFILE, limit_s: int = 900
) -> list[str]:
    """The documented run command (``snakemake --profile ...``) for the run in workdir, on 2 cores.

    Bounded with SIGINT: Snakemake takes SIGTERM as "finish the running jobs" and would outlive
    the bound; on SIGINT it stops and cancels its cluster jobs.
    """
    return [
        "timeout",
        "-s",
        "INT",
        "-k",
        "60",
        str(limit_s),
        str(BIN / "snakemake"),
        "--profile",
        str(profile),
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        *arguments,
    ]


def environment() -> dict[str, str]:
    """The test's environment with its venv first on PATH: jobs run ``python -m metascreen``."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def planned_jobs(workdir: Path, *targets: str) -> dict[str, int]:
    """Jobs per rule that a dry run (of ``targets``, default all) would execute
    (Snakemake's job-count table)."""
    result = run(snakemake_command(workdir, *targets, "--dry-run", "--quiet", "rules"))
    counts = {}
    for line in (result.stdout + result.stderr).splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and words[0] != "total":
            counts[words[0]] = int(words[1])
    return counts


def summary_tables(workdir: Path) -> dict[str, bytes]:
    return {name: (workdir / "results" / "summary" / name).read_bytes() for name in TABLES}
