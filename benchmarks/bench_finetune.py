"""Fine-tuning throughput (CLS objective) of scGPT 0.2.4 against this project's model.

Rows, all on the same synthetic cells (random gene ids, values = bins 1..50, `<cls>` first,
cell lengths uniform from --min-genes to --seq-len tokens):

  scgpt  scGPT 0.2.4's TransformerModel (PyTorch attention path), fp16 autocast +
         GradScaler, Adam, every batch padded to --seq-len, as in its annotation tutorial;
  same   ScGPTModel, bf16 autocast, otherwise the same recipe and batches;
  packed ScGPTModel packed: only real tokens computed, FlashAttention per cell;
         consecutive cells until --tokens real tokens, default --batch x --seq-len, the
         scgpt row's padded batch; only the classifier head computed, and the last layer
         at the `<cls>` tokens only (`cells_only`); fused AdamW;
  fused  the same with `ScGPTModel.fuse` (elementwise kernels fused by torch.compile);
  graphed  as `superweights finetune` trains on a GPU: --graph-cells cells per step (KEY@N
         sets N), packed into few shapes (`Collate(bucket=1024)`), each step replayed from
         a CUDA graph (`GraphedSteps`; captured for every shape during the warm-up),
         capturable fused AdamW;
  graphed_fused  the same with fused kernels.

Every row takes --warmup untimed steps (kernel selection, allocator warm-up), then trains over the
same timed cells (--steps x --batch). Cells/s and tokens/s count real cells and
non-padding tokens. MFU = model FLOPs (6 x per-token parameters x real tokens +
6 x classifier parameters x cells + 12 x layers x d_model x length² per cell, for the
attention) per second over a bf16 matmul peak measured in the same run.

    PYTHONPATH=workflow python benchmarks/bench_finetune.py --device cpu --layers 2 \\
        --d-model 64 --seq-len 128 --steps 4     # CPU smoke test
    PYTHONPATH=workflow:DEPS python benchmarks/bench_finetune.py  # released size, GPU

DEPS holds scgpt 0.2.4 and tqdm (`pip install --no-deps --target DEPS <wheels>`).
Results are printed as a markdown table and, when --out-dir (default: env OUT) is set,
written to bench_finetune.md and bench_finetune.json there.
"""

import argparse
import gc
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from superweights.model.graphed import GraphedSteps, capturable_adamw
from superweights.model.scgpt import Packing, ScGPTConfig, ScGPTModel
from superweights.model.scgpt_reference import load_reference_module
from superweights.model.tokens import Collate

LR, ADAM_EPS, CLIP_NORM = 1e-4, 1e-4, 1.0  # scGPT's annotation tutorial (eps 1e-4 with AMP)
N_BINS = 51


@dataclass
class Recipe:
    """One row: which model, how it is trained, and how its batches are built."""

    label: str
    build: Callable[[argparse.Namespace], tuple[nn.Module, Callable[[nn.Module, dict], Tensor]]]
    amp_dtype: torch.dtype
    grad_scaler: bool = False
    fused_adamw: bool = False
    packed: bool = False
    fuse: bool = False
    graphed: bool = False


@dataclass
class Cells:
    """Tokenised cells padded to seq_len: `<cls>` first, `<pad>` (value -2) after `lengths`."""

    gene_ids: Tensor
    values: Tensor
    lengths: Tensor
    labels: Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument(
        "--rows",
        default="scgpt,same,packed,graphed,graphed_fused",
        help="comma-separated row keys; KEY@N: N tokens per batch (packed and fused rows) "
        "or N cells per step (graphed rows)",
    )
    p.add_argument("--steps", type=int, default=64, help="timed steps at --batch")
    p.add_argument("--cells", type=int, default=None, help="timed cells (default steps x batch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row")
    p.add_argument("--batch", type=int, default=32, help="batch of the scgpt and same rows")
    p.add_argument("--tokens", type=int, default=None, help="packed rows: tokens per batch")
    p.add_argument("--graph-cells", type=int, default=48, help="graphed rows: cells per step")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-hid", type=int, default=None, help="MLP width (default: d-model)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1200)
    p.add_argument("--min-genes", type=int, default=None, help="shortest cell (default seq/4)")
    p.add_argument("--vocab", type=int, default=60697, help="ntoken; <pad> = vocab - 3")
    p.add_argument("--n-cls", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--peak-size", type=int, default=None, help="matmul size (8192 CUDA, 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.environ.get("OUT"), help="default: env OUT")
    args = p.parse_args(argv)
    args.d_hid = args.d_hid or args.d_model
    args.min_genes = args.min_genes or max(2, args.seq_len // 4)
    args.cells = args.cells or args.steps * args.batch
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.tokens = args.tokens or args.batch * args.seq_len
    unknown = {r.partition("@")[0] for r in args.rows} - set(RECIPES)
    if unknown or not 2 <= args.min_genes <= args.seq_len or args.tokens < args.seq_len:
        p.error(
            f"unknown rows {sorted(unknown)}, --min-genes outside 2..--seq-len or --tokens "
            "below --seq-len"
        )
    return args


def make_cells(n: int, args: argparse.Namespace, g: torch.Generator) -> Cells:
    """Random cells: gene ids from the vocabulary, bins 1..50, lengths uniform."""
    pad_id, cls_id = args.vocab - 3, args.vocab - 2
    lengths = torch.randint(args.min_genes, args.seq_len + 1, (n,), generator=g)
    gene_ids = torch.randint(0, pad_id, (n, args.seq_len), generator=g)
    values = torch.randint(1, N_BINS, (n, args.seq_len), generator=g).float()
    gene_ids[:, 0], values[:, 0] = cls_id, 0.0
    pad = torch.arange(args.seq_len) >= lengths[:, None]
    gene_ids[pad], values[pad] = pad_id, -2.0
    labels = torch.randint(0, args.n_cls, (n,), generator=g)
    return Cells(gene_ids, values, lengths, labels)


def graph_batches(cells: Cells, args: argparse.Namespace) -> list[dict]:
    """Batches of --graph-cells cells in order, as `superweights finetune` makes them for
    CUDA graphs (`Collate` with a bucket), pinned on the host."""
    pad_id = args.vocab - 3
    collate = Collate(pad_id, pack=True, bucket=min(1024, args.seq_len), width=args.seq_len)
    batches = []
    for start in range(0, len(cells.lengths), args.graph_cells):
        stop = min(start + args.graph_cells, len(cells.lengths))
        items = [
            {"gene_ids": cells.gene_ids[i, :n], "values": cells.values[i, :n],
             "label": cells.labels[i]}
            for i, n in zip(range(start, stop), cells.lengths[start:stop].tolist(), strict=True)
        ]  # fmt: skip
        batch = collate(items)
        batch = {k: v.pin_memory() for k, v in batch.items()}
        batch.update(cells=stop - start, tokens=int(cells.lengths[start:stop].sum()))
        batches.append(batch)
    return batches


def make_batches(
    cells: Cells, args: argparse.Namespace, device: torch.device, packed: bool
) -> list[dict]:
    """Batches on `device`, cells in order: --batch cells padded to --seq-len; or, packed,
    consecutive cells up to --tokens real tokens, padded to their longest, with a Packing."""
    n, lengths = len(cells.lengths), cells.lengths.tolist()
    bounds, start = [], 0
    while start < n:
        stop = start + 1
        if packed:
            total = lengths[start]
            while stop < n and total + lengths[stop] <= args.tokens:
                total, stop = total + lengths[stop], stop + 1
        else:
            stop = min(n, start + args.batch)
        bounds.append((start, stop))
        start = stop
    batches = []
    for start, stop in bounds:
        width = max(lengths[start:stop]) if packed else args.seq_len
        padding = torch.arange(width) >= cells.lengths[start:stop, None]
        batch = {
            "gene_ids": cells.gene_ids[start:stop, :width],
            "values": cells.values[start:stop, :width],
            "padding_mask": padding,
            "labels": cells.labels[start:stop],
        }
        if packed:
            batch["packing"] = Packing.from_padding(padding)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch.update(cells=stop - start, tokens=int(cells.lengths[start:stop].sum()))
        batches.append(batch)
    return batches


def build_scgpt(args: argparse.Namespace):
    """scGPT 0.2.4's TransformerModel as its annotation tutorial builds it, without flash-attn."""
    reference = load_reference_module()
    model = reference.TransformerModel(
        ntoken=args.vocab,
        d_model=args.d_model,
        nhead=args.heads,
        d_hid=args.d_hid,
        nlayers=args.layers,
        nlayers_cls=3,
        n_cls=args.n_cls,
        vocab={"<pad>": args.vocab - 3},
        dropout=args.dropout,
        pad_token="<pad>",
        pad_value=-2,
        do_mvc=False,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        input_emb_style="continuous",
        cell_emb_style="cls",
        explicit_zero_prob=False,
        use_fast_transformer=False,
        pre_norm=False,
    )

    def forward(m: nn.Module, b: dict) -> Tensor:
        return m(b["gene_ids"], b["values"], b["padding_mask"], CLS=True)["cls_output"]

    return model, forward


def build_ours(args: argparse.Namespace):
    config = ScGPTConfig(
        ntoken=args.vocab,
        d_model=args.d_model,
        nhead=args.heads,
        d_hid=args.d_hid,
        nlayers=args.layers,
        n_cls=args.n_cls,
        dropout=args.dropout,
        pad_token_id=args.vocab - 3,
    )

    def forward(m: nn.Module, b: dict) -> Tensor:
        packing = b.get("packing")
        cells_only = packing is not None
        out = m(b["gene_ids"], b["values"], b["padding_mask"], packing, ("cls_logits",), cells_only)
        return out["cls_logits"]

    return ScGPTModel(config), forward


RECIPES = {
    "scgpt": Recipe("scGPT 0.2.4", build_scgpt, torch.float16, grad_scaler=True),
    "same": Recipe("ours, same recipe", build_ours, torch.bfloat16),
    "packed": Recipe("ours, packed", build_ours, torch.bfloat16, fused_adamw=True, packed=True),
    "fused": Recipe(
        "ours, packed, fused", build_ours, torch.bfloat16, fused_adamw=True, packed=True, fuse=True
    ),
    "graphed": Recipe(
        "ours, CUDA graphs", build_ours, torch.bfloat16, fused_adamw=True, packed=True, graphed=True
    ),
    "graphed_fused": Recipe(
        "ours, CUDA graphs, fused",
        build_ours,
        torch.bfloat16,
        fused_adamw=True,
        packed=True,
        fuse=True,
        graphed=True,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int) -> float:
    """Measured bf16 matmul FLOP/s for an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 50 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def model_flops(model: nn.Module, cells: Cells, args: argparse.Namespace) -> float:
    """Training FLOPs of the CLS objective over `cells`, counting real tokens only."""
    per_token = sum(
        p.numel() for m in (model.transformer_encoder, model.value_encoder) for p in m.parameters()
    )
    per_cell = sum(p.numel() for p in model.cls_decoder.parameters())
    lengths = cells.lengths.double()
    attention = 12 * args.layers * args.d_model * float((lengths**2).sum())
    return 6 * (per_token * float(lengths.sum()) + per_cell * len(lengths)) + attention


def train_step(model, forward, batch, optimizer, scaler, recipe, device) -> Tensor:
    with torch.autocast(device.type, dtype=recipe.amp_dtype):
        loss = F.cross_entropy(forward(model, batch), batch["labels"])
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def measure(recipe, args, device, warm_cells, timed_cells) -> dict:
    """Build, warm up and time one row."""
    torch.manual_seed(args.seed)
    model, forward = recipe.build(args)
    model.to(device).train()
    if recipe.fuse:
        model.fuse()
    if recipe.graphed:
        optimizer = capturable_adamw(model.parameters(), LR, device, eps=ADAM_EPS, weight_decay=0)
    elif recipe.fused_adamw:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0, fused=True
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, eps=ADAM_EPS)
    scaler = torch.amp.GradScaler(device.type) if recipe.grad_scaler else None
    warm = make_batches(warm_cells, args, device, recipe.packed)[: args.warmup]

    def step(model, batch):
        return train_step(model, forward, batch, optimizer, scaler, recipe, device)

    if recipe.graphed:
        timed = graph_batches(timed_cells, args)
        graphs = GraphedSteps(
            model,
            lambda m, b: F.cross_entropy(forward(m, b), b["labels"]),
            optimizer,
            CLIP_NORM,
            lambda: torch.autocast(device.type, dtype=recipe.amp_dtype, cache_enabled=False),
        )
        tensors = ("gene_ids", "values", "padding_mask", "labels", "packing")

        def step(model, batch):
            return graphs({k: batch[k] for k in tensors})

        shapes = {(tuple(b["gene_ids"].shape), len(b["packing"].index)): b for b in timed}
        warm = warm[:1] + list(shapes.values())  # the first step runs eagerly
    else:
        timed = make_batches(timed_cells, args, device, recipe.packed)

    sync(device)
    start = time.perf_counter()
    for i, batch in enumerate(warm):
        if recipe.graphed and i == 0:
            train_step(model, forward, batch, optimizer, scaler, recipe, device)
        else:
            step(model, batch)
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in timed:
        loss = step(model, batch)
    sync(device)
    seconds = time.perf_counter() - start
    cells = sum(b["cells"] for b in timed)
    tokens = sum(b["tokens"] for b in timed)
    padded_tokens = sum(b["gene_ids"].numel() for b in timed)
    return {
        "batch": batch_label(recipe, args, cells / len(timed), tokens / len(timed)),
        "steps": len(timed),
        "cells": cells,
        "real_tokens": tokens,
        "padded_tokens": padded_tokens,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "cells_per_s": cells / seconds,
        "tokens_per_s": tokens / seconds,
        "model_flops": model_flops(model, timed_cells, args),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "final_loss": float(loss),
    }


def batch_label(recipe: Recipe, args: argparse.Namespace, cells: float, tokens: float) -> str:
    if recipe.graphed:
        return f"{args.graph_cells} cells ({tokens:,.0f} real tokens)"
    if recipe.packed:
        return f"≤ {args.tokens:,} tokens ({cells:.0f} cells)"
    return str(args.batch)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_row(spec, args, device, warm_cells, timed_cells) -> dict:
    """One row (`KEY` or `KEY@N`, see --rows); an exception becomes an error row."""
    key, _, budget = spec.partition("@")
    recipe = RECIPES[key]
    if budget:
        field = "graph_cells" if recipe.graphed else "tokens"
        args = argparse.Namespace(**{**vars(args), field: int(budget)})
    row = {"row": key, "label": recipe.label, "error": None}
    free_memory(device)
    print(f"running {recipe.label} ...", flush=True)
    try:
        result = measure(recipe, args, device, warm_cells, timed_cells)
        row.update(result)
    except Exception as err:
        row["error"] = " ".join(f"{type(err).__name__}: {err}".split())
        traceback.print_exc()
    free_memory(device)
    return row


def add_ratios(rows: list[dict], flops_peak: float) -> None:
    """Add MFU and the cells/s and peak-memory ratios to the scGPT row, where available."""
    ref = next((r for r in rows if r["row"] == "scgpt" and not r["error"]), None)
    for r in rows:
        if r["error"]:
            continue
        mem = r["peak_mem_bytes"]
        r["mfu"] = r["model_flops"] / r["seconds"] / flops_peak
        r["vs_scgpt"] = r["cells_per_s"] / ref["cells_per_s"] if ref else None
        r["mem_vs_scgpt"] = mem / ref["peak_mem_bytes"] if ref and mem else None


def format_table(rows: list[dict]) -> str:
    head = (
        "| row | batch | steps | cells/s | real tokens/s | MFU | peak mem (GiB) "
        "| mem vs scGPT | vs scGPT |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['label']}: failed: {r['error'][:160]} |" + " — |" * 8)
            continue
        mem = r["peak_mem_bytes"]
        cells = [
            r["label"],
            r["batch"],
            str(r["steps"]),
            f"{r['cells_per_s']:,.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{100 * r['mfu']:.1f}%",
            "n/a" if mem is None else f"{mem / 2**30:.2f}",
            "—" if r["mem_vs_scgpt"] is None else f"{r['mem_vs_scgpt']:.2f}×",
            "—" if r["vs_scgpt"] is None else f"{r['vs_scgpt']:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 1024)
    flops_peak = matmul_peak(device, peak_n)
    g = torch.Generator().manual_seed(args.seed)
    timed_cells = make_cells(args.cells, args, g)
    most = max([args.tokens] + [int(r.partition("@")[2] or 0) for r in args.rows])
    warm_cells = make_cells(args.warmup * max(args.batch, most // args.min_genes), args, g)
    real = float(timed_cells.lengths.float().mean())
    header = (
        f"Fine-tuning throughput, CLS objective: {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, d_hid {args.d_hid}, vocab {args.vocab}, {args.n_cls} classes, "
        f"seq len {args.seq_len}; {args.cells} timed cells per row (mean {real:.0f} real "
        f"tokens), {args.warmup} warm-up steps.\n"
        f"Device {name or device.type} ({device}), torch {torch.__version__}; measured bf16 "
        f"{peak_n}³ matmul peak {flops_peak / 1e12:.1f} TFLOP/s (MFU denominator)."
    )
    print(header, flush=True)
    rows = [run_row(key, args, device, warm_cells, timed_cells) for key in args.rows]
    add_ratios(rows, flops_peak)
    table = format_table(rows)
    report = f"{header}\n\n{table}\n"
    print("\n" + report, flush=True)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_finetune.md").write_text(report)
        summary = {
            "device": name,
            "torch": torch.__version__,
            "peak_flops": flops_peak,
            "peak_matmul_size": peak_n,
            "args": vars(args),
            "rows": rows,
        }
        (out / "bench_finetune.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
