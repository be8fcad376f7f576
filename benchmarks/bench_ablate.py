"""Time the pruning test with cached hidden states against naive full re-evaluation.

Builds a random scGPT classifier and random tokenised cells, takes one candidate weight in
each of the chosen layers (default: spread over the first third of the layers), and runs
the whole ablation (every condition and control) twice: once re-running each condition
from the inputs, once from the hidden states cached at the condition's lowest touched
layer. Prints the wall time of each, the speed-up, the largest difference between the two
result tables, and the speed-up bound set by the layers that still have to run.

    python benchmarks/bench_ablate.py                       # small, CPU
    python benchmarks/bench_ablate.py --layers 12 --d-model 512 --seq-len 1200 \\
        --cells 256 --batch 32 --device auto              # released scGPT size, GPU
"""

import argparse
import time

import numpy as np
import pandas as pd
import torch

from superweights.ablate import AblateSettings, build_conditions, run_ablation, select_targets
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.tokens import mask_values


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hid", type=int, default=None, help="MLP width (default: d-model)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cells", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--candidate-layers",
        type=int,
        nargs="+",
        default=None,
        help="layers holding a candidate (default: 2 spread over the first third)",
    )
    p.add_argument("--n-random", type=int, default=10)
    p.add_argument("--mask-ratio", type=float, default=0.15)
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (CUDA if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()  # fmt: skip


def make_batches(args, device) -> list[dict]:
    """Random cells with labels, `<cls>`-like first token, some padding, a fixed value mask."""
    g = torch.Generator().manual_seed(args.seed)
    pad_id = args.vocab - 1
    batches = []
    for start in range(0, args.cells, args.batch):
        n = min(args.batch, args.cells - start)
        ids = torch.randint(0, pad_id, (n, args.seq_len), generator=g)
        values = torch.randint(1, 51, (n, args.seq_len), generator=g).float()
        values[:, 0] = 0
        lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (n,), generator=g)
        pad = torch.arange(args.seq_len)[None, :] >= lengths[:, None]
        ids[pad], values[pad] = pad_id, -2.0
        batch = {"gene_ids": ids, "values": values, "padding_mask": pad}
        batch["labels"] = torch.randint(0, args.classes, (n,), generator=g)
        if args.mask_ratio > 0:
            batch["masked_values"], batch["mask"] = mask_values(
                values, pad, args.mask_ratio, args.seed + start
            )
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(args.seed)
    config = ScGPTConfig(
        ntoken=args.vocab, d_model=args.d_model, nhead=args.heads,
        d_hid=args.d_hid or args.d_model, nlayers=args.layers, n_cls=args.classes,
        dropout=0.0, pad_token_id=args.vocab - 1,
    )  # fmt: skip
    model = ScGPTModel(config).to(device).eval()
    third = max(1, args.layers // 3)
    layers = args.candidate_layers or sorted({max(0, third // 2), third - 1})
    candidates = pd.DataFrame(
        [
            {
                "module": f"transformer_encoder.layers.{layer}.linear2",
                "layer": layer,
                "row": (row := divmod(int(w.abs().argmax()), w.shape[1]))[0],
                "col": row[1],
                "accepted": True,
            }
            for layer in layers
            for w in [model.transformer_encoder.layers[layer].linear2.weight.detach()]
        ]
    )
    batches = make_batches(args, device)
    classes = [f"type{i}" for i in range(args.classes)]
    settings = AblateSettings(n_random=args.n_random)
    conditions, _ = build_conditions(model, select_targets(model, candidates, settings), settings)
    # Layers each condition runs when cached, relative to running all of them.
    share = np.mean([(args.layers - c.start) / args.layers for c in conditions])

    times, tables = {}, {}
    for name, cache in (("naive", False), ("cached", True)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_ablation(model, batches, classes, candidates, settings, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name], tables[name] = time.perf_counter() - start, result.collapse
    numeric = tables["naive"].select_dtypes("number").columns
    diff = (tables["naive"][numeric] - tables["cached"][numeric]).abs().to_numpy(dtype=float)

    print(
        f"{len(conditions)} conditions, candidates in layers {layers} of {args.layers}, "
        f"{args.cells} cells x {args.seq_len} tokens, d_model {args.d_model}, device {device}"
    )
    print(f"{'':8}{'seconds':>10}{'speed-up':>10}")
    for name in ("naive", "cached"):
        print(f"{name:8}{times[name]:10.2f}{times['naive'] / times[name]:10.2f}")
    print(f"max |difference| of all measures, naive vs cached: {np.nanmax(diff):.3g}")
    print(f"bound from encoder layers skipped (embeddings and heads aside): {1 / share:.2f}x")


if __name__ == "__main__":
    main()
