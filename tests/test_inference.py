"""Tests of metascreen.inference.classify_crops on lazy dask / zarr crop stacks."""

from __future__ import annotations

import os
import threading

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from metascreen import inference
from metascreen.model import CellCNN, ModelMetadata, load_model, save_model
from metascreen.training import calibrated_probability, predict_logits

TEMPERATURE = 1.7


@pytest.fixture(autouse=True)
def fresh_cache_and_one_thread():
    """Empty model cache per test; one torch thread (small 2-core VMs run tiny convs
    faster and more steadily single-threaded). Both restored afterwards."""
    inference._cached_model.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    inference._cached_model.cache_clear()


def _save(path, seed: int, crop_size: int = 32) -> CellCNN:
    torch.manual_seed(seed)
    net = CellCNN(2, width=4, depth=2)
    with torch.no_grad():  # non-default BatchNorm statistics
        for _ in range(3):
            net(torch.randn(8, 2, crop_size, crop_size) * 2 + 0.5)
    metadata = ModelMetadata(
        classes={"negative": "low", "positive": "high"},
        crop_size=crop_size,
        channels=["image", "mask"],
        normalisation="per-crop z-score; mask 0/1",
        width=4,
        depth=2,
        temperature=TEMPERATURE,
        seed=seed,
    )
    save_model(path, net.eval(), metadata)
    return net


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "model.safetensors"
    _save(path, seed=0)
    return path


@pytest.fixture()
def crops() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(50, 2, 32, 32)).astype(np.float32)


def _reference(model_path, x: np.ndarray) -> np.ndarray:
    model, metadata = load_model(model_path)
    return calibrated_probability(predict_logits(model, x, batch_size=64), metadata.temperature)


@pytest.fixture()
def load_counter(monkeypatch) -> list:
    calls: list = []
    real = inference.load_model

    def counting_load(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "load_model", counting_load)
    return calls


def test_uneven_chunks_match_plain_forward_and_load_once(model_path, crops, load_counter) -> None:
    lazy = da.from_array(crops, chunks=((7, 20, 3, 20), 2, 32, 32))
    result = inference.classify_crops(lazy, model_path, batch_size=8, num_workers=2)
    expected = _reference(model_path, crops)
    assert result.shape == (50,) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    assert len(load_counter) == 1  # once, not once per chunk (4 chunks)
    # The model's temperature is applied (T = 1 would give different values).
    model, _ = load_model(model_path)
    untempered = calibrated_probability(predict_logits(model, crops), 1.0)
    assert np.abs(result - untempered).max() > 1e-3
    # A second call in the same process reuses the loaded model.
    again = inference.classify_crops(lazy[5:40], model_path, batch_size=8)
    np.testing.assert_allclose(again, expected[5:40], rtol=1e-5, atol=1e-6)
    assert len(load_counter) == 1


def test_reads_zarr_lazily_like_the_pipeline(tmp_path, model_path, crops) -> None:
    store = tmp_path / "crops.zarr"
    array = zarr.create_array(store=str(store), shape=crops.shape, chunks=(16, 2, 32, 32), dtype="float32")
    array[:] = crops
    lazy = da.from_zarr(str(store))
    assert lazy.chunks[0] == (16, 16, 16, 2)
    result = inference.classify_crops(lazy, model_path, num_workers=2)
    np.testing.assert_allclose(result, _reference(model_path, crops), rtol=1e-5, atol=1e-6)


def test_chunks_across_channel_and_pixel_axes_are_merged(model_path, crops) -> None:
    lazy = da.from_array(crops.astype(np.float16), chunks=(9, 1, 16, 16))
    result = inference.classify_crops(lazy, model_path)
    expected = _reference(model_path, crops.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_cpu_threads_split_between_dask_and_torch(model_path, crops, monkeypatch) -> None:
    torch.set_num_threads(2)
    seen: dict[str, int] = {}
    real = inference.predict_logits

    def recording_predict(*args, **kwargs):
        seen[threading.current_thread().name] = torch.get_num_threads()
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_logits", recording_predict)
    lazy = da.from_array(crops, chunks=10)
    inference.classify_crops(lazy, model_path, num_workers=2)
    assert seen and set(seen.values()) == {1}  # 2 threads // 2 workers
    assert torch.get_num_threads() == 2  # budget restored for the caller
    seen.clear()
    inference.classify_crops(lazy, model_path, num_workers=1)
    assert set(seen.values()) == {2}


def test_empty_stack_returns_empty(model_path) -> None:
    empty = da.zeros((0, 2, 32, 32), dtype=np.float32, chunks=(1, 2, 32, 32))
    result = inference.classify_crops(empty, model_path)
    assert result.shape == (0,) and result.dtype == np.float32


def test_shape_mismatches_are_refused(model_path) -> None:
    with pytest.raises(ValueError, match=r"Crop size mismatch: the data has 24x24.*32x32"):
        inference.classify_crops(da.zeros((4, 2, 24, 24), chunks=2), model_path)
    with pytest.raises(ValueError, match=r"Channel mismatch: the data has 1 channel"):
        inference.classify_crops(da.zeros((4, 1, 32, 32), chunks=2), model_path)
    with pytest.raises(ValueError, match=r"\(N, C, S, S\)"):
        inference.classify_crops(da.zeros((4, 32, 32), chunks=2), model_path)


def test_argument_errors(model_path, crops, tmp_path) -> None:
    with pytest.raises(TypeError, match="dask.array.from_array"):
        inference.classify_crops(crops, model_path)
    lazy = da.from_array(crops, chunks=25)
    with pytest.raises(ValueError, match="num_workers"):
        inference.classify_crops(lazy, model_path, num_workers=0)
    with pytest.raises(FileNotFoundError, match="train a model first"):
        inference.classify_crops(lazy, tmp_path / "missing.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            inference.classify_crops(lazy, model_path, device="cuda")


def test_replaced_model_file_is_reloaded(model_path, crops, load_counter) -> None:
    lazy = da.from_array(crops, chunks=25)
    first = inference.classify_crops(lazy, model_path)
    stat = model_path.stat()
    _save(model_path, seed=1)  # retrained model written to the same path
    # Same-size file: make sure the modification time differs even on coarse clocks.
    os.utime(model_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = inference.classify_crops(lazy, model_path)
    assert len(load_counter) == 2
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, _reference(model_path, crops), rtol=1e-5, atol=1e-6)
