"""Fine-tuning the shipped segmenter on a few annotated fields of a look it has not seen.

* ``style``: a style held out of pretraining (:data:`metascreen.styles.HELD_OUT_STYLES`);
  ``zero_shot_ap``: AP@0.5 of the shipped weights on :data:`TEST_FIELDS` fields of it;
  ``ap_after_1_field`` / ``ap_after_2_fields``: the same fields after fine-tuning
  (:data:`metascreen.segment.train.FINETUNE_SETTINGS`) on one / two other annotated
  fields of it; ``finetune_seconds_1_field``: the wall time of that one-field
  fine-tuning (2 torch threads: a 2-core figure); the other held-out styles follow with
  the same figures as ``{style}_zero_shot_ap``, ``{style}_ap_after_1_field``, ...
* ``dsb_zero_shot_ap``: the shipped weights on the right half of the DSB 2018 nuclei image
  (``../shared/data/dsb2018_nuclei``) at the truth's median diameter, the cells
  counted by their centres; ``dsb_right_half_ap_after_left_half``: after fine-tuning
  on its left half only (the region marks the left half as annotated). NaN where the
  shared data is absent.

Every field is segmented at the median diameter of its true cells, so the figures
measure the network, not the scale estimate.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from metascreen import styles
from metascreen.annotations import check_annotation
from metascreen.segment import learned, train
from metascreen.segment.network import UNet, load_network

DSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_nuclei"
FIELD_SHAPE = (512, 512)
TEST_FIELDS = 5
THREADS = 2
_TEST_SEED, _ANNOTATION_SEED = 30_000, 40_000  # seeds neither pretraining nor evaluation use


def _fields(style: str, seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (image, labels)
        for _, image, labels in train.render_training_fields([style], count, FIELD_SHAPE, seed)
    ]


def _style(style: str) -> dict[str, float]:
    shipped, _ = load_network(learned.SHIPPED_WEIGHTS, fuse=False)
    test = _fields(style, _TEST_SEED, TEST_FIELDS)
    annotated = [
        check_annotation(f"{style} {i}", *field)
        for i, field in enumerate(_fields(style, _ANNOTATION_SEED, 2))
    ]
    started = time.perf_counter()
    one, _ = train.finetune(annotated[:1], device="cpu")
    seconds = time.perf_counter() - started
    two, _ = train.finetune(annotated, device="cpu")
    return {
        "zero_shot_ap": train.network_ap(shipped, test),
        "ap_after_1_field": train.network_ap(one, test),
        "ap_after_2_fields": train.network_ap(two, test),
        "finetune_seconds_1_field": round(seconds, 1),
    }


def _dsb() -> dict[str, float]:
    if not DSB.is_dir():
        return {"dsb_zero_shot_ap": float("nan"), "dsb_right_half_ap_after_left_half": float("nan")}
    image, truth = tifffile.imread(DSB / "img2d.tif"), tifffile.imread(DSB / "mask2d.tif")
    left = np.zeros(truth.shape, bool)
    left[:, : truth.shape[1] // 2] = True

    def right_half_ap(network: UNet) -> float:
        return train.network_ap(network, [(image, truth)], regions=[~left])

    shipped, _ = load_network(learned.SHIPPED_WEIGHTS, fuse=False)
    # the left half's labels only: the right half is not annotated
    network, _ = train.finetune(
        [check_annotation("dsb left half", image, np.where(left, truth, 0), left)], device="cpu"
    )
    return {
        "dsb_zero_shot_ap": right_half_ap(shipped),
        "dsb_right_half_ap_after_left_half": right_half_ap(network),
    }


def run(workdir: Path) -> dict:
    torch.set_num_threads(THREADS)
    primary, *others = styles.HELD_OUT_STYLES
    figures: dict = {"style": primary, **_style(primary)}
    for style in others:
        figures.update({f"{style}_{key}": value for key, value in _style(style).items()})
    return {**figures, **_dsb()}
