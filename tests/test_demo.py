"""`silo demo` end to end at a tiny size: every stage runs, as a new user's first command does."""

from __future__ import annotations

import json

import pytest

from silo.app.demo import QUICK, DemoSize, run_demo

TINY = DemoSize("tiny", 2 << 20, 8, 20_000, 1_000, (0.5, 1.0), 1, 500, "", lm_config="tiny")


@pytest.mark.slow
def test_the_demo_runs_every_stage(tmp_path, capsys):
    figures = run_demo(TINY, tmp_path / "demo")
    out = capsys.readouterr().out
    for stage in range(1, 9):
        assert f"=== {stage}. " in out, stage
    table = figures["silo_table"]
    assert {"LM only", "kNN-LM", "∞-gram", "RIC-LM (BM25)", "RIC-LM (MiniLM)", "oracle LM"} <= set(table), table
    serving = figures["serving"]
    assert serving["victim"] and serving["before"] and not serving["after"] and not serving["cited_after"]
    assert not serving["traced_after"]
    assert "status: logged True" in out and "compaction:" in out
    # the weights' side: the LM's training record, and the removed (restricted) document is not in it
    assert "training record:" in out and "leakage scan:" in out
    assert serving["weights"].startswith("not in the training record of the served model") and \
        not serving["weights_trained"], serving["weights"]
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["size"]["name"] == "tiny"
    # the opt-out went to the corpus's ledger: every store built from the corpus honours it
    ledger = (tmp_path / "demo" / "corpus" / "removals.log").read_text()
    assert serving["victim"] in ledger
    again = run_demo(TINY, tmp_path / "demo")  # finished stages are reused
    assert "reusing" in capsys.readouterr().out and again["silo_table"]["LM only"] == table["LM only"]


def test_the_default_demo_is_the_quick_one():
    from silo.app.cli import build_parser

    a = build_parser().parse_args(["demo"])
    assert not a.full and a.workdir is None
    assert QUICK.lm_steps and QUICK.store_tokens < 1_000_000
