"""Reading and writing the OME-NGFF 0.5 (zarr v3) HCS plate: plate -> row -> column -> field.

Images are stored as ``(t, c, z, y, x)`` arrays with one chunk per field plane and
Blosc-zstd compression; segmentation masks as NGFF labels under each field image.
Wells and labels are written under a hidden temporary name and renamed into place, so
an interrupted job never leaves a well or a label image that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import (
    write_image,
    write_labels,
    write_plate_metadata,
    write_well_metadata,
)
from zarr.codecs import BloscCodec

AXES = "tczyx"
LABELS_NAME = "cells"
MIN_PYRAMID_EDGE = 256


def well_path(well: str) -> str:
    """``'B03'`` -> ``'B/03'``, the well's path inside the plate."""
    return f"{well[0]}/{well[1:]}"


def pyramid_factors(shape_yx: Sequence[int]) -> list[int]:
    """Downsampling factors (2, 4, ...) while the smaller edge stays >= 256 pixels."""
    factors, factor = [], 2
    while min(shape_yx) // factor >= MIN_PYRAMID_EDGE:
        factors.append(factor)
        factor *= 2
    return factors


def _storage_options(chunks: tuple[int, ...], compression_level: int) -> dict:
    codec = BloscCodec(cname="zstd", clevel=compression_level, shuffle="bitshuffle")
    return {"chunks": chunks, "compressors": [codec]}


def create_plate(path: str | Path, plate: str, wells: Sequence[str], field_count: int) -> zarr.Group:
    """Create (or overwrite) an empty HCS plate with its plate metadata and row groups."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    rows = sorted({well[0] for well in wells})
    columns = sorted({well[1:] for well in wells})
    write_plate_metadata(
        root,
        rows,
        columns,
        [well_path(well) for well in sorted(wells)],
        fmt=FormatV05(),
        field_count=field_count,
        name=plate,
    )
    for row in rows:
        root.require_group(row)
    return root


def read_tiff_planes(path: str | Path) -> np.ndarray:
    """A TIFF's first series as ``(z, y, x)``; leading page axes are taken as Z."""
    with tifffile.TiffFile(path) as tif:
        pixels = tif.series[0].asarray()
    return pixels.reshape((-1, *pixels.shape[-2:]))


def _lazy_field(channel_paths: Sequence[str], shape_zyx: tuple[int, ...], dtype: str) -> da.Array:
    channels = [
        da.from_delayed(dask.delayed(read_tiff_planes)(path), shape=shape_zyx, dtype=dtype)
        for path in channel_paths
    ]
    return da.stack(channels)[np.newaxis]  # (t, c, z, y, x)


def write_well(
    plate_path: str | Path,
    well: str,
    fields: Sequence[Sequence[str]],
    *,
    shape_zyx: tuple[int, int, int],
    dtype: str,
    channel_names: Sequence[str],
    pixel_size_um: float,
    compression_level: int = 3,
    num_workers: int = 1,
) -> None:
    """Convert one well's TIFF files into the plate, all fields in parallel.

    Parameters
    ----------
    plate_path : path
        The plate created by :func:`create_plate`.
    well : str
        Well id, e.g. ``'B03'``.
    fields : sequence of sequence of str
        For each field, its TIFF paths in channel order.
    shape_zyx, dtype
        Geometry of one TIFF file, from the plan.
    channel_names : sequence of str
        Names for the omero channel metadata.
    pixel_size_um : float
        Physical pixel size (y and x).
    compression_level : int
        Blosc-zstd level.
    num_workers : int
        Threads reading and compressing fields at once.
    """
    row_group = Path(plate_path) / well[0]
    final = row_group / well[1:]
    partial = row_group / f".{well[1:]}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    well_group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    write_well_metadata(well_group, [str(index) for index in range(len(fields))], fmt=FormatV05())

    n_channels = len(fields[0])
    names = [channel_names[c] if c < len(channel_names) else f"channel_{c}" for c in range(n_channels)]
    value_max = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    omero = {
        "channels": [
            {
                "label": name,
                "color": "FFFFFF",
                "active": True,
                "window": {"min": 0.0, "max": value_max, "start": 0.0, "end": value_max},
            }
            for name in names
        ]
    }
    chunks = (1, 1, 1, *shape_zyx[1:])
    pending = []
    for index, channel_paths in enumerate(fields):
        pending += write_image(
            _lazy_field(channel_paths, shape_zyx, dtype),
            well_group.require_group(str(index)),
            scale_factors=pyramid_factors(shape_zyx[1:]),
            fmt=FormatV05(),
            axes=AXES,
            storage_options=_storage_options(chunks, compression_level),
            scale={"t": 1.0, "c": 1.0, "z": 1.0, "y": pixel_size_um, "x": pixel_size_um},
            axes_units={"y": "micrometer", "x": "micrometer"},
            compute=False,
            omero=omero,
            name=f"{well}_{index}",
        )
    with dask.config.set(scheduler="threads", num_workers=num_workers):
        dask.compute(*pending)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def field_image(plate_path: str | Path, well: str, field: int, level: int = 0) -> da.Array:
    """A field's image at a pyramid level as a lazy ``(t, c, z, y, x)`` dask array."""
    array = zarr.open_array(str(Path(plate_path) / well_path(well) / str(field) / f"s{level}"), mode="r")
    return da.from_zarr(array)


def field_count(plate_path: str | Path, well: str) -> int:
    """Number of fields (images) in a well."""
    group = zarr.open_group(str(Path(plate_path) / well_path(well)), mode="r")
    return len(group.attrs["ome"]["well"]["images"])


def write_field_labels(plate_path: str | Path, well: str, field: int, labels: np.ndarray) -> None:
    """Store a field's ``(y, x)`` instance labels as NGFF labels ``labels/cells``.

    The label pyramid has as many levels as the image's, as NGFF requires.
    """
    image_group = zarr.open_group(str(Path(plate_path) / well_path(well) / str(field)), mode="r+")
    multiscales = image_group.attrs["ome"]["multiscales"][0]
    level0 = image_group[multiscales["datasets"][0]["path"]]
    scale = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"]
    shape = (1, 1, 1, *labels.shape)
    if shape[-2:] != level0.shape[-2:]:
        raise ValueError(f"labels of shape {labels.shape} do not fit field of shape {level0.shape}")

    labels_dir = Path(plate_path) / well_path(well) / str(field) / "labels"
    partial = labels_dir / f".{LABELS_NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_labels(
        labels.reshape(shape),
        image_group,
        name=partial.name,
        scaler=None,
        scale_factors=pyramid_factors(labels.shape),
        fmt=FormatV05(),
        axes=AXES,
        storage_options={"chunks": shape},
        scale=dict(zip(AXES, scale, strict=True)),
        axes_units={"y": "micrometer", "x": "micrometer"},
    )
    final = labels_dir / LABELS_NAME
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    # ome-zarr-py records the temporary name and omits the NGFF version on the labels group
    image_group["labels"].attrs["ome"] = {"version": "0.5", "labels": [LABELS_NAME]}
    label_image = zarr.open_group(str(final), mode="r+")
    attributes = dict(label_image.attrs["ome"])
    attributes["multiscales"] = [{**attributes["multiscales"][0], "name": LABELS_NAME}]
    label_image.attrs["ome"] = attributes


def field_labels(plate_path: str | Path, well: str, field: int) -> np.ndarray:
    """A field's ``(y, x)`` instance labels at full resolution."""
    path = Path(plate_path) / well_path(well) / str(field) / "labels" / LABELS_NAME / "s0"
    return zarr.open_array(str(path), mode="r")[0, 0, 0]
