"""Persistence through fine-tuning: each weight's value, effect and verdict in both models."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import PLANTED, ROW, VOCAB, K, planted_model, tokenised, train
from superweights.ablate import AblateSettings
from superweights.model.args import CellCut
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTModel
from superweights.persistence import persistence
from superweights.persistence_plots import write_figure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_weight_kept_through_fine_tuning_persists_and_a_shrunk_one_is_lost(tmp_path):
    adata = tokenised()
    tuned, frozen = planted_model()
    train(tuned, frozen, adata, epochs=4)
    # The "starting" model: the same encoder without the classifier head, where a second
    # weight (layer 1) was large and fine-tuning shrank it to a tenth.
    base = ScGPTModel(replace(tuned.config, n_cls=0))
    base.load_state_dict({k: v for k, v in tuned.state_dict().items() if "cls_decoder" not in k})
    other = "transformer_encoder.layers.1.linear2"
    with torch.no_grad():
        base.transformer_encoder.layers[1].linear2.weight[2, 3] = 3.0
        tuned.transformer_encoder.layers[1].linear2.weight[2, 3] = 0.3
    cut = CellCut(max_seq_len=17).to_args()
    base_dir = save_checkpoint(base, base.config, VOCAB, tmp_path / "base", extra_args=cut)
    tuned_dir = save_checkpoint(tuned, tuned.config, VOCAB, tmp_path / "tuned", extra_args=cut)
    base_confirmed = pd.DataFrame(
        {"module": [PLANTED, other], "row": [ROW, 2], "col": [K, 3], "weight": [24.0, 3.0],
         "confirmed": [True, True]}
    )  # fmt: skip
    tuned_confirmed = pd.DataFrame(
        {"module": [PLANTED], "row": [ROW], "col": [K], "weight": [24.0], "confirmed": [True],
         "tier": ["super weight"]}
    )  # fmt: skip
    base_probe = base_confirmed.assign(accepted=[True, True])
    tuned_probe = tuned_confirmed.assign(accepted=[True])
    settings = AblateSettings(n_boot=50, batch_size=64, max_cells=200)
    table = persistence(adata, base_dir, tuned_dir, base_confirmed, tuned_confirmed, settings,
                        base_candidates=base_probe, finetuned_candidates=tuned_probe)  # fmt: skip
    rows = table.set_index("candidate")
    kept, shrunk = rows.loc[f"L0[{ROW},{K}]"], rows.loc["L1[2,3]"]
    assert kept.status == "persists" and kept.weight_base == kept.weight_finetuned == 24.0
    assert kept.relative_change == 0 and kept.finetuned_effect > 1.0 and kept.finetuned_ci_low > 0
    assert np.isfinite(kept.base_effect) and kept.tier_in_finetuned == "super weight"
    assert kept.activation_status == "spikes in both"
    # Never tested after fine-tuning: not judged lost.
    assert shrunk.status == "not tested in the fine-tuned model" and not shrunk.tested_in_finetuned
    assert shrunk.tier_in_finetuned == "not tested"
    assert shrunk.activation_status == "spikes only before fine-tuning"
    assert shrunk.weight_base == 3.0 and shrunk.weight_finetuned == pytest.approx(0.3)
    assert shrunk.relative_change == pytest.approx(-0.9)
    assert write_figure(table, tmp_path / "persistence.png").stat().st_size > 5000
    # Tested after fine-tuning and not confirmed there: lost.
    tested = pd.concat([tuned_confirmed, base_confirmed.iloc[1:].assign(confirmed=False)])
    again = persistence(adata, base_dir, tuned_dir, base_confirmed, tested, settings)
    assert again.set_index("candidate").loc["L1[2,3]", "status"] == "lost in fine-tuning"
    assert set(again["activation_status"]) == {"spikes in neither"}  # no probe tables given
    # The stage from the command line: the same table, its figure and the spikes figure.
    from superweights.cli import main

    adata.write_h5ad(tmp_path / "data.h5ad")
    tables = {"base-confirmed": base_confirmed, "finetuned-confirmed": tuned_confirmed,
              "base-candidates": base_probe, "finetuned-candidates": tuned_probe}  # fmt: skip
    args = ["persistence", "--data", str(tmp_path / "data.h5ad"), "--base", str(base_dir),
            "--finetuned", str(tuned_dir), "--out", str(tmp_path / "cli"), "--n-boot", "50",
            "--max-seq-len", "17", "--batch-size", "64", "--max-cells", "200"]  # fmt: skip
    for name, frame in tables.items():
        frame.to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
        args += [f"--{name}", str(tmp_path / f"{name}.tsv")]
    assert main(args) == 0
    written = pd.read_csv(tmp_path / "cli" / "persistence.tsv", sep="\t")
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {
        "persistence.tsv",
        "persistence.png",
        "spikes_over_training.png",
    }


def test_status_is_judged_only_where_both_models_tested():
    from superweights.persistence import status

    assert status(True, True, True, True) == "persists"
    assert status(True, True, True, False) == "lost in fine-tuning"
    assert status(True, True, False, False) == "not tested in the fine-tuned model"
    assert status(False, False, True, True) == "not tested in the starting model"
    assert status(True, False, True, True) == "appears in fine-tuning"
    assert status(True, False, True, False) == "confirmed in neither"
