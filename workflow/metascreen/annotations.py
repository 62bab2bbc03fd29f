"""Annotated fields for fine-tuning the segmenter: read, check and split for validation.

Two sources, in the formats people make them:

* **a folder of TIFF pairs**: every ``NAME_masks.tif`` (or ``.tiff``) is the instance
  mask of the image ``NAME.tif`` (or ``.tiff``) beside it, as Cellpose and napari's
  "save labels" write them; an image without a mask is not an annotation and is
  skipped. An optional ``NAME_region.tif`` (non-zero inside) marks the part of the
  field that was annotated: outside it, unlabelled pixels are neither cell nor
  background. Without it the whole field counts as annotated.
* **a plate's OME-Zarr**: every field with an NGFF label image named ``annotations``
  (``{row}/{col}/{field}/labels/annotations``, as napari with an OME-Zarr plugin
  writes it), and optionally a label image ``annotations_region`` as above. The image
  is the field's segmented channel, middle Z plane.

Each annotated field becomes an :class:`Annotation`; :func:`check_annotation` is the
pure check, :func:`read_annotations` the I/O edge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

from metascreen import ngff

__all__ = [
    "Annotation",
    "annotation_files",
    "annotations_digest",
    "check_annotation",
    "read_annotations",
    "validation_split",
]

ZARR_LABEL = "annotations"
ZARR_REGION = "annotations_region"
_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Annotation:
    """One annotated field: its image, instance labels and annotated region."""

    name: str
    image: np.ndarray  # (Y, X) float32
    labels: np.ndarray  # (Y, X) int32, 0 = background or not annotated
    region: np.ndarray  # (Y, X) bool, True where the field was annotated


def check_annotation(
    name: str, image: np.ndarray, labels: np.ndarray, region: np.ndarray | None = None
) -> Annotation:
    """Check an annotated field and return it as an :class:`Annotation`.

    Parameters
    ----------
    name : str
        Where it comes from (a file or a field), named in every error.
    image : (Y, X) real array
        The field; singleton axes are dropped.
    labels : (Y, X) integer array
        Instance mask: 0 background, one positive integer per cell.
    region : (Y, X) array or None
        Non-zero where the field was annotated; None: everywhere.

    Raises
    ------
    ValueError
        The image is not one 2-D plane, the mask is not of integers, its shape differs
        from the image's, it has negative values, it marks no cell, or the region is
        empty or of another shape.
    """
    image, labels = np.squeeze(np.asarray(image)), np.squeeze(np.asarray(labels))
    if image.ndim != 2:
        raise ValueError(f"{name}: the image must be one 2-D plane, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"{name}: the image must be of real numbers, got {image.dtype}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not (np.issubdtype(labels.dtype, np.floating) and np.array_equal(labels, np.round(labels))):
            raise ValueError(
                f"{name}: the mask must hold integer cell labels (0 background), got {labels.dtype} values"
            )
    if labels.shape != image.shape:
        raise ValueError(f"{name}: the mask's shape {labels.shape} differs from the image's {image.shape}")
    if labels.min() < 0:
        raise ValueError(f"{name}: the mask has negative values; cell labels are 1, 2, ... and 0 background")
    if not labels.any():
        raise ValueError(f"{name}: the mask is empty (no cell labelled)")
    if region is None:
        annotated = np.ones(image.shape, bool)
    else:
        annotated = np.squeeze(np.asarray(region)) != 0
        if annotated.shape != image.shape:
            raise ValueError(
                f"{name}: the region's shape {annotated.shape} differs from the image's {image.shape}"
            )
        if not annotated.any():
            raise ValueError(f"{name}: the region is empty (nothing marked as annotated)")
    return Annotation(name, image.astype(np.float32), labels.astype(np.int32), annotated)


def validation_split(region: np.ndarray, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Split an annotated region into a training part and a held-out validation strip.

    The strip is the last ``fraction`` of the region's bounding box along its longer
    side (the right or bottom end), so that the two parts are contiguous blocks.

    Returns
    -------
    train, validation : (Y, X) bool
    """
    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    strip = np.zeros_like(region, dtype=bool)
    if right - left >= bottom - top:
        strip[:, right - max(round((right - left) * fraction), 1) :] = True
    else:
        strip[bottom - max(round((bottom - top) * fraction), 1) :, :] = True
    return region & ~strip, region & strip


# ------------------------------------------------------------------------- reading


def _is_zarr(source: Path) -> bool:
    return source.is_dir() and any((source / name).is_file() for name in ("zarr.json", ".zattrs"))


def _tiff_pairs(folder: Path) -> list[tuple[Path, Path, Path | None]]:
    """``(image, mask, region or None)`` for every ``NAME_masks.tif`` in ``folder``."""
    pairs = []
    for mask in sorted(p for p in folder.iterdir() if p.suffix.lower() in _TIFF_SUFFIXES):
        if not mask.stem.endswith("_masks"):
            continue
        stem = mask.stem[: -len("_masks")]
        images = [
            folder / f"{stem}{suffix}" for suffix in _TIFF_SUFFIXES if (folder / f"{stem}{suffix}").is_file()
        ]
        if not images:
            raise ValueError(f"{mask}: no image {stem}.tif beside this mask")
        regions = [
            folder / f"{stem}_region{suffix}"
            for suffix in _TIFF_SUFFIXES
            if (folder / f"{stem}_region{suffix}").is_file()
        ]
        pairs.append((images[0], mask, regions[0] if regions else None))
    return pairs


def _zarr_fields(plate: Path) -> list[tuple[str, Path]]:
    """``(well, field path)`` of every field of a plate with an ``annotations`` label image."""
    fields = []
    for well in zarr.open_group(str(plate), mode="r").attrs["ome"]["plate"]["wells"]:
        for field in ngff.field_indices(plate, well["path"].replace("/", "")):
            path = plate / well["path"] / str(field)
            if (path / "labels" / ZARR_LABEL).is_dir():
                fields.append((well["path"].replace("/", ""), path))
    return fields


def annotation_files(sources: Iterable[str | Path]) -> list[Path]:
    """Every file that annotations of ``sources`` are read from (for a rerun digest)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if _is_zarr(source):
            for _, field in _zarr_fields(source):
                for name in (ZARR_LABEL, ZARR_REGION):
                    if (field / "labels" / name).is_dir():
                        files += sorted(p for p in (field / "labels" / name).rglob("*") if p.is_file())
        elif source.is_dir():
            for image, mask, region in _tiff_pairs(source):
                files += [image, mask] + ([region] if region else [])
        else:
            raise FileNotFoundError(
                f"annotations not found: {source} (a folder of TIFF pairs or an .ome.zarr)"
            )
    return files


def annotations_digest(sources: Iterable[str | Path]) -> str:
    """sha256 over the contents of every annotation file of ``sources`` and their names
    within their source (moving a run folder changes nothing)."""
    digest = hashlib.sha256()
    for source in map(Path, sources):
        for path in annotation_files([source]):
            digest.update(path.relative_to(source).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _zarr_plane(path: Path, channel: int) -> np.ndarray:
    """The full-resolution level of an NGFF image: ``channel``'s middle Z plane of a
    (t, c, z, y, x) array, or the (y, x) plane of an image with fewer axes."""
    attributes = zarr.open_group(str(path), mode="r").attrs
    multiscales = attributes.get("ome", attributes)["multiscales"]  # NGFF 0.5, or 0.4 (no "ome")
    array = zarr.open_array(str(path / multiscales[0]["datasets"][0]["path"]), mode="r")
    if array.ndim == 5:
        return np.asarray(array[0, channel, array.shape[2] // 2])
    return np.squeeze(np.asarray(array[...]))


def read_annotations(sources: Sequence[str | Path], channel: int = 0) -> list[Annotation]:
    """Read and check every annotated field of ``sources`` (folders of TIFF pairs or
    plates' OME-Zarr; ``channel`` is the image channel of OME-Zarr fields).

    Raises
    ------
    ValueError
        A source holds no annotation, or an annotation fails :func:`check_annotation`.
    """
    annotations = []
    for source in map(Path, sources):
        found = []
        if _is_zarr(source):
            for well, field in _zarr_fields(source):
                labels_dir = field / "labels"
                region = labels_dir / ZARR_REGION
                found.append(
                    check_annotation(
                        f"{source.name} {well} field {field.name}",
                        _zarr_plane(field, channel),
                        _zarr_plane(labels_dir / ZARR_LABEL, 0),
                        _zarr_plane(region, 0) if region.is_dir() else None,
                    )
                )
        elif source.is_dir():
            for image, mask, region in _tiff_pairs(source):
                found.append(
                    check_annotation(
                        str(mask),
                        tifffile.imread(image),
                        tifffile.imread(mask),
                        tifffile.imread(region) if region else None,
                    )
                )
        else:
            raise FileNotFoundError(
                f"annotations not found: {source} (a folder of TIFF pairs or an .ome.zarr)"
            )
        if not found:
            raise ValueError(
                f"{source}: no annotated field (expected NAME.tif + NAME_masks.tif pairs, or fields with an "
                f"NGFF label image named {ZARR_LABEL!r})"
            )
        annotations += found
    return annotations
