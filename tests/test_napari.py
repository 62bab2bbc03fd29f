"""The ingested plate as napari shows it: read through napari-ome-zarr's own reader (headless)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from metascreen import ngff, stages
from metascreen.config import validate_config

napari_ome_zarr = pytest.importorskip(
    "napari_ome_zarr", reason="napari-ome-zarr (a test dependency) is absent"
)

WELLS = ("A01", "A02", "B01", "B02")
SHAPE = (96, 128)


@pytest.fixture
def plate(tmp_path):
    """A 2 x 2-well plate of one 12-bit field each, in a narrow band of a uint16 range (as
    brightfield is), with labels; and its pixels."""
    rng = np.random.default_rng(3)
    pixels = {}
    for well in WELLS:
        pixels[well] = rng.normal(1800, 100, SHAPE).clip(1200, 2600).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"P1_{well}_s1_w1.TIF", pixels[well])
    ingest = validate_config(
        {
            "plates": {"P1": {"images": str(tmp_path)}},
            "platemap": "platemap.csv",
            "ingest": {"preset": "imagexpress", "channel_names": ["brightfield"]},
        }
    )["ingest"]
    path = tmp_path / "P1.ome.zarr"
    platemap = pd.DataFrame({"plate": "P1", "well": list(WELLS)})
    stages.plan("P1", tmp_path, platemap, ingest, tmp_path / "plan.json", path)
    labels = np.zeros(SHAPE, np.int32)
    labels[10:30, 20:50] = 1
    for well in WELLS:
        stages.ingest_well(tmp_path / "plan.json", path, well, ingest, tmp_path / f"{well}.json")
        ngff.write_field_labels(path, well, ngff.field_indices(path, well)[0], labels)
    return path, pixels


def test_napari_shows_the_plate_as_a_mosaic_with_a_window_that_covers_the_cells(plate):
    path, pixels = plate
    reader = napari_ome_zarr.napari_get_reader(str(path))
    assert reader is not None, "napari-ome-zarr does not recognise the plate"
    layers = {kind: (data, options) for data, options, kind in reader(str(path))}
    assert set(layers) == {"image", "labels"}

    image, options = layers["image"]
    assert tuple(image[0].shape[-2:]) == (2 * SHAPE[0], 2 * SHAPE[1])  # 2 x 2 wells of one field
    ((low, high),) = options["contrast_limits"]
    everything = np.concatenate([p.ravel() for p in pixels.values()])
    # the window of the first field (napari takes it for the whole mosaic) spans the bulk of
    # every well's pixels, not the dtype's 0-65535, which would show a black plate
    p1, p99 = np.percentile(everything, [1, 99])
    assert low <= np.percentile(everything, 5) and high >= np.percentile(everything, 95)
    assert high - low < 2 * (p99 - p1)
    assert np.asarray(image[0][0, 0, 0, : SHAPE[0], : SHAPE[1]]).tolist() == pixels["A01"].tolist()

    labels, _ = layers["labels"]
    mosaic = np.asarray(labels[0][0, 0, 0])
    assert mosaic.shape == (2 * SHAPE[0], 2 * SHAPE[1]) and (mosaic > 0).sum() == 4 * 20 * 30
