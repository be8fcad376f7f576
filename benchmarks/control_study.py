"""The spike-in control measured on the demo: plant, fine-tune, probe, confirm, score.

For each seed, a gene set is chosen (`choose_gene_set`) and a super weight planted in the
starting checkpoint (`plant_super_weight`); the copy is fine-tuned with the config's
recipe, probed and confirmed with the config's settings (`probe_checkpoint`, `ablate`: the
pipeline's own numbers), and scored (`score_control`). `--variant spike-only` plants steps
1-3 alone (no sinks), the construction that failed in issue 26. `--baseline CHECKPOINT`
also confirms the planted coordinates in the user's model (fine-tuned from the unplanted
start with the same recipe), where they are ordinary weights. Each run also gets
`describe.json`: accuracy, log-likelihood and `<cls>`'s attention on the sinks with the
weight kept and pruned (`--describe RUN...` computes it for finished runs only).
Everything goes to --out: per run the planted checkpoint, the fine-tuned one, the probe's
and confirmation's tables, and `score.json`; `study.json` collects the scores.

    PYTHONPATH=workflow python benchmarks/control_study.py \\
        --tokenised results/demo/preprocess/tokenised.h5ad \\
        --start results/demo/pretrain/checkpoint --out /tmp/control_study --seeds 0
"""

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from superweights.ablate import ablate, confirm_checkpoint
from superweights.ablate import write_outputs as write_ablation
from superweights.config import stage_settings
from superweights.control import (
    choose_gene_set,
    plant_super_weight,
    read_planted,
    score_control,
    sink_attention,
    training_sample,
)
from superweights.data.preprocess import read_tokenised
from superweights.editing import evaluation, zeroed
from superweights.enrich import load_gene_sets
from superweights.gene_effects import gene_effects
from superweights.gene_effects import write_outputs as write_genes
from superweights.model.checkpoint import load_checkpoint, read_args_and_vocab
from superweights.model.finetuned import load_test_cells
from superweights.model.train import finetune
from superweights.outputs import write_json
from superweights.probe_cells import probe_checkpoint
from superweights.probe_cells import write_outputs as write_probe
from superweights.scores import CellTypeScore
from superweights.settings import ControlSettings

ROOT = Path(__file__).resolve().parents[1]


def run(args, settings, adata, libraries, seed: int, variant: str) -> dict:
    out = args.out / f"{variant}_seed{seed}"
    control = ControlSettings(sinks=variant == "sink", **json.loads(args.control))
    _, vocab = read_args_and_vocab(Path(args.start))
    name, genes = choose_gene_set(libraries, adata, seed, control, vocab)
    started = time.perf_counter()
    planted = plant_super_weight(
        args.start, out / "plant", genes, seed, adata, gene_set=name, settings=control
    )
    timing = {"plant_s": time.perf_counter() - started}
    train = replace(settings["finetune"], epochs=args.epochs or settings["finetune"].epochs)
    started = time.perf_counter()
    metrics = finetune(adata, out / "finetune", train, out / "plant" / "checkpoint")
    timing["finetune_s"] = time.perf_counter() - started
    checkpoint = out / "finetune" / "checkpoint"
    probe = probe_checkpoint(adata, checkpoint, settings["probe"])
    write_probe(probe, out / "probe")
    ablation = ablate(adata, checkpoint, probe.candidates, settings["ablate"])
    write_ablation(ablation, out / "ablate")
    confirmed = ablation.confirmed
    if planted.candidate not in set(confirmed["candidate"]):  # the probe missed it
        direct = confirm_checkpoint(adata, checkpoint, planted.to_frame(), settings["ablate"])
        confirmed = direct.table.assign(source="planted coordinates (probe missed them)")
        confirmed.to_csv(out / "ablate" / "planted_confirmed.tsv", sep="\t", index=False)
    score = score_control(planted, probe.candidates, confirmed)
    score |= {"variant": variant, "seed": seed, "test_accuracy": metrics["accuracy"],
              "epochs_run": metrics["epochs_run"], "sinks": [s.layer for s in planted.sinks],
              "sink_attention": [s.attention for s in planted.sinks], **timing}  # fmt: skip
    if args.baseline:
        score["baseline"] = baseline(adata, settings, planted, args.baseline)
    score["describe"] = describe(out, adata, settings)
    if args.genes:
        score["genes"] = gene_part(out, adata, settings)
    write_json(out / "score.json", score)
    logging.info("%s seed %d: %s", variant, seed, score["statement"])
    return score


def baseline(adata, settings, planted, checkpoint) -> dict:
    """The planted coordinates pruned in a model fine-tuned from the unplanted start."""
    table = confirm_checkpoint(adata, checkpoint, planted.to_frame(), settings["ablate"]).table
    row = table.iloc[0]
    keys = ("weight", "effect", "ci_low", "ci_high", "null_mean", "null_q95", "p_value", "tier")
    return {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in keys}


def describe(out: Path, adata, settings) -> dict:
    """Accuracy and mean log p(true type) of the fine-tuned control with the planted weight
    kept and pruned, and `<cls>`'s attention on the planted genes in each sink layer, in the
    planted checkpoint and the fine-tuned one (kept and pruned), on the confirmation's cells."""
    planted = read_planted(out / "plant")
    ablate_settings = settings["ablate"]
    test = load_test_cells(
        adata, out / "finetune" / "checkpoint", batch_size=ablate_settings.batch_size,
        seed=ablate_settings.seed,
        max_cells=ablate_settings.max_cells, split=ablate_settings.split,
    )  # fmt: skip
    score = CellTypeScore(test.model, test.batches)
    labels = torch.cat([b["labels"] for b in test.batches]).numpy()
    start, _, _ = load_checkpoint(out / "plant" / "checkpoint")
    result = {"n_cells": len(labels)}
    with evaluation(test.model), evaluation(start):
        for name, edits in (("kept", []), ("pruned", [(planted.module, planted.row, planted.col)])):
            with zeroed(test.model, edits):
                logp = score.log_probs(test.model)
                result[name] = {
                    "accuracy": float((logp.argmax(1) == labels).mean()),
                    "log_likelihood": float(logp[np.arange(len(labels)), labels].mean()),
                    "attention": sink_attention(test.model, test.batches, planted),
                }  # fmt: skip
        result["planted_attention"] = sink_attention(start, test.batches, planted)
    ids = torch.tensor(planted.token_ids)
    holds = torch.cat([torch.isin(b["gene_ids"], ids).any(1) for b in test.batches])
    result["cells_with_planted_token"] = float(holds.float().mean())
    write_json(out / "describe.json", result)
    return result


def gene_part(out: Path, adata, settings) -> dict | None:
    """The causal gene ranking of the control's confirmed weights (`gene_effects`, the
    config's `genes:` settings, ablate's null draws) and the planted genes' ranks in it."""
    confirmed = pd.read_csv(out / "ablate" / "confirmed.tsv", sep="\t")
    if not confirmed["confirmed"].any():
        return None
    result = gene_effects(adata, out / "finetune" / "checkpoint", confirmed, settings["genes"],
                          nulls=out / "ablate" / "nulls.tsv")  # fmt: skip
    write_genes(result, out / "genes")
    planted = read_planted(out / "plant")
    return score_control(planted, out / "probe" / "candidates.tsv", confirmed,
                         gene_ranking=result.genes_causal)["genes"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenised", required=True)
    p.add_argument("--start", required=True, help="starting checkpoint (before fine-tuning)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", choices=["sink", "spike-only"], nargs="+", default=["sink"])
    p.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: config's)")
    p.add_argument("--max-train-cells", type=int, default=0, help="0: all")
    p.add_argument("--n-null", type=int, default=0, help="confirmation nulls (0: config's)")
    p.add_argument("--control", default="{}", help="ControlSettings overrides as JSON")
    p.add_argument(
        "--baseline",
        type=Path,
        help="fine-tuned unplanted checkpoint to prune "
        "the planted coordinates in (the user's model)",
    )
    p.add_argument(
        "--describe",
        type=Path,
        nargs="*",
        default=[],
        help="only describe these finished runs (folders with plant/, finetune/)",
    )
    p.add_argument("--genes", action="store_true", help="also rank the genes (gene_effects)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    settings = stage_settings(config)
    if args.n_null:
        settings["ablate"] = replace(settings["ablate"], n_null=args.n_null)
    settings["finetune"] = replace(settings["finetune"], spike_cells=0)
    adata = training_sample(read_tokenised(args.tokenised), args.max_train_cells, 0)
    gene_sets = settings["gene_sets"]
    if gene_sets.resource_dir and not Path(gene_sets.resource_dir).is_absolute():
        gene_sets.resource_dir = str(ROOT / gene_sets.resource_dir)
    if args.describe:
        for out in args.describe:
            found = describe(out, adata, settings)
            if args.genes:
                found["genes"] = gene_part(out, adata, settings)
                write_json(out / "describe.json", found)
            if args.baseline:
                found["baseline"] = baseline(adata, settings, read_planted(out / "plant"),
                                             args.baseline)  # fmt: skip
                write_json(out / "describe.json", found)
            logging.info("%s: %s", out, found)
        return
    libraries = load_gene_sets(gene_sets)
    scores = []
    for variant in args.variant:
        for seed in args.seeds:
            scores.append(run(args, settings, adata, libraries, seed, variant))
            write_json(args.out / "study.json", scores)


if __name__ == "__main__":
    main()
