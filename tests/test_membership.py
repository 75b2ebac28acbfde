"""Membership inference from the weights (silo.membership): Min-K% and Min-K%++ computed
as their papers define them, the AUROC as Mann-Whitney's U, and the claim they exist to
check: a model trained on a tier tells its train split from its test split, and SILO's
LM, which never trained on restricted text, cannot (AUROC ≈ 0.5)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import code_text, prose_text

from silo.app.cli import main
from silo.corpus import split_of, write_corpus
from silo.lm import load_causal_lm
from silo.membership import (
    auroc,
    bootstrap_interval,
    membership_auroc,
    score_text,
    token_statistics,
)
from silo.tokenizer import text_ids
from silo.train import TrainArgs, train


def test_auroc_is_mann_whitney():
    assert auroc([3, 4, 5], [1, 2]) == 1.0 and auroc([1, 2], [3, 4, 5]) == 0.0
    assert auroc([1, 2], [1, 2]) == 0.5 and auroc([2], [1, 2, 3]) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    m, n = rng.normal(1, 1, 300), rng.normal(0, 1, 300)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in m for b in n])
    assert auroc(m, n) == pytest.approx(brute)
    lo, hi = bootstrap_interval(m, n, rounds=200)
    assert lo < auroc(m, n) < hi and hi - lo < 0.15


def test_token_statistics_and_scores_follow_their_definitions(tiny_model):
    model, tok = load_causal_lm(str(tiny_model))
    text = "def merge(alpha, beta):\n    return sorted(alpha + beta)\n" * 3
    ids = text_ids(tok, text)
    lp, mu, sigma = token_statistics(model, ids, tok.bos_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id, *ids]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1]
    for t in (0, len(ids) // 2, len(ids) - 1):  # brute force at a few positions
        assert lp[t] == pytest.approx(float(logp[t, ids[t]]), abs=1e-4)
        dist = logp[t].exp()
        assert mu[t] == pytest.approx(float((dist * logp[t]).sum()), abs=1e-4)
        assert sigma[t] == pytest.approx(float(((dist * logp[t] ** 2).sum() - (dist * logp[t]).sum() ** 2).sqrt()),
                                         abs=1e-4)
    s = score_text(model, tok, text, k=0.2)
    n = int(np.ceil(0.2 * len(lp)))
    assert s.min_k == pytest.approx(np.sort(lp)[:n].mean()) and s.tokens == len(ids)
    assert s.min_k_pp == pytest.approx(np.sort((lp - mu) / sigma)[:n].mean())
    assert score_text(model, tok, "too short") is None


def _prose(rng: random.Random, words: int = 120) -> str:
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "ul", "pe"]
    return " ".join("".join(rng.choice(syllables) for _ in range(2)) for _ in range(words)) + "."


@pytest.mark.slow
def test_a_model_tells_its_training_documents_apart_and_silo_cannot_for_restricted(tmp_path, capsys):
    """Small documents of made-up words, trained on for many epochs: the oracle (every tier)
    separates restricted train from restricted test; SILO's LM (pd only) does not."""
    rng = random.Random(0)
    ids = {split: [] for split in ("train", "validation", "test")}
    for i in range(5000):  # splits are a hash of the id: pick ids for 100 train and 40 test documents
        ids[split_of(f"r-{i:05d}")].append(f"r-{i:05d}")
    restricted = ids["train"][:100] + ids["test"][:40] + ids["validation"][:5]
    records = [{"doc_id": d, "text": _prose(rng, 30), "source": "books", "owner": "o", "license": "All rights reserved"}
               for d in restricted]
    records += [{"doc_id": f"pd-{i:04d}", "text": _prose(rng, 30), "source": "books", "owner": "o",
                 "license": "CC0-1.0"} for i in range(40)]
    corpus = tmp_path / "corpus"
    write_corpus(records, corpus)
    # ~25 epochs of short made-up documents: enough for a tiny model to memorise them
    kw = dict(corpus=str(corpus), config="tiny", vocab_size=300, progress=False, seq_len=64)
    train(TrainArgs(out=str(tmp_path / "silo"), tiers=("pd",), steps=150, **kw))
    train(TrainArgs(out=str(tmp_path / "oracle"), tiers=("pd", "restricted"), allow_restricted=True, steps=700, **kw))
    silo_rep = membership_auroc(tmp_path / "silo", corpus, ("restricted",), n=100)
    oracle_rep = membership_auroc(tmp_path / "oracle", corpus, ("restricted",), n=100)
    assert silo_rep["in_record"] == 0 and oracle_rep["in_record"] == oracle_rep["members"]
    for name in ("min_k", "min_k_pp"):
        lo, hi = silo_rep[name]["ci95"]
        assert lo < 0.5 < hi or abs(silo_rep[name]["auroc"] - 0.5) < 0.15, silo_rep  # cannot tell them apart
        assert oracle_rep[name]["ci95"][0] > 0.5, oracle_rep  # trained on them: tells them apart
    main(["audit", "--model", str(tmp_path / "oracle"), "--corpus", str(corpus), "--tiers", "restricted",
          "--max-docs", "20", "--auroc", "--json"])
    assert json.loads(capsys.readouterr().out)["min_k_pp"]["auroc"] > 0.5


def test_members_and_non_members_are_samples_of_their_splits(tiny_model, tmp_path):
    """A corpus is stored in harvest order (by source, by kind): the first documents of a split
    are not a sample of it. Here the restricted tier is 200 code files, then 200 prose
    documents; the tiny LM (trained on code) finds code likely. Drawn uniformly, members
    and non-members are alike and the AUROC is ≈ 0.5; the first 30 train documents (all
    code) against the test split (both kinds) gave ≈ 0.8."""
    rng = random.Random(1)
    records = [{"doc_id": f"r-{i:04d}", "text": code_text(rng) if i < 200 else prose_text(rng), "source": "s",
                "owner": "o", "license": "All rights reserved"} for i in range(400)]
    write_corpus(records, tmp_path / "corpus")
    rep = membership_auroc(tiny_model, tmp_path / "corpus", ("restricted",), n=30)
    for name in ("min_k", "min_k_pp"):
        lo, hi = rep[name]["ci95"]
        assert lo < 0.5 < hi, rep
