"""Every client verb of the `silo` command against a real `silo serve` on loopback.

The server is a real subprocess (`silo serve` with a token store, an ∞-gram store and a
passage store, an admin token and owner credentials). The client verbs run as a user
types them: a few as real subprocesses, the rest through `silo.app.cli.main` in this process
(the same code, minus a second of interpreter start each). Local verbs that no other test
runs end to end are here too: harvest, tokenizer training, the scaling curve, a
calibrated plan and token revocation. Shard servers behind a main server run in
tests/test_readme.py (the README's own commands), where remote and local search are compared.
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

import numpy as np
import pytest
from silo.server.client import SiloClient

from silo.app.cli import main
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents

WINDOW = 128
ADMIN = "cli-admin-token-0123456789abcdef"
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
def served(tmp_path_factory, tiny_model, stores, corpus_dir):
    """A `silo serve` subprocess over private copies of the three stores."""
    root = tmp_path_factory.mktemp("cli-served")
    copies = {k: shutil.copytree(v, root / k) for k, v in stores.items()}
    (root / "admin.token").write_text(ADMIN + "\n")
    creds = root / "owners.json"
    silo("token", "issue", "--owner", "owner-1", "--credentials", str(creds)).stdout.strip()
    owner_token = root / "owner.token"
    owner_token.write_text(silo("token", "issue", "--owner", "owner-2", "--credentials", str(creds)).stdout.strip())
    proc = start_server(["serve", "--model", str(tiny_model), *[x for p in copies.values() for x in ("--store", str(p))],
                         "--token-file", str(root / "admin.token"), "--credentials", str(creds),
                         "--membership-reference", str(corpus_dir), "--membership-documents", "20"],
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
    # adaptive retrieval that skips every search is the LM alone; pointer reuse on a store
    # without kept keys changes nothing; a reuse above k is refused
    code, out, err = run(capsys, "score", "--target", t, TEXT, "--mode", "knn", "--skip-above", "1e-9", "--json")
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(figures["none"], rel=1e-5), err
    code, out, err = run(capsys, "score", "--target", t, TEXT, "--mode", "knn", "--reuse", "2", "--json")
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(figures["knn"], rel=1e-5), err
    code, _, err = run(capsys, "score", "--target", t, TEXT, "--mode", "knn", "-k", "8", "--reuse", "9")
    assert code == 1 and "INVALID_ARGUMENT" in err and "reuse" in err


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
    assert plan["ssd"]["token"]["ram_bytes"] < plan["token"]["ram_bytes"]  # lists on SSD: RAM for the hot part only
    code, out, err = run(capsys, "plan", "--tokens", "1e12", "--calibration", str(tmp_path / "calib.json"))
    assert code == 0 and "token store, lists on SSD" in out and "query latency (cold cache)" in out, err
    assert "measured here" in out  # the calibration measured this disk, nothing assumed


# ---------------------------------------------------------------------------- issue 14: a CLI like the others


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("silo") and "Traceback" not in err


def test_bad_invocations_are_one_line_exit_2(tmp_path, capsys, tiny_model, corpus_dir, stores):
    tok, ig = str(stores["token"]), str(stores["infgram"])
    table = {
        "empty query": ["datastore", "search", tok, "--query", ""],
        "blank query": ["datastore", "search", tok, "--query", "   "],
        "k=0": ["datastore", "search", tok, "--query", "x", "-k", "0"],
        "k<0 remote": ["search", "--query", "x", "-k", "-1", "--target", "127.0.0.1:9"],
        "missing folder": ["datastore", "search", str(tmp_path / "nope"), "--query", "x"],
        "missing store (stats)": ["datastore", "stats", str(tmp_path / "nope")],
        "missing store (compact)": ["datastore", "compact", str(tmp_path / "nope")],
        "missing store (optout)": ["datastore", "optout", str(tmp_path / "nope"), "--doc-id", "d"],
        "wrong kind of store": ["datastore", "search", ig, "--query", "x"],
        "wrong kind for eval": ["eval", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--store", ig,
                                "--modes", "lm,knn"],
        "not a store": ["datastore", "stats", str(corpus_dir)],
        "bad tier": ["lm", "train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--tiers", "pd,zz"],
        "bad size": ["corpus", "harvest", "--out", str(tmp_path / "h"), "--limit-bytes", "lots"],
        "missing corpus": ["corpus", "stats", str(tmp_path / "nope")],
        "missing token file": ["compact", "--token-file", str(tmp_path / "nope"), "--target", "127.0.0.1:9"],
        "missing credentials": ["token", "list", "--credentials", str(tmp_path / "nope.json")],
    }
    for name, argv in table.items():
        code, out, err = run(capsys, *argv)
        assert one_line_error(code, err), (name, code, err)


def test_search_labels_distance_and_score(served, capsys, stores):
    t, q = served["target"], "The bridge of Quito was built in"
    for argv in (["search", "--target", t, "--query", q], ["datastore", "search", str(stores["token"]), "--query", q]):
        code, out, err = run(capsys, *argv, "-k", "2")
        assert code == 0 and out.count("distance ") == 2 and "score " not in out, (argv, err)
    for argv in (["search", "--target", t, "--store-kind", "passage", "--query", q],
                 ["datastore", "search", str(stores["passage"]), "--query", q]):
        code, out, err = run(capsys, *argv, "-k", "2")
        assert code == 0 and out.count("score ") == 2 and "distance " not in out, (argv, err)
    code, out, err = run(capsys, "search", "--target", t, "--query", q, "-k", "2", "--refine", "2", "--json")
    assert code == 0 and len(json.loads(out)["hits"]) == 2, err


def test_generate_deadline(served, capsys):
    code, _, err = run(capsys, "generate", "--target", served["target"], "The", "--mode", "knn",
                       "--max-new-tokens", "200", "--timeout", "0.001")
    assert code == 1 and "DEADLINE_EXCEEDED" in err


def test_json_switch_on_every_verb(tmp_path, capsys, tiny_model, corpus_dir, served, stores):
    from tests.conftest import make_records, write_jsonl

    write_jsonl(tmp_path / "a.jsonl", make_records(20))
    code, out, err = run(capsys, "corpus", "import", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "c"),
                         "--json")
    assert code == 0 and json.loads(out)["documents"]["restricted"] >= 0, err
    code, out, err = run(capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "400",
                         "--out", str(tmp_path / "tok"), "--json")
    assert code == 0 and json.loads(out)["vocab_size"] > 0, err
    code, out, err = run(capsys, "datastore", "build", "--kind", "infgram", "--model", str(tiny_model), "--corpus",
                         str(corpus_dir), "--out", str(tmp_path / "ig"), "--json")
    assert code == 0 and json.loads(out)["kind"] == "infgram", err
    store = str(tmp_path / "ig")
    from silo.datastore.kinds import open_store

    st = open_store(store, load_index=False)
    doc = st.doc_ids_of(np.ones(st.n_documents, dtype=bool))[0]
    st.close()
    code, out, err = run(capsys, "datastore", "optout", store, "--doc-id", doc, "--json")
    assert code == 0 and json.loads(out)["doc_ids"] == [doc], err
    code, out, err = run(capsys, "datastore", "compact", store, "--json")
    assert code == 0 and "rewritten_shards" in json.loads(out), err
    code, out, err = run(capsys, "compact", "--target", served["target"], "--token-file", served["admin"], "--json")
    assert code == 0 and "rewritten_shards" in json.loads(out), err
    code, out, err = run(capsys, "lm", "train", "--corpus", str(corpus_dir), "--config", "tiny", "--steps", "2",
                         "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m"), "--batch-size", "2",
                         "--seq-len", "32")
    assert code == 0 and out.lstrip()[:1] != "{" and f"-> {tmp_path / 'm'}" in out, err
    code, out, err = run(capsys, "lm", "train", "--corpus", str(corpus_dir), "--config", "tiny", "--steps", "3",
                         "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m"), "--batch-size", "2",
                         "--seq-len", "32", "--json")
    assert code == 0 and json.loads(out)["steps"] == 3, err
    ev = ["eval", "--model", str(tiny_model), "--store", str(stores["token"]), "--corpus", str(corpus_dir),
          "--modes", "lm,knn", "--window", "128", "--stride", "64", "--max-tokens", "500"]
    code, out, err = run(capsys, *ev, "--json")
    assert code == 0 and json.loads(out)["knn"] > 0, err
    code, out, err = run(capsys, *ev, "--report", str(tmp_path / "r.json"))
    assert code == 0 and "kNN-LM" in out and json.loads((tmp_path / "r.json").read_text())["knn"] > 0, err


def test_large_removal_names_the_flags(tmp_path, capsys, stores):
    from collections import Counter

    from silo.datastore.kinds import open_store

    store = shutil.copytree(stores["token"], tmp_path / "token")
    st = open_store(store, load_index=False)
    owner = Counter(st.doc_owner(d) for d in range(st.n_documents)).most_common(1)[0][0]
    st.close()
    code, _, err = run(capsys, "datastore", "optout", str(store), "--owner", owner)
    assert one_line_error(code, err) and "--dry-run" in err and "--confirm-large" in err, err
    assert "dry_run" in err and "confirm_large" in err  # the RPC fields too: the message is shared with the server


def test_eval_sweep_saves_defaults_only_when_asked(tmp_path, capsys, tiny_model, corpus_dir, stores):
    store = shutil.copytree(stores["token"], tmp_path / "token")
    manifest = (store / "manifest.json").read_text()
    ev = ["eval", "--model", str(tiny_model), "--store", str(store), "--corpus", str(corpus_dir), "--modes",
          "lm,knn", "--window", "128", "--stride", "64", "--max-tokens", "400", "--sweep"]
    code, out, err = run(capsys, *ev)
    assert code == 0 and (store / "manifest.json").read_text() == manifest, err
    code, out, err = run(capsys, *ev, "--save-defaults")
    assert code == 0 and (store / "manifest.json").read_text() != manifest, err
    assert "saved" in out and str(store) in out


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_serve_from_a_config_file_and_env_pointed_clients(fmt, tmp_path, capsys, monkeypatch, tiny_model, stores):
    (tmp_path / "admin.token").write_text(ADMIN)
    settings = {"model": str(tiny_model), "store": [str(stores["token"])], "token-file": str(tmp_path / "admin.token"),
                "max-concurrent": 7, "port": 9}  # port 9 is overridden on the command line (start_server)
    if fmt == "toml":
        text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    else:
        import yaml

        text = yaml.safe_dump(settings)
    cfg = tmp_path / f"serve.{fmt}"
    cfg.write_text(text)
    proc = start_server(["serve", "--config", str(cfg)], tmp_path / "port", tmp_path / "serve.log")
    try:
        monkeypatch.setenv("SILO_TARGET", f"127.0.0.1:{(tmp_path / 'port').read_text().strip()}")
        monkeypatch.setenv("SILO_TOKEN_FILE", str(tmp_path / "admin.token"))
        code, out, err = run(capsys, "stats", "--json")
        assert code == 0 and [s["kind"] for s in json.loads(out)["stores"]] == ["token"], err
        code, out, err = run(capsys, "compact", "--json")  # the admin token from SILO_TOKEN_FILE
        assert code == 0, err
    finally:
        stop_server(proc)


def test_audit_percentiles_from_the_membership_reference_the_server_was_given(served, corpus_dir):
    """`silo serve --membership-reference CORPUS --membership-documents N`: the Audit's
    Min-K%++ percentile is among N documents of that corpus's test split (the model's record
    proves them never trained on)."""
    text = next(iter_documents(corpus_dir, tiers=("sw",), split="train"))["text"]
    with SiloClient(served["target"]) as c:
        r = c.audit(text, membership=True)
    assert r.scored and r.reference_proven and 0 < r.reference_documents <= 20
    assert 0 <= r.min_k_pp_percentile <= 100
