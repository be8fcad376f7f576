"""`superweights <stage> --help` documents every option with its default; `--version`."""

import argparse

import pytest

from superweights import __version__, cli
from superweights.errors import UserError


def stage_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"superweights {__version__}"


@pytest.mark.parametrize("stage", sorted(stage_parsers()[1]))
def test_every_option_has_help_and_default(stage):
    parser = stage_parsers()[1][stage]
    assert parser.description, f"{stage} has no description"
    assert "example:" in (parser.epilog or ""), f"{stage} has no example"
    formatter = parser._get_formatter()
    assert isinstance(formatter, cli.HelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{stage} {name} has no help"
        if action.option_strings and not action.required:
            shown = formatter._get_help_string(action)
            assert "(default:" in shown, f"{stage} {name} does not show its default"
    parser.format_help()  # every help string formats (a stray % would raise here)


def test_settings_help_is_the_schema_description():
    from superweights.config import load_schema

    parser = stage_parsers()[1]["preprocess"]
    action = next(a for a in parser._actions if a.dest == "n_hvg")
    described = load_schema()["properties"]["preprocess"]["properties"]["n_hvg"]["description"]
    assert action.help == " ".join(described.split())


def test_a_deprecated_option_is_accepted_with_one_line_of_warning(capsys):
    from superweights.settings import ProbeSettings

    parser = stage_parsers()[1]["probe"]
    base = ["--checkpoint", "c", "--data", "d", "--out", "o"]
    assert "--max-seq-len" not in parser.format_help()
    settings = cli.settings_from(parser.parse_args([*base, "--max-seq-len", "64"]), ProbeSettings)
    assert settings == ProbeSettings()
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: --max-seq-len is deprecated: Ignored, and refused from")
    cli.settings_from(parser.parse_args(base), ProbeSettings)
    assert capsys.readouterr().err == ""


def test_default_config_is_the_repository_demo_config():
    import yaml

    from superweights.config import validate_config

    repo = validate_config(yaml.safe_load(open(cli.REPO_CONFIG)))  # run from the repository
    packaged = cli.default_config()
    for key in ("demo", "download", "preprocess"):
        assert packaged[key] == repo[key], key


def test_fetch_and_report_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here
    args = argparse.Namespace(config=None, dataset="demo")
    assert cli.config_for(args)["datasets"] == [{"name": "demo", "source": "demo"}]
    with pytest.raises(UserError, match="pass --config"):
        cli.config_for(argparse.Namespace(config=None, dataset="mtg"))
