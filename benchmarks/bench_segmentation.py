"""Segmentation quality (AP@0.5), generalisation to unseen styles, and throughput.

Quality of the default backend (:data:`metascreen.segment.DEFAULT_METHOD`):

* ``ap50_synthetic`` / ``ap50_synthetic_out_of_focus``: pooled ``TP / (TP + FP + FN)``
  over in-focus / strongly defocused demo-plate fields (:func:`metascreen.synth.render_field`).
* ``ap50_dsb``: the ``nuclei`` backend on the DSB 2018 nuclei image of the shared data
  (``../shared/data/dsb2018_nuclei``, 125 nuclei); NaN where that folder is absent.

The learned backend, with the shipped weights, against ``label_free``:

* ``ap50_by_style`` / ``ap50_by_style_label_free``: AP@0.5 per style of
  :mod:`metascreen.styles` on fields of seeds no training field used, at their true
  cell diameter; ``ap50_by_style_augmented`` the same with test-time augmentation
  (``augment``: outputs averaged over each field and its mirror images).
* ``ap50_leave_one_style_out``: for each style, a network trained at reduced budget
  (:data:`LOSO_STEPS` steps, env ``METASCREEN_BENCH_LOSO_STEPS``, of the
  :data:`LOSO_BASE_CHANNELS`-channel network on the fields of :data:`LOSO_SEED`) on every
  *other* style, scored on that unseen style; ``ap50_reduced_all_styles`` is the same
  budget trained on all styles, so the gap measures what being unseen costs.
* ``errors_by_style``: how the learned backend loses the cells it misses, per style on
  the same fields at their true diameter (:func:`metascreen.segment.error_types`: true
  cells matched, missed, merged with a neighbour, split, of the wrong shape; and
  spurious predictions).
* ``ap50_by_style_perfect_maps``: the ceiling of the learned backend's representation
  and cell recovery, per style on the same fields: the cells recovered from the training
  targets themselves, as from a network that predicted them exactly
  (:func:`metascreen.segment.train.perfect_maps_ap`); ``ap50_dsb_perfect_maps`` the same
  on the DSB nuclei image.
* ``diameter_estimate_ratio_by_style`` / ``ap50_by_style_auto``: the plate estimate of
  the cell diameter (``auto``: :func:`metascreen.segment.learned.estimate_cell_diameter`
  on the same fields, pooled) over the true median diameter, and AP@0.5 at that estimate.
* ``ap50_dsb_learned`` / ``ap50_dsb_learned_augmented``: zero-shot on the DSB nuclei
  image (the latter with test-time augmentation), cell diameter estimated
  (``auto``); ``dsb_estimated_diameter`` the estimate (the truth's median is 23.7 px);
  ``errors_dsb_learned`` how the one pass loses nuclei (as ``errors_by_style``).

Throughput on 2048 x 2048 fields of ~600 cells, one thread (a per-core figure):

* ``mpx_per_s_per_core``: segmentation + measurement + crops with the default backend.
* ``mpx_per_s_per_core_learned`` / ``mpx_per_s_per_core_label_free``: segmentation
  alone, both backends on the same fields in the same run (the learned one in the
  precision it picks for this CPU: bfloat16 where the CPU has it natively), and
  ``mpx_per_s_per_core_learned_float32`` in float32 (``precision="float32"``, the same
  as ``learned`` on CPUs without bfloat16), ``mpx_per_s_per_core_learned_augmented`` with
  test-time augmentation; ``mpx_per_s_gpu`` and
  ``gpu_name`` for the learned backend when CUDA is available.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # effective when numpy is not imported yet

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from metascreen import measure, segment, styles, synth  # noqa: E402
from metascreen.segment import learned, train  # noqa: E402
from metascreen.segment.network import save_network  # noqa: E402

DSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_nuclei"
SYNTHETIC_FIELDS = 6
# AP of a style on 4 fields rested on ~30 cells for the largest (a standard error near 0.08,
# too coarse to judge a 0.95 target): 16 fields give every style over 100 cells
STYLE_FIELDS = 16
BIG_SHAPE = (2048, 2048)
BIG_CELLS = 600
BIG_FIELDS = 2
REPEATS = 2
LOSO_STEPS = int(os.environ.get("METASCREEN_BENCH_LOSO_STEPS", "2000"))
LOSO_FIELDS_PER_STYLE = 8
# the reduced budget is a narrower network too (16 channels train in half the time of the
# shipped 24: 18 networks in ~50 min on 2 cores), on fixed fields whatever seed the shipped
# weights were trained on
LOSO_BASE_CHANNELS = 16
LOSO_SEED = 0


def _synthetic_ap(out_of_focus: bool) -> float:
    pairs = []
    for index in range(SYNTHETIC_FIELDS):
        rng = np.random.default_rng(1000 + index)
        image, truth, _ = synth.render_field(
            rng, fraction_positive=index / (SYNTHETIC_FIELDS - 1), n_cells=40, out_of_focus=out_of_focus
        )
        diameter = (
            {"cell_diameter": train.median_diameter(truth)} if segment.DEFAULT_METHOD == "learned" else {}
        )
        pairs.append((truth, segment.segment(image, segment.DEFAULT_METHOD, **diameter)))
    return segment.pooled_ap(pairs)


def _dsb() -> dict[str, Any]:
    if not DSB.is_dir():
        return {
            "ap50_dsb": float("nan"),
            "ap50_dsb_learned": float("nan"),
            "ap50_dsb_learned_augmented": float("nan"),
            "errors_dsb_learned": None,
            "ap50_dsb_perfect_maps": float("nan"),
            "dsb_estimated_diameter": float("nan"),
        }
    image = tifffile.imread(DSB / "img2d.tif")
    truth = tifffile.imread(DSB / "mask2d.tif")
    estimate = learned.estimate_cell_diameter([image])["cell_diameter"]
    one_pass, augmented = (
        segment.segment(image, "learned", cell_diameter=estimate, augment=augment)
        for augment in (False, True)
    )
    return {
        "ap50_dsb": segment.pooled_ap([(truth, segment.segment(image, "nuclei"))]),
        "ap50_dsb_learned": segment.pooled_ap([(truth, one_pass)]),
        "ap50_dsb_learned_augmented": segment.pooled_ap([(truth, augmented)]),
        "errors_dsb_learned": segment.error_types(truth, one_pass),
        "ap50_dsb_perfect_maps": train.perfect_maps_ap([(image, truth)]),
        "dsb_estimated_diameter": estimate,
    }


Fields = dict[str, list[tuple[np.ndarray, np.ndarray]]]


def _evaluation_fields(seed: int) -> Fields:
    """Style name -> ``(image, labels)`` of its :data:`STYLE_FIELDS` fields of ``seed``."""
    return {
        name: [
            (image, labels)
            for _, image, labels in train.render_training_fields([name], STYLE_FIELDS, (256, 256), seed)
        ]
        for name in styles.STYLE_NAMES
    }


def _auto_diameter_by_style(fields_of: Fields) -> dict[str, dict[str, float]]:
    ratios, scores = {}, {}
    for name, fields in fields_of.items():
        truth = np.median(np.concatenate([learned.equivalent_diameters(labels) for _, labels in fields]))
        estimate = learned.estimate_cell_diameter([image for image, _ in fields])["cell_diameter"]
        ratios[name] = float(estimate / truth)
        scores[name] = segment.pooled_ap(
            [(labels, segment.segment(image, "learned", cell_diameter=estimate)) for image, labels in fields]
        )
    return {"diameter_estimate_ratio_by_style": ratios, "ap50_by_style_auto": scores}


def _errors_by_style(fields_of: Fields) -> dict[str, dict[str, int]]:
    errors = {}
    for name, fields in fields_of.items():
        counts = [
            segment.error_types(
                labels,
                segment.segment(image, "learned", cell_diameter=train.median_diameter(labels)),
            )
            for image, labels in fields
        ]
        errors[name] = {kind: sum(count[kind] for count in counts) for kind in counts[0]}
    return errors


def _label_free_by_style(fields_of: Fields) -> dict[str, float]:
    return {
        name: segment.pooled_ap([(labels, segment.segment(image, "label_free")) for image, labels in fields])
        for name, fields in fields_of.items()
    }


def _reduced_budget_run(
    path: Path, fields: list[tuple[str, np.ndarray, np.ndarray]], style_names: list[str], seed: int
) -> Path:
    """Train at the reduced budget on the ``fields`` of ``style_names``; the weights at ``path``."""
    settings = dataclasses.replace(
        train.TrainingSettings(),
        steps=LOSO_STEPS,
        fields_per_style=LOSO_FIELDS_PER_STYLE,
        base_channels=LOSO_BASE_CHANNELS,
        seed=seed,
    )
    chosen = [field for field in fields if field[0] in style_names]
    save_network(train.train_network(chosen, settings, progress_every=0), path, {"styles": style_names})
    return path


def _generalisation(workdir: Path, seed: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # training: every core, not the per-core figure's one
    everything = list(styles.STYLE_NAMES)
    # rendered once: every run trains on the same fields of the styles it keeps
    fields = train.render_training_fields(everything, LOSO_FIELDS_PER_STYLE, (256, 256), seed)
    reduced = _reduced_budget_run(workdir / "all_styles.safetensors", fields, everything, seed)
    all_styles = train.evaluate_styles(reduced, everything, fields_per_style=STYLE_FIELDS, seed=seed)
    unseen = {}
    for name in everything:
        others = [other for other in everything if other != name]
        weights = _reduced_budget_run(workdir / f"without_{name}.safetensors", fields, others, seed)
        unseen[name] = train.evaluate_styles(weights, [name], fields_per_style=STYLE_FIELDS, seed=seed)[name]
        print(
            f"  leave-one-style-out {name:<28} {unseen[name]:.3f} (all styles: {all_styles[name]:.3f})",
            flush=True,
        )
    return {"ap50_leave_one_style_out": unseen, "ap50_reduced_all_styles": all_styles}


def _segmentation_speed(images: list[np.ndarray], method: str, **parameters) -> float:
    best = []
    for image in images:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            segment.segment(image, method, **parameters)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return len(images) * BIG_SHAPE[0] * BIG_SHAPE[1] / 1e6 / sum(best)


def _throughput() -> dict[str, float | str]:
    torch.set_num_threads(1)
    images, truths = [], []
    for index in range(BIG_FIELDS):
        rng = np.random.default_rng(2000 + index)
        image, truth, _ = synth.render_field(rng, fraction_positive=0.5, shape=BIG_SHAPE, n_cells=BIG_CELLS)
        images.append(image)
        truths.append(truth)
    diameter = train.median_diameter(truths[0])
    default = {"cell_diameter": diameter, "device": "cpu"} if segment.DEFAULT_METHOD == "learned" else {}
    stages = {"segment": 0.0, "measure": 0.0, "crops": 0.0}
    n_cells = 0
    for image in images:
        best = dict.fromkeys(stages, np.inf)
        for _ in range(REPEATS):
            start = time.perf_counter()
            labels = segment.segment(image, segment.DEFAULT_METHOD, **default)
            segmented = time.perf_counter()
            table = measure.measure_cells(labels, image)
            measured = time.perf_counter()
            measure.extract_crops(image, labels, table, size=64, with_mask=True)
            cropped = time.perf_counter()
            for name, seconds in zip(
                stages, (segmented - start, measured - segmented, cropped - measured), strict=True
            ):
                best[name] = min(best[name], seconds)
        n_cells += len(table)
        for name in stages:
            stages[name] += best[name]
    megapixels = BIG_FIELDS * BIG_SHAPE[0] * BIG_SHAPE[1] / 1e6
    figures: dict[str, float | str] = {
        "megapixels": megapixels,
        "cells": n_cells,
        **{f"{name}_s_per_field": seconds / BIG_FIELDS for name, seconds in stages.items()},
        "mpx_per_s_per_core": megapixels / sum(stages.values()),
        "mpx_per_s_per_core_learned": _segmentation_speed(
            images, "learned", cell_diameter=diameter, device="cpu"
        ),
        "mpx_per_s_per_core_learned_float32": _segmentation_speed(
            images, "learned", cell_diameter=diameter, device="cpu", precision="float32"
        ),
        "mpx_per_s_per_core_learned_augmented": _segmentation_speed(
            images, "learned", cell_diameter=diameter, augment=True, device="cpu"
        ),
        "mpx_per_s_per_core_label_free": _segmentation_speed(images, "label_free"),
    }
    if torch.cuda.is_available():
        _segmentation_speed(images[:1], "learned", cell_diameter=diameter, device="cuda")  # warm-up
        figures["mpx_per_s_gpu"] = _segmentation_speed(
            images, "learned", cell_diameter=diameter, device="cuda"
        )
        figures["gpu_name"] = torch.cuda.get_device_name()
    return figures


def run(workdir: Path) -> dict:
    metadata = learned.load_segmenter(None, "cpu")[1]
    evaluation_fields = _evaluation_fields(metadata["eval_seed"])  # rendered once for both backends
    figures = {
        "default_method": segment.DEFAULT_METHOD,
        "ap50_synthetic": _synthetic_ap(out_of_focus=False),
        "ap50_synthetic_out_of_focus": _synthetic_ap(out_of_focus=True),
        **_dsb(),
        **{
            key: train.evaluate_styles(
                learned.SHIPPED_WEIGHTS,
                list(styles.STYLE_NAMES),
                fields_per_style=STYLE_FIELDS,
                seed=metadata["data_seed"],
                augment=augment,
            )
            for key, augment in (("ap50_by_style", False), ("ap50_by_style_augmented", True))
        },
        "ap50_by_style_label_free": _label_free_by_style(evaluation_fields),
        "errors_by_style": _errors_by_style(evaluation_fields),
        "ap50_by_style_perfect_maps": {
            name: train.perfect_maps_ap(fields) for name, fields in evaluation_fields.items()
        },
        **_auto_diameter_by_style(evaluation_fields),
        **_throughput(),
    }
    if LOSO_STEPS > 0:
        figures.update(_generalisation(workdir, seed=LOSO_SEED), loso_steps=LOSO_STEPS)
    return figures
