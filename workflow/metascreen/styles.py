"""A varied synthetic world of label-free fields with instance ground truth.

The demo plate (:mod:`metascreen.synth`) renders one look of two cell types. A learned
segmenter trained on one look fails on the next, so this module renders many: a
*style* (:class:`Style`, named in :data:`STYLES`) is a set of choices of

* **modality**: ``brightfield`` (defocused: intensity follows the Laplacian of the
  optical path, the transport-of-intensity approximation; dark rim and bright centre or,
  with the other sign of defocus, the reverse, plus weak absorption), ``phase`` (a
  high-pass of the optical path: dark body, bright halo whose width is set by the
  condenser annulus, halos adding up to bright artefacts between close cells; the
  polarity can be positive or negative) or ``dic`` (relief shading: the derivative of
  the optical path along a shear direction);
* **morphology**: ``round`` suspension cells, ``spread`` adherent cells with
  lamellipodia and a tail, ``neurite`` cells (a small soma with long thin processes)
  and ``clumps`` (round cells packed in clusters); a cell is an optical body
  (:func:`_optical_path`: spheres for round cells, flat lamellae for spread ones) with
  a nucleus and granules fainter than the body, so that its outline, and the groove
  between touching cells, is what shows most;
* **density**: from a few cells to a confluent monolayer (cells grown into the free
  space between them until they touch, ``confluent=True``);
* **size** (equivalent diameter, px, 10-100), **defocus** (wider fringes in
  brightfield, blur in phase contrast and DIC), shot and read **noise** (at an exposure
  where the cells stand out of it, :func:`_visible_exposure`), uneven **illumination** and
  vignetting, **debris** and the stored **dtype** (uint8, uint16 of 12 or 16 bits,
  float32).

Every field comes with int32 instance labels (cells may touch, never overlap). Each
field draws its own parameters from its style's ranges, so one style already spans a
family of looks. The styles cross modalities with morphologies and densities (every
modality has spread cells and neurites, phase contrast and DIC a confluent layer), so
that each optical effect is learned on more than one kind of cell, and a look no style
renders shares its parts with several that do. Pure functions: :func:`render_style_field`
returns arrays, only :func:`write_world` writes files (``name.tif`` + ``name_masks.tif``
pairs, the Cellpose convention).
"""

from __future__ import annotations

import os
import pathlib
import zlib
from dataclasses import dataclass

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, relabel_sequential

from metascreen import synth

__all__ = [
    "DEMO_STYLE",
    "HELD_OUT_STYLES",
    "STYLES",
    "STYLE_NAMES",
    "Style",
    "render_style_field",
    "style_rng",
    "write_world",
]


@dataclass(frozen=True)
class Style:
    """A named family of synthetic label-free fields.

    Ranges are ``(low, high)`` drawn uniformly per field (per cell for diameters).
    """

    name: str
    modality: str  # "brightfield", "phase" or "dic"
    morphology: str  # "round", "spread", "neurite" or "clumps"
    diameter: tuple[float, float]  # equivalent cell diameter, px
    cover: tuple[float, float]  # target fraction of the field covered by cells
    confluent: bool = False  # grow cells into the gaps until they touch
    defocus: tuple[float, float] = (0.0, 0.8)  # px: fringe widening (brightfield), blur sigma (phase, DIC)
    dtype: str = "uint16"  # "uint8", "uint16" (12-bit), "uint16_full" or "float32"
    photons: tuple[float, float] = (300.0, 3000.0)  # background photons per pixel
    debris: float = 1.0  # scales the expected amount of debris
    description: str = ""


#: The named styles of the synthetic world (``metascreen synth-world --styles ...``).
STYLES: dict[str, Style] = {
    style.name: style
    for style in (
        Style(
            "brightfield_round",
            "brightfield",
            "round",
            (18.0, 34.0),
            (0.05, 0.3),
            description="suspension cells, flat background, dark rim and bright centre or the reverse",
        ),
        Style(
            "brightfield_small",
            "brightfield",
            "round",
            (10.0, 16.0),
            (0.05, 0.35),
            dtype="uint8",
            description="small round cells (10-16 px), 8-bit",
        ),
        Style(
            "brightfield_clumps",
            "brightfield",
            "clumps",
            (16.0, 30.0),
            (0.2, 0.45),
            description="round cells packed in clusters, many touching",
        ),
        Style(
            "brightfield_spread_large",
            "brightfield",
            "spread",
            (55.0, 100.0),
            (0.15, 0.4),
            dtype="float32",
            description="large spread cells (55-100 px), float images",
        ),
        Style(
            "phase_round",
            "phase",
            "round",
            (16.0, 30.0),
            (0.05, 0.3),
            dtype="uint8",
            description="round cells with bright halos, 8-bit",
        ),
        Style(
            "phase_spread",
            "phase",
            "spread",
            (30.0, 70.0),
            (0.1, 0.35),
            dtype="uint8",
            description="migrating adherent cells: halos, lamellipodia and tails, some touching",
        ),
        Style(
            "phase_neurite",
            "phase",
            "neurite",
            (14.0, 30.0),
            (0.3, 0.6),
            dtype="uint8",
            confluent=False,
            description="neuroblastoma-like: small somata with long neurites, dense, many touching",
        ),
        Style(
            "phase_confluent",
            "phase",
            "spread",
            (20.0, 45.0),
            (0.7, 0.9),
            confluent=True,
            dtype="uint16_full",
            description="confluent epithelial monolayer (>= 70 % covered), cells share borders",
        ),
        Style(
            "dic_spread",
            "dic",
            "spread",
            (25.0, 60.0),
            (0.1, 0.4),
            description="DIC-like relief shading of adherent cells",
        ),
        Style(
            "brightfield_spread",
            "brightfield",
            "spread",
            (25.0, 55.0),
            (0.1, 0.4),
            dtype="uint8",
            description="adherent cells in brightfield, 8-bit",
        ),
        Style(
            "brightfield_neurite",
            "brightfield",
            "neurite",
            (14.0, 30.0),
            (0.2, 0.5),
            description="neurons in brightfield: small somata with long processes",
        ),
        Style(
            "phase_clumps",
            "phase",
            "clumps",
            (16.0, 30.0),
            (0.2, 0.45),
            dtype="float32",
            description="round cells packed in clusters under phase contrast, float images",
        ),
        Style(
            "dic_neurite",
            "dic",
            "neurite",
            (14.0, 30.0),
            (0.2, 0.5),
            dtype="uint8",
            description="neurons in DIC relief shading, 8-bit",
        ),
        Style(
            "dic_confluent",
            "dic",
            "spread",
            (20.0, 45.0),
            (0.7, 0.9),
            confluent=True,
            description="a confluent monolayer in DIC relief shading",
        ),
        Style(
            "brightfield_defocus",
            "brightfield",
            "round",
            (18.0, 34.0),
            (0.05, 0.3),
            defocus=(2.0, 4.0),
            description="out of focus by 2-4 px: round cells with wide, soft fringes",
        ),
        Style(
            "phase_spread_defocus",
            "phase",
            "spread",
            (30.0, 60.0),
            (0.1, 0.35),
            defocus=(2.0, 4.0),
            dtype="uint8",
            description="out of focus: adherent cells in phase contrast blurred by 2-4 px",
        ),
        Style(
            "dic_round",
            "dic",
            "round",
            (16.0, 30.0),
            (0.1, 0.35),
            dtype="uint8",
            description="held out of pretraining: DIC relief shading of round cells, 8-bit",
        ),
        Style(
            "brightfield_confluent",
            "brightfield",
            "spread",
            (20.0, 40.0),
            (0.7, 0.9),
            confluent=True,
            description="held out of pretraining: a confluent monolayer in defocused brightfield",
        ),
    )
}

#: The demo plate's own look (:func:`metascreen.synth.render_field`) as one more style.
DEMO_STYLE = "demo_plate"
#: Styles kept out of pretraining, so that adapting to an unseen look (fine-tuning on a few
#: annotated fields) is measured on a look the shipped network has never seen: no
#: pretraining style is DIC of round or clumped cells, or a confluent brightfield layer.
HELD_OUT_STYLES: tuple[str, ...] = ("dic_round", "brightfield_confluent")
#: The styles the shipped network is pretrained on: :data:`STYLES` but the held-out ones,
#: and :data:`DEMO_STYLE`.
STYLE_NAMES: tuple[str, ...] = (*sorted(set(STYLES) - set(HELD_OUT_STYLES)), DEMO_STYLE)

_MAX_CELLS = 4000
# contrast-to-noise ratio per pixel of a field's typical cell, at least (_visible_exposure)
_VISIBLE_CONTRAST_TO_NOISE = 1.5
# truth objects below this fraction of the area of the style's smallest cell are dropped
_MIN_AREA_FRACTION = 0.1


# --------------------------------------------------------------------------- shapes


def _radial_shape(
    rng: np.random.Generator, radius: float, roughness: float, elongation: float, n_modes: int
) -> np.ndarray:
    """A star-shaped footprint: radius modulated by random low-order cosines, stretched."""
    theta0 = rng.uniform(0.0, np.pi)
    half = int(np.ceil(radius * elongation * (1.0 + 2.5 * roughness))) + 3
    rr, cc = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    a = rr * np.cos(theta0) + cc * np.sin(theta0)
    b = -rr * np.sin(theta0) + cc * np.cos(theta0)
    a, b = a / np.sqrt(elongation), b * np.sqrt(elongation)
    psi = np.arctan2(b, a)
    k = np.arange(2, 2 + n_modes)[:, None, None]
    amplitude = rng.normal(0.0, roughness, n_modes)[:, None, None] / np.sqrt(k - 1)
    modulation = 1.0 + (amplitude * np.cos(k * psi + rng.uniform(0, 2 * np.pi, n_modes)[:, None, None])).sum(
        0
    )
    return np.hypot(a, b) <= radius * np.clip(modulation, 0.4, None)


def _stroke(
    shape: tuple[int, int],
    start: np.ndarray,
    angle: float,
    length: float,
    width: float,
    curl: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A thin curved process (a random walk of points dilated to ``width``), tapering."""
    n = max(int(length), 2)
    turns = np.cumsum(rng.normal(0.0, curl, n))
    steps = np.stack([np.sin(angle + turns), np.cos(angle + turns)], axis=1)
    points = start + np.cumsum(steps, axis=0)
    canvas = np.zeros(shape, bool)
    inside = (points >= 0).all(1) & (points[:, 0] < shape[0] - 1) & (points[:, 1] < shape[1] - 1)
    rows, cols = np.rint(points[inside]).astype(int).T
    canvas[rows, cols] = True
    return ndi.distance_transform_edt(~canvas) <= width / 2.0


def _cell_footprint(rng: np.random.Generator, morphology: str, diameter: float) -> np.ndarray:
    """One cell's footprint in a local frame (odd side, centred), as a boolean mask."""
    radius = diameter / 2.0
    if morphology in ("round", "clumps"):
        return _radial_shape(rng, radius, rng.uniform(0.02, 0.08), rng.uniform(1.0, 1.5), 4)
    if morphology == "spread":
        body = _radial_shape(rng, radius * 0.85, rng.uniform(0.12, 0.3), rng.uniform(1.0, 2.2), 6)
        if rng.random() < 0.6:  # a tail behind the cell
            side = body.shape[0] + 2 * int(radius * 1.5)
            canvas = np.zeros((side, side), bool)
            offset = (side - body.shape[0]) // 2
            canvas[offset : offset + body.shape[0], offset : offset + body.shape[1]] = body
            centre = np.array([side / 2.0, side / 2.0])
            tail = _stroke(
                canvas.shape,
                centre,
                rng.uniform(0, 2 * np.pi),
                radius * rng.uniform(1.2, 2.2),
                max(radius * rng.uniform(0.15, 0.3), 2.0),
                0.05,
                rng,
            )
            return canvas | tail
        return body
    if morphology == "neurite":
        soma = _radial_shape(rng, radius * 0.6, rng.uniform(0.03, 0.1), rng.uniform(1.0, 1.4), 4)
        side = soma.shape[0] + 2 * int(radius * 3.2)
        canvas = np.zeros((side, side), bool)
        offset = (side - soma.shape[0]) // 2
        canvas[offset : offset + soma.shape[0], offset : offset + soma.shape[1]] = soma
        centre = np.array([side / 2.0, side / 2.0])
        for _ in range(rng.integers(1, 4)):
            canvas |= _stroke(
                canvas.shape,
                centre,
                rng.uniform(0, 2 * np.pi),
                radius * rng.uniform(1.5, 3.0),
                rng.uniform(1.5, 3.0),
                0.08,
                rng,
            )
        return canvas
    raise ValueError(f"unknown morphology {morphology!r}")


# --------------------------------------------------------------------------- scenes


def _place_cells(rng: np.random.Generator, shape: tuple[int, int], style: Style, margin: int) -> np.ndarray:
    """Instance labels on a padded canvas, cells placed until the target cover is reached."""
    canvas = (shape[0] + 2 * margin, shape[1] + 2 * margin)
    labels = np.zeros(canvas, np.int32)
    target = rng.uniform(*style.cover) * shape[0] * shape[1]
    # confluent layers start from fewer, smaller cells and grow them into the gaps
    if style.confluent:
        target *= 0.7
    clumping = 0.85 if style.morphology == "clumps" else (0.5 if style.morphology == "neurite" else 0.25)
    covered, n_cells, failures = 0.0, 0, 0
    centres: list[tuple[float, float, float]] = []
    while covered < target and n_cells < _MAX_CELLS and failures < 200:
        diameter = rng.uniform(*style.diameter)
        mask = _cell_footprint(rng, style.morphology, diameter)
        half = mask.shape[0] // 2
        if centres and rng.random() < clumping:
            row, col, r_other = centres[rng.integers(len(centres))]
            angle = rng.uniform(0.0, 2.0 * np.pi)
            distance = (r_other + diameter / 2.0) * rng.uniform(0.75, 1.0)
            row, col = row + distance * np.sin(angle), col + distance * np.cos(angle)
        else:
            row, col = rng.uniform(margin, margin + shape[0]), rng.uniform(margin, margin + shape[1])
        r0, c0 = int(row) - half, int(col) - half
        if r0 < 0 or c0 < 0 or r0 + mask.shape[0] > canvas[0] or c0 + mask.shape[1] > canvas[1]:
            failures += 1
            continue
        window = labels[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        free = mask & (window == 0)
        if free.sum() < 0.85 * mask.sum():
            failures += 1
            continue
        # keep the largest connected piece: clipping by a neighbour may cut a process off
        pieces, n_pieces = ndi.label(free)
        if n_pieces > 1:
            free = pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1
        n_cells += 1
        window[free] = n_cells
        # only what lands in the field counts (the margin is there for cells cut by its border)
        covered += free[
            max(margin - r0, 0) : margin + shape[0] - r0, max(margin - c0, 0) : margin + shape[1] - c0
        ].sum()
        centres.append((row, col, diameter / 2.0))
        failures = 0
    if style.confluent:
        labels = expand_labels(labels, distance=rng.uniform(0.15, 0.35) * style.diameter[0])
    return labels


def _optical_path(rng: np.random.Generator, labels: np.ndarray, style: Style) -> np.ndarray:
    """Optical path length map: a body per cell, nuclei, granules; 0 outside.

    Round and clumped cells are spheres in suspension: the path through a sphere rises
    from its border as a dome (``sqrt(1 - (1 - d / r) ** 2)`` of the normalised depth),
    so two touching spheres leave a wide groove between them. Spread and neurite cells
    are flat: their path reaches a plateau within a few px of the border (thin lamellae),
    neurites within about a pixel, so that their thin processes have the thickness that
    makes them visible in real phase contrast. Granules (organelles) add texture of a
    per-field strength of 3-20 % of the cell's thickness: a cell's outline, where its
    path rises from zero, stays the strongest feature, as in real label-free images (a
    texture as strong as the body once hid touching cells' contacts and whole neurites).
    """
    inside = labels > 0
    depth = ndi.distance_transform_edt(inside)
    # a thin gap between touching cells: distance to the nearest pixel of another label
    edges = np.zeros_like(inside)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    depth = np.minimum(depth, ndi.distance_transform_edt(~edges) + 0.5)
    n = int(labels.max())
    height = rng.uniform(0.6, 1.4, n + 1)
    height[0] = 0.0
    if style.morphology in ("round", "clumps"):
        peak = np.asarray(ndi.maximum(depth, labels, np.arange(n + 1)), np.float64)
        peak[0] = 1.0
        relative_depth = np.clip(depth / peak[labels], 0.0, 1.0)
        profile = np.sqrt(1.0 - (1.0 - relative_depth) ** 2)
    else:
        # how quickly a cell reaches its plateau thickness (px)
        flatness = rng.uniform(*((0.7, 1.5) if style.morphology == "neurite" else (1.5, 5.0)), n + 1)
        profile = 1.0 - np.exp(-depth / flatness[labels])
    path = height[labels] * profile
    # nuclei: a bump around each cell's deepest point
    if n:
        centre = ndi.maximum_position(depth, labels, np.arange(1, n + 1))
        bumps = np.zeros(labels.shape, np.float32)
        rows, cols = np.array(centre, dtype=int).reshape(-1, 2).T
        bumps[rows, cols] = rng.uniform(0.2, 0.6, n) * height[1:] * 30.0
        sigma = 0.18 * float(np.mean(style.diameter))
        path += ndi.gaussian_filter(bumps, sigma) * sigma**2 / 30.0 * 6.0 * inside
    grains = ndi.gaussian_filter(rng.normal(0.0, 1.0, labels.shape), rng.uniform(0.7, 1.5))
    texture = np.exp(rng.uniform(np.log(0.03), np.log(0.2)))  # granule std / cell thickness
    path += texture * height[labels] * grains / max(float(grains.std()), 1e-6)
    return path.astype(np.float32)


def _debris(rng: np.random.Generator, shape: tuple[int, int], amount: float) -> np.ndarray:
    """Optical path of specks, small blobs and fibres that are not cells."""
    debris = np.zeros(shape, np.float32)
    n_specks = rng.poisson(40 * amount * shape[0] * shape[1] / 512**2)
    rows, cols = rng.integers(0, shape[0], n_specks), rng.integers(0, shape[1], n_specks)
    debris[rows, cols] = rng.choice([-1.0, 1.0], n_specks) * rng.uniform(3.0, 12.0, n_specks)
    for _ in range(rng.poisson(3 * amount * shape[0] * shape[1] / 512**2)):
        row, col = rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] - 6)
        blob = np.hypot(*np.ogrid[-5:6, -5:6]) <= rng.uniform(1.5, 4.0)
        debris[row - 5 : row + 6, col - 5 : col + 6] += rng.uniform(0.3, 1.0) * blob
    if rng.random() < 0.3 * amount:
        fibre = _stroke(
            shape, rng.uniform(0, shape[0], 2), rng.uniform(0, 2 * np.pi), shape[0] * 0.4, 1.5, 0.02, rng
        )
        debris += 0.5 * fibre
    return ndi.gaussian_filter(debris, 0.8)


# --------------------------------------------------------------------------- optics


def _image_formation(rng: np.random.Generator, path: np.ndarray, style: Style, defocus: float) -> np.ndarray:
    """Relative intensity (1 = background) of the optical path under the style's optics,
    ``defocus`` px out of focus.

    Out of focus, brightfield fringes widen (the Laplacian is taken at the focus scale
    and the defocus combined) but keep their contrast, as the transport-of-intensity
    equation has it: defocusing is what makes unstained cells visible in brightfield.
    Blurring the in-focus fringes instead would wash them out below the shot noise. Phase
    contrast and DIC images are blurred.
    """
    if style.modality == "brightfield":
        sigma = float(np.hypot(rng.uniform(1.0, 2.5), defocus))
        fringes = -ndi.gaussian_laplace(path, sigma) * sigma**2
        sign = 1.0 if rng.random() < 0.5 else -1.0  # over- or under-focus: rim dark or bright
        absorption = rng.uniform(0.0, 0.06) * ndi.gaussian_filter(path, defocus)  # sigma 0: unchanged
        return (1.0 + sign * rng.uniform(0.15, 0.5) * fringes - absorption).astype(np.float32)
    if style.modality == "phase":
        halo = rng.uniform(0.15, 0.45) * float(np.mean(style.diameter))  # wider annulus: wider halo
        contrast = path - ndi.gaussian_filter(path, halo)
        sign = -1.0 if rng.random() < 0.85 else 1.0  # positive phase contrast (dark cells) mostly
        relative = 1.0 + sign * rng.uniform(0.15, 0.45) * contrast
    elif style.modality == "dic":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        smooth = ndi.gaussian_filter(path, rng.uniform(0.8, 1.5))
        shear = np.cos(angle) * ndi.sobel(smooth, 0) + np.sin(angle) * ndi.sobel(smooth, 1)
        relative = 1.0 + rng.uniform(0.04, 0.12) * shear
    else:
        raise ValueError(f"unknown modality {style.modality!r}")
    return ndi.gaussian_filter(relative, defocus).astype(np.float32)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative illumination: off-centre vignetting, a tilt and a soft blotch."""
    row = np.linspace(-0.5, 0.5, shape[0])[:, None] - rng.uniform(-0.2, 0.2)
    col = np.linspace(-0.5, 0.5, shape[1])[None, :] - rng.uniform(-0.2, 0.2)
    vignette = 1.0 - rng.uniform(0.0, 0.6) * (row**2 + col**2)
    tilt = 1.0 + rng.normal(0.0, 0.1) * row + rng.normal(0.0, 0.1) * col
    blotch = ndi.gaussian_filter(rng.normal(0.0, 1.0, (8, 8)), 1.0)
    blotch = ndi.zoom(blotch, (shape[0] / 8, shape[1] / 8), order=1)[: shape[0], : shape[1]]
    return (vignette * tilt * (1.0 + rng.uniform(0.0, 0.15) * blotch)).astype(np.float32)


def _visible_exposure(relative: np.ndarray, labels: np.ndarray) -> float:
    """Background photons per pixel at which the typical cell's contrast is
    :data:`_VISIBLE_CONTRAST_TO_NOISE` times the shot noise.

    The contrast of a cell is the root-mean-square of ``relative - 1`` over the cell
    and 2 px around it (fringes and halos lie on its border); the median over the cells
    is the field's. A user exposes long enough to see the cells and only annotates cells
    they see: faint optics drawn with few photons rendered fields whose cells were below
    the noise (the typical cell of 1 in 16 brightfield_round fields at 0.4 times it).
    """
    if not labels.any():
        return 0.0
    grown = expand_labels(labels, 2)
    squared = ndi.mean((relative - 1.0) ** 2, grown, np.unique(grown[grown > 0]))
    contrast = float(np.sqrt(np.median(squared)))
    return (_VISIBLE_CONTRAST_TO_NOISE / max(contrast, 1e-3)) ** 2


def _to_dtype(rng: np.random.Generator, signal: np.ndarray, dtype: str) -> np.ndarray:
    """Scale expected photon counts into the stored dtype, with shot and read noise."""
    counts = rng.poisson(np.clip(signal, 0.0, None)).astype(np.float32)
    counts += rng.normal(0.0, rng.uniform(1.0, 6.0), signal.shape).astype(np.float32)
    if dtype == "float32":
        return (counts * rng.uniform(1e-3, 1.0)).astype(np.float32)
    top = {"uint8": 255.0, "uint16": 4095.0, "uint16_full": 65535.0}[dtype]
    # background lands between 25 % and 65 % of the range, as exposure is usually set
    gain = rng.uniform(0.25, 0.65) * top / float(np.median(signal))
    stored = np.clip(np.rint(counts * gain + rng.uniform(0.0, 0.05) * top), 0, top)
    return stored.astype(np.uint8 if dtype == "uint8" else np.uint16)


def render_style_field(
    rng: np.random.Generator, style: Style | str, shape: tuple[int, int] = (256, 256)
) -> tuple[np.ndarray, np.ndarray]:
    """Render one field of a style with its instance ground truth.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness; the same state gives the same field.
    style : Style or str
        A :class:`Style`, a name in :data:`STYLES` or :data:`DEMO_STYLE`.
    shape : (int, int)
        Field size (rows, cols), each at least 64.

    Returns
    -------
    image : (Y, X) array of the style's dtype (uint8, uint16 or float32)
    labels : (Y, X) int32
        Instances, 0 background, 1..n cells (touching, never overlapping).
    """
    if style == DEMO_STYLE:
        return _render_demo_field(rng, shape)
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; available: {[*sorted(STYLES), DEMO_STYLE]}")
        style = STYLES[style]
    if len(shape) != 2 or min(shape) < 64:
        raise ValueError(f"shape must be two integers >= 64, got {shape!r}")
    margin = int(style.diameter[1] * (2.0 if style.morphology == "neurite" else 1.0)) + 8
    labels = _place_cells(rng, shape, style, margin)
    path = _optical_path(rng, labels, style)
    path += _debris(rng, path.shape, style.debris)
    defocus = rng.uniform(*style.defocus)
    relative = _image_formation(rng, path, style, defocus if defocus > 0.3 else 0.0)
    inner = (slice(margin, margin + shape[0]), slice(margin, margin + shape[1]))
    relative, labels = np.clip(relative[inner], 0.02, None), labels[inner]
    photons = max(rng.uniform(*style.photons), _visible_exposure(relative, labels))
    image = _to_dtype(rng, photons * _illumination(rng, shape) * relative, style.dtype)
    # slivers of cells cut by the field border are too small to annotate: not cells
    small = np.bincount(labels.ravel()) < _MIN_AREA_FRACTION * np.pi / 4.0 * style.diameter[0] ** 2
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    return image, relabel_sequential(labels)[0].astype(np.int32)


def _render_demo_field(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A field of the demo plate's look: both cell types, 5-45 cells per 512 x 512."""
    density = shape[0] * shape[1] / 512**2
    image, labels, _ = synth.render_field(
        rng,
        fraction_positive=float(rng.uniform()),
        shape=shape,
        n_cells=int(rng.integers(5, 46) * density),
        out_of_focus=bool(rng.random() < 0.1),
    )
    return image, labels


def style_rng(seed: int, style: str, index: int) -> np.random.Generator:
    """The generator of field ``index`` of ``style`` for ``seed`` (independent of order)."""
    return np.random.default_rng([seed, zlib.crc32(style.encode()), index])


def write_world(
    out_dir: str | os.PathLike,
    *,
    styles: list[str] | None = None,
    fields_per_style: int = 4,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> pathlib.Path:
    """Write fields of each style as ``{style}_{index:03d}.tif`` + ``..._masks.tif`` pairs.

    The pairs follow the Cellpose convention (image and its int32 instance mask side by
    side), so the same folder serves as annotations elsewhere.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in styles or STYLE_NAMES:
        for index in range(fields_per_style):
            image, labels = render_style_field(style_rng(seed, name, index), name, shape)
            tifffile.imwrite(out_dir / f"{name}_{index:03d}.tif", image, compression="zlib")
            tifffile.imwrite(out_dir / f"{name}_{index:03d}_masks.tif", labels, compression="zlib")
    return out_dir
