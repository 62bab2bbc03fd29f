"""Apply a trained classifier to a lazy (dask) stack of single-cell crops.

Only the computation lives here; reading the crops (e.g. ``dask.array.from_zarr``)
and writing tables is the caller's job.
"""

from __future__ import annotations

import functools
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
from dask.base import tokenize

from metascreen.model import CellCNN, ModelMetadata, load_model, select_device
from metascreen.training import calibrated_probability, predict_logits

__all__ = ["classify_crops"]


@functools.lru_cache(maxsize=4)
def _cached_model(
    path: str,
    mtime_ns: int,
    size: int,
    device: str,
    crop_size: int,
    channels: int,
) -> tuple[CellCNN, ModelMetadata]:
    """Load a model once per process per (file version, device, data shape).

    ``mtime_ns`` and ``size`` are part of the key so that a retrained model written to
    the same path is reloaded. A call whose shapes do not match raises and is not cached.
    """
    return load_model(path, expected_crop_size=crop_size, expected_channels=channels, device=device)


def classify_crops(
    crops: da.Array,
    model_path: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 1,
) -> np.ndarray:
    """Calibrated positive-class probability of every crop in a lazy stack.

    The model is loaded once (in the calling thread, through a small per-process cache)
    and shared by all chunks; each chunk of ``crops`` along ``N`` is classified in
    batches of ``batch_size`` by :func:`metascreen.training.predict_logits` and turned
    into ``sigmoid(logit / T)`` with the model's temperature ``T``.

    Threads: dask runs ``num_workers`` chunks at once and, on CPU, each chunk's torch
    ops get ``max(1, B // num_workers)`` intra-op threads, where ``B`` is
    ``torch.get_num_threads()`` at the call (set it from the job's core allowance), so
    dask x torch threads never oversubscribe the cores. ``B`` is restored afterwards.
    On CUDA all workers share the GPU and thread counts are left alone.

    Parameters
    ----------
    crops : dask.array.Array
        Crops, shape ``(N, C, S, S)``, chunked along ``N`` (other axes are merged into
        single chunks if needed); any numeric dtype, cast to float32 per chunk, already
        normalised as the model's ``metadata.normalisation`` describes.
    model_path : str or Path
        Safetensors file written by :func:`metascreen.model.save_model`.
    batch_size : int, default 256
        Crops per forward pass within a chunk.
    device : str, default "auto"
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    num_workers : int, default 1
        Dask threads.

    Returns
    -------
    numpy.ndarray
        Probabilities, shape ``(N,)``, float32, in the order of ``crops``.
    """
    if not isinstance(crops, da.Array):
        raise TypeError(
            f"crops must be a dask array, got {type(crops).__name__}; wrap in-memory arrays "
            "with dask.array.from_array(crops, chunks=(n, -1, -1, -1))."
        )
    if crops.ndim != 4 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must have shape (N, C, S, S), got {crops.shape}.")
    if batch_size < 1 or num_workers < 1:
        raise ValueError(f"batch_size and num_workers must be >= 1, got {batch_size} and {num_workers}.")
    torch_device = select_device(device)
    path = Path(model_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Model file {path} does not exist; train a model first.")
    stat = path.stat()
    model, metadata = _cached_model(
        str(path),
        stat.st_mtime_ns,
        stat.st_size,
        str(torch_device),
        int(crops.shape[2]),
        int(crops.shape[1]),
    )
    if crops.shape[0] == 0:
        return np.empty(0, dtype=np.float32)

    budget = torch.get_num_threads()
    threads_per_worker = max(1, budget // num_workers)
    temperature = metadata.temperature

    def classify_block(block: np.ndarray) -> np.ndarray:
        # set_num_threads is per calling thread for OpenMP, so each dask worker sets it.
        if torch_device.type == "cpu" and torch.get_num_threads() != threads_per_worker:
            torch.set_num_threads(threads_per_worker)
        logits = predict_logits(model, block, batch_size=batch_size)
        return calibrated_probability(logits, temperature)

    crops = crops.rechunk({1: -1, 2: -1, 3: -1})
    # An explicit name and meta stop dask from hashing the closure (and the model in it)
    # and from calling it on a dummy block to guess the output type.
    name = "metascreen-classify-" + tokenize(
        crops.name, str(path), stat.st_mtime_ns, stat.st_size, str(torch_device), batch_size
    )
    probability = da.map_blocks(
        classify_block,
        crops,
        drop_axis=(1, 2, 3),
        dtype=np.float32,
        meta=np.empty((0,), dtype=np.float32),
        name=name,
    )
    try:
        with dask.config.set(scheduler="threads", num_workers=num_workers):
            result = probability.compute()
    finally:
        if torch_device.type == "cpu":
            torch.set_num_threads(budget)
    return np.asarray(result, dtype=np.float32)
