"""Builders shared by several test modules (fixtures stay in conftest.py): paths and workflow
runs, raw counts, training cells, the planted scGPT task, probe models, checkpoint folders in
the released format, and a report's stage outputs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from superweights.config import validate_config
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.tokens import split_datasets
from superweights.model.train import ModelSettings, TrainSettings, make_loader
from superweights.quantize_table import MEASURES

# --- paths and workflow runs -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SMALL_CONFIG = ROOT / "tests" / "data" / "small_workflow.yaml"


def run_snakemake(
    workdir: Path, *args: str, config: Path = SMALL_CONFIG
) -> subprocess.CompletedProcess:
    """Run the workflow on the small test config (or `config`) in `workdir`."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


# --- raw counts --------------------------------------------------------------------------


def make_counts_adata(vocab_genes):
    """2,000 cells x 304 genes, 4 cell types with distinct programmes, 6 donors."""
    rng = np.random.default_rng(1)
    n = 2000
    types = rng.integers(0, 4, n)
    means = rng.gamma(0.5, 1.0, (4, len(vocab_genes))) * 3
    counts = rng.poisson(means[types]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "Subclass": pd.Categorical([f"type{t}" for t in types]),
            "Donor ID": [f"H20.33.{i % 6:03d}" for i in range(n)],
            "Used in analysis": np.arange(n) % 50 != 0,
        },
        index=[f"cell{i}" for i in range(n)],
    )
    norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(norm),
        obs=obs,
        var=pd.DataFrame(index=vocab_genes),
        layers={"UMIs": sp.csr_matrix(counts)},
    )


# --- training: synthetic tokenised cells, an interrupted run -----------------------------

TRAIN_CLASSES = ["astro", "micro", "neuron"]
TRAIN_MODEL = ModelSettings(d_model=32, nhead=4, d_hid=64, nlayers=2, dropout=0.1)  # RNG in use
TRAIN_SETTINGS = TrainSettings(epochs=2, lr=1e-3, batch_size=8, max_seq_len=24, warmup_fraction=0.1)


def synthetic_tokenised(genes: list[str], n_cells: int = 600, seed: int = 0) -> ad.AnnData:
    """Cells of 3 types: 6 marker genes at high bins plus ~20 random background genes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TRAIN_CLASSES), n_cells)
    bins = np.zeros((n_cells, len(genes)), np.float32)
    background = np.arange(18, len(genes))
    for i, label in enumerate(labels):
        bins[i, rng.choice(background, 20, replace=False)] = rng.integers(1, 40, 20)
        bins[i, label * 6 : label * 6 + 6] = rng.integers(40, 51, 6)
    obs = donor_split_obs(labels, TRAIN_CLASSES)
    return ad.AnnData(X=sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=genes))


def donor_split_obs(labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Tokenised obs of cells labelled `labels` (indices into `classes`): cell `i` from donor
    `d{i % 5}`, donors d0-d2 training, d3 validation, d4 test."""
    donors = np.arange(len(labels)) % 5
    split = np.array(["train", "train", "train", "val", "test"])[donors]
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(classes)[labels], categories=classes),
            "donor": [f"d{d}" for d in donors],
            "split": pd.Categorical(split, categories=["train", "val", "test"]),
        },
        index=[f"c{i}" for i in range(len(labels))],
    )


def training_cells(vocab) -> ad.AnnData:
    """The tokenised cells of the training tests: `synthetic_tokenised` on 60 vocabulary genes."""
    return synthetic_tokenised([g for g in vocab if g.isalnum() and g.isupper()][:60])


def die_in_epoch_2(real_step, data: ad.AnnData, batch_size: int):
    """A train_step that raises (as a kill would) on the third step of epoch 2."""
    per_epoch = math.ceil((data.obs["split"] == "train").sum() / batch_size)
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    return step


# --- the planted scGPT task --------------------------------------------------------------

GENES = [f"GENE{i}" for i in range(60)]
VOCAB = {g: i for i, g in enumerate(GENES)} | {"<pad>": 60, "<cls>": 61, "<eoc>": 62}
CLASSES = ["astro", "micro", "neuron", "oligo"]
ROW, K = 5, 7  # the planted super weight: layer 0 linear2.weight[ROW, K]
PLANTED = "transformer_encoder.layers.0.linear2"
DONOR_PREFIX = {"train": "T", "val": "V", "test": "D"}


def tokenised(n: int = 800, seed: int = 0) -> ad.AnnData:
    """Binned cells: each type expresses 5 of its 10 marker genes and 4-10 shared genes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 4, n)
    bins = np.zeros((n, len(GENES)), dtype=np.float32)
    for i, t in enumerate(types):
        genes = np.concatenate(
            [rng.choice(10, 5, replace=False) + 10 * t, rng.choice(20, rng.integers(4, 11)) + 40]
        )
        bins[i, genes] = rng.integers(1, 51, len(genes))
    split = np.array(["train", "val", "test", "test"])[np.arange(n) % 4]
    split[: n // 2] = "train"
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([CLASSES[t] for t in types], categories=CLASSES),
            "split": split,
            "Braak": rng.choice(["Braak II", "Braak V"], n),
            # Donors never span splits: test donors D0-D7, training T*, validation V*.
            "donor": [
                DONOR_PREFIX[s] + str(d) for s, d in zip(split, rng.integers(0, 8, n), strict=True)
            ],
        },
        index=[f"cell{i}" for i in range(n)],
    )
    # A stage only donors D0 and D1 reached: too few donors to compare.
    obs["Overall AD neuropathological Change"] = np.where(
        obs["donor"].isin(["D0", "D1"]), "High", "Low"
    )
    return ad.AnnData(X=sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=GENES))


def planted_model(seed: int = 0) -> tuple[ScGPTModel, dict]:
    """A pre-LN classifier with a planted super weight, and a mask per planted parameter.

    The `<cls>` value (0) drives a value-encoder unit, layer 0's LayerNorm gain amplifies it,
    and one MLP unit of layer 0 fires on `<cls>` only; its down-projection weight W[ROW, K]
    turns that into a massive activation in channel ROW of the `<cls>` residual stream. The
    classifier's first units carry a bias of -40 that this activation (about +100) cancels,
    so they are silent without it.
    """
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=len(VOCAB), d_model=32, nhead=4, d_hid=48, nlayers=3, n_cls=4, dropout=0.0,
        pad_token_id=VOCAB["<pad>"], pre_norm=True,
    )  # fmt: skip
    model = ScGPTModel(config)
    frozen = {}

    def plant(param, index, value):
        with torch.no_grad():
            param[index] = value
        frozen.setdefault(param, torch.zeros_like(param, dtype=torch.bool))[index] = True

    values, layer0 = model.value_encoder, model.transformer_encoder.layers[0]
    gate = model.cls_decoder._decoder[0]
    unit, channel = 3, 9
    plant(values.linear1.weight, (unit, 0), -50.0)  # fires for value 0 (<cls>) only
    plant(values.linear1.bias, unit, 10.0)
    plant(values.linear2.weight, (slice(None), unit), 0.0)
    plant(values.linear2.weight, (channel, unit), 5.0)
    plant(layer0.norm2.weight, channel, 10.0)
    plant(layer0.linear1.weight, K, 0.0)
    plant(layer0.linear1.weight, (K, channel), 0.25)
    plant(layer0.linear1.bias, K, -5.0)
    plant(layer0.linear2.weight, (ROW, K), 24.0)
    plant(gate.weight, (slice(None), ROW), 1.0)
    plant(gate.bias, slice(None), -40.0)
    return model, frozen


def train(model: ScGPTModel, frozen: dict, adata: ad.AnnData, epochs: int = 6) -> None:
    """Learn the four-class task of `tokenised` cells; the `frozen` entries stay as planted."""
    settings = TrainSettings(batch_size=32, max_seq_len=17, seed=0)
    data = split_datasets(adata, VOCAB, max_seq_len=17, seed=0, labelled=True)
    loader = make_loader(data["train"], settings, VOCAB["<pad>"], shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
            loss = F.cross_entropy(out["cls_logits"], batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            for param, mask in frozen.items():
                param.grad[mask] = 0.0
            optimizer.step()
    model.eval()


# --- probe models ------------------------------------------------------------------------


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def plant_llama(model, layer: int, row: int, col: int, scale: float = 10.0, weight: float = 3.0):
    """Make input channel `col` of the layer's down_proj spike and route it through W[row, col]."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.up_proj.weight[col] *= scale
        mlp.gate_proj.weight[col] *= scale
        mlp.down_proj.weight[row, col] = weight


def cell_batch(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 59, (4, 20), generator=generator)
    values = torch.randint(0, 51, (4, 20), generator=generator).float()
    pad = torch.zeros(4, 20, dtype=torch.bool)
    pad[1, 12:] = True
    pad[3, 5:] = True
    ids[pad], values[pad] = 59, -2.0
    return {"gene_ids": ids, "values": values, "padding_mask": pad}


# --- checkpoint folders as scGPT releases them -------------------------------------------

HUMAN_ARGS = Path("/work/shared/reference/scgpt_args/scGPT_human.args.json")
CHECKPOINT_VOCAB = {**{f"GENE{i}": i for i in range(197)}, "<pad>": 197, "<cls>": 198, "<eoc>": 199}


def released_args(**changes) -> dict:
    """The official whole-human args.json, two layers instead of twelve for speed."""
    return {**json.loads(HUMAN_ARGS.read_text()), "nlayers": 2, **changes}


def flash_names(state: dict, attn_prefix: str = "self_attn.") -> dict:
    """A state_dict as released checkpoints store it (flash-attn `Wqkv` names)."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("self_attn.in_proj_weight", f"{attn_prefix}Wqkv.weight")
        key = key.replace("self_attn.in_proj_bias", f"{attn_prefix}Wqkv.bias")
        renamed[key] = value.clone()
    return renamed


def write_folder(folder: Path, args: dict, state: dict, vocab: dict = CHECKPOINT_VOCAB) -> Path:
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    torch.save(state, folder / "best_model.pt")
    return folder


def random_model(args: dict, n_cls: int = 0, seed: int = 0) -> ScGPTModel:
    torch.manual_seed(seed)
    model = ScGPTModel(ScGPTConfig.from_args(args, ntoken=len(CHECKPOINT_VOCAB), n_cls=n_cls))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# --- a report's stage outputs, and a headless browser ------------------------------------

DATASET = "demo"
CHROMIUM = Path("/usr/bin/chromium")
CONFIG = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
"""The demo config as the report gets it: defaults filled in."""
FIGURES = (
    "preprocess/qc.png", "finetune/confusion.png", "finetune/training_curve.png",
    "probe/layer_spikes.png", "probe/cell_spikes.png", "ablate/forest.png",
    "ablate/null_histograms.png", "ablate/scaling.png", "ablate/prediction_shift.png",
    "ablate/celltype_effect.png", "persistence/persistence.png", "cells/umap.png",
    "persistence/spikes_over_training.png",
    "quantize/quantize.png", "enrich/L1_12_40/dotplot.png", "enrich/L1_12_40/gsea_top1.png",
    "enrich/L1_12_40/gsea_top2.png", "enrich/L1_12_40/gsea_ad1.png",
)  # fmt: skip


def _write_tsv(root: Path, rel: str, frame: pd.DataFrame | dict) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(frame).to_csv(path, sep="\t", index=False)


def _write_json(root: Path, rel: str, obj: dict) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


CONTROL_SCORE = {
    "candidate": "L1[5,36]", "gene_set": "GO_BP:control set (GO:0000001)", "n_genes": 7,
    "found": True, "probe_rank": 1, "n_accepted": 2, "probe_reason": "accepted",
    "tier": "super weight", "effect": 0.1234, "ci_low": 0.0567, "ci_high": 0.2012,
    "null_mean": 1.2e-6, "p_value": 1 / 60, "q_value": 1 / 60, "p_contribution": 1 / 60,
    "q_contribution": 1 / 60, "recovered_share": 0.97,
    "genes": {"n_ranked": 40, "n_planted_ranked": 2, "ranks": {"CTRLA": 1, "CTRLB": 3},
              "best_rank": 1, "median_rank": 2.0, "auc": 0.97, "p_rank": 0.0021,
              "act_ranks": {"CTRLA": 2, "CTRLB": 1}, "act_best_rank": 1,
              "act_median_rank": 1.5, "act_auc": 1.0},
    "enrichment": {"tested": True, "call": "enriched", "q_all_tests": 0.0123},
    "recovered": True, "traced": True, "enriched": True, "passed": True, "failed_at": None,
    "trace_auc": 0.8, "trace_alpha": 0.05,
}  # fmt: skip
"""A positive control's score.json that passed every check (`control.score_control`)."""


def write_results(results: Path, png: bytes, accepted: bool = True) -> Path:
    """A small, consistent set of stage outputs: 3 cell types, 2 probe rows, 1 confirmed."""
    root = results / DATASET
    types = ["Astrocyte", "Microglia-PVM", "L2/3 IT"]
    steps = [("input", "all", 900), ("qc_flag", "pass", 880), ("min_genes", "pass", 860),
             ("max_mito_fraction", "pass", 850), ("cell_types_and_caps", "kept", 849),
             ("dropped_cell_types", "VLMC", 0), ("genes", "selected", 1201)]  # fmt: skip
    for split, n in (("train", 180), ("val", 60), ("test", 40)):
        steps += [(f"split_{split}", t, n + i) for i, t in enumerate(types)]
    steps += [("donors", "train", 6), ("donors", "val", 2), ("donors", "test", 2)]
    _write_tsv(root, "preprocess/qc.tsv", pd.DataFrame(steps, columns=["step", "group", "count"]))
    _write_json(root, "finetune/metrics.json", {
        "accuracy": 0.912345, "macro_f1": 0.8766, "mean_log_likelihood": -0.31234,
        "per_class_f1": {"Astrocyte": 0.95, "Microglia-PVM": 0.81, "L2/3 IT": None},
        "n_cells": 123, "classes": types, "confusion": [[40, 1, 0], [2, 39, 0], [0, 0, 41]],
        "epochs_run": 4, "best_epoch": 3,
    })  # fmt: skip
    _write_json(root, "finetune/checkpoint/args.json", {
        "embsize": 64, "nheads": 4, "d_hid": 128, "nlayers": 4, "n_layers_cls": 3, "n_cls": 3,
        "dropout": 0.1, "norm_scheme": "post", "finetuned_from": "results/demo/pretrain",
    })  # fmt: skip
    _write_tsv(root, "probe/candidates.tsv", {
        "module": ["transformer_encoder.layers.1.linear2", "transformer_encoder.layers.2.linear2"],
        "layer": [1, 2], "row": [12, 3], "col": [40, 5], "weight": [-2.5, 0.4],
        "input_ratio": [512.3, 40.1], "output_ratio": [320.7, 22.2], "contribution": [0.93, 0.2],
        "cell_type": ["Astrocyte", "Microglia-PVM"], "token_gene": ["<cls>", "APOE"],
        "accepted": [accepted, False],
        "reason": ["accepted" if accepted else "output ratio 320.7 < 1000",
                   "spikes on different tokens (input 3:5, output 4:7); input ratio 40.1 < 100; "
                   "output ratio 22.2 < 100"],
        "n_cells_same_channel": [140, 3], "n_cells": [150, 150],
        "top_genes": ["<cls>:140", "APOE:3"],
    })  # fmt: skip
    _write_json(root, "probe/summary.json", {"found": accepted, "statement": "PROBE STATEMENT X"})
    _write_tsv(root, "probe/layernorm.tsv", {
        "module": ["transformer_encoder.layers.1.norm2"], "layer": [1], "channel": [12],
        "gain": [7.5], "robust_z": [9.1], "median_abs_gain": [1.0], "mad": [0.1],
    })  # fmt: skip
    tested = ["L1[12,40]", "L2[3,5]"]
    _write_tsv(root, "ablate/topk.tsv", {
        "fraction": [1e-6, 1e-3], "k": [1, 8], "effect": [0.02, 0.09], "decides": [True, False],
    })  # fmt: skip
    _write_tsv(root, "ablate/strata.tsv", {
        "candidate": tested[0],
        "stratum": ["cell type", "Overall AD neuropathological Change",
                    "Overall AD neuropathological Change"],
        "value": ["Astrocyte", "High", "Low"], "n_cells": [40, 12, 30], "n_donors": [7, 2, 6],
        "effect": [3.1, np.nan, 2.9], "ci_low": [2.5, np.nan, 2.2], "ci_high": [3.6, np.nan, 3.5],
        "p_value": [1e-4, np.nan, 2e-4], "mde": [0.8, np.nan, 0.9],
        "status": ["compared", "too few donors (2 < 3)", "compared"],
    })  # fmt: skip
    _write_tsv(root, "ablate/trend.tsv", {
        "candidate": [tested[0]], "stratum": ["Overall AD neuropathological Change"],
        "n_donors": [8], "n_stages": [2], "rho": [0.41], "p_value": [0.31], "mde_rho": [0.83],
        "status": ["compared"],
    })  # fmt: skip
    (root / "ablate" / "summary.json").write_text(json.dumps({"expression": "EXPRESSION NOTE"}))
    _write_tsv(root, "persistence/persistence.tsv", {
        "candidate": ["L1[12,40]", "L3[7,7]"], "status": ["persists", "lost in fine-tuning"],
        "activation_status": ["spikes in both", "spikes only before fine-tuning"],
        "tier_in_base": ["super weight", "important weight"],
        "tier_in_finetuned": ["super weight", "not confirmed"],
        "confirmed_in_base": [True, True], "confirmed_in_finetuned": [True, False],
        "weight_base": [-2.6, 1.9], "weight_finetuned": [-2.5, 0.3],
        "relative_change": [0.04, -0.84], "base_effect": [0.8, 0.5], "base_ci_low": [0.6, 0.3],
        "base_ci_high": [1.0, 0.7], "finetuned_effect": [3.89, 0.001],
        "finetuned_ci_low": [3.5, -0.01], "finetuned_ci_high": [4.1, 0.01],
    })  # fmt: skip
    _write_tsv(root, "ablate/confirmed.tsv", {
        "candidate": tested, "module": ["transformer_encoder.layers.1.linear2",
                                        "transformer_encoder.layers.2.linear2"],
        "layer": [1, 2], "row": [12, 3], "col": [40, 5], "weight": [-2.5, 0.4],
        "source": ["probe: accepted" if accepted else "probe: strongest spike, not accepted"] * 2,
        "effect": [3.89, 0.01], "ci_low": [3.5, -0.01], "ci_high": [4.1, 0.03],
        "n_groups": [6, 6], "null_mean": [0.001, 0.002], "null_q95": [0.004, 0.005],
        "n_null": [99, 99], "p_value": [0.01, 0.4], "q_value": [0.02, 0.4], "topk_k": [1, 1],
        "topk_effect": [0.02, 0.02], "recovered": [0.8, np.nan], "confirmed": [accepted, False],
        "tier": ["super weight" if accepted else "not confirmed", "not confirmed"],
        "p_contribution": [0.01, 0.5], "q_contribution": [0.02, 0.5],
        "contribution_null_q95": [0.01, 0.02], "spike_mean": [410.0, 3.0],
        "spike_sd": [12.0, 1.0], "mean_spike_effect": [0.002, 0.0],
        "zero_spike_effect": [3.7, 0.01],
        "reason": ["super weight: REASON ONE" if accepted else "not confirmed: REASON ONE",
                   "rejected: drop 0.01 does not exceed pruning the top-8 weights (0.09)"],
    })  # fmt: skip
    genes = ["GFAP", "AQP4", "APOE", "CLU", "SLC1A2"] + [f"GENE{i}" for i in range(25)]
    _write_tsv(root, "channels/genes.tsv", {
        "candidate": tested[0], "confirmed": accepted, "stratum_type": "all", "stratum": "all",
        "gene": genes, "n_cells": 50, "xw": np.linspace(-22.5, -2.5, 30),
        "abs_xw": np.linspace(22.5, 2.5, 30), "se": 0.1, "null_mean_abs": 1.0,
        "null_sd_abs": 0.5, "z": np.linspace(43, 3, 30), "p_null": 0.02,
        "output_act": np.linspace(-5, -1, 30), "resid_act": 0.5, "ablation_effect": -0.01,
        "rank": np.arange(1, 31),
        "percentile": np.linspace(100, 0, 30),
    })  # fmt: skip
    interest = ["APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2", "CLU", "BIN1"]
    _write_tsv(root, "channels/genes_of_interest.tsv", {
        "candidate": tested[0], "confirmed": accepted,
        "stratum_type": ["all"] * 8 + ["cell type"], "stratum": ["all"] * 8 + ["Astrocyte"],
        "gene": interest + ["APOE"],
        "status": ["ranked", "not in these cells", "not in vocabulary", "ranked", "ranked",
                   "ranked", "ranked", "not in these cells", "ranked"],
        "n_cells": [12, 0, 0, 50, 9, 4, 50, 0, 20],
        "z": [3.1, np.nan, np.nan, 19.9, 2.6, 2.5, 18.0, np.nan, 19.0],
        "p_null": [0.2, np.nan, np.nan, 0.02, 0.3, 0.3, 0.02, np.nan, 0.02],
        "rank": [20, np.nan, np.nan, 3, 28, 30, 4, np.nan, 2],
        "percentile": [34.5, np.nan, np.nan, 93.1, 6.9, 0, 89.7, np.nan, 96.0],
        "n_ranked": 30,
    })  # fmt: skip
    _write_tsv(root, "channels/cls.tsv", {
        "candidate": tested[0], "confirmed": accepted, "stratum_type": ["all", "cell type"],
        "stratum": ["all", "Astrocyte"], "n_cells": [50, 20], "xw": [-41.5, -40.0],
        "abs_xw": [41.5, 40.0], "se": 0.2, "null_mean_abs": 0.3, "null_sd_abs": 0.1,
        "z": [97.7, 95.0], "p_null": 0.02, "output_act": -40.0, "resid_act": 3.0,
    })  # fmt: skip
    _write_tsv(root, "cells/association.tsv", {
        "candidate": tested[0], "gene": ["CLU", "APOE", "GENE3"], "n_cells": 40,
        "n_expressing": [30, 35, 12], "n_groups": 9, "n_donors": 4,
        "partial_r": [0.61, 0.42, 0.03], "null_sd": 0.11, "z": [5.45, 3.73, 0.18],
        "p_null": [1e-5, 2e-4, 0.86], "q": [3e-5, 3e-4, 0.86], "rank": [1, 2, 3],
        "status": "confirmed",
    })  # fmt: skip
    _write_json(root, "cells/summary.json", {"notes": ["CELL NOTE"], "n_cells": 40})
    _write_tsv(root, "base/genes/genes_causal.tsv", {
        "candidate": "L1[12,40]", "confirmed": True, "gene": ["BASEGENE"], "n_cells": [12],
        "n_donors": [6], "expr_effect": [0.3], "expr_z": [4.1], "expr_p_null": [0.02],
        "expr_q": [0.04], "rank": [1],
    })  # fmt: skip
    _write_tsv(root, "genes/genes_causal.tsv", {
        "candidate": tested[0], "confirmed": accepted, "gene": ["CAUSALGENE", "APOE"],
        "n_cells": [40, 35], "n_donors": [7, 7], "path_effect": [0.8, 0.1], "path_z": [9.1, 1.2],
        "path_p_null": [0.02, 0.3], "path_q": [0.04, 0.3], "logp_effect": [0.5, 0.1],
        "logp_q": [0.04, 0.3], "act_effect": [30.0, 1.0], "act_z": [12.0, 0.5],
        "act_q": [0.04, 0.6], "rank": [1, 2],
    })  # fmt: skip
    _write_tsv(root, "enrich/summary.tsv", {
        "candidate": [tested[0]], "confirmed": [accepted],
        "status": ["confirmed" if accepted else "exploratory"], "folder": ["L1_12_40"],
        "n_genes": [30], "n_sets": [120], "n_tests": [240], "n_significant": [4],
        "n_ad_significant": [1], "n_enriched": [4], "n_depleted": [2], "n_ad_enriched": [1],
        "ad_test_n_genes": [12], "ad_test_auc": [0.71], "ad_test_p": [0.004],
        "n_null_rankings": [20], "null_ad_hit_rate": [0.05], "null_any_hit_rate": [0.1],
        "null_ad_test_rate": [0.1], "ad_test_p_null": [0.0476],
        "top_term": ["astrocyte differentiation (GO:0048708)"], "top_library": ["GO_BP"],
        "top_NES": [2.345], "top_FDR": [0.0012], "top_ad_term": ["Alzheimer disease"],
        "top_ad_library": ["KEGG_2021_Human"], "top_ad_NES": [1.9], "top_ad_FDR": [0.03],
        "reason": [""], "n_tests_total": [240],
    })  # fmt: skip
    _write_json(root, "control/score.json", CONTROL_SCORE)
    _write_tsv(root, "base/enrich/summary.tsv", {
        "candidate": ["L0[3,7]"], "confirmed": [True], "status": ["confirmed"],
        "ranking": ["causal"], "folder": ["L0_3_7_causal"], "n_genes": [28], "n_sets": [120],
        "n_tests": [240], "n_significant": [0], "n_ad_significant": [0], "n_enriched": [0],
        "n_depleted": [0], "n_ad_enriched": [0], "top_term": ["base model top term"],
        "reason": [""], "n_tests_total": [240],
    })  # fmt: skip
    _write_tsv(root, "enrich/L1_12_40/prerank.tsv", {
        "library": ["GO_BP", "KEGG_2021_Human"],
        "Term": ["astrocyte differentiation (GO:0048708)", "Alzheimer disease"],
        "size": [18, 25], "ES": [0.8, 0.6], "NES": [2.345, 1.9], "NOM p-val": [1e-5, 1e-3],
        "FDR q-val": [0.0012, 0.03], "Lead_genes": ["GFAP;AQP4", "APOE;APP"],
        "direction": ["positive", "positive"], "q_all_tests": [0.004, 0.04],
        "call": ["enriched", "enriched"],
    })  # fmt: skip
    _write_tsv(root, "enrich/L1_12_40/ad_terms.tsv", {
        "analysis": ["prerank"], "library": ["KEGG_2021_Human"], "Term": ["Alzheimer disease"],
        "size": [25], "NES": [1.9], "FDR q-val": [0.03], "Odds Ratio": [np.nan],
    })  # fmt: skip
    _write_tsv(root, "enrich/L1_12_40/ora.tsv", {
        "library": ["alzheimers_curated"], "Term": ["ORA TERM amyloid clearance"], "size": [12],
        "Overlap": ["3/12"], "Odds Ratio": [8.2], "Combined Score": [40.1], "P-value": [2e-4],
        "Adjusted P-value": [0.004], "Genes": ["APOE;CLU;TREM2"],
    })  # fmt: skip
    nan = np.nan
    rows = [("fp32", "none", 32, "none", nan, "none", -0.31, 0.91, 0.88, 0.0, 0)]
    for block, naive in (("64", 0.85), ("tensor", 0.41)):
        rows += [
            ("weight", "naive", 4, block, nan, "none", -2.0, naive, 0.3, 0.1, 0),
            ("weight", "clip", 4, block, 6.0, "none", -1.0, 0.6, 0.5, 0.2, 12),
            ("weight", "clip_restore", 4, block, 6.0, "none", -0.5, 0.87, 0.8, 0.08, 12),
        ]
    rows += [
        ("w8a8", method, 8, "channel", nan, "tensor", -0.4, acc, 0.86, 0.01, 0)
        for method, acc in (("naive", 0.9), ("holdout", 0.905))
    ]
    columns = ["scheme", "method", "bits", "block_size", "clip_value", "activation_scale"]
    columns += [*MEASURES, "n_clipped"]
    quantized = pd.DataFrame(rows, columns=columns)
    _write_tsv(
        root, "quantize/quantize.tsv", quantized.assign(n_cells=123, n_super_weights=int(accepted))
    )
    contrast = {"scheme": "weight", "bits": 4, "block_size": "tensor", "clip_value": 6.0,
                "measure": "mean_log_likelihood", "n_cells": 123, "n_donors": 4}  # fmt: skip
    _write_tsv(root, "quantize/contrasts.tsv", pd.DataFrame([
        contrast | {"contrast": "restore vs clip", "difference": 0.5, "ci_low": 0.31,
                    "ci_high": 0.72},
        contrast | {"contrast": "restore vs control", "difference": 0.45, "ci_low": -0.02,
                    "ci_high": 0.9},
    ]))  # fmt: skip
    for rel in FIGURES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png)
    return root


PAGE_ERROR = re.compile(r":CONSOLE[:(\]]|Uncaught|Failed to load resource")


def chromium(tmp_path: Path, name: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    profile.mkdir()
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        *args, page.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def page_errors(stderr: str) -> list[str]:
    """Console messages and failed loads of the page; Chromium's own dbus/GPU noise is not."""
    return [line for line in stderr.splitlines() if PAGE_ERROR.search(line)]
