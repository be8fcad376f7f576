"""`superweights inspect DIR`: what a checkpoint folder holds and what the pipeline does with it.

The folder is checked exactly as fine-tuning loads it (args.json, vocab.json, weights,
key mapping, every tensor's shape); any problem is the loader's one-line UserError.
"""

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data.vocab import SPECIAL_TOKENS
from .checkpoint import (
    checkpoint_config,
    ignored_by_head,
    match_state_dict,
    read_args_and_vocab,
    read_state_dict,
    rename_keys,
    renamed_key,
    unused_heads,
    weights_file,
)
from .scgpt import ScGPTConfig, ScGPTModel

CLASSIFIER_OUT = "cls_decoder.out_layer.weight"


@dataclass
class CheckpointSummary:
    """A checkpoint folder's architecture, vocabulary, key mapping and heads."""

    folder: Path
    weights: Path
    config: ScGPTConfig
    n_parameters: int  # in the weights file
    vocab_size: int
    special_tokens: dict[str, int]
    renames: Counter  # (file key, model key) with layer numbers as N -> tensors
    classifier_outputs: int  # 0: no classifier head in the file
    classes: list[str]
    mvc_in_file: bool
    ignored: dict[str, list[str]]  # head prefix -> file keys not loaded
    reasons: dict[str, str]  # head prefix -> why this model does not build it

    def lines(self) -> list[str]:
        """The report printed by `superweights inspect`."""
        c, mb = self.config, self.weights.stat().st_size / 1e6
        specials = ", ".join(f"{t}={i}" for t, i in self.special_tokens.items())
        out = [
            f"checkpoint    {self.folder}",
            f"weights       {self.weights.name} ({mb:,.1f} MB, {self.n_parameters:,} parameters)",
            f"architecture  {c.nlayers} layers, d_model {c.d_model}, {c.nhead} heads, "
            f"d_hid {c.d_hid}, {'pre' if c.pre_norm else 'post'}-LN, dropout {c.dropout:g}",
            f"vocabulary    {self.vocab_size:,} tokens "
            f"({self.vocab_size - len(self.special_tokens):,} genes; {specials})",
        ]
        if self.renames:
            out.append("key mapping   flash-attention names -> PyTorch names:")
            out += [f"              {a} -> {b} ({n})" for (a, b), n in sorted(self.renames.items())]
        else:
            out.append("key mapping   none (PyTorch names)")
        n_ignored = sum(map(len, self.ignored.values()))
        if n_ignored:
            out.append(f"ignored       {n_ignored} tensors of heads this model does not build:")
            out += [
                f"              {head}* ({len(keys)}): {self.reasons[head]}"
                for head, keys in self.ignored.items()
            ]
        else:
            out.append("ignored       none (every tensor in the file is loaded)")
        out += ["heads", *(f"  {line}" for line in self._heads()), "pipeline"]
        return out + [f"  {line}" for line in self._plan()]

    def _heads(self) -> list[str]:
        lines = ["expression decoder (decoder): present"]
        if self.classifier_outputs:
            named = f": {', '.join(self.classes)}" if self.classes else ""
            lines.append(
                f"classifier (cls_decoder): present, {self.classifier_outputs} classes{named}"
            )
        else:
            lines.append("classifier (cls_decoder): absent")
        if self.config.do_mvc:
            lines.append("MVC (mvc_decoder): present")
        elif self.mvc_in_file:
            lines.append("MVC (mvc_decoder): in the file, ignored: MVC is off in args.json")
        else:
            lines.append("MVC (mvc_decoder): absent")
        return lines

    def _plan(self) -> list[str]:
        c = self.config
        if self.classifier_outputs:
            finetune = (
                "fine-tuning reuses the classifier; its output layer starts afresh unless the "
                f"data has exactly {self.classifier_outputs} cell types"
            )
        else:
            finetune = (
                f"no classifier head: fine-tuning adds one ({c.nlayers_cls} layers) with one "
                "output per cell type of the data, trained from scratch"
            )
        lines = [
            "preprocess keeps the data's genes found in this vocab.json and stops when "
            "fewer than preprocess.min_vocab_match of them are",
            "pretraining is skipped: the encoder, embeddings and decoders start from these weights",
            finetune,
            "fine-tuning trains the expression decoder only when finetune.mlm_weight > 0",
        ]
        if c.do_mvc:
            lines.append("the MVC head is loaded and kept frozen during fine-tuning")
        return lines + [
            f"the probe hooks the MLP down-projections transformer_encoder.layers.0-"
            f"{c.nlayers - 1}.linear2 ({c.d_model} x {c.d_hid} each)"
        ]


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def inspect_checkpoint(folder: str | Path) -> CheckpointSummary:
    """Load a checkpoint folder as fine-tuning does and summarise it; UserError if unusable.

    The model is built with the classifier the file holds (none when it holds none), so a
    classifier in the file is loaded and checked, never reported as ignored.
    """
    folder = Path(folder)
    args, vocab = read_args_and_vocab(folder)
    raw = read_state_dict(folder)
    state = rename_keys(raw)
    n_cls = state[CLASSIFIER_OUT].shape[0] if CLASSIFIER_OUT in state else 0
    config = checkpoint_config(args, vocab, n_cls=n_cls)
    model_state = ScGPTModel(config).state_dict()
    match_state_dict(model_state, state, config, source=folder)  # UserError unless all fit
    renames = Counter(
        (_pattern(key), _pattern(renamed_key(key))) for key in raw if renamed_key(key) != key
    )
    return CheckpointSummary(
        folder=folder,
        weights=weights_file(folder),
        config=config,
        n_parameters=sum(t.numel() for t in raw.values()),
        vocab_size=len(vocab),
        special_tokens={t: vocab[t] for t in SPECIAL_TOKENS if t in vocab},
        renames=renames,
        classifier_outputs=n_cls,
        classes=[str(c) for c in args.get("classes", [])],
        mvc_in_file=any(k.startswith("mvc_decoder.") for k in state),
        ignored=ignored_by_head([k for k in state if k not in model_state], config),
        reasons=unused_heads(config),
    )
