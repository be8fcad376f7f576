"""Data-parallel fine-tuning throughput: 1 GPU vs N GPUs (torchrun), one run, one table.

Writes a tokenised h5ad of synthetic cells with scGPT-like lengths (each cell expresses a
uniform --min-genes..--seq-len genes, half of them drawn from its class's marker genes, so
the classes can be learnt), saves a randomly initialised model of the given size as the
starting checkpoint, then runs `superweights finetune` under torchrun with 1 and with N
processes at the same global batch. Throughput is training cells per second of the last
epoch's training loop (`train_seconds` in history.tsv; the first epoch includes start-up).
It also times an NCCL all-reduce of the model's gradient size between the N GPUs. Prints a
table; also writes it to $OUT if set.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from superweights.data.vocab import load_vocab
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.tokens import data_vocab
from superweights.outputs import write_h5ad

N_BINS = 51


def synthetic_cells(args) -> ad.AnnData:
    """Cells x genes bins with `label` and `split` (70/15/15) as preprocess writes them."""
    rng = np.random.default_rng(args.seed)
    genes = [g for g in load_vocab() if not g.startswith("<")][: args.genes]
    markers = rng.permutation(args.genes).reshape(args.classes, -1)
    labels = rng.integers(args.classes, size=args.cells)
    rows, cols = [], []
    for cell, label in enumerate(labels):
        n = int(rng.integers(args.min_genes, args.seq_len))  # + <cls> <= seq_len
        own = rng.choice(markers[label], size=min(n // 2, markers.shape[1]), replace=False)
        rest = rng.choice(args.genes, size=n, replace=False)
        chosen = np.unique(np.concatenate([own, rest]))[:n]
        rows.append(np.full(len(chosen), cell)), cols.append(chosen)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    bins = rng.integers(1, N_BINS, size=len(rows)).astype(np.float32)
    x = sp.csr_matrix((bins, (rows, cols)), shape=(args.cells, args.genes))
    split = rng.choice(["train", "val", "test"], size=args.cells, p=[0.7, 0.15, 0.15])
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{i}" for i in labels]), "split": split},
        index=[f"cell{i}" for i in range(args.cells)],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def prepare(work: Path, args) -> tuple[Path, Path, int]:
    cells = synthetic_cells(args)
    write_h5ad(cells, work / "tok.h5ad")
    vocab = data_vocab(list(cells.var_names), load_vocab())
    config = ScGPTConfig(
        ntoken=len(vocab),
        d_model=args.d_model,
        nhead=args.heads,
        d_hid=args.d_model,
        nlayers=args.layers,
        dropout=0.0,
        pad_token_id=vocab["<pad>"],
    )
    model = ScGPTModel(config)
    save_checkpoint(model, config, vocab, work / "init")
    n_params = sum(p.numel() for p in model.parameters())
    return work / "tok.h5ad", work / "init", n_params


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def finetune(n_gpus: int, batch: int, data: Path, init: Path, out: Path, args) -> dict:
    cmd = torchrun(n_gpus) + ["-m", "superweights.cli", "finetune", str(data)]
    cmd += ["--init", str(init), "--out-dir", str(out), "--epochs", str(args.epochs)]
    cmd += ["--batch-size", str(batch), "--max-seq-len", str(args.seq_len)]
    cmd += ["--patience", str(args.epochs), "--lr", "1e-4", "--num-workers", str(args.workers)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    history = pd.read_csv(out / "history.tsv", sep="\t")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "train_seconds": float(history["train_seconds"].iloc[-1]),
        "epoch_seconds": float(history["seconds"].iloc[-1]),
        "accuracy": metrics["accuracy"],
        "mean_log_likelihood": metrics["mean_log_likelihood"],
    }


def allreduce_worker(n_floats: int, out_file: str) -> None:
    """Under torchrun: time an all-reduce of n_floats float32 values (NCCL; gloo on CPU)."""
    import torch.distributed as dist

    rank, cuda = int(os.environ["RANK"]), torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    x = torch.ones(n_floats, device="cuda" if cuda else "cpu")
    for _ in range(3):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    if rank == 0:
        Path(out_file).write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()


def time_allreduce(n_gpus: int, n_floats: int, work: Path) -> float:
    out = work / "allreduce.json"
    cmd = torchrun(n_gpus) + [__file__, "--allreduce-worker", str(n_floats), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(out.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=16000)
    parser.add_argument("--genes", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--min-genes", type=int, default=300)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", default="64,128", help="global batches, comma-separated")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--seq-len", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allreduce-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        allreduce_worker(int(args.allreduce_worker[0]), args.allreduce_worker[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, init, n_params = prepare(work, args)
        n_train = int((ad.read_h5ad(data).obs["split"] == "train").sum())
        allreduce_s = time_allreduce(args.gpus, n_params, work)
        rows = []
        for batch in map(int, args.batch.split(",")):
            for n in (1, args.gpus):
                row = finetune(n, batch, data, init, work / f"ft{batch}_{n}", args)
                row |= {"batch": batch, "n": n, "cells_per_s": n_train / row["train_seconds"]}
                rows.append(row)  # scaling: against the 1-process row of the same batch
                row["scaling"] = row["cells_per_s"] / rows[-2 if n > 1 else -1]["cells_per_s"]
    lines = [
        f"{n_train} train cells ({args.min_genes}-{args.seq_len} genes each), {args.layers} "
        f"layers x d {args.d_model} ({n_params / 1e6:.1f} M parameters), last of "
        f"{args.epochs} epochs, {args.workers} DataLoader workers per process. All-reduce of "
        f"the gradient ({4 * n_params / 1e6:.0f} MB fp32) over {args.gpus} GPUs: "
        f"{1e3 * allreduce_s:.2f} ms ({4 * n_params / allreduce_s / 1e9:.0f} GB/s).",
        "",
        "| global batch | processes | cells per process and step | train s "
        "| epoch s (with validation) | train cells/s | scaling, same global batch "
        "| scaling, same cells per process | test accuracy | test mean log-lik |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    one = {row["batch"]: row["cells_per_s"] for row in rows if row["n"] == 1}
    for row in rows:
        per_process = row["batch"] // row["n"]
        weak = row["cells_per_s"] / one[per_process] if per_process in one else None
        lines.append(
            f"| {row['batch']} | {row['n']} | {per_process} | "
            f"{row['train_seconds']:.1f} | {row['epoch_seconds']:.1f} | "
            f"{row['cells_per_s']:.0f} | {row['scaling']:.2f}x | "
            f"{'—' if weak is None else f'{weak:.2f}x'} | "
            f"{row['accuracy']:.4f} | {row['mean_log_likelihood']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_ddp.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
