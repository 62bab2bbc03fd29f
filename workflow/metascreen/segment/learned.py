"""The learned label-free segmenter: shipped U-Net weights, scale and cell recovery.

A field is normalised (1st-99th percentile, so its dtype and exposure do not matter),
resized so that its cells reach the diameter the network was trained at (recorded
with its weights; :data:`TRAIN_DIAMETER` for new training), predicted in overlapping tiles
(:mod:`metascreen.segment.tiling`), and its cells recovered from the foreground and
normalised-distance maps (:mod:`metascreen.segment.instances`). Polarity (dark or
bright cells, halos of either sign) is learned: the network was trained with
intensity inversion.

The cell diameter comes from the user (px) or from :func:`estimate_cell_diameter`,
which, like Cellpose's size model, looks at the images: it segments a few fields at a
ladder of scales and keeps the scale at which the cells found are closest to the
training diameter. A field of a different scale than trained therefore does not
silently give nothing.

The weights shipped with the package (``weights/learned.safetensors``) were trained
from scratch on the synthetic world of :mod:`metascreen.styles` by
``metascreen pretrain-segmenter`` (:mod:`metascreen.segment.train`); their metadata
(styles, seeds, data hash, metrics, versions) sits beside them in ``learned.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metascreen.model import select_device
from metascreen.segment._common import check_image
from metascreen.segment.instances import equivalent_diameters, recover_instances
from metascreen.segment.metrics import pooled_ap
from metascreen.segment.network import UNet, load_network
from metascreen.segment.tiling import normalize_percentile, predict_tiled

__all__ = [
    "SHIPPED_WEIGHTS",
    "TRAIN_DIAMETER",
    "central_window",
    "estimate_cell_diameter",
    "load_segmenter",
    "segment_learned",
    "segment_with_network",
    "smallest_cell_area",
    "trained_diameter",
]

#: Equivalent cell diameter (px) that training brings cells to. Each weights file records
#: the one its network learned (``train_diameter``), and inference resizes fields to that.
TRAIN_DIAMETER = 17.5
#: The weights trained by ``metascreen pretrain-segmenter`` and shipped in the package.
SHIPPED_WEIGHTS = Path(__file__).with_name("weights") / "learned.safetensors"
# assumed diameters tried by the scale estimate: 10-160 px in steps of sqrt(2)
_DIAMETER_LADDER = tuple(10.0 * 2.0 ** (k / 2.0) for k in range(9))
_MIN_CELLS_FOR_ESTIMATE = 5


@functools.lru_cache(maxsize=4)
def load_segmenter(
    weights: str | None = None, device: str = "auto"
) -> tuple[UNet, dict[str, Any], torch.device]:
    """The network of ``weights`` (default: the shipped ones) on ``device``, loaded once
    per process; its metadata; the device."""
    target = select_device(device)
    network, metadata = load_network(weights or SHIPPED_WEIGHTS, target)
    # channels-last convolutions: ~25 % faster on CPU (oneDNN) and on CUDA under autocast
    return network.to(memory_format=torch.channels_last), metadata, target


def trained_diameter(metadata: dict[str, Any]) -> float:
    """The equivalent cell diameter (px) a network was trained at, from its weights'
    metadata (``train_diameter``; :data:`TRAIN_DIAMETER` where a file does not record it)."""
    return float(metadata.get("train_diameter", TRAIN_DIAMETER))


def segment_learned(
    image: np.ndarray,
    *,
    cell_diameter: float | str = "auto",
    foreground_threshold: float = 0.5,
    boundary_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_area_fraction: float = 0.1,
    tile_size: int = 1024,
    augment: bool = False,
    device: str = "auto",
    precision: str = "auto",
    weights: str | None = None,
) -> np.ndarray:
    """Segment unlabelled cells (brightfield, phase contrast, DIC) with the learned network.

    Parameters
    ----------
    image : (Y, X) array of any real dtype
        One field.
    cell_diameter : float or "auto"
        Typical equivalent cell diameter in px; the field is resized by the weights'
        training diameter (:func:`trained_diameter`) over ``cell_diameter``. ``"auto"``
        estimates it from this field (:func:`estimate_cell_diameter`); the workflow
        estimates it once per plate instead, from a sample of fields. Default ``"auto"``.
    foreground_threshold, boundary_threshold, seed_threshold : float
        Probability thresholds of the foreground, of the contact boundary that cuts
        touching cells apart, and of the normalised distance a seed must reach
        (:func:`metascreen.segment.instances.recover_instances`). Default 0.5.
    min_area_fraction : float
        Objects smaller than this fraction of the area of a cell of ``cell_diameter``
        are dropped (debris, fragments). Default 0.1.
    tile_size : int
        Largest tile side (px, at the network's scale); bigger tiles repeat less of
        their overlap and use more memory. Default 1024.
    augment : bool
        Test-time augmentation: average the network's outputs over the field and its
        three mirror images (:func:`~metascreen.segment.tiling.predict_tiled`). Four
        times the network's time, for a higher AP on some looks and a lower one on others
        (README, "Segmentation backends"). Default False.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda[:n]``.
    precision : {"auto", "float32"}
        ``auto``: bfloat16 autocast on CUDA and on CPUs with native bfloat16 (about twice
        as fast), float32 elsewhere; ``float32``: float32 on every device, for the same
        cells whichever node runs a field (:data:`~metascreen.segment.tiling.PRECISIONS`).
        Default ``auto``.
    weights : str or None
        A safetensors file written by ``metascreen pretrain-segmenter`` (or
        fine-tuning); None: the shipped weights.

    Returns
    -------
    labels : (Y, X) int32
        0 background, 1..n cells.
    """
    image = check_image(image)
    network, metadata, target = load_segmenter(weights, device)
    if cell_diameter == "auto":
        estimate = estimate_cell_diameter([image], weights=weights, device=device, precision=precision)
        cell_diameter = estimate["cell_diameter"]
        if not np.isfinite(cell_diameter):  # no scale finds cells: an empty field
            return np.zeros(image.shape, np.int32)
    if isinstance(cell_diameter, str) or not cell_diameter > 0:
        raise ValueError(f"cell_diameter must be > 0 px, got {cell_diameter!r}")
    return segment_with_network(
        network,
        target,
        image,
        float(cell_diameter),
        train_diameter=trained_diameter(metadata),
        min_area_fraction=min_area_fraction,
        tile_size=tile_size,
        augment=augment,
        precision=precision,
        foreground_threshold=foreground_threshold,
        boundary_threshold=boundary_threshold,
        seed_threshold=seed_threshold,
    )


def segment_with_network(
    network: UNet,
    device: torch.device,
    image: np.ndarray,
    cell_diameter: float,
    *,
    train_diameter: float = TRAIN_DIAMETER,
    min_area_fraction: float = 0.1,
    tile_size: int = 1024,
    augment: bool = False,
    precision: str = "auto",
    **thresholds: float,
) -> np.ndarray:
    """Labels of ``image`` segmented by ``network`` (on ``device``, at ``precision``; fused
    for inference, :meth:`~metascreen.segment.network.UNet.fused`; trained at
    ``train_diameter``) at ``cell_diameter``, as :func:`segment_learned` does with weights
    from a file; ``thresholds`` of :func:`~metascreen.segment.instances.recover_instances`."""
    maps = predict_tiled(
        network,
        normalize_percentile(image),
        factor=train_diameter / cell_diameter,
        device=device,
        tile_size=tile_size,
        augment=augment,
        precision=precision,
    )
    min_area = smallest_cell_area(cell_diameter, min_area_fraction)
    return recover_instances(*maps, min_area=min_area, **thresholds)


def smallest_cell_area(cell_diameter: float, min_area_fraction: float = 0.1) -> int:
    """Area (px, at least 4) under which an object is dropped: ``min_area_fraction`` of the
    area of a disc of ``cell_diameter``."""
    return max(int(min_area_fraction * np.pi / 4.0 * cell_diameter**2), 4)


def central_window(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` px of a 2-D array (all of it along a shorter side)."""
    top, left = (max((extent - size) // 2, 0) for extent in image.shape)
    return image[top : top + size, left : left + size]


def estimate_cell_diameter(
    images: Sequence[np.ndarray],
    *,
    weights: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    window: int = 512,
) -> dict[str, Any]:
    """Estimate the typical equivalent cell diameter (px) of a set of fields.

    Only the central ``window`` x ``window`` px of each field are used (the smallest
    assumed diameter enlarges them 1.75-fold for the shipped weights). Each field is segmented assuming
    diameters from 10 to 160 px (steps of sqrt 2); at each step the median equivalent
    diameter of the cells found, pooled over the fields, is compared with the
    assumption, and the cells with those of the next step (AP@0.5 between the two
    segmentations: their *agreement*).

    The estimate is a *stable fixed point*: an assumption that the cells confirm,
    where they come out larger than assumed at one step and smaller at the next
    (interpolated in log scale between the two). A field usually has several such
    crossings, and the right one is where the network finds the same cells at both
    steps: an assumption far too large shrinks a field until the network draws blobs
    of its training size over groups of cells, one far too small cuts cells into
    pieces of that size, and either may cross the assumption by chance, but the
    groups and pieces change from one step to the next while real cells do not. So
    the crossing of highest agreement wins. Both steps need at least 5 cells.
    Without any crossing (cells beyond the ladder) the assumption whose cells come
    closest to it is taken, and the median diameter found there is the estimate.

    ``weights``, ``device`` and ``precision`` are those of :func:`segment_learned`.

    Returns
    -------
    dict
        ``cell_diameter`` (px; NaN when no assumed scale found 5 cells), ``n_cells``
        it rests on, ``rule`` (``"fixed point"``, ``"closest"`` or None), and
        ``ladder``: per assumed diameter the cells found, their median diameter and
        their agreement with the next step (None at the last).
    """
    network, metadata, target = load_segmenter(weights, device)
    train_diameter = trained_diameter(metadata)
    fields = [central_window(check_image(image), window) for image in images]
    ladder: list[dict[str, Any]] = []
    previous: list[np.ndarray] = []
    for assumed in _DIAMETER_LADDER:
        segmented = [
            segment_with_network(
                network, target, field, assumed, train_diameter=train_diameter, precision=precision
            )
            for field in fields
        ]
        diameters = np.concatenate([equivalent_diameters(labels) for labels in segmented])
        if ladder:
            ladder[-1]["agreement"] = pooled_ap(list(zip(previous, segmented, strict=True)))
        found = float(np.median(diameters)) if diameters.size else float("nan")
        ladder.append(
            {"assumed": assumed, "n_cells": int(diameters.size), "median_diameter": found, "agreement": None}
        )
        previous = segmented
    for rule, choose in (("fixed point", _stable_fixed_point), ("closest", _closest_to_assumption)):
        estimate = choose(ladder)
        if estimate is not None:
            return {"cell_diameter": estimate[0], "n_cells": estimate[1], "rule": rule, "ladder": ladder}
    return {"cell_diameter": float("nan"), "n_cells": 0, "rule": None, "ladder": ladder}


def _stable_fixed_point(ladder: list[dict[str, Any]]) -> tuple[float, int] | None:
    """The diameter where the cells found cross the assumption from above to below at the
    steps of highest agreement (:func:`estimate_cell_diameter`), and the cells it rests
    on; None without such a crossing."""
    best, best_agreement = None, -1.0
    for low, high in zip(ladder, ladder[1:], strict=False):
        if min(low["n_cells"], high["n_cells"]) < _MIN_CELLS_FOR_ESTIMATE:
            continue
        above = np.log(low["median_diameter"] / low["assumed"])
        below = np.log(high["median_diameter"] / high["assumed"])
        if above >= 0.0 > below and low["agreement"] > best_agreement:
            step = np.log(high["assumed"] / low["assumed"])
            crossing = float(low["assumed"] * np.exp(step * above / (above - below)))
            best, best_agreement = (crossing, min(low["n_cells"], high["n_cells"])), low["agreement"]
    return best


def _closest_to_assumption(ladder: list[dict[str, Any]]) -> tuple[float, int] | None:
    """The median diameter found at the assumption it comes closest to (in log ratio), and
    its cells; None where no assumption found enough cells."""
    usable = [row for row in ladder if row["n_cells"] >= _MIN_CELLS_FOR_ESTIMATE]
    if not usable:
        return None
    row = min(usable, key=lambda row: abs(np.log(row["median_diameter"] / row["assumed"])))
    return row["median_diameter"], row["n_cells"]
