"""Finding a plate's TIFF files by vendor naming scheme and planning their ingest.

A naming scheme is a regular expression with named groups ``well`` (or ``row`` and
``col``), ``field`` and ``channel`` (``plate`` optional). Field and channel numbers are
mapped to 0-based indices by their sorted order, so 1-based (ImageXpress ``s1``) and
0-based (Cellomics ``f00``) schemes give the same layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import tifffile

PRESETS: dict[str, str] = {
    # MetaXpress / ImageXpress: Plate_B03_s2_w1.TIF (thumbnails end in a hex UUID and do not match)
    "imagexpress": r"^(?P<plate>.+)_(?P<well>[A-Pa-p]\d{1,2})_s(?P<field>\d+)_w(?P<channel>\d+)\.tiff?$",
    # Cellomics / ArrayScan: AS_09047_050428030001_O01f00d2.TIF
    "cellomics": r"^(?P<plate>.+)_(?P<well>[A-Pa-p]\d{2})f(?P<field>\d+)d(?P<channel>\d+)\.tiff?$",
}


class DiscoveryError(ValueError):
    """A problem with a plate's image files, naming the file and the fix."""


def naming_pattern(preset: str, pattern: str | None = None) -> re.Pattern[str]:
    """Compile the file name pattern of a preset, or the user's ``pattern`` for preset ``regex``."""
    if preset == "regex":
        if not pattern:
            raise DiscoveryError("preset 'regex' needs ingest.pattern in the config")
        source = pattern
    elif preset in PRESETS:
        source = PRESETS[preset]
    else:
        raise DiscoveryError(f"unknown naming preset {preset!r}; choose one of {sorted(PRESETS)} or 'regex'")
    compiled = re.compile(source, re.IGNORECASE)
    groups = set(compiled.groupindex)
    if not ({"well"} <= groups or {"row", "col"} <= groups) or not {"field", "channel"} <= groups:
        raise DiscoveryError(
            f"pattern {source!r} needs named groups (?P<well>...) or (?P<row>...)(?P<col>...), "
            "plus (?P<field>...) and (?P<channel>...)"
        )
    return compiled


def normalise_well(well: str) -> str:
    """``'b3'`` -> ``'B03'``."""
    match = re.fullmatch(r"([A-Pa-p])0*(\d{1,2})", well)
    if match is None:
        raise DiscoveryError(f"not a well id: {well!r}")
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def _row_col_well(groups: dict[str, str]) -> str:
    if groups.get("well"):
        return normalise_well(groups["well"])
    row = groups["row"]
    # Operetta-style numeric rows (r02) count from 1
    letter = chr(ord("A") + int(row) - 1) if row.isdigit() else row
    return normalise_well(f"{letter}{int(groups['col'])}")


def discover_files(folder: str | Path, pattern: re.Pattern[str]) -> tuple[pd.DataFrame, list[str]]:
    """List the image files of a folder that match a naming pattern.

    Parameters
    ----------
    folder : path
        The plate's image folder (not searched recursively).
    pattern : re.Pattern
        From :func:`naming_pattern`.

    Returns
    -------
    files : pandas.DataFrame
        Columns path, well, field, channel (0-based indices), sorted.
    unmatched : list of str
        Names of files that match no pattern.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DiscoveryError(f"image folder not found or not a folder: {folder}")
    records, unmatched = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        if match is None:
            unmatched.append(path.name)
            continue
        groups = match.groupdict()
        records.append(
            {
                "path": str(path),
                "well": _row_col_well(groups),
                "field_number": int(groups["field"]),
                "channel_number": int(groups["channel"]),
            }
        )
    if not records:
        raise DiscoveryError(
            f"no file in {folder} matches the naming pattern {pattern.pattern!r}; "
            "check ingest.preset (or ingest.pattern)"
        )
    files = pd.DataFrame.from_records(records)
    for number, index in (("field_number", "field"), ("channel_number", "channel")):
        ranks = {value: rank for rank, value in enumerate(sorted(files[number].unique()))}
        files[index] = files[number].map(ranks)
    duplicated = files[files.duplicated(["well", "field", "channel"], keep=False)]
    if not duplicated.empty:
        names = ", ".join(Path(p).name for p in duplicated["path"][:2])
        raise DiscoveryError(f"two files claim the same well, field and channel: {names}; remove one")
    files = files.drop(columns=["field_number", "channel_number"])
    return files.sort_values(["well", "field", "channel"], ignore_index=True), unmatched


def read_tiff_header(path: str | Path) -> dict[str, Any]:
    """Shape, dtype and axes of a TIFF's first series, without reading pixels."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DiscoveryError(f"{path}: empty file (0 bytes); re-export or remove it")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return {"shape": list(series.shape), "dtype": str(series.dtype), "axes": series.axes}
    except Exception as error:  # tifffile raises several types for damaged files
        raise DiscoveryError(f"{path}: not a readable TIFF ({error}); re-export or remove it") from error


def plan_plate(
    plate: str,
    files: pd.DataFrame,
    unmatched: list[str],
    platemap_wells: list[str],
    *,
    unexpected_wells: str = "warn",
) -> dict[str, Any]:
    """Check discovered files against the plate map and describe the ingest to come.

    Every file's TIFF header is read, so that empty, damaged or odd-shaped files are
    reported here, before any conversion.

    Returns
    -------
    dict
        plate, wells (well -> list of fields, each a list of file paths by channel),
        n_fields, n_channels, shape (of one file's series), dtype, axes, n_files,
        unexpected_wells, unmatched_files.
    """
    missing = sorted(set(platemap_wells) - set(files["well"]))
    if missing:
        raise DiscoveryError(
            f"plate {plate}: plate-map wells without images: {', '.join(missing)}; "
            "fix the plate map or the image folder"
        )
    unexpected = sorted(set(files["well"]) - set(platemap_wells))
    if unexpected and unexpected_wells == "error":
        raise DiscoveryError(
            f"plate {plate}: images of wells absent from the plate map: {', '.join(unexpected)}; "
            "add them to the plate map or set ingest.unexpected_wells: warn"
        )
    files = files[files["well"].isin(platemap_wells)]
    n_fields = int(files["field"].max()) + 1
    n_channels = int(files["channel"].max()) + 1

    headers = {path: read_tiff_header(path) for path in files["path"]}
    reference_path = files["path"].iloc[0]
    reference = headers[reference_path]
    for path, header in headers.items():
        if header["shape"] != reference["shape"] or header["dtype"] != reference["dtype"]:
            raise DiscoveryError(
                f"{path}: shape {header['shape']} {header['dtype']} differs from "
                f"{reference['shape']} {reference['dtype']} of {reference_path}; "
                "a plate must have one image geometry"
            )

    wells: dict[str, list[list[str]]] = {}
    for well, group in files.groupby("well", sort=True):
        fields = []
        for field in range(n_fields):
            paths = group[group["field"] == field].sort_values("channel")["path"].tolist()
            if len(paths) != n_channels:
                raise DiscoveryError(
                    f"plate {plate} well {well} field {field}: {len(paths)} of {n_channels} "
                    "channel files found; add the missing files or remove the field"
                )
            fields.append(paths)
        wells[str(well)] = fields
    return {
        "plate": plate,
        "wells": wells,
        "n_fields": n_fields,
        "n_channels": n_channels,
        "shape": reference["shape"],
        "dtype": reference["dtype"],
        "axes": reference["axes"],
        "n_files": int(len(files)),
        "unexpected_wells": unexpected,
        "unmatched_files": unmatched,
    }
