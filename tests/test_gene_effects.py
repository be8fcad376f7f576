"""Causal gene effects by exact gene-token ablation, on tiny scGPT models built here.

The planted model: layer 0's attention is off and its value encoder silent, so each token's
input to layer 0's MLP depends on its gene alone; MLP unit COL of layer 0 fires on PLANTED's
token only, and its down-projection weight W[ROW, COL] writes a massive activation into
channel ROW there. Layer 1's attention (random) carries it to `<cls>`, and the classifier
reads it. FREQUENT is in every cell, PLANTED in half of them.
"""

from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import stats

from helpers import CHECKPOINT_VOCAB, flash_names, released_args, write_folder
from superweights import gene_effects as ge
from superweights import gene_effects_base as geb
from superweights.channels import Channel, select_channels, with_nulls
from superweights.editing import zeroed
from superweights.errors import UserError
from superweights.model.args import CellCut
from superweights.model.checkpoint import save_checkpoint
from superweights.model.finetuned import load_test_cells
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.scores import MaskedExpressionScore

GENES = [f"G{i}" for i in range(20)]
VOCAB = {g: i for i, g in enumerate(GENES)} | {"<pad>": 20, "<cls>": 21, "<eoc>": 22}
CUT = CellCut(max_seq_len=16)
"""How the test checkpoints record that their cells were cut."""
PLANTED, FREQUENT = "G5", "G0"
MODULE = "transformer_encoder.layers.0.linear2"
ROW, COL, WEIGHT = 3, 7, 12.0
N_CLS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int = 0, dtype=torch.float32) -> ScGPTModel:
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=len(VOCAB), d_model=16, nhead=2, d_hid=32, nlayers=2, n_cls=N_CLS, dropout=0.0,
        pad_token_id=VOCAB["<pad>"],
    )  # fmt: skip
    return ScGPTModel(config).to(dtype).eval()


def _mlp_inputs(model: ScGPTModel) -> torch.Tensor:
    """Layer 0's MLP input at `<cls>` then every gene (tokens do not interact in layer 0)."""
    seen = {}
    hook = model.transformer_encoder.layers[0].linear1.register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0])
    )
    ids = torch.tensor([[VOCAB["<cls>"], *range(len(GENES))]])
    with torch.no_grad():
        model(ids, torch.ones(ids.shape), torch.zeros(ids.shape, dtype=torch.bool))
    hook.remove()
    return seen["x"][0]


def planted_model(seed: int = 0) -> ScGPTModel:
    model = random_model(seed)
    layer0 = model.transformer_encoder.layers[0]
    with torch.no_grad():
        layer0.self_attn.out_proj.weight.zero_()
        layer0.self_attn.out_proj.bias.zero_()
        model.value_encoder.linear2.weight.zero_()
        model.value_encoder.linear2.bias.zero_()
        x = _mlp_inputs(model)
        target = x[1 + VOCAB[PLANTED]]
        others = torch.cat([x[:1], x[1:][torch.arange(len(GENES)) != VOCAB[PLANTED]]])
        threshold = ((others @ target).max() + target @ target) / 2
        layer0.linear1.weight[COL] = target
        layer0.linear1.bias[COL] = -threshold
        layer0.linear2.weight[ROW, COL] = WEIGHT
    return model


def make_cells(n: int = 40, per_cell: int = 6, seed: int = 1, planted: bool = True):
    """Gene ids per cell: FREQUENT in all, PLANTED in the even cells (when `planted`), and
    `per_cell` others; expression values 1..10."""
    rng = np.random.default_rng(seed)
    pool = [i for i in range(len(GENES)) if i not in (VOCAB[PLANTED], VOCAB[FREQUENT])]
    cells = []
    for i in range(n):
        genes = [VOCAB[FREQUENT], *rng.choice(pool, per_cell, replace=False).tolist()]
        if planted and i % 2 == 0:
            genes.append(VOCAB[PLANTED])
        order = rng.permutation(len(genes))
        cells.append(([genes[k] for k in order], rng.integers(1, 11, len(genes)).tolist()))
    return cells


def make_batches(cells, batch_size: int = 8, seed: int = 2):
    labels = np.random.default_rng(seed).integers(0, N_CLS, len(cells))
    batches = []
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        length = 1 + max(len(g) for g, _ in chunk)
        ids = torch.full((len(chunk), length), VOCAB["<pad>"])
        values = torch.full((len(chunk), length), -2.0)
        for row, (genes, vals) in enumerate(chunk):
            ids[row, : len(genes) + 1] = torch.tensor([VOCAB["<cls>"], *genes])
            values[row, : len(genes) + 1] = torch.tensor([0.0, *vals])
        batches.append({"gene_ids": ids, "values": values, "padding_mask": ids == VOCAB["<pad>"],
                        "labels": torch.as_tensor(labels[start : start + len(chunk)])})  # fmt: skip
    return batches


def donors_of(n: int, n_donors: int = 5) -> pd.DataFrame:
    return pd.DataFrame({"donor": [f"D{i % n_donors}" for i in range(n)]})


def candidates(weight=WEIGHT) -> pd.DataFrame:
    return pd.DataFrame([{"candidate": "planted", "module": MODULE, "layer": 0, "row": ROW,
                          "col": COL, "weight": weight, "confirmed": True}])  # fmt: skip


# --- (1) exact ablation: the stacked copies equal a cell run alone without the gene ------


def _direct(model, channel: Channel, ids, values, label, row, col):
    """(log p drop when (row, col) is pruned, sum over tokens of |module output channel row|)
    of one cell run alone, unpadded."""
    ids, values = torch.tensor([ids]), torch.tensor([values], dtype=next(model.parameters()).dtype)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    seen = {}
    module = dict(model.named_modules())[channel.module]
    hook = module.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, values, pad)["cls_logits"].double(), 1)[0, label]
        hook.remove()
        with zeroed(model, [(channel.module, row, col)]):
            pruned = torch.log_softmax(model(ids, values, pad)["cls_logits"].double(), 1)
    return float(logp - pruned[0, label]), float(seen["y"][0, :, row].double().abs().sum())


@pytest.mark.parametrize(("dtype", "packed", "tol"), [(torch.float64, False, 1e-9),
                                                      (torch.float32, True, 2e-4)])  # fmt: skip
def test_stacked_copies_equal_each_cell_run_alone_without_the_gene(dtype, packed, tol):
    model = random_model(3, dtype)
    cells = make_cells(6, per_cell=5, planted=False)
    batches = make_batches(cells, batch_size=4)
    for b in batches:
        b["values"] = b["values"].to(dtype)
    channel = Channel("c", "transformer_encoder.layers.0.linear2", 0, 2, 5, 0.0, True,
                      nulls=((4, 1), (9, 11)))  # fmt: skip
    effects = ge.token_effects(model, batches, [channel], max_genes=3, batch_size=7,
                               packed=packed)  # fmt: skip
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert len(effects.gene) == 6 * 3  # 3 most expressed genes of each cell
    for k, (cell, gene) in enumerate(zip(effects.cell, effects.gene, strict=True)):
        genes, vals = cells[cell]
        top = sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:3]
        assert gene in [genes[i] for i in top]
        without = [(g, v) for g, v in zip(genes, vals, strict=True) if g != gene]
        for j, (row, col) in enumerate([(channel.row, channel.col), *channel.nulls]):
            full = _direct(model, channel, [VOCAB["<cls>"], *genes], [0, *vals], labels[cell],
                           row, col)  # fmt: skip
            less = _direct(model, channel, [VOCAB["<cls>"], *(g for g, _ in without)],
                           [0, *(v for _, v in without)], labels[cell], row, col)  # fmt: skip
            assert effects.logp["c"][j, k] == pytest.approx(full[0] - less[0], abs=tol)
            assert effects.act["c"][j, k] == pytest.approx(full[1] - less[1], abs=tol, rel=tol)


def _direct_path(model, module_name, ids, values, label, row, col, keep):
    """log p with weight (row, col) of `module_name` acting at token `keep` only, minus log p
    with it pruned, of one cell run alone, unpadded: a hook takes the weight's term out of
    the module's output at every other token."""
    ids, values = torch.tensor([ids]), torch.tensor([values], dtype=next(model.parameters()).dtype)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    module = dict(model.named_modules())[module_name]

    def hook(m, args, out):
        term = args[0][..., col] * m.weight[row, col]
        term[:, keep] = 0.0
        out = out.clone()
        out[..., row] -= term
        return out

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        kept = torch.log_softmax(model(ids, values, pad)["cls_logits"].double(), 1)[0, label]
        handle.remove()
        with zeroed(model, [(module_name, row, col)]):
            pruned = torch.log_softmax(model(ids, values, pad)["cls_logits"].double(), 1)
    return float(kept - pruned[0, label])


def test_path_effects_equal_the_weight_kept_at_one_token_of_a_cell_run_alone():
    model = random_model(3, torch.float64)
    cells = make_cells(6, per_cell=5, planted=False)
    batches = make_batches(cells, batch_size=4)
    for b in batches:
        b["values"] = b["values"].double()
    channel = Channel("c", "transformer_encoder.layers.0.linear2", 0, 2, 5, 0.0, True,
                      nulls=((4, 1), (9, 11)))  # fmt: skip
    effects = ge.token_effects(model, batches, [channel], max_genes=3, batch_size=7)
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    zeros = 0
    for k, (cell, gene) in enumerate(zip(effects.cell, effects.gene, strict=True)):
        genes, vals = cells[cell]
        for j, (row, col) in enumerate([(channel.row, channel.col), *channel.nulls]):
            direct = _direct_path(model, channel.module, [VOCAB["<cls>"], *genes], [0, *vals],
                                  labels[cell], row, col, 1 + genes.index(gene))  # fmt: skip
            assert effects.path["c"][j, k] == pytest.approx(direct, abs=1e-9)
            zeros += effects.path["c"][j, k] == 0.0
    assert 0 < zeros < effects.path["c"].size  # units off at some tokens (ReLU): exactly 0


def test_cell_copies_drop_one_token_and_pad_at_the_end():
    batch = make_batches(make_cells(2, per_cell=3, planted=False))[0]
    copies = ge.cell_copies(batch, 1, torch.tensor([2, 4]), VOCAB["<pad>"], -2.0)
    ids, pad = batch["gene_ids"][1], batch["padding_mask"][1]
    n = int((~pad).sum())
    assert copies["gene_ids"].shape == (3, ids.shape[0])
    assert torch.equal(copies["gene_ids"][0], ids)
    keep = [i for i in range(n) if i != 2]
    assert copies["gene_ids"][1, : n - 1].tolist() == ids[keep].tolist()
    assert copies["padding_mask"][1].tolist() == [False] * (n - 1) + [True] * (len(ids) - n + 1)
    assert copies["labels"].tolist() == [int(batch["labels"][1])] * 3


# --- (2) a planted gene-specific weight ranks its gene first ------------------------------


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    cells = make_cells(40)
    batches = make_batches(cells)
    channels = select_channels(model, candidates(), n_unconfirmed=0)
    settings = ge.GeneEffectSettings(max_genes=0, n_null=19, min_cells=3)
    result = ge.causal_gene_effects(model, batches, channels, VOCAB, settings, donors_of(40))
    return model, cells, result


def test_planted_gene_ranks_first_and_a_frequent_gene_does_not(planted):
    _, _, result = planted
    genes = result.genes_causal.set_index("gene")
    assert result.genes_causal["gene"].iloc[0] == PLANTED
    assert genes.loc[PLANTED, "rank"] == 1
    assert genes.loc[PLANTED, "path_p_null"] == pytest.approx(1 / 20)
    assert genes.loc[PLANTED, "logp_p_null"] == pytest.approx(1 / 20)
    assert genes.loc[PLANTED, "act_p_null"] == pytest.approx(1 / 20)
    assert genes["act_z"].idxmax() == PLANTED
    assert genes.loc[PLANTED, "n_cells"] == 20 and genes.loc[PLANTED, "n_donors"] == 5
    assert genes.loc[FREQUENT, "n_cells"] == 40
    assert genes.loc[FREQUENT, "rank"] > 1
    for measure in ("path", "logp"):
        planted_effect = genes.loc[PLANTED, f"{measure}_effect"]
        assert planted_effect > 0
        assert abs(genes.loc[FREQUENT, f"{measure}_effect"]) < 0.1 * planted_effect
    # Layer 0's tokens do not interact: removing another gene leaves the spike alone and
    # takes away only its own small |y[row]| from the channel's sum.
    assert abs(genes.loc[FREQUENT, "act_effect"]) < 1e-2 * genes.loc[PLANTED, "act_effect"]
    assert list(result.genes_causal.columns) == ge.GENE_COLUMNS
    assert result.genes_causal["rank"].tolist() == list(range(1, len(genes) + 1))


def test_the_token_map_measure_would_rank_the_frequent_gene_alike(planted):
    """What the causal ranking corrects: the activation on a gene's own token is the same
    for every cell carrying it, so a frequent gene with the unit's input near threshold and
    the planted gene differ only by firing; the causal effect separates them by the weight."""
    model, _, result = planted
    x = _mlp_inputs(model)
    unit = model.transformer_encoder.layers[0].linear1
    with torch.no_grad():
        fires = F.relu(unit(x))[:, COL]
    assert fires[1 + VOCAB[PLANTED]] > 0 and fires[1 + VOCAB[FREQUENT]] == 0
    assert result.summary["candidates"][0]["top_genes"][0] == PLANTED


def test_null_weights_are_ranked_against_each_other(planted):
    _, _, result = planted
    nulls = result.null_gene_effects
    assert list(nulls.columns) == ge.NULL_COLUMNS
    assert sorted(nulls["null"].unique()) == list(range(1, 20))
    one = nulls[nulls["null"] == 1]
    assert set(one["gene"]) == set(result.genes_causal["gene"])
    # z of null 1 against the others, by hand, for one gene
    gene = one["gene"].iloc[0]
    values = nulls[nulls["gene"] == gene].sort_values("null")["logp_effect"].to_numpy()
    expected = (values[0] - values[1:].mean()) / values[1:].std(ddof=1)
    assert one["logp_z"].iloc[0] == pytest.approx(expected)


def test_donor_means_weigh_donors_not_cells():
    effects = np.array([[1.0, 1.0, 1.0, 4.0, 10.0]])
    cells = np.array([0, 1, 2, 3, 4])
    genes = np.array([7, 7, 7, 7, 8])
    donors = np.array(["a", "a", "a", "b", "b"])
    ids, n_cells, n_donors, mean, se = ge.donor_means(effects, cells, genes, donors)
    assert ids.tolist() == [7, 8] and n_cells.tolist() == [4, 1] and n_donors.tolist() == [2, 1]
    assert mean[0].tolist() == [2.5, 10.0]  # (1 + 4) / 2, not (1 + 1 + 1 + 4) / 4
    assert se[0, 0] == pytest.approx(np.std([1, 4], ddof=1) / np.sqrt(2)) and np.isnan(se[0, 1])


def test_scores_against_the_null():
    values = np.array([[5.0, 0.0], [1.0, 1.0], [2.0, -1.0], [3.0, 0.0]])
    scores = ge.null_scores(values)
    assert scores["z"][0] == pytest.approx((5 - 2) / 1.0)
    assert scores["p_null"].tolist() == [0.25, 0.75]  # (1 + 0) / 4 and (1 + 2) / 4


# --- (3) calibration without a gene-specific weight ---------------------------------------


def test_exchangeable_weights_give_uniform_p_values_for_every_gene():
    """Each of 20 random weights in turn is the candidate and the other 19 its null: a gene's
    p over the 20 turns is then exactly 1/20, ..., 20/20 where no effects tie, whatever the
    model does, and no smaller where they do."""
    model = random_model(5)
    batches = make_batches(make_cells(24, planted=False))
    rng = np.random.default_rng(0)
    weight = model.transformer_encoder.layers[0].linear2.weight.detach()
    flat = rng.choice(weight.numel(), 20, replace=False)
    positions = [divmod(int(i), weight.shape[1]) for i in flat]
    channels = [
        Channel(f"w{k}", "transformer_encoder.layers.0.linear2", 0, r, c, float(weight[r, c]),
                False, "given", tuple(p for p in positions if p != (r, c)))
        for k, (r, c) in enumerate(positions)
    ]  # fmt: skip
    effects = ge.token_effects(model, batches, channels, max_genes=0)
    donors = donors_of(24)["donor"].to_numpy()
    for measure in ("path", "logp"):
        p = []
        for c in channels:
            genes, _ = ge.score_genes(effects, c, donors, str, min_cells=3)
            p.append(genes.set_index("gene")[f"{measure}_p_null"])
        table = pd.concat(p, axis=1)
        assert len(table) >= 10
        exact = 0
        for _, row in table.iterrows():
            turns = sorted(row * 20)
            # ties (`path`: weights whose unit is off at every token of the gene give exactly
            # 0) count against the candidate: p is then larger, never smaller
            assert all(t >= k - 1e-9 for t, k in zip(turns, range(1, 21), strict=True))
            exact += turns == pytest.approx(list(range(1, 21)))
        if measure == "logp":
            assert exact == len(table)


def test_p_values_are_calibrated_on_a_model_without_a_gene_specific_weight():
    """Random candidates with magnitude-matched nulls drawn as the confirmation draws them:
    the share of genes with p <= 0.1 stays within binomial bounds (for `path`, below the upper
    one), and z is centred."""
    model = random_model(7)
    n = 48
    batches = make_batches(make_cells(n, planted=False))
    rng = np.random.default_rng(1)
    picks = []
    for layer in (0, 1):
        weight = model.transformer_encoder.layers[layer].linear2.weight.detach()
        for i in rng.choice(weight.numel(), 6, replace=False):
            r, c = divmod(int(i), weight.shape[1])
            picks.append(Channel(f"L{layer}[{r},{c}]", f"transformer_encoder.layers.{layer}."
                                 "linear2", layer, r, c, float(weight[r, c]), False))  # fmt: skip
    settings = ge.GeneEffectSettings(max_genes=0, n_null=19, min_cells=3)
    channels = with_nulls(model, picks, settings.n_null, settings.band, settings.seed)
    result = ge.causal_gene_effects(model, batches, channels, VOCAB, settings, donors_of(n))
    for measure in ("path", "logp"):
        p = result.genes_causal[f"{measure}_p_null"].to_numpy()
        hits = int((p <= 0.1).sum())
        expected = 2 / 20  # P(p_null <= 0.1) with 19 nulls
        low, high = stats.binom.ppf([0.001, 0.999], len(p), expected)
        assert hits <= high, (measure, hits, len(p))
        if measure == "logp":  # `path`: a gene where the candidate's unit is always off has
            # an effect of exactly 0 and p near 1 (ties count against it): fewer hits
            assert low <= hits, (hits, len(p))
            assert abs(np.nanmean(result.genes_causal["logp_z"])) < 0.5


# --- settings, errors, files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split": "all"}, "split"),
        ({"max_genes": -1}, "max_genes"),
        ({"n_null": 1}, "n_null"),
    ],
)
def test_settings_are_checked(change, message):
    with pytest.raises(UserError, match=message):
        ge.GeneEffectSettings(**change)


def test_chosen_tokens_are_the_most_expressed():
    values = torch.tensor([0.0, 3.0, 9.0, 3.0, 1.0, -2.0])
    pad = torch.tensor([False, False, False, False, False, True])
    assert ge.chosen_tokens(values, pad, 2).tolist() == [1, 2]  # ties by position
    assert ge.chosen_tokens(values, pad, 0).tolist() == [1, 2, 3, 4]


def test_end_to_end_from_checkpoint_and_tokenised_data(tmp_path):
    model = planted_model()
    model.config.n_cls = N_CLS
    save_checkpoint(model, model.config, VOCAB, tmp_path / "ckpt", extra_args=CUT.to_args())
    cells = make_cells(30)
    bins = np.zeros((30, len(GENES)), dtype=np.float32)
    for i, (genes, vals) in enumerate(cells):
        bins[i, genes] = vals
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"t{i % N_CLS}" for i in range(30)]),
            "split": ["test"] * 24 + ["train"] * 6,
            "donor": [f"D{i % 4}" for i in range(24)] + ["T0"] * 6,
        },
        index=[f"c{i}" for i in range(30)],
    )
    adata = ad.AnnData(sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=GENES))
    drawn = pd.DataFrame({"candidate": "planted", "kind": ["magnitude"] * 4 + ["contribution"],
                          "row": [0, 1, 2, 4, 5], "col": [1, 2, 3, 4, 5]})  # fmt: skip
    drawn.to_csv(tmp_path / "nulls.tsv", sep="\t", index=False)
    settings = ge.GeneEffectSettings(max_cells=20, max_genes=0, n_null=3)
    result = ge.gene_effects(adata, tmp_path / "ckpt", candidates(), settings,
                             nulls=tmp_path / "nulls.tsv", device="cpu")  # fmt: skip
    assert result.summary["n_cells"] == 20 and result.summary["n_donors"] == 4
    assert result.genes_causal["gene"].iloc[0] == PLANTED
    assert result.null_gene_effects[["null_row", "null_col"]].drop_duplicates().values.tolist() == [
        [0, 1], [1, 2], [2, 3]
    ]  # fmt: skip
    paths = ge.write_outputs(result, tmp_path / "out")
    assert [p.name for p in paths] == ["genes_causal.tsv", "null_gene_effects.tsv", "summary.json"]
    read = pd.read_csv(paths[0], sep="\t")
    assert list(read.columns) == ge.GENE_COLUMNS and read.iloc[0]["gene"] == PLANTED


def test_nothing_to_rank_without_candidates():
    model = random_model()
    result = ge.causal_gene_effects(model, make_batches(make_cells(4)), [], VOCAB,
                                    ge.GeneEffectSettings())  # fmt: skip
    assert result.genes_causal.empty and list(result.genes_causal.columns) == ge.GENE_COLUMNS
    assert result.summary["candidates"] == []


# --- (4) the base model: masked-expression objective ----------------------------------------
#
# The planted model's value encoder is silent, so its expression predictions do not depend on
# the values: PLANTED's values are set beyond what the model predicts there with the weight, on
# the side the weight moves the prediction (5 times the shift pruning undoes, about 0.14, plus
# noise of sd 0.05), so the weight helps to predict them, as a trained weight that undershoots
# would. With random values it would hurt, and the one-sided ranking (genes the weight helps)
# would put PLANTED last. Values right at the prediction would make the benefit second order
# (shift squared), smaller than the first-order shifts the weight causes in other genes'
# predictions through layer 1; ranking by z hid that (the null weights cannot move PLANTED's
# prediction at all, so its null sd was 1e-8), ranking by p then effect does not.


def _predictions(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["gene_ids"], batch["values"], batch["padding_mask"], heads=["expr"])[
            "expr"
        ]


def planted_expression(n: int = 80):
    model = planted_model()
    cells = make_cells(n)
    batches = make_batches(cells)
    generator = torch.Generator().manual_seed(4)
    for b in batches:
        planted = b["gene_ids"] == VOCAB[PLANTED]
        noise = 0.05 * torch.randn(b["values"].shape, generator=generator)
        predicted = _predictions(model, b)
        with zeroed(model, [(MODULE, ROW, COL)]):
            shift = predicted - _predictions(model, b)
        b["values"] = torch.where(planted, predicted + 5 * shift + noise, b["values"])
    return model, batches


@pytest.mark.parametrize(("dtype", "packed", "tol"), [(torch.float64, False, 1e-9),
                                                      (torch.float32, True, 1e-4)])  # fmt: skip
def test_base_position_effects_equal_pruning_and_rerunning(dtype, packed, tol):
    model = random_model(3, dtype)
    batches = make_batches(make_cells(10, per_cell=5, planted=False), batch_size=4)
    for b in batches:
        b["values"] = b["values"].to(dtype)
    channel = Channel("c", "transformer_encoder.layers.0.linear2", 0, 2, 5, 0.0, True,
                      nulls=((4, 1), (9, 11)))  # fmt: skip
    effects = geb.position_effects(model, batches, [channel], mask_ratio=0.4, seed=3,
                                   packed=packed)  # fmt: skip
    score = geb.MaskedPositionScore(model, batches, 0.4, 3, packed=False)
    entries, cells, genes = score.masked()
    assert len(entries) == 10 * 2  # floor(0.4 * 6 genes) per cell
    assert effects.cell.tolist() == cells.tolist() and effects.gene.tolist() == genes.tolist()

    def loglik(b):
        expr = _predictions(model, b | {"values": b["masked_values"]}).double()
        squared = (expr - b["values"].double()) ** 2
        return (-0.5 * (np.log(2 * np.pi * score.variance) + squared / score.variance))[b["mask"]]

    whole = torch.cat([loglik(b) for b in score.batches])
    for j, (row, col) in enumerate([(channel.row, channel.col), *channel.nulls]):
        with zeroed(model, [(channel.module, row, col)]):
            pruned = torch.cat([loglik(b) for b in score.batches])
        assert effects.expr["c"][j] == pytest.approx((whole - pruned).numpy(), abs=tol)
    # the masks are the confirmation's: MaskedExpressionScore's mean per cell
    per_cell = pd.Series(whole.numpy()).groupby(cells).mean().to_numpy()
    reference = MaskedExpressionScore(model, batches, 0.4, 3, packed=False)(model).numpy()
    assert per_cell == pytest.approx(reference, abs=tol)


def test_base_planted_gene_ranks_first():
    model, batches = planted_expression()
    channels = select_channels(model, candidates(), n_unconfirmed=0)
    settings = ge.GeneEffectSettings(n_null=19, min_cells=3)
    result = geb.base_causal_gene_effects(model, batches, channels, VOCAB, settings,
                                          mask_ratio=0.5, obs=donors_of(80))  # fmt: skip
    genes = result.genes_causal.set_index("gene")
    assert list(result.genes_causal.columns) == geb.GENE_COLUMNS
    assert result.genes_causal["gene"].iloc[0] == PLANTED
    assert genes.loc[PLANTED, "expr_p_null"] == pytest.approx(1 / 20)
    assert genes.loc[PLANTED, "expr_effect"] > 0 and genes.loc[PLANTED, "n_donors"] == 5
    assert genes.loc[PLANTED, "n_cells"] < 40  # cells where it was masked, not all 40
    assert genes.loc[FREQUENT, "rank"] > 1
    nulls = result.null_gene_effects
    assert list(nulls.columns) == geb.NULL_COLUMNS
    assert sorted(nulls["null"].unique()) == list(range(1, 20))
    assert result.summary["candidates"][0]["top_genes"][0] == PLANTED


def test_base_exchangeable_weights_give_uniform_p_values():
    model = random_model(5)
    batches = make_batches(make_cells(24, planted=False))
    rng = np.random.default_rng(0)
    weight = model.transformer_encoder.layers[0].linear2.weight.detach()
    flat = rng.choice(weight.numel(), 20, replace=False)
    positions = [divmod(int(i), weight.shape[1]) for i in flat]
    channels = [
        Channel(f"w{k}", "transformer_encoder.layers.0.linear2", 0, r, c, float(weight[r, c]),
                False, "given", tuple(p for p in positions if p != (r, c)))
        for k, (r, c) in enumerate(positions)
    ]  # fmt: skip
    effects = geb.position_effects(model, batches, channels, mask_ratio=0.5)
    donors = donors_of(24)["donor"].to_numpy()
    p = []
    for c in channels:
        genes, _ = ge.rank_genes({"expr": effects.expr[c.candidate]}, effects.cell, effects.gene,
                                 c, donors, str, 3, geb.GENE_COLUMNS, geb.NULL_COLUMNS)  # fmt: skip
        p.append(genes.set_index("gene")["expr_p_null"])
    table = pd.concat(p, axis=1)
    assert len(table) >= 10
    for _, row in table.iterrows():
        assert sorted(row * 20) == pytest.approx(list(range(1, 21)))


def test_base_p_values_are_calibrated_on_a_model_without_a_gene_specific_weight():
    model = random_model(7)
    n = 64
    batches = make_batches(make_cells(n, planted=False))
    rng = np.random.default_rng(1)
    picks = []
    for layer in (0, 1):
        weight = model.transformer_encoder.layers[layer].linear2.weight.detach()
        for i in rng.choice(weight.numel(), 6, replace=False):
            r, c = divmod(int(i), weight.shape[1])
            picks.append(Channel(f"L{layer}[{r},{c}]", f"transformer_encoder.layers.{layer}."
                                 "linear2", layer, r, c, float(weight[r, c]), False))  # fmt: skip
    settings = ge.GeneEffectSettings(n_null=19, min_cells=3)
    channels = with_nulls(model, picks, settings.n_null, settings.band, settings.seed)
    result = geb.base_causal_gene_effects(model, batches, channels, VOCAB, settings,
                                          mask_ratio=0.5, obs=donors_of(n))  # fmt: skip
    p = result.genes_causal["expr_p_null"].to_numpy()
    hits = int((p <= 0.1).sum())
    low, high = stats.binom.ppf([0.001, 0.999], len(p), 2 / 20)
    assert len(p) >= 100
    assert low <= hits <= high, (hits, len(p))
    assert abs(np.nanmean(result.genes_causal["expr_z"])) < 0.5


def test_base_end_to_end_from_a_checkpoint_without_a_classifier(tmp_path):
    model, _ = planted_expression()
    model.config.n_cls = 0  # a pretrained checkpoint: no classifier head
    del model.cls_decoder
    save_checkpoint(model, model.config, VOCAB, tmp_path / "ckpt", extra_args=CUT.to_args())
    cells = make_cells(60)
    bins = np.zeros((60, len(GENES)), dtype=np.float32)
    for i, (genes, vals) in enumerate(cells):
        bins[i, genes] = vals
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"t{i % 2}" for i in range(60)]),
         "split": ["test"] * 50 + ["train"] * 10,
         "donor": [f"D{i % 5}" for i in range(50)] + ["T0"] * 10},
        index=[f"c{i}" for i in range(60)],
    )  # fmt: skip
    adata = ad.AnnData(sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=GENES))
    drawn = pd.DataFrame({"candidate": "planted", "kind": ["magnitude"] * 4 + ["contribution"],
                          "row": [0, 1, 2, 4, 5], "col": [1, 2, 3, 4, 5]})  # fmt: skip
    drawn.to_csv(tmp_path / "nulls.tsv", sep="\t", index=False)
    table = candidates().assign(confirmed=False, effect=0.1)
    settings = ge.GeneEffectSettings(max_cells=50, n_null=3, min_cells=2)
    result = geb.base_gene_effects(adata, tmp_path / "ckpt", table, settings,
                                   nulls=tmp_path / "nulls.tsv", n_unconfirmed=1,
                                   mask_ratio=0.5, device="cpu")  # fmt: skip
    assert result.summary["n_cells"] == 50 and result.summary["n_donors"] == 5
    assert not result.genes_causal["confirmed"].any()  # exploratory
    assert result.null_gene_effects[["null_row", "null_col"]].drop_duplicates().values.tolist() == [
        [0, 1], [1, 2], [2, 3]
    ]  # fmt: skip
    paths = ge.write_outputs(result, tmp_path / "out")
    assert [p.name for p in paths] == ["genes_causal.tsv", "null_gene_effects.tsv", "summary.json"]
    assert list(pd.read_csv(paths[0], sep="\t").columns) == geb.GENE_COLUMNS
    empty = geb.base_gene_effects(adata, tmp_path / "ckpt", table.iloc[:0], settings,
                                  device="cpu")  # fmt: skip
    assert empty.genes_causal.empty and empty.summary["candidates"] == []


# --- (5) specificity: a gene-fed weight against a weight spread over every gene -------------


def test_specificity_is_the_share_of_the_effect_mass():
    shares = ge.specificity(np.array([3.0, -1.0, 0.0]))
    assert shares.tolist() == [0.75, -0.25, 0.0]
    assert np.isnan(ge.specificity(np.zeros(2))).all()


def test_a_spread_weight_gives_every_gene_low_specificity_and_a_gene_fed_one_its_gene_high(planted):
    """The planted weight's unit fires on PLANTED's token only; the spread one's unit fires
    on every token alike (constant input), so removing any one gene moves its effect a little.
    Both pass the null for many genes; specificity tells them apart."""
    _, _, fed = planted
    genes = fed.genes_causal.set_index("gene")
    assert genes.loc[PLANTED, "specificity"] > 0.3, genes["specificity"]
    assert genes.drop(PLANTED)["specificity"].abs().max() < 0.1
    model = random_model(0)
    unit = model.transformer_encoder.layers[0]
    with torch.no_grad():
        unit.linear1.weight[COL] = 0.0
        unit.linear1.bias[COL] = 1.0
        unit.linear2.weight[ROW, COL] = WEIGHT
    batches = make_batches(make_cells(40))
    channels = select_channels(model, candidates(), n_unconfirmed=0)
    settings = ge.GeneEffectSettings(max_genes=0, n_null=19, min_cells=3)
    spread = ge.causal_gene_effects(model, batches, channels, VOCAB, settings, donors_of(40))
    table = spread.genes_causal
    n = len(table)
    assert n >= 15 and (table["logp_p_null"] <= 0.05).sum() >= 5  # many genes pass the null
    # no gene carries as much of it as PLANTED carries of the gene-fed weight
    assert table["specificity"].abs().max() < genes.loc[PLANTED, "specificity"]
    assert table["specificity"].abs().sum() == pytest.approx(1.0)


# --- (6) done when: a released-format checkpoint with a planted gene-fed weight -------------
#
# A released scGPT folder in small (args.json of the whole-human model, post-LN, value encoder
# and attention on; vocab.json; best_model.pt with flash-attention names, no classifier): gene
# RELEASED_GENE's embedding points along a random direction; up-projection unit R_COL of layer 0
# reads the mean direction of that gene's layer-0 MLP inputs (values shown or masked), with a
# threshold between its tokens and every other token, so W[R_ROW, R_COL] writes a massive
# activation on its token only. The starting model uses it to predict the gene's expression (a
# decoder unit reads channel R_ROW; the gene's value is what the model predicts with the weight);
# the fine-tuned classifier is that model with a head trained on training cells, in which the
# gene marks one cell type. The weight is not confirmed: both rankings map it as exploratory.

RELEASED_GENE, R_ROW, R_COL = "GENE7", 4, 9
R_MODULE = "transformer_encoder.layers.0.linear2"
R_POOL = [f"GENE{i}" for i in range(40)]
R_CLASSES = ["astro", "micro", "neuron"]


def _released_data(n: int = 120) -> ad.AnnData:
    """Half test cells (6 donors), half training; RELEASED_GENE at bin 20 in every astro cell."""
    rng = np.random.default_rng(0)
    bins = np.zeros((n, len(R_POOL)), np.float32)
    others = [i for i, g in enumerate(R_POOL) if g != RELEASED_GENE]
    for i in range(n):
        bins[i, rng.choice(others, 10, replace=False)] = rng.integers(1, 51, 10)
        if i % 3 == 0:
            bins[i, R_POOL.index(RELEASED_GENE)] = 20
    split = np.where(np.arange(n) < n // 2, "test", "train")
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([R_CLASSES[i % 3] for i in range(n)], categories=R_CLASSES),
         "split": split,
         "donor": [("D" if s == "test" else "T") + str(i // 3 % 6) for i, s in enumerate(split)]},
        index=[f"c{i}" for i in range(n)],
    )  # fmt: skip
    return ad.AnnData(sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=R_POOL))


def _save_released(model: ScGPTModel, folder, args: dict):
    return write_folder(folder, args, flash_names(model.state_dict()))


def _token_states(model, batches, where: str, masked: bool):
    """(states [tokens, D], gene ids [tokens]) of every real token, at `where`: "mlp" (layer 0's
    MLP input) or "out" (the encoder output); `masked`: every value set to the mask value."""
    seen, handle = [], None
    if where == "mlp":
        layer = model.transformer_encoder.layers[0].linear1
        handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    states, ids = [], []
    with torch.no_grad():
        for b in batches:
            real = ~b["padding_mask"]
            values = torch.where(real, torch.tensor(-1.0), b["values"]) if masked else b["values"]
            out = model(b["gene_ids"], values, b["padding_mask"], heads=["expr"])
            states.append((seen.pop() if handle else out["hidden"])[real])
            ids.append(b["gene_ids"][real])
    if handle:
        handle.remove()
    return torch.cat(states), torch.cat(ids)


def _plant_released(model: ScGPTModel, batches) -> None:
    gene = CHECKPOINT_VOCAB[RELEASED_GENE]
    layer0, fc = model.transformer_encoder.layers[0], model.decoder.fc
    with torch.no_grad():
        model.encoder.embedding.weight[gene] = torch.randn(
            model.config.d_model, generator=torch.Generator().manual_seed(5)
        )
        shown, masked = (_token_states(model, batches, "mlp", m) for m in (False, True))
        states, ids = torch.cat([shown[0], masked[0]]), torch.cat([shown[1], masked[1]])
        own = ids == gene
        direction = states[own].mean(0) - states[~own].mean(0)
        direction /= direction.norm()
        low, high = (states[own] @ direction).min(), (states[~own] @ direction).max()
        assert low > high
        layer0.linear1.weight[R_COL] = 4 * direction
        layer0.linear1.bias[R_COL] = -2 * (low + high)
        layer0.linear2.weight[R_ROW, R_COL] = 20.0
        # the expression decoder: unit 0 reads channel R_ROW, firing on the gene's token only
        states, ids = _token_states(model, batches, "out", masked=True)
        own = ids == gene
        low, high = states[own, R_ROW].min(), states[~own, R_ROW].max()
        assert low > high
        fc[0].weight[0], fc[0].bias[0] = 0.0, -(low + high) / 2
        fc[0].weight[0, R_ROW] = 1.0
        fc[2].weight[0], fc[2].weight[:, 0], fc[2].bias[0] = 0.0, 0.0, 0.0
        fc[2].weight[0, 0] = 1.0
        fc[4].weight[0, 0] = 20.0 / float(states[own, R_ROW].mean() + (low + high) / 2)
        predicted = torch.cat([
            model(b["gene_ids"], torch.where(~b["padding_mask"], torch.tensor(-1.0), b["values"]),
                  b["padding_mask"], heads=["expr"])["expr"][b["gene_ids"] == gene]
            for b in batches
        ])  # fmt: skip
        fc[4].bias += 20.0 - predicted.mean()  # the gene's value (bin 20) with the weight


def _train_head(model: ScGPTModel, batches, steps: int = 100) -> None:
    optimizer = torch.optim.Adam(model.cls_decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        for b in batches:
            with torch.no_grad():
                cells = model(b["gene_ids"], b["values"], b["padding_mask"], cells_only=True)
            loss = F.cross_entropy(model.cls_decoder(cells["cell_emb"]), b["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def test_released_checkpoint_with_a_gene_fed_weight_ranks_its_gene_first_in_both_models(tmp_path):
    args = released_args(embsize=32, nheads=2, d_hid=64, nlayers=2, max_seq_len=24)
    data = _released_data()
    data.write_h5ad(tmp_path / "data.h5ad")
    torch.manual_seed(0)
    config = ScGPTConfig.from_args(args, ntoken=len(CHECKPOINT_VOCAB), n_cls=0,
                                   pad_token_id=CHECKPOINT_VOCAB["<pad>"])  # fmt: skip
    base = ScGPTModel(config).eval()
    scratch = _save_released(base, tmp_path / "scratch", args)
    cells = load_test_cells(data, scratch, batch_size=64, seed=0, device="cpu", labelled=False)
    _plant_released(base, cells.batches)
    released = _save_released(base, tmp_path / "released", args)
    tuned_args = {**args, "n_cls": len(R_CLASSES), "classes": R_CLASSES}
    tuned = ScGPTModel(replace(config, n_cls=len(R_CLASSES))).eval()
    tuned.load_state_dict(base.state_dict(), strict=False)
    scratch = _save_released(tuned, tmp_path / "scratch_tuned", tuned_args)
    train = load_test_cells(data, scratch, batch_size=60, seed=0, device="cpu", split="train")
    _train_head(tuned, train.batches)
    finetuned = _save_released(tuned, tmp_path / "finetuned", tuned_args)
    table = pd.DataFrame([{"candidate": "planted", "module": R_MODULE, "layer": 0, "row": R_ROW,
                           "col": R_COL, "weight": 20.0, "confirmed": False}])  # fmt: skip
    settings = ge.GeneEffectSettings(max_genes=0, n_null=19, min_cells=3)
    inputs = {"data": tmp_path / "data.h5ad", "candidates": table}
    results = {
        "path": ge.run(inputs | {"checkpoint": finetuned}, tmp_path / "genes", settings,
                       n_unconfirmed=1),
        "expr": geb.run(inputs | {"checkpoint": released}, tmp_path / "base_genes", settings,
                        n_unconfirmed=1, mask_ratio=0.5),
    }  # fmt: skip
    for measure, result in results.items():
        genes = result.genes_causal
        assert not genes["confirmed"].any()  # exploratory
        top = genes.iloc[0]
        assert top["gene"] == RELEASED_GENE, genes.head()
        assert top[f"{measure}_p_null"] == pytest.approx(1 / 20) and top["n_donors"] >= 5
        others = genes.iloc[1:]
        assert top["specificity"] > 2 * others["specificity"].abs().max(), genes.head()
    # the classifier: many genes pass the null, as a strong weight makes them; z would have
    # ranked the gene lower, its null sd being the widest (null weights act through it too)
    logp = results["path"].genes_causal
    assert (logp["logp_p_null"] <= 0.05).sum() >= 10
    assert logp["logp_z"].idxmax() != 0
    assert logp.iloc[0]["act_z"] == logp["act_z"].max()
