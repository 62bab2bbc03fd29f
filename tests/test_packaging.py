"""The environments agree: pyproject pins, the lock file, the rules' conda env; the workflow lints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from .conftest import ROOT

BIN = Path(sys.executable).parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_conda_env_pins_equal_pyproject_dependencies():
    env = yaml.safe_load((ROOT / "envs" / "metascreen.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert sorted(pip_section) == sorted(pyproject()["project"]["dependencies"])
    python = next(item for item in env["dependencies"] if isinstance(item, str) and item.startswith("python"))
    assert python == "python=3.11"


def test_lock_file_holds_every_pin_and_no_cuda():
    lock = (ROOT / "requirements.lock").read_text().lower().splitlines()
    project = pyproject()["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        assert requirement.lower() in lock, f"{requirement} missing from requirements.lock"
    assert "torch==2.13.0" in lock
    assert not [line for line in lock if re.match(r"(nvidia|triton|cuda)", line)]


def test_every_rule_names_log_threads_resources_and_env():
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        for rule in re.split(r"\n\s*rule ", text)[1:]:
            name = rule.split(":", 1)[0]
            for directive in ("log:", "threads:", "resources:", "conda:"):
                assert directive in rule, f"rule {name} in {path.name} lacks {directive}"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_snakefmt_clean():
    result = _run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_clean():
    result = _run([str(BIN / "snakemake"), "--lint", "--cores", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_python_code_is_ruff_clean():
    paths = ["workflow/metascreen", "benchmarks", "tests"]
    for command in (["check", *paths], ["format", "--check", *paths]):
        result = _run([str(BIN / "ruff"), *command])
        assert result.returncode == 0, result.stdout + result.stderr
