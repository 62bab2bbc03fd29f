"""Command line of metascreen: ``metascreen <command> ...`` (or ``python -m metascreen``).

The Snakemake rules call these commands, one per job; each is usable on its own too.
Settings arrive as JSON (the rules pass the validated config section, so that a change
of a setting reruns exactly the jobs that use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metascreen import config as configuration
from metascreen import discover, scaffold, stages, styles, synth
from metascreen.discover import DiscoveryError


def _json(text: str) -> Any:
    return json.loads(text)


def _platemap(path: str) -> pd.DataFrame:
    return configuration.complete_platemap(configuration.read_platemap(path))


def _add(subparsers: Any, name: str, help_text: str, *arguments: tuple[str, dict[str, Any]]) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    for flag, options in arguments:
        parser.add_argument(flag, **options)


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metascreen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    required = {"required": True}
    many = {"required": True, "nargs": "+"}
    settings = ("--settings", {"required": True, "type": _json, "help": "settings as JSON"})
    threads = ("--threads", {"type": int, "default": 1})
    platemap = ("--platemap", {"required": True, "type": _platemap, "help": "plate-map file (CSV or TSV)"})

    _add(
        commands,
        "synth",
        "Write a synthetic label-free plate with ground truth (images/, platemap.csv, truth/).",
        ("out", {"type": Path}),
        ("--seed", {"type": int, "default": 0}),
        ("--fields-per-well", {"type": int, "default": 3}),
        ("--size", {"type": int, "default": 512, "help": "field edge in pixels"}),
        ("--z-planes", {"type": int, "default": 1}),
        ("--channels", {"type": int, "default": 1}),
        ("--wells", {"nargs": "+", "help": "only these wells of the demo layout"}),
    )
    _add(
        commands,
        "synth-world",
        "Write fields of the varied synthetic world (name.tif + name_masks.tif pairs per style).",
        ("out", {"type": Path}),
        (
            "--styles",
            {"nargs": "+", "help": "style names (default: the pretraining styles; see metascreen.styles)"},
        ),
        ("--fields-per-style", {"type": int, "default": 4}),
        ("--size", {"type": int, "default": 256, "help": "field edge in pixels"}),
        ("--seed", {"type": int, "default": 0}),
    )
    _add(
        commands,
        "pretrain-segmenter",
        "Train the learned segmenter on the synthetic world (from scratch, or longer from --init weights); "
        "write safetensors + JSON metadata.",
        (
            "--out",
            {"type": Path, "default": None, "help": "weights file (default: the package's shipped weights)"},
        ),
        ("--seed", {"type": int, "default": 0}),
        (
            "--steps",
            {"type": _positive_int, "default": None, "help": "optimiser steps (default: the shipped run's)"},
        ),
        (
            "--learning-rate",
            {
                "type": _positive_float,
                "default": None,
                "help": "peak learning rate (default: the shipped run's)",
            },
        ),
        (
            "--base-channels",
            {
                "type": _positive_int,
                "default": None,
                "help": "U-Net channels at full resolution (default: the shipped run's)",
            },
        ),
        (
            "--branches",
            {
                "action": "store_true",
                "help": "train with RepVGG branches (3x3, 1x1, identity), folded into the plain U-Net "
                "afterwards: the same inference cost",
            },
        ),
        (
            "--init",
            {
                "type": Path,
                "default": None,
                "help": "go on training these weights (a warm restart of the learning-rate schedule, "
                "on the fields of --seed) instead of starting from scratch; their architecture is kept",
            },
        ),
        (
            "--teacher",
            {
                "type": Path,
                "default": None,
                "help": "distil these weights (usually a wider network's) into the one trained: its "
                "targets are --teacher-weight times their outputs plus the rest of the truth",
            },
        ),
        (
            "--teacher-weight",
            {"type": _fraction, "default": 0.5, "help": "the teacher's share of the targets, from 0 to 1"},
        ),
        ("--styles", {"nargs": "+", "help": "style names (default: all but the held-out ones)"}),
        (
            "--checkpoint-every",
            {
                "type": _non_negative_int,
                "default": 500,
                "help": "save the training state beside --out every N steps (0: never); the same command "
                "run again resumes from it",
            },
        ),
        ("--device", {"default": "auto", "help": "auto (CUDA when available), cpu or cuda"}),
        ("--threads", {"type": int, "default": 2, "help": "CPU threads of torch"}),
    )
    _add(
        commands,
        "init",
        "Discover a plate's TIFFs and write a run folder: config.yaml and platemap.csv to fill in.",
        ("images", {"type": Path, "help": "the plate's image folder"}),
        ("--preset", {"choices": sorted(discover.PRESETS), "help": "naming preset (default: detected)"}),
        ("--pattern", {"help": "a regular expression with named groups, instead of a preset"}),
        ("--out", {"type": Path, "default": Path("."), "help": "run folder (default: here)"}),
        ("--force", {"action": "store_true", "help": "overwrite an existing config and plate map"}),
    )
    _add(
        commands,
        "run",
        "Run the workflow on a run folder (Snakemake with its config, results in the folder).",
        ("--profile", {"default": "local", "help": "local, slurm or a profile folder (default: local)"}),
        ("folder", {"type": Path, "help": "run folder holding config.yaml"}),
        ("snakemake_args", {"nargs": argparse.REMAINDER, "help": "further Snakemake arguments"}),
    )
    _add(
        commands,
        "check",
        "Validate a config file and its plate map; print what would run.",
        ("--config", {"type": Path, "default": Path("config/config.yaml")}),
    )
    _add(
        commands,
        "preview",
        "Segment a seeded sample of each plate's fields with the config's settings, before a run; "
        "write an outline overlay per field and a table.",
        ("--config", {"type": Path, "required": True}),
        ("--fields", {"type": int, "default": 6, "help": "fields per plate (default: 6)"}),
        ("--seed", {"type": int, "default": 0, "help": "seed of the sample (default: 0)"}),
        ("--out", {"type": Path, "default": None, "help": "output folder (default: preview/ beside CONFIG)"}),
    )
    _add(
        commands,
        "plan",
        "Discover a plate's TIFFs, check them against the plate map, create the empty OME-Zarr plate.",
        ("--plate", required),
        ("--images", required),
        platemap,
        settings,
        ("--plan", required),
        ("--zarr", required),
    )
    _add(
        commands,
        "ingest",
        "Convert one well's TIFFs into the OME-Zarr plate.",
        ("--plan", required),
        ("--zarr", required),
        ("--well", required),
        settings,
        ("--manifest", required),
        threads,
    )
    _add(
        commands,
        "segment",
        "Segment every field of a well; store NGFF labels.",
        ("--zarr", required),
        ("--well", required),
        settings,
        ("--manifest", required),
        ("--cell-diameter", {"default": None, "help": "the plate's cell-diameter estimate (JSON)"}),
        threads,
    )
    _add(
        commands,
        "train-segmenter",
        "Fine-tune the learned segmenter on annotated fields; write the model and its held-out evaluation.",
        (
            "--annotations",
            {**many, "help": "folders of NAME.tif + NAME_masks.tif pairs, or plates' .ome.zarr"},
        ),
        settings,
        ("--model", required),
        ("--evaluation", required),
        threads,
    )
    _add(
        commands,
        "estimate-diameter",
        "Estimate a plate's typical cell diameter for the learned segmenter from a sample of fields.",
        ("--plan", required),
        settings,
        ("--output", required),
        threads,
    )
    _add(
        commands,
        "check-segmentation",
        "Check that segmentation found cells in enough of a plate's wells; stop the plate if not.",
        ("--plate", required),
        ("--manifests", many),
        ("--qc", {"required": True, "type": _json, "help": "the config's qc thresholds as JSON"}),
        ("--output", required),
    )
    _add(
        commands,
        "measure",
        "Measure every cell of a well and store its crops.",
        ("--zarr", required),
        ("--plate", required),
        ("--well", required),
        settings,
        ("--channel", {"type": int, "default": 0}),
        (
            "--saturation-level",
            {
                "type": _json,
                "default": None,
                "help": "saturated intensity as JSON; null: the dtype's maximum",
            },
        ),
        ("--table", required),
        ("--crops", required),
        ("--fields", {"required": True, "help": "output: per-field QC metrics (Parquet)"}),
    )
    _add(
        commands,
        "train",
        "Train, calibrate and evaluate the classifier on the training wells.",
        ("--tables", many),
        ("--crops", many),
        platemap,
        ("--classes", {"required": True, "type": _json}),
        settings,
        ("--crop-settings", {"required": True, "type": _json}),
        ("--model", required),
        ("--evaluation", required),
        threads,
    )
    _add(
        commands,
        "import-model",
        "Check a model trained elsewhere against this run's crops and copy it into the results.",
        ("--source", required),
        ("--crop-settings", {"required": True, "type": _json}),
        ("--model", required),
        ("--evaluation", required),
    )
    _add(
        commands,
        "classify",
        "Classify every cell of a well.",
        ("--table", required),
        ("--crops", required),
        ("--model", required),
        settings,
        ("--output", required),
        threads,
    )
    _add(
        commands,
        "collect",
        "Join a plate's per-well tables into its per-cell table and its field QC table.",
        ("--measurements", many),
        ("--predictions", many),
        ("--fields", many),
        platemap,
        ("--positive-class", required),
        ("--qc", {"required": True, "type": _json, "help": "the config's qc section as JSON"}),
        ("--output", required),
        ("--fields-output", required),
    )
    _add(
        commands,
        "summarize",
        "Per-well, per-sample and per-plate tables across plates.",
        ("--cells", many),
        ("--fields", many),
        platemap,
        ("--qc", {"required": True, "type": _json, "help": "the config's qc section as JSON"}),
        settings,
        ("--outdir", required),
    )
    _add(
        commands,
        "report",
        "Render a plate's HTML report.",
        ("--plate", required),
        ("--cells", required),
        ("--fields", required),
        ("--per-well", required),
        ("--per-sample", required),
        ("--evaluation", required),
        ("--plan", required),
        ("--model", required),
        ("--crops-dir", required),
        ("--zarr", {"required": True, "help": "the plate's OME-Zarr (segmentation overlays)"}),
        ("--config", {"required": True, "type": _json}),
        ("--cell-diameter", {"default": None, "help": "the plate's cell-diameter estimate (JSON)"}),
        (
            "--segmenter-evaluation",
            {"default": None, "help": "the segmenter's fine-tuning evaluation (JSON), when fine-tuned"},
        ),
        ("--output", required),
    )
    _add(
        commands,
        "report-index",
        "Render the cross-plate summary page.",
        ("--plates", many),
        ("--per-plate", required),
        ("--per-sample", required),
        ("--output", required),
    )
    return parser


def _load_config(config_path: Path) -> dict[str, Any]:
    """A config file validated, its defaults filled in and its paths taken from its folder."""
    if not config_path.is_file():
        raise configuration.ConfigError(f"config: file not found: {config_path}")
    with open(config_path, encoding="utf-8") as handle:
        config = configuration.validate_config(yaml.safe_load(handle) or {})
    return configuration.resolve_paths(config, config_path.parent)


def _check(config_path: Path) -> None:
    config = _load_config(config_path)
    platemap = configuration.validate_platemap(
        configuration.read_platemap(config["platemap"]),
        plates=list(config["plates"]),
        classes=config["classes"],
    )
    for plate, group in platemap.groupby("plate"):
        n_training = (group["train_class"] != "").sum()
        n_samples = group["sample"].nunique()
        print(f"plate {plate}: {len(group)} wells, {n_samples} samples, {n_training} training wells")


def _init(a: argparse.Namespace) -> None:
    found = scaffold.write_run_folder(a.images, a.out, preset=a.preset, pattern=a.pattern, force=a.force)
    wells = found["wells"]
    print(f"{found['n_files']} files ({found['preset']} naming) of plate {found['plate']}:")
    print(f"  {len(wells)} wells ({wells[0]} ... {wells[-1]}), {found['n_fields']} fields per well")
    print(
        f"  {found['n_channels']} channels, {found['n_z']} planes, {found['n_t']} time points, "
        f"{found['shape'][0]} x {found['shape'][1]} px {found['dtype']}"
    )
    if found["unmatched"]:
        print(f"  {len(found['unmatched'])} files match no naming pattern, e.g. {found['unmatched'][0]}")
    print(f"wrote {found['config']} and {found['platemap']}. Next:")
    print(f"  1. fill in sample (and train_class of training wells) in {found['platemap']}")
    print(f"     and check the commented keys of {found['config']}")
    print(f"  2. metascreen check --config {found['config']}")
    print(f"  3. metascreen run {a.out} --dry-run, then metascreen run {a.out}")


def _preview(a: argparse.Namespace) -> None:
    if a.fields < 1:
        raise configuration.ConfigError(f"--fields must be at least 1, got {a.fields}")
    config = _load_config(a.config)
    out = a.out or a.config.parent / "preview"
    table = stages.preview(config, out, n_fields=a.fields, seed=a.seed, run_folder=a.config.parent)
    method = config["segment"]["method"]
    for plate, fields in table.groupby("plate", sort=True):
        diameter = fields["cell_diameter_px"].iloc[0]
        scale = ""
        if method == "learned":
            found = f"cell diameter {diameter:.1f} px" if pd.notna(diameter) else "no cells at any scale"
            scale = f", {found}"
        print(f"plate {plate}: {method} segmentation of {len(fields)} fields{scale}")
        for field in fields.itertuples():
            size = f", median diameter {field.median_diameter_px:.1f} px" if field.cells else ""
            print(
                f"  {field.well} f{field.field}: {field.cells} cells{size}, "
                f"{100 * field.covered_fraction:.0f}% covered"
            )
    print(f"overlays ({{plate}}_{{well}}_f{{field}}.png) and preview.csv written to {out}")
    empty = int((table["cells"] == 0).sum())
    if empty:
        print(
            f"{empty} of {len(table)} fields have no cells: check segment.channel; for the learned "
            "segmenter set segment.learned.cell_diameter (px) by hand, or fine-tune it on a few "
            'annotated fields (README, "Your own plate")'
        )


def _run_folder(a: argparse.Namespace) -> int:
    if not (a.folder / scaffold.CONFIG_NAME).is_file():
        raise configuration.ConfigError(
            f"run folder {a.folder} has no {scaffold.CONFIG_NAME}; write one with metascreen init"
        )
    return subprocess.call(scaffold.snakemake_command(a.folder, a.profile, a.snakemake_args))


def _pretrain_segmenter(a: argparse.Namespace) -> None:
    import torch

    from metascreen.segment import learned, train

    torch.set_num_threads(a.threads)
    out = a.out or learned.SHIPPED_WEIGHTS
    settings = train.TrainingSettings(seed=a.seed)
    if a.steps is not None:
        settings = dataclasses.replace(settings, steps=a.steps)
    if a.learning_rate is not None:
        settings = dataclasses.replace(settings, learning_rate=a.learning_rate)
    if a.base_channels is not None:
        if a.init is not None:
            raise configuration.ConfigError("--base-channels cannot change the width of the --init network")
        settings = dataclasses.replace(settings, base_channels=a.base_channels)
    if a.branches:
        settings = dataclasses.replace(settings, branches=True)
    try:
        metadata = train.pretrain(
            out,
            style_names=a.styles,
            settings=settings,
            device=a.device,
            init=a.init,
            teacher=a.teacher,
            teacher_weight=a.teacher_weight,
            checkpoint_every=a.checkpoint_every,
        )
    # a missing or foreign --init or --teacher file, a checkpoint of another run, an unknown style
    except (FileNotFoundError, ValueError) as error:
        raise configuration.ConfigError(str(error)) from error
    print(f"segmenter weights written to {out} (metadata: {Path(out).with_suffix('.json')})")
    for style, ap in metadata["ap50_by_style"].items():
        print(f"  AP@0.5 {style:<28} {ap:.3f}")


def run(arguments: argparse.Namespace) -> int:
    """Dispatch a parsed command line to its stage; returns the exit status."""
    a = arguments
    if a.command == "init":
        _init(a)
    elif a.command == "run":
        return _run_folder(a)
    elif a.command == "synth":
        layout = synth.demo_layout()
        if a.wells:
            layout = layout[layout["well"].isin(a.wells)]
        out = synth.write_plate(
            a.out,
            layout=layout,
            seed=a.seed,
            fields_per_well=a.fields_per_well,
            shape=(a.size, a.size),
            z_planes=a.z_planes,
            channels=a.channels,
        )
        print(f"synthetic plate written to {out}")
    elif a.command == "synth-world":
        out = styles.write_world(
            a.out, styles=a.styles, fields_per_style=a.fields_per_style, shape=(a.size, a.size), seed=a.seed
        )
        print(f"synthetic fields written to {out}")
    elif a.command == "pretrain-segmenter":
        _pretrain_segmenter(a)
    elif a.command == "check":
        _check(a.config)
    elif a.command == "preview":
        _preview(a)
    elif a.command == "plan":
        stages.plan(a.plate, a.images, a.platemap, a.settings, a.plan, a.zarr)
    elif a.command == "ingest":
        stages.ingest_well(a.plan, a.zarr, a.well, a.settings, a.manifest, a.threads)
    elif a.command == "segment":
        stages.segment_well(a.zarr, a.well, a.settings, a.manifest, a.threads, a.cell_diameter)
    elif a.command == "train-segmenter":
        stages.train_segmenter(a.annotations, a.settings, a.model, a.evaluation, a.threads)
    elif a.command == "estimate-diameter":
        stages.estimate_cell_diameter(a.plan, a.settings, a.output, a.threads)
    elif a.command == "check-segmentation":
        stages.check_segmentation(a.plate, a.manifests, a.qc, a.output)
    elif a.command == "measure":
        stages.measure_well(
            a.zarr, a.plate, a.well, a.settings, a.channel, a.saturation_level, a.table, a.crops, a.fields
        )
    elif a.command == "train":
        stages.train(
            a.tables,
            a.crops,
            a.platemap,
            a.classes,
            a.settings,
            a.crop_settings,
            a.model,
            a.evaluation,
            a.threads,
        )
    elif a.command == "import-model":
        try:
            stages.import_model(a.source, a.crop_settings, a.model, a.evaluation)
        except (FileNotFoundError, ValueError) as error:  # a missing, corrupt or unfit train.model
            raise configuration.ConfigError(str(error)) from error
    elif a.command == "classify":
        stages.classify_well(a.table, a.crops, a.model, a.settings, a.output, a.threads)
    elif a.command == "collect":
        stages.collect_plate(
            a.measurements,
            a.predictions,
            a.fields,
            a.platemap,
            a.positive_class,
            a.qc,
            a.output,
            a.fields_output,
        )
    elif a.command == "summarize":
        outdir = Path(a.outdir)
        outputs = {
            f"{name}_{kind}": outdir / f"{name}.{kind}"
            for name in ("per_well", "per_sample", "per_plate")
            for kind in ("csv", "parquet")
        }
        stages.summarize(a.cells, a.fields, a.platemap, a.qc, a.settings, outputs)
    elif a.command == "report":
        stages.report_plate(
            a.plate,
            a.cells,
            a.fields,
            a.per_well,
            a.per_sample,
            a.evaluation,
            a.plan,
            a.model,
            a.crops_dir,
            a.zarr,
            a.config,
            a.output,
            a.cell_diameter,
            a.segmenter_evaluation,
        )
    elif a.command == "report-index":
        stages.report_index(a.plates, a.per_plate, a.per_sample, a.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; expected problems end with a one-line error and exit status 1."""
    arguments = build_parser().parse_args(argv)
    stages.configure_logging()
    try:
        return run(arguments)
    except (configuration.ConfigError, DiscoveryError) as error:
        print(f"metascreen {arguments.command}: error: {error}", file=sys.stderr)
        return 1
