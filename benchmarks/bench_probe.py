"""Time one probe round against a plain forward pass over the same cells.

Builds a random scGPT model and random tokenised cells (a quarter of them padded to
between half and full length), then reports the median wall time of each over several
repeats, after warm-up; "probe" also records the residual entering each post-LN norm2
(find_super_weights' default), "probe, no residual" does not. The target is a ratio ≤ 1.2.

    python benchmarks/bench_probe.py                       # small, CPU
    python benchmarks/bench_probe.py --layers 12 --d-model 512 --seq-len 1200 \\
        --cells 512 --batch 32 --device auto --dtype bf16  # released scGPT size, GPU
"""

import argparse
import statistics
import time

import torch

from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.probe import find_super_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-hid", type=int, default=None, help="MLP width (default: d-model)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cells", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_batches(args, device: torch.device) -> list[dict]:
    """Random cells: gene ids, binned values, `<cls>`-like first token, some padding."""
    g = torch.Generator().manual_seed(args.seed)
    pad_id = args.vocab - 1
    batches = []
    for start in range(0, args.cells, args.batch):
        n = min(args.batch, args.cells - start)
        ids = torch.randint(0, pad_id, (n, args.seq_len), generator=g)
        values = torch.randint(0, 51, (n, args.seq_len), generator=g).float()
        values[:, 0] = 0
        lengths = torch.full((n,), args.seq_len)
        padded = torch.rand(n, generator=g) < 0.25
        short = torch.randint(args.seq_len // 2, args.seq_len + 1, (n,), generator=g)
        lengths[padded] = short[padded]
        pad = torch.arange(args.seq_len)[None, :] >= lengths[:, None]
        ids[pad], values[pad] = pad_id, -2.0
        batch = {"gene_ids": ids, "values": values, "padding_mask": pad}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def timed(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in seconds of each function, run in turn so load affects all alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = ScGPTConfig(
        ntoken=args.vocab,
        d_model=args.d_model,
        nhead=args.heads,
        d_hid=args.d_hid or args.d_model,
        nlayers=args.layers,
        pad_token_id=args.vocab - 1,
    )
    model = ScGPTModel(config).to(device=device, dtype=DTYPES[args.dtype]).eval()
    batches = make_batches(args, device)

    def run(m: torch.nn.Module) -> None:
        for batch in batches:
            m(**batch)

    def forward() -> None:
        with torch.no_grad():
            run(model)

    fns = {
        "forward": forward,
        "probe": lambda: find_super_weights(model, run, max_rounds=1),
        "probe, no residual": lambda: find_super_weights(model, run, max_rounds=1, residual=False),
    }
    seconds = timed(fns, device, args.warmup, args.repeats)
    print(
        f"# {device} {args.dtype}: {args.layers} layers, d {args.d_model}, "
        f"seq {args.seq_len}, {args.cells} cells, batch {args.batch}, "
        f"median of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print(f"{'':18} {'seconds':>10} {'cells/s':>10} {'ratio':>7}")
    for name, s in seconds.items():
        print(f"{name:18} {s:10.4f} {args.cells / s:10.1f} {s / seconds['forward']:7.3f}")


if __name__ == "__main__":
    main()
