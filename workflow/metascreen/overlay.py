"""Pictures of a field's segmentation for people to judge it, and the numbers beside them.

Pure functions, arrays in, arrays (or PNG bytes in memory) out: the contrast stretch of a
plane, its outline overlay, PNG encoding, and a per-field summary of the labels. Used by
``metascreen preview`` and by the plate report's segmentation section.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.image import imsave
from skimage.segmentation import mark_boundaries
from skimage.util import img_as_ubyte

from metascreen.segment.instances import equivalent_diameters

__all__ = ["OUTLINE_COLOUR", "contrast_stretch", "encode_png", "outline_overlay", "segmentation_summary"]

#: RGB (0-1) of the cell outlines: magenta stands out on grey at any brightness.
OUTLINE_COLOUR = (1.0, 0.0, 1.0)


def contrast_stretch(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.5)) -> np.ndarray:
    """Map a 2-D image to ``[0, 1]`` between robust percentiles of its finite pixels.

    Parameters
    ----------
    image : (Y, X) array of any real dtype
        The plane; NaN pixels are shown as the low percentile.
    percentiles : (float, float)
        The percentiles mapped to 0 and 1 (percentiles, not min/max, so that one bright
        pixel does not blacken the image); values beyond them are clipped.

    Returns
    -------
    (Y, X) float64
        The stretched image; zeros for a flat or all-NaN image.
    """
    image = np.asarray(image, dtype=np.float64)
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, percentiles) if finite.size else (0.0, 0.0)
    return np.clip((np.nan_to_num(image, nan=low) - low) / (high - low or 1.0), 0.0, 1.0)


def outline_overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The outline of every labelled cell drawn on the contrast-stretched image.

    Parameters
    ----------
    image : (Y, X) array of any real dtype
        The segmented plane.
    labels : (Y, X) integer array
        Its instance labels, 0 background.

    Returns
    -------
    (Y, X, 3) uint8
        The image in grey (:func:`contrast_stretch`) with each cell's inner boundary
        (:func:`skimage.segmentation.find_boundaries`, ``mode="inner"``: touching cells
        keep an outline each) in :data:`OUTLINE_COLOUR`.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or ``labels`` has another shape.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 2 or labels.shape != image.shape:
        raise ValueError(f"image and labels must be 2-D of one shape, got {image.shape} and {labels.shape}")
    overlay = mark_boundaries(contrast_stretch(image), labels, color=OUTLINE_COLOUR, mode="inner")
    return img_as_ubyte(overlay)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a ``(Y, X)`` image in ``[0, 1]`` (shown grey) or a ``(Y, X, 3)`` uint8 RGB image.

    No "Software" metadata, so the bytes do not depend on the matplotlib version.
    """
    buffer = io.BytesIO()
    # cmap, vmin and vmax apply to 2-D images only; RGB pixels are written as they are
    imsave(buffer, image, cmap="gray", vmin=0.0, vmax=1.0, format="png", metadata={"Software": None})
    return buffer.getvalue()


def segmentation_summary(labels: np.ndarray) -> dict[str, float]:
    """How many cells a field's labels hold, how large they are and how much they cover.

    Parameters
    ----------
    labels : (Y, X) integer array
        Instance labels, 0 background (labels need not be consecutive).

    Returns
    -------
    dict
        ``cells``; ``median_area_px`` and ``median_diameter_px`` (the equivalent diameter
        ``sqrt(4 area / pi)``, as the learned segmenter's ``cell_diameter`` counts it),
        NaN without cells; ``covered_fraction``, the fraction of pixels inside a cell.
    """
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    cells = int(areas.size)
    return {
        "cells": cells,
        "median_area_px": float(np.median(areas)) if cells else float("nan"),
        "median_diameter_px": float(np.median(equivalent_diameters(labels))) if cells else float("nan"),
        "covered_fraction": float(np.count_nonzero(labels) / labels.size) if labels.size else 0.0,
    }
