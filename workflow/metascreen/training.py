"""Training, calibration and evaluation of the single-cell classifier.

Pure functions: numpy arrays / tensors in, models, arrays and plain dicts out. Cells
from one well are correlated (same culture, same imaging), so data are split by well,
never by cell (:func:`split_wells`). Labels are 0 = negative (lower metastatic
potential), 1 = positive (higher).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from metascreen.model import CellCNN, autocast_dtype, select_device

__all__ = [
    "LogisticBaseline",
    "augment",
    "calibrated_probability",
    "dataset_sha256",
    "evaluate_predictions",
    "fit_logistic_baseline",
    "fit_temperature",
    "predict_logistic_baseline",
    "predict_logits",
    "split_wells",
    "train_classifier",
]

#: Minimum wells per class: one each for train, validation and test.
MIN_WELLS_PER_CLASS = 3
#: Bounds of the temperature search; beyond them the fit is degenerate, not informative.
TEMPERATURE_BOUNDS = (0.05, 20.0)

ProgressCallback = Callable[[int, int, float, float, float], None]


# --------------------------------------------------------------------------- splitting


def split_wells(
    wells: pd.DataFrame,
    *,
    seed: int,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    lost_wells: pd.DataFrame | None = None,
) -> pd.Series:
    """Assign whole wells to train / val / test, stratified by class.

    Within each class the wells are shuffled with ``seed`` and cut into
    ``round(n * val_fraction)`` validation and ``round(n * test_fraction)`` test wells
    (each at least 1, leaving at least 1 for training); the rest train.

    Parameters
    ----------
    wells : pandas.DataFrame
        One row per well with columns ``well_key`` (unique str, e.g. ``"demo/B03"``)
        and ``label`` (0 or 1).
    seed : int
        Seed of the shuffle; the same seed gives the same split.
    val_fraction, test_fraction : float
        Target fractions of each class's wells; each in (0, 1), sum < 1.
    lost_wells : pandas.DataFrame, optional
        Labelled wells that were left out before the split (columns ``well_key``,
        ``label``, ``reason``, e.g. ``"no cells segmented"``); the error of a class with
        too few wells names its lost wells and why.

    Returns
    -------
    pandas.Series
        ``"train"``, ``"val"`` or ``"test"`` indexed by ``well_key`` (input order),
        named ``"split"``.

    Raises
    ------
    ValueError
        If a column is missing, a well is duplicated, a label or fraction is out of
        range, or a class has fewer than :data:`MIN_WELLS_PER_CLASS` wells.
    """
    missing = {"well_key", "label"} - set(wells.columns)
    if missing:
        raise ValueError(f"split_wells needs columns well_key and label; missing {sorted(missing)}.")
    if wells["well_key"].duplicated().any():
        dupes = sorted(wells.loc[wells["well_key"].duplicated(), "well_key"].astype(str))[:5]
        raise ValueError(f"well_key must be unique (one row per well); duplicated: {dupes}.")
    labels = wells["label"].to_numpy()
    if not np.isin(labels, [0, 1]).all():
        raise ValueError("label must be 0 (negative) or 1 (positive) for every well.")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no wells "
            "for training; make the sum < 1."
        )
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=pd.Index(wells["well_key"], name="well_key"), name="split")
    for label in (0, 1):
        # Sorting first makes the split independent of the input row order.
        keys = np.sort(wells.loc[labels == label, "well_key"].to_numpy(dtype=object))
        n = len(keys)
        if n < MIN_WELLS_PER_CLASS:
            raise ValueError(
                f"Class {label} has {n} well(s); splitting by well needs at least "
                f"{MIN_WELLS_PER_CLASS} wells per class (one each for train, val and test)."
                f"{_lost_wells_text(lost_wells, label)} "
                "Add labelled wells of this class to the training configuration."
            )
        n_val = max(1, round(n * val_fraction))
        n_test = max(1, round(n * test_fraction))
        while n - n_val - n_test < 1:  # keep at least one training well
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        keys = keys[rng.permutation(n)]
        split[keys[:n_val]] = "val"
        split[keys[n_val : n_val + n_test]] = "test"
    return split


def _lost_wells_text(lost_wells: pd.DataFrame | None, label: int, wells_named: int = 10) -> str:
    """The sentence of :func:`split_wells`'s error naming a class's lost wells and why ("" if none)."""
    if lost_wells is None:
        return ""
    lost = lost_wells[lost_wells["label"] == label]
    if lost.empty:
        return ""
    shown = lost.iloc[:wells_named]
    named = ", ".join(shown["well_key"] + " (" + shown["reason"] + ")")
    if len(lost) > wells_named:
        named += f" and {len(lost) - wells_named} more"
    return (
        f" Left out of this class: {named}; to keep them, make segmentation find their cells (look at "
        "the masks with `metascreen preview`, set segment.learned.cell_diameter or fine-tune with "
        'segment.learned.finetune; README "Your own plate").'
    )


# ------------------------------------------------------------------------ augmentation

#: The intensity gain of :func:`augment` is drawn log-uniformly from [this, 1 / this].
_SMALLEST_GAIN = 0.5


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random microscopy augmentations, the same geometry for all channels of a crop.

    Geometry (all channels): a random element of the 8 flips/90-degree rotations
    combined with an isotropic scale in [0.9, 1.1], applied as one bilinear
    ``grid_sample`` with border padding; channels 1.. (masks) are re-binarised at 0.5.
    Intensity (channel 0 only): contrast x[0.8, 1.2] around the crop mean, brightness
    shift of +-0.1 crop standard deviations, and Gaussian noise with a standard
    deviation of up to 0.05 crop standard deviations; then a gain, log-uniform in
    [0.5, 2], about 0, which the crops' normalisation makes the background level.
    The gain is there because fields differ in how strongly their cells stand out
    (illumination, condenser, phase ring, focus): with few training wells such a
    difference can coincide with the classes, and the network would learn it instead
    of the cells' shape and texture.

    Parameters
    ----------
    batch : torch.Tensor
        Crops, shape ``(N, C, S, S)``, float.
    generator : torch.Generator
        Source of all randomness (any device; draws are moved to ``batch.device``).

    Returns
    -------
    torch.Tensor
        Augmented crops, shape ``(N, C, S, S)``, same dtype and device.
    """
    if batch.ndim != 4 or batch.shape[2] != batch.shape[3]:
        raise ValueError(f"augment expects square crops (N, C, S, S), got {tuple(batch.shape)}.")
    n = batch.shape[0]
    if n == 0:
        return batch.clone()

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(batch.device)

    # Dihedral group as 2x2 matrices: k quarter turns, optionally after a mirror.
    quarter_turns = torch.floor(draw(n) * 4)
    angle = quarter_turns * (math.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
    mirror = torch.where(draw(n) < 0.5, -1.0, 1.0)
    scale = 0.9 + 0.2 * draw(n)
    theta = torch.zeros(n, 2, 3, device=batch.device)
    theta[:, 0, 0] = cos * mirror * scale
    theta[:, 0, 1] = -sin * scale
    theta[:, 1, 0] = sin * mirror * scale
    theta[:, 1, 1] = cos * scale
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if out.shape[1] > 1:
        out[:, 1:] = (out[:, 1:] > 0.5).to(out.dtype)

    image = out[:, 0]
    mean = image.mean(dim=(1, 2), keepdim=True)
    std = image.std(dim=(1, 2), keepdim=True).nan_to_num(0.0)
    contrast = (0.8 + 0.4 * draw(n)).view(n, 1, 1)
    brightness = (0.2 * draw(n) - 0.1).view(n, 1, 1)
    noise_sd = (0.05 * draw(n)).view(n, 1, 1)
    noise = torch.randn(image.shape, generator=generator, device=generator.device).to(batch.device)
    out[:, 0] = (image - mean) * contrast + mean + (brightness + noise_sd * noise) * std
    gain = torch.exp(math.log(_SMALLEST_GAIN) * (1.0 - 2.0 * draw(n))).view(n, 1, 1)
    out[:, 0] *= gain
    return out.to(batch.dtype)


# --------------------------------------------------------------------------- training


@contextmanager
def _deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Temporarily switch torch's deterministic mode (process-global), then restore it."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: on CUDA some kernels have no deterministic variant; warn, don't fail.
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights ``n / (2 n_class)``: both classes weigh equally, mean 1."""
    counts = np.bincount(labels, minlength=2)
    return (len(labels) / (2.0 * counts))[labels]


def _balanced_bce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Class-balanced binary cross-entropy of logits (numerically stable)."""
    signed = np.where(labels == 1, logits, -logits).astype(np.float64)
    weights = _class_weights(labels)
    return float(np.sum(weights * np.logaddexp(0.0, -signed)) / np.sum(weights))


def _check_xy(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate crops ``(N, C, S, S)`` and 0/1 labels ``(N,)``; return float32 / int64."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"{name}_x must have shape (N, C, S, S), got {x.shape}.")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}_y must have shape ({x.shape[0]},) to match {name}_x, got {y.shape}.")
    if not np.isin(y, [0, 1]).all():
        raise ValueError(f"{name}_y must contain only 0 (negative) and 1 (positive).")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or infinite values; fix the crop extraction.")
    return x, y.astype(np.int64)


def train_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    width: int = 16,
    depth: int = 4,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    augmentation: bool = True,
) -> tuple[CellCNN, dict]:
    """Train a :class:`CellCNN` and return the epoch with the lowest validation loss.

    AdamW (no weight decay on biases and norm parameters) with a one-cycle learning
    rate schedule; a class-balanced binary cross-entropy (each class weighs half) for
    training and for the validation loss that selects the checkpoint. On CPU a run is
    deterministic for a seed (seeded init and shuffling, deterministic algorithms); on
    CUDA it uses ``torch.autocast`` mixed precision (bfloat16 where supported, else
    float16 with gradient scaling). The global RNG state is left untouched.

    Parameters
    ----------
    train_x, val_x : numpy.ndarray
        Crops, shape ``(N, C, S, S)``, float32.
    train_y, val_y : numpy.ndarray
        Labels 0/1, shape ``(N,)``; both classes must be present in each.
    width, depth : int
        Architecture, see :class:`CellCNN`.
    epochs, batch_size, learning_rate, weight_decay : int, int, float, float
        Optimisation settings (``learning_rate`` is the one-cycle peak).
    seed : int
        Seed of initialisation, shuffling and augmentation.
    device : str or torch.device, optional
        ``None`` = ``"auto"`` (CUDA when available).
    progress : callable, optional
        Called after every epoch as
        ``progress(epoch, n_epochs, train_loss, val_loss, val_accuracy)`` (epoch 1-based).
    augmentation : bool, default True
        Apply :func:`augment` to training batches.

    Returns
    -------
    model : CellCNN
        Weights of the best validation epoch, eval mode, on ``device``.
    history : dict
        ``train_loss``, ``val_loss``, ``val_accuracy`` (lists, one per epoch),
        ``best_epoch`` (1-based, so ``val_loss[best_epoch - 1]`` is the best),
        ``best_val_loss``, ``device`` and ``mixed_precision`` (dtype name or None).
    """
    train_x, train_y = _check_xy(train_x, train_y, "train")
    val_x, val_y = _check_xy(val_x, val_y, "val")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ValueError(f"train crops {train_x.shape[1:]} and val crops {val_x.shape[1:]} differ.")
    for name, y in (("train", train_y), ("val", val_y)):
        if np.bincount(y, minlength=2).min() == 0:
            raise ValueError(f"{name}_y has only one class; both classes are needed in {name}.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    torch_device = select_device("auto" if device is None else device)
    # float32 on CPU: the classifier is small, and its calibrated probabilities should not
    # depend on whether the processor has bfloat16 units
    amp_dtype = autocast_dtype(torch_device)

    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _deterministic_algorithms(True):
        torch.manual_seed(seed)
        model = CellCNN(train_x.shape[1], width=width, depth=depth).to(torch_device)
        generator = torch.Generator().manual_seed(seed)

        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=learning_rate,
        )
        n_train = len(train_y)
        steps_per_epoch = math.ceil(n_train / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
        )
        # Gradient scaling is only needed for float16 (bfloat16 has float32's range).
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        x_all = torch.from_numpy(train_x)
        weights_all = torch.from_numpy(_class_weights(train_y).astype(np.float32))
        y_all = torch.from_numpy(train_y.astype(np.float32))

        history: dict = {"train_loss": [], "val_loss": [], "val_accuracy": []}
        best_loss, best_epoch, best_state = math.inf, 0, None
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=generator)
            total = 0.0
            for start in range(0, n_train, batch_size):
                index = order[start : start + batch_size]
                xb = x_all[index].to(torch_device)
                if augmentation:
                    xb = augment(xb, generator)
                yb = y_all[index].to(torch_device)
                wb = weights_all[index].to(torch_device)
                with torch.autocast(torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(xb)
                loss = F.binary_cross_entropy_with_logits(logits.float(), yb, weight=wb)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += loss.item() * len(index)
            val_logits = predict_logits(model, val_x, batch_size=max(batch_size, 256))
            val_loss = _balanced_bce(val_logits, val_y)
            val_accuracy = float(np.mean((val_logits > 0) == (val_y == 1)))
            history["train_loss"].append(total / n_train)
            history["val_loss"].append(val_loss)
            history["val_accuracy"].append(val_accuracy)
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            if progress is not None:
                progress(epoch, epochs, total / n_train, val_loss, val_accuracy)

    if best_state is None:
        raise ValueError(
            "Training diverged: the validation loss was never finite; lower learning_rate "
            "or check the crops for extreme values."
        )
    model.load_state_dict(best_state)
    history.update(
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        device=str(torch_device),
        mixed_precision=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
    )
    return model.eval(), history


def predict_logits(
    model: torch.nn.Module,
    x: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Positive-class logits in eval mode without autograd, batch by batch.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, C, S, S)`` to ``(B,)`` logits. If it is in training mode it is put in
        eval mode for the call and restored afterwards.
    x : numpy.ndarray
        Crops, shape ``(N, C, S, S)``; converted to float32 one batch at a time.
    batch_size : int, default 256
        Crops per forward pass.
    device : str or torch.device, optional
        ``None`` = the model's current device; otherwise the model is moved there.

    Returns
    -------
    numpy.ndarray
        Logits, shape ``(N,)``, float32.
    """
    if x.ndim != 4:
        raise ValueError(f"predict_logits expects crops of shape (N, C, S, S), got {x.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if device is None:
        torch_device = next(model.parameters()).device
    else:
        torch_device = select_device(device)
        model.to(torch_device)
    amp_dtype = autocast_dtype(torch_device)
    was_training = model.training
    if was_training:
        model.eval()
    out = np.empty(x.shape[0], dtype=np.float32)
    try:
        with (
            torch.inference_mode(),
            torch.autocast(torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            for start in range(0, x.shape[0], batch_size):
                # torch.tensor copies: input blocks may be read-only views (zarr, dask).
                xb = torch.tensor(x[start : start + batch_size], dtype=torch.float32)
                logits = model(xb.to(torch_device))
                out[start : start + len(xb)] = logits.float().cpu().numpy()
    finally:
        if was_training:
            model.train()
    return out


# ------------------------------------------------------------------------ calibration


def _nll_at_temperature(signed_logits: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``sigmoid(signed_logit / T)``; ``signed_logits`` = (2y - 1) * logit."""
    return float(np.mean(np.logaddexp(0.0, -signed_logits / temperature)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): ``T`` minimising validation NLL.

    Golden-section search over ``log T`` in :data:`TEMPERATURE_BOUNDS`. The NLL is
    convex in ``1 / T``, hence unimodal in ``log T``, so the search finds the global
    minimum (or the bound it lies beyond, e.g. for perfectly separated logits).

    Parameters
    ----------
    logits : numpy.ndarray
        Uncalibrated logits, shape ``(N,)``.
    labels : numpy.ndarray
        0/1 labels, shape ``(N,)``; both classes must be present.

    Returns
    -------
    float
        Temperature ``T > 0``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 1 or labels.shape != logits.shape:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} must both be (N,).")
    if not np.isin(labels, [0, 1]).all() or len(np.unique(labels)) < 2:
        raise ValueError("fit_temperature needs 0/1 labels with both classes present.")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values.")
    signed = np.where(labels == 1, logits, -logits)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll_at_temperature(signed, math.exp(a)), _nll_at_temperature(signed, math.exp(b))
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll_at_temperature(signed, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll_at_temperature(signed, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated positive-class probability ``sigmoid(logits / T)``.

    Parameters
    ----------
    logits : numpy.ndarray
        Logits, shape ``(N,)``.
    temperature : float
        ``T > 0`` from :func:`fit_temperature`.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1], shape ``(N,)``, float32.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    # exp(-log(1 + exp(-z))) is sigmoid without overflow for large |z|.
    return np.exp(-np.logaddexp(0.0, -scaled)).astype(np.float32)


# ------------------------------------------------------------------------- evaluation


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U) with average ranks for ties."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct score: ties share the mean of their ranks.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][labels == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_predictions(
    labels: np.ndarray,
    probability: np.ndarray,
    *,
    threshold: float = 0.5,
    n_bins: int = 10,
) -> dict:
    """Classification and calibration metrics of positive-class probabilities.

    The predicted class is ``probability >= threshold``. Calibration follows Guo et al.
    (2017): the confidence of a prediction is the probability given to the predicted
    class; confidences fall into ``n_bins`` equal-width bins on [0, 1] (``[lo, hi)``,
    the last closed), and ECE = sum over bins of ``count / n * |accuracy - confidence|``.

    Parameters
    ----------
    labels : numpy.ndarray
        True 0/1 labels, shape ``(N,)``, N >= 1.
    probability : numpy.ndarray
        Positive-class probabilities in [0, 1], shape ``(N,)``.
    threshold : float, default 0.5
        Decision threshold.
    n_bins : int, default 10
        Calibration bins.

    Returns
    -------
    dict
        ``n``; ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present);
        ``roc_auc`` (NaN with one class); ``ece``; ``nll`` (mean log loss, probabilities
        clipped to [1e-7, 1 - 1e-7]); ``confusion_matrix`` ``[[tn, fp], [fn, tp]]``;
        ``reliability``: dict of per-bin lists ``bin_lower``, ``bin_upper``,
        ``confidence`` (mean, NaN if empty), ``accuracy`` (NaN if empty), ``count``.
    """
    labels = np.asarray(labels)
    probability = np.asarray(probability, dtype=np.float64)
    if labels.ndim != 1 or probability.shape != labels.shape or len(labels) == 0:
        raise ValueError(
            f"labels {labels.shape} and probability {probability.shape} must both be (N,), N >= 1."
        )
    if not np.isin(labels, [0, 1]).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive).")
    if not (np.isfinite(probability).all() and (probability >= 0).all() and (probability <= 1).all()):
        raise ValueError("probability must be finite and within [0, 1]; pass probabilities, not logits.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    labels = labels.astype(np.int64)
    predicted = (probability >= threshold).astype(np.int64)
    correct = predicted == labels
    tn = int(np.sum((labels == 0) & (predicted == 0)))
    fp = int(np.sum((labels == 0) & (predicted == 1)))
    fn = int(np.sum((labels == 1) & (predicted == 0)))
    tp = int(np.sum((labels == 1) & (predicted == 1)))
    recalls = [np.mean(correct[labels == c]) for c in (0, 1) if np.any(labels == c)]

    confidence = np.where(predicted == 1, probability, 1.0 - probability)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        bin_accuracy = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(labels) * np.abs(bin_accuracy[filled] - bin_confidence[filled])))
    clipped = np.clip(probability, 1e-7, 1 - 1e-7)
    nll = float(-np.mean(np.where(labels == 1, np.log(clipped), np.log1p(-clipped))))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "n": int(len(labels)),
        "accuracy": float(np.mean(correct)),
        "balanced_accuracy": float(np.mean(recalls)),
        "roc_auc": _roc_auc(labels, probability),
        "ece": ece,
        "nll": nll,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "reliability": {
            "bin_lower": edges[:-1].tolist(),
            "bin_upper": edges[1:].tolist(),
            "confidence": bin_confidence.tolist(),
            "accuracy": bin_accuracy.tolist(),
            "count": count.tolist(),
        },
    }


# --------------------------------------------------------------- logistic baseline


@dataclass(frozen=True)
class LogisticBaseline:
    """Logistic regression on standardised per-cell morphology features.

    Attributes
    ----------
    mean, std : numpy.ndarray
        Training-set feature mean and standard deviation, shape ``(F,)`` (std 0 -> 1).
    coef : numpy.ndarray
        Weights on standardised features, shape ``(F,)``.
    intercept : float
    """

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float


def fit_logistic_baseline(
    train_features: np.ndarray,
    train_y: np.ndarray,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> LogisticBaseline:
    """Fit a class-balanced, L2-regularised logistic regression with LBFGS.

    Parameters
    ----------
    train_features : numpy.ndarray
        Per-cell features (e.g. area, eccentricity, solidity), shape ``(N, F)``.
    train_y : numpy.ndarray
        0/1 labels, shape ``(N,)``, both classes present.
    l2 : float, default 1e-3
        Penalty ``l2 * ||coef||^2`` (intercept unpenalised) added to the mean loss.
    max_iter : int, default 200
        LBFGS iterations.

    Returns
    -------
    LogisticBaseline
    """
    features = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_y)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"train_features must be (N, F) and train_y (N,), got {features.shape} and {labels.shape}."
        )
    if not np.isfinite(features).all():
        raise ValueError("train_features contain NaN or infinite values; drop or impute those cells.")
    if not np.isin(labels, [0, 1]).all() or len(np.unique(labels)) < 2:
        raise ValueError("train_y must be 0/1 with both classes present.")
    labels = labels.astype(np.int64)
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = torch.from_numpy((features - mean) / std)
    y = torch.from_numpy(labels.astype(np.float64))
    w = torch.from_numpy(_class_weights(labels))
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ params[:-1] + params[-1]
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=w) + l2 * params[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = params.detach().numpy()
    return LogisticBaseline(mean=mean, std=std, coef=fitted[:-1].copy(), intercept=float(fitted[-1]))


def predict_logistic_baseline(baseline: LogisticBaseline, features: np.ndarray) -> np.ndarray:
    """Positive-class probability of the logistic baseline.

    Parameters
    ----------
    baseline : LogisticBaseline
        From :func:`fit_logistic_baseline`.
    features : numpy.ndarray
        Shape ``(N, F)``, same features and order as in training.

    Returns
    -------
    numpy.ndarray
        Probabilities, shape ``(N,)``, float32.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(baseline.coef):
        raise ValueError(
            f"features must be (N, {len(baseline.coef)}) like the training features, got {features.shape}."
        )
    logits = ((features - baseline.mean) / baseline.std) @ baseline.coef + baseline.intercept
    return calibrated_probability(logits, 1.0)


# ----------------------------------------------------------------------- provenance


def dataset_sha256(*arrays: np.ndarray) -> str:
    """SHA-256 over the dtype, shape and C-order bytes of each array, in order.

    Parameters
    ----------
    *arrays : numpy.ndarray
        E.g. ``train_x, train_y, val_x, val_y``.

    Returns
    -------
    str
        64-character hex digest; changes with any value, dtype, shape or order change.
    """
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise ValueError("dataset_sha256 hashes numeric arrays only; convert object arrays first.")
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.data)  # the buffer itself: no copy of large crop arrays
    return digest.hexdigest()
