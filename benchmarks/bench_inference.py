"""Inference throughput: lazy zarr crops through Dask against a bare torch forward pass.

``crops_per_s`` is :func:`metascreen.inference.classify_crops` reading the crops lazily from a
zarr array chunked like ``stages.measure_well`` writes it; ``bare_forward_crops_per_s`` is
the same model on the same crops, already in memory as one float32 tensor, in batches of the
same size with all threads given to torch. ``ratio`` = the first over the second: the share
of the model's own speed that survives reading, decompression, Dask scheduling and
calibration. Both are timed in alternation, best of ``REPEATS``, so load from other
processes affects them alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import zarr

from metascreen import inference, measure, stages, synth
from metascreen.model import CellCNN, ModelMetadata, load_model, save_model
from metascreen.segment import segment_label_free

N_CROPS = 20_480
CROP_SIZE = 64
BATCH_SIZE = 256
THREADS = 2
REPEATS = 2


def labelled_crops(rng: np.random.Generator, n_fields: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of segmented synthetic cells as the pipeline extracts them, from ``n_fields``
    fields alternately of the negative and of the positive type; each crop's type (0 or 1)
    and field index."""
    crops, types, fields = [], [], []
    for field in range(n_fields):
        kind = field % 2
        image, _, _ = synth.render_field(rng, fraction_positive=float(kind), shape=(512, 512), n_cells=40)
        labels = segment_label_free(image)
        table = measure.measure_cells(labels, image)
        crops.append(measure.extract_crops(image, labels, table, size=CROP_SIZE, with_mask=True))
        types.append(np.full(len(crops[-1]), kind))
        fields.append(np.full(len(crops[-1]), field))
    return np.concatenate(crops), np.concatenate(types), np.concatenate(fields)


def _write_crops(path: Path, rng: np.random.Generator) -> np.ndarray:
    """``N_CROPS`` crops tiled from real ones (random order, flips, fresh image noise) to zarr."""
    base = labelled_crops(rng, 4)[0]
    index = rng.integers(0, len(base), N_CROPS)
    crops = base[index]
    flip = rng.random(N_CROPS) < 0.5
    crops[flip] = crops[flip][..., ::-1]
    crops[:, 0] += rng.normal(0.0, 0.05, crops[:, 0].shape).astype(np.float32)
    stages.write_crops(path, crops, {})
    return crops


def _write_model(path: Path) -> None:
    """An untrained default-size model with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = CellCNN(2)
    with torch.no_grad():
        net(torch.randn(64, 2, CROP_SIZE, CROP_SIZE))
    metadata = ModelMetadata(
        classes={"negative": "low", "positive": "high"},
        crop_size=CROP_SIZE,
        channels=["image", "mask"],
        normalisation=measure.CROP_NORMALISATION,
        width=net.width,
        depth=net.depth,
        temperature=1.3,
    )
    save_model(path, net.eval(), metadata)


def _bare_forward(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one pass over ``x`` in batches of ``BATCH_SIZE``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(x), BATCH_SIZE):
            net(x[first : first + BATCH_SIZE])
    return time.perf_counter() - start


def _pipeline(crops_path: Path, model_path: Path) -> tuple[float, np.ndarray]:
    """Seconds for classify_crops over the zarr array, set up as stages.classify_well does."""
    start = time.perf_counter()
    lazy = da.from_zarr(zarr.open_array(str(crops_path), mode="r"))
    probability = inference.classify_crops(
        lazy, model_path, batch_size=BATCH_SIZE, device="cpu", num_workers=THREADS
    )
    return time.perf_counter() - start, probability


def run(workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    crops_path, model_path = workdir / "crops.zarr", workdir / "model.safetensors"
    crops = _write_crops(crops_path, rng)
    _write_model(model_path)
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        net, _ = load_model(model_path, expected_crop_size=CROP_SIZE, expected_channels=crops.shape[1])
        x = torch.from_numpy(crops)
        _bare_forward(net, x[: 2 * BATCH_SIZE])  # warm-up: allocator, oneDNN kernels
        _pipeline(crops_path, model_path)
        bare, piped = [], []
        for _ in range(REPEATS):
            bare.append(_bare_forward(net, x))
            seconds, probability = _pipeline(crops_path, model_path)
            piped.append(seconds)
    finally:
        torch.set_num_threads(before)
    assert probability.shape == (N_CROPS,) and np.isfinite(probability).all()
    crops_per_s = N_CROPS / min(piped)
    bare_per_s = N_CROPS / min(bare)
    return {
        "n_crops": N_CROPS,
        "crop_shape": list(crops.shape[1:]),
        "chunk": stages.CROP_CHUNK,
        "batch_size": BATCH_SIZE,
        "threads": THREADS,
        "crops_per_s": crops_per_s,
        "bare_forward_crops_per_s": bare_per_s,
        "ratio": crops_per_s / bare_per_s,
        "pipeline_seconds": [round(s, 3) for s in piped],
        "bare_forward_seconds": [round(s, 3) for s in bare],
    }
