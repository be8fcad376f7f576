"""Time one probe round against a plain forward pass over the same cells, padded and packed.

Builds a random scGPT model and random tokenised cells, then reports the median wall time
of each row over several repeats, after warm-up. Cells are a quarter padded to between
half and full length, or, with --min-len, uniform in length from --min-len to --seq-len
(314..1200 averages 757 genes, as real cells do). "probe" also records the residual
entering each post-LN norm2 (find_super_weights' default), "no residual" does not.
"packed" rows run only the real tokens (`Packing`; FlashAttention on a GPU in bf16).
"ratio" is each row's time over the plain forward of its own layout (and fusion) (the target is
<= 1.15 for the probe); "x padded" is its cells/s over the padded forward's (the target
for the packed forward is >= 2). --fuse adds rows with `ScGPTModel.fuse` (elementwise
kernels fused by torch.compile; compiled during warm-up). --profile DIR writes a
torch.profiler table of one packed probe round there.

    python benchmarks/bench_probe.py                       # small, CPU
    python benchmarks/bench_probe.py --layers 12 --d-model 512 --seq-len 1200 \\
        --min-len 314 --cells 1024 --batch 32 --device auto --dtype bf16  # released, GPU
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from superweights.model.scgpt import Packing, ScGPTConfig, ScGPTModel
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
    p.add_argument("--min-len", type=int, default=None, help="shortest cell (see above)")
    p.add_argument("--cells", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="folder for a profile of the probe")
    p.add_argument("--fuse", action="store_true", help="also rows with fused kernels")
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
        if getattr(args, "min_len", None):
            lengths = torch.randint(args.min_len, args.seq_len + 1, (n,), generator=g)
        else:
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

    packings = [Packing.from_padding(b["padding_mask"]) for b in batches]

    def runner(packed: bool):
        def run(m: torch.nn.Module) -> None:
            for batch, packing in zip(batches, packings, strict=True):
                m(**batch, packing=packing if packed else None)

        return run

    def fused(fn):
        def go() -> None:
            model.fuse()
            try:
                fn()
            finally:
                model.fuse(False)

        return go

    def forward(packed: bool):
        def go() -> None:
            with torch.no_grad():
                runner(packed)(model)

        return go

    def probe(packed: bool, residual: bool = True):
        return lambda: find_super_weights(model, runner(packed), max_rounds=1, residual=residual)

    fns = {
        "forward": forward(False),
        "probe": probe(False),
        "probe, no residual": probe(False, False),
        "forward, packed": forward(True),
        "probe, packed": probe(True),
        "probe, packed, no resid.": probe(True, False),
    }
    if args.fuse:
        fns["forward, packed, fused"] = fused(forward(True))
        fns["probe, packed, fused"] = fused(probe(True))
        fns["probe, packed, fused, no res."] = fused(probe(True, False))
    seconds = timed(fns, device, args.warmup, args.repeats)
    tokens = sum(int((~b["padding_mask"]).sum()) for b in batches)
    print(
        f"# {device} {args.dtype}: {args.layers} layers, d {args.d_model}, seq {args.seq_len}, "
        f"{args.cells} cells ({tokens / args.cells:.0f} genes on average), batch {args.batch}, "
        f"median of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print(f"| {'row':30} | {'seconds':>8} | {'cells/s':>8} | {'ratio':>6} | {'x padded':>8} |")
    print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|{'-' * 9}:|")
    for name, s in seconds.items():
        layout = ("packed" if "packed" in name else "") + (", fused" if "fused" in name else "")
        own = seconds[f"forward, {layout}" if layout else "forward"]
        print(
            f"| {name:30} | {s:8.4f} | {args.cells / s:8.0f} | {s / own:6.3f} "
            f"| {seconds['forward'] / s:8.2f} |"
        )
    if args.profile:
        write_profile(probe(True), device, args.profile)


def write_profile(fn, device: torch.device, folder: str) -> None:
    """A torch.profiler table of one call of `fn`, by total time, in `folder`/profile.txt."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "profile.txt").write_text(table)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (Path(folder) / "profile_cpu.txt").write_text(cpu)


if __name__ == "__main__":
    main()
