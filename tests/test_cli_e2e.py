"""Every client verb of the `silo` command against a real `silo serve` on loopback.

The server is a real subprocess (`silo serve` with a token store, an ∞-gram store and a
passage store, an admin token and owner credentials). The client verbs run as a user
types them: a few as real subprocesses, the rest through `silo.app.cli.main` in this process
(the same code, minus a second of interpreter start each). Local verbs that no other test
runs end to end are here too: harvest, tokenizer training, the scaling curve, a
calibrated plan, token revocation and shard servers behind a main server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from silo.app.cli import main
from silo.build import BuildArgs, build_store

WINDOW = 128
ADMIN = "cli-admin-token-0123456789abcdef"
SHARD = "cli-shard-token-0123456789abcdef"
TEXT = "The lighthouse of Lisbon was built in 1700 by Ada Lovelace. In 1717, Alan Turing finished the observatory."


def silo(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "silo.app.cli", *args], capture_output=True, text=True, timeout=600,
                          input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"silo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`silo ARGS` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _build(tiny_model, corpus_dir, out: Path, **kw) -> Path:
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-stores")
    return {"token": _build(tiny_model, corpus_dir, root / "token", shards=2),
            "infgram": _build(tiny_model, corpus_dir, root / "infgram", kind="infgram"),
            "passage": _build(tiny_model, corpus_dir, root / "passage", kind="passage", passage_tokens=32)}


def start_server(args: list[str], ready: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", *args, "--port", "0", "--ready-file", str(ready)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ready.is_file() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, stores):
    """A `silo serve` subprocess over private copies of the three stores."""
    root = tmp_path_factory.mktemp("cli-served")
    copies = {k: shutil.copytree(v, root / k) for k, v in stores.items()}
    (root / "admin.token").write_text(ADMIN + "\n")
    creds = root / "owners.json"
    silo("token", "issue", "--owner", "owner-1", "--credentials", str(creds)).stdout.strip()
    owner_token = root / "owner.token"
    owner_token.write_text(silo("token", "issue", "--owner", "owner-2", "--credentials", str(creds)).stdout.strip())
    proc = start_server(["serve", "--model", str(tiny_model), *[x for p in copies.values() for x in ("--store", str(p))],
                         "--token-file", str(root / "admin.token"), "--credentials", str(creds)],
                        root / "port", root / "serve.log")
    target = f"127.0.0.1:{(root / 'port').read_text().strip()}"
    yield {"target": target, "admin": str(root / "admin.token"), "owner": str(owner_token), "stores": copies}
    stop_server(proc)


def test_generate_in_every_mode_as_a_subprocess(served):
    """The verb that crashed on every call (`got multiple values for argument 'temperature'`)."""
    t = served["target"]
    out = silo("generate", "--target", t, "The lighthouse of", "--mode", "knn", "--max-new-tokens", "5").stdout
    assert out.startswith("The lighthouse of") and "[MAX_TOKENS, 5 tokens]" in out, out
    assert "not licensed for reuse" in out, out  # the citations of restricted documents, with their obligation


def test_generate_in_every_mode(served, capsys):
    t = served["target"]
    for mode in ("none", "knn", "ric", "infgram"):
        code, out, err = run(capsys, "generate", "--target", t, "The lighthouse of", "--mode", mode,
                             "--max-new-tokens", "5")
        assert code == 0 and out.startswith("The lighthouse of") and "[MAX_TOKENS, 5 tokens]" in out, (mode, err)
    code, out, err = run(capsys, "generate", "--target", t, "The observatory of", "--mode", "knn", "-k", "8",
                         "--lambda", "0.5", "--knn-temperature", "10", "--temperature", "0.7", "--seed", "3",
                         "--max-new-tokens", "4", "--json")
    events = json.loads(out)
    tokens = [e["token"] for e in events if "token" in e]
    summary = events[-1]["summary"]
    assert len(tokens) == summary["generated_tokens"] == 4 and summary["citations"]
    assert all(tok["attribution"] for tok in tokens)
    code, traced, _ = run(capsys, "generate", "--target", t, TEXT[:40], "--mode", "infgram", "--lambda", "0.9",
                          "--max-new-tokens", "12", "--trace")
    assert code == 0 and "verbatim (" in traced, traced


def test_generate_flags_reach_the_server(served, capsys):
    t = served["target"]
    code, out, _ = run(capsys, "generate", "--target", t, "The", "--mode", "knn", "--max-new-tokens", "30",
                       "--stop", ".", "--json", "--allow-tiers", "pd,sw")
    assert code == 0
    summary = json.loads(out)[-1]["summary"]
    assert not summary["citations"]  # the store holds only restricted text: the policy allows nothing
    code, _, err = run(capsys, "generate", "--target", t, "x", "--mode", "knn", "-k", "0")
    assert code == 1 and "INVALID_ARGUMENT" in err and "Traceback" not in err


def test_score_modes_stdin_and_json(served, capsys):
    t = served["target"]
    figures = {}
    for mode in ("none", "knn", "ric", "infgram"):
        code, out, err = run(capsys, "score", "--target", t, TEXT, "--mode", mode, "--json")
        assert code == 0, err
        r = json.loads(out)
        figures[mode] = r["perplexity"]
        assert r["num_tokens"] == len(r["tokens"]) > 10
    assert figures["knn"] < figures["none"] and figures["infgram"] < figures["none"]
    out = silo("score", "--target", t, "-", "--mode", "knn", stdin=TEXT).stdout
    assert out.startswith("perplexity ") and "(mode knn)" in out


def test_trace_search_and_stats(served, capsys):
    t = served["target"]
    ig = served["stores"]["infgram"]
    from silo.datastore.kinds import open_store

    store = open_store(ig, load_index=False)
    text = store.doc_text(3)[:240]
    store.close()
    code, out, _ = run(capsys, "trace", "--target", t, text, "--min-tokens", "6")
    assert code == 0 and "occurrence(s)" in out
    code, out, _ = run(capsys, "trace", "--target", t, text, "--json", "--max-spans", "2")
    r = json.loads(out)
    assert 1 <= len(r["spans"]) <= 2 and r["spans"][0]["documents"]
    code, out, _ = run(capsys, "search", "--target", t, "--query", "The bridge of Quito was built in", "-k", "4",
                       "--json")
    hits = json.loads(out)["hits"]
    assert code == 0 and len(hits) == 4 and all(h["doc_id"] and h["sentence"] for h in hits)
    code, out, _ = run(capsys, "search", "--target", t, "--query", "lighthouse Lisbon", "-k", "3",
                       "--store-kind", "passage", "--deny-sources", "books,news")
    assert code == 0 and out.count("\n    ") == 3 and "books" not in out and "news" not in out
    code, out, _ = run(capsys, "stats", "--target", t)
    assert code == 0 and {"(token):", "(infgram):", "(passage):"} <= set(out.split())
    code, out, _ = run(capsys, "stats", "--target", t, "--json")
    assert {s["kind"] for s in json.loads(out)["stores"]} == {"token", "infgram", "passage"}


def test_optout_status_and_compact(served, capsys, tiny_model):
    t, admin, owner = served["target"], served["admin"], served["owner"]
    code, out, err = run(capsys, "optout", "--target", t, "--token-file", owner, "--owner", "owner-2", "--dry-run")
    assert code == 0 and out.startswith("dry run: would remove"), err
    code, _, err = run(capsys, "optout", "--target", t, "--token-file", owner, "--owner", "owner-3")
    assert code == 1 and "PERMISSION_DENIED" in err
    code, _, err = run(capsys, "optout", "--target", t, "--owner", "owner-2")
    assert code == 1 and "UNAUTHENTICATED" in err
    hits = json.loads(run(capsys, "search", "--target", t, "--query", "The harbour of Hobart", "-k", "1",
                          "--json")[1])["hits"]
    doc = hits[0]["doc_id"]
    code, out, err = run(capsys, "optout", "--target", t, "--token-file", admin, "--doc-id", doc,
                         "--reason", "owner asked")
    assert code == 0 and out.startswith("removed 1 document(s)") and "receipt" in out, err
    receipt = out.split("receipt ")[1].split()[0]
    code, out, _ = run(capsys, "optout", "--target", t, "--token-file", admin, "--status", receipt)
    proof = json.loads(out)
    assert code == 0 and proof["removed"] and proof["tombstoned"] and doc in json.dumps(proof)
    code, out, _ = run(capsys, "optout", "--target", t, "--token-file", admin, "--status-doc", doc, "--json")
    assert json.loads(out)["removed"]
    code, out, _ = run(capsys, "search", "--target", t, "--query", "The harbour of Hobart", "-k", "20", "--json")
    assert doc not in {h["doc_id"] for h in json.loads(out)["hits"]}
    code, _, err = run(capsys, "compact", "--target", t)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, out, err = run(capsys, "compact", "--target", t, "--token-file", admin)
    assert code == 0 and out.startswith("rewrote ") and "removed" in out, err
    code, out, _ = run(capsys, "optout", "--target", t, "--token-file", admin, "--status-doc", doc)
    assert json.loads(out)["compacted"]


def test_unreachable_server_is_one_line(capsys):
    code, _, err = run(capsys, "stats", "--target", "127.0.0.1:9")
    assert code == 1 and "UNAVAILABLE" in err and "Traceback" not in err


def test_shard_servers_behind_a_main_server(tmp_path, capsys, tiny_model, stores):
    """`silo serve-shards` for each half of a token store, `silo serve --remote-shards` in front."""
    store = shutil.copytree(stores["token"], tmp_path / "token")
    (tmp_path / "shard.token").write_text(SHARD)
    procs = []
    try:
        ports = []
        for i, shards in enumerate(("0", "1")):
            procs.append(start_server(["serve-shards", str(store), "--shards", shards, "--shard-token-file",
                                       str(tmp_path / "shard.token")], tmp_path / f"p{i}", tmp_path / f"s{i}.log"))
            ports.append((tmp_path / f"p{i}").read_text().strip())
        procs.append(start_server(["serve", "--model", str(tiny_model), "--store", str(store), "--remote-shards",
                                   ",".join(f"127.0.0.1:{p}" for p in ports), "--shard-token-file",
                                   str(tmp_path / "shard.token")], tmp_path / "main", tmp_path / "main.log"))
        t = f"127.0.0.1:{(tmp_path / 'main').read_text().strip()}"
        query = "The bridge of Quito was built in"
        remote = json.loads(run(capsys, "search", "--target", t, "--query", query, "-k", "5", "--json")[1])["hits"]
        local = json.loads(run(capsys, "datastore", "search", str(store), "--query", query, "-k", "5",
                               "--json")[1])["hits"]
        assert [h["doc_id"] for h in remote] == [h["doc_id"] for h in local] and len(remote) == 5
        code, out, _ = run(capsys, "score", "--target", t, TEXT, "--mode", "knn")
        assert code == 0 and out.startswith("perplexity")
    finally:
        for p in procs:
            stop_server(p)


def test_harvest_tokenizer_and_token_revoke(tmp_path, capsys, corpus_dir):
    code, out, err = run(capsys, "corpus", "harvest", "--out", str(tmp_path / "h"), "--limit-bytes", "300k",
                         "--no-system")
    assert code == 0 and "skipped:" in out and "sw" in out, err
    code, out, err = run(capsys, "corpus", "stats", str(tmp_path / "h"), "--json")
    assert code == 0 and json.loads(out)["total"]["documents"] > 0
    code, out, err = run(capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--tiers", "pd,sw",
                         "--vocab-size", "400", "--out", str(tmp_path / "tok"))
    assert code == 0 and "tokenizer with" in out, err
    code, out, err = run(capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--tiers", "pd,sw",
                         "--vocab-size", "20", "--out", str(tmp_path / "tok2"))
    assert code == 2 and "larger vocabulary (--vocab-size)" in err and "Traceback" not in err
    creds = str(tmp_path / "c.json")
    run(capsys, "token", "issue", "--owner", "zoe", "--credentials", creds)
    listed = run(capsys, "token", "list", "--credentials", creds)[1]
    token_id = listed.splitlines()[2].split()[0]
    code, out, _ = run(capsys, "token", "revoke", token_id, "--credentials", creds)
    assert code == 0 and out.strip() == f"revoked {token_id}"
    code, _, err = run(capsys, "token", "revoke", token_id, "--credentials", creds)
    assert code != 0 and "no token" in err
    assert "zoe" not in run(capsys, "token", "list", "--credentials", creds)[1]


def test_lm_eval_scaling_curve_and_calibrated_plan(tmp_path, capsys, tiny_model, corpus_dir, stores):
    code, out, err = run(capsys, "lm", "eval", str(tiny_model), "--corpus", str(corpus_dir), "--split", "test",
                         "--window", "128", "--stride", "64", "--json")
    assert code == 0 and json.loads(out)["perplexity"] > 1, err
    code, out, err = run(capsys, "scaling-curve", "--model", str(tiny_model), "--store", str(stores["token"]),
                         "--corpus", str(corpus_dir), "--fractions", "0.5,1", "--seeds", "1", "--depth", "32",
                         "-k", "8", "--window", "128", "--stride", "64", "--max-tokens", "2000",
                         "--out", str(tmp_path / "curve"))
    assert code == 0 and (tmp_path / "curve" / "scaling.csv").is_file() and "knn" in out, err
    code, out, err = run(capsys, "plan", "--tokens", "1e9", "--calibrate", "--model", str(tiny_model), "--corpus",
                         str(corpus_dir), "--calibrate-tokens", "5000", "--calibration",
                         str(tmp_path / "calib.json"), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["token"]["nodes"] >= 1 and plan["passage"]["ram_bytes"] > 0
