"""Inverted lists on SSD: a store whose IVF lists are memory-mapped from its index files
answers exactly as the same store with its lists in RAM — opt-outs, policies, grouped
shards, re-ranking, compaction — and the choice is the build's default, switchable at
load (`Datastore.open(lists=…)`, `silo serve --lists`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from silo.datastore import index as ix
from silo.datastore.compact import compact
from silo.datastore.manifest import StoreError
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.reindex import reindex
from silo.datastore.removal import remove
from silo.datastore.store import Datastore

from silo.app.cli import main
from silo.build import BuildArgs, build_store

WINDOW = 128


@pytest.fixture(scope="module")
def ssd_store(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    """Two shards of 8-bit IVF-PQ with kept keys, built for SSD."""
    root = tmp_path_factory.mktemp("ssd")
    common = dict(model=str(tiny_model), corpus=str(corpus_dir), tiers=("restricted",), window=WINDOW,
                  stride=WINDOW // 2, keep_keys=True, progress=False, shards=2)
    build_store(BuildArgs(out=str(root / "probe"), max_docs=2, **common))
    dim = Datastore.open(root / "probe").manifest.dim
    main(["datastore", "build", "--kind", "token", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--tiers",
          "restricted", "--shards", "2", "--window", str(WINDOW), "--stride", str(WINDOW // 2), "--keep-keys",
          "--factory", f"IVF16,PQ{dim // 4}", "--lists", "ssd", "--out", str(root / "ssd")])  # as a user types it
    return root / "ssd"


def _mapped_files(store: Path) -> set[str]:
    """The store's index files this process has memory-mapped (`/proc/self/maps`)."""
    root = str(store.resolve())
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if line.rstrip().endswith("index.faiss") and line.split()[-1].startswith(root)}


def _read_at_random(path: Path) -> bool:
    """Whether every mapping of `path` carries the kernel's random-read advice ("rr" in smaps' VmFlags)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            current = line.split()[-1] if len(line.split()) >= 6 else None
        elif line.startswith("VmFlags:") and current == str(path.resolve()):
            flags.append("rr" in line.split()[1:])
    return bool(flags) and all(flags)


def _queries(store: Datastore, n: int = 30) -> np.ndarray:
    keys = np.asarray(store.shards[0].keys, dtype=np.float32)
    rng = np.random.default_rng(1)
    return keys[rng.choice(len(keys), n, replace=False)] + rng.normal(0, 0.05, (n, keys.shape[1])).astype(np.float32)


def test_an_ssd_build_gets_codes_faiss_can_map():
    assert ix.choose_factory(1_000_000, 64, rerank=True) == "IVF4096,PQ64x4fs"
    assert ix.choose_factory(1_000_000, 64, rerank=True, lists="ssd") == "IVF4096,PQ32"
    with pytest.raises(StoreError, match="fast-scan"):
        BuildArgs(model="m", corpus="c", out="o", factory="IVF16,PQ8x4fs", lists="ssd").check()
    with pytest.raises(StoreError, match="lists must be one of"):
        BuildArgs(model="m", corpus="c", out="o", lists="tape").check()


def test_mapped_lists_answer_exactly_as_lists_in_ram(ssd_store):
    ssd = Datastore.open(ssd_store)
    assert ssd.manifest.lists == ssd.lists == "ssd" and ix.lists_mapped(ssd.group)
    assert len(_mapped_files(ssd_store)) == 2  # both shards' lists are the files themselves, stacked
    # small lists are read at random: the kernel's readahead would read megabytes of other lists per fault
    assert all(_read_at_random(Path(f)) for f in _mapped_files(ssd_store))
    ram = Datastore.open(ssd_store, lists="ram")
    assert ram.lists == "ram" and not ix.lists_mapped(ram.group)
    q = _queries(ram)
    doc = ram.docs.doc_id(0)
    policy = RetrievalPolicy(deny_doc_ids=frozenset(ram.docs.doc_id(d) for d in (2, 3)))
    for kw in ({}, {"refine": 1}, {"refine": 4}, {"policy": policy}, {"nprobe": 3}):
        d_ram, i_ram = ram.search(q, 8, **kw)
        d_ssd, i_ssd = ssd.search(q, 8, **kw)
        np.testing.assert_array_equal(i_ssd, i_ram)
        np.testing.assert_array_equal(d_ssd, d_ram)
    # an opt-out reaches a mapped store exactly as one in RAM (the bitmap is in RAM, the lists read-only)
    remove([ssd], "doc_ids", [doc], made_by="test")
    ram.reload_optouts()
    first = ram.docs.first_entry[0]
    gone = np.arange(first, first + ram.docs.n_entries[0])
    for store in (ssd, ram):
        _, ids = store.search(q, 8)
        assert not np.isin(ids, gone).any()
    np.testing.assert_array_equal(ssd.search(q, 8)[1], ram.search(q, 8)[1])


def test_compaction_swaps_the_mapped_files_under_a_serving_store(ssd_store, tmp_path):
    """A compaction writes new index files; the store that maps the old ones still answers
    (unlinked files stay mapped), and its reopen maps the new ones."""
    path = Path(shutil.copytree(ssd_store, tmp_path / "store"))
    store = Datastore.open(path)
    q = _queries(store)
    remove([store], "doc_ids", [store.docs.doc_id(1)], made_by="test")
    before = store.search(q, 8)
    res = compact(path)
    assert res["removed_entries"] > 0
    np.testing.assert_array_equal(store.search(q, 8)[1], before[1])
    fresh = store.reopen()
    assert fresh.lists == "ssd" and ix.lists_mapped(fresh.group)
    # the rewritten lists hold the same live entries in another order: equal distances (ties may swap ids)
    np.testing.assert_array_equal(fresh.search(q, 8)[0], before[0])


def test_a_fast_scan_store_is_refused_on_ssd_and_reindexed_for_it(tmp_path, tiny_model, corpus_dir, ssd_store):
    dim = Datastore.open(ssd_store).manifest.dim
    fs = tmp_path / "fs"
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(fs), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, keep_keys=True, progress=False,
                          factory=f"IVF16,PQ{dim}x4fs"))
    with pytest.raises(StoreError, match="cannot be memory-mapped.*reindex"):
        Datastore.open(fs, lists="ssd")
    with pytest.raises(StoreError, match="lists 'tape'"):
        Datastore.open(fs, lists="tape")
    with pytest.raises(StoreError, match="fast-scan"):
        reindex(fs, tmp_path / "bad", f"IVF16,PQ{dim}x4fs", lists="ssd")
    main(["datastore", "reindex", str(fs), "--out", str(tmp_path / "mapped"), "--lists", "ssd", "--factory",
          f"IVF16,PQ{dim // 4}"])
    m = Datastore.open(tmp_path / "mapped", load_index=False).manifest
    assert m.lists == "ssd" and not ix.is_fast_scan(m.index)
    mapped, ram = Datastore.open(tmp_path / "mapped"), Datastore.open(fs)
    assert ix.lists_mapped(mapped.group)
    q = _queries(ram)
    keys = mapped.keys_of(np.arange(mapped.n_entries)).astype(np.float32)
    exact = np.sort(((q[:, None, :] - keys[None]) ** 2).sum(-1), axis=1)[:, :5]
    d, i = mapped.search(q, 5, nprobe=16, refine=8)  # every list, re-ranked from the same kept keys
    np.testing.assert_allclose(d, mapped.distances_to(q, i), rtol=1e-3)
    assert np.median(d[:, -1] / exact[:, -1]) <= 1.02


def test_serve_with_lists_on_ssd_as_a_user_types_it(ssd_store, tmp_path, tiny_model, capsys):
    from test_cli_e2e import run, start_server, stop_server

    store = Path(shutil.copytree(ssd_store, tmp_path / "store"))
    proc = start_server(["serve", "--model", str(tiny_model), "--store", str(store), "--lists", "ram"],
                        tmp_path / "port", tmp_path / "serve.log")
    try:
        target = f"127.0.0.1:{(tmp_path / 'port').read_text().strip()}"
        code, out, _ = run(capsys, "stats", "--target", target)
        assert code == 0 and "lists in RAM" in out  # the flag overrides the store's own choice (ssd)
        code, out, _ = run(capsys, "stats", "--target", target, "--json")
        assert json.loads(out)["stores"][0]["lists"] == "ram"
    finally:
        stop_server(proc)
    code, out, _ = run(capsys, "datastore", "stats", str(store), "--json")
    assert code == 0 and json.loads(out)["lists"] == "ssd"
