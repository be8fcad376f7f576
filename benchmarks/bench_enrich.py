"""Time preranked GSEA over all GO Biological Process 2023 sets for one gene ranking.

The ranking is random scores over genes drawn from the GO BP library (seeded), as large
as a channel map's overall ranking: the demo's ~1,200 highly variable genes up to ~8,000.
Each method of `superweights.enrich.prerank` is timed once per size; the target is
≤ 30 s on 2 cores with 1,000 permutations.

    python benchmarks/bench_enrich.py                                  # 1,200 and 8,000 genes
    python benchmarks/bench_enrich.py --genes 8000 --methods multilevel
"""

import argparse
import time

import numpy as np
import pandas as pd

from superweights.enrich import EnrichSettings, packaged_library, prerank

LIBRARY = "GO_Biological_Process_2023"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[1200, 8000])
    p.add_argument("--methods", nargs="+", default=["multilevel", "permutation"])
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=30.0, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    library = packaged_library(LIBRARY)
    load_s = time.perf_counter() - start
    universe = sorted({g for genes in library.values() for g in genes})
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in args.genes:
        genes = rng.choice(universe, n, replace=False)
        ranking = pd.Series(rng.normal(size=n), index=genes)
        for method in args.methods:
            settings = EnrichSettings(
                method=method,
                permutation_num=args.permutations,
                threads=args.threads,
                seed=args.seed,
            )
            start = time.perf_counter()
            table = prerank(ranking, {LIBRARY: library}, settings)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "genes": n,
                    "method": method,
                    "sets_tested": len(table),
                    "seconds": round(seconds, 1),
                    "target_met": seconds <= args.target,
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\n{LIBRARY}: {len(library)} sets, loaded in {load_s:.2f} s; {args.permutations} "
        f"permutations, {args.threads} threads, target {args.target:g} s"
    )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
