"""Scaling curves: deterministic nested subsampling, equal to truly subsampled stores."""

from __future__ import annotations

import csv
import json
import shutil

import faiss
import numpy as np
import pytest
from silo.datastore.manifest import Manifest
from silo.datastore.store import Datastore

from silo.build import BuildArgs, build_store
from silo.eval_modes import EvalArgs, run_eval
from silo.evaluate import load_eval_docs
from silo.knnlm import KNNParams, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.scaling import CurveArgs, entry_uniform, keep_mask, scaling_curve, subsample_neighbours

WINDOW = 128
PARAMS = KNNParams(k=8, lam=0.5, temperature=10.0)


@pytest.fixture(scope="module")
def flat_store(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("scal") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                                shards=2, window=WINDOW, stride=WINDOW // 2, progress=False))
    return out


def test_keep_mask_is_deterministic_nested_and_calibrated():
    ids = np.arange(200_000)
    u = entry_uniform(ids, 3)
    assert (u == entry_uniform(ids, 3)).all() and (u != entry_uniform(ids, 4)).mean() > 0.99
    assert u.min() >= 0 and u.max() < 1
    prev = np.zeros(len(ids), bool)
    for f in (0.01, 0.03, 0.1, 0.3, 1.0):
        m = keep_mask(ids, f, 3)
        assert (m | ~prev).all()  # nested: kept at a smaller fraction => kept here
        assert abs(m.mean() - f) < 0.01
        prev = m
    assert not keep_mask(np.array([-1]), 1.0, 0)[0]


def _truly_subsampled(src, dst, fraction, seed):
    """A real store holding only the kept entries (indexes rewritten without the others)."""
    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    for info in m.shards:
        path = dst / "shards" / info.name / "index.faiss"
        index = faiss.read_index(str(path))
        ids = np.arange(info.first_entry, info.first_entry + info.entries)
        drop = ids[~keep_mask(ids, fraction, seed)]
        index.remove_ids(faiss.IDSelectorBatch(drop))
        faiss.write_index(index, str(path))
        info.index_entries = int(index.ntotal)
    m.save(dst)


def test_subsampling_trick_equals_a_truly_subsampled_store(flat_store, tiny_model, corpus_dir, tmp_path):
    model, tok = load_causal_lm(tiny_model)
    _, docs = load_eval_docs(str(corpus_dir), tok, "test", ("restricted",))
    full = retrieve_neighbours(model, Datastore.open(flat_store), docs, 512, WINDOW, WINDOW // 2, 8, tok.pad_token_id)
    for fraction, seed in ((0.3, 1), (0.05, 2)):
        _truly_subsampled(flat_store, tmp_path / f"sub{seed}", fraction, seed)
        small = Datastore.open(tmp_path / f"sub{seed}")
        real = retrieve_neighbours(model, small, docs, PARAMS.k, WINDOW, WINDOW // 2, 8, tok.pad_token_id)
        for n, r in zip(full, real, strict=True):
            sub, ok = subsample_neighbours(n, fraction, seed, PARAMS.k)
            assert ok.all()
            np.testing.assert_allclose(sub.dists, r.dists, rtol=1e-5)
            np.testing.assert_allclose(sub.knn_logprob(PARAMS), r.knn_logprob(PARAMS), atol=1e-9)


def test_scaling_curve_writes_csv_and_plot(flat_store, tiny_model, corpus_dir, tmp_path):
    rows = scaling_curve(CurveArgs(model=str(tiny_model), store=str(flat_store), corpus=str(corpus_dir),
                                   out=str(tmp_path / "curve"), fractions=(0.01, 0.1, 1.0), seeds=2, depth=256,
                                   knn=PARAMS, window=WINDOW, stride=WINDOW // 2))
    knn = [r for r in rows if r["mode"] == "knn"]
    assert len(knn) == 6 and [r["mode"] for r in rows].count("lm") == 1
    by_f = {f: np.mean([r["perplexity"] for r in knn if r["fraction"] == f]) for f in (0.01, 0.1, 1.0)}
    assert by_f[1.0] < by_f[0.01]  # more data, lower perplexity
    assert {r["tokens"] for r in knn if r["fraction"] == 1.0} == {Datastore.open(flat_store).n_entries}
    with open(tmp_path / "curve" / "scaling.csv") as f:
        got = list(csv.DictReader(f))
    assert got[0].keys() >= {"fraction", "tokens", "seed", "mode", "perplexity"} and len(got) == len(rows)
    png = (tmp_path / "curve" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    json.dumps(rows)


def test_ivf_store_reports_ann_recall(tiny_model, corpus_dir, tmp_path):
    out = tmp_path / "ivf"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                                factory="IVF16,PQ8", keep_keys=True, window=WINDOW, stride=WINDOW // 2,
                                progress=False))
    rows = scaling_curve(CurveArgs(model=str(tiny_model), store=str(out), corpus=str(corpus_dir),
                                   out=str(tmp_path / "c"), fractions=(0.3, 1.0), seeds=1, depth=128, knn=PARAMS,
                                   window=WINDOW, stride=WINDOW // 2, recall_queries=50))
    recalls = [r["ann_recall"] for r in rows if r["mode"] == "knn"]
    assert all(0 < x <= 1 for x in recalls), recalls


def test_ric_curve_from_one_deep_retrieval(tiny_model, corpus_dir, flat_store, tmp_path):
    from silo.datastore.passages import PassageStore

    from silo.evaluate import perplexity
    from silo.ricl import RICParams, ric_score_documents

    pdir = tmp_path / "passages"
    build_store(BuildArgs(model=str(tiny_model), kind="passage", corpus=str(corpus_dir), out=str(pdir),
                                         tiers=("restricted",), passage_tokens=32, progress=False))
    rows = scaling_curve(CurveArgs(model=str(tiny_model), store=str(flat_store), corpus=str(corpus_dir),
                                   out=str(tmp_path / "c"), fractions=(0.1, 1.0), seeds=2, depth=64, knn=PARAMS,
                                   window=WINDOW, stride=WINDOW // 2, passage_store=str(pdir), max_tokens=2000))
    ric = [r for r in rows if r["mode"] == "ric"]
    assert len(ric) == 4 and all(np.isfinite(r["perplexity"]) for r in ric)
    # at fraction 1 the view is the store itself: the same as plain RIC-LM scoring
    model, tok = load_causal_lm(tiny_model)
    _, docs = load_eval_docs(str(corpus_dir), tok, "test", ("restricted",), max_tokens=2000, max_doc_tokens=2048)
    plain = perplexity(ric_score_documents(model, tok, PassageStore.open(pdir), docs, WINDOW, RICParams(), 8,
                                           tok.pad_token_id))
    assert [r["perplexity"] for r in ric if r["fraction"] == 1.0][0] == pytest.approx(plain, rel=1e-9)


def test_the_curve_and_the_table_are_one_set_of_figures(flat_store, tiny_model, corpus_dir, tmp_path):
    """The demo's curve scored other tokens than its SILO table, with another k and the full
    store's λ at every size, so at 3% of the store kNN-LM was worse than no store. Now the
    curve scores the table's tokens with the store's tuned k and T, λ tuned per store size on
    validation (0 among the choices): its full-store point is the table's, and no size is
    worse than the LM alone."""
    store = tmp_path / "store"
    shutil.copytree(flat_store, store)
    common = dict(model=str(tiny_model), corpus=str(corpus_dir), window=WINDOW, stride=WINDOW // 2,
                  max_tokens=3000)
    table = run_eval(EvalArgs(stores=(str(store),), modes=("lm", "knn"), tiers=("restricted",), sweep=True,
                              save_defaults=True, **common))
    tuned = Manifest.load(store).defaults
    rows = scaling_curve(CurveArgs(store=str(store), out=str(tmp_path / "curve"), fractions=(0.01, 0.1, 1.0),
                                   seeds=1, depth=max(512, tuned["k"]), **common))
    lm = next(r for r in rows if r["mode"] == "lm")["perplexity"]
    knn = {r["fraction"]: r for r in rows if r["mode"] == "knn"}
    assert lm == pytest.approx(table["lm"], rel=1e-9)
    assert knn[1.0]["perplexity"] == pytest.approx(table["knn"], rel=1e-6)
    assert knn[1.0]["lambda"] == tuned["lambda"]
    for f, r in knn.items():  # λ fits the store's size: a smaller store is never worse than none
        assert r["perplexity"] <= lm * 1.01, (f, r)
    assert knn[0.01]["lambda"] <= knn[1.0]["lambda"]
