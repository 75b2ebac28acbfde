"""Retrieval-augmented training (silo.ric_train): sequences laid out as RIC-LM blocks, never
with their own document or a copy of their text, every passage under the tier guard, the
loss on the block only, resumable exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from silo.datastore.kinds import open_store
from silo.datastore.manifest import FingerprintMismatch
from silo.server.app import load_state

from silo.app.cli import main
from silo.build import BuildArgs, build_store
from silo.corpus import RestrictedTextError
from silo.ric_train import (
    IGNORE,
    RICBatches,
    RICTrainParams,
    TrainingPassages,
    shares_run,
    token_runs,
)
from silo.tokenizer import load_tokenizer
from silo.train import TokenStream, TrainArgs, train


@pytest.fixture(scope="module")
def ric_model(tmp_path_factory, corpus_dir, tiny_model):
    out = tmp_path_factory.mktemp("ric") / "model"
    train(TrainArgs(corpus=str(corpus_dir), out=str(out), config="tiny", tokenizer=str(tiny_model), steps=4,
                    ric=0.5, progress=False))
    return out


def _batches(model_dir, p: RICTrainParams, tiers=("pd", "sw"), seq_len: int = 128) -> RICBatches:
    tok = load_tokenizer(model_dir)
    meta = json.loads((model_dir / "work" / "data.json").read_text())
    stream = TokenStream(model_dir / "work" / "train.bin", meta["train"]["dtype"], seq_len)
    index = TrainingPassages(model_dir, stream.data, tok, tiers, False, p)
    return RICBatches(stream, index, tok, seq_len, 16, 0, p, start=0, steps=0)


def test_a_block_reads_passages_of_other_documents_never_its_own_or_a_copy(ric_model):
    p = RICTrainParams(share=1.0, passages=2, passage_tokens=32, block=32, query_tokens=16)
    b = _batches(ric_model, p)
    seen = 0
    for step in range(6):
        x, y = b.build(step)
        assert x.shape == y.shape == (32, 128)  # the 16 plain rows, untouched, and 16 RIC rows (share 1.0)
        px, py = b.stream.batch(step, 16, 0)
        assert torch.equal(x[:16], px) and torch.equal(y[:16], py)
        for lay in b.layouts:
            r, own, pids = lay["row"], lay["own_doc"], lay["passages"]
            assert 1 <= len(pids) <= 2 and all(int(b.index.spans[i][0]) != own for i in pids)
            window = b.index.data[lay["end"] - 128 : lay["end"]]
            runs = token_runs(window, p.copy_tokens)
            assert not any(shares_run(b.index.passage(i), runs, p.copy_tokens) for i in pids)
            # the loss covers the document's text after the passages, never the passages
            n_doc = int((y[r] != IGNORE).sum())
            assert 0 < n_doc <= 128 - 1 and (y[r, : 128 - n_doc] == IGNORE).all()
            assert y[r, 128 - n_doc :].tolist() == b.index.data[lay["end"] - n_doc : lay["end"]].tolist()
            # the input starts with the passages, framed as documents, worst first, cut from the left
            framed = [tok for i in reversed(pids) for tok in [*b.bos, *b.index.passage(i), *b.eos]]
            assert x[r, : 128 - n_doc + 1].tolist() == framed[-(128 - n_doc + 1):]
            seen += 1
    assert seen > 40 and b.stats["excluded_own"] > 0  # a block's own document is the best match, often


def test_a_restricted_passage_stops_training(ric_model, tmp_path):
    """Passages come from the trained documents; one whose tier is restricted (a record
    edited, a label changed since) stops training as a restricted document does."""
    bad = tmp_path / "model"
    shutil.copytree(ric_model, bad)
    docs = pq.read_table(bad / "provenance" / "documents.parquet")
    tiers = docs.column("tier").to_pylist()
    tiers[0] = "restricted"
    licenses = docs.column("license").to_pylist()
    licenses[0] = "All rights reserved"
    docs = docs.set_column(docs.schema.get_field_index("tier"), "tier", [tiers])
    docs = docs.set_column(docs.schema.get_field_index("license"), "license", [licenses])
    pq.write_table(docs, bad / "provenance" / "documents.parquet")
    b = _batches(bad, RICTrainParams(share=1.0, passage_tokens=32, block=32, query_tokens=16))
    first = int(np.flatnonzero(b.index.spans[:, 0] == 0)[0])
    with pytest.raises(RestrictedTextError, match="restricted"):
        b.index.passage(first)
    with pytest.raises(RestrictedTextError):  # and within training: a query that finds it
        for step in range(200):
            b.build(step)


def test_ric_training_resumes_exactly(tmp_path, corpus_dir, tiny_model):
    common = dict(corpus=str(corpus_dir), config="tiny", tokenizer=str(tiny_model), steps=6, checkpoint_every=3,
                  ric=0.5, progress=False)
    straight = train(TrainArgs(out=str(tmp_path / "straight"), **common))
    stopped = train(TrainArgs(out=str(tmp_path / "resumed"), **common, time_budget=0.0))
    assert stopped["steps"] == 1
    train(TrainArgs(out=str(tmp_path / "resumed"), **common))
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ric = straight["ric"]
    assert ric["share"] == 0.5 and ric["with_passages"] > 0 and ric["passages_indexed"] > 0
    assert ric["step_seconds_ratio"] is None or ric["step_seconds_ratio"] > 0


def test_stores_that_read_only_the_tokenizer_serve_every_model_with_it(ric_model, tiny_model, corpus_dir, tmp_path):
    """RIC-LM compares the retrieval-trained LM with the plain one on the same passages, and
    an ∞-gram store counts token ids: neither depends on the weights. They were refused for
    any model but the one they were built with; now a model with the same tokenizer is
    accepted, a token store (keys from the weights) still refuses it, and another tokenizer
    is refused by all."""
    built = {}
    for kind, extra in (("passage", {"retrievers": ("bm25",), "passage_tokens": 32}), ("infgram", {}),
                        ("token", {"window": 64, "stride": 32})):
        built[kind] = tmp_path / kind
        build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(built[kind]), kind=kind,
                              max_docs=10, progress=False, **extra))
    for kind in ("passage", "infgram"):
        open_store(built[kind], load_index=False).check_model(ric_model)  # same tokenizer: served
    with pytest.raises(FingerprintMismatch, match="built with model"):
        open_store(built["token"], load_index=False).check_model(ric_model)
    other_tok = tmp_path / "other-tok"
    train(TrainArgs(corpus=str(corpus_dir), out=str(other_tok), config="tiny", vocab_size=600, steps=1,
                    progress=False))
    for kind in ("passage", "infgram"):
        with pytest.raises(FingerprintMismatch, match="tokenizer"):
            open_store(built[kind], load_index=False).check_model(other_tok)
    state = load_state(str(ric_model), [str(built["passage"]), str(built["infgram"]), str(built["token"])])
    assert set(state.stores) == {"passage", "infgram"} and set(state.store_errors) == {"token"}


def test_lm_train_ric_as_a_user_types_it(tmp_path, corpus_dir, tiny_model, capsys):
    main(["lm", "train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--config", "tiny", "--tokenizer",
          str(tiny_model), "--steps", "3", "--ric", "0.5", "--ric-passage-tokens", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3 and out["ric"]["share"] == 0.5 and out["ric"]["sequences"] > 0
    assert json.loads((tmp_path / "m" / "silo_model.json").read_text())["ric"]["passage_tokens"] == 64
    with pytest.raises(SystemExit):  # a share outside (0, 1] is refused before anything trains
        main(["lm", "train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "bad"), "--config", "tiny",
              "--tokenizer", str(tiny_model), "--steps", "3", "--ric", "2"])
