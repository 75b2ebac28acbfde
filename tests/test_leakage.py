"""The cross-tier leakage scan (silo.leakage): restricted text copied into permissive
documents never reaches training, and the report names it.

The corpus: GPL documents of made-up prose, MIT documents of code, some of which vendor a
GPL paragraph (as written, or re-cased and re-spaced), one a short quote, and a licence
header shared by many GPL and MIT documents (boilerplate, not a copy). Trained end to end:
the training record proves the paragraphs were not trained on, and the report names each
document, span, restricted document and license."""

from __future__ import annotations

import json
import random

import pytest
from conftest import code_text

from silo.app.cli import main
from silo.corpus import split_of, write_corpus
from silo.errors import SiloError
from silo.leakage import LeakageScan
from silo.provenance import TrainingRecord
from silo.train import TrainArgs, train

HEADER = ("This program is free software: you can redistribute it and/or modify it under the terms of the "
          "GNU General Public License as published by the Free Software Foundation, either version 3 of the "
          "License, or (at your option) any later version. This program is distributed in the hope that it "
          "will be useful, but WITHOUT ANY WARRANTY.")


def _prose(rng: random.Random, words: int) -> str:
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "ul", "pe", "zor", "thi"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(words)) + "."


def _train_ids(prefix: str, n: int) -> list[str]:
    """Document ids that fall in the train split (splits are a hash of the id)."""
    out, i = [], 0
    while len(out) < n:
        if split_of(f"{prefix}-{i:04d}") == "train":
            out.append(f"{prefix}-{i:04d}")
        i += 1
    return out


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    rng = random.Random(5)
    gpl = [{"doc_id": f"gpl-{i:04d}", "text": (HEADER + "\n\n" if i < 6 else "") + _prose(rng, 150),
            "source": "books", "license": "GPL-3.0-only", "owner": f"author-{i % 3}"} for i in range(40)]
    paragraph = _prose(random.Random(99), 45)  # in gpl-0010 only
    gpl[10]["text"] += "\n\n" + paragraph
    quote = " ".join(gpl[11]["text"].split()[20:40])  # 20 words: a quotation, not a copy
    mit_ids = _train_ids("mit", 30)
    mit = [{"doc_id": d, "text": code_text(rng), "source": "github", "license": "MIT", "owner": "dev"}
           for d in mit_ids]
    vendored, shouted, quoted, headed = mit_ids[:4]
    mit[0]["text"] += "\n# vendored from elsewhere:\n" + paragraph + "\n" + code_text(rng)
    mit[1]["text"] += "\n/* " + "  ".join(paragraph.upper().split()) + " */\n"
    mit[2]["text"] += "\n# as the author says: " + quote + "\n"
    mit[3]["text"] = HEADER + "\n\n" + mit[3]["text"]
    pd = [{"doc_id": f"pd-{i:04d}", "text": code_text(rng), "source": "gutenberg", "license": "CC0-1.0",
           "owner": "nobody"} for i in range(10)]
    corpus = tmp_path_factory.mktemp("leaky") / "corpus"
    write_corpus(gpl + mit + pd, corpus)
    return {"corpus": corpus, "paragraph": paragraph, "vendored": vendored, "shouted": shouted, "quoted": quoted,
            "headed": headed, "mit": {d["doc_id"]: d["text"] for d in mit}}


def test_copies_are_found_case_and_spacing_aside_and_boilerplate_and_quotes_are_not(leaky):
    scan = LeakageScan.build(str(leaky["corpus"]))
    for doc_id in (leaky["vendored"], leaky["shouted"]):
        text = leaky["mit"][doc_id]
        (copy,) = scan.find(text)
        assert copy.restricted_doc_id == "gpl-0010" and copy.restricted_license == "GPL-3.0-only", copy
        assert copy.words >= 45 and copy.restricted_source == "books"
        span, words = text[copy.start_char:copy.end_char].lower().split(), leaky["paragraph"].lower().split()
        assert span[:3] == words[:3] and span[-1] == words[-1].rstrip("."), (span, words)  # the paragraph, exactly
    assert scan.find(leaky["mit"][leaky["quoted"]]) == []  # 20 words < 32
    assert scan.find(leaky["mit"][leaky["headed"]]) == []  # the header is in 6 GPL documents: boilerplate
    cut = scan.clean({"doc_id": leaky["vendored"], "text": leaky["mit"][leaky["vendored"]]})
    assert scan.find(cut) == [] and "vendored from elsewhere" in cut and len(cut) < len(leaky["mit"][leaky["vendored"]])
    with pytest.raises(SiloError):
        LeakageScan.build(str(leaky["corpus"]), min_words=5)
    with pytest.raises(SiloError):
        LeakageScan.build(str(leaky["corpus"]), action="shred")


def _train(corpus, out, **kw) -> TrainingRecord:
    train(TrainArgs(corpus=str(corpus), out=str(out), tiers=("pd", "sw"), config="tiny", vocab_size=512, steps=2,
                    progress=False, **kw))
    return TrainingRecord.open(out)


def test_training_never_sees_the_copied_paragraphs_and_the_report_names_them(leaky, tmp_path):
    record = _train(leaky["corpus"], tmp_path / "model")
    assert record.audit_text(leaky["paragraph"]).found == 0  # not one of its 13-word shingles was trained on
    assert record.has_document(leaky["vendored"])  # the rest of the document was
    assert record.audit_text(leaky["mit"][leaky["headed"]]).verdict == "trained"  # boilerplate kept
    report = json.loads((tmp_path / "model" / "provenance" / "leakage.json").read_text())
    named = {d["doc_id"]: d for d in report["documents"]}
    assert set(named) == {leaky["vendored"], leaky["shouted"]}
    for d in named.values():
        (c,) = d["copies"]
        assert c["restricted_doc_id"] == "gpl-0010" and c["restricted_license"] == "GPL-3.0-only" and c["words"] >= 45
    assert report["words_cut"] >= 90 and report["documents_scanned"] >= 30 and report["words_per_second"] > 0
    assert record.record["leakage"]["documents_with_copies"] == 2


def test_exclude_leaves_the_documents_out_and_skipping_is_recorded(leaky, tmp_path):
    record = _train(leaky["corpus"], tmp_path / "excluded", leakage_action="exclude")
    assert not record.has_document(leaky["vendored"]) and not record.has_document(leaky["shouted"])
    assert record.has_document(leaky["quoted"]) and record.has_document(leaky["headed"])
    assert record.record["leakage"]["documents_excluded"] == 2
    unchecked = _train(leaky["corpus"], tmp_path / "unchecked", leakage_scan=False)
    assert "skipped" in unchecked.record["leakage"]
    assert unchecked.audit_text(leaky["paragraph"]).verdict == "trained"  # what the scan prevents


def test_cli_tokenizer_train_scans_and_reports(leaky, tmp_path, capsys):
    main(["tokenizer", "train", "--corpus", str(leaky["corpus"]), "--tiers", "pd,sw", "--vocab-size", "400",
          "--out", str(tmp_path / "tok")])
    out = capsys.readouterr()
    assert "leakage scan: 2 of" in out.out and "words cut" in out.out
    report = json.loads((tmp_path / "tok" / "leakage.json").read_text())
    assert {d["doc_id"] for d in report["documents"]} == {leaky["vendored"], leaky["shouted"]}
    main(["tokenizer", "train", "--corpus", str(leaky["corpus"]), "--tiers", "pd,sw", "--vocab-size", "400",
          "--out", str(tmp_path / "tok2"), "--skip-leakage-scan"])
    assert "WARNING: --skip-leakage-scan" in capsys.readouterr().err
