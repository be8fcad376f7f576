"""Released scGPT folders: `superweights inspect DIR` (usable and unusable folders) and the
SEA-AD preset that starts from one."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CHECKPOINT_VOCAB, flash_names, random_model, released_args, write_folder
from superweights.cli import main
from superweights.model.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-format folder: flash-attention names, MVC, no classifier, 2 layers."""
    state = flash_names(random_model(released_args()).state_dict())
    return write_folder(tmp_path_factory.mktemp("r") / "scGPT_human", released_args(), state)


def run_inspect(folder, capsys) -> tuple[int, str, str]:
    code = main(["inspect", str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def test_released_folder(released):
    result = subprocess.run(
        [sys.executable, "-m", "superweights.cli", "inspect", str(released)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    state = torch.load(released / "best_model.pt", weights_only=True)
    assert f"{sum(t.numel() for t in state.values()):,} parameters" in out
    assert "2 layers, d_model 512, 8 heads, d_hid 512, post-LN, dropout 0.2" in out
    assert "200 tokens (197 genes; <pad>=197, <cls>=198, <eoc>=199)" in out
    for end in ("weight", "bias"):
        assert (
            f"transformer_encoder.layers.N.self_attn.Wqkv.{end} -> "
            f"transformer_encoder.layers.N.self_attn.in_proj_{end} (2)"
        ) in out
    assert "classifier (cls_decoder): absent" in out
    assert "MVC (mvc_decoder): present" in out
    assert "no classifier head: fine-tuning adds one (3 layers)" in out
    assert "transformer_encoder.layers.0-1.linear2 (512 x 512 each)" in out


def test_upstream_impl_names_are_mapped(tmp_path, capsys):
    state = flash_names(random_model(released_args(MVC=False)).state_dict(), "self_attn._impl.")
    folder = write_folder(tmp_path / "ckpt", released_args(MVC=False), state)
    code, out, _ = run_inspect(folder, capsys)
    assert code == 0
    mapped = "layers.N.self_attn._impl.Wqkv.weight -> transformer_encoder.layers.N.self_attn."
    assert f"{mapped}in_proj_weight (2)" in out
    assert "MVC (mvc_decoder): absent" in out


def test_fine_tuned_folder_with_classifier(tmp_path, capsys):
    model = random_model(released_args(), n_cls=4)
    classes = ["Astro", "Micro", "Oligo", "OPC"]
    folder = save_checkpoint(
        model, model.config, CHECKPOINT_VOCAB, tmp_path / "ft", extra_args={"classes": classes}
    )
    code, out, _ = run_inspect(folder, capsys)
    assert code == 0
    assert "weights       model.safetensors" in out
    assert "key mapping   none (PyTorch names)" in out
    assert "classifier (cls_decoder): present, 4 classes: Astro, Micro, Oligo, OPC" in out
    assert "unless the data has exactly 4 cell types" in out


def _break(folder, how):
    if how in ("args.json", "vocab.json", "best_model.pt"):
        (folder / how).unlink()
    elif how == "garbage":
        (folder / "best_model.pt").write_bytes(b"not a checkpoint")
    elif how == "shapes":
        (folder / "args.json").write_text(json.dumps(released_args(d_hid=256)))
    elif how == "no_cls":
        vocab = {k: v for k, v in CHECKPOINT_VOCAB.items() if k != "<cls>"} | {"GENE197": 198}
        (folder / "vocab.json").write_text(json.dumps(vocab))


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("args.json", "lacks args.json"),
        ("vocab.json", "lacks vocab.json"),
        ("best_model.pt", "has neither model.safetensors nor best_model.pt"),
        ("garbage", "cannot read weights"),
        ("shapes", "6 with the wrong shape (transformer_encoder.layers.0.linear1.weight"),
        ("no_cls", "lacks the special token(s) <cls>"),
    ],
)
def test_unusable_folder_is_one_line_and_exit_2(tmp_path, released, capsys, how, needle):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("args.json", "vocab.json", "best_model.pt"):
        (folder / name).write_bytes((released / name).read_bytes())
    _break(folder, how)
    code, out, err = run_inspect(folder, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == ""
    assert len(errors) == 1 and needle in errors[0], err


def test_missing_folder(tmp_path, capsys):
    code, out, err = run_inspect(tmp_path / "nowhere", capsys)
    assert code == 2 and out == "" and "does not exist" in err


def dry_run(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-d", str(workdir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_seaad_scgpt_preset_plans_a_run_from_the_checkpoint(tmp_path, released):
    preset = ("--configfile", "config/seaad_scgpt.yaml")
    result = dry_run(tmp_path, *preset, "--config", f"model={{checkpoint: {released}}}")
    assert result.returncode == 0, result.stdout + result.stderr
    plan = result.stdout
    assert "rule pretrain:" not in plan and "rule finetune:" in plan
    assert f"input: results/seaad_mtg_scgpt/raw/data.h5ad, {released}/vocab.json" in plan
    finetune = re.search(r"superweights.cli finetune .*", plan).group(0)
    for option in ("--epochs 10", "--lr 0.0001", "--batch-size 32", "--max-seq-len 1200"):
        assert option in finetune
    missing = dry_run(tmp_path, *preset)  # the preset's own path, absent here
    assert missing.returncode == 2
    assert "error: checkpoint folder models/scGPT_human does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("remove", "needle"), [("args.json", "lacks args.json"), ("vocab.json", "lacks vocab.json")]
)
def test_workflow_stops_before_any_job_on_an_unusable_checkpoint(
    tmp_path, released, remove, needle
):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("args.json", "vocab.json"):
        (folder / name).write_bytes((released / name).read_bytes())
    (folder / remove).unlink()
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "-d", str(workdir)]
        + ["--config", f"model={{checkpoint: {folder}}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and needle in errors[0], result.stderr
    assert not (workdir / "results").exists()


def test_classifier_in_the_file_is_loaded_not_ignored(tmp_path, capsys):
    """A fine-tuned folder: the classifier is present and loaded; no ignored tensors."""
    model = random_model(released_args(), n_cls=4)
    folder = save_checkpoint(model, model.config, CHECKPOINT_VOCAB, tmp_path / "ft")
    (folder / "model.safetensors").unlink()  # best_model.pt, as a released fine-tuned folder
    code, out, log = run_inspect(folder, capsys)
    assert code == 0
    assert "classifier (cls_decoder): present, 4 classes" in out
    assert "ignored       none (every tensor in the file is loaded)" in out
    info = "\n".join(line for line in log.splitlines() if " INFO " in line)
    assert f"read {len(model.state_dict())} tensors from" in info  # the log is captured
    assert "ignored" not in info and "cls_decoder" not in info


def test_ignored_tensors_are_named_with_their_reason(tmp_path, capsys):
    state = flash_names(random_model(released_args()).state_dict())
    state["grad_reverse_discriminator._decoder.0.weight"] = torch.zeros(4, 512)
    state["decoder.zero_logit.0.weight"] = torch.zeros(512, 512)
    folder = write_folder(tmp_path / "ckpt", released_args(MVC=False), state)
    n_mvc = sum(k.startswith("mvc_decoder.") for k in state)
    code, out, log = run_inspect(folder, capsys)
    assert code == 0
    assert f"ignored       {n_mvc + 2} tensors of heads this model does not build:" in out
    assert f"mvc_decoder.* ({n_mvc}): MVC head, off in args.json (MVC: false)" in out
    assert "grad_reverse_discriminator.* (1): batch discriminator" in out
    assert "decoder.zero_logit.* (1): zero-probability output of the expression decoder" in out
    assert "MVC (mvc_decoder): in the file, ignored: MVC is off in args.json" in out
    assert f"ignored {n_mvc} tensor(s) of mvc_decoder.* in {folder}: MVC head" in log


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


def _object(data: bytes) -> bytes:
    import argparse
    import io

    buffer = io.BytesIO()
    torch.save({"args": argparse.Namespace(lr=1e-4)}, buffer)  # as scripts saving more than weights
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_truncated, "its zip archive is incomplete or damaged"),
        (lambda data: b"", "the file is empty (0 bytes)"),
        (lambda data: b"not a checkpoint", "neither a PyTorch checkpoint nor a pickle"),
        (_flipped, "fails its CRC check"),
        (_object, "it holds Python objects, not only tensors (argparse.Namespace)"),
    ],
    ids=["truncated", "empty", "garbage", "flipped", "object"],
)
def test_corrupt_weights_are_one_line_naming_the_file(tmp_path, released, capsys, damage, needle):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("args.json", "vocab.json", "best_model.pt"):
        (folder / name).write_bytes((released / name).read_bytes())
    weights = folder / "best_model.pt"
    weights.write_bytes(damage(weights.read_bytes()))
    code, out, err = run_inspect(folder, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(errors) == 1, err
    assert errors[0].startswith(f"error: cannot read weights {weights}: ") and needle in errors[0]
    assert "weights_only" not in err and "Traceback" not in err


def test_own_h5ad_with_a_released_model_plans_a_slurm_run(tmp_path, released):
    """The README's path for a newcomer: a local h5ad, a released-format folder and a copy
    of the SLURM profile, planned with a dry run (no pretraining, every stage on the data)."""
    profile = tmp_path / "mylab"
    shutil.copytree(ROOT / "profiles" / "slurm", profile)
    own = tmp_path / "mydata.yaml"
    own.write_text(
        "datasets:\n  - name: mine\n    source: local\n"
        f"local:\n  path: {tmp_path / 'mine.h5ad'}\npreprocess:\n  counts_layer: auto\n"
    )
    result = dry_run(
        tmp_path / "work", "--profile", str(profile), "--configfile", "config/seaad_scgpt.yaml",
        str(own), "--config", f"model={{checkpoint: {released}}}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    plan = result.stdout
    assert "rule pretrain:" not in plan and "WARNING: model.checkpoint" not in result.stderr
    for rule in ("fetch", "finetune", "probe", "ablate", "gene_effects", "enrich", "report"):
        assert f"rule {rule}:" in plan, rule
    assert "results/mine/report.html" in plan
