"""Captions of the figures and tables shown to people, each written once.

The HTML report takes its figure captions from `CAPTIONS`; `snakemake --report` takes them
from `workflow/report/<name>.rst`, which `write_rst` generates from `CAPTIONS` (run
`python -m superweights.captions workflow/report` after editing a caption). `{dataset}`
stands for the dataset's name. Captions are plain sentences: they must read the same as
reStructuredText and as HTML text.
"""

import sys
from pathlib import Path

from .genes import GENES_OF_INTEREST

CAPTIONS = {
    "qc_table": "Cells kept at each preprocessing step of {dataset}, then cells per cell type "
    "in the donor-wise train/validation/test splits.",
    "qc_figure": "Cells of {dataset} kept at each QC step (left) and cells per cell type in "
    "the donor-wise splits (right).",
    "finetune_metrics": "Cell-type classification on the held-out test donors of {dataset}: "
    "accuracy, macro-F1, per-class F1 and the mean log-likelihood of the true cell type.",
    "finetune_confusion": "Confusion matrix of the fine-tuned classifier on the test donors; "
    "each row (true cell type) sums to 1.",
    "finetune_curve": "Training and validation loss per fine-tuning epoch, and the "
    "validation accuracy when it was recorded.",
    "probe_candidates": "Super-weight candidates of {dataset} from the probe (accepted = "
    "passed the spike-ratio and contribution thresholds; otherwise the strongest spikes, "
    "tested anyway).",
    "probe_layers": "Largest absolute input and output of each layer's MLP down-projection "
    "over the probed cells, with the layer medians (dotted, log scale); layers with an "
    "accepted candidate are marked.",
    "probe_cells": "Output spike ratio (largest absolute output of the down-projection over "
    "the median, log10) per cell and layer, cells grouped by cell type.",
    "ablate_forest": "Each candidate's effect (mean drop of log p(true cell type) per "
    "held-out cell when the weight is set to 0) with its 95% donor-bootstrap CI and its tier "
    "(super weight, important weight, not confirmed), against the null band (mean to 95th "
    "percentile of magnitude-matched weights of the same matrix), the 95th percentile of "
    "contribution-matched weights and the top-k control.",
    "ablate_nulls": "Effects of both nulls' weights (magnitude-matched and contribution-matched) "
    "as histograms, with the candidate's effect marked and its empirical p and "
    "Benjamini-Hochberg q against each.",
    "ablate_confirmed": "Verdict for every tested candidate: effect, CI, p and q against both "
    "nulls, the top-k control, the activation restore and ablations, its tier and every "
    "condition it failed.",
    "persistence_table": "Every super weight tested in the starting or the fine-tuned model: "
    "its value in both, its effect in both (masked-expression log-likelihood before, log "
    "p(true cell type) after fine-tuning, with donor-bootstrap CIs) and each model's verdict.",
    "persistence_figure": "Super weights before and after fine-tuning: value in the starting "
    "vs the fine-tuned model (left; dashed: unchanged) and effect of pruning in each (right).",
    "spikes_figure": "Super activations over training on fixed validation cells: each layer's "
    "largest down-projection output and input over its layer median, and each tracked super "
    "weight's value over its first recorded value, against training step (pretraining, then "
    "fine-tuning).",
    "ablate_scaling": "Mean drop of log p(true cell type) as each candidate weight is "
    "multiplied by a factor (1 = unchanged); Yu et al. (2024) scaled the super weight of "
    "Llama-7B the same way.",
    "ablate_shift": "Prediction shift when a candidate is pruned: log2 of each cell type's "
    "mean predicted probability, pruned over original.",
    "ablate_celltypes": "Effect of pruning each candidate per cell type: mean drop of log "
    "p(true cell type) in nats (rows: candidates, columns: cell types).",
    "channels_goi": "Rank, percentile, z-score and null p of the genes of interest ("
    + ", ".join(GENES_OF_INTEREST)
    + " and GWAS risk genes) for each super weight: how much more the weight adds at the "
    "gene's token than magnitude-matched null weights of its matrix.",
    "cells_umap": "UMAP of the held-out cells of {dataset} from their <cls> embeddings "
    "(scanpy), coloured by cell type, AD neuropathological change and each candidate's "
    "per-cell effect: the drop of the cell's log p(true cell type) when the weight is set "
    "to 0 (red: the cell depends on the weight).",
    "cells_association": "Genes whose expression goes with the per-cell effect of each "
    "candidate within cell types (Spearman correlation per type, Fisher z, Stouffer over "
    "types), as a z-score against the same statistic for magnitude-matched null weights, "
    "with a two-sided empirical p, the normal p of z and its Benjamini-Hochberg q over the "
    "candidate's genes.",
    "cls_table": "The candidate's contribution x·w at the <cls> token (the cell embedding "
    "that the classifier reads) against magnitude-matched null weights of its matrix.",
    "enrich_dotplot": "gseapy's dot plot of the top gene sets of the preranked GSEA on the gene "
    "z-scores: NES on x, colour log10(1/FDR q-val), dot size = the leading edge's share of "
    "the set.",
    "enrich_gsea": "gseapy's running enrichment score of one gene set along the z-score "
    "ranking, as tested.",
    "quantize_table": "Every quantization setting of {dataset} on the test cells, in fp32: "
    "round-to-nearest weights per arm (naive, clip only, clip + restore the super weights), "
    "bit width, block size and clip threshold, then W8A8 naive and with the super "
    "activation held out; accuracy, mean log p(true cell type), macro-F1, relative weight "
    "error and the number of weights clipped.",
    "quantize_figure": "Round-to-nearest weight quantization of the encoder's linear layers "
    "(asymmetric min/max per block of consecutive weights; 'tensor' = one block per weight "
    "matrix) in the three arms of Yu et al. (2024, Tables 3-4): naive; clip only (outliers "
    "of every quantized matrix clamped before quantizing); clip + restore SW (the same, with "
    "the confirmed super weights put back in full precision). Each clip arm is shown at its "
    "best clip threshold by mean log p(true cell type); the table lists every threshold. The "
    "grey line is the unquantized fp32 model. Bottom row: W8A8 (INT8 weights, INT8 "
    "activations), naive or with the single super activation held out in full precision. "
    "For context only, Yu et al. report for Llama-7B INT4 (average zero-shot accuracy, "
    "original 70.11%) naive vs clip + restore 66.21 vs 66.21 at 128×128-element blocks, "
    "63.41 vs 63.41 at 256×256, 50.51 vs 57.85 at 512×512 and 27.55 vs 45.40 at 1024×1024, "
    "and a W8A8 Wikitext-2 perplexity of 5.68 (FP16), 5.83 (naive) and 5.74 (super "
    "activation held out); scGPT's weight matrices (512×512 in the released models) are far "
    "smaller than Llama's, so the block sizes are not comparable one to one.",
    "pathway_report": "The self-contained pathway report of {dataset}: what was run, what the "
    "probe found, the pruning test against controls, the genes and pathways of the super "
    "channels, and quantization.",
}
HTML_ONLY = ("enrich_dotplot", "enrich_gsea", "cls_table")
"""Captions shown only in the HTML report: figures inside the enrich folder, which
`snakemake --report` does not show, and the `<cls>` table."""


def caption(name: str, dataset: str) -> str:
    """The caption `name` for `dataset`."""
    return CAPTIONS[name].format(dataset=dataset)


def rst_text(name: str) -> str:
    """The text of `workflow/report/<name>.rst`: Snakemake fills in the dataset."""
    return caption(name, "{{ snakemake.wildcards.dataset }}") + "\n"


def write_rst(folder: str | Path) -> list[Path]:
    """Write `<name>.rst` into `folder` for every caption that `snakemake --report` shows."""
    paths = [Path(folder) / f"{name}.rst" for name in CAPTIONS if name not in HTML_ONLY]
    for path in paths:
        path.write_text(rst_text(path.stem), encoding="utf-8")
    return paths


if __name__ == "__main__":
    write_rst(sys.argv[1])
