"""End to end on a real SLURM cluster: the small plate through ``--profile profiles/slurm`` gives the
tables of a local run. ``make test-cluster`` starts a one-node cluster (tests/cluster/slurm.sh) and
names its partition in METASCREEN_TEST_SLURM_PARTITION; without it the test is skipped."""

from __future__ import annotations

import os

import pytest

from .small_plate import SLURM_PROFILE, run, snakemake_command, summary_tables, write_config, write_plate

PARTITION = os.environ.get("METASCREEN_TEST_SLURM_PARTITION")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PARTITION, reason="no test SLURM cluster: run `make test-cluster`"),
]


def test_slurm_run_gives_the_tables_of_a_local_run(tmp_path):
    plate = tmp_path / "plate"
    write_plate(plate, seed=5)
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for workdir in (local, cluster):
        workdir.mkdir()
        write_config(workdir, {"demo": plate})
    run(snakemake_command(local))
    run(
        snakemake_command(
            cluster,
            "--default-resources",
            f"slurm_partition={PARTITION}",
            # The test cluster keeps no accounting database: ask squeue, and soon.
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "2",
            "--slurm-keep-successful-logs",
            profile=SLURM_PROFILE,
            limit_s=1500,
        )
    )
    assert summary_tables(cluster) == summary_tables(local)
    slurm_logs = cluster / ".snakemake" / "slurm_logs"
    assert list(slurm_logs.glob("group_*/**/*.log")), "no per-well group job ran on SLURM"
    assert list(slurm_logs.glob("rule_train/**/*.log")), "training did not run on SLURM"
