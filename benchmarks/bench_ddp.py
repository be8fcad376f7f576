"""Data-parallel fine-tuning throughput: 1 GPU vs all visible GPUs (torchrun), one run.

Writes the demo data, preprocesses it, saves a randomly initialised model of the given size
as the starting checkpoint, then fine-tunes it with `superweights finetune` under torchrun
with 1 and with N processes (same global batch). Throughput is train cells per second of the
last epoch (the first includes start-up). Prints a table; also writes it to $OUT if set.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from superweights.data.demo import write_demo_seaad
from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.vocab import load_vocab
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.train import data_vocab
from superweights.outputs import write_h5ad


def prepare(work: Path, args) -> tuple[Path, Path, int]:
    raw = write_demo_seaad(work / "raw.h5ad", n_cells=args.cells)
    tokenised, _ = preprocess(raw, PreprocessSettings())
    write_h5ad(tokenised, work / "tok.h5ad")
    vocab = data_vocab(list(map(str, tokenised.var_names)), load_vocab())
    config = ScGPTConfig(
        ntoken=len(vocab),
        d_model=args.d_model,
        nhead=args.heads,
        d_hid=args.d_model,
        nlayers=args.layers,
        dropout=0.0,
        pad_token_id=vocab["<pad>"],
    )
    save_checkpoint(ScGPTModel(config), config, vocab, work / "init")
    return work / "tok.h5ad", work / "init", int((tokenised.obs["split"] == "train").sum())


def run(n_gpus: int, data: Path, init: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={n_gpus}", "-m", "superweights.cli", "finetune", str(data)]
    cmd += ["--init", str(init), "--out-dir", str(out), "--epochs", str(args.epochs)]
    cmd += ["--batch-size", str(args.batch), "--max-seq-len", str(args.seq_len)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    history = pd.read_csv(out / "history.tsv", sep="\t")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "seconds": float(history["seconds"].iloc[-1]),
        "accuracy": metrics["accuracy"],
        "mean_log_likelihood": metrics["mean_log_likelihood"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=8000)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--seq-len", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 2))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, init, n_train = prepare(work, args)
        rows = {}
        for n in (1, args.gpus):
            rows[n] = run(n, data, init, work / f"ft{n}", args)
            rows[n]["cells_per_s"] = n_train / rows[n]["seconds"]
    base = rows[1]["cells_per_s"]
    lines = [
        f"{n_train} train cells, {args.layers} layers x d {args.d_model}, global batch "
        f"{args.batch}, max {args.seq_len} genes/cell, last of {args.epochs} epochs",
        "",
        "| processes | epoch s | cells/s | scaling | test accuracy | test mean log-lik |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in rows.items():
        lines.append(
            f"| {n} | {row['seconds']:.1f} | {row['cells_per_s']:.0f} | "
            f"{row['cells_per_s'] / base:.2f}x | {row['accuracy']:.4f} | "
            f"{row['mean_log_likelihood']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_ddp.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
