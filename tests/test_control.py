"""The spike-in control: the gene set is drawn reproducibly among eligible sets only, planting
changes only the planted entries, the spike sits on the planted genes' tokens alone and is
an attention sink, and after a short fine-tune pruning the planted weight costs far more
than pruning magnitude-matched weights (while a lone spike, without the sinks, does not)."""

import json
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from helpers import donor_split_obs
from superweights.channels import select_channels
from superweights.confirm import ConfirmSettings, confirm_super_weights
from superweights.control import (
    CHECKS,
    GENE_SETS_FILE,
    PLANTED_FILE,
    choose_gene_set,
    gene_set_table,
    plant_control,
    plant_super_weight,
    planted_candidates,
    read_planted,
    score_control,
)
from superweights.errors import UserError
from superweights.gene_effects import causal_gene_effects
from superweights.model.checkpoint import load_checkpoint, save_checkpoint
from superweights.model.finetuned import load_test_cells
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.train import TrainSettings, finetune
from superweights.probe_cells import ProbeSettings, probe_scgpt
from superweights.report import control_statement
from superweights.scores import CellTypeScore
from superweights.settings import ControlSettings, GeneEffectSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["astro", "micro", "neuron"]
MARKERS = [f"MARK{i}" for i in range(18)]  # 6 per type, always expressed
BACKGROUND = [f"BG{i}" for i in range(40)]
GOOD_A = [f"GA{i}" for i in range(8)]  # expressed more in some types than others
GOOD_B = [f"GB{i}" for i in range(8)]
FLAT = [f"FL{i}" for i in range(8)]  # the same in every type
RARE = [f"RA{i}" for i in range(8)]  # hardly ever expressed
AD_NAMED = [f"AN{i}" for i in range(8)]  # as good, but in an AD-named set
GOOD_C = [f"GC{i}" for i in range(8)]  # as good, in sets that also hold an AD gene
GROUPS = {"GA": GOOD_A, "GB": GOOD_B, "FL": FLAT, "RA": RARE, "AN": AD_NAMED, "GC": GOOD_C}
GENES = MARKERS + BACKGROUND + [g for genes in GROUPS.values() for g in genes] + ["APP"]
PROFILE = {  # probability of expression per cell type
    "GA": (0.9, 0.5, 0.25),
    "GB": (0.3, 0.9, 0.6),
    "FL": (0.5, 0.5, 0.5),
    "RA": (0.002, 0.002, 0.002),
    "AN": (0.9, 0.5, 0.25),
    "GC": (0.3, 0.9, 0.6),
}
LIBRARIES = {
    "alzheimers_curated": {"AD_CORE_GENES": ["APP", "MAPT", "APOE"]},
    "TOY_LIBRARY": {
        "Good set A": GOOD_A + ["NOT_IN_DATA"],
        "Good set B (GO:0000002)": GOOD_B,
        "Amyloid-beta clearance (GO:0000003)": AD_NAMED,
        "Good genes with an AD gene": GOOD_C + ["APP"],
        "Good genes with a gene of an AD-named set": GOOD_C + AD_NAMED[:1],
        "Flat set": FLAT,
        "Rare set": RARE,
    },
}
SETTINGS = ControlSettings(min_genes=5, calibration_cells=128, max_seq_len=48, batch_size=32)


def toy_cells(n_cells: int = 900, seed: int = 0) -> ad.AnnData:
    """Tokenised cells of 3 types: markers, background genes, and the toy sets' genes
    expressed with each set's per-type probability; bins 1-50; donors split 3/1/1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n_cells)
    bins = np.zeros((n_cells, len(GENES)), np.float32)
    column = {g: i for i, g in enumerate(GENES)}
    for i, label in enumerate(labels):
        bins[i, [column[g] for g in MARKERS[label * 6 : label * 6 + 6]]] = rng.integers(30, 51, 6)
        picked = rng.choice(len(BACKGROUND), 10, replace=False)
        bins[i, [column[BACKGROUND[j]] for j in picked]] = rng.integers(1, 40, 10)
        for prefix, genes in GROUPS.items():
            on = rng.random(len(genes)) < PROFILE[prefix][label]
            bins[i, [column[g] for g, o in zip(genes, on, strict=True) if o]] = rng.integers(
                1, 51, on.sum()
            )
        bins[i, column["APP"]] = rng.integers(1, 51)
    obs = donor_split_obs(labels, CLASSES)
    matrix = sp.csr_matrix(bins)
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=GENES), layers={"X_binned": matrix})


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    return toy_cells()


def starting_checkpoint(folder, nlayers: int = 2, seed: int = 0):
    """A random-weight starting checkpoint (no classifier) over the toy genes."""
    torch.manual_seed(seed)
    vocab = {g: i for i, g in enumerate([*GENES, "<pad>", "<cls>", "<eoc>"])}
    config = ScGPTConfig(ntoken=len(vocab), d_model=32, nhead=4, d_hid=64, nlayers=nlayers,
                         dropout=0.0, pad_token_id=vocab["<pad>"])  # fmt: skip
    return save_checkpoint(ScGPTModel(config), config, vocab, folder)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return starting_checkpoint(tmp_path_factory.mktemp("start") / "checkpoint")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, start, cells):
    out = tmp_path_factory.mktemp("plant")
    name, genes = choose_gene_set(LIBRARIES, cells, 3, SETTINGS)  # "Good set B"
    return out, plant_super_weight(start, out, genes, 3, cells, gene_set=name, settings=SETTINGS)


# --- the gene set ---------------------------------------------------------------------


def test_gene_set_table_gives_every_reason(cells):
    table = gene_set_table(LIBRARIES, cells, SETTINGS).set_index("set")
    assert table.loc["Good set A", "eligible"] and table.loc["Good set B (GO:0000002)", "eligible"]
    assert table.loc["Good set A", "n_expressed"] == 8  # NOT_IN_DATA is not counted
    assert table.loc["Good set A", "coverage"] > 0.95
    reasons = table["reason"]
    assert reasons["AD_CORE_GENES"].startswith("Alzheimer's library alzheimers_curated;")
    assert "Alzheimer" in reasons["Amyloid-beta clearance (GO:0000003)"]
    with_ad = ["Good genes with an AD gene", "Good genes with a gene of an AD-named set"]
    assert table.loc[with_ad, "eligible"].all()  # their AD gene is left out, not planted
    assert table.loc[with_ad, "n_ad_genes"].tolist() == [1, 1]
    assert table.loc[with_ad, "n_expressed"].tolist() == [8, 8]
    assert table["eligible"].sum() == 4
    assert "cell-type eta2" in reasons["Flat set"]
    assert "0 expressed non-AD genes" in reasons["Rare set"]
    assert not table.loc[["Flat set", "Rare set"], "eligible"].any()


def test_gene_set_table_leaves_the_data_alone(cells):
    """scipy sorts a CSR matrix's indices in place, which would change the genes that
    long cells are subsampled to in later stages of the same process."""
    data = cells.copy()
    shuffled = data.layers["X_binned"].copy()
    for i in range(shuffled.shape[0]):  # unsorted indices within each row, as h5ad may hold
        lo, hi = shuffled.indptr[i], shuffled.indptr[i + 1]
        shuffled.indices[lo:hi] = shuffled.indices[lo:hi][::-1]
        shuffled.data[lo:hi] = shuffled.data[lo:hi][::-1]
    shuffled.has_sorted_indices = False
    data.layers["X_binned"] = shuffled
    before = shuffled.indices.copy(), shuffled.data.copy()
    gene_set_table(LIBRARIES, data, SETTINGS)
    after = data.layers["X_binned"]
    assert np.array_equal(after.indices, before[0]) and np.array_equal(after.data, before[1])


def test_gene_set_choice_is_seeded_and_only_among_eligible_sets(cells):
    picks = [choose_gene_set(LIBRARIES, cells, seed, SETTINGS) for seed in range(12)]
    assert {name for name, _ in picks} == {
        "TOY_LIBRARY:Good set A",
        "TOY_LIBRARY:Good set B (GO:0000002)",
        "TOY_LIBRARY:Good genes with an AD gene",
        "TOY_LIBRARY:Good genes with a gene of an AD-named set",
    }
    assert choose_gene_set(LIBRARIES, cells, 5, SETTINGS) == picks[5]
    genes = dict(picks)
    assert genes["TOY_LIBRARY:Good set A"] == GOOD_A
    assert genes["TOY_LIBRARY:Good genes with an AD gene"] == GOOD_C  # never APP
    assert genes["TOY_LIBRARY:Good genes with a gene of an AD-named set"] == GOOD_C  # nor AN0


def test_no_eligible_set_is_a_user_error(cells):
    strict = ControlSettings(min_genes=5, min_coverage=0.999)
    with pytest.raises(UserError, match="no gene set"):
        choose_gene_set(LIBRARIES, cells, 0, strict)


def test_settings_are_checked():
    with pytest.raises(UserError, match="min_genes"):
        ControlSettings(min_genes=10, max_genes=5)
    with pytest.raises(UserError, match="must be > 0"):
        ControlSettings(sink_logit=0)
    with pytest.raises(UserError, match="min_coverage"):
        ControlSettings(min_coverage=1.5)


# --- planting -------------------------------------------------------------------------


def expected_changes(plant, config) -> dict[str, list]:
    """Per tensor, the index expressions the plant may change."""
    layer = f"transformer_encoder.layers.{plant.layer}"
    changes = {
        "encoder.embedding.weight": [plant.token_ids],
        f"{layer}.linear1.weight": [plant.col],
        f"{layer}.linear1.bias": [plant.col],
        f"{layer}.linear2.weight": [(plant.row, plant.col)],
    }
    d, d_head = config.d_model, config.d_model // config.nhead
    for sink in plant.sinks:
        rows = [h * d_head + dim for h, dim in enumerate(sink.dims)]
        rows += [d + r for r in rows]
        attention = f"transformer_encoder.layers.{sink.layer}.self_attn"
        changes[f"{attention}.in_proj_weight"] = [rows, (slice(2 * d, 3 * d), plant.row)]
        changes[f"{attention}.in_proj_bias"] = [rows]
    return changes


def test_planting_changes_only_the_planted_entries(planted, start):
    out, plant = planted
    before, config, vocab = load_checkpoint(start)
    after, after_config, after_vocab = load_checkpoint(out / "checkpoint")
    assert after_vocab == vocab and after_config == config
    changes = expected_changes(plant, config)
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    for name, tensor in old.items():
        allowed = torch.zeros_like(tensor, dtype=torch.bool)
        for index in changes.get(name, []):
            allowed[index] = True
        differs = tensor != new[name]
        assert not (differs & ~allowed).any(), f"{name} changed outside the planted entries"
    linear2 = f"transformer_encoder.layers.{plant.layer}.linear2.weight"
    assert float(new[linear2][plant.row, plant.col]) == pytest.approx(plant.weight)
    assert abs(plant.weight) > 20 * float(old[linear2].abs().max())
    assert plant.sinks and plant.sinks[0].layer == plant.layer + 1
    value = f"transformer_encoder.layers.{plant.sinks[0].layer}.self_attn.in_proj_weight"
    d = config.d_model
    assert plant.sinks[0].value_weight > 0
    assert (new[value][2 * d :, plant.row] != old[value][2 * d :, plant.row]).all()


def test_planted_json_records_coordinates_and_genes(planted, cells):
    out, plant = planted
    data = json.loads((out / PLANTED_FILE).read_text())
    assert data["candidate"] == f"L{plant.layer}[{plant.row},{plant.col}]"
    name, genes = choose_gene_set(LIBRARIES, cells, 3, SETTINGS)
    assert data["gene_set"] == name and data["genes"] == genes
    assert data["seed"] == 3 and data["module"].endswith(f"layers.{plant.layer}.linear2")
    assert read_planted(out) == plant


def test_planting_is_deterministic(tmp_path, start, cells, planted):
    plant = planted[1]
    again = plant_super_weight(start, tmp_path, plant.genes, 3, cells, gene_set=plant.gene_set,
                               settings=SETTINGS)  # fmt: skip
    assert again == plant


def test_plant_control_writes_the_table_the_plant_and_its_record(tmp_path, start, cells):
    plant = plant_control(cells, start, tmp_path, LIBRARIES, replace(SETTINGS, seed=4))
    table = pd.read_csv(tmp_path / GENE_SETS_FILE, sep="\t")
    assert len(table) == 8 and table["eligible"].sum() == 4 and table["reason"].notna().sum() == 4
    assert (plant.gene_set, plant.genes) == choose_gene_set(LIBRARIES, cells, 4, SETTINGS)
    assert read_planted(tmp_path / PLANTED_FILE) == plant
    load_checkpoint(tmp_path / "checkpoint")


def spikes_and_attention(model, plant, batches):
    """|planted channel| of the down-projection output per token, the planted-gene flags,
    and the share of `<cls>`'s attention on planted genes in the first sink layer."""
    ids = torch.tensor(plant.token_ids)
    outputs, inputs = [], []
    layers = model.transformer_encoder.layers
    hooks = [
        layers[plant.layer].linear2.register_forward_hook(
            lambda m, a, o: outputs.append(o[..., plant.row].abs())
        ),
        layers[plant.sinks[0].layer].self_attn.register_forward_pre_hook(
            lambda m, a: inputs.append(a[0])
        ),
    ]
    with torch.no_grad():
        for b in batches:
            model(b["gene_ids"], b["values"], b["padding_mask"])
    for hook in hooks:
        hook.remove()
    spike, on, share = [], [], []
    attention = layers[plant.sinks[0].layer].self_attn
    for b, y, x in zip(batches, outputs, inputs, strict=True):
        real = ~b["padding_mask"]
        planted_gene = torch.isin(b["gene_ids"], ids)
        spike.append(y[real])
        on.append(planted_gene[real])
        q, k, _ = torch.nn.functional.linear(x, attention.in_proj_weight,
                                             attention.in_proj_bias).chunk(3, -1)  # fmt: skip
        B, L, D = x.shape
        q = q[:, 0].view(B, 4, 1, D // 4)
        k = k.view(B, L, 4, D // 4).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / (D // 4) ** 0.5
        p = logits.masked_fill(b["padding_mask"][:, None], -torch.inf).softmax(-1)
        has = planted_gene.any(1)
        share.append((p * planted_gene[:, None]).sum(-1)[has].mean(1))
    return torch.cat(spike), torch.cat(on), torch.cat(share)


def test_spike_sits_on_the_planted_genes_tokens_only_and_draws_attention(planted, cells):
    out, plant = planted
    model, config, vocab = load_checkpoint(out / "checkpoint")
    test = load_test_cells(cells, out / "checkpoint", batch_size=64, seed=0, split="test",
                           labelled=False)  # fmt: skip
    spike, on, share = spikes_and_attention(model, plant, test.batches)
    assert on.any() and (~on).any()
    assert spike[on].quantile(0.05) > 20 * spike[~on].max()  # every planted-gene token spikes
    assert spike[on].median() == pytest.approx(abs(plant.spike), rel=0.2)
    fraction = on.float().mean()  # the planted genes' share of the tokens
    assert share.mean() > 0.4 and share.mean() > 4 * fraction  # <cls> attends to the sinks


# --- after fine-tuning ----------------------------------------------------------------

TRAIN = TrainSettings(epochs=4, lr=1e-3, batch_size=16, max_seq_len=48, spike_cells=0, seed=0)


def pruning_test(out, cells, plant, n_null: int = 19):
    """The confirmation of the planted weight after fine-tuning (the pipeline's core)."""
    finetune(cells, out / "finetune", TRAIN, out / "checkpoint")
    test = load_test_cells(cells, out / "finetune" / "checkpoint", batch_size=64,
                           seed=0, split="test")  # fmt: skip
    score = CellTypeScore(test.model, test.batches)
    settings = ConfirmSettings(n_null=n_null, n_boot=200)
    table = confirm_super_weights(test.model, plant.to_frame(), score, settings=settings).table
    return table.iloc[0], test


@pytest.fixture(scope="module")
def finetuned(planted, cells):
    out, plant = planted
    return pruning_test(out, cells, plant)


def test_after_finetuning_pruning_the_planted_weight_collapses_the_classifier(finetuned):
    row, _ = finetuned
    assert row.effect > 0.3  # nats per cell
    assert row.effect > 100 * max(row.null_q95, 1e-4) and row.p_value == 1 / 20
    assert row.p_contribution == 1 / 20 and row.effect > 100 * max(row.topk_effect, 1e-4)
    assert row.recovered > 0.8  # restoring the one spike token per cell brings it back
    assert row.tier == "super weight"


def test_the_probe_finds_the_planted_weight_and_the_score_says_so(finetuned, planted, cells):
    row, test = finetuned
    plant = planted[1]
    settings = ProbeSettings(cells_per_type=20)
    probe = probe_scgpt(test.model, cells, test.vocab, settings)
    score = score_control(plant, probe.candidates, row.to_frame().T)
    assert score["found"] and score["probe_rank"] == 1 and score["recovered"]
    assert score["tier"] == "super weight" and score["effect"] == pytest.approx(row.effect)
    ranking = pd.DataFrame({"candidate": plant.candidate, "gene": [*plant.genes, "MARK0"],
                            "rank": [*range(2, len(plant.genes) + 2), 1]})  # fmt: skip
    genes = score_control(plant, probe.candidates, gene_ranking=ranking)["genes"]
    assert genes["best_rank"] == 2 and genes["n_planted_ranked"] == len(plant.genes)
    assert genes["auc"] == 0.0  # every planted gene ranks below MARK0


def test_the_gene_stage_traces_the_control_and_a_broken_one_does_not(finetuned, planted):
    """The causal gene stage ranks the planted genes first by the super activation (not by
    Δ log p: a cell holds 2-3 planted tokens, and removing one leaves the others as sinks);
    the same stage with its gene names scrambled (a broken stage) does not, the control then
    fails at `traced` and the report's statement says so."""
    row, test = finetuned
    plant = planted[1]
    candidates = plant.to_frame().assign(accepted=True, reason="accepted", output_ratio=900.0)
    confirmed = row.to_frame().T
    channels = select_channels(test.model, confirmed, 0)
    settings = GeneEffectSettings(max_cells=60, max_genes=0, n_null=19, min_cells=3)

    def score(vocab):
        ranking = causal_gene_effects(test.model, test.batches, channels, vocab, settings,
                                      test.obs).genes_causal  # fmt: skip
        return score_control(plant, candidates, confirmed, ranking)

    good = score(test.vocab)
    assert good["recovered"] and good["traced"] and good["genes"]["best_rank"] == 1
    assert good["genes"]["auc"] >= 0.9 and good["genes"]["p_rank"] < 1e-3
    assert good["failed_at"] == "enriched"  # not run
    ids = np.random.default_rng(0).permutation(list(test.vocab.values()))
    broken = score(dict(zip(test.vocab, ids.tolist(), strict=True)))
    assert broken["recovered"] and not broken["traced"] and broken["failed_at"] == "traced"
    assert broken["genes"]["p_rank"] > 0.05 or broken["genes"]["auc"] < 0.8
    assert "the gene level not: its genes did not lead the causal ranking" in control_statement(
        broken, not_run=False
    )


def test_the_planted_genes_ranks_in_the_cell_level_association_are_reported(planted):
    plant = planted[1]
    others = [f"OTHER{i}" for i in range(20)]
    genes = [plant.genes[0], *others[:10], *plant.genes[1:3], *others[10:]]
    association = pd.DataFrame({"candidate": plant.candidate, "gene": genes,
                                "rank": np.arange(1, len(genes) + 1)})  # fmt: skip
    candidates = plant.to_frame().assign(accepted=True)
    score = score_control(plant, candidates, association=association)
    part = score["association"]
    assert part["n_ranked"] == 23 and part["n_planted_ranked"] == 3
    assert part["ranks"] == {plant.genes[0]: 1, plant.genes[1]: 12, plant.genes[2]: 13}
    assert part["auc"] == pytest.approx((20 + 10 + 10) / 60)
    assert score_control(plant, candidates)["association"] is None
    assert "association" not in CHECKS  # descriptive


def test_the_control_confirms_the_planted_weight_whether_or_not_the_probe_listed_it(planted):
    plant = planted[1]
    listed = pd.DataFrame({"module": [plant.module, plant.module], "layer": plant.layer,
                           "row": [plant.row, plant.row], "col": [(plant.col + 1) % 64, plant.col],
                           "accepted": [True, True], "weight": [1.0, 2.0]})  # fmt: skip
    mine = planted_candidates(plant, listed)
    assert len(mine) == 1 and mine["col"].item() == plant.col and mine["weight"].item() == 2.0
    missed = planted_candidates(plant, listed.head(1))
    assert missed[["layer", "row", "col"]].values.tolist() == [[plant.layer, plant.row, plant.col]]
    assert not missed["accepted"].item()


def test_a_missed_weight_is_scored_as_missed(planted):
    plant = planted[1]
    candidates = pd.DataFrame({"module": [plant.module], "layer": [plant.layer],
                               "row": [plant.row], "col": [(plant.col + 1) % 64],
                               "accepted": [True], "reason": ["accepted"]})  # fmt: skip
    score = score_control(plant, candidates)
    assert not score["found"] and not score["recovered"]
    assert score["same_channel"] == [f"L{plant.layer}[{plant.row},{(plant.col + 1) % 64}]"]
    assert score["statement"].startswith("The probe missed")


def test_a_weight_whose_pruning_helps_is_scored_without_a_recovery(planted):
    """A negative effect has no recovered share (NaN in confirmed.tsv)."""
    plant = planted[1]
    candidates = plant.to_frame().assign(accepted=True, reason="accepted", output_ratio=900.0)
    confirmed = pd.DataFrame({"candidate": [plant.candidate], "tier": ["not confirmed"],
                              "effect": [-0.001], "null_mean": [0.0],
                              "recovered": [np.nan]})  # fmt: skip
    score = score_control(plant, candidates, confirmed)
    assert score["found"] and score["recovered_share"] is None and not score["recovered"]
    assert "recovered n/a" in score["statement"]


@pytest.mark.slow
def test_a_lone_spike_without_sinks_is_hardly_needed(tmp_path, start, cells, planted, finetuned):
    """Issue 26's construction: the same spike without the sink keys. Fine-tuning comes to
    depend on it far less, which is why the control plants the sinks."""
    plant = planted[1]
    settings = ControlSettings(**{**SETTINGS.__dict__, "sinks": False})
    lone = plant_super_weight(start, tmp_path, plant.genes, 3, cells, settings=settings)
    assert (lone.layer, lone.row, lone.col) == (plant.layer, plant.row, plant.col)
    assert not lone.sinks
    row, _ = pruning_test(tmp_path, cells, lone)
    assert row.effect < 0.25 * finetuned[0].effect
