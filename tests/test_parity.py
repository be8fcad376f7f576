"""Parity with scgpt 0.2.4: its TransformerModel (PyTorch attention path) and its vocabulary.

scGPT's model file is loaded by `load_reference_module`, without running `import scgpt`
(which fails with current torch). Skipped where scgpt is not installed
(`pip install --no-deps scgpt==0.2.4`; the pipeline itself does not need it).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from superweights.data.vocab import load_vocab
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.scgpt_reference import load_reference_module

NTOKEN, PAD_ID, N_CLS = 100, 97, 5


def _load_scgpt_model_module():
    try:
        return load_reference_module()
    except ImportError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def pair():
    """scGPT's model and ours with the same weights (dropout 0, so train == eval maths)."""
    scgpt_model = _load_scgpt_model_module()
    torch.manual_seed(0)
    theirs = scgpt_model.TransformerModel(
        ntoken=NTOKEN,
        d_model=64,
        nhead=4,
        d_hid=48,
        nlayers=3,
        nlayers_cls=3,
        n_cls=N_CLS,
        vocab={"<pad>": PAD_ID},
        dropout=0.0,
        pad_token="<pad>",
        pad_value=-2,
        do_mvc=True,
        use_fast_transformer=False,
    )
    ours = ScGPTModel(
        ScGPTConfig(
            ntoken=NTOKEN,
            d_model=64,
            nhead=4,
            d_hid=48,
            nlayers=3,
            n_cls=N_CLS,
            dropout=0.0,
            pad_token_id=PAD_ID,
            do_mvc=True,
        )
    )
    with torch.no_grad():  # non-default values everywhere, so LayerNorms and biases count
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert list(theirs.state_dict()) == list(ours.state_dict())  # names match 1:1, in order
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    B, L = 4, 12
    gene_ids = torch.randint(0, PAD_ID, (B, L), generator=g)
    gene_ids[:, 0] = 98  # a <cls>-like token at position 0
    values = torch.randint(0, 51, (B, L), generator=g).float()
    values[:, 0] = 0
    values[0, 3] = 900.0  # above the 512 clamp
    lengths = torch.tensor([12, 9, 5, 1])
    padding = torch.arange(L)[None, :] >= lengths[:, None]
    gene_ids[padding] = PAD_ID
    values[padding] = -2
    return gene_ids, values, padding


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout0"])
def test_outputs_match_scgpt(pair, train):
    theirs, ours = pair
    theirs.train(train)
    ours.train(train)
    gene_ids, values, padding = _batch()
    real = ~padding
    with torch.no_grad():
        ref = theirs(gene_ids, values, padding, CLS=True, MVC=True)
        ref_hidden = theirs._encode(gene_ids, values, padding)
        out = ours(gene_ids, values, padding)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    # scGPT's eval path runs nested tensors and returns zeros at padded positions; compare
    # real positions only (padded outputs are never used downstream).
    torch.testing.assert_close(out["hidden"][real], ref_hidden[real], **tol)
    torch.testing.assert_close(out["cell_emb"], ref["cell_emb"], **tol)
    torch.testing.assert_close(out["cls_logits"], ref["cls_output"], **tol)
    torch.testing.assert_close(out["expr"][real], ref["mlm_output"][real], **tol)
    torch.testing.assert_close(out["mvc"][real], ref["mvc_output"][real], **tol)
    assert out["hidden"].abs().max() > 0.5  # not a degenerate all-zero comparison


def test_initialisation_follows_scgpt(pair):
    """Fresh models share scGPT's init choices: zero attention biases, uniform embeddings."""
    fresh = ScGPTModel(ScGPTConfig(ntoken=NTOKEN, d_model=64, nhead=4, pad_token_id=PAD_ID))
    attn = fresh.transformer_encoder.layers[0].self_attn
    assert torch.count_nonzero(attn.in_proj_bias) == 0
    assert torch.count_nonzero(attn.out_proj.bias) == 0
    assert fresh.encoder.embedding.weight.abs().max() <= 0.1
    assert fresh.encoder.embedding.weight[PAD_ID].abs().sum() > 0  # scGPT re-inits this row


def test_shipped_gene_list_is_scgpt_census_vocabulary():
    """The shipped human genes, with ids, are scgpt's census vocabulary; specials follow."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None:
        pytest.skip("scgpt is not installed (pip install --no-deps scgpt==0.2.4)")
    package = Path(next(iter(spec.submodule_search_locations)))
    theirs = json.loads((package / "tokenizer" / "default_census_vocab.json").read_text())
    ours = load_vocab()
    assert {g: i for g, i in ours.items() if not g.startswith("<")} == theirs
    n = len(theirs)
    assert (
        [ours[t] for t in ("<pad>", "<cls>", "<eoc>")] == [n, n + 1, n + 2] == [60694, 60695, 60696]
    )
