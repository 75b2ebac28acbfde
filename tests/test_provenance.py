"""The training record (silo.provenance): every model SILO trains says exactly what it was
trained on, and anyone can check a text or a document against it.

Checked against the corpus itself: the record lists exactly the train-split documents of
the trained tiers (never a restricted one), every training text is found (no false
negatives), fresh text is not, at about the stated false-positive rate per shingle; an
outside checkpoint is labelled as having no record; a torn record is refused by name."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from silo.datastore.ledger import SHINGLE_WORDS, fingerprint, normalize
from silo.server.client import SiloClient
from test_server import TOKEN, start

from silo.app.cli import main
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents
from silo.lm import load_causal_lm
from silo.membership import load_reference, membership_check
from silo.provenance import (
    BloomFilter,
    ProvenanceError,
    TrainingRecord,
    audit,
    check_removal,
    model_card,
)
from silo.train import TrainArgs, train


def _fresh_text(seed: int, words: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(7)) for _ in range(words))


def test_bloom_filter_has_no_false_negatives_and_the_stated_false_positive_rate():
    rng = np.random.default_rng(0)
    added = rng.integers(0, 2**63, size=50_000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    bloom = BloomFilter.sized(len(added), 1e-3)
    bloom.add(added)
    assert bloom.contains(added).all()
    others = rng.integers(0, 2**63, size=400_000, dtype=np.uint64) * np.uint64(2)  # even: never added
    rate = bloom.contains(others).mean()
    assert 0.0002 < rate < 0.003, rate  # 1e-3 stated; an unfilled filter would show 0, a broken one far more
    with pytest.raises(ProvenanceError):
        BloomFilter.sized(10, 0.0)


@pytest.fixture(scope="module")
def attributed_model(tmp_path_factory, corpus_dir):
    """A tiny LM on the pd, sw and by tiers: a few steps are enough, the record is the point."""
    out = tmp_path_factory.mktemp("provenance") / "model"
    train(TrainArgs(corpus=str(corpus_dir), out=str(out), tiers=("pd", "sw", "by"), config="tiny", vocab_size=512,
                    steps=2, progress=False))
    return out


def test_the_record_lists_exactly_the_training_documents(tiny_model, corpus_dir):
    record = TrainingRecord.open(tiny_model)
    assert record is not None
    trained = [d["doc_id"] for d in iter_documents(corpus_dir, tiers=("pd", "sw"), split="train", columns=[])]
    assert sorted(record.documents.column("doc_id").to_pylist()) == sorted(trained)
    assert set(record.documents.column("tier").to_pylist()) <= {"pd", "sw"}
    for doc in iter_documents(corpus_dir, columns=[]):
        assert record.has_document(doc["doc_id"]) == (doc["doc_id"] in trained)
    r = record.record
    assert r["tiers"] == ["pd", "sw"] and r["documents"] == len(trained)
    assert r["tokens"] == sum(v["tokens"] for v in r["by_tier"].values()) > 0
    meta = json.loads((tiny_model / "silo_model.json").read_text())
    assert r["tokens"] == meta["data"]["train"]["tokens"]  # the very tokens trained on
    assert r["validation_documents"] == meta["data"]["validation"]["documents"]
    assert r["membership"]["bytes_per_token"] > 0 and r["membership"]["fpr"] == 1e-4


def test_every_training_text_is_found_and_fresh_text_is_not(tiny_model, corpus_dir):
    record = TrainingRecord.open(tiny_model)
    for doc in iter_documents(corpus_dir, tiers=("pd", "sw"), split="train"):
        result = record.audit_text(doc["text"])
        assert result.verdict == "trained" and doc["doc_id"] in result.same_documents, doc["doc_id"]
    fresh = [record.audit_text(_fresh_text(i)) for i in range(20)]
    assert all(a.verdict == "not" for a in fresh), [a.to_json() for a in fresh]
    found = sum(a.found for a in fresh) / sum(a.shingles for a in fresh)
    assert found < 0.01, found


def test_a_training_excerpt_inside_new_text_is_partly_trained(tiny_model, corpus_dir):
    record = TrainingRecord.open(tiny_model)
    doc = next(d for d in iter_documents(corpus_dir, tiers=("sw",), split="train") if len(normalize(d["text"])) > 60)
    excerpt = " ".join(doc["text"].split()[10:50])
    result = record.audit_text(_fresh_text(1, 30) + " " + excerpt + " " + _fresh_text(2, 30))
    assert result.verdict == "partly" and result.longest_run_words >= SHINGLE_WORDS + 1, result.to_json()
    assert record.audit_text("too short to say").verdict == "too short"


def test_restricted_documents_are_never_in_the_record(tiny_model, corpus_dir):
    record = TrainingRecord.open(tiny_model)
    for doc in iter_documents(corpus_dir, tiers=("restricted",)):
        assert not record.has_document(doc["doc_id"])
        assert not record.audit_text(doc["text"]).same_documents


def test_card_lists_the_attributions_the_training_data_obliges(attributed_model, corpus_dir):
    record = TrainingRecord.open(attributed_model)
    by_docs = sorted(d["doc_id"] for d in iter_documents(corpus_dir, tiers=("by",), split="train", columns=[]))
    credited = sorted(i for c in record.attributions() for i in c["doc_ids"])
    assert credited == by_docs and by_docs
    card = model_card(attributed_model)
    for c in record.attributions():
        assert f"- {c['source']}, {c['license']}: {c['documents']} document(s)" in card
    assert record.record["training_set_sha256"] in card and "| by |" in card


def test_an_outside_checkpoint_has_no_record_and_says_so(tiny_model, corpus_dir, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(tiny_model, outside, ignore=shutil.ignore_patterns("provenance", "work"))
    assert TrainingRecord.open(outside) is None
    rep = audit(outside, [("t", "any text at all")], ["doc-0001"])
    assert rep["record"] is False and "no training record" in rep["message"]
    assert rep["texts"] == [{"name": "t"}] and rep["documents"] == [{"doc_id": "doc-0001", "trained": None}]
    assert "No training record" in model_card(outside)
    # what is left for an outside checkpoint: the weights' own membership scores
    main(["audit", "--model", str(outside), "--text", _fresh_text(4), "--json"])
    rep = json.loads(capsys.readouterr().out)
    (t,) = rep["texts"]
    assert rep["record"] is False and "verdict" not in t and t["membership"]["min_k"] < 0
    assert t["membership"]["reference_documents"] == 0  # no record, no reference given: no percentile
    main(["audit", "--model", str(outside), "--text", _fresh_text(4), "--reference", str(corpus_dir)])
    out = capsys.readouterr().out
    # without a record nothing proves the reference documents were not trained on: said so
    assert "no training record" in out and "reference documents, not proven non-members" in out, out


def test_a_torn_record_is_refused_by_name(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model / "provenance", copy / "provenance")
    bloom = copy / "provenance" / "shingles.bloom"
    bloom.write_bytes(bloom.read_bytes()[:-1])
    with pytest.raises(ProvenanceError, match="shingles.bloom"):
        TrainingRecord.open(copy)
    (copy / "provenance" / "record.json").write_text("{not json")
    with pytest.raises(ProvenanceError, match="record"):
        TrainingRecord.open(copy)


def test_cli_audit_and_card(tiny_model, corpus_dir, tmp_path, capsys):
    doc = next(iter_documents(corpus_dir, tiers=("pd",), split="train"))
    restricted = next(iter_documents(corpus_dir, tiers=("restricted",), split="train", columns=[]))
    main(["audit", "--model", str(tiny_model), "--text", doc["text"], "--text", _fresh_text(3),
          "--doc-id", doc["doc_id"], "--doc-id", restricted["doc_id"]])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("text 1: trained") and doc["doc_id"] in out[0]
    assert out[1].startswith("text 2: not (0/")
    assert "Min-K%++" in out[1] and "held-out non-members" in out[1]  # the weights' scores, calibrated
    assert out[2] == f"{doc['doc_id']}: trained on (exact)"
    assert out[3] == f"{restricted['doc_id']}: not trained on (exact)"
    main(["audit", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--split", "train", "--tiers", "sw",
          "--max-docs", "3", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["texts"]) == 3 and all(t["verdict"] == "trained" for t in rep["texts"])
    main(["lm", "card", str(tiny_model)])
    assert "## Training data" in capsys.readouterr().out
    main(["lm", "card", str(tiny_model), "--json"])
    card = json.loads(capsys.readouterr().out)
    assert card["record"]["documents"] == TrainingRecord.open(tiny_model).record["documents"]
    path = tmp_path / "doc.txt"
    path.write_text(doc["text"])
    main(["audit", "--model", str(tiny_model), "--file", str(path), "--record-only"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: trained") and "Min-K" not in line  # --record-only: the record alone
    with pytest.raises(SystemExit) as e:
        main(["audit", "--model", str(tiny_model)])
    assert e.value.code == 2 and "nothing to audit" in capsys.readouterr().err


def test_the_weights_side_of_a_removal(tiny_model, corpus_dir):
    """OptOutStatus's weights section: by id, and by the text fingerprints the removal logged
    (what is left after compaction), so a trained text under another id is still named."""
    record = TrainingRecord.open(tiny_model)
    trained = next(iter_documents(corpus_dir, tiers=("sw",), split="train"))
    restricted = next(iter_documents(corpus_dir, tiers=("restricted",), split="train"))
    removal = {"doc_ids": [restricted["doc_id"]], "fingerprints": [fingerprint(restricted["doc_id"], restricted["text"])]}
    w = check_removal(record, "tiny", removal)
    assert w.has_record and not w.trained_doc_ids and not w.trained_text_doc_ids
    assert w.statement.startswith("not in the training record of the served model tiny")
    # a permissive training document opted out: named by id and by text
    w = check_removal(record, "tiny", {"doc_ids": [trained["doc_id"]],
                                       "fingerprints": [fingerprint(trained["doc_id"], trained["text"])]})
    assert w.trained_doc_ids == [trained["doc_id"]] and w.trained_text_doc_ids == [trained["doc_id"]]
    assert "the weights were trained on them" in w.statement
    # the same text under another id (a copy in another store): found by its fingerprint alone
    w = check_removal(record, "tiny", {"doc_ids": ["copy-1"], "fingerprints": [fingerprint("copy-1", trained["text"])]})
    assert not w.trained_doc_ids and w.trained_text_doc_ids == ["copy-1"]
    w = check_removal(None, "outside", removal)
    assert not w.has_record and "no training record" in w.statement


def test_an_outside_checkpoints_optout_status_asks_the_weights(tiny_model, corpus_dir, tmp_path):
    """No training record: the weights section of OptOutStatus gives the removed text's
    Min-K%++ percentile among the operator's reference documents (not proven non-members),
    says so when there is no reference, and, once compaction dropped the text, that there is
    nothing left to score."""
    outside = tmp_path / "outside"
    shutil.copytree(tiny_model, outside, ignore=shutil.ignore_patterns("provenance", "work"))
    store = tmp_path / "store"
    build_store(BuildArgs(model=str(outside), corpus=str(corpus_dir), out=str(store), tiers=("restricted",),
                          window=128, stride=64, progress=False, ledger=str(tmp_path / "removals.log")))
    server, port, state = start(outside, [store], membership_reference=str(corpus_dir))
    try:
        st = state.stores["token"]
        victim, text = st.doc_id(0), st.doc_text(0)
        with SiloClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            w = c.optout_status(doc_id=victim).weights  # not removed yet: the question is the same
            assert not w.has_record and w.scored and list(w.scored_doc_ids) == [victim]
            model, tok = load_causal_lm(outside)
            expected = membership_check(model, tok, load_reference(model, tok, outside, corpus_dir), {victim: text})
            assert w.reference_documents == expected["reference_documents"] > 0
            assert w.membership_percentile == pytest.approx(expected["percentile"]) and 0 <= expected["percentile"] <= 100
            assert "no training record" in w.statement and "membership percentile" in w.statement
            assert "vouches were not trained on" in w.statement  # an outside model's reference proves nothing
            receipt = c.optout(doc_ids=[victim]).receipt_id
            removed = c.optout_status(receipt_id=receipt).weights  # tombstoned: its text is still held
            assert removed.scored and removed.membership_percentile == pytest.approx(w.membership_percentile)
            a = c.audit(text, membership=True)
            assert a.scored and not a.has_record and not a.reference_proven
            assert a.reference_documents == w.reference_documents and 0 <= a.min_k_pp_percentile <= 100
            c.compact()
            gone = c.optout_status(receipt_id=receipt).weights
            assert not gone.scored and "no text of the removed documents is held here" in gone.statement
    finally:
        server.stop(0)
    server, port, state = start(outside, [store])  # no reference corpus: no percentile, and how to get one
    try:
        with SiloClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            w = c.optout_status(doc_id=st.doc_id(1)).weights
            assert not w.scored and "--membership-reference" in w.statement
            a = c.audit(text, membership=True)
            assert a.scored and a.reference_documents == 0 and a.min_k_pp_percentile == 0
    finally:
        server.stop(0)
