"""Label-free instance segmentation of unlabelled cells and its evaluation.

In brightfield and phase contrast a cell is both darker (body, rim) and brighter (halo,
lamella) than the background, so a raw-intensity threshold cannot find it. Instead
:func:`segment_label_free` finds cells by their local *texture*: after dividing out the
smooth illumination and denoising lightly, the local standard deviation is high wherever
there is structure and stays at the noise floor on empty background. The threshold is
set from the robust statistics of that texture map (the background dominates a field),
so it adapts to noise and contrast and gives no objects on an empty field. Touching
cells are split by a marker-controlled watershed on the distance transform.

:func:`match_instances` scores a segmentation against ground truth with the
StarDist/Cellpose average precision ``AP = TP / (TP + FP + FN)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima, remove_small_objects
from skimage.segmentation import relabel_sequential, watershed

__all__ = ["match_instances", "segment_label_free"]

_MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation for Gaussian data


def segment_label_free(
    image: np.ndarray,
    *,
    background_size: int = 64,
    denoise_sigma: float = 1.0,
    texture_sigma: float = 2.0,
    threshold: float = 6.0,
    min_contrast: float = 0.005,
    shrink: float = 2.0,
    min_area: int = 150,
    max_area: int | None = None,
    marker_h: float = 2.0,
    marker_min_distance: int = 5,
) -> np.ndarray:
    """Segment unlabelled cells in a brightfield / phase-contrast field.

    Steps: flat-field (divide by a box-filtered background, subtract 1) -> Gaussian
    denoise -> local standard deviation -> threshold at ``median + threshold * robust
    SD`` of that map (never below ``min_contrast``) -> fill holes -> drop objects
    smaller than ``min_area`` -> peel ``shrink`` px off the mask -> watershed of the
    negated distance transform from h-maxima markers -> drop fragments smaller than
    ``min_area`` and (optionally) objects larger than ``max_area`` -> relabel 1..n.

    Parameters
    ----------
    image : (Y, X) array of any real dtype
        One field. Multiplicative uneven illumination is removed by the flat-field step.
    background_size : int
        Side (px) of the box filter that estimates the illumination; several cell
        diameters so that cells barely bias it. Default 64.
    denoise_sigma : float
        Gaussian sigma (px) applied to the flat-fielded image before measuring
        texture; suppresses pixel noise, keeps cell-scale structure. Default 1.0.
    texture_sigma : float
        Gaussian sigma (px) of the window of the local standard deviation. Larger
        windows give smoother, wider masks. Default 2.0.
    threshold : float
        How many robust standard deviations (1.4826 * MAD) above the median of the
        texture map a pixel must be to be foreground. Default 6.0.
    min_contrast : float
        Floor on the texture threshold, in units of the background level (0.005 = 0.5 %),
        so noise-free or constant images give no foreground. Default 0.005.
    shrink : float
        Distance (px) peeled off the foreground: the texture window and the phase halo
        make the raw mask that much wider than the cell. Default 2.0.
    min_area : int
        Smallest object (px) kept, before and after splitting; removes debris, specks
        and watershed slivers. Default 150 (the smallest synthetic cell is ~250 px).
    max_area : int or None
        Largest object (px) kept after splitting (e.g. to drop unsplit clumps); None
        keeps all. Default None.
    marker_h : float
        Minimum height (px of distance) of a distance-transform maximum above its
        surroundings to seed its own cell; lower splits more. Default 2.0.
    marker_min_distance : int
        Distance maxima closer than this (px) are merged into one seed, so a ridge
        along an elongated cell gives one marker. Default 5.

    Returns
    -------
    labels : (Y, X) int32
        0 background, 1..n cells.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (Y, X), got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"image must be real-valued, got dtype {image.dtype}")
    image = image.astype(np.float32)

    background = ndi.uniform_filter(image, background_size, mode="reflect")
    flat = np.divide(image, background, out=np.ones_like(image), where=background > 0) - 1.0
    flat = ndi.gaussian_filter(flat, denoise_sigma)
    mean = ndi.gaussian_filter(flat, texture_sigma)
    texture = np.sqrt(np.clip(ndi.gaussian_filter(flat * flat, texture_sigma) - mean * mean, 0, None))

    median = np.median(texture)
    spread = _MAD_TO_SD * np.median(np.abs(texture - median))
    foreground = texture > max(median + threshold * spread, min_contrast)
    foreground = remove_small_objects(ndi.binary_fill_holes(foreground), max_size=min_area - 1)

    distance = ndi.distance_transform_edt(foreground)
    mask = distance > shrink
    # merge near-by maxima (ridges of elongated cells) before picking h-maxima
    peaks = h_maxima(ndi.grey_dilation(distance, size=marker_min_distance) * mask, marker_h)
    markers = ndi.label(peaks & mask)[0]
    labels = watershed(-distance, markers, mask=mask)

    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    if max_area is not None:
        keep &= areas <= max_area
    keep[0] = False
    return relabel_sequential(np.where(keep[labels], labels, 0).astype(np.int32))[0]


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
