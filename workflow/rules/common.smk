# Helpers of the rules: validated config and plate map, per-well input lists, rule settings.
import hashlib
import json
import shlex
from pathlib import Path

from metascreen.config import read_platemap, validate_config, validate_platemap

config.update(validate_config(config))
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


def segment_settings():
    """The segment section with only the chosen backend's parameters: changing another
    backend's parameters reruns nothing."""
    method = config["segment"]["method"]
    settings = {key: config["segment"][key] for key in ("channel", "method", method)}
    return json.dumps(settings, sort_keys=True)


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
