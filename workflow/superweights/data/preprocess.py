"""Streaming preprocessing to scGPT tokens: QC, vocabulary mapping, HVG, binning, donor split.

The output h5ad (cells x selected genes) holds:
- `X`: log1p(counts per 10,000), library sizes over all genes, CSR float32;
- `layers["X_binned"]`: scGPT expression bins per cell (0 = not expressed, 1..n_bins-1), the
  model's input; `layers["counts"]`: the raw counts of the selected genes;
- `obs`: the input columns plus `label`, `donor`, `split` (train/val/test, by donor) and
  the QC metrics named as `scanpy.pp.calculate_qc_metrics` names them: `n_genes_by_counts`,
  `total_counts`, `pct_counts_mt` (percent);
- `var`: `token_id` (vocabulary id), `highly_variable`, `gene_of_interest`, `mean_counts`, and
  the HVG score: `variances_norm` (`hvg_flavor` seurat_v3, as scGPT's own preprocessor: scanpy
  on the counts of the chosen cells) or `dispersions_norm` (seurat: scanpy's `seurat` flavour
  on log1p(counts per 10,000), from moments streamed over the chosen training cells);
- `uns["log1p"]`: `{"base": None}` (natural log), scanpy's record that `X` is log1p data;
- `uns["preprocess"]`: the settings, vocabulary and its match rate, dropped cell types,
  label order.

The vocabulary is a checkpoint's vocab.json when one is given: genes it lacks are dropped,
and too small an overlap (`min_vocab_match`) is an error. Without one it is the selected
genes themselves plus scGPT's special tokens (`genes_vocab`), which is what pretraining
from scratch builds its model on: `token_id` is then the gene's position.
"""

import logging
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ..errors import UserError
from ..outputs import named_paths, write_h5ad, write_tsv
from ..settings import SPLITS, PreprocessSettings
from .h5ad_stream import check_counts, find_counts, open_h5ad, read_frame
from .vocab import genes_vocab, load_vocab, mostly_ensembl, vocab_overlap

log = logging.getLogger(__name__)

QC_FLAG_COLUMN = "Used in analysis"
OUTPUT_FILES = {"h5ad": "tokenised.h5ad", "qc": "qc.tsv", "figure": "qc.png"}


def read_tokenised(tokenised: ad.AnnData | str | Path) -> ad.AnnData:
    """The tokenised AnnData (read from a path if needed), checked for `cell_type` and `split`."""
    if isinstance(tokenised, ad.AnnData):
        adata = tokenised
    else:
        try:
            adata = ad.read_h5ad(tokenised)
        except (OSError, KeyError) as err:
            raise UserError(f"cannot read the tokenised data {tokenised}: {err}") from err
    if "cell_type" not in adata.obs and "label" in adata.obs:  # written by earlier versions
        log.warning("the tokenised data names its cell types `label`; reading it as `cell_type`")
        adata.obs = adata.obs.rename(columns={"label": "cell_type"})
    missing = [c for c in ("cell_type", "split") if c not in adata.obs.columns]
    if missing:
        raise UserError(f"tokenised data lacks obs column(s) {missing}; run preprocess first")
    check_donor_split(adata.obs, tokenised if not isinstance(tokenised, ad.AnnData) else "data")
    return adata


def class_names(adata: ad.AnnData) -> list[str]:
    """Class order of `obs["cell_type"]`; at least two classes must occur in training cells."""
    labels = adata.obs["cell_type"].astype("category")
    classes = [str(c) for c in labels.cat.categories]
    in_train = labels[(adata.obs["split"] == "train").to_numpy()].nunique()
    if len(classes) < 2 or in_train < 2:
        raise UserError(
            f"cell-type classification needs two or more classes in the training cells, "
            f"found {in_train} ({', '.join(classes)}); check preprocess.label_column"
        )
    return classes


def check_donor_split(obs: pd.DataFrame, source) -> None:
    """UserError when a donor's cells are in more than one split (test cells would then share
    donors with training cells); without a `donor` column there is nothing to check."""
    if "donor" not in obs.columns:
        return
    splits = obs.groupby(obs["donor"].astype(str), observed=True)["split"].nunique()
    shared = sorted(splits.index[splits > 1])
    if shared:
        named = ", ".join(shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        raise UserError(
            f"the donor split of {source} is broken: donor(s) {named} have cells in more than "
            "one split, so test cells would not be held out; run preprocess again rather than "
            "editing the split"
        )


def bin_row(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT binning of one cell's non-zero values into 1..n_bins-1 (random tie-break)."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    return np.ceil(rng.random(values.size) * (right - left) + left)


def bin_rows(matrix: sp.csr_matrix, n_bins: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Bin every row of a CSR matrix of normalised values; zeros stay zero."""
    binned = matrix.astype(np.float32, copy=True)
    for i in range(binned.shape[0]):
        lo, hi = binned.indptr[i], binned.indptr[i + 1]
        if hi > lo:
            binned.data[lo:hi] = bin_row(binned.data[lo:hi], n_bins, rng)
    return binned


def normalise(counts: sp.csr_matrix, totals: np.ndarray) -> sp.csr_matrix:
    """ln(counts per 10k + 1), with library sizes over all genes."""
    scale = 1e4 / np.maximum(totals, 1)
    out = sp.csr_matrix(sp.diags(scale) @ counts, dtype=np.float32)
    out.data = np.log1p(out.data)
    return out


def gene_symbols(var: pd.DataFrame, vocab: dict[str, int] | None) -> pd.Index:
    """Gene names of the data: the var index, or `feature_name` when that fits better.

    Better: more genes in `vocab`; without a vocabulary, symbols rather than Ensembl IDs.
    """
    names = pd.Index(var.index.astype(str))
    if "feature_name" in var.columns:
        alt = pd.Index(var["feature_name"].astype(str))
        if vocab is not None:
            better = alt.isin(list(vocab)).sum() > names.isin(list(vocab)).sum()
        else:
            better = mostly_ensembl(names) and not mostly_ensembl(alt)
        if better:
            names = alt
    duplicated = names[names.duplicated()].unique()
    if len(duplicated):
        raise UserError(
            f"duplicated gene names in var ({len(duplicated)}, e.g. {list(duplicated[:3])}); "
            "make them unique before preprocessing"
        )
    return names


def split_donors(
    donors: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    strata: dict[str, str] | None = None,
    min_test: int = 3,
) -> dict:
    """Assign whole donors to train/val/test (seeded), stratified by `strata` (donor -> stage).

    Within each stratum of n donors, test gets max(`min_test`, round(test_fraction * n)) and
    val max(1, round(val_fraction * n)) donors while at least one is left for training; a
    stratum of 3 or 4 donors gives one each to test and val, smaller ones one to test (and
    the rest to training). Every split gets at least one donor overall.
    """
    if len(donors) < 3:
        raise UserError(
            f"a donor split needs at least 3 donors, the data has {len(donors)}; "
            "add donors or check preprocess.donor_column"
        )
    groups: dict[str, list[str]] = {}
    for donor in sorted(donors):
        groups.setdefault(str((strata or {}).get(donor, "")), []).append(donor)
    split = {}
    for index, (_, members) in enumerate(sorted(groups.items())):
        order = list(np.random.default_rng([seed, index]).permutation(members))
        n = len(order)
        if n >= min_test + 2:
            n_test = min(max(min_test, round(test_fraction * n)), n - 2)
            n_val = min(max(1, round(val_fraction * n)), n - n_test - 1)
        else:
            n_test, n_val = (1, 1) if n >= 3 else (1, 0)
        split |= {d: "test" for d in order[:n_test]}
        split |= {d: "val" for d in order[n_test : n_test + n_val]}
        split |= {d: "train" for d in order[n_test + n_val :]}
    for needed in ("val", "test", "train"):
        if needed not in split.values():  # take one donor from the largest split
            counts = pd.Series(split).value_counts()
            donor = sorted(d for d, s in split.items() if s == counts.index[0])[0]
            split[donor] = needed
    return split


def seurat_dispersions(
    mean: np.ndarray, var: np.ndarray, n_cells: int, n_bins: int = 20
) -> np.ndarray:
    """scanpy's `seurat` HVG score (`dispersions_norm`) from each gene's moments.

    `mean` and `var` (population variance) are of counts per 10,000 over `n_cells` cells,
    which is what scanpy's `seurat` flavour computes from log1p data (it undoes the log1p):
    log dispersion var/mean (unbiased var), z-scored by mean and standard deviation within
    `n_bins` equal-width bins of log1p(mean); a gene alone in its bin gets 1. Unexpressed
    genes get NaN, as in scanpy.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    var = var * (n_cells / (n_cells - 1)) if n_cells > 1 else var
    with np.errstate(divide="ignore"):
        dispersion = np.log(np.where(var == 0, np.nan, var / mean))
    frame = pd.DataFrame({"dispersion": dispersion, "bin": pd.cut(np.log1p(mean), n_bins)})
    stats = frame.groupby("bin", observed=True)["dispersion"].agg(avg="mean", dev="std")
    alone = stats["dev"].isnull()  # scanpy's _postprocess_dispersions_seurat
    stats.loc[alone, "dev"] = stats.loc[alone, "avg"]
    stats.loc[alone, "avg"] = 0
    per_gene = stats.loc[frame["bin"]]
    return ((frame["dispersion"].to_numpy() - per_gene["avg"].to_numpy())
            / per_gene["dev"].to_numpy())  # fmt: skip


def first_pass(matrix, source, mito, flag, settings):
    """Per-cell QC metrics and which cells pass QC."""
    n_cells = matrix.shape[0]
    n_expr = np.zeros(n_cells, np.int64)
    totals = np.zeros(n_cells, np.float64)
    mito_counts = np.zeros(n_cells, np.float64)
    passed = np.zeros(n_cells, bool)
    chunks = matrix.chunks(settings.chunk_size)
    for start, chunk in tqdm(
        chunks, total=-(-n_cells // settings.chunk_size), desc="QC pass", disable=None
    ):
        check_counts(chunk, source)
        rows = slice(start, start + chunk.shape[0])
        n_expr[rows] = np.diff(chunk.indptr)
        totals[rows] = np.asarray(chunk.sum(axis=1)).ravel()
        mito_counts[rows] = np.asarray(chunk[:, mito].sum(axis=1)).ravel() if mito.size else 0
        frac = mito_counts[rows] / np.maximum(totals[rows], 1)
        ok = (n_expr[rows] >= settings.min_genes) & (frac <= settings.max_mito_fraction)
        passed[rows] = ok & flag[rows]
    metrics = pd.DataFrame(
        {
            "n_genes_by_counts": n_expr,
            "total_counts": totals,
            "pct_counts_mt": 100 * mito_counts / np.maximum(totals, 1),
        }
    )
    return metrics, passed


def gene_moments(
    matrix, rows: np.ndarray, settings, totals: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each gene's counts over the cells `rows`, read chunk by chunk;
    of counts per 10,000 when `totals` (each input cell's library size) is given."""
    gene_sum = np.zeros(matrix.shape[1], np.float64)
    gene_sq = np.zeros(matrix.shape[1], np.float64)
    for start in range(0, matrix.shape[0], settings.chunk_size):
        stop = min(start + settings.chunk_size, matrix.shape[0])
        local = rows[(rows >= start) & (rows < stop)] - start
        if local.size:
            kept = sp.csr_matrix(matrix.rows(start, stop)[local], dtype=np.float64)
            if totals is not None:
                scale = 1e4 / np.maximum(totals[start + local], 1)
                kept = sp.csr_matrix(sp.diags(scale) @ kept)
            gene_sum += np.asarray(kept.sum(axis=0)).ravel()
            gene_sq += np.asarray(kept.multiply(kept).sum(axis=0)).ravel()
    mean = gene_sum / max(len(rows), 1)
    return mean, np.maximum(gene_sq / max(len(rows), 1) - mean**2, 0)


def choose_cells(obs: pd.DataFrame, passed: np.ndarray, settings) -> tuple[np.ndarray, dict]:
    """Drop rare cell types, cap large ones (seeded) and return sorted row indices + report."""
    labels = obs[settings.label_column].astype("string")
    keep = passed & labels.notna().to_numpy() & obs[settings.donor_column].notna().to_numpy()
    counts = labels[keep].value_counts()
    rare = sorted(counts[counts < settings.min_cells_per_type].index)
    if rare:
        log.warning(
            "dropping %d cell types with fewer than %d cells: %s",
            len(rare),
            settings.min_cells_per_type,
            ", ".join(f"{t} ({counts[t]})" for t in rare),
        )
    kept_types = sorted(counts[counts >= settings.min_cells_per_type].index)
    if len(kept_types) < 2:
        raise UserError(
            f"only {len(kept_types)} cell type in '{settings.label_column}' has at least "
            f"{settings.min_cells_per_type} cells after QC; a classifier needs two or more"
        )
    rng = np.random.default_rng(settings.seed)
    chosen = []
    for cell_type in kept_types:
        rows = np.flatnonzero(keep & (labels == cell_type).to_numpy())
        if rows.size > settings.max_cells_per_type:
            rows = rng.choice(rows, settings.max_cells_per_type, replace=False)
        chosen.append(rows)
    return np.sort(np.concatenate(chosen)), {"dropped_cell_types": rare, "cell_types": kept_types}


def read_rows(matrix, rows, genes, settings) -> sp.csr_matrix:
    """Counts of the chosen cells `rows` and columns `genes`, read chunk by chunk."""
    parts = []
    for start in tqdm(
        range(0, matrix.shape[0], settings.chunk_size), desc="read cells", disable=None
    ):
        stop = min(start + settings.chunk_size, matrix.shape[0])
        local = rows[(rows >= start) & (rows < stop)] - start
        if local.size:
            parts.append(sp.csr_matrix(matrix.rows(start, stop)[local][:, genes], dtype=np.float32))
    return sp.vstack(parts, format="csr")


def seurat_v3_variances(counts: sp.csr_matrix) -> np.ndarray:
    """scanpy's seurat_v3 HVG score (`variances_norm`) of each column of raw `counts`."""
    import scanpy as sc

    data = ad.AnnData(X=counts)
    sc.pp.highly_variable_genes(data, flavor="seurat_v3", n_top_genes=1, subset=False)
    return data.var["variances_norm"].to_numpy()


def preprocess(path: str | Path, settings: PreprocessSettings, vocab_path=None):
    """Preprocess an h5ad into a tokenised AnnData and a QC table; reads the input in chunks.

    `vocab_path`: a checkpoint's vocab.json (or folder); None builds one from the data's genes.
    """
    vocab = load_vocab(vocab_path) if vocab_path else None
    with open_h5ad(path) as handle:
        obs = read_frame(handle, "obs")
        var = read_frame(handle, "var")
        for key, column in (("label", settings.label_column), ("donor", settings.donor_column)):
            if column not in obs.columns:
                raise UserError(
                    f"{key} column '{column}' is not in obs (columns: {', '.join(obs.columns)}); "
                    f"set preprocess.{key}_column"
                )
        symbols = gene_symbols(var, vocab)
        if vocab is None:
            in_vocab = np.ones(len(symbols), bool)
            if mostly_ensembl(symbols):
                log.warning(
                    "gene names are Ensembl IDs: genes of interest and gene sets need symbols"
                )
        else:
            in_vocab = vocab_overlap(
                symbols, vocab, settings.min_vocab_match, f"the vocabulary {vocab_path}"
            )
        source, matrix = find_counts(handle, settings.counts_layer)
        if matrix.shape != (len(obs), len(var)):
            raise UserError(f"counts '{source}' shape {matrix.shape} does not match obs x var")
        use_flag = settings.use_qc_flag and QC_FLAG_COLUMN in obs.columns
        flag = obs[QC_FLAG_COLUMN].astype(bool).to_numpy() if use_flag else np.ones(len(obs), bool)
        mito = np.flatnonzero(symbols.str.upper().str.startswith("MT-"))
        metrics, passed = first_pass(matrix, source, mito, flag, settings)
        if not passed.any():
            raise UserError(
                f"every cell was removed by QC (min_genes={settings.min_genes}, "
                f"max_mito_fraction={settings.max_mito_fraction}, use_qc_flag={use_flag})"
            )
        rows, report = choose_cells(obs, passed, settings)
        obs_out = split_cells(obs.iloc[rows].copy(), report["cell_types"], settings)
        train = (obs_out["split"] == "train").to_numpy()
        # Genes are chosen on the training donors' cells only: validation and test cells
        # must not shape the features they are evaluated on.
        if settings.hvg_flavor == "seurat_v3":
            vocab_genes = np.flatnonzero(in_vocab)
            counts = read_rows(matrix, rows, vocab_genes, settings)
            score, mean = np.full(len(symbols), -np.inf), np.zeros(len(symbols))
            score[vocab_genes] = seurat_v3_variances(counts[train])
            mean[vocab_genes] = np.asarray(counts[train].mean(axis=0)).ravel()
            genes, var_out = select_genes(symbols, in_vocab, mean, score, settings)
            counts = counts[:, np.searchsorted(vocab_genes, genes)]
        else:
            totals = metrics["total_counts"].to_numpy()
            score, mean = np.full(len(symbols), -np.inf), np.zeros(len(symbols))
            cp10k_mean, cp10k_var = gene_moments(matrix, rows[train], settings, totals)
            score[in_vocab] = seurat_dispersions(
                cp10k_mean[in_vocab], cp10k_var[in_vocab], int(train.sum())
            )
            genes, var_out = select_genes(symbols, in_vocab, mean, score, settings)
            counts = read_rows(matrix, rows, genes, settings)
            var_out["mean_counts"] = np.asarray(counts[train].mean(axis=0)).ravel()
    logged = normalise(counts, metrics["total_counts"].to_numpy()[rows])
    bins = bin_rows(logged, settings.n_bins, np.random.default_rng(settings.seed))
    for column in metrics.columns:
        obs_out[column] = metrics[column].to_numpy()[rows]
    obs_out.index = obs_out.index.astype(str)

    vocab = vocab or genes_vocab(var_out.index)
    var_out.insert(0, "token_id", [vocab[g] for g in var_out.index])
    layers = {"counts": counts, "X_binned": bins}
    tokenised = ad.AnnData(X=logged, obs=obs_out, var=var_out, layers=layers)
    tokenised.uns["log1p"] = {"base": None}  # X is ln(1 + x), as sc.pp.log1p records it
    tokenised.uns["preprocess"] = {
        **{k: v for k, v in asdict(settings).items()},
        "input": str(path),
        "counts_source": source,
        "vocabulary": str(vocab_path) if vocab_path else "genes of the data",
        "vocab_match_rate": float(in_vocab.mean()),
        "qc_flag_used": use_flag,
        "labels": report["cell_types"],
        "dropped_cell_types": report["dropped_cell_types"],
        "hvg_cells": f"{int(train.sum())} cells of the training donors",
    }
    qc = qc_table(obs, flag, metrics, passed, rows, tokenised, report, settings)
    return tokenised, qc


def split_cells(obs_out: pd.DataFrame, cell_types: list[str], settings) -> pd.DataFrame:
    """The chosen cells with `cell_type` (the label column's values), `donor` and their
    donor's `split`."""
    obs_out["cell_type"] = pd.Categorical(
        obs_out[settings.label_column].astype(str), categories=cell_types
    )
    obs_out["donor"] = obs_out[settings.donor_column].astype(str)
    stage = settings.stratify_column
    strata = (
        obs_out.groupby("donor", observed=True)[stage].first().astype(str).to_dict()
        if stage in obs_out.columns
        else None
    )
    donor_split = split_donors(
        sorted(obs_out["donor"].unique()),
        settings.val_fraction,
        settings.test_fraction,
        settings.seed,
        strata,
        settings.min_test_donors,
    )
    obs_out["split"] = pd.Categorical(obs_out["donor"].map(donor_split), categories=SPLITS)
    return obs_out


def select_genes(symbols, in_vocab, mean, score, settings):
    """The `n_hvg` in-vocabulary genes of highest HVG `score` plus the genes of interest, in
    input order."""
    order = np.argsort(-score, kind="stable")
    hvg = np.zeros(len(symbols), bool)
    hvg[[i for i in order[: settings.n_hvg] if np.isfinite(score[i])]] = True
    interest = np.asarray(symbols.isin(settings.genes_of_interest)) & in_vocab
    missing = sorted(set(settings.genes_of_interest) - set(symbols[interest]))
    if missing:
        log.warning("genes of interest not in the data or vocabulary: %s", ", ".join(missing))
    genes = np.flatnonzero((hvg | interest) & in_vocab)
    name = "variances_norm" if settings.hvg_flavor == "seurat_v3" else "dispersions_norm"
    var_out = pd.DataFrame(
        {
            "highly_variable": hvg[genes],
            "gene_of_interest": interest[genes],
            "mean_counts": mean[genes],
            name: np.where(np.isfinite(score[genes]), score[genes], np.nan),
        },
        index=pd.Index(symbols[genes], name="gene"),
    )
    return genes, var_out


def qc_table(obs, flag, metrics, passed, rows, tokenised, report, settings) -> pd.DataFrame:
    """Cells kept at each step, then cells per split and cell type."""
    n_genes_ok = metrics["n_genes_by_counts"].to_numpy() >= settings.min_genes
    steps = [
        ("input", "all", len(obs)),
        ("qc_flag", "pass", int(flag.sum())),
        ("min_genes", "pass", int((flag & n_genes_ok).sum())),
        ("max_mito_fraction", "pass", int(passed.sum())),
        ("cell_types_and_caps", "kept", len(rows)),
        ("dropped_cell_types", ";".join(report["dropped_cell_types"]) or "none", 0),
        ("genes", "selected", tokenised.n_vars),
    ]
    frame = pd.DataFrame(steps, columns=["step", "group", "count"])
    groups = tokenised.obs.groupby(["split", "cell_type"], observed=False)
    composition = groups.size().reset_index(name="count")
    composition = pd.DataFrame(
        {
            "step": "split_" + composition["split"].astype(str),
            "group": composition["cell_type"].astype(str),
            "count": composition["count"],
        }
    )
    donors = tokenised.obs.groupby("split", observed=False)["donor"].nunique().reset_index()
    donors = pd.DataFrame(
        {"step": "donors", "group": donors["split"].astype(str), "count": donors["donor"]}
    )
    return pd.concat([frame, composition, donors], ignore_index=True)


def run(inputs, outputs, settings: PreprocessSettings) -> tuple[ad.AnnData, pd.DataFrame]:
    """The preprocess stage: `preprocess` `inputs["data"]` with the vocabulary
    `inputs["vocab"]` (a checkpoint's vocab.json or folder; none: the data's own genes);
    write the QC table, its figure (`qc_plot`) and the tokenised h5ad to `outputs`
    (`OUTPUT_FILES`)."""
    from .qc_plot import plot_qc

    paths = named_paths(outputs, OUTPUT_FILES)
    tokenised, qc = preprocess(inputs["data"], settings, inputs.get("vocab") or None)
    write_tsv(paths["qc"], qc)
    plot_qc(qc, paths["figure"])
    write_h5ad(tokenised, paths["h5ad"])
    return tokenised, qc
