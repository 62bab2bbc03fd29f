"""Per-cell morphology tables and fixed-size, per-field-normalised cell crops.

The morphology is what separates the two cell types by eye: the round low-potential
cells against the elongated, polarised high-potential "missile" cells. Besides the
standard region properties, two shape indices summarise elongation:

* ``aspect_ratio = major_axis_length / minor_axis_length`` (>= 1), where the minor
  axis is clipped to at least :data:`MIN_AXIS_LENGTH` px (a one-pixel-wide line has a
  zero second-moment minor axis);
* ``elongation = 1 - 1 / aspect_ratio`` = 1 - minor/major, the "missile index" in
  [0, 1): 0 for a disc, 0.5 for a 2:1 ellipse, 0.75 for 4:1.

Intensity features are taken over the cell's own pixels of the raw image:
``intensity_mean``, ``intensity_std`` (population SD), the percentiles
``intensity_p10``, ``intensity_p50``, ``intensity_p90`` (numpy's linear interpolation)
and one cheap texture measure, ``texture_gradient``: the mean Sobel gradient magnitude
over the cell (``hypot(sobel_y, sobel_x) / 8``, i.e. intensity change per pixel, the
image edge reflected) divided by ``intensity_mean``, so that it does not depend on the
illumination or exposure (0 where the mean is 0, so that the feature table never holds
NaN).

All lengths are in pixels and angles in radians (skimage conventions: ``orientation``
is the angle between the row axis and the major axis, in (-pi/2, pi/2]). A cell's id is
``(plate, well, field, label)``; this module sees one field, hence only ``label``.

:func:`field_quality` measures the whole field for quality control: cell count,
focus, saturated and blank fields (see its docstring).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.polynomial.polynomial import polygrid2d, polyvander2d
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.segmentation import expand_labels

__all__ = [
    "COLUMNS",
    "CONTEXT_MARGIN",
    "CONTRAST_SCALE",
    "CROP_NORMALISATION",
    "FEATURE_COLUMNS",
    "FIELD_QUALITY_COLUMNS",
    "FOCUS_SIGMA",
    "MIN_AXIS_LENGTH",
    "PERCENTILES",
    "extract_crops",
    "field_quality",
    "measure_cells",
    "normalise_field",
]

#: Shape and intensity features of :func:`measure_cells`, in column order.
FEATURE_COLUMNS: tuple[str, ...] = (
    "area",
    "perimeter",
    "eccentricity",
    "solidity",
    "major_axis_length",
    "minor_axis_length",
    "aspect_ratio",
    "elongation",
    "orientation",
    "intensity_mean",
    "intensity_std",
    "intensity_p10",
    "intensity_p50",
    "intensity_p90",
    "texture_gradient",
)

#: Intensity percentiles of :func:`measure_cells` (column ``intensity_p{q}``).
PERCENTILES: tuple[int, ...] = (10, 50, 90)

#: All columns of :func:`measure_cells`, in order.
COLUMNS: tuple[str, ...] = (
    ("label",)
    + FEATURE_COLUMNS
    + ("centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")
    + ("touches_border",)
)

#: Metrics of :func:`field_quality`, in order.
FIELD_QUALITY_COLUMNS: tuple[str, ...] = (
    "n_cells",
    "focus",
    "saturated_fraction",
    "contrast",
    "nan_fraction",
)

#: Gaussian scale (px) of the gradient behind the ``focus`` of :func:`field_quality`.
FOCUS_SIGMA = 1.0

#: Smallest minor axis (px) used in ``aspect_ratio`` and ``elongation``.
MIN_AXIS_LENGTH = 1.0

#: Default relative contrast that :func:`normalise_field` maps to 1.
CONTRAST_SCALE = 0.1

#: Background (px) around its cell that a crop of :func:`extract_crops` keeps (the cell's halo).
CONTEXT_MARGIN = 4

#: How :func:`extract_crops` normalises (stored with trained models; must match at inference).
CROP_NORMALISATION = (
    "image: (raw / biquadratic background fitted to pixels > 6 px from cells - 1)"
    f" / {CONTRAST_SCALE}, per field; 0 beyond {CONTEXT_MARGIN} px of the cell and where another cell"
    " is nearer, and beyond the image; mask: 1 on the cell, 0 elsewhere"
)

_DTYPES = {
    **dict.fromkeys(COLUMNS, "float64"),
    "label": "int64",
    **dict.fromkeys(("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"), "int64"),
    "touches_border": "bool",
}
_PROPERTIES = (
    "label",
    "area",
    "perimeter",
    "eccentricity",
    "solidity",
    "axis_major_length",
    "axis_minor_length",
    "orientation",
    "centroid",
    "bbox",
)
_RENAME = {
    "axis_major_length": "major_axis_length",
    "axis_minor_length": "minor_axis_length",
    "centroid-0": "centroid_y",
    "centroid-1": "centroid_x",
    "bbox-0": "bbox_min_y",
    "bbox-1": "bbox_min_x",
    "bbox-2": "bbox_max_y",
    "bbox-3": "bbox_max_x",
}
_BACKGROUND_MARGIN = 6.0  # px kept clear of cells (their halo) when fitting the background
_BACKGROUND_STEP = 4  # fit the background on every 4th pixel: ample for a quadratic
_MIN_BACKGROUND_PIXELS = 64


def _check_pair(labels: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, image = np.asarray(labels), np.asarray(image)
    if labels.ndim != 2 or labels.shape != image.shape:
        raise ValueError(f"labels and image must be 2-D of one shape, got {labels.shape} and {image.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    return labels, image


def measure_cells(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """Morphology and intensity of every labelled cell.

    Parameters
    ----------
    labels : (Y, X) integer array
        Instance labels, 0 = background.
    image : (Y, X) real array
        Intensities (raw counts) for the intensity and texture features.

    Returns
    -------
    pandas.DataFrame
        One row per label, sorted by label, columns :data:`COLUMNS`. Shape and
        intensity mean / std values are :func:`skimage.measure.regionprops` ones (``axis_major_length`` ->
        ``major_axis_length``, ``centroid`` -> ``centroid_y/x``, ``bbox`` ->
        ``bbox_min_y, bbox_min_x, bbox_max_y, bbox_max_x``, max exclusive), plus
        ``aspect_ratio`` and ``elongation`` (module docstring) and ``touches_border``
        (the cell has a pixel on the image edge), the intensity percentiles and
        ``texture_gradient`` (module docstring). No labels give an empty frame with
        the same columns and dtypes.
    """
    labels, image = _check_pair(labels, image)
    # shape from one regionprops_table pass without an intensity image (which would make
    # skimage copy the image per region); intensities in one pass over the bounding boxes
    table = pd.DataFrame(regionprops_table(labels, properties=_PROPERTIES)).rename(columns=_RENAME)
    table = table.assign(**_intensity_features(labels, image, table["label"].to_numpy()))
    minor = np.maximum(table["minor_axis_length"], MIN_AXIS_LENGTH)
    aspect = np.maximum(table["major_axis_length"], minor) / minor
    touches = (
        (table["bbox_min_y"] == 0)
        | (table["bbox_min_x"] == 0)
        | (table["bbox_max_y"] == labels.shape[0])
        | (table["bbox_max_x"] == labels.shape[1])
    )
    table = table.assign(aspect_ratio=aspect, elongation=1.0 - 1.0 / aspect, touches_border=touches)
    return table.loc[:, list(COLUMNS)].astype(_DTYPES).sort_values("label", ignore_index=True)


def _intensity_features(labels: np.ndarray, image: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Intensity columns for the labels ``ids``, each computed within its bounding box."""
    names = ("intensity_mean", "intensity_std", *(f"intensity_p{q}" for q in PERCENTILES), "texture_gradient")
    values = np.full((len(ids), len(names)), np.nan)
    row_of = {int(label): row for row, label in enumerate(ids)}
    image = image.astype(np.float64, copy=False)
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None or index not in row_of:
            continue
        # one pixel more on each side (where the image has it) for the gradient
        outer = tuple(
            slice(max(part.start - 1, 0), min(part.stop + 1, size))
            for part, size in zip(window, labels.shape, strict=True)
        )
        own = labels[outer] == index
        patch = image[outer]
        pixels = patch[own]
        mean = pixels.mean()
        gradient = np.hypot(ndi.sobel(patch, 0), ndi.sobel(patch, 1))[own].mean() / 8.0
        values[row_of[index]] = (
            mean,
            pixels.std(),
            *np.percentile(pixels, PERCENTILES),
            gradient / mean if mean != 0 else 0.0,
        )
    return dict(zip(names, values.T, strict=True))


def field_quality(
    image: np.ndarray, labels: np.ndarray, *, saturation_level: float | None = None
) -> dict[str, float]:
    """Quality-control metrics of one field.

    Parameters
    ----------
    image : (Y, X) real array
        Raw intensities of the field.
    labels : (Y, X) integer array
        Instance labels of the field, 0 = background.
    saturation_level : float, optional
        Intensity at which the camera saturates; default the maximum of an integer
        dtype (e.g. 65535 for uint16). Set it for e.g. 12-bit data stored as uint16.

    Returns
    -------
    dict
        Keys :data:`FIELD_QUALITY_COLUMNS`:

        * ``n_cells``: number of labelled cells;
        * ``focus``: mean, over the cells' pixels, of the squared Gaussian gradient
          magnitude (sigma :data:`FOCUS_SIGMA` px) of ``image / mean(image)``. Defocus
          blurs cell edges and texture and lowers it; dividing by the mean makes it
          independent of exposure and illumination, and taking it over the cells, not
          the whole field, makes it independent of how many cells the field holds.
          NaN without cells (nothing to judge) or with a mean intensity of 0;
        * ``saturated_fraction``: fraction of pixels at or above ``saturation_level``;
          NaN for a float image without a ``saturation_level``;
        * ``contrast``: coefficient of variation (std / mean) of the whole field; 0 for
          a constant or all-zero field;
        * ``nan_fraction``: fraction of pixels that are NaN or infinite (a float image
          with gaps). Focus and contrast are computed on the finite pixels (non-finite ones
          take the field's finite mean before the gradient); 0 for integer images.
    """
    labels, image = _check_pair(labels, image)
    if saturation_level is None and np.issubdtype(image.dtype, np.integer):
        saturation_level = float(np.iinfo(image.dtype).max)
    values = image.astype(np.float64)
    finite = np.isfinite(values)
    mean = float(values[finite].mean()) if finite.any() else 0.0
    if not finite.all():
        values = np.where(finite, values, mean)
    cells = labels > 0
    if cells.any() and mean > 0:
        gradient = ndi.gaussian_gradient_magnitude(values / mean, FOCUS_SIGMA)
        focus = float(np.mean(gradient[cells & finite] ** 2)) if (cells & finite).any() else np.nan
    else:
        focus = np.nan
    saturated = np.nan if saturation_level is None else float(np.mean(values >= saturation_level))
    return {
        "n_cells": int(np.unique(labels[cells]).size),
        "focus": focus,
        "saturated_fraction": saturated,
        "contrast": float(values[finite].std() / mean) if mean > 0 else 0.0,
        "nan_fraction": float(1.0 - finite.mean()) if values.size else 0.0,
    }


def normalise_field(
    image: np.ndarray, labels: np.ndarray, *, contrast_scale: float = CONTRAST_SCALE
) -> np.ndarray:
    """Flat-field a field and scale it so background is ~0 and cell contrast ~1.

    The background surface is a least-squares biquadratic polynomial in (row, col)
    (terms ``row**i * col**j``, i, j <= 2) fitted to the
    pixels farther than 6 px from any labelled cell (outside the 13 x 13 px square
    around every cell pixel, so cells and their halos do not bias it), sampled every
    4th row and column; it captures vignetting and illumination
    tilts. With fewer than 64 such pixels the surface is the field's median. Then::

        normalised = (image / surface - 1) / contrast_scale

    Parameters
    ----------
    image : (Y, X) real array
        Raw intensities.
    labels : (Y, X) integer array
        Instance labels, 0 = background.
    contrast_scale : float
        Relative contrast mapped to 1; the default 0.1 maps a cell 10 % darker than the
        background to -1. A fixed value, so a field's normalisation does not depend on
        which cells it holds.

    Returns
    -------
    (Y, X) float32
        Normalised image; 0 where the surface is not positive.
    """
    labels, image = _check_pair(labels, image)
    if contrast_scale <= 0:
        raise ValueError(f"contrast_scale must be > 0, got {contrast_scale!r}")
    image = image.astype(np.float64)
    # a square (chessboard) margin: separable, far cheaper than a Euclidean distance
    # transform, and every pixel it keeps is also > 6 px away in Euclidean distance
    near = (labels > 0).view(np.uint8)
    reach = 2 * int(_BACKGROUND_MARGIN) + 1
    for axis in (0, 1):
        near = ndi.maximum_filter1d(near, reach, axis=axis, mode="constant", cval=0)
    far = near[::_BACKGROUND_STEP, ::_BACKGROUND_STEP] == 0
    rows, cols = np.nonzero(far)
    rows, cols = rows * _BACKGROUND_STEP, cols * _BACKGROUND_STEP
    if rows.size < _MIN_BACKGROUND_PIXELS:
        surface = np.full(image.shape, np.median(image))
    else:
        # coordinates scaled to [-1, 1] keep the least-squares problem well conditioned
        r = np.linspace(-1.0, 1.0, image.shape[0])
        c = np.linspace(-1.0, 1.0, image.shape[1])
        design = polyvander2d(r[rows], c[cols], (2, 2))
        coef = np.linalg.lstsq(design, image[rows, cols], rcond=None)[0]
        surface = polygrid2d(r, c, coef.reshape(3, 3))
    relative = np.divide(image, surface, out=np.ones_like(image), where=surface > 0) - 1.0
    return (relative / contrast_scale).astype(np.float32)


def extract_crops(
    image: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    *,
    size: int = 64,
    with_mask: bool = True,
    contrast_scale: float = CONTRAST_SCALE,
) -> np.ndarray:
    """Fixed-size crops centred on each cell, for a classifier.

    Parameters
    ----------
    image : (Y, X) real array
        Raw intensities of the field.
    labels : (Y, X) integer array
        Instance labels of the field, 0 = background.
    table : pandas.DataFrame
        One row per crop with columns ``label``, ``centroid_y``, ``centroid_x`` (e.g.
        from :func:`measure_cells`); crops follow its row order.
    size : int
        Crop side (px). The pixel nearest the centroid (``floor(centroid + 0.5)``) lands
        at index ``size // 2`` in both axes. Cells larger than the crop are cut, not
        resized.
    with_mask : bool
        Add the cell's own mask as channel 1.
    contrast_scale : float
        Passed to :func:`normalise_field`.

    Returns
    -------
    crops : (N, C, size, size) float32
        ``C = 2`` with the mask, else 1. Channel 0: :func:`normalise_field` of the whole
        field (background ~0, cell contrast ~1) on the cell and the background within
        :data:`CONTEXT_MARGIN` px of it that is nearer to it than to any other cell;
        0 (the normalised background level) elsewhere, other cells and beyond the image
        included. Channel 1: 1.0 on this cell's pixels, 0.0 elsewhere.

    Notes
    -----
    The crop shows one cell so that a classifier judges that cell alone: trained on
    pure wells, where every neighbour is of the same class, a CNN otherwise learns the
    neighbours' look as a cue. On the demo plate's mixed wells, a low-potential cell
    with a high-potential one within 45 px was called high 32% of the time with
    whole-field crops, 5.6% with these (1.3% without such a neighbour).
    """
    labels, image = _check_pair(labels, image)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    missing = {"label", "centroid_y", "centroid_x"} - set(table.columns)
    if missing:
        raise ValueError(f"table is missing columns {sorted(missing)}")
    n_channels = 2 if with_mask else 1
    if table.empty:
        return np.zeros((0, n_channels, size, size), np.float32)

    # pad by a whole crop so that any centroid inside the image has a full window
    normalised = np.pad(normalise_field(image, labels, contrast_scale=contrast_scale), size)
    offsets = np.arange(size) - size // 2 + size
    rows = np.floor(table["centroid_y"].to_numpy() + 0.5).astype(int)[:, None] + offsets
    cols = np.floor(table["centroid_x"].to_numpy() + 0.5).astype(int)[:, None] + offsets
    window = (rows[:, :, None], cols[:, None, :])
    own_label = table["label"].to_numpy()[:, None, None]
    # each cell grown into the background nearer to it than to any other, by CONTEXT_MARGIN
    context = np.pad(expand_labels(labels, CONTEXT_MARGIN), size)[window] == own_label
    channels = [np.where(context, normalised[window], np.float32(0))]
    if with_mask:
        own = np.pad(labels, size)[window] == own_label
        channels.append(own.astype(np.float32))
    return np.stack(channels, axis=1)
