"""The workflow config: its schema (config.schema.yaml, packaged), validation, stage settings.

The schema holds every key's type, default and description, which the library's settings
(`settings`) read; `config/README.md` is generated from it
(`python -m superweights.config > config/README.md`).
"""

import copy
import sys
import textwrap
from itertools import groupby

import jsonschema
import yaml

from .errors import UserError
from .settings import SCHEMA_PATH, SECTIONS, deprecated, section_schema

WIDTH = 96


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill_defaults(validator, properties, instance, schema):
    """jsonschema's `properties`, after setting each absent key that has a default."""
    if isinstance(instance, dict):
        for key, spec in properties.items():
            if "default" in spec:
                instance.setdefault(key, copy.deepcopy(spec["default"]))
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
        validator, properties, instance, schema
    )


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"properties": _fill_defaults}
)


def validate_config(config: dict) -> dict:
    """A copy of the config with every absent key at its default (as Snakemake's `validate`
    fills them), if it matches the schema; else a one-line UserError."""
    config = copy.deepcopy(config)
    error = jsonschema.exceptions.best_match(Validator(load_schema()).iter_errors(config))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise UserError(f"config error at {where}: {error.message}")
    return config


def drop_deprecated(config: dict) -> str:
    """Remove the deprecated keys from `config` and its datasets' overrides, in place; the
    one-line warning that names them and says why, or "" when there were none."""
    found, reasons = [], []
    sections = [(config, "")] + [
        (entry, f"datasets[{entry.get('name')}].") for entry in config.get("datasets") or []
    ]
    for owner, where in sections:
        for path in SECTIONS:
            values = section(owner, path)
            for key, spec in section_schema(path)["properties"].items():
                if deprecated(spec) and key in values:
                    del values[key]
                    found.append(f"{where}{path.replace('/', '.')}.{key}")
                    reasons.append(" ".join(spec["description"].split()))
    if not found:
        return ""
    return f"warning: deprecated config key(s) {', '.join(found)}: " + " ".join(
        dict.fromkeys(reasons)
    )


def section(config: dict, path: str) -> dict:
    """The config section at `path` ("model/architecture"); {} where absent."""
    for key in path.split("/"):
        config = config.get(key) or {}
    return config


NULLS_FROM_ABLATE = ("channels", "genes")
"""Sections whose null weights are the first `n_null` of the confirmation's draws."""


def stage_settings(config: dict) -> dict[str, object]:
    """Each stage's settings, built from its config section by the library's constructors.

    The constructors check what the schema cannot (e.g. a top-k fraction of 0 in
    `ablate.topk_sweep`), so a value the code would reject fails here, before any job runs,
    and so does an `n_null` of `channels` or `genes` beyond `ablate.n_null` (they take the
    first `n_null` of the confirmation's null draws). Raises a one-line UserError naming the
    section.
    """
    built = {}
    for path, settings_class in SECTIONS.items():
        try:
            built[path] = settings_class(**section(config, path))
        except UserError as err:
            raise UserError(f"config {path.replace('/', '.')}: {err}") from None
    drawn = built["ablate"].n_null
    for path in NULLS_FROM_ABLATE:
        if built[path].n_null > drawn:
            raise UserError(
                f"config {path}.n_null: {built[path].n_null} null weights, but the confirmation "
                f"draws {drawn} (ablate.n_null) and {path} takes the first n_null of them; "
                f"lower {path}.n_null or raise ablate.n_null"
            )
    return built


DATASET_SECTIONS = ("demo", "seaad", "rosmap", "local", "preprocess", "ablate", "channels")
"""Sections a `datasets:` entry may override for itself (source, labels, strata)."""


def dataset_configs(config: dict) -> dict[str, dict]:
    """Each dataset's config: the global sections with the entry's own overrides merged in.

    Raises a one-line UserError on duplicated names or an override the schema rejects.
    """
    names = [d["name"] for d in config["datasets"]]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"datasets: the name(s) {duplicated} appear more than once")
    merged = {}
    for entry in config["datasets"]:
        own = dict(config)
        for key in DATASET_SECTIONS:
            if key in entry:
                own[key] = {**config.get(key, {}), **entry[key]}
        try:
            own = validate_config(own)
            stage_settings(own)
        except UserError as err:
            raise UserError(f"dataset {entry['name']}: {err}") from None
        merged[entry["name"]] = own
    return merged


# --- config/README.md ------------------------------------------------------------------


def _value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000, allow_unicode=True)
    return "`" + text.removesuffix("\n").removesuffix("\n...") + "`"


def _paragraphs(text: str, indent: str = "") -> list[str]:
    return [
        textwrap.fill(p, WIDTH, initial_indent=indent, subsequent_indent=indent)
        for p in text.split("\n")
    ]


def _keys(schema: dict, indent: str = "") -> list[str]:
    lines = []
    for key, spec in schema.get("properties", {}).items():
        default = ""
        if deprecated(spec):
            default = " (deprecated)"
        elif "default" in spec and "properties" not in spec:
            default = f" ({_value(spec['default'])})"
        item = f"{indent}- `{key}`{default}: {spec['description']}"
        lines.append(textwrap.fill(item, WIDTH, subsequent_indent=indent + "  "))
        lines += _keys(spec, indent + "  ")
    return lines


def _resolve(schema: dict, spec: dict) -> dict:
    return schema["definitions"][spec["$ref"].rsplit("/", 1)[1]] if "$ref" in spec else spec


def config_readme(schema: dict | None = None) -> str:
    """config/README.md: the schema's descriptions and defaults, section by section.

    Consecutive sections that share a definition (`pretrain`, `finetune`) share a heading.
    """
    schema = schema or load_schema()
    lines = [
        f"# {schema['title']}",
        "",
        "<!-- Generated from workflow/superweights/config.schema.yaml by "
        "`python -m superweights.config > config/README.md`: edit the schema, not this file. -->",
        "",
        *"\n\n".join(_paragraphs(schema["description"])).split("\n"),
    ]
    same_keys = groupby(schema["properties"].items(), key=lambda item: item[1].get("$ref", item[0]))
    for _, group in same_keys:
        group = list(group)
        spec = _resolve(schema, group[0][1])
        heading = " and ".join(f"`{name}`" for name, _ in group)
        lines += ["", f"## {heading}", *_paragraphs(spec["description"]), *_keys(spec)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_readme())
