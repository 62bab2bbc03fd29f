"""Looking at a segmentation: outline overlays, field samples, `metascreen preview`, the report's overlays."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from matplotlib.image import imread
from skimage.segmentation import find_boundaries

from metascreen import cli, discover, ngff, overlay, stages, synth
from metascreen.config import validate_config
from metascreen.segment import learned

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FIELD = (256, 256)
CELL_WELLS = ("A01", "A02")
BLANK_WELL = "B01"


def decode_png(png: bytes) -> np.ndarray:
    """The RGB pixels (0-255) of PNG bytes."""
    return (imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(np.uint8)


def two_cells() -> np.ndarray:
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15] = 3  # 100 px
    labels[18:38, 10:30] = 7  # 400 px
    return labels


# ------------------------------------------------------------------ pure functions


def test_outline_overlay_draws_each_cells_inner_boundary_on_the_stretched_image():
    rng = np.random.default_rng(0)
    image = rng.normal(1000, 50, (40, 50))
    image[0, 0] = 1e6  # one hot pixel must not darken the rest
    labels = two_cells()
    rgb = overlay.outline_overlay(image.astype(np.uint16), labels)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    outline = find_boundaries(labels, mode="inner")
    assert outline.sum() == 36 + 76  # the perimeters of the 10 px and 20 px squares
    assert (rgb[outline] == (255, 0, 255)).all()
    grey = rgb[~outline]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    # 1st-99.5th percentiles stretched over the range: the middle of the noise is mid-grey
    assert 100 < np.median(grey[:, 0]) < 155 and grey[:, 0].min() == 0 and grey[:, 0].max() == 255
    with pytest.raises(ValueError, match="one shape"):
        overlay.outline_overlay(image, labels[:-1])


def test_contrast_stretch_of_flat_and_nan_images_is_black():
    assert (overlay.contrast_stretch(np.full((4, 4), 7.0)) == 0).all()
    assert (overlay.contrast_stretch(np.full((4, 4), np.nan)) == 0).all()
    ramp = overlay.contrast_stretch(np.arange(100.0).reshape(10, 10), percentiles=(0, 100))
    assert ramp[0, 0] == 0 and ramp[-1, -1] == 1 and ramp[0, 1] == pytest.approx(1 / 99)


def test_encode_png_round_trips_rgb_pixels():
    rgb = overlay.outline_overlay(np.random.default_rng(1).normal(size=(40, 50)), two_cells())
    png = overlay.encode_png(rgb)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(decode_png(png), rgb)


def test_segmentation_summary_counts_sizes_and_cover():
    summary = overlay.segmentation_summary(two_cells())
    assert summary["cells"] == 2
    assert summary["median_area_px"] == 250.0
    diameters = np.sqrt(4 * np.array([100, 400]) / np.pi)
    assert summary["median_diameter_px"] == pytest.approx(diameters.mean())
    assert summary["covered_fraction"] == pytest.approx(500 / 2000)
    empty = overlay.segmentation_summary(np.zeros((8, 8), np.int32))
    assert empty["cells"] == 0 and empty["covered_fraction"] == 0.0
    assert np.isnan(empty["median_area_px"]) and np.isnan(empty["median_diameter_px"])


def test_field_sample_is_seeded_and_spread_over_the_wells():
    fields = {f"A{column:02d}": [0, 1, 2] for column in range(1, 9)}
    first = discover.sample_fields(fields, 6, seed=0)
    assert first == discover.sample_fields(fields, 6, seed=0) == sorted(first)
    assert len({well for well, _ in first}) == 6  # no well twice while others have none
    assert any(discover.sample_fields(fields, 6, seed=seed) != first for seed in range(1, 5))
    every = discover.sample_fields(fields, 30, seed=3)
    assert every == [(well, field) for well in sorted(fields) for field in range(3)]
    ten = discover.sample_fields(fields, 10, seed=2)
    assert sorted(pd.Series([well for well, _ in ten]).value_counts().tolist()) == [1] * 6 + [2] * 2


# ------------------------------------------------------------------ metascreen preview


@pytest.fixture(scope="module")
def tiff_plate(tmp_path_factory):
    """A run folder: images/ of two wells of synthetic cells (one field each) and a blank well,
    config.yaml naming them by a relative path; and each well's true cell count."""
    run = tmp_path_factory.mktemp("run")
    images = run / "images"
    images.mkdir()
    truth = {}
    for index, well in enumerate(CELL_WELLS):
        image, labels, _ = synth.render_field(
            np.random.default_rng(index), fraction_positive=0.5, shape=FIELD, n_cells=25
        )
        tifffile.imwrite(images / f"P1_{well}_s1_w1.TIF", image)
        truth[well] = int(labels.max())
    tifffile.imwrite(images / f"P1_{BLANK_WELL}_s1_w1.TIF", np.full(FIELD, 900, np.uint16))
    config = {
        "plates": {"P1": {"images": "images"}},
        "platemap": "platemap.csv",  # not needed by preview: it may still be unfilled
        "ingest": {"preset": "imagexpress"},
        "segment": {"method": "learned", "learned": {"device": "cpu"}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, truth


def test_preview_segments_a_sample_of_fields_with_the_config(tiff_plate, tmp_path, monkeypatch, capsys):
    run, truth = tiff_plate
    monkeypatch.chdir(tmp_path)  # paths are relative to the config's folder, not here
    assert cli.main(["preview", "--config", str(run / "config.yaml"), "--fields", "3"]) == 0
    out = run / "preview"
    table = pd.read_csv(out / "preview.csv")
    assert list(table.columns) == list(stages.PREVIEW_COLUMNS)
    assert table[["plate", "well", "field"]].values.tolist() == [
        ["P1", well, 0] for well in (*CELL_WELLS, BLANK_WELL)
    ]
    cells = table.set_index("well")["cells"]
    for well, n_true in truth.items():
        assert cells[well] == pytest.approx(n_true, rel=0.25), (well, cells[well], n_true)
    assert cells[BLANK_WELL] == 0
    # the diameter estimated from these fields, and the cells found at it, are the synthetic cells'
    assert table["cell_diameter_px"].nunique() == 1 and 15 < table["cell_diameter_px"].iloc[0] < 35
    with_cells = table[table["cells"] > 0]
    assert ((with_cells["median_diameter_px"] > 15) & (with_cells["median_diameter_px"] < 35)).all()
    assert ((with_cells["covered_fraction"] > 0.03) & (with_cells["covered_fraction"] < 0.5)).all()
    for well in (*CELL_WELLS, BLANK_WELL):
        rgb = decode_png((out / f"P1_{well}_f0.png").read_bytes())
        assert rgb.shape == (*FIELD, 3)
        outlined = (rgb == (255, 0, 255)).all(axis=-1).sum()
        assert (outlined > 0) == (well != BLANK_WELL)
    printed = capsys.readouterr().out
    assert f"A01 f0: {cells['A01']} cells" in printed and "B01 f0: 0 cells" in printed
    assert f"written to {run / 'preview'}" in printed
    assert "1 of 3 fields have no cells" in printed and "segment.learned.cell_diameter" in printed


def test_preview_takes_microns_through_the_pixel_size_and_the_configured_weights(tiff_plate, tmp_path):
    run, truth = tiff_plate
    (run / "weights").mkdir(exist_ok=True)
    shutil.copyfile(learned.SHIPPED_WEIGHTS, run / "weights" / "mine.safetensors")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ingest"]["pixel_size_um"] = 0.5
    config["segment"]["learned"] |= {"cell_diameter_um": 11.0, "weights": "weights/mine.safetensors"}
    (run / "microns.yaml").write_text(yaml.safe_dump(config))
    table = stages.preview(cli._load_config(run / "microns.yaml"), tmp_path / "out", n_fields=3)
    assert table["cell_diameter_px"].tolist() == pytest.approx([22.0] * 3)  # 11 µm / 0.5 µm
    cells = table.set_index("well")["cells"]
    for well, n_true in truth.items():
        assert cells[well] == pytest.approx(n_true, rel=0.25), (well, cells[well], n_true)
    assert cells[BLANK_WELL] == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "P1_A01_f0.png",
        "P1_A02_f0.png",
        "P1_B01_f0.png",
        "preview.csv",
    ]
    # the configured weights are the ones loaded: a file that is not there is an error
    config["segment"]["learned"]["weights"] = "weights/absent.safetensors"
    (run / "absent.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match="weights/absent.safetensors"):
        stages.preview(cli._load_config(run / "absent.yaml"), tmp_path / "absent", n_fields=1)


def test_preview_of_a_plate_where_no_scale_finds_cells_says_what_to_try(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for well in ("A01", "A02"):
        tifffile.imwrite(tmp_path / "images" / f"P1_{well}_s1_w1.TIF", np.full((128, 128), 900, np.uint16))
    config = {
        "plates": {"P1": {"images": "images"}},
        "platemap": "p.csv",
        "segment": {"learned": {"device": "cpu"}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["preview", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "o")]) == 0
    table = pd.read_csv(tmp_path / "o" / "preview.csv")
    assert table["cells"].tolist() == [0, 0] and table["cell_diameter_px"].isna().all()
    printed = capsys.readouterr().out
    assert "no cells at any scale" in printed and "2 of 2 fields have no cells" in printed
    assert cli.main(["preview", "--config", str(tmp_path / "config.yaml"), "--fields", "0"]) == 1
    assert "--fields must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------ the report's overlays


def test_report_overlays_show_the_first_field_of_two_wells_per_sample(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    wells = ["A01", "A02", "A03", "B01"]
    truths = {}
    for index, well in enumerate(wells):
        for field in range(2):
            image, labels, _ = synth.render_field(
                np.random.default_rng([index, field]), fraction_positive=0.0, shape=(300, 280), n_cells=10
            )
            tifffile.imwrite(images / f"P1_{well}_s{field + 1}_w1.TIF", image)
            truths[(well, field)] = (image, labels)
    settings = validate_config({"plates": {"P1": {"images": str(images)}}, "platemap": "p.csv"})["ingest"]
    platemap = pd.DataFrame({"plate": "P1", "well": wells, "sample": ["s1", "s1", "s1", "s0"]})
    plate = tmp_path / "P1.ome.zarr"
    stages.plan("P1", images, platemap, settings, tmp_path / "plan.json", plate)
    for well in wells:
        stages.ingest_well(tmp_path / "plan.json", plate, well, settings, tmp_path / f"{well}.json")
        for field in range(2):
            ngff.write_field_labels(plate, well, field, truths[(well, field)][1])
    overlays = stages._segmentation_overlays(plate, platemap, channel=0)
    n_cells = {well: len(np.unique(truths[(well, 0)][1])) - 1 for well in wells}
    assert [caption for caption, _ in overlays] == [
        f"s0 / B01 / field 0 / {n_cells['B01']} cells (central 256 px)",
        f"s1 / A01 / field 0 / {n_cells['A01']} cells (central 256 px)",
        f"s1 / A02 / field 0 / {n_cells['A02']} cells (central 256 px)",
    ]
    image, labels = truths[("A01", 0)]
    window = (slice(22, 278), slice(12, 268))  # the central 256 px of 300 x 280
    assert np.array_equal(overlays[1][1], overlay.outline_overlay(image[window], labels[window]))


def test_report_command_takes_the_plate_and_the_segmenter_evaluation():
    required = ["--plate", "P1", "--cells", "c", "--fields", "f", "--per-well", "w", "--per-sample", "s"]
    required += ["--evaluation", "e", "--plan", "p", "--model", "m", "--crops-dir", "d", "--config", "{}"]
    required += ["--output", "o", "--zarr", "P1.ome.zarr"]
    parsed = cli.build_parser().parse_args(["report", *required, "--segmenter-evaluation", "ft.json"])
    assert parsed.zarr == "P1.ome.zarr" and parsed.segmenter_evaluation == "ft.json"
    assert cli.build_parser().parse_args(["report", *required]).segmenter_evaluation is None
