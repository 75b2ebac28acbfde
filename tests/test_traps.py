"""Copyright traps (silo.traps): planted where the list says, scored against matched controls,
and the experiment's two halves: the oracle's weights detect the frequent traps and SILO's
LM's cannot; the stores hold the traps until their documents are opted out, then not at all."""

from __future__ import annotations

import random

import numpy as np
import pytest

from silo.corpus import iter_documents, split_of, write_corpus
from silo.errors import SiloError
from silo.traps import (
    TrapArgs,
    TrapSpec,
    detection,
    load_traps,
    make_traps,
    plant_traps,
    run_trap_experiment,
    trap_vocabulary,
)

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "ul", "pe"]


def _prose(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(5, 9))
        ws = ["".join(rng.choice(SYLLABLES) for _ in range(2)) for _ in range(n)]
        sentences.append(" ".join([ws[0].capitalize(), *ws[1:]]) + ".")
        left -= n
    return " ".join(sentences)


def _corpus(path, n_restricted: int = 60, n_pd: int = 40, words: int = 30):
    rng = random.Random(0)
    train_ids = [f"r-{i:05d}" for i in range(5000) if split_of(f"r-{i:05d}") == "train"][:n_restricted]
    records = [{"doc_id": d, "text": _prose(rng, words), "source": "books", "owner": "press",
                "license": "All rights reserved"} for d in train_ids]
    records += [{"doc_id": f"pd-{i:04d}", "text": _prose(rng, words), "source": "almanac", "owner": "o",
                 "license": "CC0-1.0"} for i in range(n_pd)]
    write_corpus(records, path)
    return path


def test_traps_are_planted_in_their_hosts_as_often_as_listed(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    before = {d["doc_id"]: d["text"] for d in iter_documents(corpus)}
    spec = TrapSpec(lengths=(6, 12), repeats=(1, 5), per_cell=3, seed=1)
    traps = plant_traps(corpus, make_traps(spec, trap_vocabulary(corpus)), out=tmp_path / "trapped")
    after = {d["doc_id"]: d for d in iter_documents(tmp_path / "trapped")}
    planted, controls = [t for t in traps if t.planted], [t for t in traps if not t.planted]
    assert len(planted) == 12 and len(controls) == 12 and len({t.text for t in traps}) == 24
    assert all(len(t.text.split()) == t.words for t in traps)
    hosts = [t.host for t in planted]
    assert len(set(hosts)) == 12 and all(after[h]["tier"] == "restricted" and split_of(h) == "train" for h in hosts)
    for t in planted:  # exactly `repeats` copies in its host, none anywhere else
        assert sum(d["text"].count(t.text) for d in after.values()) == t.repeats
        assert after[t.host]["text"].count(t.text) == t.repeats
        # the host's own text is all still there, in order, around the copies
        assert after[t.host]["text"].replace(t.text + " ", "").replace("\n" + t.text, "") == before[t.host]
    for t in controls:
        assert not any(t.text in d["text"] for d in after.values())
    assert {d: after[d]["text"] for d in before if d not in hosts} == {d: before[d] for d in before if d not in hosts}
    assert [(t.trap_id, t.host) for t in load_traps(tmp_path / "trapped")] == [(t.trap_id, t.host) for t in traps]
    assert load_traps(corpus) is None
    with pytest.raises(SiloError, match="already has traps"):
        plant_traps(tmp_path / "trapped", traps)
    with pytest.raises(SiloError, match="need as many restricted training documents"):
        plant_traps(corpus, make_traps(TrapSpec(lengths=(6,), repeats=(1,), per_cell=61), trap_vocabulary(corpus)),
                    out=tmp_path / "too-many")
    assert not (tmp_path / "too-many").exists()


def test_detection_compares_each_cell_with_the_controls_of_its_length(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    traps = make_traps(TrapSpec(lengths=(6, 12), repeats=(1, 10), per_cell=4), trap_vocabulary(corpus))
    # a score that knows the truth for the 10x traps of 12 words, and is noise elsewhere
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(len(traps), 2))
    for i, t in enumerate(traps):
        if t.words == 12 and t.repeats == 10:
            scores[i] += 100
    rows = {(r["words"], r["repeats"]): r for r in detection(traps, scores, rounds=100)}
    assert set(rows) == {(6, 1), (6, 10), (12, 1), (12, 10), ("all", 1), ("all", 10), ("all", "all")}
    assert rows[(12, 10)]["loss"]["auc"] == 1.0 and rows[(12, 10)]["min_k_pp"]["ci95"] == [1.0, 1.0]
    assert all(r["traps"] == 4 and r["controls"] == 8 for k, r in rows.items() if k[0] != "all")
    assert rows[(6, 10)]["loss"]["auc"] < 1.0
    # pooled over lengths: the 10x traps of both lengths against every control
    assert rows[("all", 10)]["traps"] == 8 and rows[("all", 10)]["controls"] == 16
    assert rows[("all", "all")]["traps"] == rows[("all", "all")]["controls"] == 16
    assert rows[(6, 10)]["loss"]["auc"] < rows[("all", 10)]["loss"]["auc"] < 1.0
    with pytest.raises(SiloError, match="at least 2 traps"):
        make_traps(TrapSpec(per_cell=1), trap_vocabulary(corpus))


@pytest.mark.slow
def test_the_trap_experiment_shows_both_halves_of_the_promise(tmp_path):
    """Small corpus, tiny models trained for many epochs: the oracle's weights detect the
    frequent traps, SILO's LM's cannot; the stores serve the traps until their hosts are
    opted out, and then nothing of them."""
    corpus = _corpus(tmp_path / "corpus")
    rep = run_trap_experiment(TrapArgs(
        corpus=str(corpus), work=str(tmp_path / "work"), spec=TrapSpec(lengths=(8, 16), repeats=(1, 10, 100),
                                                                       per_cell=4),
        permissive_tiers=("pd",), steps=300, seq_len=64, vocab_size=300, progress=False))
    assert rep["spec"] == {"lengths": [8, 16], "repeats": [1, 10, 100], "per_cell": 4}  # the traps' own
    silo, oracle = rep["weights"]["SILO LM"], rep["weights"]["oracle"]
    for cell in oracle:
        if cell["repeats"] == 100:
            assert cell["loss"]["auc"] >= 0.9 and cell["loss"]["ci95"][0] > 0.5, oracle
    # traps and controls are alike to a model that never saw either (4 traps a cell are too
    # few to say so of each cell; all 24 against all 24 controls)
    pooled = silo[-1]
    assert pooled["repeats"] == "all" and pooled["traps"] == 24
    for name in ("loss", "min_k_pp"):
        assert pooled[name]["ci95"][0] < 0.5 < pooled[name]["ci95"][1], silo
    store = rep["datastore"]
    assert store["traps_in_store"] == rep["planted"] == store["hosts_removed"] == 24
    b, a = store["before"], store["after"]
    assert min(b["infgram_counts"]) >= 1 and b["traced_in_hosts"] == 24
    def ratio(m, who=""):  # kNN-LM's perplexity over the LM's
        return m[f"{who}knn_perplexity"] / m[f"{who}lm_perplexity"]

    # the store predicts the traps it holds (a little, at the untuned λ = 0.25 of a tiny LM's keys:
    # 0.87 against 0.97 on the controls)
    assert ratio(b) < ratio(b, "controls_") - 0.05
    assert a["infgram_counts"] == [0] * 24 and a["traced_in_hosts"] == 0
    # after the opt-out, kNN-LM is to the traps what it is to controls no store ever held
    assert a["lm_perplexity"] == pytest.approx(b["lm_perplexity"])
    assert ratio(a) == pytest.approx(ratio(a, "controls_"), abs=0.03)
