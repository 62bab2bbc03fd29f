"""Training targets for the segmentation network and cells recovered from its output.

Representation: **foreground, normalised distance to the cell's own border, and the
contact boundary between touching cells**.

* Cellpose's flows split touching cells of any shape but need an iterative flow
  integration (hundreds of steps over every foreground pixel) to recover masks, which
  is where much of its CPU time goes.
* StarDist's star-convex polygons are fast and excellent for round cells and nuclei,
  but cannot describe a cell with long thin processes (neurites, tails), common in
  label-free images of adherent cells.
* Seeds cut out of the foreground by a predicted *contact boundary* (the pixels of a
  cell that touch another cell) separate touching cells of any shape, and a per-cell
  *normalised* distance transform (1 at the cell's deepest point, 0 at its border)
  tells a cell's body from a piece of a process that the boundary cut off: only
  pieces reaching a high distance seed a cell. A watershed of ``-distance`` from the
  seeds over the foreground restores each cell's full extent, processes included.
  Recovery is thresholds, one connected-components labelling and one watershed:
  linear in the pixels, no iteration. From perfect maps, made at the training scale and
  resized back as the network's outputs are (:func:`metascreen.segment.train.perfect_maps_ap`),
  it gives back AP@0.5 0.985 of the synthetic truth on average over the pretraining
  styles, 0.95-0.97 for neurites (seeds from the distance alone, without the boundary:
  0.85-0.89 on spread and confluent cells, whose irregular shapes have several lobes of
  high normalised distance).

Pure functions on numpy arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from metascreen.segment._common import relabel_kept

__all__ = ["equivalent_diameters", "recover_instances", "training_targets"]

# normalised distance at or below which a pixel never joins a seed: cuts touching cells
# apart along the distance valley between them where the predicted boundary is faint
# (chosen on validation seeds of the synthetic styles, used neither for training nor for the
# reported figures: mean AP@0.5 of the shipped network 0.58 at 0.1, 0.76 at 0.35; from perfect
# maps it costs neurites a little, which have thin parts between lobes: 0.97 -> 0.91)
_VALLEY = 0.35


def training_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground, normalised distance and contact-boundary maps of an instance image.

    Parameters
    ----------
    labels : (Y, X) integer array
        Instances, 0 background.

    Returns
    -------
    foreground : (Y, X) float32
        1 inside cells, 0 outside.
    distance : (Y, X) float32
        Each cell pixel's Euclidean distance to the nearest pixel outside its own cell
        (background, or another cell), divided by that cell's largest such distance:
        at most 1 inside cells, 0 outside. Where two cells touch, the pixel row or
        column of the upper or left cell along the shared border counts as outside
        (distance 0), so the valley between them is one pixel wide.
    boundary : (Y, X) float32
        1 on cell pixels with a pixel of another cell among their 8 neighbours.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    inside = labels > 0
    # pixels whose right or lower neighbour belongs to another cell: the shared borders
    border = np.zeros_like(inside)
    border[:-1] |= (labels[:-1] != labels[1:]) & inside[1:] & inside[:-1]
    border[:, :-1] |= (labels[:, :-1] != labels[:, 1:]) & inside[:, 1:] & inside[:, :-1]
    depth = ndi.distance_transform_edt(inside & ~border)
    peak = ndi.maximum(depth, labels, np.arange(int(labels.max()) + 1))
    peak = np.asarray(peak, np.float64)
    peak[peak == 0] = 1.0
    distance = np.where(inside, depth / peak[labels], 0.0)
    # another cell within the 3 x 3 neighbourhood: the largest or smallest other label
    beyond = int(labels.max()) + 1
    larger = ndi.maximum_filter(labels, 3)
    smaller = ndi.minimum_filter(np.where(inside, labels, beyond), 3)
    boundary = inside & ((larger != labels) | ((smaller != labels) & (smaller != beyond)))
    return inside.astype(np.float32), distance.astype(np.float32), boundary.astype(np.float32)


def recover_instances(
    foreground: np.ndarray,
    distance: np.ndarray,
    boundary: np.ndarray,
    *,
    foreground_threshold: float = 0.5,
    boundary_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_area: int = 15,
) -> np.ndarray:
    """Label cells from predicted foreground, normalised-distance and boundary probabilities.

    The foreground (``foreground > foreground_threshold``) without the contact boundary
    (``boundary > boundary_threshold``) and without the pixels near a border
    (normalised distance <= 0.35) falls apart into one piece per cell body plus pieces
    of processes; pieces whose distance exceeds ``seed_threshold`` somewhere
    are the seeds. A watershed of ``-distance`` from the seeds fills the foreground;
    foreground regions without a seed (a faint cell whose distance never rose) become
    cells of their own. Cells under ``min_area`` px are dropped.

    Parameters
    ----------
    foreground, distance, boundary : (Y, X) float arrays
        Probabilities in [0, 1] (the network's sigmoid outputs).
    foreground_threshold, boundary_threshold, seed_threshold : float
        In (0, 1). Defaults 0.5.
    min_area : int
        Smallest cell kept (px). Default 15.

    Returns
    -------
    labels : (Y, X) int32
        0 background, 1..n cells.
    """
    if not foreground.shape == distance.shape == boundary.shape or foreground.ndim != 2:
        raise ValueError(
            f"maps must be 2-D of one shape: {foreground.shape}, {distance.shape}, {boundary.shape}"
        )
    mask = foreground > foreground_threshold
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    pieces, n_pieces = ndi.label(mask & (boundary <= boundary_threshold) & (distance > _VALLEY))
    peak = np.asarray(ndi.maximum(distance, pieces, np.arange(n_pieces + 1)))
    seeds = relabel_kept(pieces, peak > seed_threshold)
    n_seeds = int(seeds.max())
    labels = watershed(-distance, seeds, mask=mask) if n_seeds else np.zeros(mask.shape, np.int32)
    orphans, n_orphans = ndi.label(mask & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + n_seeds, labels)
    keep = np.bincount(labels.ravel()) >= min_area
    return relabel_kept(labels, keep)


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameter ``sqrt(4 area / pi)`` (px) of each cell of ``labels``."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    return np.sqrt(4.0 * areas[areas > 0] / np.pi)
