"""Finding a plate's TIFF files by vendor naming scheme and planning their ingest.

A naming scheme is a regular expression with named groups ``well`` (or ``row`` and
``col``), ``field`` and ``channel`` (``plate`` optional). Field and channel numbers are
mapped to 0-based indices by their sorted order, so 1-based (ImageXpress ``s1``) and
0-based (Cellomics ``f00``) schemes give the same layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

_GUID = r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"
#: Incucyte channel tokens (the vessel name comes first, the channel after it).
INCUCYTE_CHANNELS = ("Phase", "Brightfield", "Green", "Red", "NIR", "Blue", "Orange")
PRESETS: dict[str, str] = {
    # MetaXpress / ImageXpress: Plate_B03_s2_w1.TIF, with the GUID MetaXpress appends
    # (Plate_B03_s2_w1E9F3...C1D2.tif); without _s for one site, without _w for one wavelength.
    # Thumbnails (Plate_B03_s2_thumbE9F3....tif) do not match.
    "imagexpress": (
        r"^(?P<plate>.+)_(?P<well>[A-Pa-p]\d{1,2})(?:_s(?P<field>\d+))?"
        rf"(?:_w(?P<channel>\d+)(?:{_GUID})?)?\.tiff?$"
    ),
    # Cellomics / ArrayScan: AS_09047_050428030001_O01f00d2.TIF (f = field, d = channel)
    "cellomics": r"^(?P<plate>.+)_(?P<well>[A-Pa-p]\d{2})f(?P<field>\d+)d(?P<channel>\d+)\.tiff?$",
    # Operetta / Opera Phenix (Harmony): r02c03f01p01-ch1sk1fk1fl1.tiff, one file per plane
    # (p = Z) and time point (sk)
    "operetta": (
        r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<field>\d+)p(?P<z>\d+)-ch(?P<channel>\d+)"
        r"sk(?P<t>\d+)fk\d+fl\d+\.tiff?$"
    ),
    # Incucyte: [vessel]_[channel]_[well]_[image]_[time].tif, e.g. A172_Phase_A7_1_00d00h00m.tif
    # (one file per time point and channel; the channel token is absent in single-channel
    # exports, VID1_B3_1_00d04h00m.tif), and an optional trailing index (LIVECell's
    # A172_Phase_A7_1_00d00h00m_1.tif, a crop of the image) that counts as a field of its own
    "incucyte": (
        rf"^(?P<plate>.+?)(?:_(?P<channel>{'|'.join(INCUCYTE_CHANNELS)}))?_(?P<well>[A-Pa-p]\d{{1,2}})"
        r"_(?P<field>\d+)_(?P<t>\d{2,}d\d{2}h\d{2}m)(?:_(?P<tile>\d+))?\.tiff?$"
    ),
}
# MetaXpress export folders of one time point (TimePoint_N) and one Z step (ZStep_N)
_FOLDER_AXES = {"t": "TimePoint", "z": "ZStep"}
# tifffile series axes -> ours: pages of unknown meaning (Q, I) are taken as Z planes
AXIS_OF = {"T": "t", "C": "c", "S": "c", "Z": "z", "Q": "z", "I": "z", "Y": "y", "X": "x"}


NAMED_AXES = ("field", "channel", "z", "t")


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
    if not ({"well"} <= groups or {"row", "col"} <= groups) or "field" not in groups:
        raise DiscoveryError(
            f"pattern {source!r} needs named groups (?P<well>...) or (?P<row>...)(?P<col>...), "
            "and (?P<field>...); (?P<channel>...), (?P<z>...) and (?P<t>...) are optional"
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


def axis_key(token: str | None) -> tuple[int, int, str]:
    """Sort key of a file-name token along an axis.

    Numbers sort by value (``s2`` before ``s10``); Incucyte channel names in the order of
    :data:`INCUCYTE_CHANNELS` (label-free ``Phase`` first), other names alphabetically after
    them; a missing token (an optional group that did not match) is 0.

    Examples
    --------
    >>> sorted(["Green", "Phase", "10", "2"], key=axis_key)
    ['2', '10', 'Phase', 'Green']
    """
    token = token or "0"
    if token.isdigit():
        return (0, int(token), "")
    known = [name.lower() for name in INCUCYTE_CHANNELS]
    rank = known.index(token.lower()) if token.lower() in known else len(known)
    return (1, rank, token)


def folder_axes(relative_folder: str | Path) -> dict[str, str]:
    """The time point and Z step that MetaXpress export folders give a file.

    MetaXpress writes a time series into ``TimePoint_N/`` folders and a Z series into
    ``ZStep_N/`` folders (inside them, or at the top).

    Examples
    --------
    >>> folder_axes("TimePoint_3/ZStep_2")
    {'t': '3', 'z': '2'}
    >>> folder_axes(".")
    {}
    """
    axes = {}
    for part in Path(relative_folder).parts:
        for axis, name in _FOLDER_AXES.items():
            match = re.fullmatch(rf"{name}_(\d+)", part, re.IGNORECASE)
            if match:
                axes[axis] = match.group(1)
    return axes


def image_files(folder: str | Path) -> list[Path]:
    """The files of an image folder and of its MetaXpress ``TimePoint_N`` / ``ZStep_N``
    sub-folders (not hidden ones, not other sub-folders), sorted by path.

    Raises
    ------
    DiscoveryError
        If the folder is missing, unreadable or holds no file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DiscoveryError(f"image folder not found or not a folder: {folder}")

    def listing(directory: Path) -> list[Path]:
        try:
            entries = sorted(directory.iterdir())
        except PermissionError as error:
            raise DiscoveryError(
                f"image folder {directory} is not readable ({error}); check its permissions"
            ) from error
        files = [path for path in entries if path.is_file() and not path.name.startswith(".")]
        for path in entries:
            if path.is_dir() and folder_axes(path.name):
                files += listing(path)
        return files

    files = listing(folder)
    if not files:
        raise DiscoveryError(f"image folder {folder} is empty; point plates.*.images at the plate's TIFFs")
    return files


def discover_files(folder: str | Path, pattern: re.Pattern[str]) -> tuple[pd.DataFrame, list[str]]:
    """List the image files of a folder that match a naming pattern.

    Parameters
    ----------
    folder : path
        The plate's image folder; of its sub-folders only MetaXpress's ``TimePoint_N``
        and ``ZStep_N`` are searched, and give the time point and Z plane of their files
        (:func:`folder_axes`); a Z series' projection beside its ``ZStep_N`` folders is
        left out (listed as unmatched).
    pattern : re.Pattern
        From :func:`naming_pattern`.

    Returns
    -------
    files : pandas.DataFrame
        Columns path, well, field, channel (0-based indices), sorted.
    unmatched : list of str
        Names of files that match no pattern.
    """
    records, unmatched = [], []
    for path in image_files(folder):
        relative = path.relative_to(folder)
        match = pattern.match(path.name)
        if match is None:
            unmatched.append(relative.as_posix())
            continue
        groups = match.groupdict()
        from_folders = folder_axes(relative.parent)
        record = {"path": str(path), "well": _row_col_well(groups), "in_z_step": "z" in from_folders}
        for axis in NAMED_AXES:
            record[f"{axis}_key"] = axis_key(groups.get(axis) or from_folders.get(axis))
        # a trailing index (a crop of the image) makes a field of its own
        record["field_key"] = (record["field_key"], axis_key(groups.get("tile")))
        records.append(record)
    # MetaXpress puts a Z series' projection beside its ZStep_N folders: not a plane of it
    stepped = {_image_key(record) for record in records if record["in_z_step"]}
    projections = [r for r in records if not r["in_z_step"] and _image_key(r) in stepped]
    unmatched += [f"{Path(r['path']).relative_to(folder).as_posix()} (Z projection)" for r in projections]
    records = [{k: v for k, v in r.items() if k != "in_z_step"} for r in records if r not in projections]
    if not records:
        raise DiscoveryError(
            f"no file in {folder} matches the naming pattern {pattern.pattern!r} "
            f"(e.g. {unmatched[0]!r}); check ingest.preset (or ingest.pattern)"
        )
    files = pd.DataFrame.from_records(records)
    for axis in NAMED_AXES:
        # 0-based index by sorted order: 1-based (s1) and 0-based (f00) schemes agree
        ranks = {value: rank for rank, value in enumerate(sorted(set(files[f"{axis}_key"])))}
        files[axis] = files[f"{axis}_key"].map(ranks)
    files = files.drop(columns=[f"{axis}_key" for axis in NAMED_AXES])
    duplicated = files[files.duplicated(["well", *NAMED_AXES], keep=False)]
    if not duplicated.empty:
        names = ", ".join(Path(p).name for p in duplicated["path"][:2])
        raise DiscoveryError(f"two files claim the same well, field, channel, z and t: {names}; remove one")
    return files.sort_values(["well", *NAMED_AXES], ignore_index=True), unmatched


def _image_key(record: dict[str, Any]) -> tuple:
    """A discovered file's well, field, channel and time point: the image its Z planes make."""
    return (record["well"], record["field_key"], record["channel_key"], record["t_key"])


def tczyx_order(axes: str) -> tuple[list[int], list[str]]:
    """How to bring a tifffile series with ``axes`` into (t, c, z, y, x) order.

    Returns the transpose order and the target axis of each transposed axis; adjacent
    axes with the same target (e.g. ``Q`` and ``Z``) are merged by a reshape.
    """
    targets = [AXIS_OF.get(axis, "z") for axis in axes]
    if targets.count("y") != 1 or targets.count("x") != 1:
        raise DiscoveryError(f"TIFF series axes {axes!r} lack one Y and one X axis")
    order = sorted(range(len(axes)), key=lambda index: ("tczyx".index(targets[index]), index))
    return order, [targets[index] for index in order]


def tczyx_shape(shape: list[int], axes: str) -> list[int]:
    """The (t, c, z, y, x) shape of a series of ``shape`` with ``axes``."""
    order, targets = tczyx_order(axes)
    return [
        int(np.prod([shape[i] for i, a in zip(order, targets, strict=True) if a == axis])) for axis in "tczyx"
    ]


def read_tiff_tczyx(path: str | Path) -> np.ndarray:
    """A TIFF's first series as a (t, c, z, y, x) array, whatever its page layout."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        pixels, axes = series.asarray(), series.axes
    order, _ = tczyx_order(axes)
    return pixels.transpose(order).reshape(tczyx_shape(list(pixels.shape), axes))


def _pixel_size_um(tif: tifffile.TiffFile) -> float | None:
    """PhysicalSizeX of an OME-TIFF in micrometres, when recorded."""
    if not tif.is_ome:
        return None
    images = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    pixels = (images[0] if isinstance(images, list) else images)["Pixels"]
    size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
    if size is None:
        return None
    return float(size) * {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit, 1.0)


def read_tiff_header(path: str | Path) -> dict[str, Any]:
    """(t, c, z, y, x) shape, dtype and pixel size of a TIFF's first series, without its pixels."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DiscoveryError(f"{path}: empty file (0 bytes); re-export or remove it")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            last = series.pages[-1]
            # a file cut short keeps a valid header: its last strip then ends past the file's end
            if last.dataoffsets[-1] + last.databytecounts[-1] > path.stat().st_size:
                raise DiscoveryError(f"{path}: truncated (pixel data ends past the file's end); re-export it")
            return {
                "shape": tczyx_shape(list(series.shape), series.axes),
                "dtype": str(series.dtype),
                "pixel_size_um": _pixel_size_um(tif),
            }
    except DiscoveryError:
        raise
    except Exception as error:  # tifffile raises several types for damaged files
        raise DiscoveryError(f"{path}: not a readable TIFF ({error}); re-export or remove it") from error


def plan_plate(
    plate: str,
    files: pd.DataFrame,
    unmatched: list[str],
    platemap_wells: list[str],
    *,
    unexpected_wells: str = "warn",
    bad_files: str = "error",
    pixel_size_um: float = 1.0,
) -> dict[str, Any]:
    """Check discovered files against the plate map and describe the ingest to come.

    Every file's TIFF header is read (not its pixels), so that empty, damaged or
    odd-shaped files are reported here, before any conversion.

    Parameters
    ----------
    plate : str
        Plate id.
    files, unmatched
        From :func:`discover_files`.
    platemap_wells : list of str
        The plate's wells in the plate map.
    unexpected_wells : {"warn", "error"}
        Images of wells absent from the plate map are skipped, or an error.
    bad_files : {"error", "skip"}
        A damaged, empty or odd-shaped file is an error, or its field is skipped and
        recorded in ``skipped``.
    pixel_size_um : float
        Used when the files do not record their pixel size (OME-TIFF does).

    Returns
    -------
    dict
        plate; wells (well -> list of fields, each ``{"field": index, "files": [[path,
        t, c, z], ...]}``); shape of a field (t, c, z, y, x) and of a file; dtype;
        pixel_size_um and its source; n_fields, n_channels, n_z, n_t, n_files;
        unexpected_wells, unmatched_files, skipped (well, field, file, reason).
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
    skipped: list[dict[str, Any]] = []

    def reject(well: str, field: int, path: str, reason: str) -> None:
        if bad_files == "error":
            raise DiscoveryError(f"{reason}; or set ingest.bad_files: skip to skip the field")
        skipped.append({"well": well, "field": int(field), "file": Path(path).name, "reason": reason})

    headers: dict[str, dict[str, Any]] = {}
    for row in files.itertuples():
        try:
            headers[row.path] = read_tiff_header(row.path)
        except DiscoveryError as error:
            reject(row.well, row.field, row.path, str(error))
    readable = list(headers.values())
    if not readable:
        raise DiscoveryError(f"plate {plate}: no readable image file")
    # the geometry most files share is the plate's; other files are odd ones out
    geometries = pd.Series([(tuple(h["shape"]), h["dtype"]) for h in readable]).value_counts()
    file_shape, dtype = geometries.index[0]
    for path, header in headers.items():
        if (tuple(header["shape"]), header["dtype"]) != (file_shape, dtype):
            row = files[files["path"] == path].iloc[0]
            reject(
                row.well,
                row.field,
                path,
                f"{path}: shape {header['shape']} {header['dtype']} differs from the plate's "
                f"{list(file_shape)} {dtype}; a plate must have one image geometry",
            )

    counts = {axis: int(files[axis].max()) + 1 for axis in ("t", "channel", "z")}
    per_field = counts["t"] * counts["channel"] * counts["z"]
    bad_fields = {(entry["well"], entry["field"]) for entry in skipped}
    wells: dict[str, list[dict[str, Any]]] = {}
    for (well, field), group in files.groupby(["well", "field"], sort=True):
        if (well, field) in bad_fields:
            continue
        if len(group) != per_field:
            reject(
                well,
                field,
                group["path"].iloc[0],
                f"plate {plate} well {well} field {field}: {len(group)} of {per_field} files "
                "(channels x planes x time points) found; add the missing files",
            )
            continue
        entries = [[row.path, int(row.t), int(row.channel), int(row.z)] for row in group.itertuples()]
        wells.setdefault(str(well), []).append({"field": int(field), "files": entries})
    empty = sorted(set(platemap_wells) - set(wells))
    if empty:
        raise DiscoveryError(f"plate {plate}: every field of well(s) {', '.join(empty)} was skipped as bad")

    recorded = sorted({header["pixel_size_um"] for header in readable} - {None})
    from_metadata = len(recorded) == 1
    field_shape = [
        counts["t"] * file_shape[0],
        counts["channel"] * file_shape[1],
        counts["z"] * file_shape[2],
        file_shape[3],
        file_shape[4],
    ]
    return {
        "plate": plate,
        "wells": wells,
        "shape": field_shape,
        "file_shape": list(file_shape),
        "dtype": dtype,
        "pixel_size_um": recorded[0] if from_metadata else pixel_size_um,
        "pixel_size_source": "OME-TIFF metadata" if from_metadata else "config",
        "n_fields": int(files["field"].max()) + 1,
        "n_channels": field_shape[1],
        "n_z": field_shape[2],
        "n_t": field_shape[0],
        "n_files": int(sum(len(field["files"]) for fields in wells.values() for field in fields)),
        "unexpected_wells": unexpected,
        "unmatched_files": unmatched,
        "skipped": skipped,
    }


def sample_fields(
    fields_of_wells: Mapping[str, Sequence[int]], n_fields: int, seed: int
) -> list[tuple[str, int]]:
    """A seeded random sample of a plate's fields, spread across its wells.

    Wells are taken in a random order, one random field of each in turn; a well gives a
    second field only once every well has given one, so a sample no larger than the
    number of wells has one field per well.

    Parameters
    ----------
    fields_of_wells : mapping of str to sequence of int
        Each well's field indices (e.g. of a plan's ``wells``).
    n_fields : int
        Fields to pick; fewer when the plate has fewer.
    seed : int
        Seed of the random choice: the same seed picks the same fields.

    Returns
    -------
    list of (well, field)
        Sorted by well and field.

    Examples
    --------
    >>> sample_fields({"A01": [0, 1], "B02": [0, 1], "C03": [0]}, 3, seed=0)
    [('A01', 0), ('B02', 1), ('C03', 0)]
    """
    rng = np.random.default_rng(seed)
    wells = [str(well) for well in rng.permutation(sorted(fields_of_wells))]
    unpicked = {well: [int(field) for field in rng.permutation(fields_of_wells[well])] for well in wells}
    picked: list[tuple[str, int]] = []
    while len(picked) < n_fields and any(unpicked.values()):
        for well in wells:
            if unpicked[well] and len(picked) < n_fields:
                picked.append((well, unpicked[well].pop()))
    return sorted(picked)
