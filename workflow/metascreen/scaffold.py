"""A run folder for a user's own plate: ``metascreen init IMAGES_DIR`` writes its config and plate map.

The pure functions here describe what the discovery found and write the text of the two
files; :func:`write_run_folder` is the I/O edge that the command line calls.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from metascreen import discover
from metascreen.config import PLATEMAP_COLUMNS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PLATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONFIG_NAME = "config.yaml"
PLATEMAP_NAME = "platemap.csv"


def detect_preset(folder: str | Path) -> str:
    """The naming preset that matches the most files of ``folder`` (the first preset on a tie).

    Raises
    ------
    DiscoveryError
        If the folder is empty or no preset matches any of its files.
    """
    names = [path.name for path in discover.image_files(folder)]
    counts = {
        preset: sum(bool(discover.naming_pattern(preset).match(name)) for name in names)
        for preset in discover.PRESETS
    }
    if not any(counts.values()):
        raise discover.DiscoveryError(
            f"no file in {folder} matches any naming preset ({', '.join(discover.PRESETS)}), "
            f"e.g. {names[0]!r}; give the naming scheme with --pattern (named groups well, field, "
            "and optionally channel, z, t)"
        )
    return max(counts, key=counts.get)


def plate_id(files: pd.DataFrame, pattern: Any, folder: str | Path) -> str:
    """The plate id: the files' shared ``plate`` token when valid, else the folder's name made valid."""
    tokens = set()
    if "plate" in pattern.groupindex:
        tokens = {pattern.match(Path(path).name).group("plate") for path in files["path"]}
    candidate = tokens.pop() if len(tokens) == 1 else Path(folder).resolve().name
    if PLATE_ID.match(candidate or ""):
        return candidate
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", candidate or "").strip("._-")
    return cleaned or "plate1"


def channel_names(files: pd.DataFrame, pattern: Any, n_channels: int) -> list[str]:
    """Names of the channels in channel order: the file names' own tokens where they are words
    (Incucyte's ``Phase``, ``Green``), else ``channel_1`` ... (name them in the config)."""
    names = {}
    if "channel" in pattern.groupindex:
        for path, channel in zip(files["path"], files["channel"], strict=True):
            token = pattern.match(Path(path).name).group("channel") or ""
            names.setdefault(int(channel), token)
    words = [names.get(channel, "") for channel in range(n_channels)]
    if all(word and not word.isdigit() for word in words) and len(set(words)) == n_channels:
        return words
    return [f"channel_{channel + 1}" for channel in range(n_channels)]


def describe_files(files: pd.DataFrame, unmatched: list[str], header: dict[str, Any]) -> dict[str, Any]:
    """What :func:`metascreen.discover.discover_files` found, for the user.

    Parameters
    ----------
    files, unmatched
        From :func:`metascreen.discover.discover_files`.
    header
        :func:`metascreen.discover.read_tiff_header` of one file: its own (t, c, z, y, x)
        shape, which multiplies the counts from the file names.

    Returns
    -------
    dict
        wells (sorted), n_fields, n_channels, n_z, n_t (file names times the file's own
        pages), shape (y, x), dtype, n_files, unmatched.
    """
    t, c, z, y, x = header["shape"]
    return {
        "wells": sorted(files["well"].unique()),
        "n_fields": int(files["field"].max()) + 1,
        "n_channels": (int(files["channel"].max()) + 1) * c,
        "n_z": (int(files["z"].max()) + 1) * z,
        "n_t": (int(files["t"].max()) + 1) * t,
        "shape": [y, x],
        "dtype": header["dtype"],
        "n_files": len(files),
        "unmatched": list(unmatched),
    }


def config_text(
    plate: str, images: str, preset: str, pattern: str | None, names: list[str], pixel_size_um: float | None
) -> str:
    """The run folder's ``config.yaml``: the keys a user must decide, each commented.

    Every other key takes the default of ``workflow/schemas/config.schema.yaml``.
    """
    naming = f"preset: {preset}" if pattern is None else f"preset: regex\n  pattern: {json.dumps(pattern)}"
    pixel_note = (
        "recorded in the files (OME-TIFF); used only for files without it"
        if pixel_size_um is not None
        else "not recorded in the files: set your objective's pixel size"
    )
    return f"""\
# metascreen run configuration, written by `metascreen init`. Keys not written here take
# their defaults from workflow/schemas/config.schema.yaml, where every key is described.
# Relative paths are relative to this file's folder.
# Next: fill in platemap.csv, then `metascreen check --config config.yaml`.

plates:                         # one key per plate id (its results go to results/<id>/)
  {plate}:
    images: {json.dumps(images, ensure_ascii=False)}

platemap: {PLATEMAP_NAME}           # one row per well: fill in sample, and train_class for training wells

classes:                        # the two classes, as written in the plate map's train_class column
  negative: low_potential       # the lower-potential (rounder) cells
  positive: high_potential      # the higher-potential (elongated) cells that fraction_positive counts

ingest:
  {naming}
  channel_names: {json.dumps(names)}   # in channel order
  pixel_size_um: {pixel_size_um or 0.65}   # micrometres per pixel; {pixel_note}

segment:
  channel: 0                    # the label-free channel (brightfield or phase contrast), 0-based

qc:
  saturation_level: null        # null: the dtype's maximum; e.g. 4095 for 12-bit data in 16-bit files
"""


def platemap_table(plate: str, wells: list[str]) -> pd.DataFrame:
    """The run folder's plate map: every well found, ``sample`` and ``train_class`` to fill in."""
    table = pd.DataFrame({column: "" for column in PLATEMAP_COLUMNS}, index=range(len(wells)))
    return table.assign(plate=plate, well=wells)


def write_run_folder(
    images: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    pattern: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Discover the files of ``images`` and write ``out/config.yaml`` and ``out/platemap.csv``.

    Parameters
    ----------
    images : path
        The plate's image folder.
    out : path
        The run folder (created when missing).
    preset : str, optional
        A naming preset of :data:`metascreen.discover.PRESETS`; by default the one that
        matches the most files (:func:`detect_preset`).
    pattern : str, optional
        A regular expression instead of a preset (see :func:`metascreen.discover.naming_pattern`).
    force : bool
        Overwrite an existing config or plate map.

    Returns
    -------
    dict
        :func:`describe_files` with plate, preset, config and platemap (the paths written).

    Raises
    ------
    DiscoveryError
        If the run folder already holds a config or plate map (without ``force``), or the
        folder holds no image that the naming scheme matches.
    """
    out = Path(out)
    config_path, platemap_path = out / CONFIG_NAME, out / PLATEMAP_NAME
    existing = [str(path) for path in (config_path, platemap_path) if path.exists()]
    if existing and not force:
        raise discover.DiscoveryError(f"{' and '.join(existing)} exist; pass --force to overwrite them")
    if pattern is not None:
        preset = "regex"
    elif preset is None:
        preset = detect_preset(images)
    compiled = discover.naming_pattern(preset, pattern)
    files, unmatched = discover.discover_files(images, compiled)
    header = discover.read_tiff_header(files["path"].iloc[0])
    found = describe_files(files, unmatched, header)
    plate = plate_id(files, compiled, images)
    names = channel_names(files, compiled, found["n_channels"])
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        config_text(plate, str(Path(images).resolve()), preset, pattern, names, header["pixel_size_um"]),
        encoding="utf-8",
    )
    platemap_table(plate, found["wells"]).to_csv(platemap_path, index=False)
    return {
        **found,
        "plate": plate,
        "preset": preset,
        "config": str(config_path),
        "platemap": str(platemap_path),
    }


def snakemake_command(run_folder: str | Path, profile: str, extra: list[str]) -> list[str]:
    """The documented Snakemake command for a run folder (what ``metascreen run`` executes).

    Parameters
    ----------
    run_folder : path
        Holds ``config.yaml``; results go to ``run_folder/results``.
    profile : str
        A profile of the project's ``profiles/`` (``local``, ``slurm``) or a profile folder.
    extra : list of str
        Further Snakemake arguments (``--cores 8``, ``--dry-run``, ``--unlock``).
    """
    run_folder = Path(run_folder).resolve()
    profile_folder = PROJECT_ROOT / "profiles" / profile
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(PROJECT_ROOT / "Snakefile"),
        "--directory",
        str(run_folder),
        "--configfile",
        str(run_folder / CONFIG_NAME),
        "--profile",
        str(profile_folder if profile_folder.is_dir() else Path(profile).resolve()),
        *extra,
    ]
