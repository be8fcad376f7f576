"""The public API: `import superweights` loads no torch, and every name it exports resolves."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import superweights


def test_import_loads_no_torch():
    """The report's environment has no torch: the package itself must not need it."""
    check = "import sys, superweights; print(superweights.__file__, 'torch' in sys.modules)"
    library = Path(superweights.__file__).parents[1]  # this package, not another install
    env = os.environ | {"PYTHONPATH": str(library)}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [superweights.__file__, "False"]


@pytest.mark.parametrize("name", superweights.__all__)
def test_every_exported_name_resolves(name):
    value = getattr(superweights, name)
    assert not isinstance(value, type(sys)), f"{name} is a module, not a function or class"
    if name.startswith("run_"):
        assert value.__name__ == "run", name
    assert name in dir(superweights)


def test_every_stage_command_has_its_runner():
    """`confirm` is `run_ablate` with a score, `genes --masked-expression` is
    `run_genes_base`; demo-data and inspect are no stages."""
    from superweights.cli import build_parser

    (stages,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    runners = {name.removeprefix("run_") for name in superweights.__all__ if name[:4] == "run_"}
    assert runners - {"genes_base"} == set(stages.choices) - {"confirm", "demo-data", "inspect"}


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'find_superweights'"):
        superweights.find_superweights  # noqa: B018
