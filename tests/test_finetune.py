"""Annotations in (TIFF pairs, OME-Zarr labels), partial annotation, and fine-tuning that helps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from metascreen import annotations, ngff, stages, styles
from metascreen.config import validate_config
from metascreen.segment import learned, train
from metascreen.segment.metrics import cells_centred_in
from metascreen.segment.network import load_network

from .small_plate import WELLS, planned_jobs, run, snakemake_command, write_config, write_plate

# dic_round is held out of pretraining: the shipped weights score 0.91 zero-shot on
# 512 x 512 fields of it (benchmarks/bench_finetune.py) and 0.80 on the 256 x 256 test fields below
STYLE = "dic_round"


def _labels(shape=(64, 64)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    labels[10:20, 10:20], labels[30:45, 30:40] = 1, 2
    return labels


@pytest.mark.parametrize(
    ("image", "mask", "region", "message"),
    [
        (np.zeros((64, 64)), _labels((64, 60)), None, "differs from the image's"),
        (np.zeros((64, 64)), np.zeros((64, 64), np.int32), None, "the mask is empty"),
        (np.zeros((64, 64)), _labels() * 0.5, None, "integer cell labels"),
        (np.zeros((64, 64)), -_labels(), None, "negative values"),
        (np.zeros((2, 64, 64)), _labels(), None, "one 2-D plane"),
        (np.zeros((64, 64)), _labels(), np.zeros((64, 64)), "the region is empty"),
        (np.zeros((64, 64)), _labels(), np.ones((32, 64)), "region's shape"),
    ],
)
def test_bad_annotations_name_the_file_and_the_problem(image, mask, region, message):
    with pytest.raises(ValueError, match=message) as error:
        annotations.check_annotation("field_03_masks.tif", image, mask, region)
    assert str(error.value).startswith("field_03_masks.tif: ")


def test_float_masks_of_whole_numbers_and_singleton_axes_are_accepted():
    annotation = annotations.check_annotation("f", np.zeros((1, 64, 64), np.uint16), _labels().astype(float))
    assert annotation.labels.dtype == np.int32 and annotation.labels.max() == 2
    assert annotation.image.shape == (64, 64) and annotation.region.all()


def test_tiff_pairs_are_paired_by_name_with_optional_regions(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((64, 64), np.uint16))
    tifffile.imwrite(tmp_path / "a_masks.tif", _labels())
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 1
    tifffile.imwrite(tmp_path / "a_region.tif", left)
    tifffile.imwrite(tmp_path / "b.tiff", np.ones((64, 64), np.uint8))
    tifffile.imwrite(tmp_path / "b_masks.tiff", _labels())
    tifffile.imwrite(tmp_path / "unannotated.tif", np.ones((64, 64), np.uint8))

    found = annotations.read_annotations([tmp_path])
    assert [a.name for a in found] == [str(tmp_path / "a_masks.tif"), str(tmp_path / "b_masks.tiff")]
    assert found[0].region.sum() == 64 * 32 and found[1].region.all()
    assert len(annotations.annotation_files([tmp_path])) == 5  # the unannotated image is not read
    before = annotations.annotations_digest([tmp_path])
    tifffile.imwrite(tmp_path / "a_masks.tif", _labels() * 2)
    assert annotations.annotations_digest([tmp_path]) != before

    tifffile.imwrite(tmp_path / "c_masks.tif", _labels())
    with pytest.raises(ValueError, match="c_masks.tif: no image c.tif"):
        annotations.read_annotations([tmp_path])


def test_a_folder_without_annotations_says_what_it_expected(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((64, 64), np.uint16))
    with pytest.raises(ValueError, match="no annotated field .*NAME_masks.tif"):
        annotations.read_annotations([tmp_path])
    with pytest.raises(FileNotFoundError, match="annotations not found"):
        annotations.read_annotations([tmp_path / "missing"])


def test_annotations_are_read_from_a_plates_ome_zarr(tmp_path):
    image = np.random.default_rng(0).integers(100, 200, (2, 64, 64)).astype(np.uint16)  # 2 channels
    for channel in range(2):
        tifffile.imwrite(tmp_path / f"P1_A01_s1_w{channel + 1}.TIF", image[channel])
        tifffile.imwrite(tmp_path / f"P1_B02_s1_w{channel + 1}.TIF", image[channel])
    ingest = validate_config(
        {
            "plates": {"P1": {"images": str(tmp_path)}},
            "platemap": "platemap.csv",
            "ingest": {"preset": "imagexpress", "channel_names": ["a", "b"]},
        }
    )["ingest"]
    plate = tmp_path / "P1.ome.zarr"
    platemap = pd.DataFrame({"plate": ["P1", "P1"], "well": ["A01", "B02"]})
    stages.plan("P1", tmp_path, platemap, ingest, tmp_path / "plan.json", plate)
    for well in ("A01", "B02"):
        stages.ingest_well(tmp_path / "plan.json", plate, well, ingest, tmp_path / f"{well}.json")
    field = ngff.field_indices(plate, "B02")[0]
    ngff.write_field_labels(plate, "B02", field, _labels())  # the segmentation's cells
    ngff.write_field_labels(plate, "B02", field, _labels(), name=annotations.ZARR_LABEL)
    ngff.write_field_labels(plate, "B02", field, _labels())  # resegmenting keeps the annotation listed

    found = annotations.read_annotations([plate], channel=1)
    assert [a.name for a in found] == [f"P1.ome.zarr B02 field {field}"]
    np.testing.assert_array_equal(found[0].image, image[1])
    np.testing.assert_array_equal(found[0].labels, _labels())
    assert found[0].region.all()
    listed = ngff.zarr.open_group(str(plate / "B" / "02" / str(field) / "labels")).attrs["ome"]["labels"]
    assert sorted(listed) == ["annotations", "cells"]
    assert annotations.annotation_files([plate])  # the digest covers the label image's files


def test_preview_uses_a_fine_tuned_model_only_while_it_matches_the_annotations(tmp_path):
    folder = tmp_path / "annotations"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.ones((64, 64), np.uint16))
    tifffile.imwrite(folder / "a_masks.tif", _labels())
    assert stages._current_finetuned_model(tmp_path, [folder]) is None  # not fine-tuned yet
    model = tmp_path / "results" / "segmenter" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    stages.write_json(
        model.with_suffix(".json"), {"annotations_sha256": annotations.annotations_digest([folder])}
    )
    assert stages._current_finetuned_model(tmp_path, [folder]) == model
    tifffile.imwrite(folder / "a_masks.tif", _labels() * 3)  # annotations edited since
    assert stages._current_finetuned_model(tmp_path, [folder]) is None


def test_validation_strip_is_the_far_end_of_the_region_along_its_longer_side():
    region = np.zeros((40, 100), bool)
    region[5:35, 10:60] = True
    train_part, validation = annotations.validation_split(region, 0.2)
    assert not (train_part & validation).any() and ((train_part | validation) == region).all()
    assert validation.sum() == 30 * 10 and np.nonzero(validation)[1].min() == 50


def test_cells_are_counted_in_the_part_that_holds_their_centre():
    labels = np.zeros((20, 40), np.int32)
    labels[5:10, 15:25] = 1  # centre at column 19.5 -> 20, right half
    labels[5:10, 2:8] = 2
    right = np.zeros(labels.shape, bool)
    right[:, 20:] = True
    kept = cells_centred_in(labels, right)
    assert kept.max() == 1 and (kept > 0).sum() == 50


@pytest.fixture(scope="module")
def held_out_style_fields():
    fields = train.render_training_fields([STYLE], 4, (256, 256), 50_000)
    annotated = annotations.check_annotation("annotated", fields[0][1], fields[0][2])
    return annotated, [(image, labels) for _, image, labels in fields[1:]]


@pytest.mark.slow
def test_fine_tuning_on_one_field_of_an_unseen_style_improves_its_held_out_cells(held_out_style_fields):
    assert STYLE in styles.HELD_OUT_STYLES and STYLE not in styles.STYLE_NAMES
    annotated, others = held_out_style_fields
    shipped, _ = load_network(learned.SHIPPED_WEIGHTS, fuse=False)
    before = train.network_ap(shipped, others)
    # the default 500 steps, measured on these fields: the other fields 0.80 -> 0.87 (a third
    # of what was missing; the 16-channel weights of 17f55b2: 0.74 -> 0.87, half; those before
    # the crossed styles 0.62 -> 0.90). A gain in AP alone would fail better zero-shot weights,
    # so the test asks for a share of the errors; one without fine-tuning's effect removes none.
    network, evaluation = train.finetune([annotated], device="cpu")
    after = train.network_ap(network, others)
    assert before > 0.5, before
    assert after - before >= 0.25 * (1.0 - before), (before, after)
    assert evaluation["ap50_after"] >= evaluation["ap50_before"]
    assert evaluation["n_validation_cells"] > 5 and evaluation["n_annotated_fields"] == 1


def test_unannotated_pixels_carry_no_loss_and_crops_centre_on_annotated_ones():
    import torch

    rng = np.random.default_rng(0)
    logits, target = torch.randn(2, 3, 32, 32), torch.rand(2, 4, 32, 32).round()
    target[:, 3] = 0.0
    target[:, 3, :, :16] = 1.0  # only the left half annotated
    changed = target.clone()
    changed[:, :3, :, 16:] = 1.0 - changed[:, :3, :, 16:]
    assert torch.isclose(train._loss(logits, target), train._loss(logits, changed))
    assert not torch.isclose(train._loss(logits, target[:, :3]), train._loss(logits, changed[:, :3]))

    image, labels = np.zeros((400, 400), np.float32), np.zeros((400, 400), np.int32)
    labels[300:320, 300:320] = 1
    region = np.zeros((400, 400), bool)
    region[300:, 300:] = True
    pool = train._Pool([("f", image, labels)], 64, [region])
    _, targets = pool.batch(rng, 8, 64)
    assert targets.shape == (8, 4, 64, 64)
    assert (targets[:, 3].mean(dim=(1, 2)) > 0.2).all()  # every crop mostly in the region


@pytest.mark.parametrize("freeze", [True, False])
def test_fine_tuning_keeps_the_running_statistics_of_pretraining(freeze):
    import dataclasses

    import torch

    from metascreen.segment.network import UNet

    assert train.FINETUNE_SETTINGS.freeze_batch_norm
    torch.manual_seed(0)
    network = UNet(4, 2)
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    settings = dataclasses.replace(
        train.FINETUNE_SETTINGS, steps=2, batch_size=2, crop=64, freeze_batch_norm=freeze
    )
    fields = train.render_training_fields(["phase_round"], 1, (128, 128), 0)
    tuned = train.train_network(fields, settings, device="cpu", network=network, progress_every=0)
    after = tuned.state_dict()
    running = [name for name in before if name.endswith(("running_mean", "running_var"))]
    trainable = [name for name in before if name.endswith(("weight", "bias"))]
    assert running and trainable
    # the scales, shifts and convolutions learn either way; the statistics only when not frozen
    assert all(not torch.equal(before[name], after[name]) for name in trainable)
    assert all(torch.equal(before[name], after[name]) for name in running) == freeze


@pytest.mark.slow
def test_workflow_fine_tunes_segments_with_the_model_and_reruns_only_what_follows(tmp_path):
    write_plate(tmp_path / "plate", seed=5, wells=WELLS[:4])
    write_config(tmp_path, {"demo": tmp_path / "plate"})
    folder = tmp_path / "annotations"
    folder.mkdir()
    shutil.copy(tmp_path / "plate" / "images" / "demo_A01_s1_w1.TIF", folder / "a01.tif")
    shutil.copy(tmp_path / "plate" / "truth" / "masks" / "demo_A01_s1.tif", folder / "a01_masks.tif")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["segment"]["learned"]["finetune"] = {"annotations": ["annotations"], "steps": 20}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/demo/segment/{well}.json" for well in WELLS[:2]]

    run(snakemake_command(tmp_path, *targets))
    segmenter = tmp_path / "results" / "segmenter"
    evaluation = json.loads((segmenter / "evaluation.json").read_text())
    assert evaluation["n_annotated_fields"] == 1 and evaluation["steps"] == 20
    assert 0.0 <= evaluation["ap50_after"] <= 1.0 and evaluation["n_validation_cells"] > 0
    metadata = json.loads((segmenter / "model.json").read_text())
    assert metadata["annotations_sha256"] == annotations.annotations_digest([folder])
    manifest = json.loads((tmp_path / "results" / "demo" / "segment" / "A01.json").read_text())
    assert manifest["weights"] == "results/segmenter/model.safetensors"
    assert sum(manifest["cells_per_field"]) > 0
    assert planned_jobs(tmp_path, *targets) == {}
    # the plate's report will show the fine-tuning evaluation
    dry_run = run(snakemake_command(tmp_path, "results/demo/report.html", "--dry-run", "--printshellcmds"))
    assert "--segmenter-evaluation results/segmenter/evaluation.json" in dry_run.stdout

    mask = tifffile.imread(folder / "a01_masks.tif")
    tifffile.imwrite(folder / "a01_masks.tif", np.where(mask == mask.max(), 0, mask))  # one cell less
    assert planned_jobs(tmp_path, *targets) == {
        "train_segmenter": 1,
        "estimate_cell_diameter": 1,
        "segment_well": 2,
    }
