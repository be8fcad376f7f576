"""Time `confirm_super_weights` on one candidate: stacked conditions vs the per-draw loops.

Builds a random scGPT classifier and random cells (`<cls>`-like first token; lengths as
bench_probe.py makes them), plants nothing (the time does not depend on the verdict), and
confirms one candidate of layer `--layer`, in the same run:

  stacked  the fast path: packed cells where it pays (FlashAttention, bf16), layers below
           the candidate run once (prefix cache), the null draws scored as stacked
           conditions (`CellTypeScore.zeroed_scores`), with --null draws;
  loop, packed  one forward per draw from the candidate's layer on, packed, --slow-null
           draws (what stacking adds beyond packing and the prefix cache);
  cached   one forward per draw from the candidate's layer on, padded, --slow-null draws;
  naive    one whole-model forward per draw, padded, --slow-null draws.

The stacked path also runs with --slow-null draws, to check its null effects against the
naive loop's (max |difference| printed, beside that of the two loops, which differ by
rounding alone). Each row gives the draws, the wall time, the
time for 1,000 draws (measured for stacked when --null is 1000; otherwise projected
from the time per evaluation) and the speed-up over naive ("x"). A "score" table
compares one plain scoring pass in cells/s: padded with the last layer on every token (as
before `cell_states`), padded, packed and, with --fuse, packed with fused kernels
(`ScGPTModel.fuse`; --fuse also runs the confirmations fused).

    python benchmarks/bench_confirm.py                         # small, CPU
    python benchmarks/bench_confirm.py --layers 12 --d-model 512 --vocab 60697 --seq-len 1200 \\
        --min-len 314 --cells 1000 --batch 100 --null 1000 --slow-null 20 --dtype bf16  # GPU
"""

import argparse
import contextlib
import logging
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
    p.add_argument("--min-len", type=int, default=None, help="shortest cell (bench_probe.py)")
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--layer", type=int, default=1, help="layer of the candidate")
    p.add_argument("--null", type=int, default=100, help="null draws of the stacked path")
    p.add_argument("--slow-null", type=int, default=10, help="null draws of the loops")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true", help="fused kernels (ScGPTModel.fuse)")
    return p.parse_args()


class EveryToken(CellTypeScore):
    """The score with the last layer computed on every token, not only at `<cls>`."""

    def per_cell(self, model, hidden, start, batch, packing):
        hidden = model.encode(hidden, batch["padding_mask"], start, packing=packing)
        cells = hidden[:, 0] if packing is None else hidden[packing.starts()]
        logp = torch.log_softmax(model.cls_decoder(cells).double(), dim=1)
        return logp.gather(1, batch["labels"][:, None]).squeeze(1)


class Loop(CellTypeScore):
    """The score without stacked conditions: one forward per draw, from the cached prefix."""

    batches_conditions = None


class Cached(Loop):
    """The same, padded."""

    def __init__(self, model, batches):
        super().__init__(model, batches, packed=False)


class Uncached(Cached):
    """The padded loop without the prefix cache: every draw runs the whole model."""

    def from_layer(self, layer):
        return contextlib.nullcontext()


def timed(device, fn):
    """(seconds, result) of `fn()`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    args = parse_args()
    logging.getLogger("superweights.confirm").setLevel(logging.ERROR)  # small-null warnings
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
    tokens = sum(int((~b["padding_mask"]).sum()) for b in batches)
    print(
        f"# {device} {args.dtype}: {args.layers} layers, d {args.d_model}, seq {args.seq_len}, "
        f"{args.cells} cells ({tokens / args.cells:.0f} genes on average), batch {args.batch}, "
        f"candidate in layer {args.layer}"
    )
    score_table(model, batches, device, args.fuse)
    model.fuse(args.fuse)

    def confirm(score_class, draws):
        settings = ConfirmSettings(n_null=draws, n_boot=200, topk_sweep=())
        score = score_class(model, batches)
        return timed(
            device, lambda: confirm_super_weights(model, candidate, score, settings=settings)
        )

    confirm(CellTypeScore, 2)  # warm-up: kernels, allocator
    runs = {
        "stacked": (CellTypeScore, args.null),
        "stacked, check": (CellTypeScore, args.slow_null),
        "loop, packed": (Loop, args.slow_null),
        "cached": (Cached, args.slow_null),
        "naive": (Uncached, args.slow_null),
    }
    rows, nulls = [], {}
    for name, (score_class, draws) in runs.items():
        seconds, result = confirm(score_class, draws)
        nulls[name] = result.nulls["effect"].to_numpy()
        evaluations = draws + 4  # base, candidate, restore, top-k
        thousand = seconds if draws == 1000 else seconds / evaluations * 1004
        rows.append((name, draws, seconds, thousand))
    diff = float(abs(nulls["stacked, check"] - nulls["naive"]).max())
    rounding = float(abs(nulls["loop, packed"] - nulls["naive"]).max())
    scale = float(abs(nulls["naive"]).max())
    print(
        f"# null effects: max |stacked - naive| {diff:.2e}, max |packed loop - naive| "
        f"{rounding:.2e} (rounding alone), largest |effect| {scale:.2e}"
    )
    print(
        f"| {'confirmation':14} | {'draws':>5} | {'seconds':>8} | {'1,000 draws':>11} | {'x':>5} |"
    )
    print(f"|{'-' * 16}|{'-' * 6}:|{'-' * 9}:|{'-' * 12}:|{'-' * 6}:|")
    naive = rows[-1][3]
    for name, draws, seconds, thousand in rows:
        print(
            f"| {name:14} | {draws:5} | {seconds:8.1f} | {thousand:10.0f}s "
            f"| {naive / thousand:5.1f} |"
        )


def score_table(model, batches, device, fuse: bool) -> None:
    """Cells/s of one plain scoring pass (all layers, classifier), padded and packed."""
    cells = sum(len(b["gene_ids"]) for b in batches)
    rows = {
        "padded, every token": (EveryToken, False, False),
        "padded": (CellTypeScore, False, False),
        "packed": (CellTypeScore, True, False),
    }
    if fuse:
        rows["packed, fused"] = (CellTypeScore, True, True)
    seconds = {}
    for name, (score_class, packed, fused) in rows.items():
        model.fuse(fused)
        score = score_class(model, batches, packed=packed)
        score(model)  # warm-up (and compilation)
        seconds[name] = min(timed(device, lambda s=score: s(model))[0] for _ in range(3))
    model.fuse(False)
    first = next(iter(seconds.values()))
    print(f"| {'score pass':20} | {'seconds':>8} | {'cells/s':>8} | {'x first':>8} |")
    print(f"|{'-' * 22}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|")
    for name, s in seconds.items():
        print(f"| {name:20} | {s:8.3f} | {cells / s:8.0f} | {first / s:8.2f} |")


if __name__ == "__main__":
    main()
