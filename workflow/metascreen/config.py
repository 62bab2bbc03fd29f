"""Validation of the run configuration and the plate map against their JSON schemas.

Every error is one line that names the offending key, well or file, so that a typo in
``config.yaml`` or the plate map is found before any job starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
PLATEMAP_COLUMNS = ("plate", "well", "sample", "condition", "cell_line", "train_class")


class ConfigError(ValueError):
    """A configuration or plate map problem, described in one line."""


def load_schema(name: str) -> dict[str, Any]:
    """Read ``workflow/schemas/{name}.schema.yaml``."""
    with open(SCHEMA_DIR / f"{name}.schema.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _fill_defaults(validator_class: type) -> type:
    """Extend a jsonschema validator so that validation also fills in ``default`` values.

    This is the recipe from the jsonschema FAQ; defaults of nested objects are filled
    because an object's own default (``{}``) is inserted before its properties are visited.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(key, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _fill_defaults(jsonschema.Draft202012Validator)


def _one_line(error: jsonschema.ValidationError, where: str) -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    return f"{where}: {path or '(top level)'}: {error.message}"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a configuration mapping and return a copy with all defaults filled in.

    Parameters
    ----------
    config : dict
        The configuration as read from ``config.yaml`` (and ``--config`` overrides).

    Returns
    -------
    dict
        A validated deep copy with every default of the schema filled in.

    Raises
    ------
    ConfigError
        On the first problem, e.g. ``config: segment: Additional properties are not
        allowed ('texture_sigm' was unexpected)``.
    """
    validated = copy.deepcopy(dict(config))
    error = jsonschema.exceptions.best_match(_Validator(load_schema("config")).iter_errors(validated))
    if error is not None:
        raise ConfigError(_one_line(error, "config"))
    if validated["ingest"]["preset"] == "regex" and not validated["ingest"]["pattern"]:
        raise ConfigError("config: ingest.pattern: preset 'regex' needs a pattern")
    if validated["classes"]["negative"] == validated["classes"]["positive"]:
        raise ConfigError("config: classes: negative and positive must differ")
    return validated


def resolve_paths(config: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """The config with its relative paths (``plates.*.images``, ``platemap``,
    ``segment.learned.weights``, ``segment.learned.finetune.annotations``) taken from ``base``.

    Paths in a config are relative to the config file's folder (``base``), so a run folder
    works from anywhere. They are returned relative to the current directory (normalised:
    a config in the current directory keeps its paths as written); absolute paths stay.

    Examples
    --------
    >>> resolve_paths({"plates": {"p": {"images": "img"}}, "platemap": "/a/map.csv"}, "run")
    {'plates': {'p': {'images': 'run/img'}}, 'platemap': '/a/map.csv'}
    """

    def resolve(path: str) -> str:
        return path if Path(path).is_absolute() else os.path.relpath(Path(base) / path)

    resolved = copy.deepcopy(config)
    for plate in resolved["plates"].values():
        plate["images"] = resolve(plate["images"])
    resolved["platemap"] = resolve(resolved["platemap"])
    learned = resolved.get("segment", {}).get("learned", {})
    if learned.get("weights"):
        learned["weights"] = resolve(learned["weights"])
    if learned.get("finetune"):
        learned["finetune"]["annotations"] = [resolve(path) for path in learned["finetune"]["annotations"]]
    return resolved


def read_platemap(path: str | Path) -> pd.DataFrame:
    """Read a plate map with every column as text.

    The separator is the one of tab, comma and semicolon (as a spreadsheet in a comma-decimal
    locale writes CSV) that the header line holds; a byte-order mark and Windows line ends
    are allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"platemap: file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline()
    separator = next((candidate for candidate in ("\t", ",", ";") if candidate in header), ",")
    return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def validate_platemap(platemap: pd.DataFrame, *, plates: list[str], classes: dict[str, str]) -> pd.DataFrame:
    """Check a plate map against its schema and the configuration.

    Parameters
    ----------
    platemap : pandas.DataFrame
        One row per well, all columns text.
    plates : list of str
        Plate ids named in the configuration.
    classes : dict
        ``{"negative": name, "positive": name}``.

    Returns
    -------
    pandas.DataFrame
        The plate map with optional columns filled in, sorted by plate and well.

    Raises
    ------
    ConfigError
        Naming the row and value at fault: a malformed or duplicated well, a plate not
        in the configuration, a config plate without wells, an unknown class.
    """
    schema = load_schema("platemap")
    validator = _Validator(schema)
    rows = []
    for index, row in enumerate(platemap.to_dict(orient="records")):
        row = {key: value for key, value in row.items() if value != "" or key in schema["required"]}
        error = jsonschema.exceptions.best_match(validator.iter_errors(row))
        if error is not None:
            # +2: a header line, and people count rows from 1
            raise ConfigError(_one_line(error, f"platemap row {index + 2}"))
        rows.append(row)
    table = complete_platemap(pd.DataFrame(rows, columns=list(platemap.columns)).fillna(""))

    duplicated = table[table.duplicated(["plate", "well"], keep="first")]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise ConfigError(f"platemap: well {first.plate}/{first.well} is listed more than once")
    unknown_plates = sorted(set(table["plate"]) - set(plates))
    if unknown_plates:
        raise ConfigError(
            f"platemap: plate {unknown_plates[0]!r} is not among the config's plates {sorted(plates)}"
        )
    empty_plates = sorted(set(plates) - set(table["plate"]))
    if empty_plates:
        raise ConfigError(f"platemap: config plate {empty_plates[0]!r} has no wells in the plate map")
    known = {classes["negative"], classes["positive"], ""}
    bad_class = table[~table["train_class"].isin(known)]
    if not bad_class.empty:
        first = bad_class.iloc[0]
        raise ConfigError(
            f"platemap: well {first.plate}/{first.well}: train_class {first.train_class!r} "
            f"is neither {classes['negative']!r} nor {classes['positive']!r}"
        )
    return table


def complete_platemap(platemap: pd.DataFrame) -> pd.DataFrame:
    """The plate map as jobs use it: every column (empty text where the file has none), rows
    sorted by plate and well. Jobs apply it to the file that `validate_platemap` checked."""
    missing = {column: "" for column in PLATEMAP_COLUMNS if column not in platemap}
    return platemap.assign(**missing).sort_values(["plate", "well"], ignore_index=True)
