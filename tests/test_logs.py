"""A rule's log says what it read and wrote, with sizes, and how long it took."""

from types import SimpleNamespace

from superweights.outputs import write_text
from superweights.rule_io import describe_path, rule_log


def test_rule_log_names_what_the_rule_read_and_wrote(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("x" * 2_500)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "a").write_text("a")
    out = tmp_path / "out" / "table.tsv"
    rule = SimpleNamespace(
        rule="demo_stage",
        input=[str(source), str(folder)],
        output=[str(out)],
        log=[str(tmp_path / "rule.log")],
    )
    with rule_log(rule):
        write_text(out, "a\tb\n")
    lines = [
        line.split(" INFO ", 1)[1] for line in (tmp_path / "rule.log").read_text().splitlines()
    ]
    assert lines[:3] == [
        "rule demo_stage",
        f"read {source} (2.5 kB)",
        f"read {folder}/ (1 files, 1 B)",
    ]
    assert lines[3] == f"wrote {out} (4 B)"
    assert lines[4].startswith("done in ") and lines[4].endswith(" s")


def test_describe_path_of_a_missing_file(tmp_path):
    assert describe_path(tmp_path / "nothing") == f"{tmp_path / 'nothing'} (missing)"
    big = tmp_path / "big"
    big.write_bytes(bytes(3_200_000))
    assert describe_path(big) == f"{big} (3.2 MB)"
