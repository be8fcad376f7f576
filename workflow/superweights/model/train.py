"""Pretraining (masked expression) and cell-type fine-tuning of scGPT models.

Both loops share one resumable trainer: AdamW, linear warm-up then cosine decay, gradient
clipping, early stopping on the validation loss and the best epoch kept. After every
epoch the whole training state (weights, optimiser, scheduler, RNG, history) is written
atomically to a state file; a run started while that file exists continues from it and,
on CPU, ends with the same model as an uninterrupted run. Cells are split by
`obs["split"]`: train to learn, val to stop early, test (fine-tuning only) to report.
With `spike_cells` > 0, a `SpikeMonitor` records the super-weight probe's statistics on
fixed validation cells before training, every `spike_every` steps and after every epoch
(`spikes_over_training.tsv`; its cost is the history's `spike_seconds`).
"""

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ..data.preprocess import class_names, read_tokenised
from ..errors import UserError
from ..outputs import atomic_path, write_text
from ..settings import ModelSettings, TrainSettings
from .args import CellCut
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import SINGLE, RankSlices, World, all_sum, init_world, loss_weight
from .graphed import GraphedSteps, capturable_adamw
from .scgpt import ScGPTConfig, ScGPTModel, flash_attention_available
from .spikes import SPIKES_FILE, SpikeMonitor, fixed_cells, write_spikes
from .tokens import CellDataset, Collate, EpochSampler, data_vocab, mask_values, split_datasets

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_COLUMNS = (
    "epoch", "train_loss", "val_loss", "val_accuracy", "train_seconds", "spike_seconds", "seconds",
)  # fmt: skip
PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each waits for the GPU)
GRAPH_BUCKET = 1024  # tokens: graphed batches are padded to a multiple (few shapes)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _graph_autocast():
    """bf16 autocast inside a CUDA graph capture (no cache of cast weights across it)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def packs(device: torch.device) -> bool:
    """Whether batches run packed (`Packing`): on GPUs where FlashAttention runs."""
    return flash_attention_available(device)


def graph_bucket(device: torch.device, world: World, settings: TrainSettings) -> int:
    """The token bucket of fine-tuning batches replayed from CUDA graphs (see
    `graphed.GraphedSteps`), or 0 where steps run eagerly: other devices, several
    processes, masked-value objectives, or `cuda_graphs` off."""
    if not (settings.cuda_graphs and packs(device) and world.size == 1):
        return 0
    return 0 if settings.mlm_weight > 0 else min(GRAPH_BUCKET, settings.max_seq_len)


@contextlib.contextmanager
def _deterministic(seed: int, device: torch.device):
    """Seed torch and, on CPU, ask for deterministic kernels; the previous mode is restored.

    GPU runs are left to the fast kernels (bf16 training is not bit-reproducible anyway).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(device.type == "cpu" or previous, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# --- data -------------------------------------------------------------------------------


def make_loader(
    dataset: CellDataset,
    settings: TrainSettings,
    pad_id: int,
    shuffle: bool,
    sampler: Sampler | Iterable[int] | None = None,
    world: World = SINGLE,
    pack: bool = False,
    bucket: int = 0,
) -> DataLoader:
    """Batches of padded cells; the sampler (default: seeded EpochSampler) is replaceable.

    With several data-parallel processes, each gets its slice of every global batch.
    `pack`: batches also carry their `Packing` (see `packs`); `bucket`: and come in few
    shapes (see `Collate`).
    """
    if sampler is None:
        sampler = EpochSampler(len(dataset), shuffle, settings.seed)
    width = settings.max_seq_len if bucket else None
    common = {
        "collate_fn": Collate(pad_id, pack=pack, bucket=bucket, width=width),
        "num_workers": settings.num_workers,
        "pin_memory": torch.cuda.is_available(),
    }
    if world.size > 1:
        return DataLoader(
            dataset, batch_sampler=RankSlices(sampler, settings.batch_size, world), **common
        )
    return DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, **common)


def _to(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (and `Packing`) on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _run(model, batch: dict, values: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
    """The model's forward pass on one batch (packed when the batch says so); with the
    classifier head alone, only what the `<cls>` outputs need (see `ScGPTModel.cell_states`)."""
    return model(
        batch["gene_ids"],
        values,
        batch["padding_mask"],
        packing=batch.get("packing"),
        heads=heads,
        cells_only=tuple(heads) == ("cls_logits",),
    )


def _mask_seed(*keys: int) -> int:
    """A mask seed from non-negative keys: (seed, 0, epoch, step) train, (seed, 1, step) val."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# --- objectives -------------------------------------------------------------------------


def _masked_squared_error(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Sum of squared errors over masked positions and their number."""
    diff = pred.float()[mask] - target[mask]
    return (diff * diff).sum(), int(mask.sum())


def _expression_loss(model, batch: dict[str, Tensor], ratio: float, seed: int):
    """GEP (+ GEPC when the model has an MVC head) squared error on masked values."""
    masked, mask = mask_values(batch["values"], batch["padding_mask"], ratio, seed)
    out = _run(model, batch, masked, ("expr", "mvc"))
    total, n = _masked_squared_error(out["expr"], batch["values"], mask)
    if "mvc" in out:
        total = total + _masked_squared_error(out["mvc"], batch["values"], mask)[0]
    return total, n


def _pretrain_loss(settings: TrainSettings):
    def loss(model, batch, seed):
        total, n = _expression_loss(model, batch, settings.mask_ratio, seed)
        return total / max(n, 1)

    return loss


def _finetune_loss(settings: TrainSettings):
    def loss(model, batch, seed):
        values, mask, heads = batch["values"], None, ("cls_logits",)
        if settings.mlm_weight > 0:
            values, mask = mask_values(values, batch["padding_mask"], settings.mask_ratio, seed)
            heads = ("cls_logits", "expr")
        out = _run(model, batch, values, heads)
        total = F.cross_entropy(out["cls_logits"].float(), batch["labels"])
        if mask is not None:
            squared, n = _masked_squared_error(out["expr"], batch["values"], mask)
            total = total + settings.mlm_weight * squared / max(n, 1)
        return total

    return loss


@torch.no_grad()
def evaluate(model: ScGPTModel, loader: DataLoader, device) -> tuple[np.ndarray, np.ndarray]:
    """Classifier logits [N, C] (float32) and labels [N] of every cell the loader yields."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = _to(batch, device)
        with _autocast(torch.device(device)):
            out = _run(model, batch, batch["values"], ("cls_logits",))
        logits.append(out["cls_logits"].float().cpu())
        labels.append(batch["labels"].cpu())
    if not logits:  # a data-parallel rank with no validation cells
        return np.zeros((0, model.config.n_cls), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def classification_metrics(logits, labels, classes: list[str]) -> dict:
    """Accuracy, macro and per-class F1, mean log-likelihood, confusion (rows = true class).

    A class with neither cells nor predictions has F1 None and is left out of the macro
    mean (as scikit-learn does without explicit labels). Confusion and F1 are scikit-learn's.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise UserError("no cells to evaluate; the test split is empty")
    predicted = logits.argmax(axis=1)
    every = np.arange(len(classes))
    confusion = confusion_matrix(labels, predicted, labels=every)
    f1 = f1_score(labels, predicted, labels=every, average=None, zero_division=np.nan)
    return {
        "accuracy": float(np.trace(confusion) / len(labels)),
        "macro_f1": float(np.nanmean(f1)),
        "per_class_f1": {
            c: None if np.isnan(v) else float(v) for c, v in zip(classes, f1, strict=True)
        },
        "mean_log_likelihood": float(_log_softmax(logits)[np.arange(len(labels)), labels].mean()),
        "n_cells": int(len(labels)),
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def _classifier_validation(loader: DataLoader, device, world: World = SINGLE):
    """Validation cross-entropy and accuracy; each rank scores its share of the cells."""

    def validate(model) -> dict:
        logits, labels = evaluate(model, loader, device)
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="sum")
        hits = float((logits.argmax(1) == labels).sum())
        loss_sum, hits, n = all_sum([float(loss), hits, len(labels)], world, device)
        return {"val_loss": loss_sum / n, "val_accuracy": hits / n}

    return validate


def _expression_validation(loader: DataLoader, settings: TrainSettings, device):
    @torch.no_grad()
    def validate(model) -> dict:
        model.eval()
        total, count = 0.0, 0
        for step, batch in enumerate(loader):
            batch = _to(batch, device)
            with _autocast(torch.device(device)):
                squared, n = _expression_loss(
                    model, batch, settings.mask_ratio, _mask_seed(settings.seed, 1, step)
                )
            total, count = total + float(squared), count + n
        return {"val_loss": total / max(count, 1)}

    return validate


# --- the resumable trainer --------------------------------------------------------------


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_step(
    model, batch, loss_fn, seed: int, optimizer, scheduler, settings, device, weight=1.0
) -> Tensor:
    """One optimiser step on one batch (this rank's slice of it, its loss scaled by
    `weight`, see `loss_weight`); returns the loss (a 0-d tensor on `device`: reading it
    waits for the GPU, so the caller does that rarely)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device):
        loss = loss_fn(model, _to(batch, device), seed)
    (loss * weight).backward()
    if settings.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def _fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _save_state(state: dict, path: Path) -> None:
    with atomic_path(path, rollback=False) as tmp:  # kept when the run fails, to resume
        torch.save(state, tmp)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable state only costs a restart
        log.warning("ignoring unreadable training state %s (%s); starting over", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("training state %s is from other data or settings; starting over", path)
        return None
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    epochs_run: int


def _optimizer(
    model: nn.Module, settings: TrainSettings, capturable: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases, norms, embeddings:
    rows of genes absent from the data would otherwise shrink without ever being used);
    the fused kernel on a GPU, `capturable` for CUDA graphs."""
    split: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        split[param.ndim >= 2 and "embedding" not in name].append(param)
    groups = [
        {"params": split[True], "weight_decay": settings.weight_decay},
        {"params": split[False]},
    ]
    device = next(model.parameters()).device
    if capturable:
        return capturable_adamw(groups, settings.lr, device, weight_decay=0.0)
    return torch.optim.AdamW(
        groups, lr=settings.lr, weight_decay=0.0, fused=device.type == "cuda" or None
    )


def _fit(
    model,
    train_loader,
    loss_fn,
    validate,
    settings,
    device,
    state_file,
    fingerprint,
    name,
    world,
    monitor=None,
    graphed: bool = False,
):
    """Train with early stopping; leaves the best epoch's weights in `model`.

    `graphed`: once the optimiser has its state (after the first step, or on resuming),
    steps are replayed from CUDA graphs (`GraphedSteps`; the loader must bucket its
    batches, see `graph_bucket`).

    `monitor` (a `SpikeMonitor`, optional) records before the first step, when it says a
    step is due, and after each epoch's last step; its time is kept out of `train_seconds`.

    With several processes, steps run through DistributedDataParallel (gradients averaged
    over the parameters that require them: freeze heads the loss does not use); `validate`
    must return the same numbers on every rank, so all take the same decisions.
    """
    trained = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    optimizer = _optimizer(model, settings, capturable=graphed)
    graphs = None
    if graphed:
        graphs = GraphedSteps(
            model, lambda m, b: loss_fn(m, b, 0), optimizer, settings.grad_clip, _graph_autocast
        )
    total = settings.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total, settings.warmup_fraction)
    )
    run = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    run |= {"history": [], "best_model": _copy(model)}
    state = _load_state(state_file, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        run = {k: state[k] for k in run}
        if monitor is not None:
            monitor.load_state_dict(state["spikes"])
    steps = len(train_loader)

    while run["epoch"] < settings.epochs and run["bad_epochs"] < settings.patience:
        epoch, start = run["epoch"], time.perf_counter()
        spent = monitor.seconds if monitor is not None else 0.0
        if monitor is not None and epoch == 0:
            monitor.record(model, 0, 0.0)
        for part in (train_loader.sampler, train_loader.batch_sampler, train_loader.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        losses = []
        slices = train_loader.batch_sampler
        global_sizes = slices.global_sizes() if isinstance(slices, RankSlices) else None
        bar = tqdm(  # a bar on a terminal only (disable=None); logs get the epoch line below
            train_loader,
            desc=f"{name} epoch {epoch + 1}/{settings.epochs}",
            leave=False,
            disable=None,
        )
        for step, batch in enumerate(bar):
            seed = _mask_seed(settings.seed, 0, epoch, step)
            weight = 1.0
            if global_sizes is not None:
                weight = loss_weight(len(batch["gene_ids"]), global_sizes[step], world)
            if graphs is not None and optimizer.state:  # the first step made the state
                losses.append(graphs(batch))
                scheduler.step()
            else:
                args = (batch, loss_fn, seed, optimizer, scheduler, settings, device, weight)
                losses.append(train_step(trained, *args))
            if step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
            done = epoch * steps + step + 1
            if monitor is not None and step + 1 < steps and monitor.due(done):
                monitor.record(model, done, done / steps)
        train_loss = float(torch.stack(losses).float().mean())  # waits for the last step
        if not math.isfinite(train_loss):
            raise UserError(
                f"{name} diverged: the mean training loss of epoch {epoch + 1} is {train_loss}; "
                "check the input for non-finite values or lower lr"
            )
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if monitor is not None:
            monitor.record(model, (epoch + 1) * steps, float(epoch + 1))
            row["spike_seconds"] = round(monitor.seconds - spent, 2)
        row["train_seconds"] = round(time.perf_counter() - start - row.get("spike_seconds", 0), 2)
        row |= validate(model)
        row["seconds"] = round(time.perf_counter() - start, 2)
        run["history"].append(row)
        if row["val_loss"] < run["best_val_loss"]:
            run |= {"best_val_loss": row["val_loss"], "best_epoch": epoch + 1, "bad_epochs": 0}
            run["best_model"] = _copy(model)
        else:
            run["bad_epochs"] += 1
        run["epoch"] = epoch + 1
        if world.main:
            _save_state(
                {
                    **run,
                    "fingerprint": fingerprint,
                    "spikes": monitor.state_dict() if monitor is not None else None,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    },
                },
                state_file,
            )
        log.info(
            "%s epoch %d/%d: %d steps, %s", name, epoch + 1, settings.epochs, steps, _describe(row)
        )
    model.load_state_dict(run["best_model"])
    log.info("%s: best epoch %d (val loss %.4f)", name, run["best_epoch"], run["best_val_loss"])
    return FitResult(run["history"], run["best_epoch"], run["epoch"])


def _spike_monitor(adata, vocab, model, settings: TrainSettings, device, phase: str):
    """A `SpikeMonitor` on `spike_cells` validation cells, or None when recording is off."""
    if settings.spike_cells == 0:
        return None
    batches = fixed_cells(
        adata, vocab, model.config.pad_token_id, settings.spike_cells, settings.max_seq_len,
        settings.seed, device,
    )  # fmt: skip
    return SpikeMonitor(batches, vocab, phase, settings.spike_every)


def _write_spikes(monitor, out_dir: Path) -> None:
    """spikes_over_training.tsv: the monitor's rows, or only the header when it was off."""
    write_spikes(monitor.rows if monitor is not None else [], out_dir / SPIKES_FILE)


def _describe(row: dict) -> str:
    timings = ("epoch", "train_seconds", "spike_seconds", "seconds")
    parts = [f"{k} {v:.4f}" for k, v in row.items() if k not in timings]
    spikes = f", {row['spike_seconds']:.1f} s spikes" if "spike_seconds" in row else ""
    return ", ".join(
        [*parts, f"{row['seconds']:.1f} s ({row['train_seconds']:.1f} s training{spikes})"]
    )


def _copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --- outputs ----------------------------------------------------------------------------


def write_history(history: list[dict], path: Path) -> None:
    frame = pd.DataFrame(history).reindex(columns=list(HISTORY_COLUMNS))
    write_text(path, frame.dropna(axis=1, how="all").to_csv(sep="\t", index=False))


def _cut(settings: TrainSettings) -> CellCut:
    """How training cut its cells, recorded in the checkpoint for the stages that follow."""
    return CellCut(settings.max_seq_len, settings.seed)


# --- entry points -----------------------------------------------------------------------


def pretrain(
    tokenised: ad.AnnData | str | Path,
    out_dir: str | Path,
    model_settings: ModelSettings,
    train_settings: TrainSettings,
    vocab: dict[str, int],
    state_file: str | Path | None = None,
) -> Path:
    """Masked expression modelling (GEP, + GEPC with do_mvc) from scratch on train/val cells.

    The model's vocabulary is `data_vocab` of the data's genes; it is saved as the
    checkpoint's vocab.json (map genes through it, not through `var["token_id"]`).
    Writes `out_dir/checkpoint/` (best epoch by val masked MSE, the cells' cut in args.json),
    `out_dir/history.tsv` and `out_dir/spikes_over_training.tsv`; returns the checkpoint
    folder. `state_file` defaults to `out_dir/train_state.pt`.
    """
    settings, out_dir = train_settings, Path(out_dir)
    if settings.mask_ratio <= 0:
        raise UserError("pretraining needs mask_ratio > 0 (share of values to predict)")
    adata = read_tokenised(tokenised)
    vocab = data_vocab(list(map(str, adata.var_names)), vocab)
    world = init_world()
    device = world.device()
    state_file = Path(state_file) if state_file else out_dir / STATE_FILE
    with _deterministic(settings.seed, device):
        config = ScGPTConfig(
            ntoken=len(vocab),
            d_model=model_settings.d_model,
            nhead=model_settings.nhead,
            d_hid=model_settings.d_hid,
            nlayers=model_settings.nlayers,
            dropout=model_settings.dropout,
            pad_token_id=vocab["<pad>"],
            pre_norm=model_settings.pre_norm,
            do_mvc=model_settings.do_mvc,
        )
        model = ScGPTModel(config).to(device)
        data = split_datasets(
            adata, vocab, max_seq_len=settings.max_seq_len, seed=settings.seed, labelled=False
        )
        # Start the expression decoder at the mean bin, not at 0, so the first steps are
        # not spent (and the hidden states not distorted) learning the output scale.
        with torch.no_grad():
            model.decoder.fc[-1].bias.fill_(float(data["train"].values.mean()))
        pad, pack = vocab["<pad>"], packs(device)
        monitor = _spike_monitor(adata, vocab, model, settings, device, "pretrain")
        result = _fit(
            model,
            make_loader(data["train"], settings, pad, shuffle=True, world=world, pack=pack),
            _pretrain_loss(settings),
            _expression_validation(
                make_loader(data["val"], settings, pad, False, pack=pack), settings, device
            ),
            settings,
            device,
            state_file,
            _fingerprint(
                kind="pretrain",
                model=asdict(model_settings),
                train=asdict(settings),
                shape=adata.shape,
                genes=list(adata.var_names),
                vocab=vocab,
            ),
            "pretrain",
            world,
            monitor,
        )
    folder = out_dir / "checkpoint"
    if world.main:
        save_checkpoint(model, config, vocab, folder, extra_args=_cut(settings).to_args())
        write_history(result.history, out_dir / "history.tsv")
        _write_spikes(monitor, out_dir)
        state_file.unlink(missing_ok=True)
    world.barrier()
    return folder


def finetune(
    tokenised: ad.AnnData | str | Path,
    out_dir: str | Path,
    train_settings: TrainSettings,
    init_checkpoint: str | Path,
    state_file: str | Path | None = None,
) -> dict:
    """Cell-type classification from a checkpoint folder; returns the test metrics.

    Writes `out_dir/checkpoint/` (best epoch by val cross-entropy, classes and the cells' cut
    in args.json), `out_dir/history.tsv`, `out_dir/spikes_over_training.tsv` and
    `out_dir/metrics.json` (test donors). `state_file` defaults to `out_dir/train_state.pt`.
    """
    settings, out_dir = train_settings, Path(out_dir)
    if settings.mlm_weight > 0 and settings.mask_ratio <= 0:
        raise UserError("mlm_weight > 0 needs mask_ratio > 0 (share of values to predict)")
    adata = read_tokenised(tokenised)
    classes = class_names(adata)
    world = init_world()
    device = world.device()
    state_file = Path(state_file) if state_file else out_dir / STATE_FILE
    with _deterministic(settings.seed, device):
        model, config, vocab = load_checkpoint(
            init_checkpoint, n_cls=len(classes), allow_missing=("cls_decoder.*",), device=device
        )
        unused = [model.mvc_decoder] if config.do_mvc else []
        if settings.mlm_weight == 0:
            unused.append(model.decoder)
        for head in unused:  # not trained; frozen, so data-parallel ranks skip them
            head.requires_grad_(False)
        data = split_datasets(
            adata, vocab, max_seq_len=settings.max_seq_len, seed=settings.seed, labelled=True
        )
        if len(data["test"]) == 0:
            raise UserError("no cells in split 'test'; preprocess needs more donors")
        pad, pack = config.pad_token_id, packs(device)
        bucket = graph_bucket(device, world, settings)
        model.fuse(bucket > 0)  # graphed steps no longer wait on the host: fusion pays
        val_share = range(world.rank, len(data["val"]), world.size)
        monitor = _spike_monitor(adata, vocab, model, settings, device, "finetune")
        train = make_loader(
            data["train"], settings, pad, True, world=world, pack=pack, bucket=bucket
        )
        result = _fit(
            model,
            train,
            _finetune_loss(settings),
            _classifier_validation(
                make_loader(data["val"], settings, pad, False, val_share, pack=pack),
                device,
                world,
            ),
            settings,
            device,
            state_file,
            _fingerprint(
                kind="finetune",
                train=asdict(settings),
                init=Path(init_checkpoint).resolve(),
                shape=adata.shape,
                genes=list(adata.var_names),
                classes=classes,
            ),
            "finetune",
            world,
            monitor,
            graphed=bucket > 0,
        )
        test = make_loader(data["test"], settings, pad, False, pack=pack)
        logits, labels = evaluate(model, test, device)
    metrics = classification_metrics(logits, labels, classes)
    metrics |= {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "history": result.history,
    }
    log.info(
        "test: accuracy %.4f, macro F1 %.4f over %d cells",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["n_cells"],
    )
    if world.main:
        save_checkpoint(
            model,
            config,
            vocab,
            out_dir / "checkpoint",
            extra_args={
                "classes": classes,
                "finetuned_from": str(init_checkpoint),
                **_cut(settings).to_args(),
            },
        )
        write_history(result.history, out_dir / "history.tsv")
        _write_spikes(monitor, out_dir)
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        state_file.unlink(missing_ok=True)
    world.barrier()
    return metrics
