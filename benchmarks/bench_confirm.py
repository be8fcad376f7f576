"""Time `confirm_super_weights` on one candidate: null draws per second, cached vs naive.

Builds a random scGPT classifier and random cells (the first token `<cls>`-like, a quarter
of the cells padded to between half and full length), plants nothing (the time does not
depend on the verdict), and confirms one candidate of layer `--layer` with `--null` draws,
twice in the same run: with the score's cached prefix (layers below the candidate run
once) and without it (every draw runs the whole model). Each row gives the wall time, the
time per null draw, cell-forwards per second, and the time projected for 1,000 draws.

    python benchmarks/bench_confirm.py                         # small, CPU
    python benchmarks/bench_confirm.py --layers 12 --d-model 512 --vocab 60697 \\
        --seq-len 1200 --cells 1000 --batch 100 --null 50 --dtype bf16   # released size, GPU
"""

import argparse
import contextlib
import time

import pandas as pd
import torch
from bench_probe import DTYPES, make_batches

from superweights.confirm import ConfirmSettings, confirm_super_weights
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.scores import CellTypeScore


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--layer", type=int, default=1, help="layer of the candidate")
    p.add_argument("--null", type=int, default=20, help="null draws per mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Uncached(CellTypeScore):
    """The same score without the prefix cache: every call runs the whole model."""

    def from_layer(self, layer):
        return contextlib.nullcontext()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(args.seed)
    config = ScGPTConfig(
        ntoken=args.vocab, d_model=args.d_model, nhead=args.heads, d_hid=args.d_model,
        nlayers=args.layers, n_cls=args.classes, pad_token_id=args.vocab - 1,
    )  # fmt: skip
    model = ScGPTModel(config).to(device=device, dtype=DTYPES[args.dtype]).eval()
    batches = make_batches(args, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    for b in batches:
        b["labels"] = torch.randint(0, args.classes, (len(b["gene_ids"]),), generator=g).to(device)
    weight = model.transformer_encoder.layers[args.layer].linear2.weight
    row, col = divmod(int(weight.detach().abs().argmax()), weight.shape[1])
    candidate = pd.DataFrame(
        {"module": [f"transformer_encoder.layers.{args.layer}.linear2"], "row": [row], "col": [col]}
    )
    settings = ConfirmSettings(n_null=args.null, n_boot=200, topk_sweep=())
    rows, tables = [], {}
    for name, score in (("cached", CellTypeScore), ("naive", Uncached)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = confirm_super_weights(model, candidate, score(model, batches), settings=settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        tables[name] = result.nulls["effect"].to_numpy()
        forwards = args.null + 4  # base, candidate, restore, top-k
        rows.append((name, seconds, seconds / forwards, forwards * args.cells / seconds))
    diff = float(abs(tables["cached"] - tables["naive"]).max())
    print(
        f"# {device} {args.dtype}: {args.layers} layers, d {args.d_model}, seq {args.seq_len}, "
        f"{args.cells} cells, batch {args.batch}, candidate in layer {args.layer}, "
        f"{args.null} null draws; max |cached - naive| null effect {diff:.2e}"
    )
    print(f"{'mode':8} {'seconds':>9} {'s/draw':>8} {'cell-fwd/s':>11} {'1,000 draws':>12}")
    for name, seconds, per_draw, rate in rows:
        print(f"{name:8} {seconds:9.2f} {per_draw:8.3f} {rate:11.0f} {per_draw * 1004:11.0f}s")
    print(f"speed-up cached/naive: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
