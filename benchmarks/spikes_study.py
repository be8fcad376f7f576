"""Super activations through training: pretraining (post-LN and pre-LN), then fine-tuning
from a released-format checkpoint with a planted super weight and from the pretrained model.

Every run records `spikes_over_training.tsv` (see `superweights.model.spikes`) on 64 fixed
validation cells; --out gets its figure, every run's table and history joined
(spikes.tsv, histories.tsv, with a `run` column) and `study.json`: per run, the statistics
cost against training time, the largest output ratio at the start and at the end, and each
super weight's value at the start and end; all are rewritten after every run. Data: the
demo generator's SEA-AD-shaped cells (--cells, --genes), preprocessed with every cell kept
and --hvg genes.

    PYTHONPATH=workflow python benchmarks/spikes_study.py --out /tmp/study --work /tmp/work \\
        --cells 3000 --genes 800 --hvg 400 --layers 2 --d-model 64 --pretrain-epochs 1 \\
        --finetune-epochs 1
    PYTHONPATH=workflow python benchmarks/spikes_study.py --out $OUT --work /tmp/work  # GPU
"""

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from superweights.data.demo import write_demo_seaad
from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.vocab import genes_vocab, load_vocab
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.spikes import SPIKES_FILE, read_spikes
from superweights.model.spikes_plots import plot_spikes
from superweights.model.train import ModelSettings, TrainSettings, finetune, pretrain

PLANT = {"layer": 3, "row": 200, "col": 100, "scale": 100.0, "weight": 2.0}


def planted_checkpoint(folder: Path, layers: int, d_model: int, heads: int) -> Path:
    """Random weights at released scGPT layout and vocabulary, one super weight planted:
    hidden unit `col` of the layer's MLP fires `scale` times harder and W2[row, col] is large."""
    torch.manual_seed(0)
    vocab = load_vocab()
    config = ScGPTConfig(ntoken=len(vocab), d_model=d_model, nhead=heads, d_hid=d_model,
                         nlayers=layers, pad_token_id=vocab["<pad>"])  # fmt: skip
    model = ScGPTModel(config)
    layer = model.transformer_encoder.layers[min(PLANT["layer"], layers - 1)]
    with torch.no_grad():
        layer.linear1.weight[PLANT["col"] % d_model] *= PLANT["scale"]
        layer.linear2.weight[PLANT["row"] % d_model, PLANT["col"] % d_model] = PLANT["weight"]
    return save_checkpoint(model, config, vocab, folder)


def summarise(out_dir: Path) -> dict:
    """Cost, ratios at the first and last pass, and tracked super weights' first/last value."""
    history = pd.read_csv(out_dir / "history.tsv", sep="\t")
    spikes = read_spikes(out_dir / SPIKES_FILE)
    layers = spikes[spikes["record"] == "layer"]
    first, last = layers["step"].min(), layers["step"].max()

    def peak(step):
        rows = layers[layers["step"] == step]
        top = rows.loc[rows["ratio_out"].idxmax()]
        return {"layer": int(top.layer), "ratio_out": round(float(top.ratio_out), 1),
                "ratio_in_max": round(float(rows["ratio_in"].max()), 1),
                "resid_ratio_max": round(float(rows["resid_ratio"].max()), 1),
                "token_out": top.token_out}  # fmt: skip

    weights = spikes[(spikes["record"] == "weight") & (spikes["source"] != "candidate")]
    tracked = []
    for (module, row, col), rows in weights.groupby(["module", "row", "col"]):
        rows = rows.sort_values("step")
        tracked.append({"module": module, "row": int(row), "col": int(col),
                        "source": rows["source"].iloc[0], "first": float(rows["weight"].iloc[0]),
                        "last": float(rows["weight"].iloc[-1])})  # fmt: skip
    train_s, spike_s = history["train_seconds"].sum(), history["spike_seconds"].sum()
    return {
        "epochs": len(history), "steps": int(last), "train_seconds": round(train_s, 1),
        "spike_seconds": round(spike_s, 2), "overhead": round(spike_s / train_s, 4),
        "passes": int(layers["step"].nunique()), "start": peak(first), "end": peak(last),
        "accepted_at_end": int((layers[layers["step"] == last]["decision"] == "accepted").sum()),
        "tracked_super_weights": tracked, "val_loss": history["val_loss"].round(4).tolist(),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="figures, study.json and the joined tables")
    p.add_argument("--work", required=True, help="checkpoints and per-run outputs")
    p.add_argument("--cells", type=int, default=40000)
    p.add_argument("--genes", type=int, default=3000)
    p.add_argument("--hvg", type=int, default=2000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--spike-every", type=int, default=100)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    raw = write_demo_seaad(work / "raw.h5ad", n_cells=args.cells, n_genes=args.genes)
    # the streamed HVG score: the GPU machine has no scanpy
    prep = PreprocessSettings(n_hvg=args.hvg, max_cells_per_type=args.cells, hvg_flavor="seurat")
    data, _ = preprocess(raw, prep)
    raw.unlink()
    print(f"data: {data.n_obs} cells x {data.n_vars} genes, {time.perf_counter() - clock:.0f} s")
    train = TrainSettings(max_seq_len=args.seq_len, batch_size=args.batch, patience=99,
                          spike_every=args.spike_every)  # fmt: skip
    pre = replace(train, epochs=args.pretrain_epochs, lr=args.pretrain_lr)
    tune = replace(train, epochs=args.finetune_epochs, batch_size=32)  # project's lr (1e-3)
    model = ModelSettings(d_model=args.d_model, nhead=args.heads, d_hid=args.d_model,
                          nlayers=args.layers, do_mvc=True)  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    study = {"args": vars(args), "plant": PLANT, "device": device, "cells": data.n_obs,
             "genes": data.n_vars}  # fmt: skip
    vocab = genes_vocab(data.var_names)
    planted = planted_checkpoint(work / "planted", args.layers, args.d_model, args.heads)
    jobs = {  # in order of importance, should the device time run out
        "pretrain_post_ln": lambda d: pretrain(data, d, model, pre, vocab),
        "finetune_planted": lambda d: finetune(data, d, tune, planted),
        "pretrain_pre_ln": lambda d: pretrain(data, d, replace(model, pre_norm=True), pre, vocab),
        "finetune_pretrained_post_ln": lambda d: finetune(
            data, d, tune, work / "pretrain_post_ln" / "checkpoint"
        ),
    }
    for name, job in jobs.items():  # results are written after every run
        start = time.perf_counter()
        job(work / name)
        study[name] = summarise(work / name) | {"wall_seconds": round(time.perf_counter() - start)}
        plot_spikes([read_spikes(work / name / SPIKES_FILE)], out / f"{name}.png")
        tables = {n: work / n for n in jobs if n in study}
        for kind, file in (("spikes", SPIKES_FILE), ("histories", "history.tsv")):
            frame = pd.concat([read_spikes(d / file) if kind == "spikes"
                               else pd.read_csv(d / file, sep="\t") for d in tables.values()],
                              keys=list(tables), names=["run", "i"]).reset_index(0)  # fmt: skip
            frame.to_csv(out / f"{kind}.tsv", sep="\t", index=False)
        (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
        print(name, json.dumps(study[name]), flush=True)


if __name__ == "__main__":
    main()
