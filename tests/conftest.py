"""Shared fixtures: a generated license-tiered corpus and a tiny trained LM (session-scoped).

The generated text is small but real: Python-like code under permissive licenses and
English prose under restricted ones, with recurring facts so retrieval has something to
find. Everything expensive is built once per test session.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

LICENSES = {
    "pd": ["CC0-1.0", "Public Domain", "Unlicense"],
    "sw": ["MIT", "Apache-2.0", "BSD-3-Clause", "MIT OR Apache-2.0"],
    "by": ["CC-BY-4.0", "CC BY-SA 4.0"],
    "restricted": ["GPL-3.0-only", "", "All rights reserved", "CC-BY-NC-4.0"],
}

_NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
_VERBS = ["parse", "merge", "split", "load", "store", "count", "scale", "sort"]
_PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "Emmy Noether", "John Napier"]
_PLACES = ["Lisbon", "Kyoto", "Quito", "Oslo", "Nairobi", "Tallinn", "Hobart", "Recife"]
_THINGS = ["lighthouse", "observatory", "library", "bridge", "museum", "harbour", "archive", "tower"]


def code_text(rng: random.Random, n_funcs: int = 4) -> str:
    parts = []
    for _ in range(n_funcs):
        name, verb = rng.choice(_NAMES), rng.choice(_VERBS)
        k = rng.randint(2, 9)
        parts.append(
            f"def {verb}_{name}(items, limit={k}):\n"
            f'    """{verb.capitalize()} the {name} items up to {k}."""\n'
            f"    result = []\n"
            f"    for item in items[:limit]:\n"
            f"        result.append(item * {k})\n"
            f"    return result\n"
        )
    return "\n\n".join(parts)


def prose_text(rng: random.Random, n_sentences: int = 6) -> str:
    out = []
    for _ in range(n_sentences):
        i = rng.randrange(len(_PLACES))
        # the fact "thing of place i was built in year by person" is fixed per place: retrievable
        thing, person, year = _THINGS[i], _PEOPLE[i % len(_PEOPLE)], 1700 + 17 * i
        out.append(rng.choice([
            f"The {thing} of {_PLACES[i]} was built in {year} by {person}.",
            f"In {year}, {person} finished the {thing} of {_PLACES[i]}.",
            f"Visitors to {_PLACES[i]} still climb the {thing} that {person} designed.",
        ]))
    return " ".join(out)


def make_records(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        tier = ["pd", "sw", "sw", "by", "restricted", "restricted"][i % 6]
        text = code_text(rng) if tier in ("pd", "sw") else prose_text(rng)
        records.append({
            "doc_id": f"doc-{i:04d}",
            "text": text,
            "source": ["github", "gutenberg", "news", "books"][i % 4],
            "license": rng.choice(LICENSES[tier]),
            "owner": f"owner-{i % 5}",
        })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from silo.corpus import write_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    write_corpus(make_records(), out, shard_bytes=20_000)  # small shards: exercise multi-shard reads
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus_dir) -> Path:
    """A tiny LM trained on the pd,sw tiers of the generated corpus (a few seconds)."""
    from silo.train import TrainArgs, train

    out = tmp_path_factory.mktemp("models") / "tiny"
    train(TrainArgs(corpus=str(corpus_dir), out=str(out), config="tiny", vocab_size=512, steps=40,
                    progress=False, checkpoint_every=20))
    return out


def _empty_ledger(corpus: Path | None) -> None:
    ledger = None if corpus is None else corpus / "removals.log"
    if ledger is not None and ledger.is_file():
        ledger.write_bytes(b"")


@pytest.fixture(autouse=True)
def fresh_corpus_ledger(request):
    """Every store built from the shared corpus honours the corpus's removal ledger
    (`CORPUS/removals.log`, silo.datastore.ledger), and every opt-out is recorded there: empty it
    around each test, so that no test (or module-scoped store) sees another test's removals."""
    corpus = request.getfixturevalue("corpus_dir") if "corpus_dir" in request.fixturenames else None
    _empty_ledger(corpus)
    yield
    _empty_ledger(corpus)
