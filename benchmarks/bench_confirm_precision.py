"""Precision routes of the confirmation's null draws, side by side: time and rounding error.

Builds a random scGPT classifier and random cells as bench_confirm.py does, draws the
candidate's magnitude-matched null weights as `confirm_super_weights` does, and scores the
candidate and the same `--draws` null weights through `CellTypeScore.zeroed_scores` in each
route (`superweights.scores.PRECISIONS`, packed or padded stacks). The fp32 padded route is
the reference: every row reports its largest |null effect - reference null effect|, that
error over the reference null draws' standard deviation (the target: < 1 %), whether the
candidate's p-value against these draws is the reference's, the seconds per draw, the time
for 999 draws (projected) and the speed-up over the reference. A second table times the
fastest accurate route at larger stacks (`TOKENS_PER_FORWARD`). With `--full N`, it also
runs `confirm_super_weights` with N null draws in the route `--full-precision` and prints
its wall time and verdict.

    python benchmarks/bench_confirm_precision.py                  # small, CPU
    python benchmarks/bench_confirm_precision.py --layers 12 --d-model 512 --heads 8 \\
        --vocab 60697 --seq-len 1200 --min-len 314 --cells 1000 --batch 32 --draws 48 \\
        --full 999                                                # GPU, released size
"""

import argparse
import json
import logging
import time

import numpy as np
import pandas as pd
import torch
from bench_probe import make_batches

import superweights.scores as scores
from superweights.confirm import ConfirmSettings, confirm_super_weights, null_positions
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.scores import CellTypeScore

ROUTES = "fp32/padded,tf32x3/padded,tf32x3/packed,tf32/packed,bf16/packed"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--classes", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--min-len", type=int, default=None)
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layer", type=int, default=1, help="layer of the candidate")
    p.add_argument("--draws", type=int, default=24, help="null draws scored by every route")
    p.add_argument("--routes", default=ROUTES, help="precision/layout rows, reference first")
    p.add_argument("--stacks", default="19,20,21", help="log2 tokens per forward, stack table")
    p.add_argument("--full", type=int, default=0, help="null draws of a full confirmation")
    p.add_argument("--full-precision", default="tf32x3")
    p.add_argument("--json", default=None, help="write the rows here too")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Padded(CellTypeScore):
    """The score with its stacked copies padded in every precision."""

    def _stack_packing(self, i):
        return self.packings[i]


def synced(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    logging.getLogger("superweights.confirm").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    config = ScGPTConfig(
        ntoken=args.vocab, d_model=args.d_model, nhead=args.heads, d_hid=args.d_model,
        nlayers=args.layers, n_cls=args.classes, pad_token_id=args.vocab - 1,
    )  # fmt: skip
    model = ScGPTModel(config).to(device).eval()
    batches = make_batches(args, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    for b in batches:
        b["labels"] = torch.randint(0, args.classes, (len(b["gene_ids"]),), generator=g).to(device)
    module = f"transformer_encoder.layers.{args.layer}.linear2"
    weight = model.transformer_encoder.layers[args.layer].linear2.weight.detach()
    cand_row, cand_col = divmod(int(weight.abs().argmax()), weight.shape[1])
    rng = np.random.default_rng([0, 0])
    _, nulls = null_positions(weight, cand_row, cand_col, args.draws, 2.0, rng)
    positions = [(cand_row, cand_col), *nulls]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tokens = sum(int((~b["padding_mask"]).sum()) for b in batches)
    print(
        f"# {name}, torch {torch.__version__}: {args.layers} layers, d {args.d_model}, "
        f"{args.cells} cells ({tokens / args.cells:.0f} genes on average, up to "
        f"{args.seq_len}), batch {args.batch}, candidate {module}[{cand_row}, {cand_col}], "
        f"{args.draws} null draws per route"
    )
    base = CellTypeScore(model, batches)(model).numpy()

    def run(precision, layout, budget=None):
        cls = Padded if layout == "padded" else CellTypeScore
        score = cls(model, batches, packed=False, precision=precision)
        if budget:
            scores.TOKENS_PER_FORWARD["cuda"] = 2**budget
        with score.from_layer(args.layer):
            score.zeroed_scores(model, module, positions[:3])  # warm-up
            synced(device)
            start = time.perf_counter()
            got = score.zeroed_scores(model, module, positions)
            synced(device)
            seconds = time.perf_counter() - start
        scores.TOKENS_PER_FORWARD["cuda"] = 2**19
        return seconds, (base[None, :] - got.numpy()).mean(axis=1)

    routes = [r.split("/") for r in args.routes.split(",")]
    results = {}
    for precision, layout in routes:
        results[(precision, layout)] = run(precision, layout)
    ref_seconds, ref = next(iter(results.values()))
    sd = float(ref[1:].std(ddof=1))
    p_ref = (1 + int((ref[1:] >= ref[0]).sum())) / len(ref)
    print(f"# reference null effects: sd {sd:.3g}, largest |effect| {abs(ref[1:]).max():.3g}; "
          f"candidate effect {ref[0]:.3g}, p {p_ref:.3g} (against these draws)")  # fmt: skip
    rows = []
    print("| route | layout | s / draw | 999 draws | x fp32 | max abs error | error / null sd "
          "| same p |")  # fmt: skip
    print("|---|---|--:|--:|--:|--:|--:|---|")
    for (precision, layout), (seconds, eff) in results.items():
        per = seconds / len(positions)
        err = float(np.abs(eff[1:] - ref[1:]).max())
        p = (1 + int((eff[1:] >= eff[0]).sum())) / len(eff)
        row = {"route": precision, "layout": layout, "s_per_draw": per, "s_999": per * 1000,
               "speedup": ref_seconds / seconds, "max_error": err, "error_over_sd": err / sd,
               "same_p": p == p_ref}  # fmt: skip
        rows.append(row)
        print(f"| {precision} | {layout} | {per:.3f} | {per * 1000:.0f} s | "
              f"{row['speedup']:.1f} | {err:.2e} | {err / sd:.2%} | {p == p_ref} |")  # fmt: skip
    accurate = [r for r in rows[1:] if r["error_over_sd"] < 0.01]
    best = min(accurate, key=lambda r: r["s_per_draw"]) if accurate else None
    if best and device.type == "cuda":
        print(
            f"\n| tokens per forward ({best['route']}, {best['layout']}) | s / draw | 999 draws |"
        )
        print("|--:|--:|--:|")
        for budget in [int(b) for b in args.stacks.split(",")]:
            seconds, _ = run(best["route"], best["layout"], budget)
            per = seconds / len(positions)
            rows.append({"route": best["route"], "layout": best["layout"], "stack": budget,
                         "s_per_draw": per})  # fmt: skip
            print(f"| 2^{budget} | {per:.3f} | {per * 1000:.0f} s |")
    if args.full:
        full = ConfirmSettings(n_null=args.full, n_boot=1000)
        score = CellTypeScore(model, batches, precision=args.full_precision)
        table = pd.DataFrame({"module": [module], "row": [cand_row], "col": [cand_col]})
        synced(device)
        start = time.perf_counter()
        result = confirm_super_weights(model, table, score, settings=full)
        synced(device)
        seconds = time.perf_counter() - start
        t = result.table.iloc[0]
        print(f"\n# confirm_super_weights, {args.full} null draws, {args.full_precision}: "
              f"{seconds:.1f} s (base, candidate + nulls, restore, top-k controls); effect "
              f"{t.effect:.3g}, null sd {t.null_sd:.3g}, p {t.p_value:.3g}, q {t.q_value:.3g}, "
              f"confirmed {t.confirmed}")  # fmt: skip
        rows.append({"route": args.full_precision, "full_draws": args.full, "seconds": seconds})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
