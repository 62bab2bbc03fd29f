"""The GPU path: both networks trained and run on CUDA, against this machine's CPU in the same run.

Where CUDA is absent, ``cuda_available`` is false and nothing else is measured (the CPU path
has its own benchmarks). Otherwise, with ``gpu_name`` and the CPU threads of the baseline:

* Segmenter training (:func:`metascreen.segment.train.train_network`, the shipped
  settings but :data:`SEGMENTER_STEPS` steps on :data:`SEGMENTER_FIELDS_PER_STYLE` fields
  per style, the same fields and seed on both devices): ``segmenter_train_steps_per_s_gpu``
  and ``_cpu``, their ratio ``segmenter_train_speedup``, and the AP@0.5 of each trained
  network on held-out seeds of every style, pooled (``segmenter_ap50_gpu_trained``,
  ``segmenter_ap50_cpu_trained``): mixed-precision training on the GPU must learn as well
  as the CPU does, not only faster.
* Classifier training (:func:`metascreen.training.train_classifier`, :data:`CLASSIFIER_EPOCHS`
  epochs on crops of segmented synthetic cells of both types, split by field):
  ``classifier_train_crops_per_s_gpu`` and ``_cpu``, ``classifier_train_speedup``, and the
  held-out accuracy of each (``classifier_accuracy_gpu_trained``, ``_cpu_trained``).
* Classifier inference (:func:`metascreen.training.predict_logits`, batches of 256):
  ``classifier_infer_crops_per_s_gpu`` and ``_cpu``, ``classifier_infer_speedup``, and the
  largest difference between the two devices' probabilities (``classifier_infer_max_abs_diff``:
  bfloat16 on the GPU against float32 on the CPU).

Segmentation inference on the GPU (``mpx_per_s_gpu``) is measured by the ``segmentation``
benchmark, on its 2048 x 2048 fields. ``gpu_peak_memory_mib``: the most GPU memory torch held.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_inference import labelled_crops
from metascreen import styles
from metascreen.segment import learned, train
from metascreen.training import calibrated_probability, predict_logits, train_classifier

SEGMENTER_STEPS = 1000
SEGMENTER_FIELDS_PER_STYLE = 8
EVAL_FIELDS_PER_STYLE = 2
CLASSIFIER_FIELDS = 16
CLASSIFIER_EPOCHS = 8
INFER_CROPS = 8192
INFER_BATCH = 256


def _train_segmenter(fields: list, device: str, seed: int, eval_seed: int) -> tuple[float, float]:
    """Steps per second of a short training run on ``device`` and the trained network's AP."""
    settings = dataclasses.replace(
        train.TrainingSettings(),
        steps=SEGMENTER_STEPS,
        fields_per_style=SEGMENTER_FIELDS_PER_STYLE,
        seed=seed,
    )
    start = time.perf_counter()
    network = train.train_network(fields, settings, device=device, progress_every=0)
    steps_per_s = SEGMENTER_STEPS / (time.perf_counter() - start)
    held_out = train.render_training_fields(styles.STYLE_NAMES, EVAL_FIELDS_PER_STYLE, (256, 256), eval_seed)
    return steps_per_s, train.network_ap(network, [field[1:] for field in held_out], device=device)


def _train_classifier(crops: np.ndarray, labels: np.ndarray, fields: np.ndarray, device: str):
    """Crops per second of training on ``device``, held-out accuracy, and the model."""
    held_out = fields >= CLASSIFIER_FIELDS * 3 // 4  # the last quarter of the fields, both types
    start = time.perf_counter()
    model, _ = train_classifier(
        crops[~held_out],
        labels[~held_out],
        crops[held_out],
        labels[held_out],
        epochs=CLASSIFIER_EPOCHS,
        device=device,
    )
    crops_per_s = CLASSIFIER_EPOCHS * int((~held_out).sum()) / (time.perf_counter() - start)
    logits = predict_logits(model, crops[held_out], device=device)
    return crops_per_s, float(((logits > 0) == labels[held_out]).mean()), model


def _inference(model: torch.nn.Module, crops: np.ndarray, device: str) -> tuple[float, np.ndarray]:
    """Crops per second of ``predict_logits`` on ``device`` (best of two, after a warm-up)."""
    model = model.to(device)
    predict_logits(model, crops[:INFER_BATCH], batch_size=INFER_BATCH, device=device)
    best = np.inf
    for _ in range(2):
        start = time.perf_counter()
        logits = predict_logits(model, crops, batch_size=INFER_BATCH, device=device)
        best = min(best, time.perf_counter() - start)
    return len(crops) / best, calibrated_probability(logits, 1.0)


def run(workdir: Path) -> dict:
    if not torch.cuda.is_available():
        return {"cuda_available": False}
    shipped = learned.load_segmenter(None, "cpu")[1]
    seed, eval_seed = shipped["data_seed"], shipped["eval_seed"]
    fields = train.render_training_fields(styles.STYLE_NAMES, SEGMENTER_FIELDS_PER_STYLE, (256, 256), seed)
    gpu_steps, gpu_ap = _train_segmenter(fields, "cuda", seed, eval_seed)
    cpu_steps, cpu_ap = _train_segmenter(fields, "cpu", seed, eval_seed)
    crops, labels, field_of_crop = labelled_crops(np.random.default_rng(0), CLASSIFIER_FIELDS)
    gpu_crops, gpu_accuracy, model = _train_classifier(crops, labels, field_of_crop, "cuda")
    cpu_crops, cpu_accuracy, _ = _train_classifier(crops, labels, field_of_crop, "cpu")
    many = crops[np.random.default_rng(1).integers(0, len(crops), INFER_CROPS)]
    gpu_infer, gpu_probability = _inference(model, many, "cuda")
    cpu_infer, cpu_probability = _inference(model, many, "cpu")
    return {
        "cuda_available": True,
        "gpu_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "segmenter_steps": SEGMENTER_STEPS,
        "segmenter_train_steps_per_s_gpu": gpu_steps,
        "segmenter_train_steps_per_s_cpu": cpu_steps,
        "segmenter_train_speedup": gpu_steps / cpu_steps,
        "segmenter_ap50_gpu_trained": gpu_ap,
        "segmenter_ap50_cpu_trained": cpu_ap,
        "classifier_crops": len(crops),
        "classifier_train_crops_per_s_gpu": gpu_crops,
        "classifier_train_crops_per_s_cpu": cpu_crops,
        "classifier_train_speedup": gpu_crops / cpu_crops,
        "classifier_accuracy_gpu_trained": gpu_accuracy,
        "classifier_accuracy_cpu_trained": cpu_accuracy,
        "classifier_infer_crops_per_s_gpu": gpu_infer,
        "classifier_infer_crops_per_s_cpu": cpu_infer,
        "classifier_infer_speedup": gpu_infer / cpu_infer,
        "classifier_infer_max_abs_diff": float(np.abs(gpu_probability - cpu_probability).max()),
        "gpu_peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
    }
