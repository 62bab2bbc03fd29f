"""The learned segmenter: targets and recovery, tiling, weights files, training, shipped weights."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels
from torch import nn
from torch.nn import functional as F

from metascreen import cli, model, ngff, stages, styles, synth
from metascreen.annotations import check_annotation
from metascreen.config import ConfigError, validate_config
from metascreen.segment import learned, match_instances, pooled_ap, segment, train
from metascreen.segment.instances import recover_instances, training_targets
from metascreen.segment.network import UNet, load_network, save_network
from metascreen.segment.tiling import inference_dtype, normalize_percentile, predict_tiled
from metascreen.segment.train import (
    TrainingSettings,
    evaluate_styles,
    median_diameter,
    render_training_fields,
    train_network,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def two_touching_squares() -> np.ndarray:
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2
    return labels


# ------------------------------------------------------------------ targets and recovery


def test_training_targets_fall_to_zero_on_shared_borders():
    foreground, distance, boundary = training_targets(two_touching_squares())
    assert foreground.sum() == 200 and foreground.dtype == np.float32
    assert distance.max() == pytest.approx(1.0) and distance.min() == 0.0
    assert (distance[foreground == 0] == 0).all()
    # where the squares meet the distance falls as at an outer edge: a valley between them
    assert distance[10, 14] == 0.0 and distance[10, 15] == distance[10, 5] == pytest.approx(0.2)
    assert distance[10, 15] < distance[10, 17]
    for label in (1, 2):  # each cell reaches 1 at its own centre
        assert distance[two_touching_squares() == label].max() == pytest.approx(1.0)
    # the contact boundary: the two columns where the squares meet, nothing on outer edges
    assert np.flatnonzero(boundary.any(0)).tolist() == [14, 15]
    assert boundary[5:15, 14:16].all() and boundary.sum() == 20


@pytest.mark.parametrize(
    ("style", "floor"),
    [("phase_confluent", 0.97), ("brightfield_clumps", 0.97), ("demo_plate", 0.97), ("phase_neurite", 0.88)],
)
def test_recovery_from_perfect_maps_gives_back_the_truth(style: str, floor: float):
    _, labels = styles.render_style_field(styles.style_rng(3, style, 0), style, (160, 160))
    recovered = recover_instances(*training_targets(labels), min_area=15)
    scores = match_instances(labels, recovered)
    # neurites lose a little: a thin part between two lobes falls below the distance valley
    assert scores["ap"] >= floor, scores
    assert scores["mean_matched_iou"] > 0.93


@pytest.mark.parametrize("style", ["brightfield_spread_large", "brightfield_small"])
def test_perfect_maps_survive_the_trip_to_the_training_scale_and_back(style: str):
    # cells shrunk several times (spread_large) or enlarged (small) to the training diameter
    fields = [(image, labels) for _, image, labels in render_training_fields([style], 2, (256, 256), 5)]
    ceiling = train.perfect_maps_ap(fields)
    assert 0.95 <= ceiling <= 1.0
    # the same targets made at the fields' own scale agree: the round trip loses little
    native = pooled_ap(
        [(labels, recover_instances(*training_targets(labels), min_area=15)) for _, labels in fields]
    )
    assert abs(ceiling - native) < 0.06, (ceiling, native)


def test_recovery_keeps_seedless_foreground_and_drops_small_objects():
    foreground = np.zeros((40, 40), np.float32)
    distance, boundary = np.zeros_like(foreground), np.zeros_like(foreground)
    foreground[2:12, 2:12] = 1.0  # a cell whose distance never rose: kept, own label
    foreground[20:30, 20:30] = 1.0
    distance[24:26, 24:26] = 0.9
    foreground[35:37, 35:37] = 1.0  # 4 px speck
    foreground[20:30, 30:38] = 1.0  # touches the cell on its left across a boundary
    distance[24:26, 33:35] = 0.9
    boundary[20:30, 29:31] = 1.0
    labels = recover_instances(foreground, distance, boundary, min_area=10)
    assert labels.max() == 3
    assert len(np.unique(labels[2:12, 2:12])) == 1 and labels[5, 5] > 0
    assert labels[25, 25] != labels[25, 35] and labels[25, 25] > 0 and labels[25, 35] > 0
    assert labels[36, 36] == 0
    empty = np.zeros((8, 8))
    assert recover_instances(empty, empty, empty).max() == 0
    with pytest.raises(ValueError, match="one shape"):
        recover_instances(empty, empty, np.zeros((8, 9)))


# ------------------------------------------------------------------ normalisation and tiling


def test_normalisation_ignores_dtype_and_exposure_and_survives_bad_pixels():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 10.0, (64, 64)).astype(np.float32)
    scaled = normalize_percentile(image * 3.0 + 50.0)
    np.testing.assert_allclose(normalize_percentile(image), scaled, atol=1e-5)
    assert not normalize_percentile(np.full((16, 16), 7, np.uint16)).any()
    with_nan = image.copy()
    with_nan[0, :10] = np.nan
    out = normalize_percentile(with_nan)
    assert np.isfinite(out).all() and (out[0, :10] == 0).all()


@pytest.mark.parametrize("shape", [(300, 260), (50, 70)])
def test_tiled_prediction_equals_one_pass(shape: tuple[int, int]):
    torch.manual_seed(0)
    network = UNet(base=4, depth=1).eval()  # receptive field ~20 px, inside the 32 px margin
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    whole = predict_tiled(network, image, tile_size=2048)
    assert whole.shape == (3, *shape)
    for batch_size in (3, None):  # None: one tile per pass on CPU
        tiled = predict_tiled(network, image, tile_size=96, margin=32, batch_size=batch_size)
        np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_augmented_prediction_is_mirror_equivariant_which_one_pass_is_not():
    torch.manual_seed(0)
    network = UNet(base=4, depth=1).eval()
    image = np.random.default_rng(2).random((64, 96)).astype(np.float32)
    augmented = predict_tiled(network, image, augment=True)
    for axis in (0, 1):
        mirrored = np.flip(image, axis).copy()
        np.testing.assert_allclose(
            predict_tiled(network, mirrored, augment=True), np.flip(augmented, axis + 1), atol=1e-5
        )
        # an untrained network by itself is not (by far more than the tolerance above): the
        # average is what makes it so
        gap = np.abs(predict_tiled(network, mirrored) - np.flip(predict_tiled(network, image), axis + 1))
        assert gap.max() > 1e-4


@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("factor", [0.45, 1.0, 1.7])
def test_prediction_comes_back_at_the_field_size(factor: float, depth: int):
    network = UNet(base=4, depth=depth).eval()  # depth 4: tiles and margins in multiples of 16
    out = predict_tiled(network, np.zeros((123, 97), np.float32), factor=factor, tile_size=64, margin=20)
    assert out.shape == (3, 123, 97) and ((out >= 0) & (out <= 1)).all()


def test_decoders_compute_the_convolution_of_the_upsampled_and_joined_features():
    """The transposed convolution of the coarse features gives the outputs and gradients of
    the textbook decoder: nearest x2 upsampling, concatenation with the skip connection,
    3x3 convolution (borders included)."""
    torch.manual_seed(0)
    decoder = UNet(base=4, depth=2).decoders[1]  # 16 coarse + 8 skip channels -> 8
    coarse = torch.randn(2, 16, 6, 10, requires_grad=True)
    skip = torch.randn(2, 8, 12, 20, requires_grad=True)
    upsampled = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
    textbook = nn.Sequential.forward(decoder, torch.cat([upsampled, skip], dim=1))
    ours = decoder(coarse, skip)
    torch.testing.assert_close(ours, textbook, rtol=0.0, atol=1e-5)
    assert textbook.abs().max() > 0.5
    weight = decoder[0].weight
    inputs = (weight, coarse, skip)
    expected = torch.autograd.grad(textbook.square().sum(), inputs)
    got = torch.autograd.grad(ours.square().sum(), inputs)
    for ours_gradient, textbook_gradient in zip(got, expected, strict=True):
        torch.testing.assert_close(ours_gradient, textbook_gradient, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_inference_copy_gives_the_training_network_s_outputs(depth: int):
    """Batch norms folded into the convolutions change the arithmetic, not the outputs."""
    torch.manual_seed(depth)
    network = UNet(base=8, depth=depth)
    for layer in network.modules():  # batch norms far from the identity, as after training
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-1.0, 1.0)
            layer.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
    network.eval()
    fused = network.fused()
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in fused.modules())
    x = torch.randn(2, 1, 48, 80)
    with torch.inference_mode():
        expected = network(x)
        torch.testing.assert_close(fused(x), expected, rtol=0.0, atol=1e-5)
        channels_last = fused.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            channels_last(x.contiguous(memory_format=torch.channels_last)), expected, rtol=0.0, atol=1e-5
        )
    assert expected.abs().max() > 0.1  # not a trivially small output


@pytest.mark.parametrize("depth", [1, 3])
def test_branches_fold_into_a_plain_network_with_the_same_outputs(depth: int):
    """RepVGG branches (3x3, 1x1, identity, each with its batch norm) fold into one 3x3
    kernel per convolution: the plain network, its weights saved and fused as any other."""
    torch.manual_seed(depth)
    branched = UNet(base=8, depth=depth, branches=True).train()
    for _ in range(3):  # running statistics of real batches, far from their initial values
        branched(torch.randn(4, 1, 32, 32) * 2.0 + 0.5)
    for layer in branched.modules():
        if isinstance(layer, nn.BatchNorm2d):
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
    branched.eval()
    plain = branched.without_branches()
    assert not plain.branches and plain.state_dict().keys() == UNet(base=8, depth=depth).state_dict().keys()
    x = torch.randn(2, 1, 48, 80)
    with torch.inference_mode():
        expected = branched(x)
        torch.testing.assert_close(plain(x), expected, rtol=0.0, atol=1e-4)
        torch.testing.assert_close(branched.fused()(x), expected, rtol=0.0, atol=1e-4)
    assert expected.abs().max() > 0.1
    assert plain.without_branches() is plain  # a plain network comes back itself


# ------------------------------------------------------------------ weights files and devices


def test_weights_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    network = UNet(base=4, depth=2).eval()
    path = tmp_path / "w.safetensors"
    save_network(network, path, {"styles": ["a"]})
    loaded, metadata = load_network(path)
    assert metadata == {"styles": ["a"], "architecture": {"base": 4, "depth": 2}}
    assert json.loads(path.with_suffix(".json").read_text()) == metadata
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), network(x))
    (tmp_path / "bad.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="bad.safetensors: not a metascreen segmentation weights file"):
        load_network(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="segmentation weights not found"):
        load_network(tmp_path / "missing.safetensors")


def test_weights_are_used_at_the_diameter_they_were_trained_at(tmp_path, monkeypatch):
    """A weights file of another version's training diameter segments at its own scale, and
    training refuses to go on from it (fine-tuning, or pretraining from it) at this one's."""
    image, labels = styles.render_style_field(styles.style_rng(5, "phase_spread", 0), "phase_spread")
    diameter = median_diameter(labels)
    network, metadata = load_network(learned.SHIPPED_WEIGHTS, fuse=False)
    doubled = tmp_path / "doubled.safetensors"
    save_network(network, doubled, {"train_diameter": 2 * learned.trained_diameter(metadata)})
    no_small_cells_dropped = {"min_area_fraction": 0.0, "device": "cpu"}
    shipped = learned.segment_learned(image, cell_diameter=diameter, **no_small_cells_dropped)
    # cells twice as large for a network that learned cells twice as large: the same resizing
    same_scale = learned.segment_learned(
        image, cell_diameter=2 * diameter, weights=str(doubled), **no_small_cells_dropped
    )
    assert shipped.max() > 5 and np.array_equal(shipped, same_scale)
    other_scale = learned.segment_learned(
        image, cell_diameter=diameter, weights=str(doubled), **no_small_cells_dropped
    )
    assert not np.array_equal(shipped, other_scale)

    annotated = check_annotation("field", image, labels)
    with pytest.raises(ValueError, match=r"trained at a cell diameter of \d+ px, not this version's"):
        train.finetune([annotated], weights=doubled, device="cpu")
    monkeypatch.setattr(train, "render_training_fields", lambda *args: pytest.fail("rendered first"))
    with pytest.raises(ValueError, match="training it on would mix two scales"):
        train.pretrain(tmp_path / "longer.safetensors", init=doubled, device="cpu")
    learned.load_segmenter.cache_clear()


def test_bfloat16_inference_gives_the_cells_of_float32(monkeypatch):
    """CPUs with native bfloat16 units run the network in bfloat16 (twice as fast): the same cells."""
    image, _ = styles.render_style_field(styles.style_rng(3, "phase_round", 0), "phase_round", (256, 256))
    network, _, device = learned.load_segmenter(None, "cpu")
    normalised = normalize_percentile(image)
    monkeypatch.setattr(model, "_cpu_has_native_bfloat16", lambda: False)
    full = predict_tiled(network, normalised, factor=1.0, device=device)
    monkeypatch.setattr(model, "_cpu_has_native_bfloat16", lambda: True)
    half = predict_tiled(network, normalised, factor=1.0, device=device)
    assert 0 < np.abs(full - half).max() < 0.1 and np.abs(full - half).mean() < 0.01
    cells = recover_instances(*full)
    assert cells.max() > 3 and pooled_ap([(cells, recover_instances(*half))]) > 0.95
    # precision float32 keeps such a CPU in float32: the arithmetic of CPUs without bfloat16
    pinned = predict_tiled(network, normalised, factor=1.0, device=device, precision="float32")
    np.testing.assert_array_equal(pinned, full)
    assert inference_dtype(device) is torch.bfloat16 and inference_dtype(device, "float32") is None
    assert inference_dtype("cuda", "float32") is None
    with pytest.raises(ValueError, match="precision must be one of auto, float32, got 'float16'"):
        inference_dtype(device, "float16")


def test_device_selection_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    learned.load_segmenter.cache_clear()
    assert learned.load_segmenter(None, "auto")[2].type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        learned.load_segmenter(None, "cuda")
    learned.load_segmenter.cache_clear()


# ------------------------------------------------------------------ training


def tiny_settings(seed: int = 0) -> TrainingSettings:
    return TrainingSettings(steps=3, batch_size=2, crop=64, base_channels=4, depth=2, seed=seed)


def test_training_is_deterministic_for_a_seed():
    fields = render_training_fields(["phase_round", "demo_plate"], 1, (96, 96), seed=0)
    first = train_network(fields, tiny_settings(0), device="cpu", progress_every=0).state_dict()
    again = train_network(fields, tiny_settings(0), device="cpu", progress_every=0).state_dict()
    other = train_network(fields, tiny_settings(1), device="cpu", progress_every=0).state_dict()
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_a_killed_training_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    fields = render_training_fields(["phase_round", "demo_plate"], 1, (96, 96), seed=0)
    settings = replace(tiny_settings(0), steps=5)
    straight = train_network(fields, settings, device="cpu", progress_every=0).state_dict()

    checkpoint = train.Checkpoint(tmp_path / "run.checkpoint.pt", every=2)
    augment, calls = train._intensity, []

    def killed_at_step_4(rng, x):
        calls.append(None)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a job's time limit would, after the checkpoint of step 2
        return augment(rng, x)

    monkeypatch.setattr(train, "_intensity", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_network(fields, settings, device="cpu", progress_every=0, checkpoint=checkpoint)
    monkeypatch.setattr(train, "_intensity", augment)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 2
    resumed = train_network(fields, settings, device="cpu", progress_every=0, checkpoint=checkpoint)
    assert checkpoint.resumed_from_step == 2 and checkpoint.earlier_seconds > 0.0
    assert all(torch.equal(straight[name], resumed.state_dict()[name]) for name in straight)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 5  # the last step is saved too

    # a checkpoint of another run (here another seed) is refused, not silently mixed in
    with pytest.raises(ValueError, match="checkpoint of another training run"):
        train_network(fields, tiny_settings(1), device="cpu", progress_every=0, checkpoint=checkpoint)


def test_distillation_targets_are_the_teacher_s_share_of_its_outputs_plus_the_truth_s(tmp_path):
    fields = render_training_fields(["phase_round", "demo_plate"], 1, (96, 96), seed=0)
    torch.manual_seed(0)
    teacher = UNet(4, 2).fused()
    truth = train._Pool(fields, 64)
    for weight in (0.0, 0.3, 1.0):
        taught = train._Pool(fields, 64, teacher=teacher, teacher_weight=weight)
        for image, target, own in zip(truth.images, truth.targets, taught.targets, strict=True):
            outputs = predict_tiled(teacher, image)
            assert own.shape == target.shape == outputs.shape
            np.testing.assert_allclose(own, weight * outputs + (1.0 - weight) * target, atol=1e-6)
            # an untrained teacher's outputs are nothing like the truth: the blend moves with the weight
            moved, apart = np.abs(own - target).mean(), np.abs(outputs - target).mean()
            assert moved == pytest.approx(weight * apart, rel=1e-4) and apart > 0.1

    settings = replace(tiny_settings(0), steps=2)
    checkpoint = train.Checkpoint(tmp_path / "run.checkpoint.pt", every=2)
    train_network(fields, settings, device="cpu", progress_every=0, checkpoint=checkpoint, teacher=teacher)
    # the same run with another teacher's share, or none, is another run
    for other in ({"teacher": teacher, "teacher_weight": 0.7}, {}):
        with pytest.raises(ValueError, match="checkpoint of another training run"):
            train_network(fields, settings, device="cpu", progress_every=0, checkpoint=checkpoint, **other)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], not 1.5"):
        train_network(fields, settings, device="cpu", progress_every=0, teacher=teacher, teacher_weight=1.5)


def test_grain_is_faint_correlated_noise_over_the_whole_crop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        grain = train._grain(rng, (1, 128, 128))
        assert grain.shape == (1, 128, 128) and grain.dtype == np.float32
        assert 0.02 - 1e-6 <= grain.std() <= 0.12 + 1e-6
        assert abs(grain.mean()) < 0.5 * grain.std()  # no offset: the crop keeps its levels
        # blurred over 0.7 px or more: neighbours correlate (white noise would give ~0)
        assert np.corrcoef(grain[0, :, 1:].ravel(), grain[0, :, :-1].ravel())[0, 1] > 0.5


def test_synthetic_world_is_reproducible_and_varied(tmp_path):
    one = render_training_fields(["phase_confluent"], 1, (128, 128), seed=5)[0]
    two = render_training_fields(["phase_confluent"], 1, (128, 128), seed=5)[0]
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[2], two[2])
    assert (one[2] > 0).mean() >= 0.7  # confluent: at least 70 % covered
    dtypes = {
        styles.render_style_field(styles.style_rng(0, n, 0), n, (96, 96))[0].dtype for n in styles.STYLES
    }
    assert dtypes == {np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32")}
    styles.write_world(tmp_path, styles=["dic_spread"], fields_per_style=1, shape=(96, 96))
    image = tifffile.imread(tmp_path / "dic_spread_000.tif")
    masks = tifffile.imread(tmp_path / "dic_spread_000_masks.tif")
    assert image.shape == masks.shape == (96, 96) and masks.dtype == np.int32 and masks.max() > 0
    with pytest.raises(ValueError, match="unknown style"):
        styles.render_style_field(np.random.default_rng(0), "holography")


def test_styles_cross_modalities_with_morphologies_and_leave_the_held_out_looks_unseen():
    # each modality was once drawn with one or two morphologies only: a network trained
    # without a style then had never seen its modality (DIC) or its morphology (neurites)
    pretraining = [styles.STYLES[name] for name in styles.STYLE_NAMES if name in styles.STYLES]
    for modality in ("brightfield", "phase", "dic"):
        assert {"spread", "neurite"} <= {s.morphology for s in pretraining if s.modality == modality}
    assert {s.modality for s in pretraining if s.confluent} == {"phase", "dic"}

    def look(style: styles.Style) -> tuple[str, str, bool]:
        return style.modality, style.morphology, style.confluent

    # clumps are spheres too: DIC of clumps would show the held-out dic_round's cells
    held_out = {look(styles.STYLES[name]) for name in styles.HELD_OUT_STYLES}
    assert not {look(s) for s in pretraining} & (held_out | {("dic", "clumps", False)})
    rng = styles.style_rng(0, "dic_confluent", 0)
    _, labels = styles.render_style_field(rng, "dic_confluent", (128, 128))
    assert (labels > 0).mean() >= 0.7


@pytest.mark.parametrize("modality", ["brightfield", "phase"])
def test_defocus_keeps_brightfield_cells_visible_and_blurs_phase_contrast(modality: str):
    # unstained cells show in brightfield *because* of defocus; blurring the in-focus
    # fringes instead (as the renderer once did) left 0.36-0.43 of their contrast
    style = styles.STYLES[f"{modality}_round"]
    _, labels = styles.render_style_field(styles.style_rng(0, style.name, 0), style.name, (128, 128))
    path = styles._optical_path(np.random.default_rng(0), labels, style)
    near_cells = ndi.binary_dilation(labels > 0, iterations=3)

    def contrast(defocus: float) -> float:
        relative = styles._image_formation(np.random.default_rng(1), path, style, defocus)
        return float(np.sqrt(np.mean((relative[near_cells] - 1.0) ** 2)))

    ratio = contrast(3.0) / contrast(0.0)
    assert ratio > 0.8 if modality == "brightfield" else ratio < 0.9


@pytest.mark.parametrize("style", ["brightfield_clumps", "phase_confluent", "phase_neurite", "dic_spread"])
def test_granules_stay_fainter_than_the_cells_they_lie_in(style: str):
    # granules once had a fine texture of 0.24-0.34 of the cells' own optical path (this measure,
    # these fields; 0.09-0.11 now): in brightfield and phase contrast it hid the contacts between
    # touching cells and whole neurites, and no real unstained cell looks like that
    _, labels = styles.render_style_field(styles.style_rng(0, style, 0), style, (256, 256))
    # pixels whose 7 x 7 neighbourhood lies in one cell: away from outlines and contacts
    core = (labels > 0) & (ndi.minimum_filter(labels, 7) == ndi.maximum_filter(labels, 7))
    strengths = []
    for index in range(6):
        path = styles._optical_path(np.random.default_rng(index), labels, styles.STYLES[style])
        fine = path - ndi.gaussian_filter(path, 3)
        strengths.append(fine[core].std() / path[core].mean())
    assert np.mean(strengths) < 0.2, strengths


def test_neurites_are_nearly_as_thick_as_their_soma():
    # thin processes reached 0.53-0.57 of their soma's path (median; 0.61-0.66 now), too faint to
    # show through the halo and noise of phase contrast, where real neurites are plain dark lines
    style = styles.STYLES["phase_neurite"]
    _, labels = styles.render_style_field(styles.style_rng(0, style.name, 0), style.name, (256, 256))
    bodies = ndi.binary_opening(labels > 0, np.ones((7, 7), bool))
    processes = (labels > 0) & ~ndi.binary_dilation(bodies)
    for index in range(6):
        path = styles._optical_path(np.random.default_rng(index), labels, style)
        assert np.median(path[processes]) > 0.6 * np.median(path[bodies]), index


@pytest.mark.parametrize("style", ["brightfield_round", "brightfield_clumps"])
def test_faint_fields_are_exposed_until_their_cells_stand_out_of_the_noise(style: str):
    # faint fringes drawn with few photons once rendered cells no one could see or annotate:
    # the mean square of their pixels' deviation fell to 1.2-1.6 times the background's
    for index in range(16):
        image, labels = styles.render_style_field(styles.style_rng(5, style, index), style, (256, 256))
        image = image.astype(np.float64)
        near = expand_labels(labels, 2) > 0
        far = ~ndi.binary_dilation(labels > 0, iterations=8)
        # illumination from the cell-free pixels only, divided out: smoothing the whole image
        # would take the smooth contrast of whole cells (spheres in brightfield) for illumination
        cell_free = ndi.gaussian_filter(far * 1.0, 15)
        illumination = ndi.gaussian_filter(image * far, 15) / np.maximum(cell_free, 1e-3)
        deviation = image / np.maximum(illumination, 1e-6) - 1.0
        assert np.mean(deviation[near] ** 2) > 1.8 * np.mean(deviation[far] ** 2), index


@pytest.mark.parametrize("style", ["phase_spread", "dic_spread", "brightfield_small"])
def test_fields_are_as_densely_covered_as_their_style_asks(style: str):
    # cover once counted the margin around the field (room for cells cut by its border) as
    # part of it, and spread styles came out about twice as dense as asked (dic_spread up to 0.68)
    low, high = styles.STYLES[style].cover
    for index in range(8):
        _, labels = styles.render_style_field(styles.style_rng(5, style, index), style, (256, 256))
        assert low - 0.03 <= (labels > 0).mean() <= high + 0.05, index


# ------------------------------------------------------------------ the shipped weights


@pytest.fixture(scope="module")
def shipped_metadata() -> dict:
    learned.load_segmenter.cache_clear()
    return learned.load_segmenter(None, "cpu")[1]


def test_shipped_weights_reach_the_ap_they_record(shipped_metadata):
    recorded = shipped_metadata["ap50_by_style"]
    assert sorted(recorded) == sorted(styles.STYLE_NAMES) == sorted(shipped_metadata["styles"])
    assert len(shipped_metadata["data_sha256"]) == 64
    assert "pretrain-segmenter" in shipped_metadata["command"]
    again = evaluate_styles(
        learned.SHIPPED_WEIGHTS, list(recorded), seed=shipped_metadata["data_seed"], device="cpu"
    )
    # recorded in the training run's arithmetic (bfloat16 on CPUs that have it); in float32 a
    # few cells of a style's 4 fields come out otherwise (measured on AMD Zen 2: up to 0.06 on
    # a style, 0.001 on the mean over the styles)
    here = str(model.autocast_dtype(torch.device("cpu"), cpu=True) or torch.float32).removeprefix("torch.")
    tolerance = 0.02 if here == shipped_metadata["mixed_precision"] else 0.08
    for name, ap in recorded.items():
        assert again[name] == pytest.approx(ap, abs=tolerance), name
    assert np.mean(list(again.values())) == pytest.approx(np.mean(list(recorded.values())), abs=0.01)


@pytest.mark.parametrize("branches", [[], ["--branches"]])
def test_pretraining_builds_the_width_asked_and_records_the_command_that_repeats_it(tmp_path, branches):
    out = tmp_path / "segmenter.safetensors"
    options = ["--seed", "3", "--steps", "2", "--base-channels", "8", *branches, "--styles", "demo_plate"]
    # the same torch threads as before: the command sets them for the whole process
    threads = ["--threads", str(torch.get_num_threads())]
    assert cli.main(["pretrain-segmenter", "--out", str(out), *options, "--device", "cpu", *threads]) == 0
    network, metadata = load_network(out)
    assert network.config == {"base": 8, "depth": 3}
    assert metadata["command"] == "metascreen pretrain-segmenter " + " ".join(options)
    assert list(metadata["ap50_by_style"]) == ["demo_plate"]
    assert metadata["settings"]["steps"] == 2 and metadata["data_seed"] == 3
    assert metadata["settings"]["branches"] is bool(branches)  # the saved network is plain either way
    # the run's last state was checkpointed, and the checkpoint removed once the weights were written
    assert "resumed_at_step" not in metadata and not out.with_suffix(".checkpoint.pt").exists()


def _largest_difference(one: UNet, other: UNet) -> float:
    pairs = zip(one.parameters(), other.parameters(), strict=True)
    return max((a - b).abs().max().item() for a, b in pairs)


def _demo_style_on_cpu() -> list[str]:
    """Pretraining options: the demo plate's style only, on the CPU, with the test's torch threads."""
    return ["--styles", "demo_plate", "--device", "cpu", "--threads", str(torch.get_num_threads())]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """Weights of a 2-step, 8-channel pretraining (seed 3) on the demo plate's style."""
    out = tmp_path_factory.mktemp("first_run") / "first.safetensors"
    options = ["--out", str(out), "--seed", "3", "--steps", "2", "--base-channels", "8"]
    assert cli.main(["pretrain-segmenter", *options, *_demo_style_on_cpu()]) == 0
    return out


def test_pretraining_from_init_weights_trains_them_longer_and_records_both_runs(first_run, tmp_path, capsys):
    first, longer = first_run, tmp_path / "longer.safetensors"
    common = _demo_style_on_cpu()
    options = ["--seed", "4", "--steps", "3", "--learning-rate", "0.001", "--init", str(first)]
    assert cli.main(["pretrain-segmenter", "--out", str(longer), *options, *common]) == 0
    start, first_metadata = load_network(first, fuse=False)
    network, metadata = load_network(longer, fuse=False)
    assert network.config == {"base": 8, "depth": 3}  # the width of the initial network
    assert metadata["command"] == "metascreen pretrain-segmenter " + " ".join(
        [*options, "--styles", "demo_plate"]
    )
    assert metadata["settings"]["steps"] == 3 and metadata["settings"]["learning_rate"] == 0.001
    assert metadata["data_seed"] == 4
    recorded = metadata["init"]
    assert recorded["command"] == first_metadata["command"] and recorded["data_seed"] == 3
    assert recorded["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    # the run started from the initial weights (a fresh network of this width differs from them
    # far more than three small steps move them) and changed them
    assert 0.0 < _largest_difference(start, network) < _largest_difference(start, UNet(8)) / 10

    capsys.readouterr()
    widened = ["pretrain-segmenter", "--out", str(longer), "--init", str(first), "--base-channels", "16"]
    assert cli.main([*widened, *common]) == 1
    assert "--base-channels cannot change the width" in capsys.readouterr().err
    branched = ["pretrain-segmenter", "--out", str(longer), "--init", str(first), "--branches"]
    assert cli.main([*branched, *common]) == 1
    assert "training with branches starts from scratch" in capsys.readouterr().err
    missing = ["pretrain-segmenter", "--out", str(longer), "--init", str(tmp_path / "none.safetensors")]
    assert cli.main([*missing, *common]) == 1
    assert "weights not found" in capsys.readouterr().err
    unknown = ["pretrain-segmenter", "--out", str(longer), "--styles", "no_such_style", "--device", "cpu"]
    assert cli.main(unknown) == 1
    assert "unknown style 'no_such_style'" in capsys.readouterr().err


def test_pretraining_with_a_teacher_records_it_and_refuses_one_of_another_scale(
    first_run, tmp_path, capsys, monkeypatch
):
    teacher, student = first_run, tmp_path / "student.safetensors"
    common = _demo_style_on_cpu()
    options = ["--seed", "4", "--steps", "2", "--base-channels", "4", "--teacher", str(teacher)]
    distil = ["pretrain-segmenter", "--out", str(student), *options, "--teacher-weight", "0.25"]
    assert cli.main([*distil, *common]) == 0
    network, metadata = load_network(student)
    assert network.config == {"base": 4, "depth": 3}
    assert metadata["command"] == "metascreen pretrain-segmenter --seed 4 --steps 2 --base-channels 4 " + (
        f"--teacher {teacher} --teacher-weight 0.25 --styles demo_plate"
    )
    recorded = load_network(teacher)[1]
    assert metadata["teacher"]["command"] == recorded["command"] and metadata["teacher"]["weight"] == 0.25
    assert metadata["teacher"]["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert metadata["teacher"]["architecture"] == {"base": 8, "depth": 3}

    capsys.readouterr()
    other_scale = tmp_path / "other_scale.safetensors"
    save_network(UNet(4, 2), other_scale, {"train_diameter": learned.TRAIN_DIAMETER + 10})
    refused = ["pretrain-segmenter", "--out", str(student), "--teacher", str(other_scale)]
    assert cli.main([*refused, *common]) == 1
    assert "trained at a cell diameter of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pretrain-segmenter", "--teacher", str(teacher), "--teacher-weight", "2"])
    assert "must be a number from 0 to 1, got 2" in capsys.readouterr().err
    # from Python too, before the minutes of rendering the training fields
    monkeypatch.setattr(train, "render_training_fields", lambda *args: pytest.fail("rendered first"))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], not 1.5"):
        train.pretrain(student, teacher=teacher, teacher_weight=1.5)


def test_learned_backend_beats_label_free_on_unseen_phase_contrast():
    pairs_learned, pairs_classical = [], []
    for index in range(2):
        image, labels = styles.render_style_field(styles.style_rng(77, "phase_spread", index), "phase_spread")
        diameter = median_diameter(labels)
        pairs_learned.append((labels, segment(image, "learned", cell_diameter=diameter, device="cpu")))
        pairs_classical.append((labels, segment(image, "label_free")))
    assert pooled_ap(pairs_learned) > pooled_ap(pairs_classical) + 0.2


def test_cell_diameter_estimate_follows_the_scale():
    rng = np.random.default_rng(11)
    image, labels, _ = synth.render_field(rng, fraction_positive=0.5, shape=(256, 256), n_cells=40)
    truth = median_diameter(labels)
    zoomed = np.kron(image, np.ones((2, 2), image.dtype))  # the same cells, twice as large
    small = learned.estimate_cell_diameter([image], device="cpu")
    large = learned.estimate_cell_diameter([zoomed], device="cpu")
    assert small["cell_diameter"] == pytest.approx(truth, rel=0.25)
    assert large["cell_diameter"] / small["cell_diameter"] == pytest.approx(2.0, rel=0.2)
    assert len(small["ladder"]) == 9
    empty = learned.estimate_cell_diameter([np.full((128, 128), 100, np.uint16)], device="cpu")
    assert np.isnan(empty["cell_diameter"]) and empty["n_cells"] == 0


def ladder_of(rows: list[tuple[float, int, float, float | None]]) -> list[dict]:
    keys = ("assumed", "n_cells", "median_diameter", "agreement")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def test_the_estimate_is_the_crossing_where_the_same_cells_are_found():
    # measured on a brightfield_round field zoomed twofold (true median diameter 47.7 px):
    # pieces of cells cross the assumption near 20 px, the cells themselves near 48 px
    ladder = ladder_of(
        [
            (10.0, 799, 16.6, 0.10),
            (14.1, 225, 18.7, 0.21),
            (20.0, 80, 19.6, 0.16),
            (28.3, 26, 32.4, 0.63),
            (40.0, 18, 45.7, 0.55),
            (56.6, 13, 51.3, 0.92),
            (80.0, 12, 56.1, 0.83),
            (113.1, 10, 65.2, 0.19),
            (160.0, 9, 109.2, None),
        ]
    )
    diameter, n_cells = learned._stable_fixed_point(ladder)
    assert diameter == pytest.approx(48.6, abs=0.5) and n_cells == 13
    # too few cells at a step: that crossing does not count
    ladder[5]["n_cells"] = 4
    assert learned._stable_fixed_point(ladder)[0] == pytest.approx(19.8, abs=0.5)
    # no crossing at all (cells smaller than every assumption): the closest step
    shrunk = ladder_of([(10.0, 80, 7.7, 0.5), (14.1, 60, 8.6, 0.4), (20.0, 30, 10.1, None)])
    assert learned._stable_fixed_point(shrunk) is None
    assert learned._closest_to_assumption(shrunk) == (7.7, 80)


@pytest.mark.parametrize("style", ["brightfield_round", "phase_spread", "phase_neurite"])
def test_cell_diameter_estimate_is_right_where_blobs_of_cells_fooled_it(style: str):
    # the shipped weights' evaluation fields, on which the old rule (the assumption whose cells
    # come closest to it) estimated 146, 149 and 155 px against true 24, 35 and 13 px
    fields = [(image, labels) for _, image, labels in render_training_fields([style], 4, (256, 256), 10_000)]
    truth = float(np.median(np.concatenate([learned.equivalent_diameters(labels) for _, labels in fields])))
    estimate = learned.estimate_cell_diameter([image for image, _ in fields], device="cpu")
    assert estimate["cell_diameter"] == pytest.approx(truth, rel=0.15)
    assert estimate["rule"] == "fixed point"
    assert all(0.0 <= row["agreement"] <= 1.0 for row in estimate["ladder"][:-1])


def test_stages_estimate_the_plate_diameter_and_segment_with_it(tmp_path, monkeypatch, caplog):
    images = tmp_path / "img"
    images.mkdir()
    truths = {}
    for index, well in enumerate(["A01", "A02"]):
        rng = np.random.default_rng(index)
        image, labels, _ = synth.render_field(rng, fraction_positive=0.5, shape=(256, 256), n_cells=25)
        tifffile.imwrite(images / f"P1_{well}_s1_w1.TIF", image)
        truths[well] = labels
    platemap = pd.DataFrame({"plate": ["P1", "P1"], "well": ["A01", "A02"]})
    settings = validate_config(
        {
            "plates": {"P1": {"images": str(images)}},
            "platemap": "platemap.csv",
            "ingest": {"preset": "imagexpress", "channel_names": ["brightfield"]},
            "segment": {"method": "learned", "learned": {"device": "cpu"}},
        }
    )
    plate, plan = tmp_path / "P1.ome.zarr", tmp_path / "plan.json"
    stages.plan("P1", images, platemap, settings["ingest"], plan, plate)
    estimate = stages.estimate_cell_diameter(plan, settings["segment"], tmp_path / "diameter.json")
    assert 15 < estimate["cell_diameter"] < 35 and estimate["fields"] == [["A01", 0], ["A02", 0]]
    for well in truths:
        stages.ingest_well(plan, plate, well, settings["ingest"], tmp_path / f"{well}.json")
        stages.segment_well(
            plate,
            well,
            settings["segment"],
            tmp_path / f"seg_{well}.json",
            cell_diameter_path=tmp_path / "diameter.json",
        )
        manifest = stages.read_json(tmp_path / f"seg_{well}.json")
        assert manifest["method"] == "learned" and manifest["cell_diameter"] == estimate["cell_diameter"]
        assert manifest["precision"] == ("bfloat16" if model._cpu_has_native_bfloat16() else "float32")
        labels = ngff.field_labels(plate, well, 0)
        assert match_instances(truths[well], labels)["ap"] > 0.8
    # a diameter in µm goes through the plate's pixel size (0.65 µm here)
    microns = {**settings["segment"], "learned": {**settings["segment"]["learned"], "cell_diameter_um": 13.0}}
    assert stages._backend_parameters(plate, "A01", microns, None)["cell_diameter"] == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="no plate estimate"):
        stages._backend_parameters(plate, "A01", settings["segment"], None)
    # a plate without cells says what to do
    blank = tmp_path / "blank"
    blank.mkdir()
    tifffile.imwrite(blank / "P1_A01_s1_w1.TIF", np.full((128, 128), 900, np.uint16))
    stages.plan(
        "P1", blank, platemap.iloc[:1], settings["ingest"], tmp_path / "blank.json", tmp_path / "b.ome.zarr"
    )
    with pytest.raises(ConfigError, match="fewer than 5 cells at every scale.*cell_diameter"):
        stages.estimate_cell_diameter(tmp_path / "blank.json", settings["segment"], tmp_path / "none.json")
    # an estimate that no scale confirmed is kept, with a warning saying what to check
    unconfirmed = {"cell_diameter": 9.0, "n_cells": 50, "rule": "closest", "ladder": []}
    monkeypatch.setattr(learned, "estimate_cell_diameter", lambda planes, **_: unconfirmed)
    with caplog.at_level(logging.WARNING, logger="metascreen"):
        estimate = stages.estimate_cell_diameter(plan, settings["segment"], tmp_path / "closest.json")
    assert estimate["cell_diameter"] == 9.0
    assert "no assumed scale from 10 to 160 px was confirmed" in caplog.text


def test_report_provenance_names_the_weights_and_the_estimated_diameter(tmp_path):
    learned_settings = validate_config({"plates": {"P": {"images": "x"}}, "platemap": "p.csv"})["segment"]
    assert learned_settings["method"] == "learned"
    classical = {**learned_settings, "method": "label_free"}
    assert stages._segmentation_provenance(classical, None) == {"method": "label_free"}
    estimate = tmp_path / "cell_diameter.json"
    found = {"cell_diameter": 23.46, "n_cells": 180, "fields": [["A01", 0], ["B02", 0]]}
    estimate.write_text(json.dumps({**found, "rule": "closest"}))
    provenance = stages._segmentation_provenance(learned_settings, estimate)
    assert "180 cells in 2 fields; no scale from 10 to 160 px was confirmed" in provenance["cell_diameter_px"]
    estimate.write_text(json.dumps({**found, "rule": "fixed point"}))
    provenance = stages._segmentation_provenance(learned_settings, estimate)
    assert provenance["cell_diameter_px"] == "23.5 (estimated from 180 cells in 2 fields)"
    assert provenance["weights"].endswith("learned.safetensors") and len(provenance["weights_sha256"]) == 64
