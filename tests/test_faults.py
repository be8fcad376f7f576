"""Refusals of what cannot be trusted: one `error:` line, exit status 2, nothing written.

Each test feeds one bad input to a stage through the `superweights` command (as a user or a
rule would run it) and checks the message, the exit status and the output folder.
"""

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import superweights
from superweights.cli import main
from superweights.model.checkpoint import save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel

TYPES = ["Astrocyte", "Microglia-PVM", "Sst"]
DONORS = [f"D{i}" for i in range(6)]
SPLIT_OF = dict(zip(DONORS, ["train", "train", "val", "val", "test", "test"], strict=True))
DOWN = "transformer_encoder.layers.1.linear2"


@pytest.fixture(scope="module")
def tokenised(tmp_path_factory, vocab_genes, vocab):
    """72 cells of 3 types from 6 donors (2 per split) x 40 genes, as scGPT bins."""
    rng = np.random.default_rng(0)
    genes = vocab_genes[:40]
    n = 72
    donors = [DONORS[i % 6] for i in range(n)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([TYPES[(i // 6) % 3] for i in range(n)], categories=TYPES),
            "donor": donors,
            "split": pd.Categorical([SPLIT_OF[d] for d in donors], ["train", "val", "test"]),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    bins = np.where(rng.random((n, len(genes))) < 0.5, rng.integers(1, 51, (n, len(genes))), 0)
    var = pd.DataFrame({"token_id": [vocab[g] for g in genes]}, index=genes)
    data = ad.AnnData(X=sp.csr_matrix(bins.astype(np.float32)), obs=obs, var=var)
    path = tmp_path_factory.mktemp("data") / "tokenised.h5ad"
    data.write_h5ad(path)
    return path


def small_vocab(tokenised) -> dict[str, int]:
    genes = list(ad.read_h5ad(tokenised, backed="r").var_names)
    return {g: i for i, g in enumerate(["<pad>", "<cls>", "<eoc>", *genes])}


def write_checkpoint(folder, tokenised, classes=TYPES, edit=None):
    """A tiny fine-tuned-style checkpoint naming its `classes`; `edit(model)` changes weights."""
    vocab = small_vocab(tokenised)
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=len(vocab), d_model=16, nhead=2, d_hid=16, nlayers=2, n_cls=len(classes),
        dropout=0.0, pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    model = ScGPTModel(config).eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return save_checkpoint(model, config, vocab, folder, extra_args={"classes": list(classes)})


def run_cli(capsys, *argv):
    """Exit status and the `error:` lines of `superweights *argv`."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def probe(capsys, checkpoint, data, out):
    return run_cli(capsys, "probe", "--checkpoint", checkpoint, "--data", data, "--out", out,
                   "--cells-per-type", 4, "--batch-size", 8)  # fmt: skip


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, tokenised, capsys, value):
    def poison(model):
        model.transformer_encoder.layers[1].linear2.weight[3, 5] = value

    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised, edit=poison)
    (ckpt / "model.safetensors").unlink()  # released folders hold best_model.pt only
    code, errors = probe(capsys, ckpt, tokenised, tmp_path / "probe")
    assert code == 2 and len(errors) == 1, errors
    assert f"tensor {DOWN}.weight holds 1 non-finite value(s)" in errors[0]
    assert not (tmp_path / "probe").exists()
    code, errors = run_cli(capsys, "inspect", ckpt)  # the same loader checks it
    assert code == 2 and f"tensor {DOWN}.weight" in errors[0]


def test_non_finite_activations_on_probed_cells_are_refused(tmp_path, tokenised, capsys):
    def overflow(model):  # finite weights whose activations overflow float32
        model.transformer_encoder.layers[0].norm2.weight.fill_(3e38)

    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised, edit=overflow)
    code, errors = probe(capsys, ckpt, tokenised, tmp_path / "probe")
    assert code == 2 and len(errors) == 1, errors
    assert f"non-finite activations (NaN or inf) at the input of {DOWN}" in errors[0]
    assert "probed cell(s), e.g. cell" in errors[0]
    assert not (tmp_path / "probe").exists()


def candidates_file(path):
    row = {"module": DOWN, "layer": 1, "row": 3, "col": 5, "accepted": True}
    pd.DataFrame([row]).to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize(
    ("classes", "needle"),
    [
        (["Astrocyte", "Oligodendrocyte", "Sst"], "(not in the checkpoint: Microglia-PVM; "
                                                  "not in the data: Oligodendrocyte)"),
        (["Sst", "Astrocyte", "Microglia-PVM"], "(the same ones in another order)"),
        (["Astrocyte", "Sst"], "(not in the checkpoint: Microglia-PVM)"),
    ],
)  # fmt: skip
def test_checkpoint_of_other_cell_types_is_refused(tmp_path, tokenised, capsys, classes, needle):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised, classes=classes)
    out = tmp_path / "ablate"
    code, errors = run_cli(
        capsys, "ablate", "--checkpoint", ckpt, "--data", tokenised, "--out", out,
        "--candidates", candidates_file(tmp_path / "candidates.tsv"), "--min-donors", 2,
    )  # fmt: skip
    assert code == 2 and len(errors) == 1, errors
    assert "was trained on other cell types " + needle in errors[0]
    assert "use the checkpoint fine-tuned on this dataset" in errors[0]
    assert not out.exists()


def test_hand_edited_split_sharing_donors_is_refused(tmp_path, tokenised, capsys):
    data = ad.read_h5ad(tokenised)
    data.obs.loc[data.obs.index[data.obs["donor"] == "D0"][:3], "split"] = "test"
    edited = tmp_path / "edited.h5ad"
    data.write_h5ad(edited)
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised)
    code, errors = probe(capsys, ckpt, edited, tmp_path / "probe")
    assert code == 2 and len(errors) == 1, errors
    assert f"the donor split of {edited} is broken: donor(s) D0 have cells" in errors[0]
    assert not (tmp_path / "probe").exists()


def test_unwritable_output_folder_stops_before_any_work(tmp_path, tokenised, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised)
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    code, errors = probe(capsys, ckpt, tokenised, blocker / "demo" / "probe")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: cannot write {blocker / 'demo'}: Not a directory;")
    assert blocker.read_text() == "a file where the results folder should be"


FULL_DISK = """
import resource, sys
from superweights.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(main(sys.argv[1:]))
"""


def test_disk_filling_mid_write_leaves_earlier_outputs_intact(tmp_path, tokenised, capsys):
    """The second probe (other settings) may write files up to `limit` bytes only, as if the
    disk filled up: it stops with one line and the first probe's files are all unchanged."""
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenised)
    out = tmp_path / "probe"
    assert probe(capsys, ckpt, tokenised, out) == (0, [])
    before = {p: (out / p).read_bytes() for p in files_under(out)}
    sizes = sorted(len(b) for b in before.values())
    limit = sizes[len(sizes) // 2]  # some files of the second run fit, larger ones do not
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY
    argv = ["probe", "--checkpoint", ckpt, "--data", tokenised, "--out", out,
            "--cells-per-type", 3, "--batch-size", 8]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(limit=limit), *map(str, argv)],
        capture_output=True,
        text=True,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: cannot write {out}/") and "File too large" in errors[0]
    assert {p: (out / p).read_bytes() for p in files_under(out)} == before
    assert json.loads((out / "summary.json").read_text())["settings"]["cells_per_type"] == 4


def test_every_stage_reads_weights_through_the_checked_loader():
    """Checkpoint weights are read only in model/checkpoint.py (read_state_dict, which checks
    every tensor); the one other reader is fine-tuning's own resume state."""
    library = Path(superweights.__file__).parent
    readers = {
        str(path.relative_to(library))
        for path in library.rglob("*.py")
        if re.search(r"torch\.load\(|safetensors\.torch|load_file\(", path.read_text())
    }
    assert readers == {"model/checkpoint.py", "model/train.py"}
    train = (library / "model" / "train.py").read_text()
    assert train.count("torch.load(") == 1 and "def _load_state(" in train


def test_rule_with_an_unwritable_output_folder_stops_with_one_line(tmp_path):
    from types import SimpleNamespace

    from superweights.rule_io import rule_log

    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker / "demo" / "x.tsv"
    rule = SimpleNamespace(log=[str(tmp_path / "rule.log")], output=[str(out)])
    worked = []
    with pytest.raises(SystemExit) as stopped:
        with rule_log(rule):
            worked.append(True)
    assert stopped.value.code == 2 and worked == []
    expected = (
        f"error: cannot write {out.parent}: Not a directory; free disk space or make the folder "
        "writable, then run again (earlier outputs are unchanged)"
    )
    assert (tmp_path / "rule.log").read_text().splitlines() == [expected]
    assert sys.stderr is sys.__stderr__
