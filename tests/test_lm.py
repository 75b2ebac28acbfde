"""Tokenizer round-trip, tier guard in the training loader, tiny-LM training, resume, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from silo.corpus import RestrictedTextError, write_corpus
from silo.evaluate import evaluate_lm, perplexity, score_documents, windows_for
from silo.lm import NotACausalLMError, build_model, load_causal_lm
from silo.tokenizer import StreamDecoder, encode_document, train_tokenizer
from silo.train import NoTrainableTextError, TrainArgs, train
from tests.conftest import code_text, make_records, prose_text

TRICKY = [
    "def f(x):\n\tif x:\n        return 'héllo 世界 🙂'  \n\n",
    "  leading spaces and trailing   ",
    "tabs\t\tand\r\nwindows newlines\n",
    "ünïcödé — “quotes” ‘single’ ½ µ Ω 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
    " ",
    "x" * 300,
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import random

    rng = random.Random(1)
    texts = [code_text(rng) for _ in range(50)] + [prose_text(rng) for _ in range(50)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, out, vocab_size=400)
    return out


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trips_code_whitespace_and_unicode(tokenizer_dir, text):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids  # byte fallback: nothing is unknown


@pytest.mark.parametrize("text", [t for t in TRICKY if t] + ["🙂🙂 𝔘 世界" * 20])
def test_stream_decoder_pieces_join_to_the_decoded_text(tokenizer_dir, text):
    """Generation streams one piece per token; byte-fallback characters split over several
    tokens are held back until whole, so no piece carries U+FFFD and the pieces add up."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = StreamDecoder(tok)
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(text.split()) // 2  # it streams, not one piece at the end


def test_tokenizer_special_tokens_and_framing(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = encode_document(tok, "hello")
    assert ids[0] == 1 and ids[-1] == 2 and 3 not in ids
    assert (tokenizer_dir / "tokenizer.model").is_file()


def test_training_loss_goes_down_and_saves_loadable_safetensors(tiny_model):
    rec = json.loads((tiny_model / "silo_model.json").read_text())
    assert rec["tiers"] == ["pd", "sw"] and not rec["trained_on_restricted"]
    first, last = rec["loss_first"], rec["loss_last"]
    assert last < 0.6 * first, (first, last)
    assert rec["val_perplexity"] < rec["unigram_val_perplexity"]
    assert (tiny_model / "model.safetensors").is_file() and not list(tiny_model.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)


def test_training_data_holds_only_permissive_documents(tiny_model, corpus_dir):
    from silo.corpus import iter_documents, split_of

    data = json.loads((tiny_model / "work" / "data.json").read_text())
    allowed = [d for d in iter_documents(corpus_dir, tiers=["pd", "sw"]) if split_of(d["doc_id"]) == "train"]
    assert data["train"]["documents"] == len(allowed)


def test_loader_refuses_restricted_text_smuggled_in_by_a_wrong_tier(tmp_path):
    import pyarrow.parquet as pq

    recs = make_records(60)
    write_corpus(recs, tmp_path / "c")
    # Tamper with the stored tier: a GPL document labelled 'sw'.
    part = next((tmp_path / "c").glob("part-*.parquet"))
    t = pq.read_table(part).to_pylist()
    for row in t:
        if row["license"] == "GPL-3.0-only":
            row["tier"] = "sw"
    import pyarrow as pa

    from silo.corpus import SCHEMA

    pq.write_table(pa.Table.from_pylist(t, schema=SCHEMA), part)
    with pytest.raises(RestrictedTextError, match="restricted"):
        train(TrainArgs(corpus=str(tmp_path / "c"), out=str(tmp_path / "m"), config="tiny", vocab_size=300,
                        steps=2, progress=False))


def test_restricted_tier_needs_explicit_oracle_flag(tmp_path, corpus_dir):
    with pytest.raises(RestrictedTextError):
        train(TrainArgs(corpus=str(corpus_dir), out=str(tmp_path / "m"), tiers=("restricted",), config="tiny",
                        vocab_size=300, steps=2, progress=False))


def test_no_trainable_text_names_the_tiers_found(tmp_path):
    write_corpus([{"doc_id": f"d{i}", "text": prose_text(__import__("random").Random(i)), "license": "GPL-2.0"}
                  for i in range(5)], tmp_path / "c")
    with pytest.raises(NoTrainableTextError, match=r"tiers pd,sw.*restricted: 5"):
        train(TrainArgs(corpus=str(tmp_path / "c"), out=str(tmp_path / "m"), config="tiny", steps=2, progress=False))


def test_resume_is_exact(tmp_path, corpus_dir, tiny_model):
    common = dict(corpus=str(corpus_dir), config="tiny", tokenizer=str(tiny_model), steps=6,
                  checkpoint_every=3, progress=False)
    train(TrainArgs(out=str(tmp_path / "straight"), **common))
    # Interrupted after 3 of 6 steps (the time budget runs out), then resumed to 6.
    stopped = train(TrainArgs(out=str(tmp_path / "resumed"), **common, time_budget=0.0))
    assert stopped["steps"] == 1
    rec = train(TrainArgs(out=str(tmp_path / "resumed"), **common))
    assert rec["steps"] == 6
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ha = json.loads((tmp_path / "straight" / "silo_model.json").read_text())
    hb = json.loads((tmp_path / "resumed" / "silo_model.json").read_text())
    assert ha["loss_last"] == hb["loss_last"]


def test_sliding_windows_score_each_token_once():
    for n in (2, 5, 16, 17, 40, 129):
        for window, stride in ((8, 4), (8, 8), (16, 5)):
            wins = windows_for(n, window, stride)
            scored = [p for w in wins for p in range(w.first_target, w.end)]
            assert scored == list(range(1, n)), (n, window, stride)
            assert all(w.end - w.begin <= window for w in wins)
            assert all(w.first_target > w.begin for w in wins)  # every target has context in its window
            assert all(w.first_target - w.begin >= min(window - stride, w.first_target) for w in wins)


def test_windowed_scores_match_full_context_when_window_covers_doc(tiny_model):
    model, tok = load_causal_lm(tiny_model)
    docs = [encode_document(tok, code_text(__import__("random").Random(i), 2))[:100] for i in range(3)]
    lp = score_documents(model, docs, window=128, stride=64, batch_size=2, pad_id=tok.pad_token_id)
    with torch.no_grad():
        for d, got in zip(docs, lp, strict=True):
            logits = model(input_ids=torch.tensor([d])).logits[0].log_softmax(-1)
            want = logits[:-1].gather(-1, torch.tensor(d[1:])[:, None])[:, 0].double().numpy()
            np.testing.assert_allclose(got, want, atol=1e-4)
    assert perplexity(lp) > 1


def test_eval_reports_per_source_and_tier(tiny_model, corpus_dir):
    model, tok = load_causal_lm(tiny_model)
    rep = evaluate_lm(model, tok, str(corpus_dir), split="train", window=64, stride=32, max_docs=30)
    assert rep["documents"] == 30 and rep["tokens"] > 0
    assert sum(v["tokens"] for v in rep["source"].values()) == rep["tokens"]
    # trained on code only: code (pd/sw) is far more predictable than restricted prose
    assert rep["tier"]["sw"]["perplexity"] < rep["tier"]["restricted"]["perplexity"]


def test_any_local_hf_causal_lm_folder_works(tmp_path, tiny_model, corpus_dir):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=256)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    model, tok2 = load_causal_lm(tmp_path / "neox")
    rep = evaluate_lm(model, tok2, str(corpus_dir), split="test", window=64, stride=32, max_docs=5)
    assert rep["perplexity"] > 1


def test_not_a_causal_lm_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(NotACausalLMError, match="no config.json"):
        load_causal_lm(tmp_path)
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                     hidden_dim=32)).save_pretrained(tmp_path / "encoder")
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        load_causal_lm(tmp_path / "encoder")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(NotACausalLMError, match="only pickled weights"):
        load_causal_lm(tmp_path / "pickled")


def test_build_model_sizes(tiny_model):
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    small = build_model("small", tok)
    n = sum(p.numel() for p in small.parameters())
    assert 2e6 < n < 2e7
