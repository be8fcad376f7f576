"""One self-contained HTML report per dataset: what was found, how, and the evidence.

`build_report` reads the stage outputs named in `INPUT_FILES` (the report rule's inputs),
turns them into plain statements, formatted tables and figures embedded as base64 PNG, and
renders `templates/report.html.j2`. The page makes no network request and needs no JavaScript.
Missing optional outputs become a sentence; a missing required one is a `UserError`.
"""

import base64
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import yaml

from . import __version__
from .captions import caption
from .errors import UserError
from .genes import GENES_OF_INTEREST
from .outputs import named_paths, write_text
from .quantize_table import ARM_LABELS, ARMS, compare_arms

TEMPLATE = "report.html.j2"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
INPUT_FILES = {
    "qc": "preprocess/qc.tsv",
    "qc_figure": "preprocess/qc.png",
    "metrics": "finetune/metrics.json",
    "confusion": "finetune/confusion.png",
    "curve": "finetune/training_curve.png",
    "checkpoint": "finetune/checkpoint",
    "candidates": "probe/candidates.tsv",
    "probe_summary": "probe/summary.json",
    "layernorm": "probe/layernorm.tsv",
    "layer_spikes": "probe/layer_spikes.png",
    "cell_spikes": "probe/cell_spikes.png",
    "confirmed": "ablate/confirmed.tsv",
    "topk": "ablate/topk.tsv",
    "strata": "ablate/strata.tsv",
    "trend": "ablate/trend.tsv",
    "ablate_summary": "ablate/summary.json",
    "forest_figure": "ablate/forest.png",
    "nulls_figure": "ablate/null_histograms.png",
    "scaling_figure": "ablate/scaling.png",
    "shift_figure": "ablate/prediction_shift.png",
    "celltype_figure": "ablate/celltype_effect.png",
    "persistence": "persistence/persistence.tsv",
    "persistence_figure": "persistence/persistence.png",
    "spikes_figure": "persistence/spikes_over_training.png",
    "cell_map": "cells/umap.png",
    "association": "cells/association.tsv",
    "cells_summary": "cells/summary.json",
    "genes": "channels/genes.tsv",
    "genes_causal": "genes/genes_causal.tsv",
    "base_genes_causal": "base/genes/genes_causal.tsv",
    "genes_of_interest": "channels/genes_of_interest.tsv",
    "cls": "channels/cls.tsv",
    "enrich": "enrich",
    "base_enrich": "base/enrich",
    "quantize": "quantize/quantize.tsv",
    "quantize_contrasts": "quantize/contrasts.tsv",
    "quantize_figure": "quantize/quantize.png",
    "control": "control/score.json",
}
"""What the report reads: input name -> path under results/<dataset>/ (the report rule's inputs)."""
OPTIONAL_INPUTS = ("control",)
"""Inputs the report rule passes only where their stage runs (an empty input otherwise)."""
REQUIRED = {"qc": "preprocess", "metrics": "finetune", "candidates": "probe", "confirmed": "ablate"}
MAX_ROWS = 25
MAX_TEXT = 90
LONG_TEXT = 40
TOP_GENES = 20
TOP_TERMS = 15
TOP_PERCENTILE = 90.0
CANDIDATE_COLUMNS = [
    "accepted", "layer", "row", "col", "weight", "input_ratio", "output_ratio", "contribution",
    "cell_type", "token_gene", "n_cells_same_channel", "n_cells", "top_genes",
]  # fmt: skip
LAYERNORM_COLUMNS = ["module", "layer", "channel", "gain", "robust_z", "median_abs_gain"]
CONFIRMED_COLUMNS = [
    "candidate", "tier", "weight", "effect", "ci_low", "ci_high", "null_mean", "null_q95",
    "p_value", "q_value", "contribution_null_q95", "p_contribution", "q_contribution",
    "topk_k", "topk_effect", "recovered", "spike_mean", "spike_sd", "mean_spike_effect",
    "zero_spike_effect", "expr_effect",
]  # fmt: skip
TOPK_COLUMNS = ["fraction", "k", "of_weights", "matrices_hit", "effect", "decides"]
CONTRAST_COLUMNS = ["scheme", "bits", "block_size", "contrast", "clip_value", "measure",
                    "difference", "ci_low", "ci_high", "n_donors"]  # fmt: skip
PERSISTENCE_COLUMNS = [
    "candidate", "status", "activation_status", "tier_in_base", "tier_in_finetuned",
    "weight_base", "weight_finetuned", "relative_change", "base_effect", "base_ci_low",
    "base_ci_high", "finetuned_effect", "finetuned_ci_low", "finetuned_ci_high",
]  # fmt: skip
STRATA_COLUMNS = ["candidate", "stratum", "value", "n_cells", "n_donors", "spike_mean",
                  "spike_sd", "effect", "ci_low", "ci_high", "p_value", "mde",
                  "status"]  # fmt: skip
TREND_COLUMNS = ["candidate", "stratum", "n_donors", "n_stages", "rho", "p_value", "mde_rho",
                 "status"]  # fmt: skip
INTEREST_COLUMNS = [
    "candidate", "confirmed", "gene", "status", "n_cells", "token_rank", "n_ranked", "percentile",
    "token_z", "token_p", "assoc_rank", "assoc_z", "assoc_p", "assoc_q",
]  # fmt: skip
TOKEN_COLUMNS = {"rank": "token_rank", "z": "token_z", "p_null": "token_p"}
"""Token-level columns of genes_of_interest.tsv, renamed beside the cell-level ones."""
CLS_COLUMNS = ["candidate", "confirmed", "n_cells", "xw", "abs_xw", "se", "null_mean_abs",
               "null_sd_abs", "z", "p_null"]  # fmt: skip
ASSOCIATION_COLUMNS = ["rank", "gene", "partial_r", "z", "p_null", "q", "n_cells", "n_groups",
                       "n_donors", "n_expressing"]  # fmt: skip
INTEREST_ASSOCIATION = {"z": "assoc_z", "p_null": "assoc_p", "q": "assoc_q",
                        "rank": "assoc_rank"}  # fmt: skip
"""Cell-level association columns (cells/association.tsv) joined to the genes of interest."""
ASSOCIATION_FDR = 0.05
GENE_COLUMNS = [
    "rank", "gene", "z", "p_null", "n_cells", "xw", "abs_xw", "se", "null_mean_abs",
    "null_sd_abs", "ablation_effect",
]  # fmt: skip
ENRICH_SUMMARY_COLUMNS = [
    "candidate", "ranking", "status", "n_genes", "n_sets", "n_tests", "n_enriched", "n_depleted",
    "n_ad_enriched", "top_term", "top_NES", "top_FDR", "ad_test_auc", "ad_test_p",
    "n_null_rankings", "null_ad_hit_rate", "null_ad_test_rate", "ad_test_p_null", "reason",
]  # fmt: skip
ENRICH_TABLES = {
    "prerank": ["status", "library", "Term", "size", "NES", "q_all_tests", "call", "Lead_genes"],
    "ad_terms": ["status", "analysis", "library", "Term", "size", "NES", "Odds Ratio",
                 "q_all_tests", "call"],
    "ora": ["status", "library", "Term", "size", "Overlap", "Odds Ratio", "q_all_tests", "call",
            "Genes"],
}  # fmt: skip
QUANTIZE_COLUMNS = [
    "scheme", "method", "bits", "block_size", "clip_value", "activation_scale",
    "mean_log_likelihood", "accuracy", "macro_f1", "weight_error", "n_clipped",
]  # fmt: skip
PAPER_QUANTIZATION = (
    "Yu et al. (2024), Llama-7B, INT4 round-to-nearest (average zero-shot accuracy, "
    "unquantized 70.11%): holding the super weight out (clip, then restore it) changes nothing "
    "at 128×128-element blocks (66.21 vs 66.21 naive) or 256×256 (63.41 vs 63.41) and recovers "
    "part of the loss at 512×512 (50.51 → 57.85) and 1024×1024 (27.55 → 45.40): larger blocks "
    "become usable when the super weight is held out. W8A8, Wikitext-2 perplexity: 5.68 (FP16), "
    "5.83 naive, 5.74 with the super activation held out."
)
ABLATE_FIGURES = {
    "forest": ("forest_figure", "ablate_forest"),
    "null_histograms": ("nulls_figure", "ablate_nulls"),
    "scaling": ("scaling_figure", "ablate_scaling"),
    "prediction_shift": ("shift_figure", "ablate_shift"),
    "celltype_effect": ("celltype_figure", "ablate_celltypes"),
}
"""Figures of the pruning section: template name -> (input name, caption name)."""
LABELS = {
    "n_cells": "cells",
    "n_genes": "genes",
    "input_ratio": "input spike / median",
    "output_ratio": "output spike / median",
    "contribution": "share of output from W",
    "token_gene": "gene at spike",
    "n_cells_same_channel": "cells spiking on it",
    "n_cell_types_same_channel": "cell types spiking on it",
    "top_genes": "genes at spikes (cells)",
    "log_likelihood": "mean log p(true type)",
    "macro_f1": "macro F1",
    "expr_ll_drop": "drop in expression log-lik.",
    "effect": "drop in log p(true type)",
    "ci_low": "CI low",
    "ci_high": "CI high",
    "null_mean": "null drop (mean)",
    "null_q95": "null drop (95th pct.)",
    "n_null": "null weights",
    "p_value": "p",
    "q_value": "q (BH)",
    "topk_k": "top-k k",
    "topk_effect": "top-k drop",
    "recovered": "recovered by restoring the spike",
    "tier": "verdict",
    "contribution_null_q95": "contribution null drop (95th pct.)",
    "p_contribution": "p (contribution)",
    "q_contribution": "q (contribution)",
    "spike_mean": "activation (mean)",
    "spike_sd": "activation (SD)",
    "mean_spike_effect": "drop, activation set to its mean",
    "mde": "smallest detectable effect",
    "mde_rho": "smallest detectable rho",
    "rho": "Spearman rho",
    "n_stages": "stages",
    "zero_spike_effect": "drop, activation set to 0",
    "of_weights": "of weights",
    "matrices_hit": "matrices hit",
    "expr_effect": "drop in expression log-lik.",
    "expr_z": "z (expression)",
    "expr_p_null": "p (expression, null)",
    "expr_q": "q (expression)",
    "path_effect": "Δ log p(true type) through the gene's token",
    "path_z": "z (through the token)",
    "path_p_null": "p (through the token, null)",
    "path_q": "q (through the token)",
    "logp_effect": "drop in log p(true type) going with the gene",
    "logp_z": "z (Δ log p)",
    "logp_p_null": "p (Δ log p, null)",
    "logp_q": "q (Δ log p)",
    "specificity": "share of the gene effects",
    "act_effect": "super activation going with the gene",
    "act_z": "z (activation)",
    "act_q": "q (activation)",
    "n_donors": "donors",
    "weight_base": "weight before",
    "weight_finetuned": "weight after",
    "relative_change": "relative change",
    "base_effect": "effect before",
    "finetuned_effect": "effect after",
    "robust_z": "robust z",
    "n_ranked": "genes ranked",
    "xw": "mean x·w",
    "abs_xw": "mean |x·w|",
    "se": "s.e. of |x·w|",
    "null_mean_abs": "null mean |x·w|",
    "null_sd_abs": "null sd |x·w|",
    "p_null": "p (null)",
    "ablation_effect": "pruning effect on expr.",
    "mean_log_likelihood": "mean log p(true type)",
    "weight_error": "relative weight error",
    "n_clipped": "weights clipped",
    "n_sets": "sets tested",
    "n_significant": "significant sets",
    "n_ad_significant": "significant AD sets",
    "n_tests": "tests (prerank + ORA)",
    "Lead_genes": "leading-edge genes",
    "Adjusted P-value": "ORA FDR (BH)",
    "FDR q-val": "GSEA FDR q-val",
    "q_all_tests": "q (BH over all tests)",
    "top_FDR": "top q (all tests)",
    "ad_test_auc": "AD test AUC",
    "ad_test_p": "AD test p",
    "null_ad_hit_rate": "null weights hitting AD sets",
    "null_ad_test_rate": "null weights at AD test p ≤ 0.05",
    "ad_test_p_null": "AD test p among null weights",
    "n_expressing": "cells expressing",
    "partial_r": "partial r",
    "n_groups": "donor × type groups",
    "q": "q (BH)",
    "token_rank": "token rank",
    "token_z": "token z",
    "token_p": "token p (null)",
    "assoc_rank": "cell-level rank",
    "assoc_z": "cell-level z",
    "assoc_p": "cell-level p (null)",
    "assoc_q": "cell-level q (BH)",
}


@dataclass
class Table:
    """A table ready to render: header labels, rows of (text, css class) cells, a note."""

    columns: list[str]
    rows: list[dict]
    note: str = ""


@dataclass
class Figure:
    """An embedded figure (`src` a data URI, "" when the file is missing)."""

    src: str
    caption: str
    path: str


@dataclass
class Section:
    """Content of one report section; `missing` holds sentences for absent optional outputs."""

    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    per_candidate: dict[str, Table] = field(default_factory=dict)  # one table per candidate


# --- formatting -------------------------------------------------------------------------


def fmt(value) -> str:
    """A cell as text: 3 significant digits, integers with separators, yes/no, – for missing."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v.is_integer() and abs(v) < 1e6:
            return f"{int(v):,}"
        if 1e3 <= abs(v) < 1e6:
            return f"{float(f'{v:.3g}'):,.0f}"
        return f"{v:.3g}"
    return str(value)


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def make_table(
    frame: pd.DataFrame,
    columns: list[str] | None = None,
    source: str = "",
    max_rows: int = MAX_ROWS,
    full_text: tuple[str, ...] = (),
    highlight: frozenset[str] = frozenset(),
    row_class=None,
) -> Table:
    """Render `frame` (its `columns` that exist, in that order) as a `Table`.

    Rows whose `gene` is in `highlight` get class "goi"; `row_class(row)` may add another.
    Cells are classed "num" (numbers) or "long" (text longer than `LONG_TEXT`).
    Text is cut at `MAX_TEXT` characters except in `full_text` columns; more than
    `max_rows` rows are cut with a note naming `source`.
    """
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    rows = []
    for record in frame.head(max_rows).to_dict("records"):
        cells = []
        for column in columns:
            value = record[column]
            numeric = isinstance(value, int | float | np.number) and not isinstance(value, bool)
            text = fmt(value) if column in full_text else _clip(fmt(value))
            cls = "num" if numeric else "long" if len(text) > LONG_TEXT else ""
            cells.append((text, cls))
        classes = ["goi" if record.get("gene") in highlight else ""]
        classes.append(row_class(record) if row_class else "")
        rows.append({"cells": cells, "cls": " ".join(c for c in classes if c)})
    note = ""
    if len(frame) > max_rows:
        note = f"Showing the first {max_rows} of {len(frame):,} rows; the full table is {source}."
    labels = [LABELS.get(c, c.replace("_", " ")) for c in columns]
    return Table(labels, rows, note)


def key_value_table(pairs: list[tuple[str, object]]) -> Table:
    """A two-column table of labelled values."""
    frame = pd.DataFrame({"measure": [k for k, _ in pairs], "value": [v for _, v in pairs]})
    return make_table(frame.astype(object), max_rows=len(frame))


def flags(series: pd.Series) -> pd.Series:
    """Booleans from a column of True/False (bools or their text)."""
    return series.map(
        lambda v: bool(v) if isinstance(v, bool | np.bool_) else str(v).strip().lower() == "true"
    ).astype(bool)


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


# --- reading ----------------------------------------------------------------------------


class Results:
    """The report's inputs (`INPUT_FILES`) of one dataset, read on demand.

    `inputs`: the folder results/<dataset>, or the inputs by name (the rule's `input`). A key
    is an input name, followed for a folder by a path inside it: "enrich/summary.tsv".
    """

    def __init__(self, inputs, dataset: str):
        files = INPUT_FILES
        if not isinstance(inputs, str | os.PathLike):
            given = {k for k, v in inputs.items() if not (isinstance(v, list) and not v)}
            self.not_run = {k for k in OPTIONAL_INPUTS if k not in given}
            files = {k: v for k, v in INPUT_FILES.items() if k not in self.not_run}
            inputs = {k: v for k, v in inputs.items() if k in given}
        else:
            self.not_run = set()
        self.paths = named_paths(inputs, files)
        self.dataset = dataset

    def path(self, key: str) -> Path:
        name, _, inside = key.partition("/")
        if name in self.not_run:
            return Path(os.devnull)  # never a file: read as missing
        return self.paths[name] / inside if inside else self.paths[name]

    def label(self, key: str) -> str:
        return str(self.path(key))

    def _check(self, key: str, required: bool) -> bool:
        if self.path(key).is_file():
            return True
        if required:
            raise UserError(
                f"the report needs {self.path(key)}, which is missing; "
                f"run the {REQUIRED.get(key, 'producing')} stage first"
            )
        return False

    def tsv(self, key: str, required: bool = False) -> pd.DataFrame | None:
        if not self._check(key, required):
            return None
        try:
            return pd.read_csv(self.path(key), sep="\t")
        except pd.errors.EmptyDataError:
            if required:
                raise UserError(f"the report needs {self.path(key)}, which is empty") from None
            return pd.DataFrame()

    def json(self, key: str, required: bool = False) -> dict | None:
        if not self._check(key, required):
            return None
        try:
            return json.loads(self.path(key).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{self.path(key)} is not valid JSON ({err})") from None

    def figure(self, key: str, caption_name: str) -> Figure:
        """The figure `key`, embedded, with the caption `caption_name` of `captions`."""
        path = self.path(key)
        src = ""
        if path.is_file():
            src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Figure(src, caption(caption_name, self.dataset), self.label(key))

    def links(self, page_dir: Path, *keys: str) -> list[tuple[str, str]]:
        """(file name, path relative to the page's folder) of the existing files `keys`."""
        return [
            (self.path(k).name, os.path.relpath(self.path(k), page_dir))
            for k in keys
            if self.path(k).is_file()
        ]

    def missing(self, key: str, what: str) -> str:
        return f"{what} ({self.label(key)} is missing)."


def _need_columns(frame: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise UserError(f"{where} lacks column(s) {absent}; rerun the stage that writes it")


# --- sections ---------------------------------------------------------------------------


def _split_summary(qc: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Cells per split and cell type, a per-split overview, and the number of genes."""
    split_rows = qc[qc["step"].str.startswith("split_")]
    composition = split_rows.assign(split=split_rows["step"].str.removeprefix("split_")).pivot(
        index="group", columns="split", values="count"
    )
    composition = composition.reindex(
        columns=[s for s in ("train", "val", "test") if s in composition]
    )
    composition = composition.fillna(0).astype(int)
    donors = qc[qc["step"] == "donors"].set_index("group")["count"]
    genes = qc.loc[qc["step"] == "genes", "count"]
    n_genes = int(genes.iloc[0]) if len(genes) else 0
    overview = pd.DataFrame(
        {
            "split": composition.columns,
            "cells": [int(composition[s].sum()) for s in composition],
            "cell types": [int((composition[s] > 0).sum()) for s in composition],
            "donors": [donors.get(s, np.nan) for s in composition],
            "genes": n_genes,
        }
    )
    composition = composition.rename_axis("cell type").reset_index()
    composition["all"] = composition.drop(columns="cell type").sum(axis=1)
    return composition, overview, n_genes


def _qc_steps(qc: pd.DataFrame, settings: dict) -> pd.DataFrame:
    names = {
        "input": "cells in the input",
        "qc_flag": "cells passing the source's QC flag",
        "min_genes": f"cells with at least {settings.get('min_genes', '?')} genes detected",
        "max_mito_fraction": "cells with a mitochondrial fraction of at most "
        f"{fmt(settings.get('max_mito_fraction', math.nan))}",
        "cell_types_and_caps": "cells kept after dropping rare cell types and capping large ones",
        "dropped_cell_types": "cell types dropped (too few cells)",
        "genes": "genes selected (highly variable + genes of interest)",
    }
    steps = qc[~qc["step"].str.startswith("split_") & (qc["step"] != "donors")]
    dropped = steps["step"] == "dropped_cell_types"
    return pd.DataFrame(
        {
            "step": steps["step"].map(names).fillna(steps["step"]),
            "count": steps["count"].where(~dropped, steps["group"]).astype(object),
        }
    )


def data_section(res: Results, dataset: str, config: dict) -> tuple[Section, dict]:
    """Dataset, QC, splits, model architecture, test metrics and the config."""
    qc = res.tsv("qc", required=True)
    _need_columns(qc, ("step", "group", "count"), res.label("qc"))
    metrics = res.json("metrics", required=True)
    absent = [k for k in ("accuracy", "macro_f1", "mean_log_likelihood") if k not in metrics]
    if absent:
        raise UserError(f"{res.label('metrics')} lacks {absent}; rerun finetune")
    composition, overview, n_genes = _split_summary(qc)
    sec = Section()
    sec.tables["steps"] = make_table(_qc_steps(qc, config.get("preprocess", {})), max_rows=50)
    sec.tables["splits"] = make_table(overview)
    sec.tables["composition"] = make_table(composition, max_rows=60)
    classes = metrics.get("classes", [])
    confusion = np.asarray(metrics.get("confusion", []))
    support = dict(zip(classes, confusion.sum(axis=1), strict=False)) if confusion.ndim == 2 else {}
    per_class = pd.DataFrame(
        [(c, f, support.get(c, np.nan)) for c, f in metrics.get("per_class_f1", {}).items()],
        columns=["cell type", "F1", "test cells"],
    ).astype(object)
    sec.tables["metrics"] = key_value_table(
        [
            ("accuracy", metrics["accuracy"]),
            ("macro F1", metrics["macro_f1"]),
            ("mean log p(true cell type)", metrics["mean_log_likelihood"]),
            ("test cells", metrics.get("n_cells")),
            (
                "epochs run (best epoch)",
                f"{metrics.get('epochs_run')} ({metrics.get('best_epoch')})",
            ),
        ]
    )
    sec.tables["per_class"] = make_table(per_class, max_rows=100)
    args = res.json("checkpoint/args.json")
    if args is None:
        sec.missing["model"] = res.missing("checkpoint/args.json", "No model description")
    else:
        sec.tables["model"] = key_value_table(
            [
                ("transformer layers", args.get("nlayers")),
                ("embedding size", args.get("embsize")),
                ("attention heads", args.get("nheads")),
                ("feed-forward size", args.get("d_hid")),
                ("layer norm", args.get("norm_scheme", "post")),
                ("classifier layers", args.get("n_layers_cls")),
                ("cell types (classes)", args.get("n_cls")),
                ("dropout", args.get("dropout")),
                ("fine-tuned from", args.get("finetuned_from", "–")),
            ]
        )
    sec.figures["qc"] = res.figure("qc_figure", "qc_figure")
    sec.figures["confusion"] = res.figure("confusion", "finetune_confusion")
    sec.figures["curve"] = res.figure("curve", "finetune_curve")
    sec.text["config"] = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    facts = {
        "cells": int(overview["cells"].sum()),
        "cell_types": len(composition),
        "donors": int(pd.to_numeric(overview["donors"], errors="coerce").fillna(0).sum()),
        "genes": n_genes,
        "metrics": metrics,
    }
    return sec, facts


def probe_section(res: Results, config: dict) -> tuple[Section, pd.DataFrame]:
    """The probe's statement, candidates, figures and LayerNorm outliers."""
    cands = res.tsv("candidates", required=True)
    _need_columns(cands, ("layer", "row", "col"), res.label("candidates"))
    cands["accepted"] = flags(cands["accepted"]) if "accepted" in cands else True
    sec = Section()
    summary = res.json("probe_summary") or {}
    n_accepted = int(cands["accepted"].sum())
    sec.text["statement"] = summary.get("statement") or (
        f"The probe accepted {_plural(n_accepted, 'candidate')} and listed "
        f"{_plural(len(cands), 'spike')} in all."
    )
    sec.tables["candidates"] = make_table(
        cands,
        CANDIDATE_COLUMNS,
        res.label("candidates"),
        row_class=lambda r: "sig" if r["accepted"] else "",
    )
    if "reason" in cands:
        sec.lists["reasons"] = [
            (f"layer {r.layer}, W[{r.row}, {r.col}]", str(r.reason))
            for r in cands[~cands["accepted"]].itertuples()
        ]
    sec.figures["layers"] = res.figure("layer_spikes", "probe_layers")
    sec.figures["cells"] = res.figure("cell_spikes", "probe_cells")
    ln = res.tsv("layernorm")
    z = config.get("probe", {}).get("ln_z", "?")
    if ln is None:
        sec.missing["layernorm"] = res.missing("layernorm", "No LayerNorm outliers")
    elif ln.empty:
        sec.missing["layernorm"] = f"No LayerNorm gain reached a robust z of {z}."
    else:
        sec.tables["layernorm"] = make_table(ln, LAYERNORM_COLUMNS, res.label("layernorm"))
    return sec, cands


def pruning_section(res: Results) -> tuple[Section, pd.DataFrame | None]:
    """Verdicts with effect, CI, p and q, the top-k sweep, strata and figures of the test."""
    confirmed = res.tsv("confirmed", required=True)
    _need_columns(confirmed, ("candidate", "confirmed", "effect", "reason"), res.label("confirmed"))
    confirmed["confirmed"] = flags(confirmed["confirmed"])
    confirmed["tier"] = tiers_of(confirmed)
    sec = Section()
    sec.tables["confirmed"] = make_table(
        confirmed,
        CONFIRMED_COLUMNS,
        res.label("confirmed"),
        row_class=lambda r: "sig" if r.get("tier") == "super weight" else "",
    )
    source = confirmed.get("source", pd.Series("", index=confirmed.index))
    sec.lists["reasons"] = [
        (f"{c} ({s})" if s else str(c), str(r))
        for c, s, r in zip(confirmed["candidate"], source, confirmed["reason"], strict=True)
    ]
    summary = res.json("ablate_summary") or {}
    sec.text["notes"] = " ".join(
        summary[k] for k in ("warning", "donor_warning", "selection_warning", "expression")
        if summary.get(k)
    )  # fmt: skip
    sec.text["stages"] = stage_statement(res.tsv("strata"), res.tsv("trend"))
    for key, columns in (("topk", TOPK_COLUMNS), ("strata", STRATA_COLUMNS),
                         ("trend", TREND_COLUMNS)):  # fmt: skip
        frame = res.tsv(key)
        if frame is None:
            sec.missing[key] = res.missing(key, f"No {key} table")
        else:
            sec.tables[key] = make_table(frame, columns, res.label(key), max_rows=60)
    for name, (key, caption_name) in ABLATE_FIGURES.items():
        sec.figures[name] = res.figure(key, caption_name)
    persistence = res.tsv("persistence")
    if persistence is None:
        sec.missing["persistence"] = res.missing("persistence", "No persistence table")
    else:
        sec.tables["persistence"] = make_table(
            persistence, PERSISTENCE_COLUMNS, res.label("persistence"), max_rows=40
        )
        sec.text["persistence"] = persistence_statement(persistence)
    sec.figures["persistence"] = res.figure("persistence_figure", "persistence_figure")
    sec.figures["spikes"] = res.figure("spikes_figure", "spikes_figure")
    return sec, confirmed


def stage_statement(strata: pd.DataFrame | None, trend: pd.DataFrame | None) -> str:
    """Which AD-stage strata were compared (by donor) and what each could detect, and the
    trend test across stages."""
    if strata is None or strata.empty or "mde" not in strata:
        return ""
    stages = strata[strata["stratum"] != "cell type"]
    compared = stages[stages["status"] == "compared"]
    parts = [
        f"{r.value} ({r.candidate}): {fmt(r.effect)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}] over "
        f"{r.n_donors} donors, smallest detectable {fmt(r.mde)}"
        for r in compared.itertuples()
    ]
    listed = stages[stages["status"] != "compared"]
    text = (
        "AD strata compared by donor (mean of donor means, t interval, smallest effect "
        "detectable with 80% power): " + "; ".join(parts) + "."
        if parts
        else "No AD stratum had enough donors to be compared."
    )
    if len(listed):
        text += " Listed, not compared (too few donors): " + ", ".join(
            sorted(set(listed["value"].astype(str)))) + "."  # fmt: skip
    if trend is not None and not trend.empty:
        for r in trend[trend["status"] == "compared"].itertuples():
            text += (
                f" Trend across {r.stratum} ({r.candidate}): Spearman rho {fmt(r.rho)} over "
                f"{r.n_donors} donors in {r.n_stages} stages, permutation p {fmt(r.p_value)}; "
                f"smallest detectable |rho| {fmt(r.mde_rho)}."
            )
    return text


def persistence_statement(table: pd.DataFrame) -> str:
    """How many confirmed weights of the starting model survive fine-tuning (only where both
    models tested them), how many appear, and how many massive activations persist."""
    if not len(table):
        return "Neither model had a weight to test."
    counts = table["status"].value_counts()
    tested = int(counts.get("persists", 0) + counts.get("lost in fine-tuning", 0))
    untested = int(counts.get("not tested in the fine-tuned model", 0))
    text = (
        f"Of {_plural(tested, 'weight')} confirmed in the starting model and tested in the "
        f"fine-tuned one, {int(counts.get('persists', 0))} remain confirmed after fine-tuning"
        + (f" ({untested} more were not tested after fine-tuning)" if untested else "")
        + f"; {int(counts.get('appears in fine-tuning', 0))} appear only in the fine-tuned "
        f"model; {_plural(len(table), 'weight')} tested in all."
    )
    if "activation_status" in table:
        both = int((table["activation_status"] == "spikes in both").sum())
        text += f" The probe found the same massive activation in both models for {both}."
    return text


def _interest_frames(goi: pd.DataFrame | None, core: tuple[str, ...], association):
    """Genes of interest with token-level (channel map, overall stratum) and cell-level
    (association) columns, each where it exists: the core genes in their order, and the
    other ranked genes of interest by percentile."""
    token = pd.DataFrame(columns=["candidate", "gene"]) if goi is None or goi.empty else goi
    if "stratum_type" in token:
        token = token[token["stratum_type"] == "all"]
    token = token.rename(columns=TOKEN_COLUMNS)
    if association is not None and not association.empty:
        wanted = association["gene"].isin(set(core) | set(token["gene"]))
        cell_level = association.loc[wanted, ["candidate", "gene", *INTEREST_ASSOCIATION]]
        token = token.merge(
            cell_level.rename(columns=INTEREST_ASSOCIATION), on=["candidate", "gene"], how="outer"
        )
    in_core = token["gene"].isin(core)
    order = {g: i for i, g in enumerate(core)}
    core_rows = token[in_core].sort_values(
        ["candidate", "gene"], key=lambda s: s.map(order) if s.name == "gene" else s, kind="stable"
    )
    others = token[~in_core]
    if "status" in others:
        others = others[others["status"] == "ranked"]
    if "percentile" in others:
        others = others.sort_values("percentile", ascending=False, kind="stable")
    return core_rows, others


CAUSAL_COLUMNS = ["rank", "gene", "n_cells", "n_donors", "path_effect", "path_z", "path_p_null",
                  "path_q", "specificity", "logp_effect", "logp_q", "act_effect",
                  "act_q"]  # fmt: skip
BASE_CAUSAL_COLUMNS = ["rank", "gene", "n_cells", "n_donors", "expr_effect", "expr_z",
                       "expr_p_null", "expr_q", "specificity"]  # fmt: skip


def genes_section(res: Results, core: tuple[str, ...]) -> tuple[Section, pd.DataFrame | None]:
    """The causal gene ranking of each candidate, ranks of the genes of interest, the `<cls>`
    token and the top genes of each channel's token-level map."""
    sec = Section()
    causal = res.tsv("genes_causal")
    if causal is None:
        sec.missing["causal"] = res.missing("genes_causal", "No causal gene ranking")
    elif causal.empty:
        sec.missing["causal"] = (
            "No causal gene ranking: no weight was mapped (confirmed weights and the "
            "`channels.n_unconfirmed` strongest unconfirmed ones are)."
        )
    else:
        for candidate, part in causal.groupby("candidate", sort=False):
            sec.per_candidate[str(candidate)] = make_table(
                part.sort_values("rank"), CAUSAL_COLUMNS, res.label("genes_causal"),
                max_rows=TOP_GENES, highlight=frozenset(core),
            )  # fmt: skip
    base = res.tsv("base_genes_causal")
    if base is not None and not base.empty:
        for candidate, part in base.groupby("candidate", sort=False):
            sec.per_candidate[f"{candidate} (starting model, masked expression)"] = make_table(
                part.sort_values("rank"), BASE_CAUSAL_COLUMNS, res.label("base_genes_causal"),
                max_rows=TOP_GENES, highlight=frozenset(core),
            )  # fmt: skip
    highlight = frozenset(core)
    goi = res.tsv("genes_of_interest")
    core_rows, others = _interest_frames(goi, core, res.tsv("association"))
    label = res.label("genes_of_interest")
    if goi is None:
        sec.missing["goi"] = res.missing("genes_of_interest", "No channel was mapped to genes")
    elif goi.empty:
        sec.missing["goi"] = (
            f"No channel was mapped to genes ({label} has no rows): the map covers confirmed "
            "super weights and the `channels.n_unconfirmed` strongest unconfirmed ones."
        )
    if len(core_rows):
        sec.tables["core"] = make_table(
            core_rows, INTEREST_COLUMNS, label, max_rows=60, highlight=highlight
        )
    else:
        core_rows = None
    if len(others):
        sec.tables["others"] = make_table(others, INTEREST_COLUMNS, label, max_rows=30)
    cls = res.tsv("cls")
    if cls is not None and not cls.empty:
        overall = cls[cls["stratum_type"] == "all"] if "stratum_type" in cls else cls
        sec.tables["cls"] = make_table(overall, CLS_COLUMNS, res.label("cls"))
        sec.text["cls"] = caption("cls_table", res.dataset)
    genes = res.tsv("genes")
    if genes is None or genes.empty:
        sec.missing["genes"] = res.missing("genes", "No gene ranking")
    else:
        overall = genes[genes["stratum_type"] == "all"] if "stratum_type" in genes else genes
        for candidate, part in overall.groupby("candidate", sort=False):
            top = part.sort_values("rank").head(TOP_GENES)
            sec.tables[str(candidate)] = make_table(
                top, GENE_COLUMNS, max_rows=TOP_GENES, highlight=highlight
            )
            confirmed = "confirmed" in top and flags(top["confirmed"]).any()
            sec.text[str(candidate)] = "confirmed super weight" if confirmed else "unconfirmed"
    return sec, core_rows


def cells_section(res: Results, core: tuple[str, ...]) -> Section:
    """The cell map, its notes, and the genes whose expression goes with the effect."""
    sec = Section()
    summary = res.json("cells_summary")
    if summary is None:
        sec.missing["cells"] = res.missing("cells_summary", "No cell map")
        return sec
    sec.figures["umap"] = res.figure("cell_map", "cells_umap")
    sec.text["notes"] = " ".join(summary.get("notes", []))
    association = res.tsv("association")
    if association is None or association.empty:
        sec.missing["association"] = "No gene was associated with a per-cell effect."
        return sec
    for candidate, part in association.groupby("candidate", sort=False):
        sec.tables[str(candidate)] = make_table(
            part.sort_values("rank"), ASSOCIATION_COLUMNS, res.label("association"),
            max_rows=TOP_GENES, highlight=frozenset(core),
        )  # fmt: skip
        status = str(part["status"].iloc[0]) if "status" in part else "confirmed"
        q = pd.to_numeric(part.get("q"), errors="coerce")
        sec.text[str(candidate)] = (
            f"{status}; {int((q <= ASSOCIATION_FDR).sum())} of {len(part):,} genes at "
            f"q ≤ {ASSOCIATION_FDR} (Benjamini-Hochberg over this candidate's genes)"
        )
    return sec


def _gsea_number(path: Path) -> int:
    found = re.search(r"(\d+)$", path.stem)
    return int(found.group(1)) if found else 0


def pathways_section(res: Results) -> tuple[Section, list[dict], pd.DataFrame | None]:
    """Per candidate: top prerank terms, AD rows, ORA, dot plot and GSEA plots."""
    sec = Section()
    summary = res.tsv("enrich/summary.tsv")
    if summary is not None and not summary.empty:
        sec.tables["summary"] = make_table(
            summary, ENRICH_SUMMARY_COLUMNS, res.label("enrich/summary.tsv")
        )
    base = res.tsv("base_enrich/summary.tsv")
    if base is not None and not base.empty:
        sec.tables["base_summary"] = make_table(
            base, ENRICH_SUMMARY_COLUMNS, res.label("base_enrich/summary.tsv")
        )
    names = {}
    if summary is not None and {"folder", "candidate"} <= set(summary.columns):
        names = {str(r.folder): _ranking_name(r) for r in summary.itertuples()}
    folders = sorted(p.parent for p in res.path("enrich").glob("*/prerank.tsv"))
    candidates = []
    for folder in folders:
        key = f"enrich/{folder.name}"
        parts = {}
        for name, columns in ENRICH_TABLES.items():
            frame = res.tsv(f"{key}/{name}.tsv")
            if frame is not None and not frame.empty:
                parts[name] = make_table(frame, columns, res.label(f"{key}/{name}.tsv"), TOP_TERMS)
        plots = sorted(folder.glob("gsea_top*.png"), key=_gsea_number)
        plots += sorted(folder.glob("gsea_ad*.png"), key=_gsea_number)
        candidates.append(
            {
                "name": names.get(folder.name, folder.name),
                "tables": parts,
                "dotplot": res.figure(f"{key}/dotplot.png", "enrich_dotplot"),
                "gsea": [res.figure(f"{key}/{p.name}", "enrich_gsea") for p in plots],
            }
        )
    return sec, candidates, summary


def quantize_section(res: Results) -> tuple[Section, pd.DataFrame | None, pd.DataFrame | None]:
    """The paper's finding against ours, the arms compared with their differences' CIs, the
    full table and the figure."""
    sec = Section()
    table = res.tsv("quantize")
    contrasts = res.tsv("quantize_contrasts")
    if table is None or table.empty:
        sec.missing["table"] = res.missing("quantize", "No quantization results")
    else:
        table = table.astype({"block_size": str})
        sec.text["paper"] = PAPER_QUANTIZATION
        sec.text["ours"] = quantize_statement(table, contrasts)
        arms = compare_arms(table)
        if not arms.empty:
            sec.tables["arms"] = make_table(arms_display(arms), max_rows=len(arms))
        if contrasts is not None and not contrasts.empty:
            sec.tables["contrasts"] = make_table(
                contrasts, CONTRAST_COLUMNS, res.label("quantize_contrasts"), max_rows=60
            )
        sec.tables["table"] = make_table(
            table, QUANTIZE_COLUMNS, res.label("quantize"), max_rows=60
        )
    sec.figures["figure"] = res.figure("quantize_figure", "quantize_figure")
    return sec, table, contrasts


def _restore_gain(contrasts: pd.DataFrame | None, bits: int, block: str) -> str:
    """Whether restoring the super weights helps at `block`, with its donor bootstrap CI
    against clipping alone and against restoring a control weight instead."""
    if contrasts is None or contrasts.empty:
        return "The arms' differences (contrasts.tsv) are missing: no claim is made."
    own = contrasts[
        (contrasts["scheme"] == "weight") & (contrasts["bits"] == bits)
        & (contrasts["block_size"].astype(str) == block)
        & (contrasts["measure"] == "mean_log_likelihood")
    ].set_index("contrast")  # fmt: skip
    if "restore vs clip" not in own.index:
        return "No contrast of the restore arm at the largest block: no claim is made."
    gain = own.loc["restore vs clip"]
    verdict = (
        "As in the paper, restoring the super weights after clipping helps at the largest block"
        if gain.ci_low > 0
        else "Unlike the paper, restoring the super weights after clipping does not help "
        "detectably at the largest block"
    )
    text = (
        f"{verdict}: {gain.difference:+.3g} nats of log p(true type) per cell over clipping "
        f"alone (95% CI {gain.ci_low:+.3g} to {gain.ci_high:+.3g}, over {gain.n_donors} donors)"
    )
    if "restore vs control" in own.index:
        control = own.loc["restore vs control"]
        specific = "beyond" if control.ci_low > 0 else "not detectably beyond"
        text += (
            f"; {specific} restoring the largest other weight of the same matrix "
            f"({control.difference:+.3g}, CI {control.ci_low:+.3g} to {control.ci_high:+.3g})"
        )
    return text + "."


def arms_display(arms: pd.DataFrame) -> pd.DataFrame:
    """`compare_arms` with readable column names ("accuracy: clip only", ...)."""
    names = {"bits": "bits", "block_size": "block size"}
    measures = {"accuracy": "accuracy", "mean_log_likelihood": "log p", "weight_error": "error"}
    for measure, label in measures.items():
        names |= {f"{measure}_{arm}": f"{label}: {ARM_LABELS[arm]}" for arm in ARMS}
    names |= {f"clip_value_{arm}": f"threshold: {ARM_LABELS[arm]}" for arm in ARMS[1:]}
    return arms[[c for c in names if c in arms]].rename(columns=names)


# --- summary statements -----------------------------------------------------------------


def tiers_of(confirmed: pd.DataFrame) -> pd.Series:
    """Each tested weight's verdict tier (`confirm.TIERS`); a table without a `tier` column
    (written before tiers existed) cannot show the mechanism: its confirmed rows count as
    important weights."""
    if "tier" in confirmed:
        return confirmed["tier"].astype(str)
    return pd.Series(np.where(confirmed["confirmed"], "important weight", "not confirmed"),
                     index=confirmed.index)  # fmt: skip


def super_weight_statements(cands: pd.DataFrame, confirmed: pd.DataFrame | None) -> list[str]:
    """The headline (super weights only), how the probe and pruning got there, and each
    confirmed weight with its tier, effect, both nulls and its mechanism."""
    n_accepted = int(cands["accepted"].sum())
    if n_accepted:
        probe = f"The probe accepted {_plural(n_accepted, 'candidate')} (massive activations)"
    elif len(cands):
        probe = "No spike passed the probe's thresholds"
    else:
        probe = "The probe listed no spike at all"
    if confirmed is None or confirmed.empty or "confirmed" not in confirmed:
        return ["Pruning results are missing: no super weight could be confirmed.", probe + "."]
    tiers = tiers_of(confirmed)
    hits = confirmed[confirmed["confirmed"]].assign(tier=tiers[confirmed["confirmed"]])
    supers = hits[hits["tier"] == "super weight"]
    n_tested, n_hits = len(confirmed), len(hits)
    if n_accepted:
        pruning = (
            f"; pruning confirmed {n_hits} of the {_plural(n_tested, 'tested weight')}, "
            f"{len(supers)} with the super-weight mechanism"
        )
    else:
        tested = (
            f"the {_plural(n_tested, 'strongest spike')}"
            if len(cands)
            else f"the {_plural(n_tested, 'largest down-projection weight')}"
        )
        verb = "was" if n_tested == 1 else "were"
        outcome = (
            "none lowered the cell-type log-likelihood beyond its null and the top-k control"
            if not n_hits
            else f"{n_hits} lowered it beyond the null and the controls"
        )
        pruning = f"; {tested} {verb} tested by pruning and {outcome}"
    if not n_hits:
        return [
            "No super weight: no tested weight was confirmed by pruning.",
            probe + pruning + ".",
        ]
    where = "; ".join(f"layer {r.layer}, W[{r.row}, {r.col}]" for r in supers.itertuples())
    important = len(hits) - len(supers)
    if len(supers):
        headline = f"{_plural(len(supers), 'super weight')}: {where}."
        if important:
            headline += f" Also {_plural(important, 'important weight')} (see below)."
    else:
        headline = (
            f"No super weight; {_plural(important, 'important weight')} confirmed by pruning "
            "without the super-weight mechanism."
        )
    lines = [headline, probe + pruning + "."]
    for r in hits.itertuples():
        lines.append(
            f"Layer {r.layer}, W[{r.row}, {r.col}] = {fmt(r.weight)} ({r.module}), {r.tier}: "
            f"pruning this single weight lowers the mean log-likelihood of the true cell type "
            f"by {fmt(r.effect)} nats per cell (95% CI {fmt(r.ci_low)} to {fmt(r.ci_high)}, "
            f"over {r.n_groups} donors); p = {fmt(r.p_value)}, q = {fmt(r.q_value)} against "
            f"{r.n_null} magnitude-matched weights of the same matrix (null mean "
            f"{fmt(r.null_mean)}){_contribution_clause(r)}; pruning the top-{r.topk_k} other "
            f"weights lowers it by {fmt(r.topk_effect)}{_mechanism_clause(r)}; {len(hits)} of "
            f"{n_tested} tests confirmed."
        )
    return lines


def _contribution_clause(r) -> str:
    if not hasattr(r, "p_contribution"):
        return ""
    return (
        f", p = {fmt(r.p_contribution)}, q = {fmt(r.q_contribution)} against weights whose "
        "largest term |x·w| is as large"
    )


def _mechanism_clause(r) -> str:
    parts = []
    if hasattr(r, "recovered"):
        parts.append(f"restoring its activation recovers {fmt(100 * r.recovered)}% of the drop")
    if hasattr(r, "mean_spike_effect"):
        parts.append(
            f"setting that activation to its mean over cells costs {fmt(r.mean_spike_effect)} "
            f"nats, to 0 costs {fmt(r.zero_spike_effect)}"
        )
    return "; " + "; ".join(parts) if parts else ""


def gene_statement(core_rows: pd.DataFrame | None, core: tuple[str, ...]) -> str:
    """Genes of interest near the top of a token-level ranking, then at the cell level."""
    if core_rows is None:
        return "No gene of interest was ranked on a candidate."
    parts = []
    if "percentile" in core_rows:
        top = core_rows[pd.to_numeric(core_rows["percentile"], errors="coerce") >= TOP_PERCENTILE]
        ranked = [
            f"{r.gene} ranks {fmt(r.token_rank)} of {fmt(r.n_ranked)} on {r.candidate} "
            f"(token z {fmt(r.token_z)}, null p {fmt(r.token_p)})"
            for r in top.itertuples()
        ]
        parts.append(
            f"Genes of interest in the top {100 - TOP_PERCENTILE:g}% of a token-level ranking: "
            + "; ".join(ranked)
            + "."
            if ranked
            else f"None of {', '.join(core)} ranks in the top {100 - TOP_PERCENTILE:g}% of "
            "genes on any mapped channel."
        )
    if "assoc_q" in core_rows:
        cell = core_rows.dropna(subset=["assoc_q"]).sort_values("assoc_q", kind="stable")
        hits = cell[cell["assoc_q"] <= ASSOCIATION_FDR]
        if len(hits):
            listed = "; ".join(
                f"{r.gene} on {r.candidate} (z {fmt(r.assoc_z)}, q {fmt(r.assoc_q)})"
                for r in hits.itertuples()
            )
            parts.append(f"At the cell level, at q ≤ {ASSOCIATION_FDR}: {listed}.")
        elif len(cell):
            best = cell.iloc[0]
            parts.append(
                f"At the cell level no gene of interest goes with the dependence on a weight "
                f"at q ≤ {ASSOCIATION_FDR} (closest: {best.gene} on {best.candidate}, z "
                f"{fmt(best.assoc_z)}, q {fmt(best.assoc_q)})."
            )
    return " ".join(parts) or "No gene of interest was ranked on a candidate."


RANKING_NAMES = {"causal": "causal", "token": "token-level", "cell": "cell-level"}
"""How each of a candidate's rankings is named in the report."""


def _ranking_name(row) -> str:
    """A candidate with its ranking: causal (the weight's effect through each gene, the
    primary one), token-level (where the unit fires) or cell-level (association)."""
    ranking = str(getattr(row, "ranking", "token"))
    return f"{row.candidate} ({RANKING_NAMES.get(ranking, ranking)})"


def pathway_statement(summary: pd.DataFrame | None, n_folders: int, fdr: float) -> str:
    """Per ranking: enriched and depleted sets at one q over all its tests, the AD hits, the
    pre-specified AD test, and how often null weights' rankings do as well."""
    if summary is None or summary.empty or not n_folders:
        return "No candidate reached enrichment."
    parts = []
    for r in summary.itertuples():
        who = _ranking_name(r)
        if str(getattr(r, "status", "confirmed")) != "confirmed":
            who += " (exploratory: not confirmed by pruning)"
        if getattr(r, "reason", "") and isinstance(r.reason, str):
            parts.append(f"{who}: not tested ({r.reason})")
            continue
        enriched = int(getattr(r, "n_enriched", r.n_significant))
        text = (
            f"{who}: {_plural(enriched, 'gene set')} of {fmt(r.n_sets)} enriched"
            + (f" and {int(r.n_depleted)} depleted" if getattr(r, "n_depleted", 0) else "")
            + f" at q ≤ {fmt(fdr)}"
            + (f" (top: {r.top_term}, NES {fmt(r.top_NES)})" if enriched else "")
        )
        ad = int(getattr(r, "n_ad_enriched", getattr(r, "n_ad_significant", 0)))
        text += f", {_plural(ad, 'AD-related set')} enriched"
        if pd.notna(getattr(r, "ad_test_p", np.nan)):
            text += (
                f"; pre-specified AD test (AD genes vs the rest, one-sided Mann-Whitney): "
                f"AUC {fmt(r.ad_test_auc)}, p = {fmt(r.ad_test_p)}"
            )
        if getattr(r, "n_null_rankings", 0) and pd.notna(getattr(r, "null_ad_hit_rate", np.nan)):
            text += (
                f"; of {int(r.n_null_rankings)} null weights' rankings, "
                f"{fmt(100 * r.null_ad_hit_rate)}% hit an AD set and "
                f"{fmt(100 * r.null_ad_test_rate)}% reach AD test p ≤ 0.05 (the candidate's "
                f"AD test p ranks {fmt(r.ad_test_p_null)} among them)"
            )
        parts.append(text)
    statement = "; ".join(parts) + "."
    if "n_tests_total" in summary:
        total = int(summary["n_tests_total"].iloc[0])
        statement += (
            f" {total:,} tests in all (prerank and ORA, across {_plural(len(summary), 'ranking')}"
            " and every library; q by Benjamini-Hochberg over every test of a ranking; only "
            "positive enrichment counts as a hit)."
        )
    return statement


CONTROL_FAILURES = {
    "found": "the probe did not accept it",
    "recovered": "the confirmation did not make it a super weight",
    "traced": "its genes did not lead the causal ranking (AUC below {trace_auc} or "
    "Mann-Whitney p above {trace_alpha})",
    "enriched": "its gene set was not called enriched",
}


CONTROL_SHOWN = {
    "traced": "Detection shown (a planted super weight of this size is found and confirmed), "
    "the gene level not",
    "enriched": "Detection and the gene level shown, the pathway level not",
}
"""What a control that failed at a later step still shows, by the step it failed at."""


def control_statement(score: dict | None, not_run: bool) -> str:
    """The positive control in a few sentences: what was planted, what each stage made of
    it, and whether the run could have found a super weight of that size."""
    if score is None:
        if not_run:
            return (
                "Not run (positive_control.enabled is false), so this run cannot show that it "
                "could have found a super weight."
            )
        return "The control's score is missing (control/score.json)."
    genes = score.get("genes") or {}
    enrichment = score.get("enrichment") or {}
    what = (
        f"A super weight planted in the starting model at {score['candidate']}, driven by the "
        f"tokens of {_plural(score['n_genes'], 'gene')} of {score['gene_set']}, and fine-tuned "
        "with the same recipe"
    )
    if not score["found"]:
        return f"{what} was missed by the probe ({score.get('probe_reason') or 'not listed'})."
    parts = [f"{what} was found by the probe (rank {score['probe_rank']} of "
             f"{score['n_accepted']} accepted)"]  # fmt: skip
    if score.get("tier"):
        parts.append(
            f"the confirmation's tier is “{score['tier']}”: Δ log p {fmt(score['effect'])} nats "
            f"per cell (95% CI {fmt(score['ci_low'])} to {fmt(score['ci_high'])}) against a "
            f"magnitude-null mean of {fmt(score['null_mean'])} (p {fmt(score['p_value'])}, q "
            f"{fmt(score['q_value'])}); restoring its activation recovers "
            f"{_share(score['recovered_share'])} of the effect"
        )
    if genes.get("n_planted_ranked"):
        parts.append(
            f"{genes['n_planted_ranked']} of its genes are among the {genes['n_ranked']} genes "
            "of the causal gene ranking (the weight's Δ log p through each gene's token) at best "
            f"rank {genes.get('best_rank')} and median rank {fmt(genes['median_rank'])} (AUC "
            f"{fmt(genes['auc'])}, one-sided Mann-Whitney p {fmt(genes.get('p_rank'))}); by the "
            "super activation (which genes make it) at median rank "
            f"{fmt(genes.get('act_median_rank'))} (AUC {fmt(genes.get('act_auc'))})"
        )
    elif genes and genes["n_ranked"]:
        parts.append(f"none of its genes is among the {genes['n_ranked']} causally ranked genes")
    elif genes:
        parts.append(
            "the causal gene stage ranked no gene for it (it maps confirmed weights, and "
            "`channels.n_unconfirmed` others)"
        )
    if enrichment.get("tested"):
        parts.append(
            f"its gene set is {enrichment.get('call') or 'not called'} in that ranking (q over "
            f"all tests {fmt(enrichment.get('q_all_tests'))})"
        )
    elif enrichment:
        parts.append("its gene set was not tested (too few of its genes ranked)")
    verdict = "Sensitivity shown: the chain finds a planted super weight of this size, traces "
    verdict += "it to its genes and calls its gene set enriched."
    if not score["passed"]:
        failure = _control_failure(score)
        if score["failed_at"] == "enriched" and not enrichment.get("tested"):
            failure = "its gene set could not be tested"
        shown = CONTROL_SHOWN.get(score["failed_at"])
        verdict = (
            f"{shown}: {failure}."
            if shown
            else f"The control failed: {failure}, so a null result here does not show that no "
            "super weight exists."
        )
    return "; ".join(parts) + ". " + verdict


def _control_failure(score: dict) -> str:
    """The step the control failed at, in words, with the thresholds it missed (as its
    score.json records them; "–" where an older one does not)."""
    return CONTROL_FAILURES[score["failed_at"]].format(**({"trace_auc": "–", "trace_alpha": "–"}
                                                          | score))  # fmt: skip


def _share(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def control_headline(score: dict | None) -> str:
    """What the positive control says of a null result, for the headline."""
    if score is None:
        return "No positive control was run."
    if not score["recovered"]:
        failure = _control_failure(score)
        return (
            f"The positive control failed ({failure}): this null result is not evidence of absence."
        )
    steps = ["found", "confirmed"]
    if score["traced"]:
        steps.append("traced to its genes")
    if score["enriched"]:
        steps.append("its gene set enriched")
    reached = ", ".join(steps[:-1]) + " and " + steps[-1]
    return (
        f"A planted super weight (Δ log p {fmt(score.get('effect'))} nats per cell) was "
        f"{reached} by the same stages (positive control)."
    )


def control_section(score: dict | None, not_run: bool) -> Section:
    """The control's statement, its numbers and the planted genes' causal (and cell-level
    association) ranks."""
    sec = Section(text={"statement": control_statement(score, not_run)})
    if score is None:
        return sec
    enrichment = score.get("enrichment") or {}
    genes = score.get("genes") or {}
    sec.tables["score"] = key_value_table([
        ("planted weight", score["candidate"]),
        ("gene set", score["gene_set"]),
        ("probe rank (accepted candidates)", score["probe_rank"]),
        ("tier", score.get("tier")),
        ("Δ log p (nats per cell)", score.get("effect")),
        ("95% CI", f"{fmt(score.get('ci_low'))} to {fmt(score.get('ci_high'))}"),
        ("magnitude-null mean", score.get("null_mean")),
        ("p / q (magnitude null)", f"{fmt(score.get('p_value'))} / {fmt(score.get('q_value'))}"),
        ("p / q (contribution null)",
         f"{fmt(score.get('p_contribution'))} / {fmt(score.get('q_contribution'))}"),
        ("share recovered by restoring the activation", score.get("recovered_share")),
        ("planted genes' AUC in the causal ranking", genes.get("auc")),
        ("planted genes above the others: Mann-Whitney p", genes.get("p_rank")),
        ("planted genes' AUC in the cell-level association (descriptive)",
         (score.get("association") or {}).get("auc")),
        ("planted genes' AUC, ranked by the super activation", genes.get("act_auc")),
        ("planted set: enrichment call",
         enrichment.get("call") if enrichment.get("tested") else "not tested"),
        ("planted set: q over all tests", enrichment.get("q_all_tests")),
        ("passed", score["passed"]),
    ])  # fmt: skip
    ranks = genes.get("ranks") or {}
    if ranks:
        frame = pd.DataFrame({"gene": list(ranks), "causal rank": list(ranks.values())})
        frame["rank by super activation"] = frame["gene"].map(genes.get("act_ranks") or {})
        frame["of"] = genes["n_ranked"]
        association = score.get("association") or {}
        if association.get("ranks"):
            frame["association rank"] = frame["gene"].map(association["ranks"])
            frame["of (association)"] = association["n_ranked"]
        frame = frame.sort_values(["causal rank", "rank by super activation"])
        sec.tables["genes"] = make_table(frame, max_rows=len(frame))
    return sec


def _block_text(block) -> str:
    return "one block per matrix" if str(block) == "tensor" else f"blocks of {block}"


def quantize_statement(table: pd.DataFrame | None, contrasts: pd.DataFrame | None = None) -> str:
    """Our result in the paper's terms: accuracy of each arm from the smallest to the largest
    block, and whether holding out the super weight helps at the largest block beyond
    clipping alone and beyond restoring a control weight; "as in the paper" only where the
    donor bootstrap CI of that gain in log p excludes 0; then W8A8."""
    if table is None or table.empty:
        return "Quantization was not run."
    arms = compare_arms(table.astype({"block_size": str}))
    fp32 = table.loc[table["scheme"] == "fp32", "accuracy"]
    shown = ARMS[:3]
    if arms.empty or not {f"accuracy_{arm}" for arm in shown} <= set(arms.columns):
        return "Quantization ran without the three arms (naive, clip only, clip + restore)."
    bits = 4 if 4 in set(arms["bits"]) else int(arms["bits"].min())
    rows = arms[arms["bits"] == bits]
    order = rows["block_size"].map(lambda b: math.inf if b == "tensor" else int(b))
    rows = rows.iloc[order.argsort(kind="stable")]
    small, large = rows.iloc[0], rows.iloc[-1]
    parts = [
        f"{ARM_LABELS[arm]} {fmt(small[f'accuracy_{arm}'])} → {fmt(large[f'accuracy_{arm}'])}"
        for arm in shown
    ]
    text = (
        f"Here, INT{bits} accuracy from {_block_text(small.block_size)} to "
        f"{_block_text(large.block_size)}"
        + (f" (unquantized {fmt(fp32.iloc[0])})" if len(fp32) else "")
        + ": "
        + "; ".join(parts)
        + " (clip thresholds chosen on validation cells)."
    )
    if int(table["n_super_weights"].max()) == 0:
        text += (
            " No super weight was held out, so clip + restore equals clip only and "
            "the paper's comparison cannot be made on this model."
        )
    else:
        text += " " + _restore_gain(contrasts, bits, str(large.block_size))
    w8a8 = table[table["scheme"] == "w8a8"].set_index("method")
    if {"naive", "holdout"} <= set(w8a8.index):
        text += (
            f" W8A8 ({w8a8['activation_scale'].iloc[0]} activation scales): accuracy "
            f"{fmt(w8a8.loc['naive', 'accuracy'])} naive, "
            f"{fmt(w8a8.loc['holdout', 'accuracy'])} with the super activation held out."
        )
    return text


# --- rendering --------------------------------------------------------------------------


def _setting(value) -> str:
    """A config value in prose: lists comma-joined, absent values marked."""
    if isinstance(value, jinja2.Undefined):
        return "(not set)"
    if isinstance(value, list | tuple):
        return ", ".join(_setting(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting(v)}" for k, v in value.items()) or "none"
    return value if isinstance(value, str) else fmt(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["setting"] = _setting
    return env


def build_report(inputs, dataset: str, config: dict, out_path: Path) -> Path:
    """Write the HTML report of `dataset` to `out_path`.

    `inputs`: the folder results/<dataset> or the inputs by name (`INPUT_FILES`).

    Raises `UserError` naming the file when qc.tsv, metrics.json, candidates.tsv or
    confirmed.tsv is missing; any other missing output is stated in the page.
    """
    res = Results(inputs, dataset)
    core = tuple(config.get("preprocess", {}).get("genes_of_interest") or GENES_OF_INTEREST)
    data, facts = data_section(res, dataset, config)
    probe, cands = probe_section(res, config)
    pruning, confirmed = pruning_section(res)
    genes, core_rows = genes_section(res, core)
    cells = cells_section(res, core)
    pathways, candidates, enrich_summary = pathways_section(res)
    if not candidates:
        pathways.missing["enrich"] = "No candidate reached enrichment."
    quantize, quantize_table, contrasts = quantize_section(res)
    sources = {d.get("name"): d.get("source") for d in config.get("datasets", [])}
    source = sources.get(dataset) or "unknown source"
    metrics = facts["metrics"]
    found = super_weight_statements(cands, confirmed)
    control = res.json("control")
    control_off = "control" in res.not_run or not config.get("positive_control", {}).get(
        "enabled", True
    )
    fdr = config.get("enrich", {}).get("fdr_threshold", 0.05)
    here = Path(out_path).resolve().parent
    any_found = confirmed is not None and bool(
        (confirmed.get("tier", pd.Series()) == "super weight").any()
    )
    summary = {
        "headline": found[0] if any_found else f"{found[0]} {control_headline(control)}",
        "found": any_found,
        "facts": [
            ("Super weights", " ".join(found[1:]),
             res.links(here, "confirmed", "candidates")),
            (
                "Data",
                f"{dataset} ({source}): {facts['cells']:,} cells of "
                f"{_plural(facts['cell_types'], 'cell type')} from "
                f"{_plural(facts['donors'], 'donor')} after QC, {facts['genes']:,} genes, "
                "split by donor into training, validation and test sets.",
                res.links(here, "qc"),
            ),
            (
                "Classifier",
                f"On {fmt(metrics.get('n_cells'))} test cells the fine-tuned scGPT model "
                f"reaches accuracy {fmt(metrics['accuracy'])} and macro F1 "
                f"{fmt(metrics['macro_f1'])} (mean log p(true cell type) "
                f"{fmt(metrics['mean_log_likelihood'])}).",
                res.links(here, "metrics"),
            ),
            ("Genes", gene_statement(core_rows, core),
             res.links(here, "genes_of_interest", "association")),
            ("Pathways", pathway_statement(enrich_summary, len(candidates), fdr),
             res.links(here, "enrich/summary.tsv")),
            ("Quantization", quantize_statement(quantize_table, contrasts),
             res.links(here, "quantize", "quantize_contrasts")),
            ("Positive control", control_statement(control, control_off),
             res.links(here, "control")),
        ],
    }  # fmt: skip
    html = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            dataset=dataset,
            source=source,
            version=__version__,
            core_genes=core,
            summary=summary,
            data=data,
            probe=probe,
            pruning=pruning,
            genes=genes,
            cells=cells,
            pathways=pathways,
            enrich_candidates=candidates,
            control=control_section(control, control_off),
            quantize=quantize,
            cfg=config,
            top_genes=TOP_GENES,
        )
    )
    out_path = Path(out_path)
    write_text(out_path, html)
    return out_path


def run(inputs, outputs, settings: dict, *, dataset: str) -> Path:
    """The report stage: `build_report` of `dataset` from `inputs` (the folder
    results/<dataset> or the inputs by name) with its config `settings`, written to
    `outputs` (a folder, or named outputs with `html`)."""
    path = named_paths(outputs, {"html": "report.html"})["html"]
    return build_report(inputs, dataset, settings, path)
