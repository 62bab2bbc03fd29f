"""Tests of metascreen.training on synthetic single-cell crops.

Toy cells: a noisy filled ellipse (brightfield-like channel 0) plus its binary mask
(channel 1), 32x32, random orientation and position; negatives are round-ish
(aspect ratio 1.0-1.4), positives elongated (2.5-3.5), with the same area range so
only the shape separates the classes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from metascreen.model import CellCNN
from metascreen.training import (
    TEMPERATURE_BOUNDS,
    augment,
    calibrated_probability,
    dataset_sha256,
    evaluate_predictions,
    fit_logistic_baseline,
    fit_temperature,
    predict_logistic_baseline,
    predict_logits,
    split_wells,
    train_classifier,
)

CROP = 32
FAST = {"width": 8, "depth": 3, "batch_size": 32, "learning_rate": 5e-3}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_cells(n: int, seed: int, size: int = CROP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced toy crops.

    Returns
    -------
    crops : (n, 2, size, size) float32; labels : (n,) int64; aspect : (n,) float64,
    the true aspect ratio (a morphology feature for the baseline).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    aspect = np.where(labels == 1, rng.uniform(2.5, 3.5, n), rng.uniform(1.0, 1.4, n))
    area = rng.uniform(25.0, 40.0, n)  # semi-axis product a * b
    minor = np.sqrt(area / aspect)
    major = aspect * minor
    angle = rng.uniform(0.0, np.pi, n)[:, None, None]
    centre = (size - 1) / 2 + rng.uniform(-2.0, 2.0, (n, 2))
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = (u / major[:, None, None]) ** 2 + (v / minor[:, None, None]) ** 2 <= 1.0
    image = mask * rng.uniform(0.5, 1.5, (n, 1, 1)) + rng.normal(0.0, 0.4, mask.shape)
    image = (image - image.mean(axis=(1, 2), keepdims=True)) / image.std(axis=(1, 2), keepdims=True)
    crops = np.stack([image, mask], axis=1).astype(np.float32)
    return crops, labels.astype(np.int64), aspect


@pytest.fixture(scope="module")
def toy() -> dict[str, np.ndarray]:
    train_x, train_y, train_aspect = make_cells(384, seed=0)
    val_x, val_y, _ = make_cells(128, seed=1)
    test_x, test_y, test_aspect = make_cells(256, seed=2)
    return {
        "train_x": train_x,
        "train_y": train_y,
        "train_aspect": train_aspect,
        "val_x": val_x,
        "val_y": val_y,
        "test_x": test_x,
        "test_y": test_y,
        "test_aspect": test_aspect,
    }


@pytest.fixture(scope="module")
def trained(toy: dict) -> dict:
    calls: list[tuple] = []
    model, history = train_classifier(
        toy["train_x"],
        toy["train_y"],
        toy["val_x"],
        toy["val_y"],
        epochs=8,
        seed=0,
        progress=lambda *args: calls.append(args),
        **FAST,
    )
    return {"model": model, "history": history, "calls": calls}


# ------------------------------------------------------------------------- training


def test_cnn_learns_toy_cells(toy: dict, trained: dict) -> None:
    model = trained["model"]
    temperature = fit_temperature(predict_logits(model, toy["val_x"]), toy["val_y"])
    probability = calibrated_probability(predict_logits(model, toy["test_x"]), temperature)
    metrics = evaluate_predictions(toy["test_y"], probability)
    print(
        f"toy held-out accuracy {metrics['accuracy']:.4f}, AUC {metrics['roc_auc']:.4f}, "
        f"T {temperature:.3f}, best epoch {trained['history']['best_epoch']}"
    )
    assert metrics["accuracy"] > 0.9
    assert metrics["balanced_accuracy"] > 0.9
    assert metrics["roc_auc"] > 0.95
    assert not model.training


def test_history_and_progress(trained: dict) -> None:
    history, calls = trained["history"], trained["calls"]
    assert len(history["train_loss"]) == len(history["val_loss"]) == len(history["val_accuracy"]) == 8
    assert history["best_epoch"] == int(np.argmin(history["val_loss"])) + 1
    assert history["best_val_loss"] == min(history["val_loss"])
    assert history["device"] == "cpu" and history["mixed_precision"] is None
    assert [c[0] for c in calls] == list(range(1, 9))
    assert all(c[1] == 8 for c in calls)
    assert [c[3] for c in calls] == history["val_loss"]
    # It learned: the best validation loss is well below chance level (log 2).
    assert history["best_val_loss"] < 0.5 * math.log(2)


def test_training_is_deterministic_for_a_seed(toy: dict) -> None:
    args = (toy["train_x"][:96], toy["train_y"][:96], toy["val_x"][:32], toy["val_y"][:32])
    settings = {"width": 4, "depth": 2, "epochs": 2, "batch_size": 32}
    rng_state = torch.get_rng_state()
    model_a, history_a = train_classifier(*args, seed=3, **settings)
    model_b, history_b = train_classifier(*args, seed=3, **settings)
    model_c, history_c = train_classifier(*args, seed=4, **settings)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    assert history_a == history_b
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    assert history_a["train_loss"] != history_c["train_loss"]
    assert not torch.equal(model_a.head.weight, model_c.head.weight)


def test_checkpoint_is_best_validation_epoch_not_last(toy: dict) -> None:
    # Validation labels are inverted: the better the model learns the task, the worse
    # its validation loss, so the best checkpoint is an early epoch.
    val_x, val_y = toy["val_x"], 1 - toy["val_y"]
    model, history = train_classifier(toy["train_x"], toy["train_y"], val_x, val_y, epochs=6, seed=0, **FAST)
    best = history["best_epoch"]
    assert best == int(np.argmin(history["val_loss"])) + 1
    assert best < 6 and history["val_loss"][-1] > history["val_loss"][best - 1] + 0.1
    logits = predict_logits(model, val_x).astype(np.float64)
    # Validation set is balanced, so the class-balanced BCE is the plain mean BCE.
    returned_loss = np.mean(np.logaddexp(0.0, -np.where(val_y == 1, logits, -logits)))
    assert returned_loss == pytest.approx(history["val_loss"][best - 1], rel=1e-5)
    assert returned_loss != pytest.approx(history["val_loss"][-1], rel=1e-3)


def test_train_rejects_bad_inputs(toy: dict) -> None:
    x, y = toy["train_x"][:16], toy["train_y"][:16]
    with pytest.raises(ValueError, match="only one class"):
        train_classifier(x, np.zeros(16, dtype=int), x, y, epochs=1)
    with pytest.raises(ValueError, match=r"train_y must have shape \(16,\)"):
        train_classifier(x, y[:8], x, y, epochs=1)
    with pytest.raises(ValueError, match="differ"):
        train_classifier(x, y, x[:, :1], y, epochs=1)
    with pytest.raises(ValueError, match="only 0 \\(negative\\) and 1"):
        train_classifier(x, y + 1, x, y, epochs=1)


def test_predict_logits_batching_mode_and_empty(toy: dict) -> None:
    torch.manual_seed(0)
    model = CellCNN(2, width=4, depth=2)  # training mode
    x = toy["test_x"][:20]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full = predict_logits(model, x, batch_size=256)
    small = predict_logits(model, x, batch_size=3)
    assert full.shape == (20,) and full.dtype == np.float32
    np.testing.assert_allclose(small, full, rtol=1e-5, atol=1e-6)
    assert model.training  # restored
    for key, value in model.state_dict().items():  # BN statistics not updated
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        np.testing.assert_allclose(full, model.eval()(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    assert predict_logits(model, x[:0]).shape == (0,)


# ------------------------------------------------------------------------ splitting


def _wells(n_per_class: int) -> pd.DataFrame:
    keys = [f"plate{i % 2}/{chr(66 + i // 10)}{i % 10:02d}" for i in range(2 * n_per_class)]
    return pd.DataFrame({"well_key": keys, "label": [i % 2 for i in range(2 * n_per_class)]})


@pytest.mark.parametrize("n_per_class", [3, 4, 8, 13])
def test_split_wells_is_by_well_stratified_and_complete(n_per_class: int) -> None:
    wells = _wells(n_per_class)
    split = split_wells(wells, seed=1)
    assert split.index.tolist() == wells["well_key"].tolist()  # each well exactly once
    assert split.index.is_unique
    assert set(split) == {"train", "val", "test"}
    table = pd.crosstab(split.to_numpy(), wells["label"].to_numpy())
    assert (table.to_numpy() >= 1).all()  # every class in every split
    expected = max(1, round(n_per_class * 0.25))
    assert table.loc["val"].tolist() == table.loc["test"].tolist() == [expected, expected]
    assert table.loc["train"].tolist() == [n_per_class - 2 * expected] * 2


def test_split_wells_is_deterministic_and_seed_dependent() -> None:
    wells = _wells(12)
    a = split_wells(wells, seed=5)
    shuffled = wells.sample(frac=1.0, random_state=0)
    b = split_wells(shuffled, seed=5)
    assert a.equals(b.loc[a.index])  # independent of row order
    assert not a.equals(split_wells(wells, seed=6))


def test_split_wells_errors() -> None:
    with pytest.raises(ValueError, match="at least 3 wells per class"):
        split_wells(_wells(2), seed=0)
    duplicated = pd.concat([_wells(3), _wells(3).iloc[:1]])
    with pytest.raises(ValueError, match="unique"):
        split_wells(duplicated, seed=0)
    with pytest.raises(ValueError, match="missing"):
        split_wells(_wells(3).drop(columns="label"), seed=0)
    with pytest.raises(ValueError, match="sum < 1"):
        split_wells(_wells(5), seed=0, val_fraction=0.5, test_fraction=0.5)


def test_split_wells_error_names_the_lost_wells_of_the_short_class() -> None:
    wells = _wells(3)
    lost = pd.DataFrame(
        {
            "well_key": ["p/Z01", "p/Z02", "p/Z03"],
            "label": [1, 0, 1],
            "reason": ["no cells segmented", "no cells segmented", "no cells segmented"],
        }
    )
    assert split_wells(wells, seed=0, lost_wells=lost).equals(split_wells(wells, seed=0))
    with pytest.raises(ValueError) as raised:
        split_wells(wells[wells["label"] == 0], seed=0, lost_wells=lost)
    message = str(raised.value)
    assert "Class 1 has 0 well(s)" in message
    assert "Left out of this class: p/Z01 (no cells segmented), p/Z03 (no cells segmented);" in message
    assert "p/Z02" not in message and "`metascreen preview`" in message
    assert message.endswith(
        'README "Your own plate"). Add labelled wells of this class to the training configuration.'
    )


def test_train_names_the_training_wells_without_cells(tmp_path) -> None:
    from metascreen import stages
    from metascreen.config import ConfigError

    # The plate: segmentation found cells in few wells; B02-B04 of the positive class have none.
    cells_per_well = {"A01": 5, "A02": 5, "A03": 5, "B01": 5, "B02": 0, "B03": 0, "B04": 0}
    tables, crops = [], []
    for well, n_cells in cells_per_well.items():
        tables.append(tmp_path / f"{well}.parquet")
        crops.append(tmp_path / f"{well}.zarr")
        stages.write_table(pd.DataFrame({"plate": ["P1"] * n_cells, "well": [well] * n_cells}), tables[-1])
        stages.write_crops(crops[-1], np.zeros((n_cells, 1, CROP, CROP), np.float32), {})
    platemap = pd.DataFrame(
        {"plate": "P1", "well": list(cells_per_well), "train_class": ["low"] * 3 + ["high"] * 4}
    )
    classes = {"negative": "low", "positive": "high"}
    settings = {"seed": 0, "val_fraction": 0.25, "test_fraction": 0.25}
    model = tmp_path / "model.safetensors"
    with pytest.raises(ConfigError) as raised:
        stages.train(tables, crops, platemap, classes, settings, {}, model, tmp_path / "evaluation.json")
    message = str(raised.value)
    assert message.startswith("Class 1 has 1 well(s); splitting by well needs at least 3 wells per class")
    assert (
        "Left out of this class: P1/B02 (no cells segmented), P1/B03 (no cells segmented), "
        "P1/B04 (no cells segmented)" in message
    )
    assert "segment.learned.cell_diameter" in message and "P1/A0" not in message
    assert not model.exists()


def test_split_wells_keeps_a_training_well_with_large_fractions() -> None:
    split = split_wells(_wells(4), seed=0, val_fraction=0.45, test_fraction=0.45)
    labels = _wells(4)["label"].to_numpy()
    for label in (0, 1):
        assert (split.to_numpy()[labels == label] == "train").sum() >= 1


# ----------------------------------------------------------------------- augmentation


def test_augment_keeps_geometry_consistent_across_channels(toy: dict) -> None:
    batch = torch.from_numpy(toy["train_x"][:64].copy())
    batch[:, 0] = batch[:, 1]  # image == mask, so any channel misalignment would show
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    mask = out[:, 1]
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    # Area changes only through the 0.9-1.1 scale jitter (area factor 0.81-1.21).
    ratio = mask.sum(dim=(1, 2)) / batch[:, 1].sum(dim=(1, 2))
    assert ratio.min() > 0.7 and ratio.max() < 1.35
    for image, m in zip(out[:, 0], mask, strict=True):
        corr = torch.corrcoef(torch.stack([image.flatten(), m.flatten()]))[0, 1]
        assert corr > 0.9
    # Geometry really changes (flips / rotations), the input is not modified.
    assert (mask != batch[:, 1]).any(dim=(1, 2)).float().mean() > 0.5
    assert torch.equal(batch[:, 0], batch[:, 1])


def test_augment_gain_spans_half_to_double_about_the_background() -> None:
    # A flat crop passes geometry, contrast, brightness and noise (all relative to the crop's
    # own spread, here 0) unchanged, so what comes out is the gain alone.
    flat = torch.ones(4000, 2, 16, 16)
    flat[:, 1] = 0.0
    out = augment(flat, torch.Generator().manual_seed(0))[:, 0]
    gain = out.mean(dim=(1, 2))
    assert torch.allclose(out, gain.view(-1, 1, 1).expand_as(out))
    assert gain.min() >= 0.5 - 1e-6 and gain.max() <= 2.0 + 1e-6
    assert gain.min() < 0.52 and gain.max() > 1.9
    # log-uniform: as many crops dimmed as brightened, a quarter beyond each of 1/sqrt(2), sqrt(2)
    log_gain = torch.log2(gain)
    assert abs(float((log_gain < 0).float().mean()) - 0.5) < 0.03
    assert abs(float((log_gain > 0.5).float().mean()) - 0.25) < 0.03
    # the background (0 after the crops' normalisation) stays 0 whatever the gain
    background = augment(torch.zeros(8, 2, 16, 16), torch.Generator().manual_seed(0))
    assert torch.equal(background, torch.zeros_like(background))


def test_augment_is_reproducible_and_handles_one_channel(toy: dict) -> None:
    batch = torch.from_numpy(toy["train_x"][:8])
    a = augment(batch, torch.Generator().manual_seed(1))
    b = augment(batch, torch.Generator().manual_seed(1))
    c = augment(batch, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    single = augment(batch[:, :1], torch.Generator().manual_seed(1))
    assert single.shape == (8, 1, CROP, CROP) and torch.isfinite(single).all()
    with pytest.raises(ValueError, match="square"):
        augment(batch[..., :16], torch.Generator())


# ----------------------------------------------------------------------- calibration


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    p = calibrated_probability(logits, temperature).astype(np.float64)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_temperature_scaling_fixes_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, 5000)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 4.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert 3.5 < temperature < 4.5
    assert _nll(overconfident, labels, temperature) < _nll(overconfident, labels) - 0.1
    # Under-confident logits get T < 1.
    assert fit_temperature(0.5 * true_logits, labels) == pytest.approx(0.5, abs=0.1)


def test_temperature_on_separable_data_hits_lower_bound() -> None:
    logits = np.array([-2.0, -1.0, 1.0, 2.0])
    assert fit_temperature(logits, np.array([0, 0, 1, 1])) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature(logits, np.ones(4, dtype=int))


def test_calibrated_probability_values() -> None:
    p = calibrated_probability(np.array([0.0, 2.0, -2.0, 1000.0, -1000.0]), 2.0)
    expected = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1.0, 0.0]
    np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-30)
    assert p.dtype == np.float32
    with pytest.raises(ValueError, match="temperature"):
        calibrated_probability(np.zeros(2), 0.0)


# ------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probability = np.array([0.15, 0.65, 0.65, 0.85, 0.35])
    m = evaluate_predictions(labels, probability)
    # Predictions at 0.5: [0, 1, 1, 1, 0] -> tn=1, fp=1, fn=1, tp=2.
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Positive/negative pairs: 0.65 beats 0.15 and ties 0.65 (0.5); 0.85 beats both;
    # 0.35 beats 0.15 only -> 4.5 / 6.
    assert m["roc_auc"] == pytest.approx(0.75)
    # Confidences [0.85, 0.65, 0.65, 0.85, 0.65], correct [1, 0, 1, 1, 0]:
    # bin [0.6, 0.7): 3 cells, conf 0.65, acc 1/3; bin [0.8, 0.9): 2 cells, conf 0.85, acc 1.
    assert m["ece"] == pytest.approx(3 / 5 * abs(0.65 - 1 / 3) + 2 / 5 * abs(0.85 - 1.0))
    rel = m["reliability"]
    assert rel["count"] == [0, 0, 0, 0, 0, 0, 3, 0, 2, 0]
    assert rel["confidence"][6] == pytest.approx(0.65) and rel["accuracy"][6] == pytest.approx(1 / 3)
    assert rel["bin_lower"][6] == pytest.approx(0.6) and rel["bin_upper"][6] == pytest.approx(0.7)
    assert math.isnan(rel["accuracy"][0])
    assert m["n"] == 5
    expected_nll = -np.mean(np.log([0.85, 0.35, 0.65, 0.85, 0.35]))
    assert m["nll"] == pytest.approx(expected_nll)


def test_metrics_edge_cases() -> None:
    one_class = evaluate_predictions(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.6]))
    assert math.isnan(one_class["roc_auc"])
    assert one_class["balanced_accuracy"] == pytest.approx(2 / 3)
    # All scores tied -> AUC 0.5; perfect ranking -> 1; reversed -> 0.
    assert evaluate_predictions(np.array([0, 1, 0, 1]), np.full(4, 0.5))["roc_auc"] == 0.5
    assert evaluate_predictions(np.array([0, 1]), np.array([0.2, 0.8]))["roc_auc"] == 1.0
    assert evaluate_predictions(np.array([0, 1]), np.array([0.8, 0.2]))["roc_auc"] == 0.0
    # Perfectly calibrated bin: confidence 0.75 with 3 of 4 correct -> ECE 0.
    calibrated = evaluate_predictions(np.array([1, 1, 1, 0]), np.full(4, 0.75))
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-12)
    # Threshold moves decisions; probability 1.0 falls in the last bin.
    strict = evaluate_predictions(np.array([0, 1]), np.array([0.6, 1.0]), threshold=0.7)
    assert strict["confusion_matrix"] == [[1, 0], [0, 1]]
    assert strict["reliability"]["count"][-1] == 1
    with pytest.raises(ValueError, match="not logits"):
        evaluate_predictions(np.array([0, 1]), np.array([-1.0, 3.0]))
    with pytest.raises(ValueError, match="N >= 1"):
        evaluate_predictions(np.array([]), np.array([]))


# ------------------------------------------------------------------------ baseline


def test_logistic_baseline_on_morphology_features(toy: dict) -> None:
    features = np.column_stack([toy["train_aspect"], np.random.default_rng(0).normal(size=384)])
    baseline = fit_logistic_baseline(features, toy["train_y"])
    np.testing.assert_allclose(baseline.mean, features.mean(axis=0))
    np.testing.assert_allclose(baseline.std, features.std(axis=0))
    assert baseline.coef[0] > 1.0 > abs(baseline.coef[1])  # aspect ratio carries the signal
    test_features = np.column_stack([toy["test_aspect"], np.zeros(256)])
    probability = predict_logistic_baseline(baseline, test_features)
    assert probability.shape == (256,)
    assert evaluate_predictions(toy["test_y"], probability)["accuracy"] > 0.95
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        predict_logistic_baseline(baseline, test_features[:, :1])
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_baseline(features, np.zeros(384, dtype=int))


def test_logistic_baseline_handles_constant_feature() -> None:
    x = np.column_stack([np.r_[np.zeros(10), np.ones(10)], np.full(20, 3.0)])
    y = np.r_[np.zeros(10, dtype=int), np.ones(10, dtype=int)]
    baseline = fit_logistic_baseline(x, y)
    assert baseline.std[1] == 1.0 and np.isfinite(baseline.coef).all()
    p = predict_logistic_baseline(baseline, x)
    assert (p[:10] < 0.5).all() and (p[10:] > 0.5).all()


# ---------------------------------------------------------------------- provenance


def test_dataset_sha256_is_sensitive_to_content_dtype_shape_and_order() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([0, 1, 0])
    reference = dataset_sha256(x, y)
    assert reference == dataset_sha256(x.copy(), y.copy())
    assert len(reference) == 64
    assert reference == dataset_sha256(np.asfortranarray(x), y)  # layout-independent
    changed = x.copy()
    changed[1, 2] += 1
    assert dataset_sha256(changed, y) != reference
    assert dataset_sha256(x.astype(np.float64), y) != reference
    assert dataset_sha256(x.reshape(4, 3), y) != reference
    assert dataset_sha256(y, x) != reference


def test_cuda_uses_mixed_precision_cpu_only_where_asked_and_fast(monkeypatch) -> None:
    from metascreen import model, training

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for amx, avx512_bf16 in ((True, False), (False, True)):  # either native bfloat16 unit
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=avx512_bf16: bf16)
        assert model.autocast_dtype(torch.device("cpu")) is None  # the classifier: float32 on CPU
        assert model.autocast_dtype(torch.device("cpu"), cpu=True) == torch.bfloat16
    # oneDNN's instruction set capped below its bfloat16 kernels
    for cap, expected in (("avx2", None), ("AVX512_CORE_VNNI", None), ("AVX512_CORE_AMX", torch.bfloat16)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert model.autocast_dtype(torch.device("cpu"), cpu=True) == expected, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name for it
    assert model.autocast_dtype(torch.device("cpu"), cpu=True) is None
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert model.autocast_dtype(torch.device("cpu"), cpu=True) is None  # emulated bf16: slower
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert model.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert model.autocast_dtype(torch.device("cuda:1"), cpu=True) == torch.float16
    # Device "auto" follows CUDA availability; without CUDA, training runs on CPU in float32.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.select_device("auto") == torch.device("cpu")
