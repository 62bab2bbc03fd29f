"""Run every benchmark (or those named): ``python -m benchmarks [name ...]``.

Each ``benchmarks/bench_{name}.py`` has ``run(workdir) -> dict``; its figures are printed
and written to ``results/benchmarks/{name}.json``. Speed is reported as a ratio against a
baseline measured in the same run, so figures compare across machines.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

OUTDIR = Path("results/benchmarks")


def main(names: list[str]) -> int:
    available = sorted(path.stem.removeprefix("bench_") for path in Path(__file__).parent.glob("bench_*.py"))
    unknown = sorted(set(names) - set(available))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    OUTDIR.mkdir(parents=True, exist_ok=True)
    for name in names or available:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as workdir:
            figures = module.run(Path(workdir))
        for key, value in figures.items():
            print(f"  {key:<28} {value:.4g}" if isinstance(value, float) else f"  {key:<28} {value}")
        (OUTDIR / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


sys.exit(main(sys.argv[1:]))
