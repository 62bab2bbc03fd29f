"""How the shipped segmenter holds up under image faults that the synthetic world does not render.

Real microscopes add what no style draws: shot noise at low light, a mottled background
(out-of-focus dirt, scratches in the plastic, medium), camera row noise, saturated halos, few
grey levels, JPEG files, motion blur, and a cell diameter told wrong. Each fault is applied to
the raw field before the segmenter's own normalisation; its strength is given in units of the
field's 0.1-99.9 percentile range (the range, below).

* ``ap50_as_rendered``: mean AP@0.5 over the pretraining styles (:data:`STYLE_FIELDS` fields
  each of the shipped weights' evaluation seed, the segmentation benchmark's fields, at the
  true median diameter). It is this benchmark's baseline.
* ``ap50_by_fault``: fault -> mean AP@0.5 over the styles; ``ratio_to_as_rendered`` the same
  over the baseline (1.0: no loss); ``ap50_by_fault_and_style`` fault -> style -> AP@0.5.
* ``ap50_dsb_as_rendered`` / ``ap50_dsb_by_fault``: the real DSB 2018 nuclei image
  (``../shared/data/dsb2018_nuclei``) as it is and under each fault, at its true median
  diameter; left out where that folder is absent.

The faults' random draws are seeded, so a run repeats exactly on one machine.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image  # a dependency of matplotlib, which the report needs
from scipy import ndimage as ndi

from metascreen import styles
from metascreen.segment import learned, train
from metascreen.segment.metrics import pooled_ap
from metascreen.segment.tiling import normalize_percentile

DSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_nuclei"
STYLE_FIELDS = 16  # as the segmentation benchmark: its "learned" column is the baseline

#: ``fault(image, rng, diameter) -> image``; ``diameter`` is the true median cell diameter (px).
Fault = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]


def _in_range_units(image: np.ndarray) -> np.ndarray:
    """``image`` with its 0.1-99.9 percentile range mapped to 0-1 (clipped there)."""
    return np.clip(normalize_percentile(image, 0.1, 99.9), 0.0, 1.0).astype(np.float64)


def _gaussian_noise(sigma: float, correlation: float) -> Fault:
    """Additive noise of ``sigma`` (range units), white or blurred to ``correlation`` px.

    Written apart from the training's grain (``metascreen.segment.train._grain``) on
    purpose: the fault must not change when the augmentation it judges does.
    """

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        noise = rng.normal(0.0, 1.0, image.shape)
        if correlation:
            noise = ndi.gaussian_filter(noise, correlation)
        return _in_range_units(image) + sigma * noise / noise.std()

    return apply


def _speckle(sigma: float) -> Fault:
    """Multiplicative noise of ``sigma``, correlated over 1.5 px (coherent illumination)."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        noise = ndi.gaussian_filter(rng.normal(0.0, 1.0, image.shape), 1.5)
        return (_in_range_units(image) + 0.2) * (1.0 + sigma * noise / noise.std())

    return apply


def _shot_noise(photons: float) -> Fault:
    """Poisson noise with ``photons`` at the top of the range (and 5 % of it as background)."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        return rng.poisson((_in_range_units(image) + 0.05) * photons).astype(np.float32)

    return apply


def _grey_levels(levels: int) -> Fault:
    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        return np.round(_in_range_units(image) * (levels - 1)).astype(np.uint8)

    return apply


def _clipped(percent: float) -> Fault:
    """Saturated at both ends: ``percent`` of the pixels clipped at each."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        low, high = np.percentile(image, (percent, 100.0 - percent))
        return np.clip(image.astype(np.float64), low, high)

    return apply


def _illumination_ramp(darkest: float) -> Fault:
    """A linear ramp of illumination along a random direction, ``darkest`` : 1 across the field."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
        angle = rng.uniform(0.0, 2.0 * np.pi)
        along = np.cos(angle) * (cols - image.shape[1] / 2) + np.sin(angle) * (rows - image.shape[0] / 2)
        along /= max(image.shape) / 2  # -1 .. 1 across the field
        return (_in_range_units(image) + 0.2) * (1.0 + (1.0 - darkest) / (1.0 + darkest) * along)

    return apply


def _row_noise(sigma: float) -> Fault:
    """A random offset per row (camera read-out)."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        return _in_range_units(image) + rng.normal(0.0, sigma, (image.shape[0], 1))

    return apply


def _motion_blur(fraction: float) -> Fault:
    """A straight smear ``fraction`` of a cell diameter long each way, in a random direction."""

    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        length = max(round(fraction * diameter), 2)
        kernel = np.zeros((2 * length + 1, 2 * length + 1))
        kernel[length] = 1.0
        kernel = ndi.rotate(kernel, rng.uniform(0.0, 180.0), reshape=False, order=1)
        return ndi.convolve(_in_range_units(image), kernel / kernel.sum(), mode="reflect")

    return apply


def _jpeg(quality: int) -> Fault:
    def apply(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray((_in_range_units(image) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer))

    return apply


def _unchanged(image: np.ndarray, rng: np.random.Generator, diameter: float) -> np.ndarray:
    return image


#: fault name -> (fault, the diameter given to the segmenter over the true one)
FAULTS: dict[str, tuple[Fault, float]] = {
    "white noise 5 %": (_gaussian_noise(0.05, 0.0), 1.0),
    "white noise 10 %": (_gaussian_noise(0.10, 0.0), 1.0),
    "mottled 1.5 px 5 %": (_gaussian_noise(0.05, 1.5), 1.0),
    "mottled 3 px 5 %": (_gaussian_noise(0.05, 3.0), 1.0),
    "mottled 8 px 5 %": (_gaussian_noise(0.05, 8.0), 1.0),
    "speckle 5 %": (_speckle(0.05), 1.0),
    "shot noise 100 photons": (_shot_noise(100.0), 1.0),
    "shot noise 20 photons": (_shot_noise(20.0), 1.0),
    "16 grey levels": (_grey_levels(16), 1.0),
    "6 grey levels": (_grey_levels(6), 1.0),
    "2 % saturated each end": (_clipped(2.0), 1.0),
    "10 % saturated each end": (_clipped(10.0), 1.0),
    "illumination ramp 1:3": (_illumination_ramp(1.0 / 3.0), 1.0),
    "row noise 2 %": (_row_noise(0.02), 1.0),
    "motion blur 0.15 diameter": (_motion_blur(0.15), 1.0),
    "jpeg quality 30": (_jpeg(30), 1.0),
    "diameter told 0.75 x": (_unchanged, 0.75),
    "diameter told 1.33 x": (_unchanged, 1.33),
}


def _ap_under(
    segmenter: tuple[Any, ...],
    fault: Fault,
    scale: float,
    fields: list[tuple[np.ndarray, np.ndarray, float]],
    seed: int,
) -> float:
    network, metadata, device = segmenter
    train_diameter = learned.trained_diameter(metadata)
    rng = np.random.default_rng(seed)
    pairs = [
        (
            labels,
            learned.segment_with_network(
                network, device, fault(image, rng, diameter), diameter * scale, train_diameter=train_diameter
            ),
        )
        for image, labels, diameter in fields
    ]
    return pooled_ap(pairs)


def run(workdir: Path) -> dict[str, Any]:
    segmenter = learned.load_segmenter(None, "cpu")
    eval_seed = segmenter[1]["eval_seed"]
    fields = {
        name: [
            (image, labels, train.median_diameter(labels))
            for _, image, labels in train.render_training_fields([name], STYLE_FIELDS, (256, 256), eval_seed)
        ]
        for name in styles.STYLE_NAMES
    }
    baseline = float(
        np.mean([_ap_under(segmenter, _unchanged, 1.0, fields[name], 0) for name in styles.STYLE_NAMES])
    )
    by_fault_and_style: dict[str, dict[str, float]] = {}
    for number, (fault_name, (fault, scale)) in enumerate(FAULTS.items()):
        by_fault_and_style[fault_name] = {
            name: _ap_under(segmenter, fault, scale, fields[name], seed=1000 * number + index)
            for index, name in enumerate(styles.STYLE_NAMES)
        }
        mean = np.mean(list(by_fault_and_style[fault_name].values()))
        print(f"  {fault_name:<28} {mean:.3f} ({mean / baseline:.2f} of as rendered)", flush=True)
    by_fault = {name: float(np.mean(list(scores.values()))) for name, scores in by_fault_and_style.items()}
    figures: dict[str, Any] = {
        "ap50_as_rendered": baseline,
        "ap50_by_fault": by_fault,
        "ratio_to_as_rendered": {name: ap / baseline for name, ap in by_fault.items()},
        "ap50_by_fault_and_style": by_fault_and_style,
    }
    if DSB.is_dir():
        truth = tifffile.imread(DSB / "mask2d.tif")
        dsb_fields = [(tifffile.imread(DSB / "img2d.tif"), truth, train.median_diameter(truth))]
        figures["ap50_dsb_as_rendered"] = _ap_under(segmenter, _unchanged, 1.0, dsb_fields, 0)
        figures["ap50_dsb_by_fault"] = {
            name: _ap_under(segmenter, fault, scale, dsb_fields, seed=1000 * number + 999)
            for number, (name, (fault, scale)) in enumerate(FAULTS.items())
        }
    return figures
