"""Helpers shared by the segmentation backends."""

from __future__ import annotations

import numpy as np


def check_image(image: np.ndarray) -> np.ndarray:
    """A 2-D real image as float32 (a copy; the input is never modified)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (Y, X), got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must have a real numeric dtype, got {image.dtype}")
    return image.astype(np.float32)


def relabel_kept(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with ``keep[label]`` renumbered 1..n in their order, the others 0 (int32).

    ``relabel_sequential`` of the filtered labels, from one lookup table (no np.unique).
    """
    keep = keep.copy()
    keep[0] = False
    lookup = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    return lookup[labels]
