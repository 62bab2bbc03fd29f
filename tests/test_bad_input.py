"""Odd but legal input is read as it is; bad input stops with one line naming the culprit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from metascreen import cli, discover, measure, ngff

from .test_ingest import ingest_all


def grey_plate(folder, wells, shape=(16, 16), dtype=np.uint16, value=100):
    folder.mkdir(parents=True)
    for well in wells:
        tifffile.imwrite(folder / f"P1_{well}_s1_w1.TIF", np.full(shape, value, dtype))
    return folder


def test_unicode_and_spaces_in_paths(tmp_path):
    folder = grey_plate(tmp_path / "Müller lab" / "plate 1 (µm)", ["A01", "B02"])
    plate, layout = ingest_all(folder, tmp_path / "out dir ü", ["A01", "B02"])
    assert sorted(layout["wells"]) == ["A01", "B02"]
    assert int(ngff.field_image(plate, "B02", 0).compute().max()) == 100


def test_a_symlinked_image_folder_is_followed(tmp_path):
    real = grey_plate(tmp_path / "real", ["C03"])
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    plate, layout = ingest_all(tmp_path / "link", tmp_path, ["C03"])
    assert layout["n_files"] == 1 and layout["wells"]["C03"][0]["files"][0][0].startswith(
        str(tmp_path / "link")
    )


def test_a_384_well_plate_with_one_field_each(tmp_path):
    wells = [f"{row}{column:02d}" for row in "ABCDEFGHIJKLMNOP" for column in range(1, 25)]
    folder = grey_plate(tmp_path / "img", wells, shape=(4, 4))
    files, _ = discover.discover_files(folder, discover.naming_pattern("imagexpress"))
    layout = discover.plan_plate("P1", files, [], wells)
    assert len(layout["wells"]) == 384 and layout["n_fields"] == 1 and sorted(layout["wells"])[-1] == "P24"


def test_an_rgb_file_among_grey_ones_is_named(tmp_path):
    folder = grey_plate(tmp_path / "img", ["A01", "A02", "A03"], dtype=np.uint8)
    tifffile.imwrite(folder / "P1_A02_s1_w1.TIF", np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(folder / "P1_A02_s2_w1.TIF", np.zeros((16, 16), np.uint8))
    files, _ = discover.discover_files(folder, discover.naming_pattern("imagexpress"))
    with pytest.raises(
        discover.DiscoveryError, match=r"P1_A02_s1_w1.TIF: shape \[1, 3, 1, 16, 16\] uint8 differs"
    ):
        discover.plan_plate("P1", files, [], ["A01", "A02", "A03"])
    layout = discover.plan_plate("P1", files, [], ["A01", "A02", "A03"], bad_files="skip")
    assert [entry["file"] for entry in layout["skipped"]] == ["P1_A02_s1_w1.TIF"]
    assert [field["field"] for field in layout["wells"]["A02"]] == [1]


def test_twelve_bit_data_in_sixteen_bit_files_is_kept_and_saturates_at_the_set_level(tmp_path):
    image = np.random.default_rng(0).integers(0, 4096, (32, 32)).astype(np.uint16)
    image[:4] = 4095
    folder = tmp_path / "img"
    folder.mkdir()
    tifffile.imwrite(folder / "P1_A01_s1_w1.TIF", image)
    plate, layout = ingest_all(folder, tmp_path, ["A01"])
    stored = ngff.field_image(plate, "A01", 0).compute()[0, 0, 0]
    assert layout["dtype"] == "uint16" and np.array_equal(stored, image)
    labels = np.zeros_like(image, dtype=np.int32)
    labels[10:20, 10:20] = 1
    assert measure.field_quality(stored, labels)["saturated_fraction"] == 0.0
    quality = measure.field_quality(stored, labels, saturation_level=4095)
    assert quality["saturated_fraction"] == pytest.approx(np.mean(image >= 4095))


def test_a_field_with_nan_pixels_is_measured_on_its_finite_pixels():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (48, 48)).astype(np.float32)
    labels = np.zeros((48, 48), np.int32)
    labels[10:30, 10:30] = 1
    with_nan = image.copy()
    with_nan[40:, :] = np.nan
    quality = measure.field_quality(with_nan, labels)
    finite = image[:40]
    assert quality["nan_fraction"] == pytest.approx(8 / 48)
    assert quality["contrast"] == pytest.approx(finite.std(dtype=np.float64) / finite.mean(dtype=np.float64))
    assert np.isfinite(quality["focus"]) and quality["n_cells"] == 1
    all_nan = measure.field_quality(np.full((48, 48), np.nan, np.float32), np.zeros((48, 48), np.int32))
    assert all_nan["nan_fraction"] == 1.0 and all_nan["contrast"] == 0.0 and np.isnan(all_nan["focus"])


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 64, b"not a model at all", json.dumps({"a": 1}).encode()],
    ids=["empty", "zeros", "text", "json"],
)
def test_a_corrupt_train_model_is_one_line_without_a_traceback(tmp_path, capsys, content):
    source = tmp_path / "model.safetensors"
    source.write_bytes(content)
    arguments = [
        "import-model",
        "--source",
        str(source),
        "--crop-settings",
        '{"crop_size": 64, "with_mask": true}',
    ]
    status = cli.main(
        [*arguments, "--model", str(tmp_path / "m.safetensors"), "--evaluation", str(tmp_path / "e.json")]
    )
    error = capsys.readouterr().err
    assert status == 1 and "Traceback" not in error
    assert error.startswith(f"metascreen import-model: error: train.model {source} cannot classify")
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "m.safetensors").exists()


def test_a_platemap_well_with_a_stray_space_is_named(tmp_path):
    from metascreen.config import ConfigError, read_platemap, validate_platemap

    (tmp_path / "map.csv").write_text("plate,well,sample\nP1,A01 ,s1\n")
    with pytest.raises(ConfigError, match=r"platemap row 2: well: 'A01 ' does not match"):
        validate_platemap(
            read_platemap(tmp_path / "map.csv"),
            plates=["P1"],
            classes={"negative": "a", "positive": "b"},
        )


def test_a_plate_whose_segmentation_found_almost_nothing_stops_with_one_line(tmp_path, capsys):
    manifests = []
    for well, cells in (("A01", [0, 0]), ("A02", [1, 0]), ("B01", [35, 40])):
        manifests.append(tmp_path / f"{well}.json")
        manifests[-1].write_text(
            json.dumps({"well": well, "method": "learned", "cells_per_field": cells, "cell_diameter": 61.0})
        )
    qc = '{"min_cells_per_well": 20, "max_low_cell_well_fraction": 0.5}'
    arguments = ["check-segmentation", "--plate", "P1", "--manifests", *map(str, manifests), "--qc", qc]
    status = cli.main([*arguments, "--output", str(tmp_path / "check.json")])
    error = capsys.readouterr().err
    assert status == 1 and "Traceback" not in error
    assert error.startswith(
        "metascreen check-segmentation: error: plate P1: segmentation found fewer than 20 cells "
        "(qc.min_cells_per_well) in 2 of 3 wells (A01, A02)"
    )
    assert "median 0.5 cells per field, learned segmentation at a cell diameter of 61.0 px" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "check.json").exists()

    tolerant = '{"min_cells_per_well": 20, "max_low_cell_well_fraction": 0.7}'
    assert cli.main([*arguments[:-1], tolerant, "--output", str(tmp_path / "check.json")]) == 0
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["cells_per_well"] == {"A01": 0, "A02": 1, "B01": 75} and check["passes"] is True
