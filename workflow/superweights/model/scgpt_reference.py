"""scGPT's own model code (scgpt 0.2.4, `scgpt/model/model.py`), for parity tests and benchmarks.

`import scgpt` fails with current torch (its package `__init__` imports torchtext), so the
model file and its two sibling modules are loaded straight from the installed package
without running any package `__init__`. The package is located with
`importlib.util.find_spec`, so an install into a `pip install --target` folder on
PYTHONPATH works too. The model file itself needs torch, numpy and tqdm.
"""

import importlib.util
import sys
import types
import warnings

_PACKAGE = "_scgpt_reference"
_MODULES = ("dsbn", "grad_reverse", "model")  # model.py imports the other two relatively


def load_reference_module() -> types.ModuleType:
    """Return scgpt 0.2.4's `scgpt.model.model` module (with `TransformerModel`).

    Raises ImportError, with what to install, when scgpt or a dependency of its model
    file is missing. Loaded once per process; later calls return the same module.
    """
    if f"{_PACKAGE}.model" in sys.modules:
        return sys.modules[f"{_PACKAGE}.model"]
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "scgpt is not installed; install it without its dependencies: "
            "pip install --no-deps scgpt==0.2.4 (a --target folder on PYTHONPATH also works)"
        )
    model_dir = f"{list(spec.submodule_search_locations)[0]}/model"
    parent = types.ModuleType(_PACKAGE)
    parent.__path__ = [model_dir]
    loaded = {_PACKAGE: parent}
    sys.modules[_PACKAGE] = parent
    try:
        for name in _MODULES:
            qualname = f"{_PACKAGE}.{name}"
            file_spec = importlib.util.spec_from_file_location(qualname, f"{model_dir}/{name}.py")
            if file_spec is None:
                raise ImportError(f"scgpt at {model_dir} has no {name}.py; expected scgpt 0.2.4")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[qualname] = loaded[qualname] = module
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flash_attn is not installed"
                file_spec.loader.exec_module(module)
    except Exception as err:  # leave no half-loaded module behind for the next call
        for qualname in loaded:
            sys.modules.pop(qualname, None)
        if isinstance(err, ModuleNotFoundError) and err.name:
            raise ImportError(
                f"scgpt's model file ({model_dir}/model.py) needs the missing module "
                f"{err.name!r}; install it (e.g. pip install {err.name.split('.')[0]})"
            ) from err
        raise
    return sys.modules[f"{_PACKAGE}.model"]
