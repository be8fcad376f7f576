"""The conda envs, checked statically (conda cannot be installed on the test machines).

Every rule has an env file; the env lists exactly the distributions that its rules' code
imports (the rule script, or the `superweights` CLI stage of a shell rule, and every
`superweights` module these reach, walked through their imports), each pinned to the
version in constraints.txt. Snakemake's own environment parses the workflow without the
heavy packages: `workflow/rules/common.smk` reaches only `PARSE_IMPORTS`, and a dry run
succeeds where torch, gseapy and scanpy cannot be imported.
"""

import argparse
import ast
import functools
import os
import re
import subprocess
import sys
from collections import defaultdict
from importlib.metadata import packages_distributions
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (
    DeploymentMethod,
    DeploymentSettings,
    OutputSettings,
    ResourceSettings,
)

from helpers import ROOT

LIBRARY = ROOT / "workflow"
PACKAGE = "superweights"
NOT_IMPORTED = {"python", "pip", "scikit-misc"}
"""Env entries that are not Python imports: the interpreter, pip, and scikit-misc (the loess
that scanpy's seurat_v3 HVG flavour loads)."""
PARSE_IMPORTS = {"snakemake", "jsonschema", "yaml", "numpy", "pandas"}
"""What parsing the workflow imports (Snakefile and common.smk, with the library they reach)."""
HEAVY = ("torch", "gseapy", "scanpy")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The workflow, parsed by Snakemake."""
    workdir = tmp_path_factory.mktemp("parse")
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        yield api.workflow(
            resource_settings=ResourceSettings(), snakefile=ROOT / "Snakefile", workdir=workdir
        )._workflow


@pytest.fixture(scope="module")
def rules(workflow):
    return [rule for rule in workflow.rules if rule.name != "all"]


# --- imports, statically -----------------------------------------------------------------


def module_path(module: str) -> Path | None:
    base = LIBRARY.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_nodes(node: ast.AST):
    """Import statements under `node`, skipping `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif not is_type_checking(child):
            yield from import_nodes(child)


def package_of(module: str) -> str:
    return module if module_path(module).name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(statements, package: str = "") -> set[str]:
    """Absolute names of what the statements import (a `from` target that is a submodule too);
    `package` resolves relative imports."""
    names = set()
    for node in statements:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = (
            ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
        )
        names.add(target)
        names |= {f"{target}.{a.name}" for a in node.names if module_path(f"{target}.{a.name}")}
    return names


def stage_handler(stage: str) -> str:
    """Name of the cli function that runs `superweights <stage>`, from the real parser."""
    from superweights.cli import build_parser

    (stages,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert stage in stages.choices, f"superweights has no stage {stage!r}"
    return stages.choices[stage].get_default("func").__name__


def cli_stage_imports(stage: str) -> set[str]:
    """What `superweights <stage>` imports: cli's top level, the parser, main, and the
    stage's function with the cli functions it calls."""
    tree = parse(module_path(f"{PACKAGE}.cli"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    todo, reached = ["main", "build_parser", stage_handler(stage)], set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        calls = {n.func.id for n in ast.walk(functions[name]) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name)}  # fmt: skip
        todo += sorted(calls & functions.keys())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    nodes = top + [n for f in reached for n in import_nodes(functions[f])]
    return imported_modules(nodes, PACKAGE)


def third_party_imports(start: set[str]) -> set[str]:
    """Top-level names of non-stdlib modules imported by `start` and the library it reaches."""
    found, seen, todo = set(), set(), sorted(start)
    while todo:
        name = todo.pop()
        top = name.partition(".")[0]
        if top != PACKAGE:
            if top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            module = ".".join(parts[:i])
            if module in seen or module_path(module) is None:
                continue
            seen.add(module)
            statements = import_nodes(parse(module_path(module)))
            todo += imported_modules(statements, package_of(module))
    return found


def rule_imports(rule) -> set[str]:
    if rule.script:
        script = Path(rule.basedir) / rule.script
        return third_party_imports(imported_modules(import_nodes(parse(script))))
    stage = re.search(r"\{params\.launcher\}\s+(\S+)", rule.shellcmd or "")
    assert stage, f"rule {rule.name} runs neither a script nor the superweights CLI"
    return third_party_imports(cli_stage_imports(stage.group(1)))


@functools.cache
def providers_of() -> dict[str, list[str]]:
    return packages_distributions()


def distribution(import_name: str) -> str:
    """The distribution that provides an import name (its own name when not installed here)."""
    providers = providers_of().get(import_name, [import_name])
    assert len(set(map(normalise, providers))) == 1, f"{import_name}: {providers}"
    return normalise(providers[0])


# --- env files ---------------------------------------------------------------------------


def env_packages(path: Path) -> dict[str, str | None]:
    """Normalised package name -> pinned version (None when unpinned) of an env file."""
    packages = {}
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        for spec in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, _, version = re.match(r"([A-Za-z0-9_.-]+)\s*(==?)?\s*(\S*)", spec).groups()
            packages[normalise(name)] = version or None
    return packages


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def env_file(rule) -> Path:
    return (Path(rule.basedir) / rule.conda_env).resolve()


def test_every_rule_has_an_env_file(rules):
    for rule in rules:
        assert rule.conda_env, f"rule {rule.name} has no conda env"
        assert env_file(rule).is_file(), f"rule {rule.name}: {env_file(rule)} missing"


def test_every_env_file_is_used(rules):
    used = {env_file(rule) for rule in rules}
    for path in (ROOT / "envs").glob("*.yaml"):
        assert path.resolve() in used, f"{path.name} is used by no rule"


def test_envs_list_exactly_what_their_rules_import(rules):
    needed = defaultdict(set)
    for rule in rules:
        needed[env_file(rule)] |= {distribution(name) for name in rule_imports(rule)}
    for path, distributions in needed.items():
        listed = set(env_packages(path)) - NOT_IMPORTED
        assert not distributions - listed, f"{path.name} lacks {sorted(distributions - listed)}"
        assert not listed - distributions, (
            f"{path.name}: nothing imports {sorted(listed - distributions)}"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_match_constraints(path):
    pins = constraints()
    packages = env_packages(path)
    assert packages.get("python"), f"{path.name} does not pin python"
    for name, version in packages.items():
        if name in NOT_IMPORTED:
            continue
        assert version, f"{path.name}: {name} is not pinned"
        assert pins.get(name) == version, (
            f"{path.name}: {name} {version} vs constraints {pins.get(name)}"
        )


def test_the_import_walk_sees_lazy_and_transitive_imports():
    """The walk itself: rosmap's lazy synapseclient import, reached from the fetch stage."""
    fetch = third_party_imports(cli_stage_imports("fetch"))
    assert "synapseclient" in fetch
    assert "torch" in third_party_imports(cli_stage_imports("finetune"))
    assert distribution("yaml") == "pyyaml"


def test_cli_rules_run_the_env_python_under_conda(workflow):
    """Under `--sdm conda` the shell rules start `python` from PATH (the activated env's),
    with the library from the workflow folder; without conda, the Python running Snakemake.
    Run here under torchrun (two processes), whose workers inherit PYTHONPATH."""
    launcher = workflow.globals["launcher"]
    one, two = SimpleNamespace(gpu=1), SimpleNamespace(gpu=2)
    assert launcher(None, one) == f"{sys.executable} -m superweights.cli"
    before = workflow.deployment_settings
    workflow.deployment_settings = DeploymentSettings(deployment_method={DeploymentMethod.CONDA})
    try:
        single, command = launcher(None, one), launcher(None, two)
    finally:
        workflow.deployment_settings = before
    python = f"PYTHONPATH={LIBRARY}${{PYTHONPATH:+:$PYTHONPATH}} python"
    assert single == f"{python} -m superweights.cli"
    assert command.startswith(f"{python} -m torch.distributed.run ")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {command} --help"],
        cwd=workflow.workdir_init,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("usage: superweights") == 2


def smk_imports(path: Path) -> set[str]:
    """What a Snakemake file's top-level Python import statements import."""
    statements = re.findall(r"^(?:from|import) [^\n(]*(?:\([^)]*\))?.*$", path.read_text(), re.M)
    return imported_modules(import_nodes(ast.parse("\n".join(statements))))


def test_parsing_the_workflow_imports_only_light_packages():
    files = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    found = third_party_imports(set().union(*map(smk_imports, files)))
    assert found == PARSE_IMPORTS


def test_the_workflow_is_parsed_without_torch_gseapy_or_scanpy(tmp_path):
    """A dry run of the demo in a Python where the heavy packages cannot be imported."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HEAVY)
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{LIBRARY}"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0, "sitecustomize did not block torch"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", ROOT / "Snakefile",
         "--directory", tmp_path / "work", "--cores", "1"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results/demo/report.html" in result.stdout
