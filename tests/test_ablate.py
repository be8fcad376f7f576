"""Pruning test of the scGPT stage: a planted super weight is confirmed, an ordinary one is
not, the tables and figures are written, and the model is kept. The model is
`helpers.planted_model`, trained on `helpers.tokenised` cells.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import CLASSES, PLANTED, ROW, VOCAB, K, planted_model, tokenised, train
from superweights.ablate import (
    OUTPUT_TABLES,
    AblateSettings,
    ablate,
    run_ablation,
    write_outputs,
)
from superweights.ablate_plots import FIGURE_FILES, write_figures
from superweights.editing import read_candidates
from superweights.errors import UserError
from superweights.model.args import CellCut
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTModel
from superweights.model.tokens import split_datasets
from superweights.model.train import TrainSettings, make_loader
from superweights.outputs import cell_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    adata = tokenised()
    model, frozen = planted_model()
    train(model, frozen, adata)
    settings = TrainSettings(batch_size=64, max_seq_len=17, seed=0)
    test = split_datasets(adata, VOCAB, max_seq_len=17, seed=0, labelled=True)["test"]
    loader = make_loader(test, settings, VOCAB["<pad>"], shuffle=False)
    batches = list(loader)
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


SMALL = {"n_null": 39, "n_boot": 200, "scales": (0.0, 0.5, 1.0, 2.0), "topk_sweep": (1e-3,)}


@pytest.fixture(scope="module")
def result(setup):
    model = setup["model"]
    before = snapshot(model)
    out = run_ablation(
        model, setup["batches"], CLASSES, setup["cands"], AblateSettings(**SMALL), setup["obs"]
    )
    assert_identical(model, before)
    assert not model.training
    return out


def test_planted_super_weight_is_confirmed_and_an_ordinary_weight_is_not(result):
    table = result.confirmed.set_index("candidate")
    planted, ordinary = table.loc[f"L0[{ROW},{K}]"], table.loc["L1" + table.index[1][2:]]
    assert planted.confirmed and planted.tier == "super weight"
    assert planted.reason.startswith("super weight: confirmed")
    assert planted.effect > 1.0 and planted.ci_low > 0.5 and planted.p_value == 1 / 40
    assert planted.p_contribution == 1 / 40 and planted.massive
    assert planted.n_groups == 8  # donors
    assert not ordinary.confirmed and abs(ordinary.effect) < 1e-3
    assert ordinary.tier == "not confirmed"
    assert planted.recovered > 0.9  # restoring the <cls> spike brings the classifier back
    assert result.summary["confirmed"] == [f"L0[{ROW},{K}]"]
    assert result.summary["super_weights"] == [f"L0[{ROW},{K}]"]
    # The spike varies between cells, but the classifier uses it as a fixed bias (it only
    # has to cancel the gate's -40): its mean over cells does the job, 0 does not.
    assert planted.spike_mean > 40 and planted.spike_sd > 0
    assert abs(planted.mean_spike_effect) < 0.01 * planted.effect
    assert planted.zero_spike_effect > 0.9 * planted.effect
    assert result.summary["original_accuracy"] > 0.9


def test_scaling_shift_strata_and_cells(result):
    planted = f"L0[{ROW},{K}]"
    scaling = result.scaling[result.scaling["candidate"] == planted].set_index("factor")
    effect = result.confirmed.set_index("candidate").loc[planted, "effect"]
    assert scaling.loc[0.0, "effect"] == pytest.approx(effect)
    assert scaling.loc[1.0, "effect"] == pytest.approx(0.0, abs=1e-12)
    shift = result.shift[result.shift["candidate"] == planted]
    assert shift["original"].sum() == pytest.approx(1.0) and shift["pruned"].sum() == pytest.approx(
        1
    )
    cells = result.cells[result.cells["candidate"] == planted]
    assert len(cells) == len(result.cells) // 2 and cells["effect"].mean() == pytest.approx(effect)
    strata = result.strata[result.strata["candidate"] == planted].set_index(["stratum", "value"])
    assert set(strata.loc["cell type"].index) == set(CLASSES)
    assert (strata.loc["cell type", "status"] == "compared").all()
    high = strata.loc[("Overall AD neuropathological Change", "High")]
    assert high.n_donors == 2 and np.isnan(high.effect) and high.status.startswith("too few")
    low = strata.loc[("Overall AD neuropathological Change", "Low")]
    assert low.n_donors == 6 and low.ci_low <= low.effect <= low.ci_high
    # The super activation per cell, and its spread per stratum, add up to the overall mean.
    overall = result.confirmed.set_index("candidate").loc[planted, "spike_mean"]
    assert cells["spike"].mean() == pytest.approx(overall)
    types = strata.loc["cell type"]
    assert (types["spike_mean"] * types["n_cells"]).sum() / types["n_cells"].sum() == (
        pytest.approx(overall)
    )
    assert (types["spike_sd"] > 0).all()
    assert "omitted" in result.summary["expression"]


def test_cell_map_holds_embeddings_effects_and_null_effects(result, setup):
    """The per-cell null effects average to the null effects of nulls.tsv (same draws)."""
    cells, planted = result.cell_map, f"L0[{ROW},{K}]"
    assert cells.uns["candidates"] == list(result.confirmed["candidate"])
    with torch.no_grad():
        b = setup["batches"][0]
        direct = setup["model"](b["gene_ids"], b["values"], b["padding_mask"])["cell_emb"]
    np.testing.assert_allclose(cells.obsm["X_cls"][: len(direct)], direct.numpy(), atol=1e-5)
    own = result.cells[result.cells["candidate"] == planted]
    np.testing.assert_allclose(cells.obs[cell_key("effect", planted)], own["effect"])
    own_nulls = result.nulls[result.nulls["candidate"] == planted]
    nulls = own_nulls.loc[own_nulls["kind"] == "magnitude", "effect"].to_numpy()
    np.testing.assert_allclose(cells.obsm[cell_key("null", planted)].mean(axis=0), nulls, atol=1e-9)
    assert list(cells.obs["cell_type"]) == list(own["cell_type"])
    assert "Overall AD neuropathological Change" in cells.obs


def test_expression_effect_only_when_the_decoder_was_trained(setup):
    settings = AblateSettings(n_null=5, n_boot=20, scales=(0.0,), expression_trained=True)
    cands = setup["cands"].iloc[:1]
    out = run_ablation(setup["model"], setup["batches"], CLASSES, cands, settings, setup["obs"])
    assert np.isfinite(out.confirmed["expr_effect"]).all()
    assert "expr_effect" in out.summary["expression"]


def test_outputs_and_figures_are_written(result, tmp_path):
    paths = write_outputs(result, tmp_path)
    names = {p.name for p in paths}
    assert names == {f"{n}.tsv" for n in OUTPUT_TABLES} | {"summary.json", "cells.h5ad"}
    confirmed = pd.read_csv(tmp_path / "confirmed.tsv", sep="\t")
    assert list(confirmed["confirmed"]) == [True, False] and confirmed["reason"].notna().all()
    assert len(pd.read_csv(tmp_path / "nulls.tsv", sep="\t")) == 2 * 2 * 39  # two nulls each
    figures = write_figures(result, tmp_path)
    assert [p.name for p in figures] == list(FIGURE_FILES.values())
    assert all(p.stat().st_size > 5000 for p in figures)
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_accepted_candidates_the_strongest_spikes_are_tested(setup):
    model, before = setup["model"], snapshot(setup["model"])
    cands = setup["cands"].assign(accepted=False)
    settings = AblateSettings(n_null=19, n_boot=20, scales=(0.0,), n_strongest=1)
    out = run_ablation(model, setup["batches"], CLASSES, cands, settings, setup["obs"])
    (row,) = out.confirmed.itertuples()
    assert (row.layer, row.row, row.col) == (0, ROW, K) and not row.probe_accepted
    assert row.source.startswith("probe: strongest") and row.confirmed
    # Confirmed, but the probe did not call its spike massive: not a super weight.
    assert row.tier == "important weight" and "no massive activation" in row.reason
    # An empty table falls back to the largest weight of each down-projection.
    empty = read_candidates(cands.iloc[:0])
    out = run_ablation(model, setup["batches"], CLASSES, empty, settings, setup["obs"])
    assert list(out.confirmed["candidate"]) == [f"L0[{ROW},{K}]"]
    assert_identical(model, before)


def test_ablate_from_checkpoint_and_tokenised_data(setup, tmp_path):
    model = setup["model"]
    folder = save_checkpoint(model, model.config, VOCAB, tmp_path / "checkpoint",
                             extra_args=CellCut(max_seq_len=17).to_args())  # fmt: skip
    table = tmp_path / "candidates.tsv"
    setup["cands"].iloc[:1].drop(columns="accepted").to_csv(table, sep="\t", index=False)
    settings = AblateSettings(
        n_null=19, n_boot=50, scales=(0.0,), max_cells=64, batch_size=32,
        strata_columns=("Braak", "no such column"),
    )  # fmt: skip
    out = ablate(setup["adata"], folder, table, settings, device="cpu", selection_splits=("val",))
    assert out.summary["n_cells"] == 64 and out.confirmed["confirmed"].all()
    assert set(out.strata["stratum"]) == {"cell type", "Braak"}
    assert "selection_warning" not in out.summary
    same = ablate(setup["adata"], folder, table, settings, device="cpu", selection_splits=("test",))
    assert "share cells" in same.summary["selection_warning"]


def test_user_errors(setup):
    model, batches = setup["model"], setup["batches"][:1]
    obs = setup["obs"].iloc[: len(batches[0]["labels"])]
    cands = setup["cands"].iloc[:1]
    settings = AblateSettings(n_null=2, scales=(0.0,))
    for bad in (
        cands.assign(module="transformer_encoder.layers.9.linear2"),
        cands.assign(row=10_000),
        cands.assign(weight=-3.0),
    ):
        with pytest.raises(UserError, match="candidate"):
            run_ablation(model, batches, CLASSES, bad, settings, obs)
    with pytest.raises(UserError, match="lacks column"):
        read_candidates(cands.drop(columns="col"))
    with pytest.raises(UserError, match="n_strongest"):
        AblateSettings(n_strongest=0)
    with pytest.raises(UserError, match="n_null"):
        AblateSettings(n_null=0)
    with pytest.raises(UserError, match="split"):
        AblateSettings(split="holdout")
    with pytest.raises(UserError, match="precision must be one of"):
        AblateSettings(precision="fp16")


def test_confirm_cli_on_a_classifier_and_on_a_checkpoint_without_one(setup, tmp_path, capsys):
    from dataclasses import replace

    from superweights.cli import main

    model, data = setup["model"], tmp_path / "data.h5ad"
    setup["adata"].write_h5ad(data)
    table = tmp_path / "candidates.tsv"
    setup["cands"].iloc[:1].to_csv(table, sep="\t", index=False)
    common = ["--data", str(data), "--candidates", str(table), "--n-null", "19",
              "--n-boot", "50", "--max-cells", "96"]  # fmt: skip
    cut = CellCut(max_seq_len=17).to_args()
    classifier = save_checkpoint(model, model.config, VOCAB, tmp_path / "classifier",
                                 extra_args=cut)  # fmt: skip
    assert (
        main(["confirm", "--checkpoint", str(classifier), "--out", str(tmp_path / "a"), *common])
        == 0
    )
    confirmed = pd.read_csv(tmp_path / "a" / "confirmed.tsv", sep="\t")
    assert confirmed["confirmed"].all() and "confirmed" in capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["score"] == "log p(true cell type) per cell"  # the score "auto" chose
    # The quantize stage from the command line, holding the confirmed weight out.
    quantize = ["quantize", "--checkpoint", str(classifier), "--data", str(data),
                "--super-weights", str(tmp_path / "a" / "confirmed.tsv"), "--out",
                str(tmp_path / "q"), "--bits", "4", "--block-sizes", "64", "--clip-values",
                "3", "--no-w8a8"]  # fmt: skip
    assert main(quantize) == 0
    quantized = pd.read_csv(tmp_path / "q" / "quantize.tsv", sep="\t")
    assert (tmp_path / "q" / "quantize.png").is_file() and len(quantized) > 1
    # Without a classifier head the masked-expression score is used.
    base = ScGPTModel(replace(model.config, n_cls=0))
    base.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("cls_decoder")}
    )
    folder = save_checkpoint(base, base.config, VOCAB, tmp_path / "base", extra_args=cut)
    assert (
        main(["confirm", "--checkpoint", str(folder), "--out", str(tmp_path / "b"), *common]) == 0
    )
    frame = pd.read_csv(tmp_path / "b" / "confirmed.tsv", sep="\t")
    assert len(frame) == 1 and np.isfinite(frame["effect"]).all()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["score"] == "masked-expression log-likelihood per cell"
    # A bad table: one line, exit 2, nothing written.
    bad = tmp_path / "bad.tsv"
    setup["cands"].drop(columns="col").to_csv(bad, sep="\t", index=False)
    out = tmp_path / "c"
    args = ["confirm", "--checkpoint", str(classifier), "--out", str(out), *common]
    args[args.index(str(table))] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: candidates table lacks column") and not out.exists()
