"""scGPT's TransformerModel, written out in one file with the same parameter names.

The state_dict keys and the maths match `scgpt.model.TransformerModel` (scgpt 0.2.4) for
the released configuration: continuous value encoding, `<cls>` cell embedding, no batch
labels, no domain-specific batch norm, no explicit zero probabilities. Attention goes
through `scaled_dot_product_attention`, so forward hooks on any submodule (in particular
`transformer_encoder.layers.N.linear2`, the MLP down-projection) always see ordinary
dense tensors, in train and eval mode, with or without padding.

For training on a GPU, a batch can also run *packed* (`Packing`): only the real tokens of
the cells go through the model, laid end to end, and attention runs per cell through
FlashAttention's variable-length kernel, so padding costs neither compute nor memory.
Hooks then see [tokens, D] tensors; the outputs come back in the padded [B, L] layout.

Two more fast paths, each used only where a caller asks for it and skipped where hooks
watch the modules it bypasses: `ScGPTModel.fuse` runs the elementwise work around each layer's
matrix products (dropout, residual add, LayerNorm, ReLU, the value encoder) as kernels
fused by `torch.compile`, with dynamic token counts so packed batches do not recompile;
`ScGPTModel.cell_states` computes the last layer at the `<cls>` tokens only, which is all
the classifier reads.
"""

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

log = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-5
HEADS = ("expr", "cls_logits", "mvc")


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded [B, L] batch go when laid end to end.

    `index` [T]: positions of the real tokens in the flattened batch (row-major);
    `cu_seqlens` [B+1] int32: where each cell starts among them; `max_len`: the longest
    cell; `width`: L. Padding must follow each cell's tokens (as `Collate` makes it).
    """

    index: Tensor
    cu_seqlens: Tensor
    max_len: int
    width: int

    @classmethod
    def from_padding(cls, padding_mask: Tensor) -> "Packing":
        keep = ~padding_mask.bool()
        lengths = keep.sum(dim=1)
        starts = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        index = keep.flatten().nonzero().squeeze(1)
        return cls(index, starts, int(lengths.max()), keep.shape[1])

    def to(self, device, non_blocking: bool = False) -> "Packing":
        move = {"device": device, "non_blocking": non_blocking}
        return replace(self, index=self.index.to(**move), cu_seqlens=self.cu_seqlens.to(**move))

    def pin_memory(self) -> "Packing":
        return replace(self, index=self.index.pin_memory(), cu_seqlens=self.cu_seqlens.pin_memory())

    @property
    def n_cells(self) -> int:
        return len(self.cu_seqlens) - 1

    def cell_of_token(self) -> Tensor:
        """[T] the cell (batch row) of each packed token."""
        return torch.div(self.index, self.width, rounding_mode="floor")

    def pack(self, x: Tensor) -> Tensor:
        """[B, L, ...] -> [T, ...]."""
        return x.flatten(0, 1)[self.index]

    def unpack(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """[T, ...] -> [B, L, ...], padding positions set to `fill`."""
        out = x.new_full((self.n_cells * self.width, *x.shape[1:]), fill)
        out = out.index_copy(0, self.index, x)
        return out.view(self.n_cells, self.width, *x.shape[1:])

    def padding_mask(self) -> Tensor:
        """[B, L] bool, True at padding."""
        keep = torch.zeros(self.n_cells * self.width, dtype=torch.bool, device=self.index.device)
        return ~keep.index_fill(0, self.index, True).view(self.n_cells, self.width)

    def starts(self) -> Tensor:
        """[B] the packed row of each cell's first token (its `<cls>`)."""
        return self.cu_seqlens[:-1].long()

    def repeat(self, copies: int) -> "Packing":
        """The packing of `copies` copies of the batch stacked in the batch dimension."""
        tokens, cells = len(self.index), self.n_cells * self.width
        shift = torch.arange(copies, device=self.index.device)
        index = (self.index[None, :] + shift[:, None] * cells).flatten()
        cu = self.cu_seqlens[1:][None, :] + (shift[:, None] * tokens).to(torch.int32)
        return replace(self, index=index, cu_seqlens=torch.cat([self.cu_seqlens[:1], cu.flatten()]))


@dataclass
class ScGPTConfig:
    """Architecture of an scGPT model; `from_args`/`to_args` speak scGPT's args.json."""

    ntoken: int
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    nlayers_cls: int = 3
    n_cls: int = 0
    dropout: float = 0.2
    pad_token_id: int = 60694
    pad_value: float = -2
    pre_norm: bool = False
    do_mvc: bool = False
    max_value: float = 512.0

    def __post_init__(self):
        if self.d_model % self.nhead:
            raise UserError(f"embsize {self.d_model} is not divisible by nheads {self.nhead}")
        if not 0 <= self.pad_token_id < self.ntoken:
            raise UserError(
                f"pad token id {self.pad_token_id} is outside the vocabulary of {self.ntoken} "
                "tokens; check vocab.json"
            )
        if self.nlayers_cls < 1 or self.n_cls < 0 or not 0.0 <= self.dropout < 1.0:
            raise UserError(
                f"invalid classifier/dropout settings: n_layers_cls={self.nlayers_cls}, "
                f"n_cls={self.n_cls}, dropout={self.dropout}"
            )

    @classmethod
    def from_args(
        cls, args: dict, ntoken: int, n_cls: int = 0, pad_token_id: int | None = None
    ) -> "ScGPTConfig":
        """Build from scGPT's args.json keys; unsupported architecture values raise UserError.

        `pad_token_id` defaults to `ntoken - 3`, where scGPT's vocabulary puts `<pad>`.
        """
        _check_supported(args)
        return cls(
            ntoken=ntoken,
            d_model=int(args.get("embsize", 512)),
            nhead=int(args.get("nheads", 8)),
            d_hid=int(args.get("d_hid", 512)),
            nlayers=int(args.get("nlayers", 12)),
            nlayers_cls=int(args.get("n_layers_cls", 3)),
            n_cls=n_cls,
            dropout=float(args.get("dropout", 0.2)),
            pad_token_id=ntoken - 3 if pad_token_id is None else pad_token_id,
            pad_value=args.get("pad_value", -2),
            pre_norm=_norm_scheme(args) == "pre",
            do_mvc=bool(args.get("MVC", False)),
        )

    def to_args(self) -> dict:
        """scGPT args.json keys for this architecture (plus `n_cls` and `norm_scheme`)."""
        return {
            "embsize": self.d_model,
            "nheads": self.nhead,
            "d_hid": self.d_hid,
            "nlayers": self.nlayers,
            "n_layers_cls": self.nlayers_cls,
            "n_cls": self.n_cls,
            "dropout": self.dropout,
            "pad_token": "<pad>",
            "pad_value": self.pad_value,
            "input_emb_style": "continuous",
            "cell_emb_style": "cls",
            "MVC": self.do_mvc,
            "fast_transformer": False,
            "pre_norm": self.pre_norm,
            "norm_scheme": "pre" if self.pre_norm else "post",
        }


# args.json settings this model reproduces: key -> (default, allowed values).
_SUPPORTED = {
    "input_emb_style": ("continuous", {"continuous"}),
    "cell_emb_style": ("cls", {"cls"}),
    "mvc_decoder_style": ("inner product", {"inner product"}),
    "fast_transformer_backend": ("flash", {"flash"}),
    "use_batch_labels": (False, {False}),
    "USE_BATCH_LABELS": (False, {False}),
    "INPUT_BATCH_LABELS": (False, {False}),
    "DSBN": (False, {False}),
    "domain_spec_batchnorm": (False, {False}),
}


def _check_supported(args: dict) -> None:
    for key, (default, allowed) in _SUPPORTED.items():
        value = args.get(key, default)
        if value not in allowed:
            raise UserError(
                f"args.json has {key}={value!r}, which this scGPT re-implementation does not "
                f"support (supported: {sorted(map(str, allowed))}); use a checkpoint trained "
                "with the released configuration"
            )


def _norm_scheme(args: dict) -> str:
    """'post' or 'pre' (standard pre-LN), from our `norm_scheme` key or scGPT's flags."""
    if "norm_scheme" in args:
        scheme = args["norm_scheme"]
        if scheme not in ("post", "pre"):
            raise UserError(f"args.json has norm_scheme={scheme!r}; use 'post' or 'pre'")
        return scheme
    # scGPT honours pre_norm only in its flash-attention layer, and that layer normalises
    # the residual stream itself (x = norm1(x); x = x + attn(x)), which is not pre-LN.
    if args.get("pre_norm", False) and args.get("fast_transformer", False):
        raise UserError(
            "args.json has pre_norm=true with fast_transformer=true: scGPT's flash pre-norm "
            "layer is not supported; use a post-norm checkpoint (all released ones are)"
        )
    return "post"


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.embedding = nn.Embedding(
            config.ntoken, config.d_model, padding_idx=config.pad_token_id
        )
        self.enc_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector: clamp(max), linear 1->D, ReLU, linear D->D, LayerNorm."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.max_value = config.max_value
        self.linear1 = nn.Linear(1, config.d_model)
        self.linear2 = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, values: Tensor) -> Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with packed q/k/v weights, named as nn.MultiheadAttention."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.d_model
        self.nhead = config.nhead
        self.dropout = config.dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, keep: Tensor | None, packing: Packing | None = None) -> Tensor:
        """x [B, L, D] with keep [B, 1, 1, L] (True for keys that may be attended to), or
        x [T, D] packed as `packing` says (keep unused)."""
        return self.out_proj(self.attend(x, keep, packing))

    def attend(self, x: Tensor, keep: Tensor | None, packing: Packing | None = None) -> Tensor:
        """The heads' outputs, concatenated, before `out_proj`; arguments as `forward`."""
        p = self.dropout if self.training else 0.0
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if packing is not None:
            T, D = x.shape
            q, k, v = qkv.view(T, 3, self.nhead, D // self.nhead).unbind(1)
            return _packed_attention(q, k, v, packing, p).reshape(T, D)
        B, L, D = x.shape
        q, k, v = qkv.view(B, L, 3, self.nhead, D // self.nhead).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        return y.transpose(1, 2).reshape(B, L, D)

    def attend_cls(self, x: Tensor, keep: Tensor | None, packing: Packing | None = None) -> Tensor:
        """`attend` for the query at each cell's first token (`<cls>`) only: [B, D]."""
        p = self.dropout if self.training else 0.0
        D = x.shape[-1]
        heads = (self.nhead, D // self.nhead)
        first = x[:, 0] if packing is None else x[packing.starts()]
        B = first.shape[0]
        q = F.linear(first, self.in_proj_weight[:D], self.in_proj_bias[:D]).view(B, *heads)
        kv = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:])
        if packing is not None:
            k, v = kv.view(-1, 2, *heads).unbind(1)
            return _packed_attention(q, k, v, packing, p, queries=1).reshape(B, D)
        k, v = kv.view(B, -1, 2, *heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keep, dropout_p=p)
        return y.reshape(B, D)


@functools.cache
def flash_attention_available(device: torch.device) -> bool:
    """FlashAttention runs on CUDA GPUs of compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def packing_pays(model: nn.Module) -> bool:
    """Whether packed batches run faster for `model`: FlashAttention on its device and a
    half-precision dtype (elsewhere packed attention pads the cells again)."""
    weight = next(model.parameters())
    return flash_attention_available(weight.device) and weight.dtype in (
        torch.float16,
        torch.bfloat16,
    )


def _packed_attention(
    q: Tensor, k: Tensor, v: Tensor, packing: Packing, dropout: float, queries: int = 0
):
    """Attention within each packed cell; k, v and the result are [T, heads, head_dim], and
    so is q, unless `queries` is set: then q holds each cell's first `queries` tokens only,
    [B * queries, heads, head_dim], and so does the result.

    FlashAttention's variable-length kernel on a GPU in half precision; elsewhere the cells
    are padded again for `scaled_dot_product_attention` (same maths, no speed-up).
    """
    cu, n = packing.cu_seqlens, packing.max_len
    cu_q, n_q = cu, n
    if queries:
        cu_q = queries * torch.arange(len(cu), device=cu.device, dtype=cu.dtype)
        n_q = queries
    if flash_attention_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu, n_q, n, dropout, False, False
        )[0]
    k, v = (packing.unpack(t).transpose(1, 2) for t in (k, v))
    q = (q.unflatten(0, (-1, queries)) if queries else packing.unpack(q)).transpose(1, 2)
    keep = ~packing.padding_mask()[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
    y = y.transpose(1, 2)
    return y.flatten(0, 1) if queries else packing.pack(y)


def _observed(*modules: nn.Module) -> bool:
    """Whether hooks watch any of `modules` (the fused paths would skip them)."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    if hooks._global_backward_hooks or hooks._global_backward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


class _Compiled:
    """`fn` compiled by torch.compile with dynamic shapes, so that a new token count reuses
    the kernels; where compiling fails (no working C compiler, say), `fn` itself from then
    on, for every model, with one warning."""

    failed = False

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if not _Compiled.failed:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                _Compiled.failed = True
                reason = str(err).strip().splitlines()[0]
                log.warning("fused kernels are off, torch.compile failed: %s", reason)
        return self.fn(*args)


@functools.cache
def _compiled(fn) -> _Compiled:
    return _Compiled(fn)


def _after_attention(x, a, out_w, out_b, norm_w, norm_b, w1, b1, p_attn, p_mlp, training, pre):
    """(residual stream after attention, the down-projection's input) from the heads'
    output `a`; `norm_*` is norm1 post-LN (`pre` False) and norm2 pre-LN."""
    a = F.dropout(F.linear(a, out_w, out_b), p_attn, training)
    if pre:
        x = x + a
        h = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, LAYER_NORM_EPS)
    else:
        x = h = F.layer_norm(x + a, x.shape[-1:], norm_w, norm_b, LAYER_NORM_EPS)
    return x, F.dropout(F.relu(F.linear(h, w1, b1)), p_mlp, training)


def _after_mlp(x, y, norm_w, norm_b, p_out, training, pre):
    """The layer's output from the residual stream `x` and the down-projection's output `y`."""
    r = x + F.dropout(y, p_out, training)
    return r if pre else F.layer_norm(r, r.shape[-1:], norm_w, norm_b, LAYER_NORM_EPS)


class EncoderLayer(nn.Module):
    """Transformer encoder layer with ReLU MLP; post-LN (scGPT) or pre-LN."""

    fused = False  # set by ScGPTModel.fuse

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.d_model
        self.pre_norm = config.pre_norm
        self.self_attn = SelfAttention(config)
        self.linear1 = nn.Linear(d, config.d_hid)
        self.linear2 = nn.Linear(config.d_hid, d)
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)

    def _attn(self, x: Tensor, keep: Tensor | None, packing: Packing | None) -> Tensor:
        return self.dropout1(self.self_attn(x, keep, packing))

    def residual(
        self, x: Tensor, keep: Tensor | None, packing: Packing | None = None
    ) -> tuple[Tensor, Tensor]:
        """(r, u): the residual stream after the MLP, before post-LN's final `norm2`, and
        the down-projection's input u, so that `finish(r)` is the layer's output and
        `linear2.weight[j, k]` adds `u[..., k] * weight[j, k]` to `r[..., j]`."""
        if self.pre_norm:
            x = x + self._attn(self.norm1(x), keep, packing)
            u = self.dropout(F.relu(self.linear1(self.norm2(x))))
        else:
            x = self.norm1(x + self._attn(x, keep, packing))
            u = self.dropout(F.relu(self.linear1(x)))
        return x + self.dropout2(self.linear2(u)), u

    def finish(self, r: Tensor) -> Tensor:
        """The layer's output from the residual stream `r` of `residual`."""
        return r if self.pre_norm else self.norm2(r)

    def forward(self, x: Tensor, keep: Tensor | None, packing: Packing | None = None) -> Tensor:
        if not self.fused or self._watched():
            return self.finish(self.residual(x, keep, packing)[0])
        heads = self.self_attn.attend(self.norm1(x) if self.pre_norm else x, keep, packing)
        return self._rest(x, heads)

    def forward_cls(self, x: Tensor, keep: Tensor | None, packing: Packing | None = None) -> Tensor:
        """The layer's output at each cell's first token (`<cls>`) only, [B, D]; the other
        tokens serve as keys and values. Arguments as `forward`. Only `linear2` (and, pre-LN,
        `norm1`) run as module calls, so hooks on the other modules are not called: use
        `TransformerEncoder.cell_states`, which runs the whole layer where hooks watch it."""
        heads = self.self_attn.attend_cls(self.norm1(x) if self.pre_norm else x, keep, packing)
        return self._rest(x[:, 0] if packing is None else x[packing.starts()], heads)

    def _rest(self, x: Tensor, heads: Tensor) -> Tensor:
        """The layer after attention, as plain functions (compiled when fused): from the
        residual stream `x` entering the layer and the heads' output."""
        norm = self.norm2 if self.pre_norm else self.norm1
        after_attention, after_mlp = _after_attention, _after_mlp
        if self.fused:
            after_attention, after_mlp = _compiled(_after_attention), _compiled(_after_mlp)
        x, u = after_attention(
            x, heads, self.self_attn.out_proj.weight, self.self_attn.out_proj.bias,
            norm.weight, norm.bias, self.linear1.weight, self.linear1.bias,
            self.dropout1.p, self.dropout.p, self.training, self.pre_norm,
        )  # fmt: skip
        y = self.linear2(u)
        return after_mlp(
            x, y, self.norm2.weight, self.norm2.bias, self.dropout2.p, self.training, self.pre_norm
        )

    def _watched(self) -> bool:
        """Whether hooks watch a module that `_rest` calls as a plain function."""
        attn = self.self_attn
        return _observed(attn, attn.out_proj, self.norm1, self.norm2, self.linear1,
                         self.dropout, self.dropout1, self.dropout2)  # fmt: skip


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, kept in `.layers` as in nn.TransformerEncoder."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.nlayers))

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor,
        packing: Packing | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        """Run layers start..stop-1 (all by default) on `x`, the hidden states entering `start`."""
        keep = None if packing is not None else ~padding_mask.bool()[:, None, None, :]
        for layer in self.layers[start:stop]:
            x = layer(x, keep, packing)
        return x

    def cell_states(
        self, x: Tensor, padding_mask: Tensor, packing: Packing | None = None, start: int = 0
    ) -> Tensor:
        """[B, D] output of the last layer at each cell's `<cls>` token, from `x` entering
        layer `start`. The last layer runs for the `<cls>` queries only, unless hooks watch
        this module or any of the last layer's (they then see every token, as in `forward`)."""
        last = len(self.layers) - 1
        if start <= last and not _observed(self, *self.layers[last].modules()):
            x = self(x, padding_mask, packing, start, last)
            keep = None if packing is not None else ~padding_mask.bool()[:, None, None, :]
            return self.layers[last].forward_cls(x, keep, packing)
        x = self(x, padding_mask, packing, start)
        return x[:, 0] if packing is None else x[packing.starts()]


class ExprDecoder(nn.Module):
    """Per-gene expression prediction: MLP D->D->D->1 with LeakyReLU."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.d_model
        self.fc = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.fc(hidden).squeeze(-1)


class ClsDecoder(nn.Module):
    """Cell classifier: (nlayers_cls - 1) x [Linear, ReLU, LayerNorm], then a linear output."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.d_model
        blocks = [
            (nn.Linear(d, d), nn.ReLU(), nn.LayerNorm(d, eps=LAYER_NORM_EPS))
            for _ in range(config.nlayers_cls - 1)
        ]
        self._decoder = nn.ModuleList(m for block in blocks for m in block)
        self.out_layer = nn.Linear(d, config.n_cls)

    def forward(self, cell_emb: Tensor) -> Tensor:
        x = cell_emb
        for module in self._decoder:
            x = module(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Expression from the cell embedding: (W sigmoid(gene2query(gene_emb))) . cell_emb."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.d_model
        self.gene2query = nn.Linear(d, d)
        self.W = nn.Linear(d, d, bias=False)

    def forward(self, cell_emb: Tensor, gene_emb: Tensor, cells: Tensor | None = None) -> Tensor:
        """gene_emb [B, L, D] -> [B, L]; or packed [T, D] with `cells` [T] -> [T]."""
        query = self.W(torch.sigmoid(self.gene2query(gene_emb)))
        if cells is not None:
            return (query * cell_emb[cells]).sum(-1)
        return torch.einsum("bld,bd->bl", query, cell_emb)


def _embedding(ids, values, table, pad_id, gene_w, gene_b, w1, b1, w2, b2, norm_w, norm_b,
               max_value, p, training):  # fmt: skip
    """`ScGPTModel.embed` as one function (see `GeneEncoder`, `ContinuousValueEncoder`)."""
    gene = F.embedding(ids, table, pad_id)
    gene = F.layer_norm(gene, gene.shape[-1:], gene_w, gene_b, LAYER_NORM_EPS)
    x = values.to(gene.dtype).unsqueeze(-1).clamp(max=max_value)
    x = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    x = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, LAYER_NORM_EPS)
    return gene + F.dropout(x, p, training), gene


class ScGPTModel(nn.Module):
    """scGPT TransformerModel: gene + value embeddings, encoder, and output heads."""

    fused = False  # see `fuse`

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.config = config
        self.encoder = GeneEncoder(config)
        self.value_encoder = ContinuousValueEncoder(config)
        self.transformer_encoder = TransformerEncoder(config)
        self.decoder = ExprDecoder(config)
        if config.n_cls > 0:
            self.cls_decoder = ClsDecoder(config)
        if config.do_mvc:
            self.mvc_decoder = MVCDecoder(config)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        packing: Packing | None = None,
        heads: Sequence[str] | None = None,
        cells_only: bool = False,
    ) -> dict[str, Tensor]:
        """gene_ids [B, L] long, values [B, L] float, padding_mask [B, L] bool (True = pad).

        Returns "hidden" [B, L, D], "cell_emb" [B, D] (output at `<cls>`, position 0) and the
        heads among "expr" [B, L], "cls_logits" [B, n_cls], "mvc" [B, L] that the model has
        and `heads` asks for (None: all). With `packing`, only the real tokens are computed
        (see `Packing`); outputs at padding positions are then 0. `cells_only` computes just
        what "cell_emb" and "cls_logits" need (`cell_states`) and returns only those (asking
        for another head is an error).
        """
        if gene_ids.shape != values.shape or gene_ids.shape != padding_mask.shape:
            raise ValueError(
                f"gene_ids {tuple(gene_ids.shape)}, values {tuple(values.shape)} and "
                f"padding_mask {tuple(padding_mask.shape)} must have the same [B, L] shape"
            )
        if cells_only:
            if heads is not None and set(heads) & {"expr", "mvc"}:
                raise ValueError('cells_only computes "cell_emb" and "cls_logits" only')
            out = {"cell_emb": self.cell_states(gene_ids, values, padding_mask, packing)}
            if self.config.n_cls > 0 and (heads is None or "cls_logits" in heads):
                out["cls_logits"] = self.cls_decoder(out["cell_emb"])
            return out
        if packing is not None:
            gene_ids, values = packing.pack(gene_ids), packing.pack(values)
        x, gene_emb = self.embed(gene_ids, values)
        return self.decode(self.encode(x, padding_mask, packing=packing), gene_emb, heads, packing)

    def embed(self, gene_ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden states entering layer 0, gene embeddings): gene + value embedding."""
        if not self.fused or _observed(*self.encoder.modules(), *self.value_encoder.modules()):
            gene_emb = self.encoder(gene_ids)
            return gene_emb + self.value_encoder(values.to(gene_emb.dtype)), gene_emb
        genes, value = self.encoder, self.value_encoder
        return _compiled(_embedding)(
            gene_ids, values, genes.embedding.weight, self.config.pad_token_id,
            genes.enc_norm.weight, genes.enc_norm.bias, value.linear1.weight, value.linear1.bias,
            value.linear2.weight, value.linear2.bias, value.norm.weight, value.norm.bias,
            value.max_value, value.dropout.p, self.training,
        )  # fmt: skip

    def fuse(self, enabled: bool = True) -> "ScGPTModel":
        """Run the elementwise work of the embeddings and of each layer (dropout, residual
        adds, LayerNorms, ReLU) as kernels fused by `torch.compile`, with dynamic shapes;
        the matrix products, attention and the down-projection stay ordinary calls, and any
        part that forward hooks watch runs unfused. Compiling takes a while on the first
        batches: worth it for training and long runs on a GPU. Returns the model."""
        if enabled:  # train/eval, grad/no grad, packed/padded, dtypes: one graph each
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 64))
        self.fused = enabled
        for layer in self.transformer_encoder.layers:
            layer.fused = enabled
        return self

    def cell_states(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, packing: Packing | None = None
    ) -> Tensor:
        """[B, D] encoder output at each cell's `<cls>` token (`forward`'s "cell_emb"), with
        the last layer computed for those tokens only (see `TransformerEncoder.cell_states`);
        arguments as `forward`."""
        if packing is not None:
            gene_ids, values = packing.pack(gene_ids), packing.pack(values)
        hidden = self.embed(gene_ids, values)[0]
        return self.transformer_encoder.cell_states(hidden, padding_mask.bool(), packing)

    def encode(
        self,
        hidden: Tensor,
        padding_mask: Tensor,
        start: int = 0,
        stop: int | None = None,
        packing: Packing | None = None,
    ) -> Tensor:
        """Encoder layers start..stop-1 on `hidden`, the hidden states entering layer `start`."""
        return self.transformer_encoder(hidden, padding_mask.bool(), packing, start, stop)

    def decode(
        self,
        hidden: Tensor,
        gene_emb: Tensor | None,
        heads: Sequence[str] | None = None,
        packing: Packing | None = None,
    ) -> dict[str, Tensor]:
        """The outputs of `forward` from the encoder's output (and the gene encoder's, which
        "mvc" needs: without it, "mvc" is left out)."""
        wanted = set(HEADS if heads is None else heads)
        if packing is None:
            cell_emb, unpack, cells = hidden[:, 0, :], (lambda t: t), None
        else:
            cell_emb, unpack = hidden[packing.starts()], packing.unpack
            cells = packing.cell_of_token()
        out = {"hidden": unpack(hidden), "cell_emb": cell_emb}
        if "expr" in wanted:
            out["expr"] = unpack(self.decoder(hidden))
        if "cls_logits" in wanted and self.config.n_cls > 0:
            out["cls_logits"] = self.cls_decoder(cell_emb)
        if "mvc" in wanted and self.config.do_mvc and gene_emb is not None:
            out["mvc"] = unpack(self.mvc_decoder(cell_emb, gene_emb, cells))
        return out

    def down_projections(self) -> list[nn.Linear]:
        """The MLP down-projection (`linear2`) of every layer, in order."""
        return [layer.linear2 for layer in self.transformer_encoder.layers]
