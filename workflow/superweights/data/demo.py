"""Synthetic SEA-AD- and ROSMAP-shaped brain datasets for the offline demo.

The data are simulated, not measured. One negative-binomial count model, driven by a
table of cell types (markers, sub-types, disease programmes, abundance changes), makes
both layouts; donors carry an AD severity in [0, 1] that scales the disease programmes
and the loss of vulnerable neurons.
"""

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ..errors import UserError
from ..outputs import write_h5ad
from .vocab import load_vocab

GENERATOR_VERSION = "1"
CHUNK_CELLS = 1000  # cells simulated per block; fixed so results do not depend on memory


def _fold(genes: str, lfc: float) -> dict[str, float]:
    return dict.fromkeys(genes.split(), lfc)


@dataclass(frozen=True)
class CellType:
    """A cell population: its share of cells, sub-types, marker and disease log-fold changes."""

    name: str
    group: str  # SEA-AD Class or ROSMAP broad.cell.type
    share: float  # fraction of cells in a donor without pathology
    subtypes: tuple[str, ...]
    markers: Mapping[str, float]  # natural-log fold change over the base expression
    library: float  # median UMIs per cell over the simulated genes
    disease: Mapping[str, float] = field(default_factory=dict)  # log fold at severity 1
    abundance_lfc: float = 0.0  # log change of the share at severity 1


MT_GENES = tuple(
    "MT-ND1 MT-ND2 MT-CO1 MT-CO2 MT-ATP8 MT-ATP6 MT-CO3 MT-ND3 MT-ND4L MT-ND4 MT-ND5 MT-ND6 "
    "MT-CYB".split()
)
HOUSEKEEPING = tuple(
    "ACTB GAPDH B2M EEF1A1 TPT1 RPL13A RPS18 RPS27A FTL FTH1 UBC PPIA YWHAZ TUBA1A HSP90AB1 "
    "MALAT1".split()
)
AD_GENES = tuple(
    "APP MAPT APOE TREM2 PSEN1 PSEN2 TYROBP SPP1 CD74 C1QA C1QB C1QC CLU BIN1 SORL1 ABCA7 "
    "PICALM CD33 MS4A6A INPP5D PLCG2 BACE1 GSK3B CDK5 ADAM10 PTK2B CR1 EPHA1 CD2AP MEF2C SPI1 "
    "ACE SNCA".split()
)
REACTIVE_ASTROCYTE = _fold("GFAP CHI3L1 SERPINA3 C3 VIM OSMR CD44 CRYAB HSPB1", 2.0) | _fold(
    "CHI3L1 SERPINA3 C3", 3.0
)
DAM = _fold("TREM2 CD74 HLA-DRA CD9 C1QA C1QB C1QC TYROBP", 1.5) | _fold(
    "APOE SPP1 GPNMB LPL ITGAX", 3.0
)

NEURON = _fold("SNAP25 SYT1 RBFOX3 MAPT STMN2", 2.5) | _fold("APP BACE1 CDK5", 1.5)
GLUT = NEURON | _fold("SLC17A7 SATB2 NRGN", 3.0)
GABA = NEURON | _fold("GAD1 GAD2", 4.0)
ASTRO = _fold("GFAP AQP4 SLC1A2 GJA1 ALDH1L1 APOE CLU", 3.5)
MICRO = _fold("P2RY12 CX3CR1 CSF1R HEXB", 4.5) | _fold(
    "AIF1 C1QA C1QB C1QC TYROBP TREM2 PTPRC ITGAM INPP5D PLCG2 CD33 MS4A6A SPI1", 2.5
)
OLIGO = _fold("MBP PLP1 MOG MOBP MAG ST18", 4.0) | _fold("OLIG1 OLIG2 SOX10", 2.0)
OPC = _fold("PDGFRA VCAN CSPG4 PTPRZ1", 4.0) | _fold("OLIG1 OLIG2 SOX10", 2.5)
ENDO = _fold("CLDN5 FLT1 VWF PECAM1", 4.5)

_GLUT, _GABA, _NN = "Neuronal: Glutamatergic", "Neuronal: GABAergic", "Non-neuronal and Non-neural"
SEAAD_CELL_TYPES = (
    CellType("L2/3 IT", _GLUT, 0.20, ("L2/3 IT_1", "L2/3 IT_3", "L2/3 IT_6"),
             GLUT | _fold("CUX2 CBLN2", 4.0), 4000, abundance_lfc=-0.9),
    CellType("L4 IT", _GLUT, 0.09, ("L4 IT_1", "L4 IT_2"),
             GLUT | _fold("RORB", 4.0) | _fold("CUX2", 2.0), 4000, abundance_lfc=-0.7),
    CellType("L5 IT", _GLUT, 0.08, ("L5 IT_1", "L5 IT_2"),
             GLUT | _fold("FEZF2 IL1RAPL2", 3.0) | _fold("RORB", 2.0), 4000),
    CellType("L6 IT", _GLUT, 0.05, ("L6 IT_1", "L6 IT_2"),
             GLUT | _fold("THEMIS NTNG2", 4.0), 3500),
    CellType("Pvalb", _GABA, 0.05, ("Pvalb_1", "Pvalb_2", "Pvalb_5"),
             GABA | _fold("PVALB", 5.0) | _fold("LHX6", 3.0), 3500),
    CellType("Sst", _GABA, 0.045, ("Sst_3", "Sst_11", "Sst_20"),
             GABA | _fold("SST", 5.0) | _fold("LHX6", 3.0), 3000, abundance_lfc=-1.0),
    CellType("Vip", _GABA, 0.05, ("Vip_2", "Vip_9", "Vip_11"),
             GABA | _fold("VIP", 5.0) | _fold("ADARB2 CALB2", 3.0), 3000),
    CellType("Lamp5", _GABA, 0.035, ("Lamp5_1", "Lamp5_6"),
             GABA | _fold("LAMP5", 4.5) | _fold("ADARB2 RELN", 3.0), 3000),
    CellType("Astrocyte", _NN, 0.09, ("Astro_1", "Astro_2", "Astro_4"),
             ASTRO, 1500, REACTIVE_ASTROCYTE, abundance_lfc=0.3),
    CellType("Microglia-PVM", _NN, 0.05, ("Micro-PVM_1", "Micro-PVM_2", "Micro-PVM_3"),
             MICRO, 1200, DAM, abundance_lfc=0.5),
    CellType("Oligodendrocyte", _NN, 0.18, ("Oligo_1", "Oligo_2", "Oligo_4"), OLIGO, 1500),
    CellType("OPC", _NN, 0.045, ("OPC_1", "OPC_2"), OPC, 1500),
    CellType("Endothelial", _NN, 0.015, ("Endo_1", "Endo_2"), ENDO, 1000),
    CellType("VLMC", _NN, 0.012, ("VLMC_1",),
             _fold("COL1A2 DCN", 5.0) | _fold("LUM CEMIP", 4.0), 1000),
)  # fmt: skip

ROSMAP_CELL_TYPES = (
    CellType("Ex", "Ex", 0.43, ("Ex0", "Ex1", "Ex2", "Ex3"),
             GLUT | _fold("CUX2 RORB", 2.0), 4000, abundance_lfc=-0.5),
    CellType("In", "In", 0.13, ("In0", "In1", "In2"),
             GABA | _fold("SST PVALB VIP", 2.5), 3000, abundance_lfc=-0.3),
    CellType("Ast", "Ast", 0.08, ("Ast0", "Ast1"), ASTRO, 1500, REACTIVE_ASTROCYTE),
    CellType("Oli", "Oli", 0.23, ("Oli0", "Oli1", "Oli2"), OLIGO, 1500),
    CellType("Opc", "Opc", 0.05, ("Opc0", "Opc1"), OPC, 1500),
    CellType("Mic", "Mic", 0.05, ("Mic0", "Mic1"), MICRO, 1200, DAM, abundance_lfc=0.4),
    CellType("End", "End", 0.015, ("End0",), ENDO, 1000),
    CellType("Per", "Per", 0.015, ("Per0",),
             _fold("PDGFRB KCNJ8 ABCC9", 4.0) | _fold("NOTCH3 MYL9", 3.0), 1000),
)  # fmt: skip

_NOT_PROTEIN_CODING = re.compile(r"^(LINC|LOC|MIR|SNOR|SNHG|ENSG|RNU|RNA\d|RP\d)")


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def demo_genes(n_genes: int, cell_types: Sequence[CellType], rng: np.random.Generator) -> list[str]:
    """Named genes (mitochondrial, housekeeping, AD, markers) plus random vocabulary symbols."""
    vocab = load_vocab()
    named = dict.fromkeys(MT_GENES + HOUSEKEEPING + AD_GENES)
    for cell_type in cell_types:
        named.update(dict.fromkeys([*cell_type.markers, *cell_type.disease]))
    missing = [g for g in named if g not in vocab]
    if missing:
        raise UserError(f"scGPT's human gene list lacks demo genes {missing}")
    if n_genes < len(named):
        raise UserError(f"n_genes must be at least {len(named)} to hold the demo's named genes")
    pool = sorted(
        g
        for g in vocab
        if re.fullmatch(r"[A-Z][A-Z0-9]*", g) and not _NOT_PROTEIN_CODING.match(g)
        if g not in named
    )
    if n_genes - len(named) > len(pool):
        raise UserError(f"n_genes must be at most {len(named) + len(pool)}")
    filler = rng.choice(pool, size=n_genes - len(named), replace=False)
    return sorted([*named, *map(str, filler)])


class Simulation(NamedTuple):
    """Per-cell donor, cell type and global sub-type indices and the counts (cells × genes)."""

    donor: np.ndarray
    cell_type: np.ndarray
    subtype: np.ndarray
    counts: sp.csr_matrix


def _programmes(cell_types, genes, rng):
    """Log expression per sub-type (rows) and disease log-folds per cell type, over genes."""
    index = {g: i for i, g in enumerate(genes)}
    n_genes = len(genes)
    named = np.zeros(n_genes, bool)
    for cell_type in cell_types:
        named[[index[g] for g in (*cell_type.markers, *cell_type.disease)]] = True
    named[[index[g] for g in AD_GENES]] = True
    housekeeping = np.isin(genes, HOUSEKEEPING)

    base = rng.normal(0.0, 2.6, n_genes)
    base[named] = np.maximum(base[named], np.quantile(base, 0.75))
    base[housekeeping] = np.quantile(base, 0.995) + rng.normal(0.0, 0.5, housekeeping.sum())
    variable = ~housekeeping

    def random_programme(fraction, scale):
        lfc = np.zeros(n_genes)
        hit = variable & (rng.random(n_genes) < fraction)
        lfc[hit] = rng.normal(0.0, scale, hit.sum())
        return lfc

    rows, disease = [], np.zeros((len(cell_types), n_genes))
    for t, cell_type in enumerate(cell_types):
        type_log = base + random_programme(0.08, 1.0)
        for gene, lfc in cell_type.markers.items():
            type_log[index[gene]] += lfc
        for gene, lfc in cell_type.disease.items():
            disease[t, index[gene]] = lfc
        rows += [type_log + random_programme(0.03, 0.8) for _ in cell_type.subtypes]
    return np.array(rows), disease


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category index per row of (unnormalised) probabilities `p`."""
    cum = np.cumsum(p, 1)
    return np.minimum((rng.random(len(p))[:, None] * cum[:, -1:] > cum).sum(1), p.shape[1] - 1)


def _nb_block(mean, dispersion, rng):
    """Negative-binomial draws as a gamma-Poisson mixture; variance = mean + dispersion·mean²."""
    shape = 1.0 / dispersion
    return rng.poisson(rng.gamma(shape, mean / shape))


def simulate_counts(
    cell_types: Sequence[CellType],
    genes: Sequence[str],
    severity: np.ndarray,
    n_cells: int,
    rng: np.random.Generator,
) -> Simulation:
    """Draw cells for donors with the given AD severities (0 = none, 1 = most severe)."""
    if n_cells < 1:
        raise UserError("n_cells must be at least 1")
    genes = np.asarray(genes)
    severity = np.asarray(severity, float)
    logs, disease = _programmes(cell_types, genes, rng)

    donor_weight = rng.dirichlet(np.full(len(severity), 8.0))
    donor = rng.choice(len(severity), size=n_cells, p=donor_weight)
    share = np.array([c.share for c in cell_types])
    abundance = np.array([c.abundance_lfc for c in cell_types])
    cell_type = _draw((share * np.exp(np.outer(severity, abundance)))[donor], rng)
    n_sub = np.array([len(c.subtypes) for c in cell_types])
    k = np.arange(n_sub.max())
    p_sub = np.where(k < n_sub[:, None], 0.6**k, 0.0)  # sub-types of decreasing size
    subtype = np.concatenate([[0], np.cumsum(n_sub)])[cell_type] + _draw(p_sub[cell_type], rng)

    library = np.array([c.library for c in cell_types])[cell_type] * rng.lognormal(0, 0.45, n_cells)
    mito = np.clip(rng.lognormal(np.log(0.02), 0.6, n_cells), 0.002, 0.25)
    cell_severity = np.clip(severity[donor] + rng.normal(0, 0.05, n_cells), 0, 1)
    is_mt = np.char.startswith(genes.astype(str), "MT-")
    dispersion = 0.25 * rng.lognormal(0, 0.5, len(genes))

    blocks = []
    for start in range(0, n_cells, CHUNK_CELLS):
        cells = slice(start, start + CHUNK_CELLS)
        log = logs[subtype[cells]] + cell_severity[cells, None] * disease[cell_type[cells]]
        expr = np.exp(log - log.max(1, keepdims=True))
        nuclear = expr * ~is_mt
        chondrial = expr * is_mt
        prop = nuclear / nuclear.sum(1, keepdims=True) * (1 - mito[cells, None])
        prop += chondrial / chondrial.sum(1, keepdims=True) * mito[cells, None]
        counts = _nb_block(prop * library[cells, None], dispersion, rng)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    return Simulation(donor, cell_type, subtype, sp.vstack(blocks, format="csr"))


def _ln_up10k(counts: sp.csr_matrix) -> sp.csr_matrix:
    """ln(1 + counts per 10,000 UMIs of the cell), float32 CSR."""
    totals = np.maximum(np.asarray(counts.sum(1)).ravel(), 1)
    x = counts.astype(np.float32, copy=True)
    x.data = np.log1p(x.data / np.repeat(totals, np.diff(x.indptr)) * 1e4).astype(np.float32)
    return x


def _barcodes(n: int, seed: int) -> list[str]:
    """Unique 16-base barcodes: i -> a·i + b modulo 4**16 is a bijection for odd a."""
    salt = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x5DEECE66D) % 4**16)
    codes = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + salt) % np.uint64(4**16)
    digits = (codes[:, None] >> (2 * np.arange(15, -1, -1, dtype=np.uint64))) & np.uint64(3)
    return ["".join(row) for row in np.array(list("ACGT"))[digits.astype(int)]]


def _levels(n_donors: int, n_levels: int, rng: np.random.Generator):
    """Disease level per donor (every level present) and a severity inside the level's band."""
    level = rng.permutation(np.arange(n_donors) % n_levels)
    severity = (level + rng.uniform(0.1, 0.9, n_donors)) / n_levels
    return level, severity


# --- SEA-AD layout -------------------------------------------------------------------------

ADNC_LEVELS = ("Reference", "Not AD", "Low", "Intermediate", "High")
BRAAK = ("Braak 0", "Braak I", "Braak II", "Braak III", "Braak IV", "Braak V", "Braak VI")
THAL = tuple(f"Thal {i}" for i in range(6))
CERAD = ("Absent", "Sparse", "Moderate", "Frequent")
# Per ADNC level: allowed (low, high) Braak stage, Thal phase and CERAD index (NIA-AA ABC).
_ABC = {
    "Reference": ((0, 1), (0, 0), (0, 0)),
    "Not AD": ((0, 2), (0, 0), (0, 1)),
    "Low": ((1, 3), (1, 2), (0, 1)),
    "Intermediate": ((3, 4), (3, 3), (2, 2)),
    "High": ((5, 6), (4, 5), (2, 3)),
}
LATE = ("Not Identified", "LATE Stage 1", "LATE Stage 2", "LATE Stage 3")
LEWY = (
    "Not Identified (olfactory bulb assessed)",
    "Olfactory bulb only",
    "Amygdala-predominant",
    "Limbic (Transitional)",
)


def _apoe(severity: np.ndarray, rng: np.random.Generator) -> list[str]:
    """APOE genotypes whose ε4 dose rises with severity."""
    p4 = 0.08 + 0.45 * severity
    alleles = np.where(rng.random((len(severity), 2)) < p4[:, None], 4, 3)
    alleles[rng.random((len(severity), 2)) < 0.07] = 2
    alleles.sort(1)
    return [f"{a}/{b}" for a, b in alleles]


def _seaad_donors(n_donors: int, rng: np.random.Generator) -> pd.DataFrame:
    """Donor metadata with the SEA-AD column names plus a `severity` column."""
    if not 5 <= n_donors <= 999:
        raise UserError("n_donors must be between 5 and 999 so that every ADNC level is present")
    level, severity = _levels(n_donors, len(ADNC_LEVELS), rng)
    adnc = np.array(ADNC_LEVELS)[level]
    braak, thal, cerad = np.array(
        [[rng.integers(lo, hi + 1) for lo, hi in _ABC[a]] for a in adnc]
    ).T
    reference = level == 0
    dementia = (severity > 0.7) | ((severity > 0.55) & (rng.random(n_donors) < 0.5))
    mmse = np.where(dementia, rng.integers(8, 24, n_donors), rng.integers(26, 31, n_donors))
    numbers = rng.choice(999, n_donors, replace=False) + 1
    return pd.DataFrame(
        {
            "Donor ID": [f"H{20 + k % 2}.33.{n:03d}" for k, n in enumerate(numbers)],
            "Neurotypical reference": np.where(reference, "True", "False"),
            "Brain Region": "Middle Temporal Gyrus",
            "Sex": rng.choice(["Female", "Male"], n_donors),
            "Age at Death": np.where(
                reference, rng.uniform(30, 65, n_donors), rng.uniform(68, 101, n_donors)
            ).round(0),
            "Overall AD neuropathological Change": adnc,
            "Thal": np.array(THAL)[thal],
            "Braak": np.array(BRAAK)[braak],
            "CERAD score": np.array(CERAD)[cerad],
            "LATE": np.array(LATE)[
                np.minimum((severity * rng.uniform(0, 4, n_donors)), 3).astype(int)
            ],
            "Highest Lewy Body Disease": rng.choice(LEWY, n_donors, p=[0.7, 0.1, 0.1, 0.1]),
            "Cognitive Status": np.where(
                reference, "Reference", np.where(dementia, "Dementia", "No dementia")
            ),
            "Last MMSE Score": np.where(rng.random(n_donors) < 0.2, np.nan, mmse.astype(float)),
            "APOE Genotype": _apoe(severity, rng),
            "Severely Affected Donor": np.where(severity > 0.9, "Y", "N"),
            "Continuous Pseudo-progression Score": severity.round(4),
            "severity": severity,
            "libraries": [
                [f"L8TX_2{rng.integers(10000, 19999)}_01_{'ABCDEFGH'[i]}{j:02d}" for i, j in wells]
                for wells in rng.integers((0, 1), (8, 13), (n_donors, 2, 2))
            ],
        }
    )


def make_demo_seaad(
    n_cells: int = 8000, n_genes: int = 2400, n_donors: int = 60, seed: int = 0
) -> ad.AnnData:
    """A synthetic AnnData with the SEA-AD final-nuclei layout (obs, X, layers['UMIs'])."""
    rng_genes, rng_donors, rng_cells, rng_obs = _rngs(seed, 4)
    genes = demo_genes(n_genes, SEAAD_CELL_TYPES, rng_genes)
    donors = _seaad_donors(n_donors, rng_donors)
    sim = simulate_counts(
        SEAAD_CELL_TYPES, genes, donors["severity"].to_numpy(), n_cells, rng_cells
    )

    obs = donors.iloc[sim.donor].reset_index(drop=True)
    which = rng_obs.integers(0, 2, n_cells)
    obs["library_prep"] = [libs[k] for libs, k in zip(obs.pop("libraries"), which, strict=True)]
    del obs["severity"]
    obs.index = pd.Index(
        [
            f"{b}-{lib}"
            for b, lib in zip(_barcodes(n_cells, seed), obs["library_prep"], strict=True)
        ],
        name="exp_component_name",
    )
    labels = {  # column: (label per code, codes per cell, beta parameters of the confidence)
        "Class": ([c.group for c in SEAAD_CELL_TYPES], sim.cell_type, (60, 1)),
        "Subclass": ([c.name for c in SEAAD_CELL_TYPES], sim.cell_type, (25, 1.5)),
        "Supertype": ([s for c in SEAAD_CELL_TYPES for s in c.subtypes], sim.subtype, (6, 1.5)),
    }
    for column, (names, codes, beta) in labels.items():
        obs[column] = pd.Categorical(np.array(names)[codes], categories=list(dict.fromkeys(names)))
        obs[f"{column} confidence"] = rng_obs.beta(*beta, n_cells).round(4)

    counts = sim.counts
    umis = np.asarray(counts.sum(1)).ravel()
    mito = np.asarray(counts[:, np.char.startswith(genes, "MT-")].sum(1)).ravel()
    obs["Used in analysis"] = rng_obs.random(n_cells) >= 0.03
    obs["Number of UMIs"] = umis.astype(np.int64)
    obs["Genes detected"] = np.diff(counts.indptr).astype(np.int64)
    obs["Fraction mitochondrial UMIs"] = mito.astype(float) / np.maximum(umis, 1)
    obs["method"] = "10Xv3.1"
    orders = {
        "Overall AD neuropathological Change": ADNC_LEVELS,
        "Braak": BRAAK,
        "Thal": THAL,
        "CERAD score": CERAD,
    }
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = pd.Categorical(obs[column], categories=orders.get(column))

    var = pd.DataFrame({"feature_name": genes}, index=pd.Index(genes, name="gene_symbol"))
    adata = ad.AnnData(X=_ln_up10k(counts), obs=obs, var=var, layers={"UMIs": counts})
    adata.uns["X_normalization"] = "ln(UP10K+1)"
    adata.uns["demo"] = {
        "synthetic": True,
        "generator": f"superweights.data.demo v{GENERATOR_VERSION}",
        "seed": seed,
        "note": "simulated cells shaped like SEA-AD; not measured data",
    }
    return adata


def write_demo_seaad(path: str | Path, **kwargs) -> Path:
    """Write `make_demo_seaad(**kwargs)` to an h5ad file, appearing only when complete."""
    return write_h5ad(make_demo_seaad(**kwargs), path)


# --- ROSMAP (Mathys et al. 2019) layout ---------------------------------------------------


class RosmapTables(NamedTuple):
    """The four Mathys et al. 2019 tables; counts are cells × genes."""

    counts: sp.csr_matrix
    genes: list
    cells: pd.DataFrame
    clinical: pd.DataFrame


def _rosmap_clinical(n_donors: int, rng: np.random.Generator):
    """Clinical table with ROSMAP codes; returns it with the donors' severities."""
    if not 4 <= n_donors <= 100000:
        raise UserError(
            "n_donors must be between 4 and 100000 so that every pathology level is present"
        )
    level, severity = _levels(n_donors, 4, rng)
    braak = np.clip(np.round(severity * 6 + rng.normal(0, 0.4, n_donors)), 0, 6).astype(int)
    cogdx = np.select([severity < 0.35, severity < 0.6], [1, 2], 4)
    age_death = rng.uniform(75, 100, n_donors)
    first_dx = np.where(cogdx == 4, age_death - rng.uniform(1, 8, n_donors), np.nan)

    def age_text(age):
        return ["" if np.isnan(a) else "90+" if a >= 90 else f"{a:.8f}" for a in age]

    clinical = pd.DataFrame(
        {
            "projid": 10100000 + rng.choice(899000, n_donors, replace=False),
            "study": rng.choice(["ROS", "MAP"], n_donors),
            "msex": rng.integers(0, 2, n_donors),
            "educ": rng.integers(10, 22, n_donors),
            "race": 1,
            "spanish": 2,
            "apoe_genotype": [int(g.replace("/", "")) for g in _apoe(severity, rng)],
            "age_at_visit_max": age_text(age_death - rng.uniform(0.2, 2, n_donors)),
            "age_first_ad_dx": age_text(first_dx),
            "age_death": age_text(age_death),
            "cts_mmse30_first_ad_dx": np.where(cogdx == 4, rng.integers(18, 26, n_donors), np.nan),
            "cts_mmse30_lv": np.where(
                cogdx == 4, rng.integers(0, 20, n_donors), rng.integers(24, 31, n_donors)
            ).astype(float),
            "pmi": rng.uniform(3, 20, n_donors).round(2),
            "braaksc": braak,
            "ceradsc": 4 - level,  # 4 = no AD ... 1 = definite AD
            "cogdx": cogdx,
            "dcfdx_lv": np.where(cogdx == 4, rng.choice([4, 5], n_donors), cogdx),
            "individualID": [f"R{n}" for n in rng.choice(9000000, n_donors, replace=False) + 10**6],
        }
    )
    return clinical, severity


def make_demo_rosmap(
    n_cells: int = 3000, n_genes: int = 1500, n_donors: int = 8, seed: int = 0
) -> RosmapTables:
    """Synthetic tables with the layout of the Mathys et al. 2019 ROSMAP release."""
    rng_genes, rng_donors, rng_cells, rng_obs = _rngs(seed, 4)
    genes = demo_genes(n_genes, ROSMAP_CELL_TYPES, rng_genes)
    clinical, severity = _rosmap_clinical(n_donors, rng_donors)
    sim = simulate_counts(ROSMAP_CELL_TYPES, genes, severity, n_cells, rng_cells)

    n_subtypes = sum(len(c.subtypes) for c in ROSMAP_CELL_TYPES)
    centre = rng_obs.uniform(-40, 40, (len(ROSMAP_CELL_TYPES), 2))
    centre = centre[[t for t, c in enumerate(ROSMAP_CELL_TYPES) for _ in c.subtypes]]
    centre += rng_obs.normal(0, 5, (n_subtypes, 2))
    tsne = centre[sim.subtype] + rng_obs.normal(0, 2, (n_cells, 2))
    barcodes = _barcodes(n_cells, seed)
    cells = pd.DataFrame(
        {
            "TAG": [f"{b}.{d + 1}" for b, d in zip(barcodes, sim.donor, strict=True)],
            "projid": clinical["projid"].to_numpy()[sim.donor],
            "tsne1": tsne[:, 0].round(4),
            "tsne2": tsne[:, 1].round(4),
            "pre.cluster": sim.subtype,
            "broad.cell.type": np.array([c.name for c in ROSMAP_CELL_TYPES])[sim.cell_type],
            "Subcluster": np.array([s for c in ROSMAP_CELL_TYPES for s in c.subtypes])[sim.subtype],
        }
    )
    return RosmapTables(sim.counts, genes, cells, clinical)


ROSMAP_FILES = (
    "filtered_count_matrix.mtx",
    "filtered_gene_row_names.txt",
    "filtered_column_metadata.txt",
    "ROSMAP_clinical.csv",
)


def write_demo_rosmap(
    folder: str | Path, n_cells: int = 3000, n_genes: int = 1500, n_donors: int = 8, seed: int = 0
) -> Path:
    """Write the ROSMAP-shaped files into `folder`, which appears only when complete."""
    folder = Path(folder)
    tables = make_demo_rosmap(n_cells, n_genes, n_donors, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        matrix, genes, cells, clinical = (tmp / name for name in ROSMAP_FILES)
        scipy.io.mmwrite(matrix, tables.counts.T.astype(np.int64).tocoo())
        genes.write_text("".join(f"{g}\n" for g in tables.genes))
        tables.cells.to_csv(cells, sep="\t", index=False)
        tables.clinical.to_csv(clinical, index=False)
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
