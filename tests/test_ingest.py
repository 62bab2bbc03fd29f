"""File discovery, planning and the OME-Zarr HCS writer."""

from __future__ import annotations

import json
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
    "chunk_size": None,
    "shard": False,
    "bad_files": "error",
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


@pytest.mark.parametrize(
    ("name", "preset", "expected"),
    [
        # MetaXpress appends the image's GUID; one site has no _s, one wavelength no _w
        (
            "Week1_150607_B02_s1_w1EB868A72-19FC-46BB-BDFA-66B8966A817C.tif",
            "imagexpress",
            {"plate": "Week1_150607", "well": "B02", "field": "1", "channel": "1"},
        ),
        ("Plate_B03_w2.TIF", "imagexpress", {"well": "B03", "field": None, "channel": "2"}),
        ("Plate_B03_s4.TIF", "imagexpress", {"well": "B03", "field": "4", "channel": None}),
        ("MFGTMP_140206180002_A01f12d4.TIF", "cellomics", {"well": "A01", "field": "12", "channel": "4"}),
        # Harmony: p = plane (Z), ch = channel, sk = time point
        (
            "r03c12f09p05-ch3sk17fk1fl1.tiff",
            "operetta",
            {"row": "03", "col": "12", "field": "09", "z": "05", "channel": "3", "t": "17"},
        ),
        # Incucyte: the channel after the vessel; LIVECell's trailing crop index
        (
            "A172_Phase_A7_1_00d00h00m.tif",
            "incucyte",
            {"plate": "A172", "channel": "Phase", "well": "A7", "field": "1", "t": "00d00h00m", "tile": None},
        ),
        (
            "Exp1_Green_B3_2_01d12h30m.tif",
            "incucyte",
            {"plate": "Exp1", "channel": "Green", "well": "B3", "field": "2", "t": "01d12h30m"},
        ),
        ("A172_Phase_A7_1_00d00h00m_1.tif", "incucyte", {"plate": "A172", "well": "A7", "tile": "1"}),
        ("VID1_B3_1_00d04h00m.tif", "incucyte", {"plate": "VID1", "channel": None, "t": "00d04h00m"}),
    ],
)
def test_presets_read_documented_export_names(name, preset, expected):
    groups = discover.naming_pattern(preset).match(name).groupdict()
    assert {key: groups[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("name", "preset"),
    [
        ("Week1_150607_B02_s1_thumbEB868A72-19FC-46BB-BDFA-66B8966A817C.tif", "imagexpress"),
        ("r02c03f01p01-ch1.tiff", "operetta"),
        ("A172_Phase_A7_00d00h00m.tif", "incucyte"),
    ],
)
def test_presets_refuse_thumbnails_and_partial_names(name, preset):
    assert discover.naming_pattern(preset).match(name) is None


def test_incucyte_phase_and_green_export_is_one_plate_with_phase_first(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for channel, value in (("Green", 7), ("Phase", 3)):
        for stamp in ("00d00h00m", "00d12h00m"):
            for well in ("A7", "B3"):
                tifffile.imwrite(
                    folder / f"Exp1_{channel}_{well}_1_{stamp}.tif", np.full((16, 16), value, np.uint8)
                )
    plate, layout = ingest_all(folder, tmp_path, ["A07", "B03"], preset="incucyte")
    assert layout["shape"] == [2, 2, 1, 16, 16] and layout["n_files"] == 8
    stored = ngff.field_image(plate, "B03", 0).compute()
    assert stored[:, 0].max() == 3 and stored[:, 1].min() == 7  # Phase is channel 0, Green channel 1


def test_livecell_crop_index_makes_fields_of_its_own(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for index in (1, 2, 3):
        tifffile.imwrite(folder / f"A172_Phase_A7_1_00d00h00m_{index}.tif", np.full((8, 8), index, np.uint8))
    tifffile.imwrite(folder / "A172_Phase_A7_2_00d00h00m_1.tif", np.full((8, 8), 9, np.uint8))
    files, unmatched = discover.discover_files(folder, discover.naming_pattern("incucyte"))
    assert unmatched == [] and files["field"].tolist() == [0, 1, 2, 3]
    assert [Path(path).name for path in files["path"]] == [
        "A172_Phase_A7_1_00d00h00m_1.tif",
        "A172_Phase_A7_1_00d00h00m_2.tif",
        "A172_Phase_A7_1_00d00h00m_3.tif",
        "A172_Phase_A7_2_00d00h00m_1.tif",
    ]


def test_operetta_time_points_stack_along_t(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for t in (1, 2, 10):
        for plane in (1, 2):
            image = np.full((8, 8), 10 * t + plane, np.uint16)
            tifffile.imwrite(folder / f"r01c01f01p{plane:02d}-ch1sk{t}fk1fl1.tiff", image)
    plate, layout = ingest_all(folder, tmp_path, ["A01"], preset="operetta")
    assert layout["shape"] == [3, 1, 2, 8, 8]
    assert ngff.field_image(plate, "A01", 0).compute()[:, 0, :, 0, 0].tolist() == [
        [11, 12],
        [21, 22],
        [101, 102],
    ]


def test_an_empty_image_folder_says_it_is_empty(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / ".DS_Store").write_text("")
    with pytest.raises(discover.DiscoveryError, match=r"image folder .*img is empty"):
        discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))
    (tmp_path / "img" / "notes.txt").write_text("")
    with pytest.raises(discover.DiscoveryError, match=r"matches the naming pattern .*'notes.txt'"):
        discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))


def test_omero_window_spans_the_pixels_of_each_field_and_the_manifest_the_well(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(3)
    fields = [
        rng.integers(1273, 2429, (64, 64)).astype(np.uint16),
        rng.integers(1500, 3000, (64, 64)).astype(np.uint16),
    ]
    for index, image in enumerate(fields):
        tifffile.imwrite(folder / f"P1_A01_s{index + 1}_w1.TIF", image)
    plate, _ = ingest_all(folder, tmp_path, ["A01"])
    for index, image in enumerate(fields):
        omero = zarr.open_group(str(plate / "A" / "01" / str(index)), mode="r").attrs["ome"]["omero"]
        window = omero["channels"][0]["window"]
        sample = image[::4, ::4]
        assert (window["min"], window["max"]) == (0.0, 65535.0)
        assert window["start"] == pytest.approx(np.percentile(sample, 1))
        assert window["end"] == pytest.approx(np.percentile(sample, 99))
    manifest = json.loads((tmp_path / "A01.json").read_text())
    assert manifest["window"][0]["start"] == pytest.approx(np.percentile(fields[0][::4, ::4], 1))
    assert manifest["window"][0]["end"] == pytest.approx(np.percentile(fields[1][::4, ::4], 99))


def test_user_regex_needs_named_groups(tmp_path):
    with pytest.raises(discover.DiscoveryError, match="named groups"):
        discover.naming_pattern("regex", r"(?P<well>\w+)\.tif")
    pattern = discover.naming_pattern(
        "regex", r"r(?P<row>\d+)c(?P<col>\d+)f(?P<field>\d+)-ch(?P<channel>\d+)\.tiff"
    )
    tifffile.imwrite(tmp_path / "r02c03f01-ch1.tiff", np.zeros((4, 4), np.uint8))
    files, _ = discover.discover_files(tmp_path, pattern)
    assert files["well"].tolist() == ["B03"]


def test_metaxpress_timepoint_and_zstep_folders_give_t_and_z(tmp_path):
    # MetaXpress's export of a time-lapse Z series: TimePoint_N/ZStep_M/ folders, and each time
    # point's Z projection beside its ZStep folders
    image = np.zeros((8, 8), np.uint16)
    for t in (1, 2):
        for z in (1, 2, 3):
            folder = tmp_path / "img" / f"TimePoint_{t}" / f"ZStep_{z}"
            folder.mkdir(parents=True)
            for channel in (1, 2):
                tifffile.imwrite(folder / f"P1_B03_s1_w{channel}.TIF", image)
        tifffile.imwrite(tmp_path / "img" / f"TimePoint_{t}" / "P1_B03_s1_w1.TIF", image)
    (tmp_path / "img" / "other").mkdir()  # not an export folder: not searched
    tifffile.imwrite(tmp_path / "img" / "other" / "P1_C01_s1_w1.TIF", image)

    files, unmatched = discover.discover_files(tmp_path / "img", discover.naming_pattern("imagexpress"))
    assert len(files) == 12 and files["well"].unique().tolist() == ["B03"]
    assert sorted(set(zip(files["t"], files["z"], files["channel"], strict=True))) == [
        (t, z, c) for t in (0, 1) for z in (0, 1, 2) for c in (0, 1)
    ]
    assert unmatched == [f"TimePoint_{t}/P1_B03_s1_w1.TIF (Z projection)" for t in (1, 2)]
    layout = discover.plan_plate("P1", files, unmatched, ["B03"])
    assert layout["shape"][:3] == [2, 2, 3]  # (t, c, z)


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


def ingest_all(folder: Path, tmp_path: Path, wells: list[str], **settings) -> tuple[Path, dict]:
    """Plan and ingest every well of a folder; return the plate path and the plan."""
    settings = {**INGEST, **settings}
    platemap = pd.DataFrame({"plate": "P1", "well": wells})
    plate = tmp_path / "P1.ome.zarr"
    layout = stages.plan("P1", folder, platemap, settings, tmp_path / "plan.json", plate)
    for well in layout["wells"]:
        stages.ingest_well(tmp_path / "plan.json", plate, well, settings, tmp_path / f"{well}.json")
    return plate, layout


def test_operetta_planes_from_file_names_stack_along_z(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(2)
    planes = {}
    for channel in (1, 2):
        for plane in (1, 2, 3):
            image = rng.integers(0, 4096, (40, 48), dtype=np.uint16)
            tifffile.imwrite(folder / f"r02c03f01p{plane:02d}-ch{channel}sk1fk1fl1.tiff", image)
            planes[(channel - 1, plane - 1)] = image
    plate, layout = ingest_all(folder, tmp_path, ["B03"], preset="operetta")
    assert layout["shape"] == [1, 2, 3, 40, 48] and layout["n_files"] == 6
    stored = ngff.field_image(plate, "B03", 0).compute()
    for (channel, plane), image in planes.items():
        np.testing.assert_array_equal(stored[0, channel, plane], image)


def test_incucyte_time_points_stack_along_t(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    frames = [np.full((32, 32), value, np.uint8) for value in (10, 20, 30)]
    for frame, stamp in zip(frames, ("00d00h00m", "00d04h00m", "01d00h00m"), strict=True):
        tifffile.imwrite(folder / f"VID1_B3_1_{stamp}.tif", frame)
    plate, layout = ingest_all(folder, tmp_path, ["B03"], preset="incucyte")
    assert layout["shape"] == [3, 1, 1, 32, 32]
    stored = ngff.field_image(plate, "B03", 0).compute()
    assert stored[:, 0, 0, 0, 0].tolist() == [10, 20, 30]


def test_imagej_hyperstack_axes_are_mapped_to_tczyx(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    stack = np.arange(2 * 3 * 2 * 16 * 16, dtype=np.float32).reshape(2, 3, 2, 16, 16)  # T Z C Y X
    tifffile.imwrite(folder / "P1_A01_s1_w1.TIF", stack, imagej=True, metadata={"axes": "TZCYX"})
    plate, layout = ingest_all(folder, tmp_path, ["A01"])
    assert layout["shape"] == [2, 2, 3, 16, 16] and layout["dtype"] == "float32"
    np.testing.assert_array_equal(ngff.field_image(plate, "A01", 0).compute(), stack.transpose(0, 2, 1, 3, 4))


def test_ome_tiff_pixel_size_overrides_the_config(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    image = np.zeros((2, 32, 32), np.uint16)
    metadata = {"axes": "CYX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325}
    tifffile.imwrite(folder / "P1_A01_s1_w1.ome.tif", image, ome=True, metadata=metadata)
    plate, layout = ingest_all(
        folder, tmp_path, ["A01"], preset="regex", pattern=r".*_(?P<well>A01)_s(?P<field>\d)"
    )
    assert (layout["pixel_size_um"], layout["pixel_size_source"]) == (0.325, "OME-TIFF metadata")
    attributes = zarr.open_group(str(plate / "A" / "01" / "0"), mode="r").attrs["ome"]
    assert attributes["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1] == 0.325


def test_bad_file_skips_its_field_when_configured(tmp_path):
    pixels = write_tiffs(tmp_path / "img", ["A01", "A02"], fields=3)
    (tmp_path / "img" / "P1_A02_s2_w1.TIF").write_bytes(b"")
    plate, layout = ingest_all(tmp_path / "img", tmp_path, ["A01", "A02"], bad_files="skip")
    assert layout["skipped"] == [
        {"well": "A02", "field": 1, "file": "P1_A02_s2_w1.TIF", "reason": layout["skipped"][0]["reason"]}
    ]
    assert "empty file" in layout["skipped"][0]["reason"]
    assert ngff.field_indices(plate, "A02") == [0, 2]
    assert ngff.field_indices(plate, "A01") == [0, 1, 2]
    np.testing.assert_array_equal(ngff.field_image(plate, "A02", 2)[0, 0, 0].compute(), pixels[("A02", 2, 0)])
    HCS.from_zarr(zarr.open_group(str(plate), mode="r"))


def test_sharded_and_tiled_chunks_round_trip(tmp_path):
    pixels = write_tiffs(tmp_path / "img", ["A01"], fields=1, shape=(300, 260))
    plate, _ = ingest_all(tmp_path / "img", tmp_path, ["A01"], shard=True, chunk_size=128)
    level0 = zarr.open_array(str(plate / "A" / "01" / "0" / "s0"), mode="r")
    assert level0.chunks == (1, 1, 1, 128, 128) and level0.shards == (1, 1, 1, 384, 384)
    np.testing.assert_array_equal(level0[0, 0, 0], pixels[("A01", 0, 0)])


def test_pyramid_level_is_the_block_mean():
    image = np.arange(16, dtype=np.uint16).reshape(4, 4)
    np.testing.assert_array_equal(ngff.downsample_mean(image), [[3, 5], [11, 13]])
    assert ngff.downsample_mean(np.full((5, 5), 65535, np.uint16)).tolist() == [[65535] * 2] * 2


def test_reads_back_with_ome_zarr_py(tmp_path):
    write_tiffs(tmp_path / "img", ["A01", "B02"], fields=2)
    plate, _ = ingest_all(tmp_path / "img", tmp_path, ["A01", "B02"])
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image_node = next(iter(Reader(parse_url(str(plate / "B" / "02" / "1")))()))
    assert image_node.data[0].shape == (1, 1, 1, 64, 80)
    plate_node = next(iter(Reader(parse_url(str(plate)))()))
    assert plate_node.metadata["metadata"]["plate"]["wells"][1]["path"] == "B/02"


def test_example_human_three_channels(tmp_path, shared_data):
    folder = shared_data / "example_human"
    plate, layout = ingest_all(folder, tmp_path, ["D03"], preset="cellomics")
    assert (layout["n_channels"], layout["n_fields"], layout["n_files"]) == (3, 1, 3)
    stored = ngff.field_image(plate, "D03", 0)
    for channel in range(3):
        original = tifffile.imread(folder / f"AS_09125_050116030001_D03f00d{channel}.tif")
        np.testing.assert_array_equal(stored[0, channel, 0].compute(), original)
    Image.from_zarr(zarr.open_group(str(plate / "D" / "03" / "0"), mode="r"))
