"""Tests of metascreen.model: architecture, metadata, safetensors persistence, devices."""

from __future__ import annotations

import hashlib
import json
import math
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from metascreen import files as files_module
from metascreen import model as model_module
from metascreen.model import (
    CellCNN,
    ModelMetadata,
    file_sha256,
    load_model,
    save_model,
    select_device,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _metadata(**overrides: object) -> ModelMetadata:
    values: dict = {
        "classes": {"negative": "MDA-MB-231 low", "positive": "MDA-MB-231 high"},
        "crop_size": 32,
        "channels": ["image", "mask"],
        "normalisation": "per-crop z-score of the image channel; mask 0/1",
        "width": 4,
        "depth": 2,
        "temperature": 1.5,
        "training_wells": ["demo/B03", "demo/B04"],
        "training_data_sha256": "ab" * 32,
        "metrics": {"val": {"accuracy": 0.9, "roc_auc": float("nan")}},
        "seed": 7,
    }
    values.update(overrides)
    return ModelMetadata(**values)


@pytest.fixture()
def trained_like_model() -> CellCNN:
    """Small model whose BatchNorm running statistics are not the defaults."""
    torch.manual_seed(0)
    net = CellCNN(2, width=4, depth=2)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 2, 32, 32) * 3 + 1)
    return net.eval()


@pytest.mark.parametrize(("channels", "size", "depth"), [(1, 16, 3), (2, 24, 3), (2, 64, 2), (1, 33, 4)])
def test_forward_gives_one_logit_per_crop(channels: int, size: int, depth: int) -> None:
    net = CellCNN(channels, width=4, depth=depth).eval()
    out = net(torch.randn(5, channels, size, size))
    assert out.shape == (5,)
    assert torch.isfinite(out).all()
    # Last stage has width * 2**(depth-1) channels feeding the single linear output.
    assert net.head.in_features == 4 * 2 ** (depth - 1)
    assert net.head.out_features == 1


def test_forward_is_per_crop_in_eval_mode(trained_like_model: CellCNN) -> None:
    x = torch.randn(6, 2, 32, 32)
    together = trained_like_model(x)
    alone = torch.cat([trained_like_model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_forward_rejects_wrong_channel_count() -> None:
    net = CellCNN(2, width=4, depth=2)
    with pytest.raises(ValueError, match=r"\(N, 2, S, S\)"):
        net(torch.randn(3, 1, 32, 32))


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 0}, {"in_channels": 2, "width": 0}, {"in_channels": 2, "depth": -1}]
)
def test_constructor_rejects_non_positive_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        CellCNN(**kwargs)


def test_save_load_round_trip_is_exact(tmp_path, trained_like_model: CellCNN) -> None:
    path = tmp_path / "model" / "model.safetensors"
    metadata = _metadata()
    digest = save_model(path, trained_like_model, metadata)

    assert digest == file_sha256(path)
    assert len(digest) == 64
    loaded, loaded_meta = load_model(path, expected_crop_size=32, expected_channels=2)
    assert not loaded.training
    x = torch.randn(7, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_like_model(x))
    for key, value in trained_like_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    assert loaded_meta.temperature == 1.5
    assert loaded_meta.channels == ["image", "mask"]
    assert loaded_meta.training_wells == ["demo/B03", "demo/B04"]
    assert loaded_meta.seed == 7
    # NaN is not valid JSON: it is stored (and read back) as null.
    assert loaded_meta.metrics["val"]["roc_auc"] is None
    assert loaded_meta.package_versions["torch"] == torch.__version__

    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["weights_sha256"] == digest
    assert sidecar["weights_file"] == "model.safetensors"
    assert sidecar["crop_size"] == 32
    assert sidecar["metrics"]["val"]["roc_auc"] is None
    # No temporary files are left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


def test_header_metadata_matches_sidecar(tmp_path, trained_like_model: CellCNN) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, trained_like_model, _metadata())
    with safetensors.safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[model_module.METADATA_KEY])
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["weights_sha256"], sidecar["weights_file"]
    assert header == sidecar


def test_load_uses_no_pickle(tmp_path, trained_like_model: CellCNN, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, trained_like_model, _metadata())

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle-based loading was used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    net, meta = load_model(path)
    assert meta.width == 4


def test_load_refuses_pickled_checkpoint(tmp_path, trained_like_model: CellCNN) -> None:
    path = tmp_path / "m.safetensors"
    torch.save(trained_like_model.state_dict(), path)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(path)


def test_load_refuses_safetensors_without_metadata(tmp_path, trained_like_model: CellCNN) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(dict(trained_like_model.state_dict()), str(path))
    with pytest.raises(ValueError, match="no 'metascreen' metadata"):
        load_model(path)


def test_load_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train a model first"):
        load_model(tmp_path / "absent.safetensors")


def test_load_checks_crop_size_and_channels(tmp_path, trained_like_model: CellCNN) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, trained_like_model, _metadata())
    with pytest.raises(ValueError, match=r"Crop size mismatch: the data has 48x48.*trained on 32x32"):
        load_model(path, expected_crop_size=48)
    with pytest.raises(ValueError, match=r"Channel mismatch: the data has 1 channel.*expects 2"):
        load_model(path, expected_channels=1)


def test_save_refuses_metadata_of_another_architecture(tmp_path, trained_like_model: CellCNN) -> None:
    with pytest.raises(ValueError, match="does not describe the model"):
        save_model(tmp_path / "m.safetensors", trained_like_model, _metadata(width=8))
    with pytest.raises(ValueError, match="does not describe the model"):
        save_model(tmp_path / "m.safetensors", trained_like_model, _metadata(channels=["image"]))


def test_failed_save_leaves_previous_file_intact(tmp_path, trained_like_model: CellCNN, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    first = save_model(path, trained_like_model, _metadata())
    real_replace = files_module.os.replace

    def replace_then_die(src: str, dst: str) -> None:
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt  # a kill just before the weights are renamed
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace_then_die)
    with torch.no_grad():
        trained_like_model.head.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, trained_like_model, _metadata())
    assert file_sha256(path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_metadata_validation_and_numpy_coercion() -> None:
    meta = _metadata(crop_size=np.int64(32), temperature=np.float32(2.0), seed=np.int64(3))
    assert type(meta.crop_size) is int and type(meta.seed) is int
    assert meta.in_channels == 2
    json.dumps(meta.to_dict(), allow_nan=False)  # strict JSON
    with pytest.raises(ValueError, match="'negative' and 'positive'"):
        _metadata(classes={"low": "a", "high": "b"})
    with pytest.raises(ValueError, match="temperature"):
        _metadata(temperature=0.0)
    with pytest.raises(ValueError, match="crop_size"):
        _metadata(crop_size=8)
    with pytest.raises(ValueError, match="Unknown model metadata fields"):
        ModelMetadata.from_dict({**_metadata().to_dict(), "colour": "blue"})


def test_file_sha256_matches_hashlib(tmp_path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"metascreen" * 200_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_select_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device() == torch.device("cuda")
    assert select_device("cuda") == torch.device("cuda")
    assert select_device("CUDA:1") == torch.device("cuda:1")
    assert select_device("cpu") == torch.device("cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        select_device("tpu")


def test_load_model_auto_device_on_cpu(tmp_path, trained_like_model: CellCNN, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, trained_like_model, _metadata())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    net, meta = load_model(path, device="auto")
    assert next(net.parameters()).device == torch.device("cpu")
    assert math.isclose(meta.temperature, 1.5)


# ----------------------------------------------------------- a model trained elsewhere


def test_import_model_copies_a_matching_model(tmp_path, trained_like_model: CellCNN) -> None:
    from metascreen import stages

    source = tmp_path / "elsewhere" / "model.safetensors"
    save_model(source, trained_like_model, _metadata(metrics={"accuracy": 0.95}))
    source.with_suffix(".json").unlink()  # the header alone is enough
    target = tmp_path / "results" / "model.safetensors"
    stages.import_model(
        source, {"crop_size": 32, "with_mask": True}, target, tmp_path / "results" / "evaluation.json"
    )
    assert file_sha256(target) == file_sha256(source)
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["weights_sha256"] == file_sha256(target) and sidecar["crop_size"] == 32
    evaluation = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert evaluation["accuracy"] == 0.95 and evaluation["source"] == str(source)
    net, _ = load_model(target, expected_crop_size=32, expected_channels=2)
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), trained_like_model(x))


@pytest.mark.parametrize(
    ("crop_settings", "message"),
    [
        ({"crop_size": 64, "with_mask": True}, r"measure.crop_size=64.*Crop size mismatch.*trained on 32x32"),
        ({"crop_size": 32, "with_mask": False}, r"with_mask=false.*Channel mismatch.*1 channel.*expects 2"),
    ],
)
def test_import_model_refuses_mismatched_crops(
    tmp_path, trained_like_model: CellCNN, crop_settings: dict, message: str
) -> None:
    from metascreen import stages

    source = tmp_path / "model.safetensors"
    save_model(source, trained_like_model, _metadata())
    target = tmp_path / "results" / "model.safetensors"
    with pytest.raises(ValueError, match=message):
        stages.import_model(source, crop_settings, target, tmp_path / "results" / "evaluation.json")
    assert not target.exists() and not (tmp_path / "results" / "evaluation.json").exists()


def test_import_model_names_a_missing_file(tmp_path) -> None:
    from metascreen import stages

    with pytest.raises(FileNotFoundError, match=r"train.model .*absent.safetensors"):
        stages.import_model(
            tmp_path / "absent.safetensors",
            {"crop_size": 32, "with_mask": True},
            tmp_path / "m.safetensors",
            tmp_path / "e.json",
        )
