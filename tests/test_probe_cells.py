"""The scGPT probe over sampled cells: a super weight planted on `<cls>` is found in every cell."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from superweights import probe_cells
from superweights.errors import UserError
from superweights.model.args import CellCut
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.probe_cells import (
    CANDIDATE_COLUMNS,
    CELL_COLUMNS,
    SECONDARY,
    ProbeSettings,
    probe_checkpoint,
    probe_scgpt,
    sample_cells,
    write_outputs,
)
from superweights.probe_plots import write_figures

TYPES = ("Astrocyte", "Microglia-PVM", "Sst")
LAYER, ROW, COL = 1, 7, 11


@pytest.fixture(scope="module")
def tokenised(vocab_genes, vocab):
    """60 cells (20 per type, splits train/val/test in turn) x 40 genes as scGPT bins."""
    rng = np.random.default_rng(0)
    genes = vocab_genes[:36] + ["APP", "MAPT", "APOE", "MT-CO1"]
    n = 60
    labels = [TYPES[i % 3] for i in range(n)]
    bins = np.where(rng.random((n, len(genes))) < 0.4, rng.integers(1, 51, (n, len(genes))), 0)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(labels, categories=TYPES),
            "split": [("train", "val", "test")[(i // 3) % 3] for i in range(n)],
            "Overall AD neuropathological Change": [("Not AD", "High")[i % 2] for i in range(n)],
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame({"token_id": [vocab[g] for g in genes]}, index=genes)
    return ad.AnnData(X=sp.csr_matrix(bins.astype(np.float32)), obs=obs, var=var)


def tiny_model(vocab) -> ScGPTModel:
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=len(vocab), d_model=32, nhead=4, d_hid=32, nlayers=3, n_cls=len(TYPES),
        dropout=0.0, pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    return ScGPTModel(config).eval()


def plant_on_cls(model: ScGPTModel, cls_id: int) -> None:
    """Residual channel 0 > 0 at `<cls>` only; MLP unit COL of LAYER reads it; W[ROW, COL] large."""
    with torch.no_grad():
        emb = model.encoder.embedding.weight
        emb[:, 0] = -0.3
        emb[cls_id] = 0.0
        emb[cls_id, 0] = 1.0
        model.value_encoder.norm.weight[0] = 0.0  # values leave channel 0 alone
        for layer in model.transformer_encoder.layers[: LAYER + 1]:
            layer.self_attn.out_proj.weight[0] = 0.0  # so does attention
            layer.linear2.weight[0] = 0.0  # and the MLP
        block = model.transformer_encoder.layers[LAYER]
        block.linear1.weight[COL] = 0.0
        block.linear1.weight[COL, 0] = 50.0
        block.linear1.bias[COL] = 0.0
        block.linear2.weight[:, COL] *= 0.05  # only W[ROW, COL] turns the spike into an output
        block.linear2.weight[ROW, COL] = 5.0


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


SETTINGS = ProbeSettings(cells_per_type=5, splits=("test", "val"), n_strongest=3, batch_size=4)


def test_planted_cls_super_weight_is_found_in_every_cell(tokenised, vocab, tmp_path):
    model = tiny_model(vocab)
    plant_on_cls(model, vocab["<cls>"])
    before = snapshot(model)
    result = probe_scgpt(model, tokenised, vocab, SETTINGS)
    assert_unchanged(model, before)
    assert not model.training

    table = result.candidates
    assert list(table.columns) == CANDIDATE_COLUMNS
    accepted = table[table["accepted"]]
    assert len(accepted) == 1
    cand = accepted.iloc[0]
    assert (cand.layer, cand.row, cand.col) == (LAYER, ROW, COL)
    assert cand.module == f"transformer_encoder.layers.{LAYER}.linear2"
    assert cand.weight == pytest.approx(5.0) and cand.token == 0 and cand.token_gene == "<cls>"
    assert cand.n_cells == 15 and cand.n_cells_same_channel == 15
    assert cand.n_cell_types_same_channel == cand.n_cell_types == 3
    assert cand.top_genes == "<cls>:15"
    assert cand.input_ratio >= 100 and cand.output_ratio >= 100 and cand.contribution > 0.9
    # Topped up to n_strongest with the other layers' strongest spikes, strongest first.
    rest = table[~table["accepted"]]
    assert len(rest) == 2 and set(rest["layer"]) == {0, 2}
    assert rest["output_ratio"].is_monotonic_decreasing and rest["reason"].str.len().gt(0).all()
    for r in rest.itertuples():
        weight = model.transformer_encoder.layers[r.layer].linear2.weight
        assert r.weight == pytest.approx(float(weight.detach()[r.row, r.col]))

    cells = result.cells
    assert list(cells.columns) == CELL_COLUMNS and len(cells) == 15 * 3
    planted = cells[cells["layer"] == LAYER]
    assert (planted["output_channel"] == ROW).all() and (planted["output_gene"] == "<cls>").all()
    assert (planted["output_ratio"] > 100).all()
    assert result.summary["found"] and result.summary["n_candidates"] == 1
    assert result.summary["statement"].startswith("Found 1 candidate")

    paths = write_outputs(result, tmp_path) + write_figures(result, tmp_path)
    assert {p.name for p in paths} == {
        "candidates.tsv", "layers.tsv", "layernorm.tsv", "cells.tsv", "summary.json",
        "layer_spikes.png", "cell_spikes.png",
    }  # fmt: skip
    back = pd.read_csv(tmp_path / "candidates.tsv", sep="\t")
    assert back.loc[0, ["layer", "row", "col"]].tolist() == [LAYER, ROW, COL]
    assert bool(back.loc[0, "accepted"]) and back.loc[0, "top_genes"] == "<cls>:15"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["candidates"] == [
        {"layer": LAYER, "row": ROW, "col": COL, "token_gene": "<cls>", "n_cells_same_channel": 15}
    ]
    assert all((tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in paths[-2:])
    assert not list(tmp_path.glob(".*tmp"))


def test_clean_model_reports_strongest_spikes_not_accepted(tokenised, vocab, tmp_path):
    model = tiny_model(vocab)
    before = snapshot(model)
    result = probe_scgpt(model, tokenised, vocab, SETTINGS)
    assert_unchanged(model, before)
    assert not result.summary["found"] and result.summary["n_candidates"] == 0
    assert result.summary["statement"].startswith("No candidate passed the thresholds")
    assert "accepted = False" in result.summary["statement"]
    table = result.candidates
    assert len(table) == 3 and not table["accepted"].any()
    assert table["output_ratio"].is_monotonic_decreasing
    assert table["output_ratio"].max() < 100 and (table["round"] == 1).all()
    assert table["reason"].str.contains("ratio").all()
    assert (table["n_cells"] == 15).all()
    assert (table["n_cells_same_channel"] <= 15).all()
    # The listed spike values are those of the probe's strongest-spike cells.
    first = result.layers.query("round == 1").set_index("layer")
    for r in table.itertuples():
        assert abs(r.output_value) == pytest.approx(first.loc[r.layer, "max_out"], rel=1e-5)
        assert (r.row, r.col) == (first.loc[r.layer, "row"], first.loc[r.layer, "col"])
    write_outputs(result, tmp_path)
    assert len(pd.read_csv(tmp_path / "cells.tsv", sep="\t")) == 45
    assert json.loads((tmp_path / "summary.json").read_text())["found"] is False


def test_layernorm_outliers_are_secondary_candidates(tokenised, vocab):
    model = tiny_model(vocab)
    with torch.no_grad():
        model.transformer_encoder.layers[2].norm2.weight[4] = 40.0
    result = probe_scgpt(model, tokenised, vocab, ProbeSettings(cells_per_type=2))
    ln = result.layernorm
    hit = ln[ln["module"] == "transformer_encoder.layers.2.norm2"]
    assert hit["channel"].tolist() == [4] and hit["layer"].tolist() == [2]
    assert (ln["kind"] == SECONDARY).all()


def test_probe_checkpoint_loads_the_folder(tokenised, vocab, tmp_path):
    model = tiny_model(vocab)
    plant_on_cls(model, vocab["<cls>"])
    folder = save_checkpoint(model, model.config, vocab, tmp_path / "checkpoint")
    settings = ProbeSettings(cells_per_type=2, n_strongest=1)
    result = probe_checkpoint(tokenised, folder, settings, device="cpu")
    expected = probe_scgpt(model, tokenised, vocab, settings)
    pd.testing.assert_frame_equal(result.candidates, expected.candidates)
    assert result.candidates[["layer", "row", "col"]].values.tolist() == [[LAYER, ROW, COL]]


def test_the_probe_cuts_cells_as_the_checkpoint_records(tokenised, vocab, tmp_path, monkeypatch):
    """A checkpoint saved with max_seq_len 6 (and its seed): every probed cell is cut to 6
    tokens with that seed; without a recorded cut, to `CellCut()`'s 1,200 (not at all here)."""
    model = tiny_model(vocab)
    cut = CellCut(max_seq_len=6, seed=3)
    folder = save_checkpoint(
        model, model.config, vocab, tmp_path / "ckpt", extra_args=cut.to_args()
    )
    widths, real = [], probe_cells.cell_batches

    def recording(*args, **kwargs):
        batches = real(*args, **kwargs)
        widths.extend(b["gene_ids"].shape[1] for b in batches)
        return batches

    monkeypatch.setattr(probe_cells, "cell_batches", recording)
    settings = ProbeSettings(cells_per_type=4, n_strongest=1, batch_size=1)
    result = probe_checkpoint(tokenised, folder, settings, device="cpu")
    assert set(widths) == {6}
    pd.testing.assert_frame_equal(
        result.cells, probe_scgpt(model, tokenised, vocab, settings, cut).cells
    )
    other_seed = probe_scgpt(model, tokenised, vocab, settings, CellCut(6, seed=4)).cells
    assert not result.cells["output_gene"].equals(other_seed["output_gene"])
    widths.clear()
    probe_scgpt(model, tokenised, vocab, settings)
    assert max(widths) > 6


def test_sample_respects_cells_per_type_and_splits(tokenised):
    obs = tokenised.obs
    rows = sample_cells(obs, ProbeSettings(cells_per_type=3, splits=("test",)))
    picked = obs.iloc[rows]
    assert (picked["split"] == "test").all()
    assert picked["cell_type"].value_counts().tolist() == [3, 3, 3]
    grouped = sorted(picked["cell_type"], key=TYPES.index)
    assert list(picked["cell_type"]) == grouped
    again = sample_cells(obs, ProbeSettings(cells_per_type=3, splits=("test",)))
    other_seed = sample_cells(obs, ProbeSettings(cells_per_type=3, splits=("test",), seed=1))
    assert np.array_equal(rows, again) and not np.array_equal(rows, other_seed)
    everything = sample_cells(obs, ProbeSettings(cells_per_type=100, splits=()))
    assert len(everything) == len(obs)
    few = sample_cells(obs, ProbeSettings(cells_per_type=100, splits=["val"]))
    assert len(few) == (obs["split"] == "val").sum()


def test_bad_settings_and_empty_selection_are_user_errors(tokenised):
    with pytest.raises(UserError, match="splits"):
        ProbeSettings(splits=("holdout",))
    with pytest.raises(UserError, match="cells_per_type"):
        ProbeSettings(cells_per_type=0)
    only_train = tokenised.obs.assign(split="train")
    with pytest.raises(UserError, match="no cells"):
        sample_cells(only_train, ProbeSettings())
