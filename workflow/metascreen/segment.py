"""Label-free instance segmentation of unlabelled cells and its evaluation.

In brightfield and phase contrast a cell is both darker (body, rim) and brighter (halo,
lamella) than the background, so a raw-intensity threshold cannot find it. Instead
:func:`segment_label_free` finds cells by their local *texture*: after dividing out the
smooth illumination and denoising lightly, the local standard deviation is high wherever
there is structure and stays at the noise floor on empty background. The threshold is
set from the robust statistics of that texture map (the background dominates a field),
so it adapts to noise and contrast and gives no objects on an empty field.

Touching cells are split by a marker-controlled watershed. Distance-transform peaks of
the foreground alone proved poor seeds on the synthetic plates (AP@0.5 ~0.6-0.8: the
halo merges neighbours into one convex blob), so the seeds are the cell *bodies*, which
differ from the background in one consistent polarity (dark in phase contrast) and are
cut apart by the thin bright line between touching cells; a body that still holds two
cells is split at the neck of its distance transform (h-maxima).

:func:`match_instances` scores a segmentation against ground truth with the
StarDist/Cellpose average precision ``AP = TP / (TP + FP + FN)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.morphology import disk, h_maxima, remove_small_objects
from skimage.segmentation import relabel_sequential, watershed

__all__ = ["match_instances", "segment_label_free"]

_MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation for Gaussian data
# out-of-focus rescue: texture is also measured at this multiple of texture_sigma, and a
# coarse object replaces the fine-scale mask when less than this fraction of it is
# fine-scale foreground (in focus, the fine mask covers ~70-80 % of the coarse object)
_COARSE_SCALE = 2.0
_MIN_FINE_COVER = 0.5


def segment_label_free(
    image: np.ndarray,
    *,
    background_size: int = 64,
    denoise_sigma: float = 1.0,
    texture_sigma: float = 2.0,
    threshold: float = 4.0,
    min_contrast: float = 0.005,
    shrink: float = 6.0,
    min_area: int = 120,
    max_area: int | None = None,
    core_threshold: float = 3.0,
    marker_opening_radius: int = 2,
    marker_min_area: int = 60,
    marker_h: float = 3.0,
    marker_min_distance: int = 7,
) -> np.ndarray:
    """Segment unlabelled cells in a brightfield / phase-contrast field.

    1. *Flat field*: divide by a box-filtered background, subtract 1, Gaussian-denoise:
       ``flat`` is ~0 on background and cell contrast is a fraction of the background.
    2. *Foreground from texture*: local standard deviation of ``flat``, thresholded at
       ``median + threshold * robust SD`` of that map (never below ``min_contrast``);
       holes filled, objects smaller than ``min_area`` dropped. The same at twice
       ``texture_sigma`` rescues blurred (out-of-focus) cells: a coarse object replaces
       the fine mask where the fine mask covers less than half of it. Finally
       ``shrink`` px are peeled off, undoing the widening by the window and the halo.
    3. *Seeds*: the sign of the cell body's contrast is taken from the data (that of
       the shrunk foreground's median of ``flat``). Foreground pixels deviating that
       way by more than ``core_threshold`` background-noise SDs are "body" pixels;
       within the shrunk foreground they are seed "cores". An opening of radius
       ``marker_opening_radius`` cuts cores of touching cells apart and cores under
       ``marker_min_area`` px are dropped. A core whose (lightly smoothed)
       distance transform has several h-maxima of height ``marker_h`` is split at its
       necks (touching cells with no line between them); finally seeds whose centroids
       lie within ``marker_min_distance`` px are merged. Foreground without a core
       (halo-only debris) is left unlabelled.
    4. *Split*: watershed of the polarity-corrected ``flat`` from the seeds within the
       shrunk foreground plus the body pixels (thin tails and lamellae that the shrink
       peeled off), so boundaries follow the bright line between touching cells;
       objects outside ``[min_area, max_area]`` dropped; relabelled 1..n.

    On the synthetic plates (:mod:`metascreen.synth`) the defaults give AP@0.5 ~0.97
    (mean matched IoU ~0.84) on in-focus fields and ~0.8 on strongly defocused ones,
    in ~0.13 s per 512 x 512 field.

    Parameters
    ----------
    image : (Y, X) array of any real dtype
        One field. Multiplicative uneven illumination is removed by step 1.
    background_size : int
        Side (px) of the box filter that estimates the illumination; several cell
        diameters so that cells barely bias it. Default 64.
    denoise_sigma : float
        Gaussian sigma (px) applied to the flat-fielded image; suppresses pixel noise,
        keeps cell-scale structure. Default 1.0.
    texture_sigma : float
        Gaussian sigma (px) of the window of the local standard deviation; larger gives
        smoother, wider masks. Default 2.0.
    threshold : float
        How many robust SDs (1.4826 * MAD) above the median of the texture map a
        pixel must be to be foreground. Default 4.0.
    min_contrast : float
        Floor on the texture threshold, as a fraction of the background level
        (0.005 = 0.5 %), so constant or noise-free images give no foreground.
        Default 0.005.
    shrink : float
        Distance (px) peeled off the foreground, which the texture window and the phase
        halo make wider than the cell. Default 6.0.
    min_area : int
        Smallest object (px) kept, before and after splitting; removes debris, specks
        and slivers. Default 120 (the smallest synthetic cell is ~250 px).
    max_area : int or None
        Largest object (px) kept after splitting (e.g. to drop unsplit clumps); None
        keeps all. Default None.
    core_threshold : float
        How far (in background-noise SDs of ``flat``) a pixel must deviate in the cell
        body's polarity to belong to a seed core. Default 3.0.
    marker_opening_radius : int
        Radius (px) of the disk opening of the cores: bridges between cores narrower
        than about twice this are cut, so touching cells get separate seeds. Default 2.
    marker_min_area : int
        Cores smaller than this (px) are no seeds (granules, debris blobs, noise).
        Default 60.
    marker_h : float
        Depth (px of distance transform) a neck between two peaks of a core must have
        for the core to be split there; lower splits more, elongated cells need ~3.
        Default 3.0.
    marker_min_distance : int
        Seeds whose centroids are closer than this (px) are merged into one, so one
        cell whose core broke up is not split; cell centres are >= ~15 px apart.
        Default 7.

    Returns
    -------
    labels : (Y, X) int32
        0 background, 1..n cells.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (Y, X), got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must have a real numeric dtype, got {image.dtype}")
    image = image.astype(np.float32)

    background = ndi.uniform_filter(image, background_size, mode="reflect")
    flat = np.divide(image, background, out=np.ones_like(image), where=background > 0) - 1.0
    flat = ndi.gaussian_filter(flat, denoise_sigma)
    foreground = _textured(flat, texture_sigma, threshold, min_contrast, min_area)
    # blurred (out-of-focus) cells only stand out at a coarser scale: take the coarse
    # objects that the fine scale mostly misses
    coarse = _textured(flat, _COARSE_SCALE * texture_sigma, threshold, min_contrast, min_area)
    coarse = ndi.label(coarse)[0]
    covered = np.bincount(coarse.ravel(), foreground.ravel()) / np.bincount(coarse.ravel())
    foreground |= (coarse > 0) & (covered[coarse] < _MIN_FINE_COVER)
    shrunk = ndi.distance_transform_edt(foreground) > shrink
    if not shrunk.any() or foreground.all():  # nothing found, or no background to refer to
        return np.zeros(image.shape, np.int32)

    level, noise = _robust_location_scale(flat[~foreground])
    # make the cell body negative whatever the modality (dark phase / bright brightfield)
    body = (flat - level) * (-1.0 if np.median(flat[shrunk]) > level else 1.0)
    dark = foreground & (body < -core_threshold * noise)
    core = ndi.binary_opening(shrunk & dark, disk(marker_opening_radius))
    core = remove_small_objects(ndi.binary_fill_holes(core), max_size=marker_min_area - 1)
    seeds = _merge_close_seeds(_split_necks(ndi.label(core)[0], marker_h), marker_min_distance)
    # body pixels peeled off by the shrink (thin tails, lamellae) belong to the cell
    labels = watershed(body, seeds, mask=shrunk | dark)

    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    if max_area is not None:
        keep &= areas <= max_area
    keep[0] = False
    return relabel_sequential(np.where(keep[labels], labels, 0).astype(np.int32))[0]


def _split_necks(cores: np.ndarray, h: float) -> np.ndarray:
    """Split labelled cores at necks of their distance map deeper than ``h`` px."""
    # the light smoothing breaks ties between the equal-height peaks that a digital
    # ridge produces; h-maxima would otherwise keep them all
    depth = ndi.gaussian_filter(ndi.distance_transform_edt(cores > 0), 1.0)
    peaks = np.zeros(cores.shape, bool)
    # h-maxima core by core: a reconstruction over the whole field costs 4x more
    for index, window in enumerate(ndi.find_objects(cores), start=1):
        own = cores[window] == index
        peaks[window] |= own & h_maxima(np.where(own, depth[window], 0.0), h).astype(bool)
    split = watershed(-depth, ndi.label(peaks, structure=np.ones((3, 3)))[0], mask=cores > 0)
    # cores too thin to have a peak of height h stay whole
    return relabel_sequential(np.where(split > 0, split + cores.max(), cores))[0]


def _merge_close_seeds(seeds: np.ndarray, min_distance: float) -> np.ndarray:
    """Give seeds whose centroids lie closer than ``min_distance`` one common label."""
    n_seeds = int(seeds.max())
    if n_seeds < 2:
        return seeds
    centroids = np.asarray(ndi.center_of_mass(seeds > 0, seeds, np.arange(1, n_seeds + 1)))
    pairs = cKDTree(centroids).query_pairs(min_distance, output_type="ndarray")
    graph = coo_array((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_seeds, n_seeds))
    group = connected_components(graph, directed=False)[1]
    return np.concatenate([[0], group + 1])[seeds]


def _textured(
    flat: np.ndarray, sigma: float, threshold: float, min_contrast: float, min_area: int
) -> np.ndarray:
    """Hole-filled objects of >= ``min_area`` px of high local standard deviation."""
    local_mean = ndi.gaussian_filter(flat, sigma)
    texture = np.sqrt(np.clip(ndi.gaussian_filter(flat * flat, sigma) - local_mean**2, 0.0, None))
    median, spread = _robust_location_scale(texture)
    foreground = ndi.binary_fill_holes(texture > max(median + threshold * spread, min_contrast))
    return remove_small_objects(foreground, max_size=min_area - 1)


def _robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation of an array."""
    median = float(np.median(values))
    return median, _MAD_TO_SD * float(np.median(np.abs(values - median)))


def match_instances(
    true_labels: np.ndarray, pred_labels: np.ndarray, *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Match predicted to true instances by IoU and score them.

    A pair matches when its intersection over union is strictly above
    ``iou_threshold``. For thresholds >= 0.5 a true object can overlap at most one
    prediction that much (and vice versa), so matching is unique without an
    assignment step. Intersections come from counting (true, pred) label pairs.

    Parameters
    ----------
    true_labels, pred_labels : (Y, X) integer arrays
        Instance labels, 0 = background.
    iou_threshold : float
        In [0.5, 1). Default 0.5.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int counts); ``ap`` = TP / (TP + FP + FN) (1.0 when both
        images are empty); ``precision`` and ``recall`` (1.0 when undefined);
        ``mean_matched_iou`` over the true positives (NaN when there are none).
    """
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"shape mismatch: {true_labels.shape} vs {pred_labels.shape}")
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in [0.5, 1), got {iou_threshold!r}")
    true_flat = true_labels.ravel().astype(np.int64)
    pred_flat = pred_labels.ravel().astype(np.int64)
    true_area = np.bincount(true_flat)
    pred_area = np.bincount(pred_flat)
    n_true, n_pred = int(np.count_nonzero(true_area[1:])), int(np.count_nonzero(pred_area[1:]))

    # intersections of every overlapping (true, pred) object pair, sparse
    both = (true_flat > 0) & (pred_flat > 0)
    key, inter = np.unique(true_flat[both] * pred_area.size + pred_flat[both], return_counts=True)
    t, p = np.divmod(key, pred_area.size)
    iou = inter / (true_area[t] + pred_area[p] - inter)
    matched = iou > iou_threshold

    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "ap": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "mean_matched_iou": float(iou[matched].mean()) if tp else float("nan"),
    }
