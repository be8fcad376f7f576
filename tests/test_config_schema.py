"""The config schema holds each key's default and description once; the library's settings
read theirs from it, and the demo config sets only what differs."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import superweights
from superweights import settings
from superweights.config import (
    config_readme,
    drop_deprecated,
    load_schema,
    section,
    stage_settings,
    validate_config,
)
from superweights.errors import UserError
from superweights.genes import GENE_SETS_DIR, GENES_OF_INTEREST, read_gmt

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema()
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
SETTINGS = settings.SECTIONS


def library_default(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return list(value) if isinstance(value, tuple) else value


def leaf_keys(spec: dict, path: str = ""):
    """(path, schema) of every key that holds a value, nested sections walked."""
    for key, sub in spec.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from leaf_keys(sub, f"{path}{key}/")
        else:
            yield f"{path}{key}", sub


@pytest.mark.parametrize("path", [p for p in SCHEMA["properties"] if p != "datasets"])
def test_every_key_has_a_default_and_a_description(path):
    spec = settings.section_schema(path)
    assert spec.get("description") and SCHEMA["properties"][path]["default"] == {}, path
    for key, sub in leaf_keys(spec, f"{path}/"):
        assert sub.get("description"), f"{key} lacks a description"
        assert "default" in sub or sub.get("deprecated"), f"{key} lacks a default"


@pytest.mark.parametrize("path", list(SETTINGS))
def test_settings_take_their_defaults_and_descriptions_from_the_schema(path):
    spec = settings.section_schema(path)["properties"]
    fields = {f.name: f for f in dataclasses.fields(SETTINGS[path])}
    assert set(fields) == {k for k, sub in spec.items() if not sub.get("deprecated")}, path
    built = SETTINGS[path]()
    for name, f in fields.items():
        default = spec[name]["default"]
        assert library_default(f) == default, f"{path}.{name}"
        assert f.metadata["description"] == " ".join(spec[name]["description"].split())
        value = getattr(built, name)
        if (path, name) == ("gene_sets", "resource_dir"):  # null: the shipped folder
            default = str(GENE_SETS_DIR)
        assert (list(value) if isinstance(value, tuple) else value) == default, f"{path}.{name}"


def test_no_setting_default_is_written_in_code():
    """Settings classes live in `settings` only, and state no default of a config key."""
    package = Path(superweights.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Settings"):
                assert path.name == "settings.py", f"{node.name} in {path}"
    classes = {c.__name__: c for c in vars(settings).values() if hasattr(c, "section")}
    tree = ast.parse(Path(settings.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            keys = settings.section_schema(classes[node.name].section)["properties"]
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and item.value is not None:
                    assert item.target.id not in keys, f"{node.name}.{item.target.id}"


def test_demo_config_sets_only_what_differs_from_the_defaults():
    for key, sub in leaf_keys(SCHEMA):
        path, _, name = key.rpartition("/")
        if path and name in section(CONFIG, path):
            assert section(CONFIG, path)[name] != sub["default"], f"{key} is the default"
    assert CONFIG["finetune"]["max_seq_len"] == 128
    assert all("max_seq_len" not in section(CONFIG, p) for p in ("probe", "ablate", "quantize"))


def test_a_deprecated_key_is_dropped_with_one_line_of_warning():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["probe"] = {"max_seq_len": 256, "cells_per_type": 3}
    config["datasets"][0]["channels"] = {"max_seq_len": 64}
    validate_config(config)  # accepted by the schema
    warning = drop_deprecated(config)
    assert warning.startswith("warning: deprecated config key(s) probe.max_seq_len, ")
    assert "datasets[demo].channels.max_seq_len" in warning and "\n" not in warning
    assert config["probe"] == {"cells_per_type": 3} and config["datasets"][0]["channels"] == {}
    assert stage_settings(validate_config(config))["probe"].cells_per_type == 3
    assert drop_deprecated(config) == ""


def test_absent_sections_and_keys_take_their_defaults():
    filled = validate_config({"datasets": [{"name": "demo", "source": "demo"}]})
    assert filled["finetune"]["max_seq_len"] == 192 and filled["model"]["architecture"]["do_mvc"]
    assert filled["gene_sets"]["resource_dir"] is None and filled["seaad"]["n_donors"] == 4
    assert validate_config(CONFIG)["ablate"]["n_null"] == 59


@pytest.mark.parametrize("path", ["channels", "genes"])
def test_null_weights_beyond_the_confirmations_draws_are_refused(path):
    config = {"ablate": {"n_null": 19}, "channels": {"n_null": 19}, "genes": {"n_null": 19}}
    config[path] = {"n_null": 20}
    with pytest.raises(UserError, match=rf"config {path}.n_null: 20 null weights.*draws 19"):
        stage_settings(config)
    config[path] = {"n_null": 19}
    stage_settings(config)


def test_genes_of_interest_are_the_curated_core_genes():
    curated = read_gmt(GENE_SETS_DIR / "alzheimers_curated.gmt")["AD_CORE_GENES"]
    assert sorted(GENES_OF_INTEREST) == sorted(curated)
    assert settings.section_schema("preprocess")["properties"]["genes_of_interest"][
        "default"
    ] == list(GENES_OF_INTEREST)


def test_config_readme_is_generated_from_the_schema():
    readme = (ROOT / "config" / "README.md").read_text()
    assert readme == config_readme(), "run: python -m superweights.config > config/README.md"
    assert "- `cells_per_type` (`50`): Cells probed per cell type." in readme
    assert "## `pretrain` and `finetune`\n" in readme and "## `pretrain`\n" not in readme
    assert "- `architecture`: The model pretrained here." in readme
    assert "  - `d_model` (`64`): Width." in readme  # model.architecture, nested
    assert "- `max_seq_len` (deprecated): Ignored, and refused from the next release" in readme


def test_demo_config_builds_every_stage_settings():
    built = stage_settings(CONFIG)
    assert set(built) == set(SETTINGS)
    assert built["ablate"].n_null == CONFIG["ablate"]["n_null"]


@pytest.mark.parametrize(
    ("path", "key", "value", "message"),
    [
        ("ablate", "n_strongest", 0, "config ablate: "),
        ("probe", "splits", ["training"], "config probe: probe splits ['training'] are not"),
        ("enrich", "max_size", 2, "config enrich: gene-set sizes need 1 <= min_size <= max_size"),
    ],
)
def test_a_value_the_library_rejects_names_its_section(path, key, value, message):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.setdefault(path, {})[key] = value
    with pytest.raises(UserError) as err:
        stage_settings(config)
    assert str(err.value).startswith(message) and key in str(err.value)


def test_snakemake_stops_at_parse_time_on_a_value_the_library_rejects(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("enrich:\n  min_size: 15\n  max_size: 10\n")  # each alone fits the schema
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line == (
        "error: config enrich: gene-set sizes need 1 <= min_size <= max_size "
        "(got minimum sizes [15, 3, 3], max_size 10)"
    )
    assert "Job stats" not in result.stdout
