"""File discovery, planning and the OME-Zarr HCS writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image

from metascreen import discover, ngff, stages, synth

INGEST = {
    "preset": "imagexpress",
    "pattern": None,
    "channel_names": ["bf"],
    "pixel_size_um": 0.5,
    "compression_level": 3,
    "unexpected_wells": "warn",
}


def write_tiffs(folder: Path, wells: list[str], fields: int = 2, channels: int = 1, shape=(64, 80)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    pixels = {}
    for well in wells:
        for field in range(fields):
            for channel in range(channels):
                image = rng.integers(0, 4096, shape, dtype=np.uint16)
                tifffile.imwrite(folder / f"P1_{well}_s{field + 1}_w{channel + 1}.TIF", image)
                pixels[(well, field, channel)] = image
    return pixels


@pytest.mark.parametrize(
    ("name", "preset", "expected"),
    [
        ("Plate_B03_s2_w1.TIF", "imagexpress", ("B03", 2, 1)),
        ("Plate_b3_s12_w2.tif", "imagexpress", ("B03", 12, 2)),
        ("AS_09047_050428030001_O01f00d2.TIF", "cellomics", ("O01", 0, 2)),
    ],
)
def test_presets_parse_vendor_names(name, preset, expected):
    groups = discover.naming_pattern(preset).match(name).groupdict()
    assert (discover.normalise_well(groups["well"]), int(groups["field"]), int(groups["channel"])) == expected


def test_user_regex_needs_named_groups():
    with pytest.raises(discover.DiscoveryError, match="named groups"):
        discover.naming_pattern("regex", r"(?P<well>\w+)\.tif")
    pattern = discover.naming_pattern(
        "regex", r"r(?P<row>\d+)c(?P<col>\d+)f(?P<field>\d+)-ch(?P<channel>\d+)\.tiff"
    )
    files, _ = discover.discover_files(_touch(pattern, "r02c03f01-ch1.tiff"), pattern)
    assert files["well"].tolist() == ["B03"]


def _touch(_pattern, name: str) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    tifffile.imwrite(folder / name, np.zeros((4, 4), np.uint8))
    return folder


def test_plan_reports_layout_and_unexpected_wells(tmp_path):
    write_tiffs(tmp_path / "img", ["A01", "A02", "B01"], fields=3, channels=2)
    (tmp_path / "img" / "notes.txt").write_text("x")
    files, unmatched = discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))
    layout = discover.plan_plate("P1", files, unmatched, ["A01", "A02"])
    assert (layout["n_fields"], layout["n_channels"], layout["n_files"]) == (3, 2, 12)
    assert layout["unexpected_wells"] == ["B01"]
    assert layout["unmatched_files"] == ["notes.txt"]
    assert sorted(layout["wells"]) == ["A01", "A02"]
    with pytest.raises(discover.DiscoveryError, match="absent from the plate map: B01"):
        discover.plan_plate("P1", files, unmatched, ["A01", "A02"], unexpected_wells="error")


def test_plate_map_well_without_images_is_an_error(tmp_path):
    write_tiffs(tmp_path / "img", ["A01"])
    files, unmatched = discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))
    with pytest.raises(discover.DiscoveryError, match="plate-map wells without images: C07"):
        discover.plan_plate("P1", files, unmatched, ["A01", "C07"])


@pytest.mark.parametrize("damage", ["empty", "truncated", "shape"])
def test_bad_files_are_named(tmp_path, damage):
    write_tiffs(tmp_path / "img", ["A01", "A02"])
    victim = tmp_path / "img" / "P1_A02_s2_w1.TIF"
    if damage == "empty":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        tifffile.imwrite(victim, np.zeros((10, 10), np.uint16))
    files, unmatched = discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))
    with pytest.raises(discover.DiscoveryError, match="P1_A02_s2_w1.TIF"):
        discover.plan_plate("P1", files, unmatched, ["A01", "A02"])


def test_ingest_round_trip_is_pixel_exact_and_valid_ngff(tmp_path):
    pixels = write_tiffs(tmp_path / "img", ["A01", "B02"], fields=2, channels=2)
    platemap = pd.DataFrame({"plate": ["P1", "P1"], "well": ["A01", "B02"]})
    plate = tmp_path / "P1.ome.zarr"
    stages.plan("P1", tmp_path / "img", platemap, INGEST, tmp_path / "plan.json", plate)
    for well in ("A01", "B02"):
        stages.ingest_well(tmp_path / "plan.json", plate, well, INGEST, tmp_path / f"{well}.json", threads=2)
        assert not list((plate / well[0]).glob(".*partial"))
    for (well, field, channel), image in pixels.items():
        stored = ngff.field_image(plate, well, field)
        assert stored.shape == (1, 2, 1, 64, 80)
        assert stored.chunksize == (1, 1, 1, 64, 80)
        np.testing.assert_array_equal(stored[0, channel, 0].compute(), image)

    labels = np.zeros((64, 80), np.int32)
    labels[5:20, 5:30] = 1
    ngff.write_field_labels(plate, "A01", 1, labels)
    np.testing.assert_array_equal(ngff.field_labels(plate, "A01", 1), labels)

    HCS.from_zarr(zarr.open_group(str(plate), mode="r"))
    image = Image.from_zarr(zarr.open_group(str(plate / "A" / "01" / "1"), mode="r"))
    assert image.labels is not None
    level0 = zarr.open_array(str(plate / "A" / "01" / "0" / "s0"), mode="r")
    assert level0.compressors[0].cname.value == "zstd"


def test_pyramid_levels_grow_with_field_size():
    assert ngff.pyramid_factors((512, 512)) == [2]
    assert ngff.pyramid_factors((2048, 2048)) == [2, 4, 8]


def test_transfluor_plate_ingests_with_config_only(tmp_path, shared_data):
    folder = shared_data / "transfluor_plate"
    settings = {**INGEST, "preset": "cellomics"}
    wells = [f"O{column:02d}" for column in range(1, 25)]
    platemap = pd.DataFrame({"plate": "transfluor", "well": wells})
    plate = tmp_path / "t.ome.zarr"
    layout = stages.plan("transfluor", folder, platemap, settings, tmp_path / "plan.json", plate)
    assert (len(layout["wells"]), layout["n_fields"], layout["n_channels"]) == (24, 3, 1)
    stages.ingest_well(tmp_path / "plan.json", plate, "O07", settings, tmp_path / "O07.json")
    original = tifffile.imread(folder / "AS_09047_050428030001_O07f02d2.TIF")
    np.testing.assert_array_equal(ngff.field_image(plate, "O07", 2)[0, 0, 0].compute(), original)
    HCS.from_zarr(zarr.open_group(str(plate), mode="r"))


def test_synthetic_z_and_channel_stacks_ingest(tmp_path):
    layout = synth.demo_layout().head(2)
    synth.write_plate(
        tmp_path / "plate",
        layout=layout,
        fields_per_well=1,
        shape=(96, 96),
        cells_per_field=(2, 3),
        z_planes=3,
        channels=2,
    )
    plate = tmp_path / "demo.ome.zarr"
    stages.plan("demo", tmp_path / "plate" / "images", layout, INGEST, tmp_path / "plan.json", plate)
    well = layout["well"].iloc[0]
    stages.ingest_well(tmp_path / "plan.json", plate, well, INGEST, tmp_path / "w.json")
    stored = ngff.field_image(plate, well, 0)
    assert stored.shape == (1, 2, 3, 96, 96)
    original = tifffile.imread(tmp_path / "plate" / "images" / f"demo_{well}_s1_w2.TIF")
    np.testing.assert_array_equal(stored[0, 1].compute(), original)
