"""Deterministic synthetic label-free plates: the project's ground truth.

Real two-cell-line label-free data is not available, so every stage is developed and
tested against plates rendered here. A field is built in two steps:

1. a *scene*: non-overlapping cell footprints (instance labels), each cell's type, and an
   optical-path (phase) map made of a dome-shaped cell thickness, a nucleus, granules,
   a thin leading-edge lamella for the polarised type, plus debris that is not a cell;
2. an *acquisition*: phase-contrast-like optics (dark cell body, dark rim, bright halo,
   brighter leading edge) or defocused brightfield (Laplacian of the phase, the
   transport-of-intensity approximation), optional defocus blur, smooth uneven
   illumination, Poisson shot noise and Gaussian read noise, 12-bit uint16 counts.

Two cell types with overlapping morphology:

* ``low_potential`` (``is_positive=False``): round-ish irregular blobs, equivalent
  diameter 18-30 px, aspect ratio mostly 1.0-1.6 with a tail up to 2.4;
* ``high_potential`` (``is_positive=True``): elongated, polarised "missile" cells,
  12-20 px wide and 32-72 px long (median ~45; aspect mostly 2-4, ~10 % below 2),
  one blunt front with a bright lamella and one tapered tail, slightly bent.

Both vary in size and granularity. On in-focus truth masks the elongation
(1 - minor/major axis) is 0.22 +- 0.11 (low) against 0.61 +- 0.08 (high); the best
single threshold classifies ~97 % of cells, not all. Cells touch (about a third are
placed against an earlier cell, clipped so labels never overlap); fields also hold
bright and dark specks and a few small non-cell blobs.

Only :func:`write_plate` touches the file system.
"""

from __future__ import annotations

import os
import pathlib
import re
import zlib
from typing import NamedTuple

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.measure import regionprops_table
from skimage.segmentation import relabel_sequential

__all__ = [
    "CELL_TYPES",
    "LAYOUT_COLUMNS",
    "demo_layout",
    "render_field",
    "write_plate",
]

#: ``cell_type`` names for ``is_positive`` False / True.
CELL_TYPES: tuple[str, str] = ("low_potential", "high_potential")

#: Columns of a plate map (``demo_layout`` and ``platemap.csv``), in order.
LAYOUT_COLUMNS: tuple[str, ...] = (
    "plate",
    "well",
    "sample",
    "condition",
    "cell_line",
    "train_class",
    "nominal_fraction",
)

_WELL_RE = re.compile(r"^[A-Z]{1,2}[0-9]{2}$")
_MIN_SIDE = 64  # the largest cell is ~70 px long; smaller fields make no sense
_MARGIN = 48  # canvas padding so cells cut by the field border are still whole
_CAMERA_MAX = 4095  # 12-bit camera
_READ_NOISE = 4.0  # counts, Gaussian
_Z_STEP_SIGMA = 2.0  # extra blur (px) per Z plane away from focus
_MAX_OVERLAP = 0.08  # fraction of a new cell allowed to fall on earlier cells (then clipped)
_PLACEMENT_TRIES = 25
_CLUMPING = 0.3  # default probability that a cell is placed touching an earlier one


class _Scene(NamedTuple):
    """Padded-canvas description of one field, shared by all its Z planes and channels."""

    labels: np.ndarray  # (Y + 2m, X + 2m) int32
    is_positive: np.ndarray  # (n,) bool, type of label i + 1
    phase: np.ndarray  # (Y + 2m, X + 2m) float32 optical path, background 0
    lamella: np.ndarray  # (Y + 2m, X + 2m) float32 leading-edge weight in [0, 1]


# --------------------------------------------------------------------------- cells


def _cell_footprint(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one cell in a local square frame centred on its centre.

    Returns
    -------
    mask : (h, h) bool
        Cell footprint.
    lamella : (h, h) float32
        Leading-edge weight in [0, 1] (zero for round cells).
    nucleus : (h, h) bool
        Nucleus footprint (inside ``mask``).
    """
    if positive:
        width = rng.uniform(12.0, 20.0)
        aspect = min(1.6 + rng.gamma(3.0, 0.38), 4.5)
        length = float(np.clip(width * aspect, 32.0, 72.0))
        theta = rng.uniform(0.0, 2.0 * np.pi)  # polarised: front direction matters
    else:
        diameter = rng.uniform(18.0, 30.0)
        aspect = min(1.0 + rng.gamma(2.0, 0.15), 2.4)
        length, width = diameter * np.sqrt(aspect), diameter / np.sqrt(aspect)
        theta = rng.uniform(0.0, np.pi)
    half = int(np.ceil(length / 2.0)) + 3
    rr, cc = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    a = rr * np.cos(theta) + cc * np.sin(theta)  # along the major axis (front at +)
    b = -rr * np.sin(theta) + cc * np.cos(theta)  # across
    if positive:
        b = b - rng.normal(0.0, 0.004) * a**2  # gentle bend
        front_cap = length / 2.0 - width / 2.0
        taper_start = front_cap - rng.uniform(0.2, 0.45) * length
        tail = np.clip((a + length / 2.0) / (taper_start + length / 2.0), 0.0, 1.0)
        half_width = np.where(
            a > front_cap,
            np.sqrt(np.clip((width / 2.0) ** 2 - (a - front_cap) ** 2, 0.0, None)),
            width / 2.0 * tail ** rng.uniform(0.4, 0.9),
        )
        k = np.arange(1, 4)[:, None, None]
        ripple = rng.normal(0.0, 0.04, 3)[:, None, None] * np.cos(
            k * np.pi * a / length + rng.uniform(0, 2 * np.pi, 3)[:, None, None]
        )
        mask = (np.abs(b) <= half_width * (1.0 + ripple.sum(0))) & (np.abs(a) <= length / 2)
        lamella_depth = 0.45 * width
        lamella = np.clip((a - (length / 2.0 - lamella_depth)) / lamella_depth, 0.0, 1.0)
        nuc_a, nuc_r = -0.1 * length, (0.22 * length, 0.3 * width)
    else:
        ra, rb = length / 2.0, width / 2.0
        psi = np.arctan2(b / rb, a / ra)
        k = np.arange(2, 6)[:, None, None]
        wobble = rng.normal(0.0, 0.05, 4)[:, None, None] * np.cos(
            k * psi + rng.uniform(0, 2 * np.pi, 4)[:, None, None]
        )
        mask = np.hypot(a / ra, b / rb) <= 1.0 + wobble.sum(0)
        lamella = np.zeros_like(a)
        nuc_a, nuc_r = rng.normal(0.0, 0.1) * ra, (0.45 * ra, 0.5 * rb)
    nucleus = mask & (((a - nuc_a) / nuc_r[0]) ** 2 + (b / nuc_r[1]) ** 2 <= 1.0)
    return mask, (lamella * mask).astype(np.float32), nucleus


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected component of a boolean mask."""
    components = connected_components(mask, connectivity=1)
    if components.max() <= 1:
        return mask
    return components == np.argmax(np.bincount(components.ravel())[1:]) + 1


def _draw_scene(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_cells: int,
    fraction_positive: float,
    clumping: float,
) -> _Scene:
    """Place up to ``n_cells`` non-overlapping cells and build the phase map."""
    m = _MARGIN
    canvas_shape = (shape[0] + 2 * m, shape[1] + 2 * m)
    labels = np.zeros(canvas_shape, np.int32)
    thickness = np.zeros(canvas_shape, np.float32)
    lamella = np.zeros(canvas_shape, np.float32)
    nuclei = np.zeros(canvas_shape, np.float32)
    is_positive: list[bool] = []
    centres: list[tuple[float, float, float]] = []  # (row, col, equivalent radius)
    for _ in range(n_cells):
        positive = bool(rng.random() < fraction_positive)
        mask, lam, nucleus = _cell_footprint(rng, positive)
        half = mask.shape[0] // 2
        radius = np.sqrt(mask.sum() / np.pi)
        for _ in range(_PLACEMENT_TRIES):
            if centres and rng.random() < clumping:
                # next to an earlier cell, slightly closer than touching: a clump
                row, col, r_other = centres[rng.integers(len(centres))]
                angle = rng.uniform(0.0, 2.0 * np.pi)
                dist = (r_other + radius) * rng.uniform(0.8, 1.0)
                row, col = row + dist * np.sin(angle), col + dist * np.cos(angle)
            else:
                row, col = rng.uniform(0, shape[0]) + m, rng.uniform(0, shape[1]) + m
            if not (m <= row < shape[0] + m and m <= col < shape[1] + m):
                continue
            r0, c0 = int(row) - half, int(col) - half
            window = (slice(r0, r0 + mask.shape[0]), slice(c0, c0 + mask.shape[1]))
            free = labels[window] == 0
            if (mask & ~free).sum() <= _MAX_OVERLAP * mask.sum():
                break
        else:
            continue  # too crowded: this cell is not drawn
        cell = _largest_component(mask & free)
        labels[window][cell] = len(is_positive) + 1
        # thin periphery, flat thick centre; the lamella is a thin sheet
        depth = ndi.distance_transform_edt(cell)
        dome = rng.uniform(0.6, 1.0) * (1.0 - np.exp(-depth / rng.uniform(2.0, 4.0)))
        thickness[window] += (dome * (1.0 - 0.6 * lam)).astype(np.float32) * cell
        lamella[window] += lam * cell
        nuclei[window] += rng.uniform(0.2, 0.5) * (nucleus & cell)
        is_positive.append(positive)
        centres.append((row, col, radius))

    inside = labels > 0
    # granular cytoplasm: point scatterers blurred to ~2 px grains, per-cell strength
    granularity = rng.uniform(0.1, 0.4, len(is_positive) + 1).astype(np.float32)
    grains = np.zeros(labels.size, np.float32)
    cell_pixels = np.flatnonzero(inside)
    if cell_pixels.size:
        picks = rng.choice(cell_pixels, size=cell_pixels.size // 6)
        np.add.at(grains, picks, rng.normal(0.0, 1.0, picks.size).astype(np.float32))
        grains *= granularity[labels.ravel()]
    grains = ndi.gaussian_filter(grains.reshape(canvas_shape), 0.8) * 2.0

    # debris: small bright/dark specks anywhere and a few small non-cell blobs
    debris = np.zeros(labels.size, np.float32)
    n_specks = rng.poisson(30)
    np.add.at(
        debris,
        rng.integers(0, labels.size, n_specks),
        rng.choice([-1.0, 1.0], n_specks) * rng.uniform(2.0, 6.0, n_specks),
    )
    debris = debris.reshape(canvas_shape)
    for _ in range(rng.poisson(2.0)):
        r, c = rng.uniform(m, shape[0] + m), rng.uniform(m, shape[1] + m)
        blob = np.hypot(*np.ogrid[-5:6, -5:6]) <= rng.uniform(1.5, 3.5)
        debris[int(r) - 5 : int(r) + 6, int(c) - 5 : int(c) + 6] += rng.uniform(0.4, 0.9) * blob
    debris = ndi.gaussian_filter(debris, 1.0)

    phase = thickness + ndi.gaussian_filter(nuclei, 1.5) * inside + grains * inside + debris
    return _Scene(labels, np.asarray(is_positive, bool), phase, lamella)


# --------------------------------------------------------------------------- optics


def _contrast(scene: _Scene, channel: int, gains: np.ndarray) -> np.ndarray:
    """In-focus relative contrast (0 = background) of one channel, on the padded canvas.

    Channel 0 is phase-contrast-like: a high-pass of the phase makes cells dark with a
    bright halo, the phase gradient adds a dark rim and the lamella a bright front.
    Channel ``k >= 1`` is brightfield defocused by ``k`` units: intensity follows the
    Laplacian of the phase (transport-of-intensity), giving light/dark fringes.
    """
    phase = scene.phase
    if channel > 0:
        return -0.6 * channel * ndi.gaussian_laplace(phase, 1.5)
    # the dark rim sits just inside the cell edge, the bright halo just outside
    inside = ndi.gaussian_filter((scene.labels > 0).astype(np.float32), 1.0)
    return (
        -gains[0] * (phase - ndi.gaussian_filter(phase, 4.0))
        - gains[1] * ndi.gaussian_gradient_magnitude(phase, 1.0) * inside
        + gains[2] * ndi.gaussian_filter(scene.lamella, 1.0)
    )


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(Y, X) smooth multiplicative illumination: off-centre vignetting times a tilt."""
    row = np.linspace(-0.5, 0.5, shape[0])[:, None] - rng.uniform(-0.15, 0.15)
    col = np.linspace(-0.5, 0.5, shape[1])[None, :] - rng.uniform(-0.15, 0.15)
    vignette = 1.0 - rng.uniform(0.15, 0.4) * (row**2 + col**2)
    tilt = 1.0 + rng.normal(0.0, 0.08) * row + rng.normal(0.0, 0.08) * col
    return vignette * tilt


def _acquire(rng: np.random.Generator, expected: np.ndarray) -> np.ndarray:
    """Shot (Poisson) and read (Gaussian) noise on expected counts -> 12-bit uint16."""
    counts = rng.poisson(expected) + rng.normal(0.0, _READ_NOISE, expected.shape)
    return np.clip(np.rint(counts), 0, _CAMERA_MAX).astype(np.uint16)


def _render(
    rng: np.random.Generator,
    *,
    fraction_positive: float,
    shape: tuple[int, int],
    n_cells: int,
    out_of_focus: bool,
    z_planes: int,
    channels: int,
    clumping: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one field as a (C, Z, Y, X) uint16 stack plus its truth (labels, types)."""
    scene = _draw_scene(rng, shape, n_cells, fraction_positive, clumping)
    field = (slice(_MARGIN, _MARGIN + shape[0]), slice(_MARGIN, _MARGIN + shape[1]))
    # cells clipped away entirely by neighbours or the border leave label gaps
    present = np.unique(scene.labels[field])
    is_positive = scene.is_positive[present[present > 0] - 1]
    labels = relabel_sequential(scene.labels[field])[0]
    # per-field optics and illumination, shared by the planes and channels of the field
    gains = rng.uniform(0.8, 1.2, 3) * np.array([0.4, 0.4, 0.2])
    defocus = rng.uniform(3.0, 6.0) if out_of_focus else 0.0
    expected = rng.uniform(1800.0, 2200.0) * _illumination(rng, shape)
    middle = z_planes // 2
    stack = np.empty((channels, z_planes, *shape), np.uint16)
    for c in range(channels):
        contrast = _contrast(scene, c, gains)
        for z in range(z_planes):
            blur = np.hypot(defocus, _Z_STEP_SIGMA * abs(z - middle))
            relative = 1.0 + (ndi.gaussian_filter(contrast, blur) if blur > 0 else contrast)
            stack[c, z] = _acquire(rng, expected * np.clip(relative[field], 0.05, None))
    return stack, labels.astype(np.int32), is_positive


# --------------------------------------------------------------------------- public API


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or any(int(s) != s or s < _MIN_SIDE for s in shape):
        raise ValueError(f"shape must be two integers >= {_MIN_SIDE}, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def render_field(
    rng: np.random.Generator,
    *,
    fraction_positive: float,
    shape: tuple[int, int] = (512, 512),
    n_cells: int = 40,
    out_of_focus: bool = False,
    clumping: float = _CLUMPING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one single-channel, in-focus-plane label-free field with its ground truth.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness; the same generator state gives the same field.
    fraction_positive : float
        Probability, in [0, 1], that each cell (independently) is the elongated
        high-potential type.
    shape : (int, int)
        Field size (rows, cols), each at least 64.
    n_cells : int
        Number of cells to place; 0 gives an empty field (debris and noise only).
        Fewer are drawn only if the field is too crowded to place them without overlap.
    out_of_focus : bool
        Blur the whole field with a Gaussian defocus of sigma 3-6 px.
    clumping : float
        Probability, in [0, 1], that a cell is placed touching an earlier one.

    Returns
    -------
    image : (Y, X) uint16
        Phase-contrast-like image, background ~2000 counts, 12-bit range.
    labels : (Y, X) int32
        Ground-truth instances, 0 background, 1..n cells, no overlaps (cells may touch).
    is_positive : (n,) bool
        ``is_positive[i]`` is the type of label ``i + 1`` (True = high potential).
    """
    _check_probability("fraction_positive", fraction_positive)
    _check_probability("clumping", clumping)
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells!r}")
    stack, labels, is_positive = _render(
        rng,
        fraction_positive=fraction_positive,
        shape=_check_shape(shape),
        n_cells=int(n_cells),
        out_of_focus=out_of_focus,
        z_planes=1,
        channels=1,
        clumping=clumping,
    )
    return stack[0, 0], labels, is_positive


def demo_layout() -> pd.DataFrame:
    """The 24-well demo plate map (plate ``demo``, wells A01..D06).

    Controls ``ctrl_low`` (4 wells, nominal fraction 0.0, line ``LoMet``, train class
    ``low_potential``) and ``ctrl_high`` (4 wells, 1.0, ``HiMet``, ``high_potential``),
    and mixtures ``mix10``..``mix90`` (3 wells each, ``mix50`` 4; line ``LoMet+HiMet``,
    empty train class). Each sample occupies distinct rows and columns.

    Returns
    -------
    pandas.DataFrame
        24 rows, columns :data:`LAYOUT_COLUMNS`.
    """
    grid = [
        ["ctrl_low", "mix10", "mix50", "ctrl_high", "mix75", "mix25"],
        ["mix90", "ctrl_high", "mix25", "mix50", "ctrl_low", "mix10"],
        ["ctrl_high", "mix75", "ctrl_low", "mix10", "mix90", "mix50"],
        ["mix50", "mix25", "mix90", "ctrl_low", "ctrl_high", "mix75"],
    ]
    samples = {
        "ctrl_low": ("LoMet", "low_potential", 0.0),
        "ctrl_high": ("HiMet", "high_potential", 1.0),
        **{f"mix{p}": ("LoMet+HiMet", "", p / 100.0) for p in (10, 25, 50, 75, 90)},
    }
    rows = [
        ("demo", f"{row}{col:02d}", sample, "untreated", *samples[sample])
        for row, names in zip("ABCD", grid, strict=True)
        for col, sample in enumerate(names, start=1)
    ]
    return pd.DataFrame(rows, columns=list(LAYOUT_COLUMNS))


def _check_layout(layout: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in LAYOUT_COLUMNS if c not in layout.columns]
    if missing:
        raise ValueError(f"layout is missing columns {missing}")
    layout = layout.loc[:, list(LAYOUT_COLUMNS)].reset_index(drop=True)
    if layout.empty:
        raise ValueError("layout has no wells")
    bad_wells = [w for w in layout["well"] if not _WELL_RE.match(str(w))]
    if bad_wells:
        raise ValueError(f"well ids must look like 'A01', got {bad_wells}")
    if layout.duplicated(["plate", "well"]).any():
        raise ValueError("layout lists a (plate, well) more than once")
    fractions = pd.to_numeric(layout["nominal_fraction"], errors="coerce")
    if not fractions.between(0.0, 1.0).all():
        raise ValueError("nominal_fraction must be numbers in [0, 1]")
    return layout.assign(nominal_fraction=fractions.astype(float))


def _well_rng(seed: int, plate: str, well: str) -> np.random.Generator:
    """Generator for one well, independent of the order in which wells are rendered."""
    return np.random.default_rng([seed, zlib.crc32(f"{plate}/{well}".encode())])


_CELL_COLUMNS = (
    "plate",
    "well",
    "field",
    "label",
    "cell_type",
    "is_positive",
    "area",
    "centroid_y",
    "centroid_x",
)


def _cell_rows(labels: np.ndarray, is_positive: np.ndarray) -> pd.DataFrame:
    """Truth table of one field: label, cell_type, is_positive, area, centroid."""
    props = pd.DataFrame(regionprops_table(labels, properties=("label", "area", "centroid")))
    props = props.rename(columns={"centroid-0": "centroid_y", "centroid-1": "centroid_x"})
    positive = is_positive[props["label"].to_numpy() - 1]
    return props.assign(cell_type=np.asarray(CELL_TYPES)[positive.astype(int)], is_positive=positive)


def _truth_summaries(layout: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-well and per-sample cell counts and realised positive fractions."""
    counts = cells.groupby(["plate", "well"]).agg(
        n_cells=("is_positive", "size"), n_positive=("is_positive", "sum")
    )
    per_well = layout.join(counts, on=["plate", "well"]).fillna({"n_cells": 0, "n_positive": 0})
    per_well = per_well.astype({"n_cells": int, "n_positive": int})
    per_sample = per_well.groupby("sample", sort=True).agg(
        n_wells=("well", "size"),
        n_cells=("n_cells", "sum"),
        n_positive=("n_positive", "sum"),
        nominal_fraction=("nominal_fraction", "first"),
    )
    per_sample = per_sample.reset_index()
    for table in (per_well, per_sample):  # NaN where there are no cells
        with_cells = table["n_cells"].where(table["n_cells"] > 0)
        table["fraction_positive"] = table["n_positive"] / with_cells
    return (
        per_well[["plate", "well", "sample", "n_cells", "fraction_positive", "nominal_fraction"]],
        per_sample[["sample", "n_wells", "n_cells", "fraction_positive", "nominal_fraction"]],
    )


def write_plate(
    out_dir: str | os.PathLike,
    *,
    layout: pd.DataFrame | None = None,
    seed: int = 0,
    fields_per_well: int = 3,
    shape: tuple[int, int] = (512, 512),
    cells_per_field: tuple[int, int] = (30, 45),
    z_planes: int = 1,
    channels: int = 1,
    p_out_of_focus: float = 0.03,
    p_empty: float = 0.02,
) -> pathlib.Path:
    """Render a synthetic plate as ImageXpress-style TIFFs plus ground-truth tables.

    Each well draws from its own generator seeded by ``(seed, crc32(plate/well))``, so
    the same seed gives byte-identical files whatever the layout order. Per field: it is
    empty with probability ``p_empty``, otherwise it holds a uniform random number of
    cells in ``cells_per_field`` (inclusive), each high-potential with probability equal
    to the well's ``nominal_fraction``; it is out of focus with probability
    ``p_out_of_focus``.

    Files written under ``out_dir`` (fields ``s`` and channels ``w`` 1-based):

    * ``images/{plate}_{well}_s{field}_w{channel}.TIF``: zlib-compressed uint16. Channel
      1 is phase-contrast-like, channel k >= 2 brightfield defocused by k - 1 units.
      With ``z_planes > 1`` an ImageJ hyperstack (axes ``ZYX``, one page per plane), the
      middle plane in focus and the others progressively blurred.
    * ``platemap.csv``: the layout, columns :data:`LAYOUT_COLUMNS`.
    * ``truth/masks/{plate}_{well}_s{field}.tif``: int32 instance labels.
    * ``truth/cells.csv``: plate, well, field (0-based, i.e. ``s{field + 1}``), label,
      cell_type, is_positive, area, centroid_y, centroid_x.
    * ``truth/per_well.csv``: plate, well, sample, n_cells, fraction_positive (realised
      among the generated cells; NaN for a well without cells), nominal_fraction.
    * ``truth/per_sample.csv``: sample, n_wells, n_cells, fraction_positive (realised,
      pooled over the sample's cells), nominal_fraction.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output folder, created if needed.
    layout : pandas.DataFrame, optional
        Plate map with columns :data:`LAYOUT_COLUMNS`; default :func:`demo_layout`.
    seed : int
        Base seed.
    fields_per_well : int
        Fields (sites) per well, >= 1.
    shape : (int, int)
        Field size (rows, cols), each >= 64.
    cells_per_field : (int, int)
        Inclusive (min, max) number of cells per non-empty field.
    z_planes : int
        Planes per field and channel, >= 1.
    channels : int
        Channels per field, >= 1.
    p_out_of_focus, p_empty : float
        Per-field probabilities in [0, 1].

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    layout = _check_layout(demo_layout() if layout is None else layout)
    shape = _check_shape(shape)
    lo, hi = cells_per_field
    if not 0 <= lo <= hi:
        raise ValueError(f"cells_per_field must be (min, max) with 0 <= min <= max, got {cells_per_field!r}")
    counts = {"fields_per_well": fields_per_well, "z_planes": z_planes, "channels": channels}
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    _check_probability("p_out_of_focus", p_out_of_focus)
    _check_probability("p_empty", p_empty)

    out_dir = pathlib.Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "truth" / "masks").mkdir(parents=True, exist_ok=True)
    cell_tables = []
    for well in layout.itertuples(index=False):
        rng = _well_rng(seed, well.plate, well.well)
        for field in range(fields_per_well):
            empty = rng.random() < p_empty
            stack, labels, is_positive = _render(
                rng,
                fraction_positive=well.nominal_fraction,
                shape=shape,
                n_cells=0 if empty else int(rng.integers(lo, hi + 1)),
                out_of_focus=bool(rng.random() < p_out_of_focus),
                z_planes=z_planes,
                channels=channels,
                clumping=_CLUMPING,
            )
            stem = f"{well.plate}_{well.well}_s{field + 1}"
            for c, planes in enumerate(stack):
                path = out_dir / "images" / f"{stem}_w{c + 1}.TIF"
                if z_planes > 1:
                    tifffile.imwrite(
                        path,
                        planes,
                        imagej=True,
                        metadata={"axes": "ZYX"},
                        photometric="minisblack",
                        compression="zlib",
                    )
                else:
                    tifffile.imwrite(path, planes[0], photometric="minisblack", compression="zlib")
            mask_path = out_dir / "truth" / "masks" / f"{stem}.tif"
            tifffile.imwrite(mask_path, labels, photometric="minisblack", compression="zlib")
            table = _cell_rows(labels, is_positive)
            cell_tables.append(table.assign(plate=well.plate, well=well.well, field=field))

    cells = pd.concat(cell_tables, ignore_index=True)[list(_CELL_COLUMNS)]
    per_well, per_sample = _truth_summaries(layout, cells)
    layout.to_csv(out_dir / "platemap.csv", index=False)
    cells.to_csv(out_dir / "truth" / "cells.csv", index=False)
    per_well.to_csv(out_dir / "truth" / "per_well.csv", index=False)
    per_sample.to_csv(out_dir / "truth" / "per_sample.csv", index=False)
    return out_dir
