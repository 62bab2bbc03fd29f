"""Writing result files so that an interrupted job never leaves one that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path``; rename it to ``path`` on success.

    The temporary file or folder is removed if the block raises, and a file is synced
    to disk before the rename, so after a crash ``path`` is either the old or the
    complete new content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    try:
        yield partial
        if partial.is_file():
            with open(partial, "rb+") as handle:
                os.fsync(handle.fileno())
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(partial, path)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: str | Path, content: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(content, indent=2, default=_json_default) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """Write a table atomically as Parquet or CSV, by the file's suffix."""
    with atomic_path(path) as partial:
        if Path(path).suffix == ".parquet":
            table.to_parquet(partial, index=False)
        else:
            table.to_csv(partial, index=False)
