"""Read and write scGPT checkpoint folders, refusing any weight that does not fit.

A folder holds `args.json` (scGPT's keys, plus our `n_cls`, `norm_scheme` and the cells' cut,
`args.CellCut`),
`vocab.json` (`{gene: id}`), and the weights as `model.safetensors` and/or `best_model.pt`
(a plain state_dict). Released scGPT folders have only `best_model.pt`, saved with
flash-attention names, which are mapped to PyTorch's.

Matching rule, key by key, after renaming:
- a file key the model has, with the model's shape, is loaded;
- a file key the model lacks is ignored only when it belongs to a head that reads the
  encoder output and that this configuration does not build (`cls_decoder.` when
  n_cls = 0, `mvc_decoder.` without MVC, zero-probability heads, the batch
  discriminator); anything else, e.g. batch or domain encoders that would change the
  hidden states, is an error;
- a model key the file lacks, or holds with another shape, may stay at its fresh
  initialisation only if it matches a pattern in `allow_missing` and is not part of the
  embeddings or the transformer encoder (those, attention included, are never dropped).
Every decision is logged with counts.
"""

import fnmatch
import json
import logging
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UserError
from ..outputs import apply_umask, make_temp_dir
from .args import ARGS_FILE, VOCAB_FILE, read_args, read_args_and_vocab
from .scgpt import ScGPTConfig, ScGPTModel

log = logging.getLogger(__name__)

TORCH_FILE, SAFETENSORS_FILE = "best_model.pt", "model.safetensors"

# flash-attn (released checkpoints) and upstream "_impl" names -> PyTorch names.
_RENAMES = (
    ("self_attn._impl.", "self_attn."),
    ("self_attn.Wqkv.weight", "self_attn.in_proj_weight"),
    ("self_attn.Wqkv.bias", "self_attn.in_proj_bias"),
)
_NEVER_FRESH = ("encoder.", "value_encoder.", "transformer_encoder.")
_OPTIONAL_HEADS = {
    "decoder.zero_logit.": "zero-probability output of the expression decoder (explicit "
    "zero probabilities are not modelled here)",
    "mvc_decoder.W_zero_logit.": "zero-probability output of the MVC decoder (explicit "
    "zero probabilities are not modelled here)",
    "grad_reverse_discriminator.": "batch discriminator (used only by scGPT's batch-correction "
    "training)",
}


def unused_heads(config: ScGPTConfig) -> dict[str, str]:
    """Key prefixes of the heads this configuration does not build, each with the reason.

    Each reads the encoder output only, so leaving it out changes no hidden state.
    """
    heads = dict(_OPTIONAL_HEADS)
    if config.n_cls == 0:
        heads["cls_decoder."] = "classifier head, not built when n_cls is 0"
    if not config.do_mvc:
        heads["mvc_decoder."] = "MVC head, off in args.json (MVC: false)"
    return heads


def ignored_by_head(keys: Iterable[str], config: ScGPTConfig) -> dict[str, list[str]]:
    """The ignored file keys grouped by the unused head (`unused_heads`) they belong to."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        head = max((h for h in unused_heads(config) if key.startswith(h)), key=len)
        groups.setdefault(head, []).append(key)
    return groups


def pick_device() -> torch.device:
    """CUDA (the first visible GPU) when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(
    folder: str | Path,
    *,
    n_cls: int | None = None,
    allow_missing: Iterable[str] = (),
    device: str | torch.device = "cpu",
) -> tuple[ScGPTModel, ScGPTConfig, dict[str, int]]:
    """Build the model that args.json describes and load its weights (eval mode).

    `n_cls`: classes of the classifier head; None keeps the saved value (0 = no head).
    `allow_missing`: glob patterns of model keys that may stay freshly initialised,
    e.g. `("cls_decoder.*",)` to fine-tune a classifier from a pretrained checkpoint.
    """
    folder = Path(folder)
    args, vocab = read_args_and_vocab(folder)
    config = checkpoint_config(args, vocab, n_cls)
    model = ScGPTModel(config)
    state = rename_keys(read_state_dict(folder))
    model.load_state_dict(
        match_state_dict(model.state_dict(), state, config, allow_missing, folder), strict=False
    )
    return model.to(device).eval(), config, vocab


def checkpoint_config(args: dict, vocab: dict[str, int], n_cls: int | None) -> ScGPTConfig:
    """The architecture of args.json; `n_cls` None keeps its classifier size (0 = none)."""
    return ScGPTConfig.from_args(
        args,
        ntoken=len(vocab),
        n_cls=int(args.get("n_cls", 0)) if n_cls is None else n_cls,
        pad_token_id=vocab[args.get("pad_token", "<pad>")],
    )


def weights_file(folder: Path) -> Path:
    """`model.safetensors` if present, else `best_model.pt`; UserError when neither is."""
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"checkpoint folder {folder} has neither {SAFETENSORS_FILE} nor {TORCH_FILE}")


def read_state_dict(folder: Path) -> dict[str, Tensor]:
    """Tensors of `model.safetensors` if present, else of `best_model.pt`."""
    path = weights_file(folder)
    reader = _read_safetensors if path.name == SAFETENSORS_FILE else _read_torch
    try:
        state = reader(path)
    except (
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
        zipfile.BadZipFile,
    ) as err:
        raise UserError(f"cannot read weights {path}: {_read_problem(path, err)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path} is not a plain state_dict of named tensors")
    check_finite(state, path)
    log.info("read %d tensors from %s", len(state), path)
    return dict(state)


def check_finite(state: Mapping[str, Tensor], source: str | Path) -> None:
    """UserError naming the first floating-point tensor that holds NaN or ±inf."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(
                f"{source}: tensor {key} holds {bad} non-finite value(s) (NaN or inf); "
                "results from these weights cannot be trusted: use an intact checkpoint"
            )


def check_classes(folder: str | Path, n_cls: int, classes: list[str]) -> None:
    """UserError unless the checkpoint classifies exactly the data's cell types, in order.

    Fine-tuned folders name their classes in args.json (`classes`); others are checked by
    their number of outputs only.
    """
    saved = read_args(Path(folder)).get("classes")
    if saved is not None and [str(c) for c in saved] != list(classes):
        saved = [str(c) for c in saved]
        unknown = sorted(set(classes) - set(saved))
        unused = sorted(set(saved) - set(classes))
        how = "; ".join(
            f"{what}: {_summary(names)}"
            for what, names in (("not in the checkpoint", unknown), ("not in the data", unused))
            if names
        )
        raise UserError(
            f"the classifier of {folder} was trained on other cell types "
            f"({how or 'the same ones in another order'}); "
            "use the checkpoint fine-tuned on this dataset"
        )
    if n_cls != len(classes):
        raise UserError(
            f"the checkpoint {folder} classifies {n_cls} classes but the data has "
            f"{len(classes)}; use the checkpoint fine-tuned on this dataset"
        )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return load_file(path, device="cpu")


def _read_torch(path: Path) -> dict[str, Tensor]:
    """torch.load with weights only, after checking a zip-format file's CRCs (torch does not)."""
    with path.open("rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    if zipped:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise _CorruptFile(f"{damaged} in its zip archive fails its CRC check")
    return torch.load(path, map_location="cpu", weights_only=True)


class _CorruptFile(ValueError):
    """A weights file whose bytes are damaged; the message says where."""


def _read_problem(path: Path, err: BaseException) -> str:
    """What is wrong with a weights file that could not be read, in words (one line).

    Never passes on torch's advice to retry with `weights_only=False`: a damaged file does
    not load that way either, and an untrusted one would run code.
    """
    size = path.stat().st_size if path.is_file() else 0
    message = str(err)
    if isinstance(err, _CorruptFile):
        return f"the file is corrupt: {message}"
    if size == 0:
        return "the file is empty (0 bytes); copy it again"
    if isinstance(err, zipfile.BadZipFile) or "central directory" in message:
        return (
            f"its zip archive is incomplete or damaged ({size:,} bytes; truncated by an "
            "interrupted download or copy?); copy it again"
        )
    if isinstance(err, EOFError) or "unexpected EOF" in message or "Errno 22" in message:
        return f"the file ends early ({size:,} bytes; truncated?); copy it again"
    if isinstance(err, pickle.UnpicklingError):
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if unsupported:
            return (
                f"it holds Python objects, not only tensors ({unsupported.group(1)}); "
                "save the model's state_dict() instead"
            )
        return (
            "it is neither a PyTorch checkpoint nor a pickle of tensors (corrupt or another format)"
        )
    first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    return first.split(". ")[0].removesuffix(".")


def renamed_key(key: str) -> str:
    """PyTorch's name for a flash-attention key (`self_attn.Wqkv.*`, `self_attn._impl.*`)."""
    for old, replacement in _RENAMES:
        key = key.replace(old, replacement)
    return key


def rename_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map flash-attention names to PyTorch's (`renamed_key`), refusing duplicates."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        new = renamed_key(key)
        if new in renamed:
            raise UserError(f"weights hold both {key} and an equivalent of {new}; keep one")
        renamed[new] = value
    changed = sum(a != b for a, b in zip(state, renamed, strict=True))
    if changed:
        log.info("renamed %d flash-attention keys to PyTorch names", changed)
    return renamed


def match_state_dict(
    model_state: Mapping[str, Tensor],
    file_state: Mapping[str, Tensor],
    config: ScGPTConfig,
    allow_missing: Iterable[str] = (),
    source: str | Path = "checkpoint",
) -> dict[str, Tensor]:
    """The file tensors to load, after checking every key by the rule in this module's docstring.

    Raises UserError listing missing, unexpected and wrong-shape keys that the rule
    does not excuse.
    """
    patterns = tuple(allow_missing)
    unused = tuple(unused_heads(config))

    load, ignored, unexpected, wrong_shape = {}, [], [], []
    for key, value in file_state.items():
        if key not in model_state:
            (ignored if key.startswith(unused) else unexpected).append(key)
        elif value.shape != model_state[key].shape:
            wrong_shape.append(key)
        else:
            load[key] = value
    not_loaded = [k for k in model_state if k not in load]
    fresh = [k for k in not_loaded if _may_stay_fresh(k, patterns)]
    missing = [k for k in not_loaded if k not in fresh and k not in wrong_shape]
    wrong_shape = [
        f"{k} {tuple(file_state[k].shape)}!={tuple(model_state[k].shape)}"
        for k in wrong_shape
        if k not in fresh
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{len(keys)} {what} ({_summary(keys)})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("with the wrong shape", wrong_shape),
            )
            if keys
        ]
        raise UserError(
            f"weights in {source} do not fit the model of its args.json: "
            + "; ".join(problems)
            + ". Check that args.json and vocab.json belong to these weights (heads to be"
            " trained from scratch may be named in allow_missing)"
        )
    log.info("loaded %d of %d model tensors", len(load), len(model_state))
    reasons = unused_heads(config)
    for head, keys in ignored_by_head(ignored, config).items():
        log.info(
            "ignored %d tensor(s) of %s* in %s: %s (%s)",
            len(keys),
            head,
            source,
            reasons[head],
            _summary(keys),
        )
    if fresh:
        log.info(
            "left %d tensors at fresh initialisation (allowed by %s): %s",
            len(fresh),
            patterns,
            _summary(fresh),
        )
    return load


def _may_stay_fresh(key: str, patterns: tuple[str, ...]) -> bool:
    if key.startswith(_NEVER_FRESH):
        return False
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _summary(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def save_checkpoint(
    model: ScGPTModel,
    config: ScGPTConfig,
    vocab: Mapping[str, int],
    folder: str | Path,
    *,
    extra_args: Mapping | None = None,
) -> Path:
    """Write args.json, vocab.json, best_model.pt and model.safetensors, all or nothing.

    `extra_args` (e.g. the source checkpoint's args.json) are kept in args.json unless
    the config sets the same key. An existing folder is replaced only once the new one
    is complete.
    """
    if len(vocab) != config.ntoken:
        raise ValueError(f"vocabulary has {len(vocab)} tokens, config.ntoken={config.ntoken}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = make_temp_dir(f".{folder.name}.tmp-", folder.parent)  # the umask's mode
    try:
        args = {**(extra_args or {}), **config.to_args()}
        (tmp / ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")
        (tmp / VOCAB_FILE).write_text(json.dumps(dict(vocab), indent=1) + "\n")
        torch.save(state, tmp / TORCH_FILE)
        save_file(state, tmp / SAFETENSORS_FILE)
        for path in tmp.iterdir():  # safetensors writes -rw------- whatever the umask
            apply_umask(path)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors to %s", len(state), folder)
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and removed last."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)
