"""Training the segmentation network from scratch on the synthetic world.

1. **Data**: fields of every chosen style of :mod:`metascreen.styles`, each from its own
   seeded generator, resized so that its cells (median equivalent diameter of its truth)
   reach :data:`~metascreen.segment.learned.TRAIN_DIAMETER`, normalised like at
   inference (:func:`~metascreen.segment.tiling.normalize_percentile`), with targets
   from :func:`~metascreen.segment.instances.training_targets`.
2. **Augmentation** for the gap between rendered and real images (domain
   randomisation): random crops at a random scale (0.7-1.4x), flips and 90-degree
   turns, elastic deformation, intensity inversion, gamma, contrast and offset, blur
   and Gaussian noise.
3. **Loss**: binary cross-entropy of the foreground and of the contact boundary (its
   positive pixels weighted 5x, as they are few), plus twice that of the normalised
   distance (soft targets). AdamW, a short linear warm-up
   and a cosine learning-rate decay.
4. **Evaluation**: AP@0.5 per style on fields of unseen seeds, segmented end to end by
   :func:`~metascreen.segment.learned.segment_learned` at their true diameter.

Deterministic for a seed on CPU (the same data, the same augmentation draws, torch's
deterministic algorithms); on CUDA the network is trained in float16 autocast.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from metascreen import styles
from metascreen.model import runtime_versions, select_device
from metascreen.segment import learned
from metascreen.segment.instances import equivalent_diameters, training_targets
from metascreen.segment.metrics import pooled_ap
from metascreen.segment.network import UNet, save_network
from metascreen.segment.tiling import normalize_percentile

__all__ = [
    "TrainingSettings",
    "evaluate_styles",
    "median_diameter",
    "pretrain",
    "render_training_fields",
    "train_network",
]

log = logging.getLogger(__name__)

_EVAL_SEED_OFFSET = 10_000  # evaluation fields use seeds no training field uses
_BOUNDARY_WEIGHT = 5.0


@dataclass(frozen=True)
class TrainingSettings:
    """Settings of :func:`train_network` (defaults: the shipped weights' run)."""

    steps: int = 10_000
    batch_size: int = 8
    crop: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    base_channels: int = 16
    depth: int = 3
    fields_per_style: int = 24
    field_shape: tuple[int, int] = (256, 256)
    seed: int = 0


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter (px) of the cells of ``labels``; the training diameter if none."""
    diameters = equivalent_diameters(labels)
    return float(np.median(diameters)) if diameters.size else learned.TRAIN_DIAMETER


def _resize_pair(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A field and its labels resized by ``factor`` (bilinear / nearest)."""
    if abs(factor - 1.0) < 1e-3:
        return image, labels
    shape = (max(round(image.shape[0] * factor), 8), max(round(image.shape[1] * factor), 8))
    x = torch.from_numpy(image)[None, None]
    resized = F.interpolate(x, size=shape, mode="bilinear", antialias=factor < 1.0, align_corners=False)[0, 0]
    rows = np.minimum((np.arange(shape[0]) + 0.5) / factor, labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) / factor, labels.shape[1] - 1).astype(int)
    return resized.numpy(), labels[np.ix_(rows, cols)]


def render_training_fields(
    style_names: Sequence[str], fields_per_style: int, shape: tuple[int, int], seed: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(style, image, labels)`` for ``fields_per_style`` fields of each style, native scale."""
    return [
        (name, *styles.render_style_field(styles.style_rng(seed, name, index), name, shape))
        for name in style_names
        for index in range(fields_per_style)
    ]


def _fields_hash(fields: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name, image, labels in fields:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


class _Pool:
    """Training fields at the training scale: normalised images and their targets."""

    def __init__(self, fields: Sequence[tuple[str, np.ndarray, np.ndarray]], crop: int) -> None:
        self.images, self.targets = [], []
        for _, image, labels in fields:
            factor = learned.TRAIN_DIAMETER / median_diameter(labels)
            image, labels = _resize_pair(normalize_percentile(image), labels, factor)
            pad = [(0, max(crop * 2 - s, 0)) for s in image.shape]  # room for scaled crops
            image, labels = np.pad(image, pad, mode="reflect"), np.pad(labels, pad, mode="reflect")
            self.images.append(image.astype(np.float32))
            self.targets.append(np.stack(training_targets(labels)))

    def batch(self, rng: np.random.Generator, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random scaled crops with flips and turns: ``(N, 1, crop, crop)``, ``(N, 3, crop, crop)``."""
        images, targets = [], []
        for _ in range(size):
            index = int(rng.integers(len(self.images)))
            image, target = self.images[index], self.targets[index]
            side = min(int(crop / rng.uniform(0.7, 1.4)), *image.shape)
            row, col = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
            x = torch.from_numpy(image[row : row + side, col : col + side].copy())[None, None]
            y = torch.from_numpy(target[:, row : row + side, col : col + side].copy())[None]
            if side != crop:
                x = F.interpolate(x, size=(crop, crop), mode="bilinear", align_corners=False)
                y = F.interpolate(y, size=(crop, crop), mode="bilinear", align_corners=False)
            turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            x, y = torch.rot90(x, turns, (2, 3)), torch.rot90(y, turns, (2, 3))
            if flip:
                x, y = x.flip(3), y.flip(3)
            images.append(x)
            targets.append(y)
        return torch.cat(images), torch.cat(targets)


def _elastic(
    rng: np.random.Generator, x: torch.Tensor, y: torch.Tensor, strength: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random displacement (a coarse noise grid upsampled), up to ~``strength`` px."""
    n, _, height, width = x.shape
    coarse = torch.from_numpy(rng.normal(0.0, 1.0, (n, 2, 5, 5)).astype(np.float32))
    shift = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    shift = shift * (strength * 2.0 / torch.tensor([width, height]).view(1, 2, 1, 1))
    base = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), (n, 1, height, width), align_corners=False)
    grid = base + shift.permute(0, 2, 3, 1)
    warp = lambda t: F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=False)  # noqa: E731
    return warp(x), warp(y)


def _intensity(rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Per-sample inversion, gamma, contrast, offset, blur and noise."""
    out = []
    for sample in x:
        if rng.random() < 0.5:
            sample = 1.0 - sample
        if rng.random() < 0.5:
            gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
            sample = sample.clamp(0.0, 1.5).pow(gamma)
        sample = sample * float(np.exp(rng.uniform(-0.5, 0.5))) + float(rng.uniform(-0.3, 0.3))
        if rng.random() < 0.3:
            sigma = float(rng.uniform(0.5, 2.0))
            sample = torch.from_numpy(ndi.gaussian_filter(sample.numpy(), (0, sigma, sigma)))
        if rng.random() < 0.5:
            sample = sample + torch.from_numpy(
                rng.normal(0.0, rng.uniform(0.01, 0.15), sample.shape).astype(np.float32)
            )
        out.append(sample)
    return torch.stack(out)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    foreground = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
    distance = F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])
    # contact boundaries are a few % of the pixels: weighted so that they are not ignored
    boundary = F.binary_cross_entropy_with_logits(
        logits[:, 2], target[:, 2], pos_weight=torch.tensor(_BOUNDARY_WEIGHT, device=logits.device)
    )
    return foreground + 2.0 * distance + boundary


def train_network(
    fields: Sequence[tuple[str, np.ndarray, np.ndarray]],
    settings: TrainingSettings,
    *,
    device: str = "auto",
    network: UNet | None = None,
    progress_every: int = 100,
) -> UNet:
    """Train (or, given ``network``, fine-tune) the U-Net on ``(style, image, labels)`` fields.

    Returns the network in eval mode on the CPU.
    """
    target = select_device(device)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    pool = _Pool(fields, settings.crop)
    network = (network or UNet(settings.base_channels, settings.depth)).to(target).train()
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    warmup = max(settings.steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1.0 + np.cos(np.pi * min(step / settings.steps, 1.0)))),
    )
    scaler = torch.amp.GradScaler(enabled=target.type == "cuda")
    # deterministic kernels on CPU for this run only: the process's setting is restored
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or target.type == "cpu")
    try:
        start, running = time.perf_counter(), 0.0
        for step in range(1, settings.steps + 1):
            x, y = pool.batch(rng, settings.batch_size, settings.crop)
            if rng.random() < 0.5:
                x, y = _elastic(rng, x, y)
            x = _intensity(rng, x)
            x, y = x.to(target, non_blocking=True), y.to(target, non_blocking=True)
            with torch.autocast(device_type=target.type, dtype=torch.float16, enabled=target.type == "cuda"):
                logits = network(x)
            loss = _loss(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            running += loss.item()
            if progress_every and step % progress_every == 0:
                log.info(
                    "step %d/%d  loss %.4f  %.1f s",
                    step,
                    settings.steps,
                    running / progress_every,
                    time.perf_counter() - start,
                )
                running = 0.0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return network.eval().cpu()


def evaluate_styles(
    weights: str | Path,
    style_names: Sequence[str],
    *,
    fields_per_style: int = 4,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    device: str = "auto",
) -> dict[str, float]:
    """AP@0.5 per style on fields of unseen seeds, each segmented at its true median diameter."""
    scores = {}
    for name in style_names:
        pairs = []
        for _, image, labels in render_training_fields(
            [name], fields_per_style, shape, seed + _EVAL_SEED_OFFSET
        ):
            predicted = learned.segment_learned(
                image, cell_diameter=median_diameter(labels), weights=str(weights), device=device
            )
            pairs.append((labels, predicted))
        scores[name] = pooled_ap(pairs)
    return scores


def pretrain(
    out: str | Path,
    *,
    style_names: Sequence[str] | None = None,
    settings: TrainingSettings = TrainingSettings(),
    device: str = "auto",
    eval_fields_per_style: int = 4,
) -> dict[str, Any]:
    """Train from scratch on the synthetic world, write weights + metadata to ``out``, and
    return the metadata (styles, seeds, data hash, settings, AP per held-out-seed style,
    versions, seconds)."""
    style_names = list(style_names or styles.STYLE_NAMES)
    started = time.perf_counter()
    fields = render_training_fields(
        style_names, settings.fields_per_style, settings.field_shape, settings.seed
    )
    log.info("rendered %d training fields of %d styles", len(fields), len(style_names))
    network = train_network(fields, settings, device=device)
    train_seconds = time.perf_counter() - started
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {
        "styles": style_names,
        "data_seed": settings.seed,
        "eval_seed": settings.seed + _EVAL_SEED_OFFSET,
        "data_sha256": _fields_hash(fields),
        "settings": {**settings.__dict__, "field_shape": list(settings.field_shape)},
        "train_diameter": learned.TRAIN_DIAMETER,
        "train_seconds": round(train_seconds, 1),
        "device": str(select_device(device)),
        "versions": runtime_versions(),
        "torch_threads": torch.get_num_threads(),
        "command": f"metascreen pretrain-segmenter --seed {settings.seed} --steps {settings.steps}"
        + (f" --styles {' '.join(style_names)}" if list(style_names) != list(styles.STYLE_NAMES) else ""),
    }
    save_network(network, out, metadata)
    learned.load_segmenter.cache_clear()
    metadata["ap50_by_style"] = evaluate_styles(
        out, style_names, fields_per_style=eval_fields_per_style, seed=settings.seed, device=device
    )
    save_network(network, out, metadata)
    learned.load_segmenter.cache_clear()
    return metadata
