# Helpers of the rules: validated config and plate map, per-well input lists, rule settings.
import hashlib
import json
import shlex
from pathlib import Path

from metascreen import annotations
from metascreen.config import (
    read_platemap,
    resolve_paths,
    validate_config,
    validate_platemap,
)


def config_folder():
    """The folder of the config file given with --configfile (the last one), else of the
    Snakefile's own (the demo's): relative paths in a config are relative to its folder.
    """
    configfiles = workflow.overwrite_configfiles or workflow.configfiles
    return Path(configfiles[-1]).parent


config.update(resolve_paths(validate_config(config), config_folder()))
PLATEMAP = validate_platemap(
    read_platemap(config["platemap"]),
    plates=list(config["plates"]),
    classes=config["classes"],
)
PLATES = sorted(config["plates"])
ENV = "../../envs/metascreen.yaml"

# Jobs run `python -m metascreen`: make the package in workflow/ importable in any job
# environment (the project's venv has it installed; a conda env from envs/ does not).
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(Path(workflow.basedir) / 'workflow'))}"
    "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


wildcard_constraints:
    plate="|".join(PLATES),
    well="[A-P][0-9]{2}",


localrules:
    plan_plate,
    check_segmentation,
    collect_plate,
    summarize,
    report_plate,
    report_index,


def wells_of(plate):
    return PLATEMAP.loc[PLATEMAP["plate"] == plate, "well"].tolist()


def training_wells():
    """(plate, well) of every well with a known class."""
    rows = PLATEMAP[PLATEMAP["train_class"] != ""]
    return list(zip(rows["plate"], rows["well"]))


def platemap_digest(plate=None, columns=None):
    """Digest of the plate-map rows (of one plate or all) and columns a job uses.

    Jobs read the plate-map file itself (its path is a param): the rows inline would pass the
    kernel's 128 KiB limit on one argument at a few 384-well plates. This digest, as a param, is
    the job's rerun trigger: it reruns when its rows change, not when the file's date does.
    """
    rows = PLATEMAP if plate is None else PLATEMAP[PLATEMAP["plate"] == plate]
    if columns is not None:
        rows = rows[columns]
    text = json.dumps(rows.to_dict(orient="records"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_json(section, drop=()):
    return json.dumps(
        {key: value for key, value in config[section].items() if key not in drop},
        sort_keys=True,
    )


SEGMENTER_MODEL = "results/segmenter/model.safetensors"


def finetunes_segmenter():
    """Whether the learned segmenter is fine-tuned on the user's annotations first."""
    return (
        config["segment"]["method"] == "learned"
        and config["segment"]["learned"]["finetune"] is not None
    )


def learned_parameters():
    """The learned backend's parameters as the segmentation jobs use them: with
    fine-tuning, the fine-tuned model's weights (``finetune`` itself is the
    train_segmenter job's, whose model file then triggers the reruns)."""
    learned = dict(config["segment"]["learned"])
    del learned["finetune"]
    if finetunes_segmenter():
        learned["weights"] = SEGMENTER_MODEL
    return learned


def segment_settings():
    """The segment section with only the chosen backend's parameters: changing another
    backend's parameters reruns nothing."""
    method = config["segment"]["method"]
    settings = {key: config["segment"][key] for key in ("channel", "method")}
    settings[method] = (
        learned_parameters() if method == "learned" else config["segment"][method]
    )
    return json.dumps(settings, sort_keys=True)


def diameter_estimate_settings():
    """What the cell-diameter estimate uses: the channel, the network's weights, device
    and precision."""
    learned = learned_parameters()
    settings = {
        "channel": config["segment"]["channel"],
        "learned": {key: learned[key] for key in ("weights", "device", "precision")},
    }
    return json.dumps(settings, sort_keys=True)


def segmenter_training_settings():
    """What fine-tuning uses: the channel, the starting weights, the device and ``finetune``."""
    learned = config["segment"]["learned"]
    settings = {
        "channel": config["segment"]["channel"],
        "learned": {key: learned[key] for key in ("weights", "device", "finetune")},
    }
    return json.dumps(settings, sort_keys=True)


def annotation_sources():
    return config["segment"]["learned"]["finetune"]["annotations"]


def annotation_tiffs():
    """The TIFF files of the annotation folders (annotations inside a plate's OME-Zarr
    are covered by the digest alone: they sit inside another rule's output)."""
    return [
        str(path)
        for path in annotations.annotation_files(annotation_sources())
        if path.suffix.lower() in (".tif", ".tiff")
    ]


def segmenter_inputs():
    """The fine-tuned model, as a named input, when the segmenter is fine-tuned."""
    return {"segmenter": SEGMENTER_MODEL} if finetunes_segmenter() else {}


def diameter_estimate_inputs(wildcards):
    """The plate's plan and, when fine-tuning, the fine-tuned model."""
    return {"plan": f"results/{wildcards.plate}/plan.json", **segmenter_inputs()}


def estimates_cell_diameter():
    """Whether each plate's cell diameter is estimated from its images (learned, auto)."""
    learned = config["segment"]["learned"]
    return (
        config["segment"]["method"] == "learned"
        and learned["cell_diameter_um"] is None
        and learned["cell_diameter"] == "auto"
    )


def cell_diameter_inputs(wildcards):
    """The plate's cell-diameter estimate, as a named input, when it is estimated."""
    if estimates_cell_diameter():
        return {
            "cell_diameter": f"results/{wildcards.plate}/segment/cell_diameter.json"
        }
    return {}


def segment_inputs(wildcards):
    """A well's ingest manifest and, when estimated, its plate's cell diameter and,
    when fine-tuning, the fine-tuned model."""
    return {
        "ingest": f"results/{wildcards.plate}/ingest/{wildcards.well}.json",
        **cell_diameter_inputs(wildcards),
        **segmenter_inputs(),
    }


def input_flag(name, flag):
    """A params function: ``flag FILE`` for a job that has the optional input ``name``."""

    def flag_for(wildcards, input):
        return f"{flag} {input[name]}" if name in input.keys() else ""

    return flag_for


def segmenter_evaluation_inputs(wildcards):
    """The fine-tuning evaluation, as a named input, when the segmenter is fine-tuned."""
    if finetunes_segmenter():
        return {"segmenter_evaluation": "results/segmenter/evaluation.json"}
    return {}


def segmentation_check_settings():
    """The qc thresholds the plate's segmentation check uses."""
    keys = ("min_cells_per_well", "max_low_cell_well_fraction")
    return json.dumps({key: config["qc"][key] for key in keys}, sort_keys=True)


def aggregation_qc_settings():
    """The qc section without the segmentation check's own share of low-cell wells:
    changing that reruns the check, not the tables."""
    return settings_json("qc", drop=("max_low_cell_well_fraction",))


def training_segmentation_checks():
    """The segmentation check of every plate with training wells."""
    plates = sorted({plate for plate, _ in training_wells()})
    return expand("results/{plate}/segment/check.json", plate=plates)


def zarr_path(wildcards):
    return f"results/{wildcards.plate}/{wildcards.plate}.ome.zarr"


def mem_mb(base):
    """Memory request that grows with each retry (--retries)."""
    return lambda wildcards, attempt: base * attempt


def per_well(pattern, plate):
    return expand(pattern, plate=plate, well=wells_of(plate))


def final_outputs():
    outputs = [
        "results/summary/per_well.csv",
        "results/summary/per_sample.csv",
        "results/summary/per_plate.csv",
        "results/summary/report.html",
        "results/model/evaluation.json",
    ]
    outputs += expand("results/{plate}/report.html", plate=PLATES)
    return outputs
