"""Write a checkpoint folder with random weights at released scGPT size, for timing runs.

scGPT's whole-human architecture (12 layers, d 512, 8 heads, d_hid 512) and its 60,697-token
vocabulary (the shipped human gene list plus `<pad>`, `<cls>`, `<eoc>`), without a
classifier head, as released checkpoints come.

    python benchmarks/make_checkpoint.py --out models/random_scgpt [--layers 12 --d-model 512]
"""

import argparse

import torch

from superweights.data.vocab import load_vocab
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    vocab = load_vocab()
    config = ScGPTConfig(
        ntoken=len(vocab), d_model=args.d_model, nhead=args.heads, d_hid=args.d_model,
        nlayers=args.layers, pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    print(save_checkpoint(ScGPTModel(config), config, vocab, args.out))


if __name__ == "__main__":
    main()
