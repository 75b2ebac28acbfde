"""`silo demo` end to end at a tiny size: every stage runs, as a new user's first command does."""

from __future__ import annotations

import csv
import json

import pytest
from silo.datastore.kinds import open_store

from silo.app.demo import QUICK, DemoSize, run_demo
from silo.corpus import iter_documents
from silo.traps import TrapSpec, load_traps

TINY = DemoSize("tiny", 2 << 20, 8, 20_000, 1_000, (0.5, 1.0), 1, "", lm_config="tiny",
                traps=TrapSpec(lengths=(16,), repeats=(1, 10), per_cell=2))


@pytest.mark.slow
def test_the_demo_runs_every_stage(tmp_path, capsys):
    figures = run_demo(TINY, tmp_path / "demo")
    out = capsys.readouterr().out
    for stage in range(1, 10):
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
    # copyright traps: planted at step 1, kept out of the demo's own stores, measured at step 9
    traps, store = figures["traps"]["weights"], figures["traps"]["datastore"]
    assert set(traps) == {"SILO LM", "oracle"} and traps["SILO LM"][-1]["traps"] == 4
    hosts = {t.host for t in load_traps(tmp_path / "demo" / "corpus") if t.host}
    assert len(hosts) == 4 and hosts <= {d["doc_id"] for d in iter_documents(tmp_path / "demo" / "corpus")}
    assert store["traps_in_store"] == 4 and min(store["before"]["infgram_counts"]) >= 1
    assert store["after"]["infgram_counts"] == [0] * 4 and store["after"]["traced_in_hosts"] == 0
    served = open_store(tmp_path / "demo" / "store-token", load_index=False, with_text=False)
    assert not hosts & {served.doc_id(d) for d in range(served.n_documents)}
    # the scaling curve and the SILO table are one set of figures: the full store's point is the table's
    with open(tmp_path / "demo" / "scaling" / "scaling.csv") as f:
        curve = list(csv.DictReader(f))
    full = next(r for r in curve if r["mode"] == "knn" and float(r["fraction"]) == 1.0 and r["seed"] == "0")
    lm = next(r for r in curve if r["mode"] == "lm")
    assert float(full["perplexity"]) == pytest.approx(table["kNN-LM"]["perplexity"], rel=1e-6)
    assert float(lm["perplexity"]) == pytest.approx(table["LM only"]["perplexity"], rel=1e-6)
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
