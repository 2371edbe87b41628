from __future__ import annotations

import json

import pytest

from passforge.tools.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main

FIELDS = {"name", "spec", "status", "time_s", "nodes", "params", "param_bytes", "latency_ms", "peak_mem_bytes",
          "max_abs_err", "kl", "ppl"}


def test_optimize_writes_model_and_reports(tmp_path, capsys):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("import os\nprint(os.getcwd())\n" * 60, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["optimize", "tiny", "--seq-len", "32", "--out", str(out), "--eval-data", str(eval_file),
                 "--dump-dir", str(tmp_path / "dumps")])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "cleanup" in printed and "cast" in printed and "latency ms" in printed
    assert {"model.pt2", "report.json", "report.html", "manifest.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny" and report["pipeline"] == "cleanup,cast"
    assert len(report["passes"]) == 2
    for row in report["passes"]:
        assert row.keys() >= FIELDS and row["status"] == "ok"
        assert all(row[k] is not None for k in FIELDS)
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert len(list((tmp_path / "dumps").iterdir())) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", "tiny", "--pipeline", "cleanup,cats"], "did you mean 'cast'?"),
        (["optimize", "no-such-model"], "unknown model 'no-such-model'"),
        (["optimize", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["explain", "clenup", "tiny"], "did you mean 'cleanup'?"),
    ],
)
def test_usage_errors_exit_2_with_a_pointed_message(argv, message, capsys):
    with pytest.raises(SystemExit) if "--device" in argv else _no_raise():
        assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_bad_device_exit_code():
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--device", "tpu"])
    assert info.value.code == EXIT_USAGE


def test_failing_pass_exits_1_and_names_a_reproducer(tmp_path, capsys):
    import tests.passes.test_manager  # noqa: F401 - registers the deliberately broken test passes

    code = main(["optimize", "tiny", "--seq-len", "16", "--no-profile", "--pipeline", "cleanup,test-corrupt",
                 "--out", str(tmp_path / "out")])
    assert code == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "pass 'test-corrupt' failed and was rolled back" in err
    assert "passforge replay" in err
    repro = tmp_path / "out" / "reproducers" / "test-corrupt-0"
    assert (repro / "graph.pt2").is_file()
    assert main(["replay", str(repro)]) == EXIT_FAILURE  # the failure replays with one command


def test_ctrl_c_saves_what_completed_beside_the_output(tmp_path, capsys):
    """The user's --out is not written (it would look finished); the passes that completed go to
    OUT.interrupted, which loads and runs."""
    import tests.passes.test_manager  # noqa: F401 - registers test-ctrl-c
    from passforge.api import load

    out = tmp_path / "out"
    code = main(["optimize", "tiny", "--seq-len", "16", "--no-profile", "--pipeline", "cleanup,test-ctrl-c,cast",
                 "--out", str(out)])
    assert code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted after 1 of the pipeline's passes (cleanup)" in err and f"{out}.interrupted" in err
    assert not out.exists()
    saved = load(tmp_path / "out.interrupted")
    assert saved.report["interrupted"].startswith("interrupted after 1")
    assert [r["status"] for r in saved.report["passes"]] == ["ok", "interrupted"]
    saved(*saved.example_inputs)


def test_passes_lists_options_and_docs(capsys):
    assert main(["passes"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "cast (lossy) — dtype: bf16|fp16 = bf16" in out
    assert main(["passes", "--json"]) == EXIT_OK
    listing = json.loads(capsys.readouterr().out)
    assert {"cleanup", "cast"} <= {entry["name"] for entry in listing}


def test_explain_reports_rules(capsys):
    assert main(["explain", "cleanup", "nanogpt-tiny"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "rejected at clone: input is not contiguous" in out


def test_explain_fuse_attention_names_each_match(capsys):
    assert main(["explain", "fuse-attention", "nanogpt-tiny"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "fuse-attention: 2 match(es)" in out
    assert "explicit, scale, mask:masked_fill" in out and "mask→causal" in out


def test_profile_prints_by_op_and_by_pass(capsys):
    assert main(["profile", "tiny", "--seq-len", "16", "--top", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "by op:" in out and "by pass:" in out and "aten.linear.default" in out


def test_output_folder_with_foreign_files_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("mine")
    assert main(["optimize", "tiny", "--out", str(tmp_path)]) == EXIT_USAGE
    assert "holds files passforge did not write (notes.md)" in capsys.readouterr().err
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_skipped_pass_keeps_its_reproducer_after_save(tmp_path):
    import tests.passes.test_manager  # noqa: F401 - registers the deliberately broken test passes

    out = tmp_path / "out"
    code = main(["optimize", "tiny", "--seq-len", "16", "--no-profile", "--on-error", "skip",
                 "--pipeline", "test-raise,cleanup", "--out", str(out)])
    assert code == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["status"] == "skipped"
    assert (out / "reproducers" / "test-raise-0" / "spec.txt").is_file()


def test_bad_sequence_length_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["optimize", "tiny", "--seq-len", "1"])
    assert info.value.code == EXIT_USAGE
