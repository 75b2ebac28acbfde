"""Corpus import, tiers, splits, sentence offsets, stats — on real parquet files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from silo.corpus import (
    CorpusError,
    RestrictedTextError,
    corpus_stats,
    import_files,
    iter_documents,
    open_corpus,
    split_of,
    tier_guard,
    write_corpus,
)
from silo.sentences import segment, sentence_of
from tests.conftest import make_records, write_jsonl


def test_import_jsonl_and_parquet_round_trip(tmp_path):
    recs = make_records(60)
    write_jsonl(tmp_path / "a.jsonl", recs[:30])
    pq.write_table(pa.Table.from_pylist(recs[30:]), tmp_path / "b.parquet")
    stats = import_files([tmp_path / "a.jsonl", tmp_path / "b.parquet"], tmp_path / "c")
    docs = list(iter_documents(tmp_path / "c"))
    assert [d["doc_id"] for d in docs] == [r["doc_id"] for r in recs]
    assert [d["text"] for d in docs] == [r["text"] for r in recs]
    assert sum(stats.documents.values()) == 60
    by_id = {r["doc_id"]: r for r in recs}
    for d in docs:
        assert d["license"] == by_id[d["doc_id"]]["license"]
        assert d["owner"] == by_id[d["doc_id"]]["owner"]
    assert {d["tier"] for d in docs} == {"pd", "sw", "by", "restricted"}


def test_tier_comes_from_license_not_input(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"doc_id": "a", "text": "hello", "license": "GPL-3.0-only", "tier": "pd"},
                                       {"doc_id": "b", "text": "hi", "license": "MIT"},
                                       {"doc_id": "c", "text": "hey"}])
    import_files([tmp_path / "x.jsonl"], tmp_path / "c")
    tiers = {d["doc_id"]: d["tier"] for d in iter_documents(tmp_path / "c")}
    assert tiers == {"a": "restricted", "b": "sw", "c": "restricted"}  # unknown license -> restricted


def test_missing_doc_id_gets_stable_content_hash(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "same text", "license": "MIT"}, {"text": "other", "license": "MIT"}])
    import_files([tmp_path / "x.jsonl"], tmp_path / "c1")
    import_files([tmp_path / "x.jsonl"], tmp_path / "c2")
    ids1 = [d["doc_id"] for d in iter_documents(tmp_path / "c1")]
    ids2 = [d["doc_id"] for d in iter_documents(tmp_path / "c2")]
    assert ids1 == ids2 and len(set(ids1)) == 2 and all(i.startswith("sha1:") for i in ids1)


def test_duplicate_ids_are_an_error_naming_them_and_nothing_is_written(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"doc_id": "dup-1", "text": "a"}, {"doc_id": "dup-1", "text": "b"},
                                       {"doc_id": "ok", "text": "c"}, {"doc_id": "dup-2", "text": "d"},
                                       {"doc_id": "dup-2", "text": "e"}])
    with pytest.raises(CorpusError, match="dup-1.*dup-2"):
        import_files([tmp_path / "x.jsonl"], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.tmp*"))


def test_invalid_utf8_reported_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"doc_id": "a", "text": "fine"}\n{"doc_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid UTF-8"):
        import_files([p], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    stats = import_files([p], tmp_path / "c", skip_invalid=True)
    assert stats.skipped_invalid == 1 and [d["doc_id"] for d in iter_documents(tmp_path / "c")] == ["a"]


def test_invalid_utf8_in_parquet_binary_column(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}),
                   tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet: row 2"):
        import_files([tmp_path / "b.parquet"], tmp_path / "c")


def test_empty_documents_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"doc_id": "a", "text": ""}, {"doc_id": "b", "text": "  \n\t "},
                                       {"doc_id": "c", "text": "real"}])
    stats = import_files([tmp_path / "x.jsonl"], tmp_path / "c")
    assert stats.skipped_empty == 2
    assert open_corpus(tmp_path / "c")["skipped_empty"] == 2


def test_bad_inputs_have_clear_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unknown input format"):
        import_files([tmp_path / "x.csv"], tmp_path / "c")
    with pytest.raises(CorpusError, match="no such file"):
        import_files([tmp_path / "nope.jsonl"], tmp_path / "c")
    (tmp_path / "y.jsonl").write_text("[1, 2]\n")
    with pytest.raises(CorpusError, match="expected a JSON object"):
        import_files([tmp_path / "y.jsonl"], tmp_path / "c")
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    with pytest.raises(CorpusError, match="not a readable parquet"):
        import_files([tmp_path / "z.parquet"], tmp_path / "c")
    with pytest.raises(CorpusError, match="not a SILO corpus"):
        list(iter_documents(tmp_path))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "corpus.json").write_text("{oops")
    with pytest.raises(CorpusError, match="corrupt"):
        open_corpus(tmp_path / "corrupt")


def test_existing_corpus_is_not_overwritten_by_accident(corpus_dir, tmp_path):
    write_corpus([{"doc_id": "a", "text": "x"}], tmp_path / "c")
    with pytest.raises(CorpusError, match="already exists"):
        write_corpus([{"doc_id": "b", "text": "y"}], tmp_path / "c")
    assert [d["doc_id"] for d in iter_documents(tmp_path / "c")] == ["a"]


def test_streaming_writes_several_shards(corpus_dir):
    meta = open_corpus(corpus_dir)
    assert len(meta["shards"]) > 1
    assert sum(meta["documents"].values()) == len(list(iter_documents(corpus_dir)))


def test_split_is_deterministic_and_roughly_90_5_5():
    ids = [f"d{i}" for i in range(20000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert 0.88 < frac["train"] < 0.92 and 0.04 < frac["validation"] < 0.06 and 0.04 < frac["test"] < 0.06


def test_iter_documents_filters_tiers_and_split(corpus_dir):
    docs = list(iter_documents(corpus_dir, tiers=["sw"], split="test"))
    assert docs and all(d["tier"] == "sw" and split_of(d["doc_id"]) == "test" for d in docs)
    with pytest.raises(CorpusError, match="unknown split"):
        list(iter_documents(corpus_dir, split="dev"))


def test_sentence_offsets_partition_the_text(corpus_dir):
    for d in iter_documents(corpus_dir):
        starts = d["sentence_starts"]
        assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < len(d["text"])
        if d["tier"] == "restricted":  # prose: one sentence per generated sentence
            assert len(starts) == 6


def test_segment_rules():
    text = "Ann went home. It rained! Did it? yes it did.\n\nNew paragraph here."
    starts = segment(text)
    pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    assert pieces == ["Ann went home. ", "It rained! ", "Did it? yes it did.\n\n", "New paragraph here."]
    code = "\n".join(f"x{i} = {i}" for i in range(200))
    starts = segment(code, max_chars=100)
    assert all(b - a <= 100 for a, b in zip(starts, [*starts[1:], len(code)], strict=True))
    assert all(code[s - 1] == "\n" for s in starts[1:])  # cut at line ends
    assert segment("x" * 250, max_chars=100) == [0, 100, 200]
    assert segment("") == []
    assert sentence_of([0, 10, 20], 15) == 1 and sentence_of([0, 10, 20], 0) == 0 and sentence_of([0, 10], 99) == 1


def test_stats_per_tier_and_source(corpus_dir):
    s = corpus_stats(corpus_dir)
    assert set(s["tier"]) == {"pd", "sw", "by", "restricted"}
    assert s["total"]["documents"] == sum(v["documents"] for v in s["source"].values())
    assert sum(v["bytes"] for v in s["split"].values()) == s["total"]["bytes"]
    assert all(v["tokens"] > 0 for v in s["tier"].values())


def test_tier_guard_refuses_restricted_even_when_mislabelled():
    tier_guard({"doc_id": "a", "tier": "sw", "license": "MIT"}, ["sw"])
    with pytest.raises(RestrictedTextError, match="restricted"):
        tier_guard({"doc_id": "b", "tier": "sw", "license": "GPL-3.0-only"}, ["sw"])  # edited tier column
    with pytest.raises(RestrictedTextError):
        tier_guard({"doc_id": "c", "tier": "restricted", "license": ""}, ["pd", "sw", "restricted"])
    tier_guard({"doc_id": "c", "tier": "restricted", "license": ""}, ["restricted"], allow_restricted=True)
    with pytest.raises(RestrictedTextError, match="outside"):
        tier_guard({"doc_id": "d", "tier": "by", "license": "CC-BY-4.0"}, ["pd", "sw"])
    tier_guard({"doc_id": "e", "tier": "sw", "license": "", "license_classifiers":
                ["License :: OSI Approved :: MIT License"]}, ["sw"])


def test_manifest_is_json(corpus_dir):
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    assert meta["format_version"] == 1
