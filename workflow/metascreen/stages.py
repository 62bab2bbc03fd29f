"""The pipeline's stages at the I/O edge: read inputs, call the pure functions, write outputs.

Each function is one Snakemake job (one well, or one plate for cheap steps). Outputs are
written under a temporary name and renamed into place, so a killed job leaves nothing
that looks complete; the small JSON manifests the rules track are written last.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr

from metascreen import __version__, aggregate, discover, measure, ngff
from metascreen import segment as segmentation
from metascreen.config import ConfigError
from metascreen.files import atomic_path, read_json, write_json, write_table
from metascreen.versions import package_versions

log = logging.getLogger("metascreen")
# torch and matplotlib are imported inside the stages that need them (train, classify,
# report): the many per-well ingest and segmentation jobs then start without paying for them.

CROP_CHUNK = 256
PACKAGES = ("metascreen", "numpy", "dask", "zarr", "ome-zarr", "tifffile", "scikit-image", "torch", "pandas")
# Features of the logistic-regression baseline: all of measure's shape and intensity
# features but the orientation, which says where a cell points, not what it is.
BASELINE_FEATURES = tuple(name for name in measure.FEATURE_COLUMNS if name != "orientation")
#: Columns of ``metascreen preview``'s table: a field, its segmentation summary
#: (:func:`metascreen.overlay.segmentation_summary`) and the learned backend's diameter used.
PREVIEW_COLUMNS = (
    "plate",
    "well",
    "field",
    "cells",
    "median_area_px",
    "median_diameter_px",
    "covered_fraction",
    "cell_diameter_px",
)
#: Overlays in a plate report: the first field of this many wells per sample, at most
#: REPORT_MAX_OVERLAYS in all, each the central REPORT_OVERLAY_WINDOW px of its field at full
#: resolution: a noisy 256 px overlay is ~120 kB of PNG, a whole 2048 px field ~8 MB.
REPORT_OVERLAY_WELLS = 2
REPORT_MAX_OVERLAYS = 24
REPORT_OVERLAY_WINDOW = 256


# ---------------------------------------------------------------- plan and ingest
def plan(
    plate: str,
    images: str | Path,
    platemap: pd.DataFrame,
    settings: dict[str, Any],
    plan_path: str | Path,
    zarr_path: str | Path,
) -> dict[str, Any]:
    """Discover a plate's files, check them against the plate map and create the empty plate.

    Writes ``plan_path`` (JSON) and the plate's root metadata at ``zarr_path``.
    """
    layout = _plate_layout(plate, images, settings, platemap.loc[platemap["plate"] == plate, "well"].tolist())
    ngff.create_plate(zarr_path, plate, list(layout["wells"]), layout["n_fields"])
    write_json(plan_path, layout)
    return layout


def _plate_layout(
    plate: str, images: str | Path, settings: dict[str, Any], wells: list[str] | None
) -> dict[str, Any]:
    """The plan of a plate's files (:func:`metascreen.discover.plan_plate`), logged.

    ``settings`` is the config's ``ingest`` section; ``wells`` those of the plate map, or
    None for every well with images.
    """
    pattern = discover.naming_pattern(settings["preset"], settings["pattern"])
    files, unmatched = discover.discover_files(images, pattern)
    layout = discover.plan_plate(
        plate,
        files,
        unmatched,
        sorted(files["well"].unique()) if wells is None else wells,
        unexpected_wells=settings["unexpected_wells"],
        bad_files=settings["bad_files"],
        pixel_size_um=settings["pixel_size_um"],
    )
    for well in layout["unexpected_wells"]:
        log.warning("plate %s: images of well %s are not in the plate map and are skipped", plate, well)
    if unmatched:
        log.warning(
            "plate %s: %d files match no naming pattern, e.g. %s", plate, len(unmatched), unmatched[0]
        )
    for entry in layout["skipped"]:
        well, field, reason = entry["well"], entry["field"], entry["reason"]
        log.warning("plate %s: skipped %s field %d: %s", plate, well, field, reason)
    log.info(
        "plate %s: %d wells, %d fields per well, %d channels, %d planes, %d time points, "
        "%s %s per field, %g um pixels (%s), %d files",
        plate,
        len(layout["wells"]),
        layout["n_fields"],
        layout["n_channels"],
        layout["n_z"],
        layout["n_t"],
        layout["shape"],
        layout["dtype"],
        layout["pixel_size_um"],
        layout["pixel_size_source"],
        layout["n_files"],
    )
    return layout


def ingest_well(
    plan_path: str | Path,
    zarr_path: str | Path,
    well: str,
    settings: dict[str, Any],
    manifest_path: str | Path,
    threads: int = 1,
) -> None:
    """Convert one well's TIFFs into the plate; write its manifest last (with the well's
    display window per channel, see :func:`metascreen.ngff.write_well`)."""
    layout = read_json(plan_path)
    fields = layout["wells"][well]
    windows = ngff.write_well(
        zarr_path,
        well,
        fields,
        field_shape=layout["shape"],
        file_shape=layout["file_shape"],
        dtype=layout["dtype"],
        channel_names=settings["channel_names"],
        pixel_size_um=layout["pixel_size_um"],
        compression_level=settings["compression_level"],
        chunk_yx=settings["chunk_size"],
        shard=settings["shard"],
        num_workers=threads,
    )
    log.info("%s %s: %d fields written", layout["plate"], well, len(fields))
    write_json(
        manifest_path,
        {"plate": layout["plate"], "well": well, "n_fields": len(fields), "files": fields, "window": windows},
    )


# ---------------------------------------------------------------- segmentation
def _segmentation_plane(image: da.Array | np.ndarray, channel: int) -> da.Array | np.ndarray:
    """The ``(y, x)`` plane to segment: the chosen channel's middle Z plane."""
    return image[0, channel, image.shape[2] // 2]


def _pixel_size_um(zarr_path: str | Path, well: str, field: int) -> float:
    """The x pixel size (µm) of a field, from its NGFF coordinate transformations."""
    group = zarr.open_group(str(Path(zarr_path) / ngff.well_path(well) / str(field)), mode="r")
    return float(
        group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    )


def _backend_parameters(
    zarr_path: str | Path, well: str, settings: dict[str, Any], cell_diameter_path: str | Path | None
) -> dict[str, Any]:
    """The chosen backend's keyword parameters for a well of the plate (see
    :func:`_resolve_backend_parameters`): its pixel size, the plate's estimate for ``auto``."""

    def plate_estimate() -> float:
        if cell_diameter_path is None:
            raise ConfigError("segment.learned.cell_diameter is auto but no plate estimate was given")
        return read_json(cell_diameter_path)["cell_diameter"]

    pixel_size_um = _pixel_size_um(zarr_path, well, ngff.field_indices(zarr_path, well)[0])
    return _resolve_backend_parameters(settings, pixel_size_um, plate_estimate)


def _resolve_backend_parameters(
    settings: dict[str, Any], pixel_size_um: float, estimate_diameter: Callable[[], float]
) -> dict[str, Any]:
    """The chosen backend's keyword parameters; for ``learned`` the cell diameter in px
    from ``cell_diameter_um`` and the pixel size, ``estimate_diameter()`` (called for
    ``auto`` only), or the number given."""
    method = settings["method"]
    parameters = dict(settings[method])
    if method != "learned":
        return parameters
    parameters.pop("finetune", None)  # train_segmenter's; its model arrives as ``weights``
    diameter_um = parameters.pop("cell_diameter_um")
    if diameter_um is not None:
        parameters["cell_diameter"] = diameter_um / pixel_size_um
    elif parameters["cell_diameter"] == "auto":
        parameters["cell_diameter"] = estimate_diameter()
    return parameters


def _tiff_plane(layout: dict[str, Any], field: dict[str, Any], channel: int) -> np.ndarray:
    """The plane to segment of a planned field (an entry of the plan's ``wells``), from its TIFFs."""
    image = ngff.read_field(field["files"], layout["shape"], layout["file_shape"], layout["dtype"])
    return _segmentation_plane(image, channel)


def estimate_cell_diameter(
    plan_path: str | Path,
    settings: dict[str, Any],
    output_path: str | Path,
    threads: int = 1,
    max_fields: int = 8,
) -> dict[str, Any]:
    """Estimate a plate's typical cell diameter (px) for the learned segmenter.

    Reads the first field of up to ``max_fields`` wells spread evenly over the plate
    straight from its TIFFs (so that it needs only the plan, not the ingested wells),
    runs :func:`metascreen.segment.learned.estimate_cell_diameter` on the segmented
    channel's middle plane, and writes the estimate, the fields used and the ladder of
    assumed diameters to ``output_path``. A plate on which no assumed scale finds cells
    stops here, saying what to do.
    """
    import torch

    from metascreen.segment import learned

    torch.set_num_threads(threads)
    layout = read_json(plan_path)
    wells = sorted(well for well, fields in layout["wells"].items() if fields)
    picked = [
        wells[int(i)] for i in np.unique(np.linspace(0, len(wells) - 1, min(max_fields, len(wells))).round())
    ]
    sources, planes = [], []
    for well in picked:
        field = layout["wells"][well][0]
        planes.append(_tiff_plane(layout, field, settings["channel"]))
        sources.append([well, field["field"]])
    parameters = settings["learned"]
    estimate = learned.estimate_cell_diameter(
        planes, weights=parameters["weights"], device=parameters["device"], precision=parameters["precision"]
    )
    plate = layout["plate"]
    if not np.isfinite(estimate["cell_diameter"]):
        raise ConfigError(
            f"plate {plate}: the learned segmenter found fewer than 5 cells at every scale from 10 to 160 px "
            f"on the fields (well, field) {sources}; check segment.channel, or set "
            "segment.learned.cell_diameter (px) or cell_diameter_um by hand"
        )
    log.info(
        "%s: cell diameter %.1f px, from %d cells", plate, estimate["cell_diameter"], estimate["n_cells"]
    )
    if estimate["rule"] != "fixed point":
        log.warning(
            "%s: no assumed scale from 10 to 160 px was confirmed by the cells found (cells outside "
            "that range?); %.1f px is where they came closest: check it in the report, or set "
            "segment.learned.cell_diameter by hand",
            plate,
            estimate["cell_diameter"],
        )
    result = {"plate": plate, "fields": sources, **estimate}
    write_json(output_path, result)
    return result


def train_segmenter(
    annotation_sources: Sequence[str | Path],
    settings: dict[str, Any],
    model_path: str | Path,
    evaluation_path: str | Path,
    threads: int = 1,
) -> dict[str, Any]:
    """Fine-tune the learned segmenter on annotated fields (:mod:`metascreen.annotations`).

    ``settings`` holds the segmented ``channel`` and the ``learned`` section (its
    ``weights`` are the starting point, its ``device`` is used, its ``finetune`` the
    steps, learning rate, validation fraction and seed). Writes the model (safetensors
    + ``.json`` metadata: base weights and their hash, annotation files and their
    digest, settings, evaluation, versions) and ``evaluation_path`` (AP@0.5 on the
    held-out annotation before and after).
    """
    import torch

    from metascreen import annotations, model
    from metascreen.segment import learned, train
    from metascreen.segment.network import save_network

    torch.set_num_threads(threads)
    parameters = settings["learned"]
    options = parameters["finetune"]
    annotated = annotations.read_annotations(annotation_sources, channel=settings["channel"])
    log.info(
        "fine-tuning on %d annotated field(s), %d cells",
        len(annotated),
        sum(int(a.labels.max()) for a in annotated),
    )
    base = parameters["weights"] or learned.SHIPPED_WEIGHTS
    network, evaluation = train.finetune(
        annotated,
        weights=base,
        settings=dataclasses.replace(
            train.FINETUNE_SETTINGS,
            steps=options["steps"],
            learning_rate=options["learning_rate"],
            seed=options["seed"],
        ),
        validation_fraction=options["validation_fraction"],
        device=parameters["device"],
    )
    evaluation["fields"] = [a.name for a in annotated]
    save_network(
        network,
        model_path,
        {
            "base_weights": str(base),
            "base_weights_sha256": model.file_sha256(base),
            "annotations": [str(source) for source in annotation_sources],
            "annotations_sha256": annotations.annotations_digest(annotation_sources),
            "finetune": options,
            "evaluation": evaluation,
            "train_diameter": learned.TRAIN_DIAMETER,
            "versions": package_versions(PACKAGES),
        },
    )
    write_json(evaluation_path, evaluation)
    return evaluation


def segment_well(
    zarr_path: str | Path,
    well: str,
    settings: dict[str, Any],
    manifest_path: str | Path,
    threads: int = 1,
    cell_diameter_path: str | Path | None = None,
) -> None:
    """Segment every field of a well (fields in parallel) and store NGFF labels.

    ``settings`` is the config's ``segment`` section: the backend ``method`` of
    :data:`metascreen.segment.SEGMENTERS` is called with the parameters under the key
    of its name (see :func:`_backend_parameters`; ``cell_diameter_path`` is the plate's
    estimate for ``learned`` with ``cell_diameter: auto``).
    """
    method = settings["method"]
    parameters = _backend_parameters(zarr_path, well, settings, cell_diameter_path)
    if method == "learned":  # one field per Dask thread, each forward pass on its own thread
        import torch

        torch.set_num_threads(1)

    def segment_field(field: int) -> int:
        plane = _segmentation_plane(ngff.field_image(zarr_path, well, field), settings["channel"])
        labels = segmentation.segment(np.asarray(plane.compute(scheduler="sync")), method, **parameters)
        ngff.write_field_labels(zarr_path, well, field, labels)
        return int(labels.max())

    fields = ngff.field_indices(zarr_path, well)
    with dask.config.set(scheduler="threads", num_workers=threads):
        counts = dask.compute(*[dask.delayed(segment_field)(field) for field in fields])
    log.info("%s: %d cells in %d fields", well, sum(counts), len(counts))
    if not sum(counts):
        log.warning(
            "%s: %s segmentation found no cell; check segment.channel and, for the learned backend, "
            "segment.learned.cell_diameter (used: %s px)",
            well,
            method,
            parameters.get("cell_diameter"),
        )
    manifest = {"well": well, "method": method, "cells_per_field": list(counts)}
    if method == "learned":
        from metascreen.model import select_device
        from metascreen.segment import learned, tiling

        manifest["cell_diameter"] = parameters["cell_diameter"]
        manifest["weights"] = str(parameters["weights"] or learned.SHIPPED_WEIGHTS)
        # what the node computed in: "auto" gives bfloat16 on some nodes, float32 on others
        dtype = tiling.inference_dtype(select_device(parameters["device"]), parameters["precision"])
        manifest["precision"] = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    write_json(manifest_path, manifest)


def check_segmentation(
    plate: str, manifest_paths: Sequence[str | Path], qc_settings: dict[str, Any], output_path: str | Path
) -> None:
    """Check a plate's segmentation (:func:`metascreen.aggregate.segmentation_check`) and write it.

    ``qc_settings`` holds the config's ``qc.min_cells_per_well`` and
    ``qc.max_low_cell_well_fraction``. A plate with too many low-cell wells stops here, with
    a message naming the cause and the fix, before training and classification; wells
    segmented in different precisions (nodes with and without bfloat16) are logged as a
    warning.
    """
    check = aggregate.segmentation_check(
        [read_json(path) for path in manifest_paths],
        plate,
        min_cells_per_well=qc_settings["min_cells_per_well"],
        max_low_cell_well_fraction=qc_settings["max_low_cell_well_fraction"],
    )
    failure = aggregate.segmentation_check_failure(check)
    if failure:
        raise ConfigError(failure)
    log.info(
        "%s: %d of %d wells with fewer than %d segmented cells; median %g cells per field",
        plate,
        len(check["low_cell_wells"]),
        len(check["cells_per_well"]),
        qc_settings["min_cells_per_well"],
        check["median_cells_per_field"],
    )
    if len(check["precisions"]) > 1:
        log.warning(
            "%s: wells were segmented in different precisions (%s) on different nodes, so their cells "
            "may differ slightly; set segment.learned.precision: float32 for the same arithmetic everywhere",
            plate,
            ", ".join(check["precisions"]),
        )
    write_json(output_path, check)


# ---------------------------------------------------------------- preview (before a run)
def _current_finetuned_model(run_folder: str | Path, annotation_sources: Sequence[str | Path]) -> Path | None:
    """The run folder's fine-tuned segmenter (``results/segmenter/model.safetensors``)
    if it was fine-tuned on the annotations as they are now, else None."""
    from metascreen import annotations

    model_path = Path(run_folder) / "results" / "segmenter" / "model.safetensors"
    if not model_path.is_file():
        return None
    trained_on = read_json(model_path.with_suffix(".json")).get("annotations_sha256")
    return model_path if trained_on == annotations.annotations_digest(annotation_sources) else None


def preview(
    config: dict[str, Any],
    out_dir: str | Path,
    n_fields: int = 6,
    seed: int = 0,
    run_folder: str | Path | None = None,
) -> pd.DataFrame:
    """Segment a seeded sample of each plate's fields with the config's current settings.

    For each plate of ``config`` (validated, its paths resolved) the files are planned as
    :func:`plan` plans them, but nothing is written to a plate and every well with images
    is sampled (the plate map may still be empty). ``n_fields`` fields spread over the
    wells (:func:`metascreen.discover.sample_fields`, ``seed``) are read from their TIFFs
    (the segmented channel's middle plane) and segmented as the workflow would segment
    them (see :func:`_preview_plate`).

    With ``segment.learned.finetune`` set, the fields are segmented with the model that
    fine-tuning wrote in ``run_folder`` (the config's folder) if it was trained on the
    annotations as they are now, and otherwise with the weights fine-tuning starts from.

    Writes an outline overlay per field (:func:`metascreen.overlay.outline_overlay`,
    ``{plate}_{well}_f{field}.png``) and ``preview.csv`` to ``out_dir``, and returns that
    table: one row per field with the columns of :data:`PREVIEW_COLUMNS`.
    """
    finetune = config["segment"]["learned"]["finetune"]
    if config["segment"]["method"] == "learned" and finetune is not None:
        model = None if run_folder is None else _current_finetuned_model(run_folder, finetune["annotations"])
        if model is None:
            log.warning(
                "not fine-tuned on the current annotations yet: previewing the weights it starts from"
            )
        else:
            log.info("previewing the fine-tuned segmenter %s", model)
            config = copy.deepcopy(config)
            config["segment"]["learned"]["weights"] = str(model)
    rows = [
        row
        for plate in sorted(config["plates"])
        for row in _preview_plate(config, plate, out_dir, n_fields, seed)
    ]
    table = pd.DataFrame(rows, columns=list(PREVIEW_COLUMNS))
    write_table(table, Path(out_dir) / "preview.csv")
    return table


def _preview_plate(
    config: dict[str, Any], plate: str, out_dir: str | Path, n_fields: int, seed: int
) -> list[dict[str, Any]]:
    """Overlays and table rows of one plate's sampled fields (see :func:`preview`).

    The ``segment`` settings apply as in :func:`segment_well`: for ``learned`` a diameter
    in µm goes through the plate's pixel size, and ``auto`` is estimated from the sampled
    fields (:func:`metascreen.segment.learned.estimate_cell_diameter`); where no assumed
    scale finds cells there, the fields are shown without cells.
    """
    from metascreen import overlay

    settings = config["segment"]
    method = settings["method"]
    layout = _plate_layout(plate, config["plates"][plate]["images"], config["ingest"], wells=None)
    planned = {well: {field["field"]: field for field in fields} for well, fields in layout["wells"].items()}
    picked = discover.sample_fields({well: list(fields) for well, fields in planned.items()}, n_fields, seed)
    planes = [_tiff_plane(layout, planned[well][field], settings["channel"]) for well, field in picked]

    def estimate_from_sample() -> float:
        from metascreen.segment import learned

        parameters = settings["learned"]
        estimate = learned.estimate_cell_diameter(
            planes,
            weights=parameters["weights"],
            device=parameters["device"],
            precision=parameters["precision"],
        )
        return estimate["cell_diameter"]

    parameters = _resolve_backend_parameters(settings, layout["pixel_size_um"], estimate_from_sample)
    diameter = parameters.get("cell_diameter", float("nan"))  # only the learned backend has one
    log.info("%s: %s segmentation of %d fields, cell diameter %.1f px", plate, method, len(picked), diameter)
    rows = []
    for (well, field), plane in zip(picked, planes, strict=True):
        if method == "learned" and not np.isfinite(diameter):  # no assumed scale found cells here
            labels = np.zeros(plane.shape, np.int32)
        else:
            labels = segmentation.segment(plane, method, **parameters)
        png = Path(out_dir) / f"{plate}_{well}_f{field}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(overlay.encode_png(overlay.outline_overlay(plane, labels)))
        rows.append(
            {
                "plate": plate,
                "well": well,
                "field": field,
                **overlay.segmentation_summary(labels),
                "cell_diameter_px": diameter,
            }
        )
    return rows


# ---------------------------------------------------------------- measurement and crops
def measure_fields(
    fields: Sequence[tuple[int, np.ndarray, np.ndarray]], plate: str, well: str, settings: dict[str, Any]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-cell table and crops of a well's ``(field, image, labels)`` planes.

    Returns the table (plate, well, field, label, features, ``crop_index``) and the
    crops ``(n_cells, channels, size, size)``; row ``crop_index`` is the cell's crop.
    """
    tables, crops = [], []
    for field, plane, labels in fields:
        table = measure.measure_cells(labels, plane)
        crops.append(
            measure.extract_crops(
                plane, labels, table, size=settings["crop_size"], with_mask=settings["with_mask"]
            )
        )
        table.insert(0, "field", field)
        tables.append(table)
    cells = pd.concat(tables, ignore_index=True)
    cells.insert(0, "well", well)
    cells.insert(0, "plate", plate)
    cells["crop_index"] = np.arange(len(cells), dtype=np.int64)
    return cells, np.concatenate(crops)


def write_crops(path: str | Path, crops: np.ndarray, attributes: dict[str, Any]) -> None:
    """Store crops atomically as one zarr array chunked along cells (read lazily by classify)."""
    with atomic_path(path) as partial:
        array = zarr.create_array(
            store=str(partial),
            shape=crops.shape,
            chunks=(CROP_CHUNK, *crops.shape[1:]),
            dtype="float32",
            zarr_format=3,
        )
        array[...] = crops
        array.attrs.update(attributes)


def measure_well(
    zarr_path: str | Path,
    plate: str,
    well: str,
    settings: dict[str, Any],
    channel: int,
    saturation_level: float | None,
    table_path: str | Path,
    crops_path: str | Path,
    fields_path: str | Path,
) -> None:
    """Measure every cell of a well and store its fixed-size crops (see :func:`measure_fields`),
    and every field's quality-control metrics (:func:`metascreen.measure.field_quality`)."""
    fields = [
        (
            field,
            np.asarray(_segmentation_plane(ngff.field_image(zarr_path, well, field), channel)),
            ngff.field_labels(zarr_path, well, field),
        )
        for field in ngff.field_indices(zarr_path, well)
    ]
    cells, crops = measure_fields(fields, plate, well, settings)
    quality = pd.DataFrame(
        [
            {
                "plate": plate,
                "well": well,
                "field": field,
                **measure.field_quality(plane, labels, saturation_level=saturation_level),
            }
            for field, plane, labels in fields
        ],
        columns=["plate", "well", "field", *measure.FIELD_QUALITY_COLUMNS],
    )
    channels = ["image", "mask"] if settings["with_mask"] else ["image"]
    write_crops(
        crops_path,
        crops,
        {"plate": plate, "well": well, "crop_size": settings["crop_size"], "channels": channels},
    )
    write_table(quality, fields_path)
    write_table(cells, table_path)
    log.info("%s %s: %d cells measured, crops %s", plate, well, len(cells), crops.shape)


# ---------------------------------------------------------------- training
def _training_set(
    tables: Sequence[str | Path], crops: Sequence[str | Path], platemap: pd.DataFrame, classes: dict[str, str]
) -> tuple[pd.DataFrame, list[np.ndarray], pd.DataFrame]:
    """Cell tables (with ``target`` 0/1 and ``well_key``) and crops of the training wells with
    cells, and the training wells left out (``well_key``, ``label``, ``reason``).

    ``tables`` and ``crops`` are those of every training well of the plate map (as the train
    rule gives them), so a training well without cells in them is one where none was segmented.
    """
    training_wells = platemap[platemap["train_class"] != ""]
    label_of_well = pd.Series(
        (training_wells["train_class"] == classes["positive"]).astype(int).to_numpy(),
        index=(training_wells["plate"] + "/" + training_wells["well"]).to_numpy(),
    )
    frames, arrays, wells_with_cells = [], [], []
    for table_path, crops_path in zip(tables, crops, strict=True):
        cells = pd.read_parquet(table_path)
        if cells.empty:
            continue
        well_key = f"{cells['plate'].iloc[0]}/{cells['well'].iloc[0]}"
        cells["well_key"] = well_key
        cells["target"] = label_of_well[well_key]
        frames.append(cells)
        arrays.append(zarr.open_array(str(crops_path), mode="r")[...])
        wells_with_cells.append(well_key)
    lost = label_of_well.drop(index=wells_with_cells)
    lost_wells = pd.DataFrame(
        {"well_key": lost.index, "label": lost.to_numpy(), "reason": "no cells segmented"}
    )
    # Without any cells, split_wells names the lost wells of each class before the crops are needed.
    cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["well_key", "target"])
    return cells, arrays, lost_wells


def train(
    tables: Sequence[str | Path],
    crops: Sequence[str | Path],
    platemap: pd.DataFrame,
    classes: dict[str, str],
    settings: dict[str, Any],
    crop_settings: dict[str, Any],
    model_path: str | Path,
    evaluation_path: str | Path,
    threads: int = 1,
) -> None:
    """Train the CNN on the training wells, split by well; calibrate and evaluate it."""
    import torch

    from metascreen import model, training

    torch.set_num_threads(threads)
    cells, arrays, lost_wells = _training_set(tables, crops, platemap, classes)
    if not lost_wells.empty:
        log.warning("training wells without segmented cells, left out: %s", ", ".join(lost_wells["well_key"]))
    wells = cells.drop_duplicates("well_key")[["well_key", "target"]].rename(columns={"target": "label"})
    try:
        split_of_well = training.split_wells(
            wells,
            seed=settings["seed"],
            val_fraction=settings["val_fraction"],
            test_fraction=settings["test_fraction"],
            lost_wells=lost_wells,
        )
    except ValueError as error:  # too few usable wells of a class: the plate's problem, not a bug
        raise ConfigError(str(error)) from error
    all_crops = np.concatenate(arrays)
    split = cells["well_key"].map(split_of_well).to_numpy()
    targets = cells["target"].to_numpy()

    def part(name: str) -> tuple[np.ndarray, np.ndarray]:
        return all_crops[split == name], targets[split == name]

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = part("train"), part("val"), part("test")
    log.info("training cells: %d train, %d validation, %d test", len(train_y), len(val_y), len(test_y))

    def progress(epoch: int, n_epochs: int, train_loss: float, val_loss: float, val_accuracy: float) -> None:
        log.info(
            "epoch %d/%d  train loss %.4f  val loss %.4f  val accuracy %.3f",
            epoch,
            n_epochs,
            train_loss,
            val_loss,
            val_accuracy,
        )

    network, history = training.train_classifier(
        train_x,
        train_y,
        val_x,
        val_y,
        width=settings["width"],
        depth=settings["depth"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        seed=settings["seed"],
        progress=progress,
    )
    temperature = training.fit_temperature(training.predict_logits(network, val_x), val_y)
    test_probability = training.calibrated_probability(training.predict_logits(network, test_x), temperature)
    metrics = training.evaluate_predictions(test_y, test_probability)

    features = cells[list(BASELINE_FEATURES)].to_numpy(np.float64)
    baseline = training.fit_logistic_baseline(features[split == "train"], train_y)
    baseline_probability = training.predict_logistic_baseline(baseline, features[split == "test"])
    baseline_metrics = training.evaluate_predictions(test_y, baseline_probability)

    metadata = model.ModelMetadata(
        classes=dict(classes),
        crop_size=crop_settings["crop_size"],
        channels=["image", "mask"] if crop_settings["with_mask"] else ["image"],
        normalisation=measure.CROP_NORMALISATION,
        width=settings["width"],
        depth=settings["depth"],
        temperature=float(temperature),
        training_wells=sorted(wells["well_key"]),
        training_data_sha256=training.dataset_sha256(train_x, train_y, val_x, val_y),
        metrics={
            **{key: metrics[key] for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece")},
            "baseline_accuracy": baseline_metrics["accuracy"],
            "baseline_ece": baseline_metrics["ece"],
        },
        package_versions=package_versions(PACKAGES),
        seed=settings["seed"],
    )
    sha256 = model.save_model(model_path, network, metadata)
    evaluation = {
        **metrics,
        # Flat baseline_* keys for tables and reports; the full metric set (reliability
        # included) of the same held-out wells under "baseline".
        **{
            f"baseline_{key}": baseline_metrics[key]
            for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece", "nll", "confusion_matrix")
        },
        "baseline": baseline_metrics,
        "baseline_features": list(BASELINE_FEATURES),
        "temperature": float(temperature),
        "best_epoch": history["best_epoch"],
        "n_train_cells": int(len(train_y)),
        "n_val_cells": int(len(val_y)),
        "n_test_cells": int(len(test_y)),
        "wells": {
            name: sorted(k for k, s in split_of_well.items() if s == name)
            for name in ("train", "val", "test")
        },
        "model_sha256": sha256,
    }
    write_json(evaluation_path, evaluation)
    log.info(
        "test accuracy %.3f (baseline %.3f), ROC-AUC %.3f (baseline %.3f), ECE %.3f (baseline %.3f)",
        metrics["accuracy"],
        baseline_metrics["accuracy"],
        metrics["roc_auc"],
        baseline_metrics["roc_auc"],
        metrics["ece"],
        baseline_metrics["ece"],
    )


def import_model(
    source: str | Path, crop_settings: dict[str, Any], model_path: str | Path, evaluation_path: str | Path
) -> None:
    """Check a model trained elsewhere against this run's crops and copy it into the results.

    The model (``train.model``) must be a metascreen safetensors file; its metadata is read
    from the file's own header, so a missing or stale ``.json`` sidecar beside it is not an
    error (the sidecar in the results is rewritten from the header). A crop size or channel
    count that differs from ``measure.crop_size`` / ``measure.with_mask`` stops the run.
    """
    from metascreen import model

    source = Path(source)
    channels = 2 if crop_settings["with_mask"] else 1
    try:
        _, metadata = model.load_model(
            source, expected_crop_size=crop_settings["crop_size"], expected_channels=channels
        )
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(
            f"train.model {source} cannot classify this run's crops "
            f"(measure.crop_size={crop_settings['crop_size']}, measure.with_mask="
            f"{str(crop_settings['with_mask']).lower()}): {error}"
        ) from error
    with atomic_path(model_path) as partial:
        shutil.copyfile(source, partial)
    sha256 = model.file_sha256(model_path)
    sidecar = {**metadata.to_dict(), "weights_file": Path(model_path).name, "weights_sha256": sha256}
    write_json(Path(model_path).with_suffix(".json"), sidecar)
    write_json(evaluation_path, {**metadata.metrics, "source": str(source), "model_sha256": sha256})


# ---------------------------------------------------------------- classification
def classify_well(
    table_path: str | Path,
    crops_path: str | Path,
    model_path: str | Path,
    settings: dict[str, Any],
    output_path: str | Path,
    threads: int = 1,
) -> None:
    """Calibrated probability and predicted class of every cell of a well."""
    import torch

    from metascreen import inference, model

    # inference splits these threads between its Dask workers
    torch.set_num_threads(threads)
    cells = pd.read_parquet(table_path, columns=["plate", "well", "field", "label"])
    crops = da.from_zarr(zarr.open_array(str(crops_path), mode="r"))
    metadata = model.read_metadata(model_path)
    probability = inference.classify_crops(
        crops,
        model_path,
        batch_size=settings["batch_size"],
        device=settings["device"],
        num_workers=threads,
    )
    cells["probability"] = probability.astype(np.float64)
    cells["predicted_class"] = np.where(
        probability >= 0.5, metadata.classes["positive"], metadata.classes["negative"]
    )
    cells["model_sha256"] = model.file_sha256(model_path)
    write_table(cells, output_path)
    log.info(
        "%d cells classified, %.1f%% positive",
        len(cells),
        100 * float(np.mean(probability >= 0.5)) if len(cells) else 0.0,
    )


# ---------------------------------------------------------------- aggregation and reports
def _read_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Parquet tables (e.g. one per well) stacked into one."""
    return pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)


def collect_plate(
    measure_tables: Sequence[str | Path],
    classify_tables: Sequence[str | Path],
    field_tables: Sequence[str | Path],
    platemap: pd.DataFrame,
    positive_class: str,
    qc_settings: dict[str, Any],
    cells_path: str | Path,
    fields_path: str | Path,
) -> None:
    """Write a plate's field QC table and its per-cell table (plate map, features, predictions).

    ``qc_settings`` is the config's ``qc`` section; its field thresholds are applied here
    (:func:`metascreen.aggregate.field_table`).
    """
    fields = aggregate.field_table(
        _read_tables(field_tables),
        min_relative_focus=qc_settings["min_relative_focus"],
        max_saturated_fraction=qc_settings["max_saturated_fraction"],
        min_contrast=qc_settings["min_contrast"],
    )
    cells = aggregate.cell_table(
        _read_tables(measure_tables),
        _read_tables(classify_tables),
        platemap,
        fields,
        positive_class=positive_class,
    )
    write_table(fields, fields_path)
    write_table(cells, cells_path)
    flagged = fields[fields["qc_flags"] != ""]
    log.info("%d cells; %d of %d fields flagged by QC", len(cells), len(flagged), len(fields))


def summarize(
    cell_tables: Sequence[str | Path],
    field_tables: Sequence[str | Path],
    platemap: pd.DataFrame,
    qc_settings: dict[str, Any],
    settings: dict[str, Any],
    outputs: dict[str, str | Path],
) -> None:
    """Per-well, per-sample and per-plate tables (CSV and Parquet) across all plates.

    ``qc_settings`` and ``settings`` are the config's ``qc`` and ``aggregate`` sections.
    """
    cells = _read_tables(cell_tables)
    fields = _read_tables(field_tables)
    min_cells = qc_settings["min_cells_per_well"]
    tables = {
        "per_well": aggregate.per_well_summary(cells, fields, platemap, min_cells=min_cells),
        "per_sample": aggregate.per_sample_summary(
            cells, fields, platemap, n_bootstrap=settings["n_bootstrap"], min_cells=min_cells
        ),
        "per_plate": aggregate.per_plate_summary(cells, fields, platemap, min_cells=min_cells),
    }
    for name, table in tables.items():
        write_table(table, outputs[f"{name}_csv"])
        write_table(table, outputs[f"{name}_parquet"])


def _gallery(
    cells: pd.DataFrame, crops_dir: Path, classes: dict[str, str], per_class: int = 8
) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Most confident and most uncertain example cells per predicted class."""
    gallery: dict[str, list[tuple[str, np.ndarray]]] = {}
    crops_of: dict[str, zarr.Array] = {}  # each well's crops, opened once
    probability = cells["Cells_probability"]
    confidence = (probability - 0.5).abs()
    for role in ("positive", "negative"):
        name = classes[role]
        of_class = confidence[cells["Metadata_predicted_class"] == name]
        picks = {
            f"most confident {name}": of_class.sort_values(ascending=False).index[:per_class],
            f"most uncertain {name}": of_class.sort_values().index[:per_class],
        }
        for caption, chosen in picks.items():
            examples = []
            for index in chosen:
                cell = cells.loc[index]
                well, field, label = (
                    cell["Metadata_Well"],
                    cell["Metadata_Site"],
                    cell["Metadata_ObjectNumber"],
                )
                if well not in crops_of:
                    crops_of[well] = zarr.open_array(str(crops_dir / f"{well}.zarr"), mode="r")
                crop = np.asarray(crops_of[well][int(cell["Metadata_crop_index"]), 0])
                examples.append((f"{well} f{field} #{label} p={probability[index]:.2f}", crop))
            gallery[caption] = examples
    return gallery


def report_plate(
    plate: str,
    cell_table: str | Path,
    fields_path: str | Path,
    per_well_path: str | Path,
    per_sample_path: str | Path,
    evaluation_path: str | Path,
    plan_path: str | Path,
    model_path: str | Path,
    crops_dir: str | Path,
    zarr_path: str | Path,
    config: dict[str, Any],
    output_path: str | Path,
    cell_diameter_path: str | Path | None = None,
    segmenter_evaluation_path: str | Path | None = None,
) -> None:
    """Render the self-contained HTML report of one plate.

    The per-sample table is the one across all plates, restricted to this plate's samples;
    ``cell_diameter_path`` is the plate's cell-diameter estimate, when there is one;
    ``segmenter_evaluation_path`` the segmenter's fine-tuning evaluation (JSON), when it
    was fine-tuned. Segmentation overlays of a few fields are read from the plate at
    ``zarr_path`` (:func:`_segmentation_overlays`).
    """
    from metascreen import model, report

    cells = pd.read_parquet(cell_table)
    fields = pd.read_parquet(fields_path)
    per_well = pd.read_parquet(per_well_path)
    per_sample = pd.read_parquet(per_sample_path)
    layout = read_json(plan_path)
    plate_wells = per_well[per_well["plate"] == plate]
    segmenter_evaluation = None if segmenter_evaluation_path is None else read_json(segmenter_evaluation_path)
    provenance = {
        "metascreen": __version__,
        "model_sha256": model.file_sha256(model_path),
        "input_files": layout["n_files"],
        "segmentation": _segmentation_provenance(
            config["segment"], cell_diameter_path, segmenter_evaluation_path
        ),
        "package_versions": package_versions(PACKAGES),
        "config": config,
    }
    html = report.render_plate_report(
        plate=plate,
        per_well=plate_wells,
        per_sample=per_sample[per_sample["sample"].isin(cells["Metadata_Sample"].unique())],
        cells=cells,
        fields=fields,
        evaluation=read_json(evaluation_path),
        gallery=_gallery(cells, Path(crops_dir), config["classes"]),
        provenance=provenance,
        positive_class=config["classes"]["positive"],
        negative_class=config["classes"]["negative"],
        skipped_fields=pd.DataFrame(layout["skipped"], columns=["well", "field", "file", "reason"]),
        overlays=_segmentation_overlays(zarr_path, plate_wells, config["segment"]["channel"]),
        segmenter_evaluation=segmenter_evaluation,
    )
    with atomic_path(output_path) as partial:
        partial.write_text(html, encoding="utf-8")


def _segmentation_overlays(
    zarr_path: str | Path, wells: pd.DataFrame, channel: int
) -> list[tuple[str, np.ndarray]]:
    """Outline overlays of the first field of up to :data:`REPORT_OVERLAY_WELLS` wells per
    sample (``wells``: rows with ``sample`` and ``well``), captioned sample / well / field /
    cells, at most :data:`REPORT_MAX_OVERLAYS`; each the central
    :data:`REPORT_OVERLAY_WINDOW` px of the segmented plane and its NGFF labels."""
    from metascreen import overlay
    from metascreen.segment.learned import central_window

    by_sample = wells.sort_values(["sample", "well"]).groupby("sample")
    picked = by_sample.head(REPORT_OVERLAY_WELLS).head(REPORT_MAX_OVERLAYS)
    overlays = []
    for sample, well in zip(picked["sample"], picked["well"], strict=True):
        field = ngff.field_indices(zarr_path, well)[0]
        plane = np.asarray(_segmentation_plane(ngff.field_image(zarr_path, well, field), channel))
        labels = ngff.field_labels(zarr_path, well, field)
        caption = f"{sample} / {well} / field {field} / {overlay.segmentation_summary(labels)['cells']} cells"
        if max(plane.shape) > REPORT_OVERLAY_WINDOW:
            caption += f" (central {REPORT_OVERLAY_WINDOW} px)"
        shown = [central_window(array, REPORT_OVERLAY_WINDOW) for array in (plane, labels)]
        overlays.append((caption, overlay.outline_overlay(*shown)))
    return overlays


def _segmentation_provenance(
    settings: dict[str, Any],
    cell_diameter_path: str | Path | None,
    segmenter_evaluation_path: str | Path | None = None,
) -> dict[str, Any]:
    """The segmentation method, and for ``learned`` its weights (the fine-tuned model
    beside ``segmenter_evaluation_path``, as train_segmenter writes them, when given)
    and the cell diameter used."""
    method = settings["method"]
    provenance: dict[str, Any] = {"method": method}
    if method != "learned":
        return provenance
    from metascreen import model
    from metascreen.segment import learned

    weights = settings["learned"]["weights"] or learned.SHIPPED_WEIGHTS
    if segmenter_evaluation_path is not None:
        provenance["fine_tuned_from"] = str(weights)
        weights = Path(segmenter_evaluation_path).with_name("model.safetensors")
    provenance["weights"] = str(weights)
    provenance["weights_sha256"] = model.file_sha256(weights)
    if cell_diameter_path is not None:
        estimate = read_json(cell_diameter_path)
        # estimates written before the rule was recorded all came from the closest scale
        unconfirmed = estimate.get("rule", "closest") != "fixed point"
        provenance["cell_diameter_px"] = (
            f"{estimate['cell_diameter']:.1f} (estimated from {estimate['n_cells']} cells "
            f"in {len(estimate['fields'])} fields"
            + ("; no scale from 10 to 160 px was confirmed by its cells: check it)" if unconfirmed else ")")
        )
    elif settings["learned"]["cell_diameter_um"] is not None:
        provenance["cell_diameter_um"] = settings["learned"]["cell_diameter_um"]
    else:
        provenance["cell_diameter_px"] = settings["learned"]["cell_diameter"]
    return provenance


def report_index(
    plates: Sequence[str], per_plate_path: str | Path, per_sample_path: str | Path, output_path: str | Path
) -> None:
    """Render the cross-plate summary page."""
    from metascreen import report

    html = report.render_index(
        list(plates), pd.read_parquet(per_plate_path), pd.read_parquet(per_sample_path)
    )
    with atomic_path(output_path) as partial:
        partial.write_text(html, encoding="utf-8")


def configure_logging() -> None:
    """Progress lines to stderr, which the rules send to their log files."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
