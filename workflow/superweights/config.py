"""Validation of the workflow config against the packaged schema, config.schema.yaml."""

from importlib.resources import files

import jsonschema
import yaml

from .errors import UserError

SCHEMA_PATH = files(__package__) / "config.schema.yaml"


def validate_config(config: dict) -> dict:
    """Return the config if it matches the schema, else raise a one-line UserError."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise UserError(f"config error at {where}: {err.message}") from None
    return config
