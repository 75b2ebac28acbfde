"""kNN-LM against a slow exact reference, generation with attribution, `silo eval`, sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from silo.datastore.store import Datastore

from silo.build import BuildArgs, build_store
from silo.decontam import contaminated_docs
from silo.eval_modes import EvalArgs, run_eval, sweep_knn
from silo.evaluate import load_eval_docs, perplexity
from silo.keys import capture_keys
from silo.knnlm import (
    KNNParams,
    generate,
    knn_distribution,
    knn_interpolate,
    knn_target_logprob,
    retrieve_neighbours,
)
from silo.lm import load_causal_lm
from silo.tokenizer import encode_document

WINDOW = 256  # longer than any generated document: every key sees its whole document


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model, corpus_dir):
    out = tmp_path_factory.mktemp("knn") / "store"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                                shards=2, window=WINDOW, stride=WINDOW // 2, progress=False))
    return out


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory, tiny_model, corpus_dir):
    from silo.train import TrainArgs, train

    out = tmp_path_factory.mktemp("oracle") / "oracle"
    train(TrainArgs(corpus=str(corpus_dir), out=str(out), config="tiny", tokenizer=str(tiny_model), steps=80,
                    tiers=("pd", "sw", "by", "restricted"), allow_restricted=True, progress=False))
    return out


def test_mixture_formulas():
    lm = np.log(np.array([0.5, 0.1]))
    knn = np.log(np.array([0.1, 0.9]))
    np.testing.assert_allclose(knn_interpolate(lm, knn, 0.0), lm)
    np.testing.assert_allclose(knn_interpolate(lm, knn, 1.0), knn)
    np.testing.assert_allclose(np.exp(knn_interpolate(lm, knn, 0.25)), 0.75 * np.exp(lm) + 0.25 * np.exp(knn))
    d = np.array([[1.0, 2.0, np.inf]])
    v = np.array([[5, 5, -1]])
    assert knn_target_logprob(d, v, np.array([5]), 1.0)[0] == pytest.approx(0.0)
    assert knn_target_logprob(d, v, np.array([6]), 1.0)[0] == -np.inf
    dist = knn_distribution(torch.tensor([[1.0, 3.0]]), torch.tensor([[2, 4]]), 6, 2.0)
    assert dist.sum().item() == pytest.approx(1.0) and dist[0, 2] > dist[0, 4] and dist[0, 0] == 0
    with pytest.raises(Exception, match="lambda"):
        KNNParams(lam=1.5).validate()
    with pytest.raises(Exception, match="k must be positive"):
        KNNParams(k=0).validate()


def _reference(model, tok, store: Datastore, eval_docs: list[list[int]], k: int, lam: float, temp: float):
    """Slow and obvious: every document alone, float64 numpy, brute-force distances."""
    def keys_of(ids):
        with torch.no_grad(), capture_keys(model) as box:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        return box["keys"][0].double().numpy(), logits

    keys, values = [], []
    for row in (store.doc_row(d) for d in range(store.n_documents)):
        ids = encode_document(tok, row["text"])
        kk, _ = keys_of(ids)
        keys.append(kk[:-1])
        values.append(np.asarray(ids[1:]))
    keys, values = np.concatenate(keys), np.concatenate(values)
    out, tied = [], []
    for ids in eval_docs:
        q, logits = keys_of(ids)
        q = q[:-1]
        targets = np.asarray(ids[1:])
        lm = logits[np.arange(len(targets)), targets].numpy()
        d = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
        order = np.argsort(d, axis=1)
        ds = np.take_along_axis(d, order, 1)
        tied.append(np.abs(ds[:, k - 1] - ds[:, k]) < 1e-4)  # float32 search may order these either way
        top_d, top_v = ds[:, :k], values[order[:, :k]]
        w = np.exp(-(top_d - top_d[:, :1]) / temp)
        w /= w.sum(1, keepdims=True)
        p_knn = (w * (top_v == targets[:, None])).sum(1)
        out.append(np.log((1 - lam) * np.exp(lm) + lam * p_knn))
    return out, tied


@pytest.fixture(scope="module")
def random_word_store(tmp_path_factory, tiny_model):
    """Documents of random words: distinct contexts, so exact-distance ties are rare."""
    import random

    from silo.corpus import write_corpus

    rng = random.Random(5)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    recs = [{"doc_id": f"r{i}", "text": " ".join(rng.choice(lexicon) for _ in range(40)), "license": "GPL-2.0"}
            for i in range(120)]
    root = tmp_path_factory.mktemp("rand")
    write_corpus(recs, root / "corpus")
    build_store(BuildArgs(model=str(tiny_model), corpus=str(root / "corpus"), out=str(root / "store"),
                                tiers=("restricted",), shards=2, window=WINDOW, stride=WINDOW // 2, progress=False))
    return root


def test_knnlm_matches_slow_exact_reference(random_word_store, tiny_model):
    model, tok = load_causal_lm(tiny_model)
    store = Datastore.open(random_word_store / "store")
    _, docs = load_eval_docs(str(random_word_store / "corpus"), tok, "test", max_docs=6)
    assert docs
    params = KNNParams(k=16, lam=0.3, temperature=10.0)
    neigh = retrieve_neighbours(model, store, docs, params.k, WINDOW, WINDOW // 2, 4, tok.pad_token_id)
    fast = [n.knn_logprob(params) for n in neigh]
    ref, tied = _reference(model, tok, store, docs, params.k, params.lam, params.temperature)
    keep = np.concatenate([~t for t in tied])
    f, r = np.concatenate(fast), np.concatenate(ref)
    assert keep.mean() > 0.5
    np.testing.assert_allclose(f[keep], r[keep], atol=1e-4)
    assert math.exp(-f[keep].mean()) == pytest.approx(math.exp(-r[keep].mean()), rel=1e-4)


def test_knnlm_lowers_perplexity_on_restricted_text(store_dir, tiny_model, corpus_dir):
    """The LM saw only code; the store holds the prose facts the test documents repeat."""
    model, tok = load_causal_lm(tiny_model)
    store = Datastore.open(store_dir)
    _, docs = load_eval_docs(str(corpus_dir), tok, "test", ("restricted",))
    neigh = retrieve_neighbours(model, store, docs, 32, WINDOW, WINDOW // 2, 4, tok.pad_token_id)
    lm = perplexity([n.lm_logprob for n in neigh])
    knn = perplexity([n.knn_logprob(KNNParams(k=32, lam=0.5, temperature=10.0)) for n in neigh])
    assert knn < 0.7 * lm, (lm, knn)
    # the search beside the forward (a second thread) finds exactly what one thread finds
    serial = retrieve_neighbours(model, store, docs, 32, WINDOW, WINDOW // 2, 4, tok.pad_token_id, overlap=False)
    for a, b in zip(neigh, serial, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.dists, b.dists)
        np.testing.assert_array_equal(a.lm_logprob, b.lm_logprob)


def test_lm_only_greedy_generation_matches_transformers(tiny_model):
    model, tok = load_causal_lm(tiny_model)
    prompt = "def parse_alpha(items"
    ours = [t.token_id for t in generate(model, tok, prompt, max_new_tokens=12)]
    ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert ours == ref[0, ids.shape[1]:].tolist()[: len(ours)]


def test_knnlm_generation_carries_attribution(store_dir, tiny_model):
    model, tok = load_causal_lm(tiny_model)
    store = Datastore.open(store_dir)
    out = list(generate(model, tok, "The lighthouse of Lisbon was built in", max_new_tokens=8, store=store,
                        params=KNNParams(k=16, lam=0.6, temperature=10.0), temperature=0.8, top_p=0.9, seed=3))
    assert out and all(t.attribution for t in out)
    for t in out:
        assert sum(h["weight"] for h in t.attribution) <= 0.6 + 1e-6
        assert all(h["tier"] == "restricted" and h["sentence"] and h["license"] is not None for h in t.attribution)
    text = "".join(t.text for t in out)
    assert text == tok.decode([t.token_id for t in out], skip_special_tokens=True)
    again = list(generate(model, tok, "The lighthouse of Lisbon was built in", max_new_tokens=8, store=store,
                          params=KNNParams(k=16, lam=0.6, temperature=10.0), temperature=0.8, top_p=0.9, seed=3))
    assert [t.token_id for t in again] == [t.token_id for t in out]  # seeded


def test_eval_all_modes_on_the_same_tokens_with_oracle(store_dir, tiny_model, corpus_dir, oracle_model, tmp_path):
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(store_dir),),
                            modes=("lm", "knn"), oracle=str(oracle_model), window=WINDOW, stride=WINDOW // 2,
                            knn=KNNParams(k=32, lam=0.5, temperature=10.0)))
    for key in ("lm", "knn", "oracle", "gap_closed"):
        assert key in rep and math.isfinite(rep[key])
    assert rep["knn"] < rep["lm"] and rep["oracle"] < rep["lm"]
    assert rep["modes"]["lm"]["tokens"] == rep["modes"]["knn"]["tokens"] == rep["modes"]["oracle"]["tokens"]
    assert rep["checks"]["token_store"]["leaked_eval_docs"] == 0
    assert rep["gap_closed"] == pytest.approx((rep["lm"] - rep["knn"]) / (rep["lm"] - rep["oracle"]))
    json.dumps(rep)  # machine-readable as is


def test_eval_detects_leaked_and_copied_documents(tmp_path, tiny_model, corpus_dir):
    leaky = tmp_path / "leaky"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(leaky), tiers=("restricted",),
                                split="test", window=WINDOW, stride=WINDOW // 2, progress=False))
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(leaky),), modes=("knn",),
                            window=WINDOW, stride=WINDOW // 2, knn=KNNParams(k=8, lam=0.5, temperature=10.0)))
    checks = rep["checks"]["token_store"]
    assert checks["leaked_eval_docs"] == rep["documents"] > 0


def test_decontamination_rule():
    base = " ".join(f"w{i}" for i in range(60))
    eval_texts = [base]
    store = [("copy", "prefix words " + base), ("near", " ".join(f"w{i}" for i in range(2, 45))),
             ("short", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"), ("other", "completely different text here")]
    dropped = contaminated_docs(store, eval_texts, n=13, long_run=32, jaccard=0.8)
    assert set(dropped) == {"copy", "near"}
    assert "32-word" in dropped["copy"]
    license_text = " ".join(f"lic{i}" for i in range(40))  # shared by many store documents: boilerplate
    store = [(f"gpl{i}", " ".join(f"p{i}w{j}" for j in range(80)) + " " + license_text) for i in range(5)]
    assert contaminated_docs(store, ["eval doc " + license_text], boilerplate_docs=3) == {}
    assert set(contaminated_docs(store[:2], ["eval doc " + license_text], boilerplate_docs=3)) == {"gpl0", "gpl1"}


def test_sweep_stores_tuned_defaults(store_dir, tiny_model, corpus_dir, tmp_path):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(store_dir, path)
    model, tok = load_causal_lm(tiny_model)
    res = sweep_knn(model, tok, Datastore.open(path), str(corpus_dir), window=WINDOW, stride=WINDOW // 2,
                    ks=(8, 32), lams=(0.1, 0.5), temps=(1.0, 10.0), nprobe=16, refine=2)
    assert res["knn"] <= res["lm"]
    d = Datastore.open(path).manifest.defaults
    assert (d["k"], d["lambda"], d["temperature"]) == (res["k"], res["lambda"], res["temperature"])
    assert (d["nprobe"], d["refine"]) == (16, 2)  # the search settings it was tuned with are the store's too
    rep = run_eval(EvalArgs(model=str(tiny_model), corpus=str(corpus_dir), stores=(str(path),), modes=("knn",),
                            split="validation", window=WINDOW, stride=WINDOW // 2))
    assert rep["knn_params"]["k"] == res["k"] and rep["knn"] == pytest.approx(res["knn"], rel=1e-6)
    assert (rep["knn_params"]["nprobe"], rep["knn_params"]["refine"]) == (16, 2)


def test_key_capture_is_per_thread_under_concurrency(tiny_model):
    """A server runs one model in many threads: each must get the keys of its own forward."""
    import threading

    from silo.keys import text_keys

    model, tok = load_causal_lm(tiny_model)
    texts = [f"The tower of Oslo {i} " * (1 + i % 4) for i in range(8)]
    want = {t: text_keys(model, tok, [t])[0] for t in texts}
    bad = []

    def worker(t: str) -> None:
        for _ in range(15):
            got = text_keys(model, tok, [t])[0]
            if not np.allclose(got, want[t], atol=1e-5):
                bad.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not bad
