"""Peak memory and speed of `superweights preprocess` on a synthetic atlas-sized h5ad.

Writes a SEA-AD-shaped h5ad (obs `Donor ID`, `Subclass`, `Used in analysis`, ...; var =
gene symbols of the scGPT vocabulary, MT- genes last; raw counts in layers["UMIs"] as
on-disk CSR, no X) block by block, never holding the matrix in memory. Then runs the
preprocessing CLI in a child process, polls its RSS every 0.2 s and prints one table row.
The issue's target: 1,000,000 cells x 36,000 genes with peak RSS <= 6 GB.

Counts: each cell draws its total UMIs from its cell type's gene distribution (a Zipf-like
base, several hundred type-specific marker genes boosted) plus a mitochondrial share, so
most non-zero counts are 1-3 and highly variable genes carry cell-type signal. The total is
chosen so that the expected number of detected genes follows a log-normal around
--genes-per-cell (neurons above, glia below; 2% low-quality nuclei, 4% with high mito).

    python benchmarks/bench_preprocess.py --n-cells 100000
    python benchmarks/bench_preprocess.py                       # 1M cells, ~12 GB file
"""

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp

from superweights.data.vocab import SPECIAL_TOKENS, load_vocab
from superweights.genes import GENES_OF_INTEREST

TARGET_GB = 6.0
POLL_S = 0.2
# SEA-AD MTG subclasses: (name, class, approximate share of nuclei, detected-gene factor)
SUBCLASSES = [
    ("L2/3 IT", "Neuronal: Glutamatergic", 0.17, 1.5),
    ("L4 IT", "Neuronal: Glutamatergic", 0.06, 1.5),
    ("L5 IT", "Neuronal: Glutamatergic", 0.04, 1.5),
    ("L6 IT", "Neuronal: Glutamatergic", 0.02, 1.4),
    ("L6 IT Car3", "Neuronal: Glutamatergic", 0.01, 1.4),
    ("L5 ET", "Neuronal: Glutamatergic", 0.003, 1.8),
    ("L5/6 NP", "Neuronal: Glutamatergic", 0.01, 1.4),
    ("L6 CT", "Neuronal: Glutamatergic", 0.015, 1.4),
    ("L6b", "Neuronal: Glutamatergic", 0.01, 1.4),
    ("Lamp5", "Neuronal: GABAergic", 0.02, 1.2),
    ("Lamp5 Lhx6", "Neuronal: GABAergic", 0.01, 1.2),
    ("Sncg", "Neuronal: GABAergic", 0.01, 1.2),
    ("Vip", "Neuronal: GABAergic", 0.04, 1.2),
    ("Pax6", "Neuronal: GABAergic", 0.005, 1.2),
    ("Chandelier", "Neuronal: GABAergic", 0.004, 1.3),
    ("Pvalb", "Neuronal: GABAergic", 0.035, 1.3),
    ("Sst", "Neuronal: GABAergic", 0.03, 1.2),
    ("Sst Chodl", "Neuronal: GABAergic", 0.001, 1.3),
    ("Oligodendrocyte", "Non-neuronal and Non-neural", 0.20, 0.7),
    ("Astrocyte", "Non-neuronal and Non-neural", 0.08, 0.8),
    ("OPC", "Non-neuronal and Non-neural", 0.04, 0.9),
    ("Microglia-PVM", "Non-neuronal and Non-neural", 0.05, 0.6),
    ("Endothelial", "Non-neuronal and Non-neural", 0.01, 0.6),
    ("VLMC", "Non-neuronal and Non-neural", 0.003, 0.7),
]
SYMBOL = re.compile(r"^[A-Z][A-Z0-9]{1,9}(-AS\d)?$")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-genes", type=int, default=36_000)
    p.add_argument("--genes-per-cell", type=float, default=1500, help="median detected genes")
    p.add_argument("--n-donors", type=int, default=80)
    p.add_argument("--block", type=int, default=10_000, help="cells generated per block")
    p.add_argument("--chunk-size", type=int, help="forwarded to preprocess (default: its own)")
    p.add_argument("--max-cells-per-type", type=int, help="forwarded to preprocess")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    p.add_argument("--keep", action="store_true", help="keep the synthetic h5ad")
    p.add_argument("--reuse", action="store_true", help="reuse an existing synthetic h5ad")
    p.add_argument("--warm-cache", action="store_true", help="leave the file in the page cache")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def pick_genes(n_genes: int) -> tuple[list[str], list[str]]:
    """Nuclear genes (genes of interest, then symbol-like vocabulary entries) and MT- genes."""
    vocab = [g for g in load_vocab() if g not in SPECIAL_TOKENS]
    mito = [g for g in vocab if g.startswith("MT-")]
    first = [g for g in GENES_OF_INTEREST if g in vocab]
    rest = [g for g in vocab if g not in first and g not in mito]
    rest = [g for g in rest if SYMBOL.match(g)] + [g for g in rest if not SYMBOL.match(g)]
    n_nuclear = n_genes - len(mito)
    if n_nuclear < len(first) or n_nuclear > len(first) + len(rest):
        raise SystemExit(f"--n-genes must be between {len(first) + len(mito)} and {len(vocab)}")
    return sorted(first + rest[: n_nuclear - len(first)]), mito


class CountModel:
    """Per-type cumulative distributions over the nuclear genes; MT- gene probabilities."""

    def __init__(self, n_nuclear: int, n_mito: int, rng: np.random.Generator):
        base = rng.permutation(1.0 / np.arange(1, n_nuclear + 1) ** 0.9)
        top = np.argsort(-base)[: min(8000, n_nuclear)]
        mito = 1.0 / np.arange(1, n_mito + 1)
        self.mito = mito / mito.sum()
        self.cdfs = []
        self.log_grid = np.linspace(np.log(10), np.log(300_000), 60)
        self.log_detected = []  # log expected detected genes at each total in the grid
        for _ in SUBCLASSES:
            p = base.copy()
            markers = rng.choice(top, min(400, top.size), replace=False)
            p[markers] *= np.exp(rng.normal(2.0, 0.7, markers.size))
            p /= p.sum()
            cdf = np.cumsum(p)
            cdf[-1] = np.inf
            self.cdfs.append(cdf)
            log_miss = np.log1p(-p)
            curve = [n_nuclear - np.exp(np.exp(t) * log_miss).sum() for t in self.log_grid]
            self.log_detected.append(np.log(curve))

    def totals(self, detected: np.ndarray, types: np.ndarray) -> np.ndarray:
        """Nuclear UMI totals with `detected` expected detected genes, per cell."""
        out = np.empty(detected.size)
        for t, curve in enumerate(self.log_detected):
            rows = types == t
            out[rows] = np.exp(np.interp(np.log(detected[rows]), curve, self.log_grid))
        return np.maximum(np.round(out), 1).astype(np.int64)


def make_obs(args, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """SEA-AD-like obs plus per-cell target detected genes and mitochondrial fraction."""
    n = args.n_cells
    share = np.array([s[2] for s in SUBCLASSES])
    factor = np.array([s[3] for s in SUBCLASSES])
    factor /= np.exp((share * np.log(factor)).sum() / share.sum())
    types = rng.choice(len(SUBCLASSES), n, p=share / share.sum())
    donors = np.array([f"H{19 + i % 3}.33.{i:03d}" for i in range(args.n_donors)])
    donor = rng.choice(args.n_donors, n, p=rng.dirichlet(np.full(args.n_donors, 5.0)))
    donor_depth = np.exp(rng.normal(0, 0.15, args.n_donors))
    status = rng.choice(["Dementia", "No dementia", "Reference"], args.n_donors)
    detected = np.exp(rng.normal(np.log(args.genes_per_cell), 0.35, n))
    detected *= factor[types] * donor_depth[donor]
    low = rng.random(n) < 0.02
    detected[low] = np.exp(rng.normal(np.log(150), 0.4, low.sum()))
    mito = np.where(rng.random(n) < 0.04, rng.beta(6, 14, n), rng.beta(1, 99, n))
    barcodes = rng.choice(np.array(list("ACGT")), (n, 16)).view("U16").ravel()
    obs = pd.DataFrame(
        {
            "Donor ID": pd.Categorical.from_codes(donor, donors),
            "Class": pd.Categorical(np.array([s[1] for s in SUBCLASSES])[types]),
            "Subclass": pd.Categorical.from_codes(types, [s[0] for s in SUBCLASSES]),
            "Cognitive status": pd.Categorical(status[donor]),
            "Used in analysis": rng.random(n) < 0.95,
        },
        index=pd.Index(barcodes, dtype=object) + "-" + pd.Index(np.arange(n).astype(str)),
    )
    return obs, np.maximum(detected, 20), mito


def sample_block(model: CountModel, totals, mito, types, rng) -> sp.csr_matrix:
    """Counts of one block of cells: `totals` nuclear and `mito` MT- UMIs per cell."""
    order = np.argsort(types, kind="stable")
    totals, types = totals[order], types[order]
    n_draws = int(totals.sum())
    starts = np.concatenate([[0], np.cumsum(totals)[:-1]])
    # Sorted uniforms per cell: partial sums of exponentials over the sum of n + 1 of them,
    # so each cell's genes come out sorted and repeats are adjacent.
    u = np.cumsum(rng.standard_exponential(n_draws))
    base = np.concatenate([[0.0], u[starts[1:] - 1]])
    denom = u[starts + totals - 1] - base + rng.standard_exponential(totals.size)
    u -= np.repeat(base, totals)
    u /= np.repeat(denom, totals)
    genes = np.empty(n_draws, np.int32)
    edges = np.append(starts, n_draws)[np.searchsorted(types, np.arange(len(model.cdfs) + 1))]
    for t, cdf in enumerate(model.cdfs):
        genes[edges[t] : edges[t + 1]] = np.searchsorted(cdf, u[edges[t] : edges[t + 1]], "right")
    del u
    new = np.empty(n_draws, bool)
    new[0] = True
    np.not_equal(genes[1:], genes[:-1], out=new[1:])
    new[starts] = True
    first = np.flatnonzero(new)
    indptr = np.searchsorted(first, np.append(starts, n_draws))
    counts = np.diff(np.append(first, n_draws)).astype(np.float32)
    n_nuclear = model.cdfs[0].size
    nuclear = sp.csr_matrix((counts, genes[first], indptr), (totals.size, n_nuclear))
    nuclear = nuclear[np.argsort(order)]
    mt = sp.csr_matrix(rng.multinomial(mito, model.mito).astype(np.float32))
    return sp.hstack([nuclear, mt], format="csr", dtype=np.float32)


def generate(path: Path, args) -> dict:
    """Write the synthetic h5ad block by block; return counts statistics."""
    rng = np.random.default_rng(args.seed)
    nuclear, mito_genes = pick_genes(args.n_genes)
    model = CountModel(len(nuclear), len(mito_genes), rng)
    obs, detected, mito_fraction = make_obs(args, rng)
    types = obs["Subclass"].cat.codes.to_numpy()
    totals = model.totals(detected, types)
    mito = rng.poisson(totals * mito_fraction / (1.0 - mito_fraction))
    obs["Number of UMIs"] = totals + mito
    var = pd.DataFrame(index=pd.Index(nuclear + mito_genes, name="gene"))
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    n, n_genes = args.n_cells, var.shape[0]
    detected_genes, count_hist = np.empty(n, np.int64), np.zeros(4, np.int64)
    with h5py.File(path, "r+") as f:
        group = f["layers"].create_group("UMIs")
        group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, n_genes)}
        )
        chunk = 1 << 20
        data = group.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(chunk,))
        indices = group.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(chunk,))
        indptr = group.create_dataset("indptr", (n + 1,), np.int64)
        indptr[0] = offset = 0
        for start in range(0, n, args.block):
            rows = slice(start, min(start + args.block, n))
            block = sample_block(model, totals[rows], mito[rows], types[rows], rng)
            detected_genes[rows] = np.diff(block.indptr)
            count_hist += np.bincount(np.minimum(block.data.astype(np.int64), 4), minlength=5)[1:]
            data.resize((offset + block.nnz,))
            indices.resize((offset + block.nnz,))
            data[offset:], indices[offset:] = block.data, block.indices.astype(np.int32)
            indptr[rows.start + 1 : rows.stop + 1] = offset + block.indptr[1:]
            offset += block.nnz
            print(f"\rgenerated {rows.stop:,}/{n:,} cells", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {
        "median_genes": float(np.median(detected_genes)),
        "median_umis": float(np.median(totals + mito)),
        "counts_1_2_3_4+": count_hist / count_hist.sum(),
    }


def drop_from_page_cache(path: Path) -> None:
    """Evict the file's pages so preprocessing reads from disk, not from memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and its descendants, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_preprocess(path: Path, args) -> dict:
    """Run the preprocessing CLI in a child process; wall time and peak RSS (polled + rusage)."""
    out = args.workdir / "bench_tokenised.h5ad"
    cmd = [sys.executable, "-m", "superweights.cli", "preprocess", str(path), "--out", str(out)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.max_cells_per_type:
        cmd += ["--max-cells-per-type", str(args.max_cells_per_type)]
    log = args.workdir / "bench_preprocess.log"
    print(" ".join(cmd), file=sys.stderr)
    peak, peak_at = 0, 0.0
    with open(log, "w") as handle:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        # wait4 reaps this child only and gives its own rusage (max RSS of it and its children).
        while not (done := os.wait4(child.pid, os.WNOHANG))[0]:
            try:
                rss = tree_rss(proc)
            except psutil.NoSuchProcess:
                rss = 0
            if rss > peak:
                peak, peak_at = rss, time.perf_counter() - start
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(done[1])
    if child.returncode:
        sys.exit(f"preprocess failed ({child.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    maxrss = done[2].ru_maxrss * 1024
    return {"seconds": seconds, "polled": peak, "peak_at": peak_at, "maxrss": maxrss}


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"synthetic_{args.n_cells}x{args.n_genes}.h5ad"
    stats, gen_s = {}, float("nan")
    if not (args.reuse and path.is_file()):
        start = time.perf_counter()
        # In its own process, so that this one stays small: a child forked from a large
        # parent would inherit the parent's high-water RSS in its ru_maxrss.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            stats = pool.submit(generate, path, args).result()
        gen_s = time.perf_counter() - start
    if not args.warm_cache:
        drop_from_page_cache(path)
    with h5py.File(path, "r") as f:
        nnz = f["layers/UMIs/data"].shape[0]
    try:
        run = run_preprocess(path, args)
    finally:
        size_gb = path.stat().st_size / 1e9
        if not args.keep:
            path.unlink()
    peak_gb = max(run["polled"], run["maxrss"]) / 1e9
    if stats:
        hist = ", ".join(f"{x:.1%}" for x in stats["counts_1_2_3_4+"])
        print(
            f"median detected genes {stats['median_genes']:.0f}, median UMIs "
            f"{stats['median_umis']:.0f}, non-zero counts 1/2/3/4+: {hist}"
        )
    print(
        f"peak RSS polled {run['polled'] / 1e9:.2f} GB (at {run['peak_at']:.0f} s), "
        f"ru_maxrss {run['maxrss'] / 1e9:.2f} GB; "
        f"page cache {'warm' if args.warm_cache else 'cold'}"
    )
    row = {
        "cells": f"{args.n_cells:,}",
        "genes": f"{args.n_genes:,}",
        "nnz": f"{nnz:,}",
        "file GB": f"{size_gb:.2f}",
        "generation s": f"{gen_s:.0f}",
        "preprocess s": f"{run['seconds']:.0f}",
        "cells/s": f"{args.n_cells / run['seconds']:,.0f}",
        "peak RSS GB": f"{peak_gb:.2f}",
        "target GB": f"<= {TARGET_GB:g}",
        "result": "pass" if peak_gb <= TARGET_GB else "FAIL",
    }
    widths = [max(len(k), len(v)) for k, v in row.items()]
    print(" | ".join(k.rjust(w) for k, w in zip(row, widths, strict=True)))
    print(" | ".join(v.rjust(w) for v, w in zip(row.values(), widths, strict=True)))


if __name__ == "__main__":
    main()
