"""Pruning test: a planted super weight is confirmed, a random one is not, the model is kept.

The planted model is pre-LN. The `<cls>` value (0) drives a value-encoder unit, layer 0's
LayerNorm gain amplifies it, and one MLP unit of layer 0 fires on `<cls>` only; its
down-projection weight W[ROW, K] turns that into a massive activation in channel ROW of
the `<cls>` residual stream. The classifier's first units carry a bias of -40 that this
activation (about +100) cancels, so they are silent without it. The planted entries stay
fixed while the rest of the model learns an easy four-class task.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from superweights import ablate as ablate_module
from superweights.ablate import (
    AblateSettings,
    ablate,
    embed,
    fixed_batches,
    forward_from,
    read_candidates,
    run_ablation,
    run_layers,
    topk_counts,
    write_outputs,
)
from superweights.ablate_plots import FIGURES, write_figures
from superweights.errors import UserError
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.train import TrainSettings, make_loader, split_datasets

GENES = [f"GENE{i}" for i in range(60)]
VOCAB = {g: i for i, g in enumerate(GENES)} | {"<pad>": 60, "<cls>": 61, "<eoc>": 62}
CLASSES = ["astro", "micro", "neuron", "oligo"]
ROW, K = 5, 7  # the planted super weight: layer 0 linear2.weight[ROW, K]
PLANTED = "transformer_encoder.layers.0.linear2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenised(n: int = 800, seed: int = 0) -> ad.AnnData:
    """Binned cells: each type expresses 5 of its 10 marker genes and 4-10 shared genes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 4, n)
    bins = np.zeros((n, len(GENES)), dtype=np.float32)
    for i, t in enumerate(types):
        genes = np.concatenate(
            [rng.choice(10, 5, replace=False) + 10 * t, rng.choice(20, rng.integers(4, 11)) + 40]
        )
        bins[i, genes] = rng.integers(1, 51, len(genes))
    split = np.array(["train", "val", "test", "test"])[np.arange(n) % 4]
    split[: n // 2] = "train"
    obs = pd.DataFrame(
        {
            "label": pd.Categorical([CLASSES[t] for t in types], categories=CLASSES),
            "split": split,
            "Braak": rng.choice(["Braak II", "Braak V"], n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(X=sp.csr_matrix(bins), obs=obs, var=pd.DataFrame(index=GENES))


def planted_model(seed: int = 0) -> tuple[ScGPTModel, dict]:
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=len(VOCAB), d_model=32, nhead=4, d_hid=48, nlayers=3, n_cls=4, dropout=0.0,
        pad_token_id=VOCAB["<pad>"], pre_norm=True,
    )  # fmt: skip
    model = ScGPTModel(config)
    frozen = {}

    def plant(param, index, value):
        with torch.no_grad():
            param[index] = value
        frozen.setdefault(param, torch.zeros_like(param, dtype=torch.bool))[index] = True

    values, layer0 = model.value_encoder, model.transformer_encoder.layers[0]
    gate = model.cls_decoder._decoder[0]
    unit, channel = 3, 9
    plant(values.linear1.weight, (unit, 0), -50.0)  # fires for value 0 (<cls>) only
    plant(values.linear1.bias, unit, 10.0)
    plant(values.linear2.weight, (slice(None), unit), 0.0)
    plant(values.linear2.weight, (channel, unit), 5.0)
    plant(layer0.norm2.weight, channel, 10.0)
    plant(layer0.linear1.weight, K, 0.0)
    plant(layer0.linear1.weight, (K, channel), 0.25)
    plant(layer0.linear1.bias, K, -5.0)
    plant(layer0.linear2.weight, (ROW, K), 24.0)
    plant(gate.weight, (slice(None), ROW), 1.0)
    plant(gate.bias, slice(None), -40.0)
    return model, frozen


def train(model: ScGPTModel, frozen: dict, adata: ad.AnnData, epochs: int = 6) -> None:
    settings = TrainSettings(batch_size=32, max_seq_len=17, seed=0)
    data = split_datasets(adata, VOCAB, settings, labelled=True)
    loader = make_loader(data["train"], settings, VOCAB["<pad>"], shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
            loss = F.cross_entropy(out["cls_logits"], batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            for param, mask in frozen.items():
                param.grad[mask] = 0.0
            optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def setup():
    adata = tokenised()
    model, frozen = planted_model()
    train(model, frozen, adata)
    settings = TrainSettings(batch_size=64, max_seq_len=17, seed=0)
    test = split_datasets(adata, VOCAB, settings, labelled=True)["test"]
    loader = make_loader(test, settings, VOCAB["<pad>"], shuffle=False)
    batches = fixed_batches(loader, mask_ratio=0.15, seed=0, device="cpu")
    obs = adata.obs[adata.obs["split"] == "test"]
    layer1 = model.transformer_encoder.layers[1].linear2.weight.detach()
    row, col = divmod(int(layer1.abs().argmin()), layer1.shape[1])
    candidates = pd.DataFrame(
        {
            "module": [PLANTED, "transformer_encoder.layers.1.linear2"],
            "layer": [0, 1],
            "row": [ROW, row],
            "col": [K, col],
            "weight": [24.0, float(layer1[row, col])],
            "accepted": [True, True],
        }
    )
    return {"adata": adata, "model": model, "batches": batches, "obs": obs, "cands": candidates}


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(model, before: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


SMALL = {"n_random": 8, "scales": (0.0, 0.5, 1.0, 2.0)}


@pytest.fixture(scope="module")
def result(setup):
    model = setup["model"]
    before = snapshot(model)
    out = run_ablation(
        model, setup["batches"], CLASSES, setup["cands"], AblateSettings(**SMALL), setup["obs"],
        {i: g for g, i in VOCAB.items()},
    )  # fmt: skip
    assert_identical(model, before)
    assert not model.training
    return out


@pytest.mark.parametrize("pre_norm", [False, True])
def test_forward_from_reproduces_the_full_forward(pre_norm):
    torch.manual_seed(1)
    config = ScGPTConfig(
        ntoken=40, d_model=32, nhead=4, d_hid=48, nlayers=3, n_cls=3, pad_token_id=39,
        pre_norm=pre_norm, do_mvc=True,
    )  # fmt: skip
    model = ScGPTModel(config).eval()
    ids = torch.randint(0, 39, (3, 12))
    values = torch.randint(0, 51, (3, 12)).float()
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 7:] = True
    ids[pad], values[pad] = 39, -2.0
    with torch.no_grad():
        full = model(ids, values, pad)
        gene_emb = model.encoder(ids)
        for start in range(config.nlayers + 1):
            hidden = run_layers(model, embed(model, ids, values), pad, 0, start)
            out = forward_from(model, hidden, pad, start, gene_emb=gene_emb)
            assert out.keys() == full.keys()
            for key, value in full.items():
                torch.testing.assert_close(out[key], value, atol=1e-5, rtol=0)


def test_planted_super_weight_is_confirmed_and_a_random_weight_is_not(result, setup):
    confirmed = result.confirmed.set_index("candidate")
    planted, other = confirmed.index
    assert planted == f"L0[{ROW},{K}]"
    assert confirmed.loc[planted, "confirmed"] and not confirmed.loc[other, "confirmed"]
    assert confirmed.loc[planted, "reason"].startswith("confirmed: ")
    assert confirmed.loc[other, "reason"].startswith("rejected: ")
    collapse = result.collapse.set_index("condition")
    original = collapse.loc["original", "log_likelihood"]
    pruned = collapse.loc[f"prune {planted}"]
    controls = result.controls.set_index(["candidate", "control"])
    random = controls.loc[(planted, "random")]
    # The planted weight takes the model to chance level or worse; random weights do nothing.
    assert pruned["collapse"] > 1.0 and pruned["accuracy"] < 0.5
    assert random["n"] == 8 and abs(random["collapse_mean"]) < 1e-2
    assert pruned["log_likelihood"] < random["log_likelihood_mean"] - 100 * random["collapse_sd"]
    assert confirmed.loc[planted, "z_random"] > 100
    assert confirmed.loc[planted, "topk_collapse"] < 0.1
    # Writing the super activation back recovers the loss: exactly on all tokens, mostly on
    # the spike token (<cls>) alone.
    assert controls.loc[(planted, "restore_all"), "recovered"] == pytest.approx(1.0, abs=1e-6)
    assert controls.loc[(planted, "restore_spike"), "recovered"] > 0.7
    scale = result.scaling.set_index("factor")
    scale = scale[scale["candidate"] == planted]
    assert scale.loc[1.0, "log_likelihood"] == pytest.approx(original, abs=1e-9)
    assert scale.loc[0.0, "log_likelihood"] == pytest.approx(pruned["log_likelihood"], abs=1e-9)
    assert collapse.loc["prune all accepted", "collapse"] > 1.0
    k = topk_counts(setup["model"], [1e-3])[1e-3]
    assert confirmed.loc[planted, "topk_k"] == k
    assert set(result.controls["control"]) >= {"random", "same_row", "same_col", f"top-{k}"}


def test_measures_strata_and_shift(result, setup):
    collapse = result.collapse.set_index("condition")
    original = collapse.loc["original"]
    assert original["accuracy"] > 0.9 and original["collapse"] == 0
    # Gaussian log-likelihood of the original residuals with their own variance.
    expected = -0.5 * (np.log(2 * np.pi * original["expr_mse"]) + 1)
    assert original["expr_gaussian_ll"] == pytest.approx(expected)
    strata = result.strata
    assert set(strata["stratum"]) == {"cell type", "Braak"}  # no ADNC column in obs
    mine = strata[strata["condition"] == "original"]
    n_test = len(setup["obs"])
    assert mine.groupby("stratum")["n_cells"].sum().eq(n_test).all()
    assert (mine["collapse"] == 0).all()
    classes = result.shift[(result.shift["what"] == "class") & (result.shift["kind"] == "prune")]
    planted = classes[classes["candidate"] == f"L0[{ROW},{K}]"]
    assert list(planted["name"]) == CLASSES
    assert planted["original"].sum() == pytest.approx(1.0) and planted["pruned"].sum() == (
        pytest.approx(1.0)
    )
    genes = result.shift[result.shift["what"] == "gene"]
    assert set(genes["kind"]) == {"prune", "prune_all"} and genes["name"].isin(GENES).all()
    for _, part in genes.groupby("condition"):
        assert len(part) <= 20 and part["change"].is_monotonic_decreasing


def test_cached_evaluation_equals_naive(setup):
    settings = AblateSettings(n_random=2, scales=(0.0, 2.0), topk_fractions=(1e-3,))
    args = (setup["model"], setup["batches"], CLASSES, setup["cands"], settings, setup["obs"])
    cached = run_ablation(*args, cache=True).collapse
    naive = run_ablation(*args, cache=False).collapse
    assert list(cached["condition"]) == list(naive["condition"])
    assert cached["start_layer"].max() == 1
    numeric = cached.select_dtypes("number").columns.drop(["draw", "k", "start_layer"])
    diff = (cached[numeric] - naive[numeric]).abs().to_numpy()
    assert np.nanmax(diff) <= 1e-5


def test_outputs_and_figures_are_written(result, tmp_path):
    paths = write_outputs(result, tmp_path)
    names = {p.name for p in paths}
    assert names == {f"{n}.tsv" for n in ablate_module.OUTPUT_TABLES} | {"summary.json"}
    confirmed = pd.read_csv(tmp_path / "confirmed.tsv", sep="\t")
    assert list(confirmed["confirmed"]) == [True, False] and confirmed["reason"].notna().all()
    assert len(pd.read_csv(tmp_path / "collapse.tsv", sep="\t")) == len(result.collapse)
    figures = write_figures(result, tmp_path)
    assert [p.stem for p in figures] == list(FIGURES)
    assert all(p.stat().st_size > 5000 for p in figures)
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_accepted_candidates_the_strongest_spikes_are_tested(setup):
    model, before = setup["model"], snapshot(setup["model"])
    cands = setup["cands"].assign(accepted=False)
    settings = AblateSettings(n_random=2, scales=(0.0,), n_strongest=1)
    unmasked = [
        {k: v for k, v in setup["batches"][0].items() if "mask" not in k or k == "padding_mask"}
    ]
    out = run_ablation(model, unmasked, CLASSES, cands, settings)
    (row,) = out.confirmed.itertuples()
    assert (row.layer, row.row, row.col) == (0, ROW, K) and not row.probe_accepted
    assert row.source.startswith("probe: strongest") and row.confirmed
    assert "prune all accepted" not in set(out.collapse["condition"])
    assert "expr_mse" not in out.collapse.columns
    # An empty table falls back to the largest weight of each down-projection.
    empty = read_candidates(cands.iloc[:0])
    out = run_ablation(model, unmasked, CLASSES, empty, settings)
    assert list(out.confirmed["candidate"]) == [f"L0[{ROW},{K}]"]
    assert_identical(model, before)


def test_weights_are_restored_when_a_condition_fails(setup, monkeypatch):
    model, before = setup["model"], snapshot(setup["model"])
    calls = {"n": 0}
    real = ablate_module.forward_from

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate_module, "forward_from", failing)
    settings = AblateSettings(n_random=2, scales=(0.0,))
    with pytest.raises(RuntimeError, match="boom"):
        run_ablation(model, setup["batches"], CLASSES, setup["cands"], settings)
    assert_identical(model, before)


def test_ablate_from_checkpoint_and_tokenised_data(setup, tmp_path):
    model = setup["model"]
    folder = save_checkpoint(model, model.config, VOCAB, tmp_path / "checkpoint")
    table = tmp_path / "candidates.tsv"
    setup["cands"].iloc[:1].drop(columns="accepted").to_csv(table, sep="\t", index=False)
    settings = AblateSettings(
        n_random=3, scales=(0.0,), max_cells=64, batch_size=32, max_seq_len=17,
        strata_columns=("Braak", "Overall AD neuropathological Change"),
    )  # fmt: skip
    out = ablate(setup["adata"], folder, table, settings, device="cpu")
    assert out.summary["n_cells"] == 64 and out.confirmed["confirmed"].all()
    assert set(out.strata["stratum"]) == {"cell type", "Braak"}


def test_user_errors(setup):
    model, batches = setup["model"], setup["batches"][:1]
    cands = setup["cands"].iloc[:1]
    settings = AblateSettings(n_random=2, scales=(0.0,))
    for bad in (
        cands.assign(module="transformer_encoder.layers.9.linear2"),
        cands.assign(row=10_000),
        cands.assign(weight=-3.0),
    ):
        with pytest.raises(UserError, match="candidate"):
            run_ablation(model, batches, CLASSES, bad, settings)
    with pytest.raises(UserError, match="lacks column"):
        read_candidates(cands.drop(columns="col"))
    with pytest.raises(UserError, match="confirm_fraction"):
        AblateSettings(confirm_fraction=0.5)
    with pytest.raises(UserError, match="n_random"):
        AblateSettings(n_random=1)
