"""Channel -> gene attribution on a tiny scGPT model with a planted super channel."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from superweights import channels as ch
from superweights.errors import UserError
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel

GENES = [f"G{i}" for i in range(10)] + ["APP", "MAPT"]
VOCAB = {g: i for i, g in enumerate(GENES)} | {"<pad>": 12, "<cls>": 13, "<eoc>": 14}
PLANTED = "G4"
MODULE = "transformer_encoder.layers.1.linear2"
ROW, COL, WEIGHT = 5, 3, 8.0
N_CELLS = 12
CELLS_WITH_PLANTED = range(8)


def _layer1_mlp_inputs(model: ScGPTModel, layer: int = 1) -> torch.Tensor:
    """Input of a layer's MLP for `<cls>` then every gene (tokens do not interact)."""
    seen = {}
    hook = model.transformer_encoder.layers[layer].linear1.register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0])
    )
    ids = torch.tensor([[VOCAB["<cls>"], *range(len(GENES))]])
    with torch.no_grad():
        model(ids, torch.ones(ids.shape), torch.zeros(ids.shape, dtype=torch.bool))
    hook.remove()
    return seen["x"][0]


@pytest.fixture
def model():
    """Tokens do not interact (attention and value encoder zeroed), so each token's hidden
    state depends on its gene only; hidden unit COL of layer 1 fires on PLANTED alone."""
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=len(VOCAB), d_model=16, nhead=2, d_hid=32, nlayers=2, n_cls=2, dropout=0.0,
        pad_token_id=VOCAB["<pad>"],
    )  # fmt: skip
    m = ScGPTModel(config).eval()
    with torch.no_grad():
        for layer in m.transformer_encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        m.value_encoder.linear2.weight.zero_()
        m.value_encoder.linear2.bias.zero_()
        x = _layer1_mlp_inputs(m)
        target = x[1 + VOCAB[PLANTED]]
        others = torch.cat([x[:1], x[1:][torch.arange(len(GENES)) != VOCAB[PLANTED]]])
        threshold = ((others @ target).max() + target @ target) / 2
        up = m.transformer_encoder.layers[1].linear1
        up.weight[COL] = target
        up.bias[COL] = -threshold
        m.transformer_encoder.layers[1].linear2.weight[ROW, COL] = WEIGHT
    return m


def _cells():
    """Genes per cell: PLANTED in cells 0-7; MAPT in none; APP and a few others in all."""
    rng = np.random.default_rng(3)
    cells = []
    for i in range(N_CELLS):
        genes = set(rng.choice(10, 5, replace=False).tolist()) - {VOCAB[PLANTED]}
        genes |= {VOCAB["APP"]} | ({VOCAB[PLANTED]} if i in CELLS_WITH_PLANTED else set())
        cells.append(sorted(genes))
    return cells


def _batches(cells, batch_size=5):
    batches = []
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        length = 1 + max(map(len, chunk))
        ids = torch.full((len(chunk), length), VOCAB["<pad>"])
        values = torch.full((len(chunk), length), -2.0)
        for row, genes in enumerate(chunk):
            ids[row, : len(genes) + 1] = torch.tensor([VOCAB["<cls>"], *genes])
            values[row, : len(genes) + 1] = torch.arange(len(genes) + 1, dtype=torch.float32)
        batches.append({"gene_ids": ids, "values": values, "padding_mask": ids == VOCAB["<pad>"]})
    return batches


OBS = pd.DataFrame(
    {
        "cell_type": ["A", "B"] * (N_CELLS // 2),
        "ADNC": pd.Categorical(["High"] * 4 + ["Low"] * 6 + [np.nan] * 2, ["Low", "High"]),
    }
)


def _candidates(weight=WEIGHT):
    return pd.DataFrame(
        [
            {"candidate": "L1[5,3]", "module": MODULE, "layer": 1, "row": ROW, "col": COL,
             "weight": weight, "confirmed": True, "collapse": 2.0},
            {"candidate": "L0[0,1]", "module": "transformer_encoder.layers.0.linear2", "layer": 0,
             "row": 0, "col": 1, "weight": np.nan, "confirmed": False, "collapse": 0.5},
            {"candidate": "L0[2,2]", "module": "transformer_encoder.layers.0.linear2", "layer": 0,
             "row": 2, "col": 2, "weight": np.nan, "confirmed": False, "collapse": 0.1},
        ]
    )  # fmt: skip


def _settings(**kwargs):
    kwargs.setdefault("genes_of_interest", ("APP", "MAPT", "TREM2", PLANTED))
    kwargs.setdefault("min_cells", 2)
    kwargs.setdefault("n_null", 20)
    return ch.ChannelSettings(strata_columns=("ADNC",), **kwargs)


def _run(model, settings=None):
    channels = ch.select_channels(model, _candidates(), n_unconfirmed=1)
    batches = _batches(_cells())
    return ch.map_channel_genes(model, batches, channels, VOCAB, settings or _settings(), OBS)


def _hidden(model: ScGPTModel, layer: int, token: int) -> torch.Tensor:
    """Layer `layer`'s MLP hidden units (the down-projection's input) at a token, which
    depends on the token's gene only (position 0 = `<cls>`)."""
    mlp = model.transformer_encoder.layers[layer].linear1
    with torch.no_grad():
        return F.relu(mlp(_layer1_mlp_inputs(model, layer)[token]))


def test_planted_gene_ranks_first_with_its_z_against_the_null(model):
    settings = _settings()
    genes = _run(model, settings).genes
    overall = genes[(genes["candidate"] == "L1[5,3]") & (genes["stratum_type"] == "all")]
    assert list(overall.columns) == ch.GENE_COLUMNS
    first = overall.iloc[0]
    assert first["gene"] == PLANTED and first["rank"] == 1 and first["percentile"] == 100
    assert first["n_cells"] == len(CELLS_WITH_PLANTED)
    hidden = _hidden(model, 1, 1 + VOCAB[PLANTED])
    assert first["xw"] == pytest.approx(WEIGHT * hidden[COL].item(), rel=1e-5)
    # every cell gives the planted gene the same activations, so its standard error is 0
    # and z compares the candidate with the null weights' |x * w| alone
    (channel,) = ch.with_nulls(model, ch.select_channels(model, _candidates(), 0), 20, 2.0, 0)
    weight = model.transformer_encoder.layers[1].linear2.weight.detach()
    null = np.array([abs(hidden[c].item() * weight[r, c].item()) for r, c in channel.nulls])
    assert len(null) == 20 and first["se"] == pytest.approx(0, abs=1e-6)
    expected = (WEIGHT * hidden[COL].item() - null.mean()) / null.std(ddof=1)
    assert first["z"] == pytest.approx(expected, rel=1e-4)
    assert first["p_null"] == pytest.approx(1 / 21)
    rest = overall.iloc[1:]
    assert (rest["xw"] == 0).all() and (rest["z"] < first["z"]).all()
    assert (rest["ablation_effect"] == 0).all() and first["ablation_effect"] != 0


def test_each_null_weight_is_ranked_like_the_candidate_against_the_other_nulls(model):
    """null_genes.tsv: null weight j's z is its |x * w| against the other null weights'."""
    result = _run(model)
    table = result.null_genes
    assert list(table.columns) == ch.NULL_GENE_COLUMNS
    (channel,) = ch.with_nulls(model, ch.select_channels(model, _candidates(), 0), 20, 2.0, 0)
    own = table[table["candidate"] == "L1[5,3]"]
    assert own["null"].unique().tolist() == list(range(1, 21))
    weight = model.transformer_encoder.layers[1].linear2.weight.detach()
    gene = "APP"  # in every cell; activations depend on the gene only, so every se is 0
    hidden = _hidden(model, 1, 1 + VOCAB[gene])
    a = np.array([abs(hidden[c].item() * weight[r, c].item()) for r, c in channel.nulls])
    for j in (1, 7, 20):
        rows = own[own["null"] == j]
        assert (rows["null_row"].iloc[0], rows["null_col"].iloc[0]) == channel.nulls[j - 1]
        assert rows["z"].is_monotonic_decreasing and ch.CLS not in set(rows["gene"])
        assert (rows["n_cells"] >= 2).all()
        others = np.delete(a, j - 1)
        expected = (a[j - 1] - others.mean()) / others.std(ddof=1)
        got = rows.set_index("gene").loc[gene, "z"]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the candidate's own tables are unchanged by the null rankings
    assert list(result.genes.columns) == ch.GENE_COLUMNS


def test_the_confirmations_null_draws_are_used_when_given(model):
    channels = ch.select_channels(model, _candidates(), 0)
    drawn = pd.DataFrame({"candidate": "L1[5,3]", "row": [0, 1, 2, 3], "col": [1, 2, 3, 4]})
    (channel,) = ch.with_nulls(model, channels, 3, 2.0, 0, drawn)
    assert channel.nulls == ((0, 1), (1, 2), (2, 3)) and "confirmation" in channel.null
    (own,) = ch.with_nulls(model, channels, 3, 2.0, 0, drawn.head(1))  # too few: drawn here
    assert own.nulls != channel.nulls[:3] and len(own.nulls) == 3
    with pytest.raises(UserError, match="outside"):
        ch.with_nulls(model, channels, 3, 2.0, 0, drawn.assign(row=10_000))


def test_weights_of_one_column_rank_genes_differently(model):
    """The old score (mean |input of col|) gave every weight of a column the same ranking."""
    with torch.no_grad():
        model.transformer_encoder.layers[1].linear2.weight[0, COL] = 3.0
    first = _candidates().head(1)
    table = pd.concat([first, first.assign(candidate="L1[0,3]", row=0, weight=3.0)])
    channels = ch.select_channels(model, table, n_unconfirmed=0)
    result = ch.map_channel_genes(model, _batches(_cells()), channels, VOCAB, _settings(), OBS)
    overall = result.genes[result.genes["stratum_type"] == "all"]
    orders = [part["gene"].tolist() for _, part in overall.groupby("candidate")]
    assert orders[0][0] == orders[1][0] == PLANTED
    assert orders[0] != orders[1]


def test_rankings_have_no_ties(model):
    genes = _run(model).genes
    for _, part in genes.groupby(["candidate", "stratum_type", "stratum"]):
        assert part["z"].is_unique and part["z"].notna().all()


def test_cls_is_reported_apart(model):
    result = _run(model)
    assert ch.CLS not in set(result.genes["gene"])
    cls = result.cls.set_index(["candidate", "stratum_type", "stratum"])
    assert list(result.cls.columns) == ch.CLS_COLUMNS
    assert cls.loc[("L1[5,3]", "all", "all"), "n_cells"] == N_CELLS
    assert cls.loc[("L1[5,3]", "ADNC", "High"), "n_cells"] == 4
    # the planted unit is silent at <cls>; unit 1 of layer 0 is what L0[0,1] adds there
    assert cls.loc[("L1[5,3]", "all", "all"), "xw"] == 0
    w = model.transformer_encoder.layers[0].linear2.weight[0, 1].item()
    expected = _hidden(model, 0, 0)[1].item() * w
    got = cls.loc[("L0[0,1]", "all", "all"), "xw"]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ablation_effect_is_the_expression_change(model):
    genes = _run(model).genes
    row = genes.query("candidate == 'L1[5,3]' and stratum_type == 'all' and gene == @PLANTED")
    ids = torch.tensor([[VOCAB["<cls>"], VOCAB[PLANTED]]])
    args = (ids, torch.tensor([[0.0, 1.0]]), torch.zeros_like(ids, dtype=torch.bool))
    with torch.no_grad():
        before = model(*args)["expr"][0, 1].item()
        weight = model.transformer_encoder.layers[1].linear2.weight
        weight[ROW, COL] = 0.0
        after = model(*args)["expr"][0, 1].item()
        weight[ROW, COL] = WEIGHT
    assert row["ablation_effect"].item() == pytest.approx(after - before, rel=1e-4, abs=1e-6)


def test_strata_count_cells_per_cell_type_and_adnc(model):
    genes = _run(model).genes
    planted = genes[(genes["candidate"] == "L1[5,3]") & (genes["gene"] == PLANTED)]
    strata = zip(planted["stratum_type"], planted["stratum"], strict=True)
    counts = dict(zip(strata, planted["n_cells"], strict=True))
    assert counts == {
        ("all", "all"): 8,
        ("cell type", "A"): 4,
        ("cell type", "B"): 4,
        ("ADNC", "High"): 4,
        ("ADNC", "Low"): 4,
    }
    assert (planted["rank"] == 1).all()


def test_genes_of_interest_report_missing_genes(model, caplog):
    result = _run(model, _settings(min_cells=9))
    table = result.genes_of_interest
    overall = table[(table["candidate"] == "L1[5,3]") & (table["stratum_type"] == "all")]
    status = dict(zip(overall["gene"], overall["status"], strict=True))
    assert status == {
        "APP": "ranked",
        "MAPT": "not in these cells",
        "TREM2": "not in vocabulary",
        PLANTED: "in fewer than min_cells cells",
    }
    app = overall.set_index("gene").loc["APP"]
    assert app["n_cells"] == N_CELLS and app["rank"] >= 1 and 0 <= app["percentile"] <= 100
    assert "TREM2" in caplog.text and "MAPT" in caplog.text


def test_genes_missing_from_the_data_are_told_apart(model):
    channels = ch.select_channels(model, _candidates(), n_unconfirmed=0)
    result = ch.map_channel_genes(
        model, _batches(_cells()), channels, VOCAB, _settings(), OBS, data_genes=GENES[:-1]
    )
    status = result.genes_of_interest.set_index("gene")["status"]
    assert status["MAPT"].unique().tolist() == ["not in the data"]


def test_weights_and_mode_are_restored(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    _run(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_select_channels_adds_the_strongest_unconfirmed(model):
    channels = ch.select_channels(model, _candidates(), n_unconfirmed=1)
    assert [(c.candidate, c.confirmed) for c in channels] == [("L1[5,3]", True), ("L0[0,1]", False)]
    assert channels[0].weight == WEIGHT and channels[1].layer == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": 1.5}, "listed as 1.5"),
        ({"row": 99}, "outside its weight"),
        ({"module": "decoder.fc.0"}, "not a linear layer"),
    ],
)
def test_select_channels_rejects_foreign_candidates(model, change, message):
    table = _candidates().head(1).assign(**change)
    with pytest.raises(UserError, match=message):
        ch.select_channels(model, table)


def test_no_confirmed_weight_maps_nothing_by_default(model, caplog):
    table = _candidates().assign(confirmed=False)
    channels = ch.select_channels(model, table, n_unconfirmed=ch.ChannelSettings().n_unconfirmed)
    result = ch.map_channel_genes(model, _batches(_cells()), channels, VOCAB, _settings(), OBS)
    assert channels == [] and result.genes.empty and result.cls.empty
    assert list(result.genes.columns) == ch.GENE_COLUMNS
    assert "set channels.n_unconfirmed for an exploratory map" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [({"min_cells": 1}, "standard error needs 2 cells"), ({"n_null": 1}, "n_null must be >= 2"),
     ({"band": 1.0}, "band > 1")],
)  # fmt: skip
def test_settings_are_checked(change, message):
    with pytest.raises(UserError, match=message):
        ch.ChannelSettings(**change)


def test_select_channels_needs_columns(model):
    with pytest.raises(UserError, match="lacks column"):
        ch.select_channels(model, pd.DataFrame({"module": [MODULE]}))


def test_map_channels_end_to_end(tmp_path, model):
    save_checkpoint(model, model.config, VOCAB, tmp_path / "ckpt")
    bins = np.zeros((N_CELLS, len(GENES)), dtype=np.float32)
    for i, genes in enumerate(_cells()):
        bins[i, genes] = np.arange(1, len(genes) + 1)
    obs = OBS.assign(split=["test"] * 10 + ["train"] * 2)
    adata = ad.AnnData(sp.csr_matrix(bins), obs=obs.set_axis([f"c{i}" for i in range(N_CELLS)]))
    adata.var_names = GENES
    table = _candidates().head(1)
    drawn = pd.DataFrame({"candidate": "L1[5,3]", "row": [0, 1, 2, 3], "col": [1, 2, 3, 4]})
    drawn.to_csv(tmp_path / "nulls.tsv", sep="\t", index=False)
    result = ch.map_channels(
        adata, tmp_path / "ckpt", table, _settings(max_cells=9), nulls=tmp_path / "nulls.tsv"
    )
    assert result.channels["nulls"].tolist() == [4] and "confirmation" in result.channels["null"][0]
    assert result.summary["n_cells"] == 9
    assert result.summary["candidates"][0]["top_genes"][0] == PLANTED
    paths = ch.write_outputs(result, tmp_path / "out")
    assert [p.name for p in paths] == [
        "genes.tsv", "genes_of_interest.tsv", "cls.tsv", "channels.tsv", "null_genes.tsv",
        "summary.json"
    ]  # fmt: skip
    nulls = pd.read_csv(paths[4], sep="\t")
    assert sorted(nulls["null"].unique()) == [1, 2, 3, 4]
    read = pd.read_csv(paths[0], sep="\t")
    assert read.iloc[0]["gene"] == PLANTED


def test_default_genes_of_interest_start_with_the_core_genes():
    genes = ch.default_genes_of_interest()
    assert genes[:6] == ("APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2")
    assert "BIN1" in genes and len(set(genes)) == len(genes)
