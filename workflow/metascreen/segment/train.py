"""Training the segmentation network from scratch on the synthetic world, and fine-tuning it.

1. **Data**: fields of every chosen style of :mod:`metascreen.styles`, each from its own
   seeded generator, resized so that its cells (median equivalent diameter of its truth)
   reach :data:`~metascreen.segment.learned.TRAIN_DIAMETER`, normalised like at
   inference (:func:`~metascreen.segment.tiling.normalize_percentile`), with targets
   from :func:`~metascreen.segment.instances.training_targets`.
2. **Augmentation** for the gap between rendered and real images (domain
   randomisation): random crops at a random scale (0.7-1.4x), flips and 90-degree
   turns, elastic deformation, intensity inversion, gamma, contrast and offset, blur,
   Gaussian noise, and grain (blurred noise over the whole crop, as dirt, scratches
   and medium give real backgrounds, which the world leaves smooth).
3. **Loss**: binary cross-entropy of the foreground and of the contact boundary (its
   positive pixels weighted 5x, as they are few), plus twice that of the normalised
   distance (soft targets). AdamW, a short linear warm-up
   and a cosine learning-rate decay.
4. **Evaluation**: AP@0.5 per style on fields of unseen seeds, segmented end to end by
   :func:`~metascreen.segment.learned.segment_learned` at their true diameter.

Deterministic for a seed on CPU (the same data, the same augmentation draws, torch's
deterministic algorithms). On CUDA, and on CPUs with native bfloat16 arithmetic (AMX or
AVX512-BF16: about twice as fast), the network is trained in bfloat16 autocast
(:func:`metascreen.model.autocast_dtype`).

Distillation (``teacher``): a network too slow to ship (a wider one) teaches the shipped
width. Its outputs on each whole training field are blended into the targets, so the
small network learns the teacher's soft maps along with the truth.

:func:`finetune` adapts the trained network to a user's own annotated fields
(:mod:`metascreen.annotations`) with the same augmentation and loss, the loss restricted to
the annotated part of each field and the batch norms' running statistics those of
pretraining, and scores it on a held-out part before and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from metascreen import styles
from metascreen.annotations import Annotation, validation_split
from metascreen.model import autocast_dtype, file_sha256, runtime_versions, select_device
from metascreen.segment import learned
from metascreen.segment.instances import equivalent_diameters, recover_instances, training_targets
from metascreen.segment.metrics import cells_centred_in, pooled_ap
from metascreen.segment.network import UNet, load_network, save_network
from metascreen.segment.tiling import normalize_percentile, predict_tiled

__all__ = [
    "FINETUNE_SETTINGS",
    "Checkpoint",
    "TrainingSettings",
    "evaluate_styles",
    "finetune",
    "median_diameter",
    "network_ap",
    "perfect_maps_ap",
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

    steps: int = 30_000
    batch_size: int = 8
    crop: int = 112
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    base_channels: int = 24
    depth: int = 3
    branches: bool = False
    fields_per_style: int = 48
    field_shape: tuple[int, int] = (256, 256)
    seed: int = 0
    freeze_batch_norm: bool = False


#: Fine-tuning from the shipped weights on a few annotated fields: a few minutes on 2 cores.
#: The batch norms keep the running statistics of pretraining: batches of crops of one or
#: two fields would pull them towards those fields' look and unlearn the others (README,
#: "Fine-tuning on your own images").
FINETUNE_SETTINGS = TrainingSettings(steps=500, learning_rate=1e-3, freeze_batch_norm=True)


@dataclass
class Checkpoint:
    """Where :func:`train_network` saves its whole state every ``every`` steps, and
    resumes from when the file is there: a run killed by a job's time limit goes on
    from its last checkpoint, and ends with the weights an uninterrupted run gives
    (on CPU, where training is deterministic).

    ``resumed_from_step`` and ``earlier_seconds`` are filled in by
    :func:`train_network`: the step the file held and the training seconds before it.
    """

    path: Path
    every: int = 500
    resumed_from_step: int = 0
    earlier_seconds: float = 0.0


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter (px) of the cells of ``labels``; the training diameter if none."""
    diameters = equivalent_diameters(labels)
    return float(np.median(diameters)) if diameters.size else learned.TRAIN_DIAMETER


def _resized_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    return max(round(shape[0] * factor), 8), max(round(shape[1] * factor), 8)


def _resize_nearest(labels: np.ndarray, factor: float) -> np.ndarray:
    """Labels (or a mask) resized by ``factor``, nearest neighbour."""
    if abs(factor - 1.0) < 1e-3:
        return labels
    shape = _resized_shape(labels.shape, factor)
    rows = np.minimum((np.arange(shape[0]) + 0.5) / factor, labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) / factor, labels.shape[1] - 1).astype(int)
    return labels[np.ix_(rows, cols)]


def _resize_pair(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A field and its labels resized by ``factor`` (bilinear / nearest)."""
    if abs(factor - 1.0) < 1e-3:
        return image, labels
    x = torch.from_numpy(image)[None, None]
    size = _resized_shape(image.shape, factor)
    resized = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1.0, align_corners=False)[0, 0]
    return resized.numpy(), _resize_nearest(labels, factor)


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
    """Training fields at the training scale: normalised images and their targets.

    With ``regions`` (one boolean map per field, True where it was annotated) the
    targets get a fourth channel, the loss weight (1 inside, 0 outside), and crops are
    centred on annotated pixels. With a ``teacher`` network, each field's three maps are
    ``teacher_weight`` times the teacher's outputs on the whole field plus the rest of
    the truth's (distillation: soft targets that carry what a larger network learned).
    """

    def __init__(
        self,
        fields: Sequence[tuple[str, np.ndarray, np.ndarray]],
        crop: int,
        regions: Sequence[np.ndarray] | None = None,
        teacher: UNet | None = None,
        teacher_weight: float = 0.5,
        device: torch.device | str = "cpu",
    ) -> None:
        self.images, self.targets, self.annotated = [], [], []
        for index, (_, image, labels) in enumerate(fields):
            factor = learned.TRAIN_DIAMETER / median_diameter(labels)
            image, labels = _resize_pair(normalize_percentile(image), labels, factor)
            pad = [(0, max(crop * 2 - s, 0)) for s in image.shape]  # room for scaled crops
            image, labels = np.pad(image, pad, mode="reflect"), np.pad(labels, pad, mode="reflect")
            self.images.append(image.astype(np.float32))
            maps = list(training_targets(labels))
            if teacher is not None:
                taught = predict_tiled(teacher, self.images[-1], device=device)
                maps = list(teacher_weight * taught + (1.0 - teacher_weight) * np.stack(maps))
            if regions is not None:
                region = np.pad(_resize_nearest(regions[index], factor), pad, mode="constant")
                self.annotated.append(np.flatnonzero(region))
                maps.append(region.astype(np.float32))
            self.targets.append(np.stack(maps))

    def _corner(self, rng: np.random.Generator, index: int, side: int) -> tuple[int, int]:
        """Top-left corner of a crop: anywhere, or centred on a random annotated pixel."""
        shape = self.images[index].shape
        if not self.annotated:
            return int(rng.integers(0, shape[0] - side + 1)), int(rng.integers(0, shape[1] - side + 1))
        centre = self.annotated[index][rng.integers(self.annotated[index].size)]
        row, col = np.unravel_index(centre, shape)
        return (
            int(np.clip(row - side // 2, 0, shape[0] - side)),
            int(np.clip(col - side // 2, 0, shape[1] - side)),
        )

    def batch(self, rng: np.random.Generator, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random scaled crops with flips and turns: ``(N, 1, crop, crop)`` images and
        ``(N, 3 or 4, crop, crop)`` targets."""
        images, targets = [], []
        for _ in range(size):
            index = int(rng.integers(len(self.images)))
            image, target = self.images[index], self.targets[index]
            side = min(int(crop / rng.uniform(0.7, 1.4)), *image.shape)
            row, col = self._corner(rng, index, side)
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


def _grain(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Blurred white noise over a whole crop, 0.7-6 px (log-uniform), 2-12 % of the range.

    The world draws granules inside cells only: trained without this, the network took
    any grain for a cell, and a mottled background (``python -m benchmarks
    robustness``) filled fields with spurious cells.
    """
    sigma = float(np.exp(rng.uniform(np.log(0.7), np.log(6.0))))
    noise = ndi.gaussian_filter(rng.normal(0.0, 1.0, shape[-2:]), sigma)
    noise *= float(rng.uniform(0.02, 0.12)) / max(float(noise.std()), 1e-9)
    return np.broadcast_to(noise.astype(np.float32), shape).copy()


def _intensity(rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Per-sample inversion, gamma, contrast, offset, blur, noise and grain."""
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
        if rng.random() < 0.3:
            sample = sample + torch.from_numpy(_grain(rng, sample.shape))
        out.append(sample)
    return torch.stack(out)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground + 2 x distance + boundary BCE; weighted by ``target[:, 3]`` when the
    targets carry a loss weight (partly annotated fields), the plain mean otherwise."""
    pos_weight = torch.tensor(_BOUNDARY_WEIGHT, device=logits.device)
    if target.shape[1] == 3:
        foreground = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
        distance = F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])
        # contact boundaries are a few % of the pixels: weighted so that they are not ignored
        boundary = F.binary_cross_entropy_with_logits(logits[:, 2], target[:, 2], pos_weight=pos_weight)
        return foreground + 2.0 * distance + boundary
    weight = target[:, 3]
    total = weight.sum().clamp_min(1.0)

    def weighted(channel: int, **options: Any) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(
            logits[:, channel], target[:, channel], reduction="none", **options
        )
        return (loss * weight).sum() / total

    return weighted(0) + 2.0 * weighted(1) + weighted(2, pos_weight=pos_weight)


def _check_teacher_weight(teacher_weight: float) -> None:
    if not 0.0 <= teacher_weight <= 1.0:
        raise ValueError(f"the teacher's weight must lie in [0, 1], not {teacher_weight}")


def train_network(
    fields: Sequence[tuple[str, np.ndarray, np.ndarray]],
    settings: TrainingSettings,
    *,
    device: str = "auto",
    network: UNet | None = None,
    regions: Sequence[np.ndarray] | None = None,
    progress_every: int = 100,
    checkpoint: Checkpoint | None = None,
    teacher: UNet | None = None,
    teacher_weight: float = 0.5,
) -> UNet:
    """Train (or, given ``network``, fine-tune) the U-Net on ``(style, image, labels)`` fields.

    ``regions`` (one boolean map per field) restricts the loss to the annotated part of
    each field. With ``settings.freeze_batch_norm`` the batch norms normalise with their
    running statistics and keep them (their scales and shifts still learn). ``teacher``
    (a trained network, usually a wider one) distils into this one: the targets become
    ``teacher_weight`` times its outputs plus the rest of the truth's. With
    ``checkpoint``, the run saves its state there every ``checkpoint.every`` steps and
    resumes from the file if it exists; a file of another run (other settings, fields,
    initial weights or teacher) raises ValueError. Returns the network in eval mode on
    the CPU; trained with ``settings.branches``, the plain network they fold into
    (:meth:`~metascreen.segment.network.UNet.without_branches`).
    """
    _check_teacher_weight(teacher_weight)
    target = select_device(device)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    if teacher is not None:
        teacher = teacher.to(target)
    pool = _Pool(fields, settings.crop, regions, teacher, teacher_weight, target)
    network = network or UNet(settings.base_channels, settings.depth, branches=settings.branches)
    run = ""
    if checkpoint is not None:
        taught = None if teacher is None else (teacher, teacher_weight)
        run = _run_fingerprint(settings, fields, regions, network, taught)
    network = network.to(target).train()
    if settings.freeze_batch_norm:
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()  # normalises with, and keeps, its running statistics
    network = network.to(memory_format=torch.channels_last)  # ~20 % faster convolutions
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    warmup = max(settings.steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        # a Python float, not a numpy one, so that the schedule's state loads as plain data
        lambda step: float(
            min((step + 1) / warmup, 0.5 * (1.0 + np.cos(np.pi * min(step / settings.steps, 1.0))))
        ),
    )
    amp_dtype = autocast_dtype(target, cpu=True)
    scaler = torch.amp.GradScaler(target.type, enabled=amp_dtype == torch.float16)
    parts = {"network": network, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    first_step = 1
    if checkpoint is not None and checkpoint.path.exists():
        first_step = _resume(checkpoint, run, parts, rng) + 1
    # deterministic kernels on CPU for this run only: the process's setting is restored
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or target.type == "cpu")
    try:
        start, running = time.perf_counter(), 0.0
        for step in range(first_step, settings.steps + 1):
            x, y = pool.batch(rng, settings.batch_size, settings.crop)
            if rng.random() < 0.5:
                x, y = _elastic(rng, x, y)
            x = _intensity(rng, x)
            x = x.to(target, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(target, non_blocking=True)
            with torch.autocast(device_type=target.type, dtype=amp_dtype, enabled=amp_dtype is not None):
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
            if checkpoint is not None and (step % checkpoint.every == 0 or step == settings.steps):
                seconds = checkpoint.earlier_seconds + time.perf_counter() - start
                _save_checkpoint(checkpoint.path, run, step, seconds, parts, rng)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return network.eval().cpu().without_branches()


def _run_fingerprint(
    settings: TrainingSettings,
    fields: Sequence[tuple[str, np.ndarray, np.ndarray]],
    regions: Sequence[np.ndarray] | None,
    network: UNet,
    teacher: tuple[UNet, float] | None = None,
) -> str:
    """SHA-256 of what decides a training run: settings, fields, regions, initial weights,
    and the teacher's weights and share of the targets."""
    digest = hashlib.sha256(json.dumps(settings.__dict__, sort_keys=True).encode())
    digest.update(_fields_hash(fields).encode())
    for region in regions or ():
        digest.update(np.packbits(np.asarray(region, bool)).tobytes())
    networks = [network]
    if teacher is not None:
        networks.append(teacher[0])
        digest.update(f"teacher weight {teacher[1]!r}".encode())
    for one in networks:
        for name, tensor in one.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(
    path: Path, run: str, step: int, seconds: float, parts: dict[str, Any], rng: np.random.Generator
) -> None:
    """Write the training state atomically: a kill while writing leaves the last checkpoint whole."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(run=run, step=step, seconds=seconds, rng=json.dumps(rng.bit_generator.state))
    state["torch_rng"] = torch.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(checkpoint: Checkpoint, run: str, parts: dict[str, Any], rng: np.random.Generator) -> int:
    """Load the checkpoint's state into ``parts`` and ``rng``; return its step."""
    state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    if state["run"] != run:
        raise ValueError(
            f"{checkpoint.path} is the checkpoint of another training run (other settings, training "
            "fields or initial weights); remove it to start this run afresh"
        )
    for name, part in parts.items():
        part.load_state_dict(state[name])
    rng.bit_generator.state = json.loads(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    checkpoint.resumed_from_step, checkpoint.earlier_seconds = int(state["step"]), float(state["seconds"])
    log.info("resumed from %s at step %d", checkpoint.path, checkpoint.resumed_from_step)
    return checkpoint.resumed_from_step


def evaluate_styles(
    weights: str | Path,
    style_names: Sequence[str],
    *,
    fields_per_style: int = 4,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    device: str = "auto",
    augment: bool = False,
) -> dict[str, float]:
    """AP@0.5 per style on fields of unseen seeds, each segmented at its true median diameter
    (with test-time ``augment``: :func:`~metascreen.segment.learned.segment_learned`)."""
    scores = {}
    for name in style_names:
        pairs = []
        for _, image, labels in render_training_fields(
            [name], fields_per_style, shape, seed + _EVAL_SEED_OFFSET
        ):
            predicted = learned.segment_learned(
                image,
                cell_diameter=median_diameter(labels),
                augment=augment,
                weights=str(weights),
                device=device,
            )
            pairs.append((labels, predicted))
        scores[name] = pooled_ap(pairs)
    return scores


def _check_training_scale(path: str | Path, metadata: dict[str, Any], why: str) -> None:
    """Refuse weights (a starting point or a teacher) trained at another cell diameter than
    :data:`~metascreen.segment.learned.TRAIN_DIAMETER`, the one this version trains at."""
    diameter = learned.trained_diameter(metadata)
    if diameter != learned.TRAIN_DIAMETER:
        raise ValueError(
            f"{path} was trained at a cell diameter of {diameter:g} px, "
            f"not this version's {learned.TRAIN_DIAMETER:g}: {why}"
        )


def _pretrain_command(
    settings: TrainingSettings,
    style_names: Sequence[str],
    init: str | Path | None = None,
    teacher: str | Path | None = None,
    teacher_weight: float = 0.5,
) -> str:
    """The ``metascreen`` command line that repeats a pretraining run."""
    words = [f"metascreen pretrain-segmenter --seed {settings.seed} --steps {settings.steps}"]
    if settings.learning_rate != TrainingSettings.learning_rate:
        words.append(f"--learning-rate {settings.learning_rate:g}")
    if init is not None:
        words.append(f"--init {init}")
    else:
        if settings.base_channels != TrainingSettings.base_channels:
            words.append(f"--base-channels {settings.base_channels}")
        if settings.branches:
            words.append("--branches")
    if teacher is not None:
        words.append(f"--teacher {teacher} --teacher-weight {teacher_weight:g}")
    if list(style_names) != list(styles.STYLE_NAMES):
        words.append("--styles " + " ".join(style_names))
    return " ".join(words)


def pretrain(
    out: str | Path,
    *,
    style_names: Sequence[str] | None = None,
    settings: TrainingSettings = TrainingSettings(),
    device: str = "auto",
    eval_fields_per_style: int = 4,
    init: str | Path | None = None,
    teacher: str | Path | None = None,
    teacher_weight: float = 0.5,
    checkpoint_every: int = 500,
) -> dict[str, Any]:
    """Train on the synthetic world, write weights + metadata to ``out``, and return the
    metadata (styles, seeds, data hash, settings, AP per held-out-seed style, versions,
    seconds).

    From scratch, or, given ``init`` (a weights file of an earlier run), from those weights:
    a warm restart of the learning-rate schedule that trains a network longer, on fields of
    ``settings.seed``. The architecture is then the initial network's, and the metadata keeps
    that run's own under ``init`` (with its file's SHA-256), so every stage can be repeated.

    Given ``teacher`` (a weights file, usually of a wider network too slow to ship), the
    network learns from ``teacher_weight`` times its outputs plus the rest of the truth
    (:func:`train_network`); the metadata keeps the teacher's own under ``teacher``, with
    its file's SHA-256 and that weight.

    Every ``checkpoint_every`` steps (0: never) the training state is saved beside ``out``
    (``<out stem>.checkpoint.pt``, a :class:`Checkpoint`); the same command run again after
    a crash or a job's time limit resumes from it, and the file is removed once the weights
    and their metadata are written.
    """
    _check_teacher_weight(teacher_weight)  # before minutes of rendering, not after
    style_names = list(style_names or styles.STYLE_NAMES)
    target = select_device(device)
    initial, init_metadata = None, None
    if init is not None:
        if settings.branches:
            raise ValueError("training with branches starts from scratch: --init weights are plain")
        initial, init_metadata = load_network(init, "cpu", fuse=False)
        _check_training_scale(init, init_metadata, "training it on would mix two scales")
        architecture = init_metadata.pop("architecture")
        settings = replace(settings, base_channels=architecture["base"], depth=architecture["depth"])
        init_metadata["sha256"] = file_sha256(init)
    teacher_network, teacher_metadata = None, None
    if teacher is not None:
        teacher_network, teacher_metadata = load_network(teacher, "cpu")
        _check_training_scale(teacher, teacher_metadata, "its outputs would not fit the targets")
        teacher_metadata.update(sha256=file_sha256(teacher), weight=teacher_weight)
    started = time.perf_counter()
    fields = render_training_fields(
        style_names, settings.fields_per_style, settings.field_shape, settings.seed
    )
    log.info("rendered %d training fields of %d styles", len(fields), len(style_names))
    out = Path(out)
    checkpoint = Checkpoint(out.with_suffix(".checkpoint.pt"), checkpoint_every) if checkpoint_every else None
    network = train_network(
        fields,
        settings,
        device=device,
        network=initial,
        checkpoint=checkpoint,
        teacher=teacher_network,
        teacher_weight=teacher_weight,
    )
    train_seconds = time.perf_counter() - started + (checkpoint.earlier_seconds if checkpoint else 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {
        "styles": style_names,
        "data_seed": settings.seed,
        "eval_seed": settings.seed + _EVAL_SEED_OFFSET,
        "data_sha256": _fields_hash(fields),
        "settings": {**settings.__dict__, "field_shape": list(settings.field_shape)},
        "train_diameter": learned.TRAIN_DIAMETER,
        "train_seconds": round(train_seconds, 1),
        "device": str(target),
        "mixed_precision": str(autocast_dtype(target, cpu=True) or torch.float32).removeprefix("torch."),
        "versions": runtime_versions(),
        "torch_threads": torch.get_num_threads(),
        "command": _pretrain_command(settings, style_names, init, teacher, teacher_weight),
    }
    if init_metadata is not None:
        metadata["init"] = init_metadata
    if teacher_metadata is not None:
        metadata["teacher"] = teacher_metadata
    if checkpoint is not None and checkpoint.resumed_from_step:
        metadata["resumed_at_step"] = checkpoint.resumed_from_step
    save_network(network, out, metadata)
    learned.load_segmenter.cache_clear()
    metadata["ap50_by_style"] = evaluate_styles(
        out, style_names, fields_per_style=eval_fields_per_style, seed=settings.seed, device=device
    )
    save_network(network, out, metadata)
    learned.load_segmenter.cache_clear()
    if checkpoint is not None:
        checkpoint.path.unlink(missing_ok=True)
    return metadata


def network_ap(
    network: UNet,
    fields: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    regions: Sequence[np.ndarray] | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """AP@0.5 of ``network`` (a training copy: it is fused here) on ``(image, labels)``
    fields, each segmented whole at the median diameter of its true cells; with
    ``regions`` (one boolean map per field), over the cells centred in them only."""
    device = torch.device(device)
    fused = network.fused().to(device)
    pairs = []
    for index, (image, labels) in enumerate(fields):
        predicted = learned.segment_with_network(fused, device, image, median_diameter(labels))
        if regions is not None:
            labels, predicted = (cells_centred_in(part, regions[index]) for part in (labels, predicted))
        pairs.append((labels, predicted))
    return pooled_ap(pairs)


def perfect_maps_ap(fields: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """AP@0.5 that a network predicting its training targets exactly would reach on
    ``(image, labels)`` fields: the ceiling of the representation and of the recovery.

    Each field's targets are made as in training (labels resized so that their median
    cell reaches the training diameter, :func:`training_targets`), resized back to the
    field's size bilinearly (inference resizes the network's logits so; targets of 0
    and 1 have no finite logits, so here the maps themselves), and recovered as at inference
    (:func:`~metascreen.segment.instances.recover_instances`, its default thresholds, the
    smallest cell of :func:`~metascreen.segment.learned.segment_with_network`).
    """
    pairs = []
    for _, labels in fields:
        diameter = median_diameter(labels)
        maps = torch.from_numpy(
            np.stack(training_targets(_resize_nearest(labels, learned.TRAIN_DIAMETER / diameter)))
        )
        native = F.interpolate(maps[None], size=labels.shape, mode="bilinear", align_corners=False)[0]
        recovered = recover_instances(*native.numpy(), min_area=learned.smallest_cell_area(diameter))
        pairs.append((labels, recovered))
    return pooled_ap(pairs)


def finetune(
    annotations: Sequence[Annotation],
    *,
    weights: str | Path | None = None,
    settings: TrainingSettings = FINETUNE_SETTINGS,
    validation_fraction: float = 0.2,
    device: str = "auto",
    progress_every: int = 50,
) -> tuple[UNet, dict[str, Any]]:
    """Fine-tune the segmentation network on a few annotated fields.

    The last ``validation_fraction`` of each field's annotated region (along its longer
    side, :func:`metascreen.annotations.validation_split`) is held out; the network
    (``weights``, default the shipped ones) is trained on the rest, the loss restricted
    to annotated pixels, and scored on the held-out cells before and after.

    Returns
    -------
    network : UNet
        The fine-tuned network (eval mode, CPU, batch norms not fused).
    evaluation : dict
        ``ap50_before`` and ``ap50_after`` on the held-out cells (None when none is
        held out), ``validation`` (what was held out), ``n_annotated_fields``,
        ``n_train_cells``, ``n_validation_cells``, ``annotated_cell_diameter_px``,
        ``train_seconds``, ``steps``.
    """
    if not annotations:
        raise ValueError("fine-tuning needs at least one annotated field")
    target = select_device(device)
    weights = weights or learned.SHIPPED_WEIGHTS
    network, metadata = load_network(weights, "cpu", fuse=False)
    _check_training_scale(weights, metadata, "fine-tuning it would mix two scales")
    splits = [validation_split(annotation.region, validation_fraction) for annotation in annotations]
    train_regions = [train for train, _ in splits]
    held_out = [validation for _, validation in splits]
    n_validation = sum(
        int(cells_centred_in(a.labels, v).max()) for a, v in zip(annotations, held_out, strict=True)
    )
    n_train = sum(
        int(cells_centred_in(a.labels, t).max()) for a, t in zip(annotations, train_regions, strict=True)
    )

    def score(model: UNet) -> float | None:
        fields = [(annotation.image, annotation.labels) for annotation in annotations]
        return network_ap(model, fields, regions=held_out, device=target) if n_validation else None

    before = score(network)
    started = time.perf_counter()
    fields = [(annotation.name, annotation.image, annotation.labels) for annotation in annotations]
    network = train_network(
        fields, settings, device=device, network=network, regions=train_regions, progress_every=progress_every
    )
    seconds = time.perf_counter() - started
    after = score(network)
    if n_validation:
        log.info("held-out AP@0.5: %.3f before, %.3f after fine-tuning", before, after)
    else:
        log.warning("no annotated cell is centred in the held-out strips: fine-tuned without validation")
    evaluation = {
        "ap50_before": before,
        "ap50_after": after,
        "validation": f"the last {validation_fraction:.0%} of each annotated region along its longer side",
        "n_annotated_fields": len(annotations),
        "n_train_cells": n_train,
        "n_validation_cells": n_validation,
        "annotated_cell_diameter_px": float(
            np.median(np.concatenate([equivalent_diameters(a.labels) for a in annotations]))
        ),
        "train_seconds": round(seconds, 1),
        "steps": settings.steps,
    }
    return network, evaluation
