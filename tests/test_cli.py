"""The `silo` command end to end, as a user types it (through its `main`, in this process)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest

from silo.app.cli import build_parser, main
from tests.conftest import make_records, write_jsonl

SUBCOMMANDS = [
    ["corpus", "import"], ["corpus", "harvest"], ["corpus", "stats"], ["tokenizer", "train"], ["lm", "train"],
    ["lm", "eval"], ["scaling-curve"], ["serve"], ["serve-shards"], ["generate"], ["score"], ["search"], ["optout"],
    ["stats"], ["compact"], ["plan"], ["datastore", "build"], ["datastore", "search"], ["datastore", "stats"], ["eval"], ["demo"],
    ["trace"], ["token", "issue"], ["token", "list"], ["token", "revoke"], ["datastore", "add"], ["datastore", "check"],
    ["datastore", "optout"], ["datastore", "compact"], ["datastore", "reindex"], ["lm-eval-task"], ["lm", "card"], ["audit"],
]


def silo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`silo ARGS` through the console script's own `main`, in this process, with its output
    and exit code (a fresh interpreter per call costs ~6 s of imports; tests/test_cli_e2e.py
    and tests/test_readme.py run the verbs as real processes)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    proc = subprocess.CompletedProcess(["silo", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"silo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: silo" in capsys.readouterr().out


def test_size_and_tier_arguments_are_validated(capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["lm", "train", "--corpus", "c", "--out", "m", "--tiers", "pd,bogus"])
    assert "bogus" in capsys.readouterr().err
    args = p.parse_args(["corpus", "harvest", "--out", "x", "--limit-bytes", "1.5M"])
    assert args.limit_bytes == int(1.5 * (1 << 20))


def test_plan_without_what_it_needs_is_one_line(tmp_path, capsys):
    calib = tmp_path / "calibration.json"
    for args, said in ((["--calibrate"], "needs a model and a corpus"), ([], "no calibration at"),
                       (["--tokens", "0"], "tokens must be positive")):
        if args == ["--tokens", "0"]:
            calib.write_text(json.dumps({"dim": 64, "entry_meta_bytes": 16, "text_bytes_per_token": 4}))
        with pytest.raises(SystemExit) as e:
            main(["plan", "--calibration", str(calib), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "Traceback" not in err, args


def test_import_stats_train_refusal_and_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_records(30))
    out = silo("corpus", "import", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "c")).stdout
    assert "restricted" in out and "skipped: 0 empty" in out
    stats = json.loads(silo("corpus", "stats", str(tmp_path / "c"), "--json").stdout)
    assert stats["total"]["documents"] == 30
    bad = silo("lm", "train", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "m"), "--tiers", "restricted",
               check=False)
    assert bad.returncode != 0 and "never trained on" in bad.stderr
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n')
    bad = silo("corpus", "import", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "d"), check=False)
    assert bad.returncode == 2 and "bad.jsonl:1: invalid UTF-8" in bad.stderr and "Traceback" not in bad.stderr
    bad = silo("lm", "eval", str(tmp_path), "--corpus", str(tmp_path / "c"), check=False)
    assert bad.returncode == 2 and "not a model folder" in bad.stderr


def test_store_build_search_stats_eval(tmp_path, tiny_model, corpus_dir):
    store = tmp_path / "store"
    silo("datastore", "build", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--out", str(store),
         "--shards", "2", "--window", "128", "--stride", "64")
    hits = json.loads(silo("datastore", "search", str(store), "--query", "The harbour of Hobart was built in",
                           "-k", "3", "--json").stdout)["hits"]
    assert len(hits) == 3 and all(h["tier"] == "restricted" and h["sentence"] for h in hits)
    st = json.loads(silo("datastore", "stats", str(store), "--json").stdout)
    assert st["shards"] == 2 and st["live_entries"] == st["entries"] > 0
    report = tmp_path / "eval.json"
    out = silo("eval", "--model", str(tiny_model), "--store", str(store), "--corpus", str(corpus_dir),
               "--modes", "lm,knn", "--window", "128", "--stride", "64", "-k", "16", "--lambda", "0.5",
               "--temperature", "10", "--report", str(report)).stdout
    assert "kNN-LM" in out and "near-copies of evaluation text" in out
    rep = json.loads(report.read_text())
    assert rep["knn"] < rep["lm"]
    bad = silo("datastore", "search", str(store), "--query", "x", "--model", str(tmp_path), check=False)
    assert bad.returncode == 2 and "not a model folder" in bad.stderr


def test_local_store_verbs_tokens_and_check(tmp_path, tiny_model, corpus_dir):
    """Operator verbs without a server: ingest, opt-out, check and repair, compaction, tokens."""
    store = tmp_path / "store"
    silo("datastore", "build", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--out", str(store),
         "--window", "128", "--stride", "64", "--split", "validation")
    added = json.loads(silo("datastore", "add", str(store), "--corpus", str(corpus_dir), "--split", "test",
                            "--tiers", "restricted", "--json").stdout)
    assert added["added_documents"] > 0 and added["shard"] == "00001"
    again = json.loads(silo("datastore", "add", str(store), "--corpus", str(corpus_dir), "--split", "test",
                            "--tiers", "restricted", "--json").stdout)
    assert again["added_documents"] == 0 and {r["reason"] for r in again["refused"]} == {"duplicate doc id"}
    from collections import Counter

    from silo.datastore.kinds import open_store

    st = open_store(store, load_index=False)
    owner = Counter(st.doc_owner(d) for d in range(st.n_documents)).most_common(1)[0][0]  # ≥ 2 documents
    dry = silo("datastore", "optout", str(store), "--owner", owner, "--dry-run").stdout
    assert dry.startswith("would remove") and " 0 document" not in dry
    refused = silo("datastore", "optout", str(store), "--owner", owner, check=False)
    assert refused.returncode == 2 and "confirm" in refused.stderr
    out = silo("datastore", "optout", str(store), "--owner", owner, "--confirm-large").stdout
    assert out.startswith("removed") and "receipt" in out
    assert "rewrote" in silo("datastore", "compact", str(store)).stdout
    assert "OK" in silo("datastore", "check", str(store)).stdout
    with open(store / "optout.log", "ab") as f:
        f.write(b"not json at all\n")
    bad = silo("datastore", "check", str(store), check=False)
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout
    assert "repaired the log" in silo("datastore", "check", str(store), "--repair").stdout
    creds = tmp_path / "creds.json"
    token = silo("token", "issue", "--owner", "ann", "--credentials", str(creds)).stdout.strip()
    assert token.startswith("silo-owner-") and token not in creds.read_text()
    listed = silo("token", "list", "--credentials", str(creds)).stdout
    assert "ann" in listed and token not in listed


# ---------------------------------------------------------------------------- issue 14: a CLI like the others


def test_local_and_remote_twins_say_which_they_are_and_share_flags(capsys):
    """`search`/`optout`/`stats`/`compact` exist remote and local: each help names the other."""
    for remote, local in (("search", "datastore search"), ("optout", "datastore optout"),
                          ("stats", "datastore stats"), ("compact", "datastore compact")):
        with pytest.raises(SystemExit):
            main([remote, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "server" in out and f"silo {local}" in out, remote
        with pytest.raises(SystemExit):
            main([*local.split(), "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "no server" in out and f"silo {remote}" in out, local
    p = build_parser()
    common = ["--query", "q", "-k", "3", "--json", "--nprobe", "4", "--refine", "2", "--allow-tiers", "pd",
              "--deny-licenses", "GPL*", "--deny-owners", "x"]
    for a in (p.parse_args(["search", *common]), p.parse_args(["datastore", "search", "s", *common])):
        assert (a.k, a.json, a.nprobe, a.refine, a.allow_tiers, a.deny_owners) == (3, True, 4, 2, ("pd",), "x")
    for verb in (["optout", "--doc-id", "d"], ["datastore", "optout", "s", "--doc-id", "d"]):
        a = p.parse_args([*verb, "--dry-run", "--confirm-large", "--reason", "r", "--json"])
        assert a.dry_run and a.confirm_large and a.json


def test_json_is_a_switch_everywhere_and_overwrite_is_one_spelling():
    p = build_parser()
    for argv in (["datastore", "build", "--model", "m", "--corpus", "c", "--out", "o"], ["corpus", "import", "f",
                 "--out", "o"], ["corpus", "harvest", "--out", "o"], ["datastore", "optout", "s", "--owner", "o"],
                 ["datastore", "compact", "s"], ["tokenizer", "train", "--corpus", "c", "--out", "o"],
                 ["scaling-curve", "--model", "m", "--store", "s", "--corpus", "c", "--out", "o"], ["compact"],
                 ["lm", "train", "--corpus", "c", "--out", "o"], ["eval", "--model", "m", "--corpus", "c"]):
        assert p.parse_args([*argv, "--json"]).json is True, argv
    a = p.parse_args(["eval", "--model", "m", "--corpus", "c", "--report", "r.json"])
    assert a.report == "r.json" and a.json is False
    for argv, old in ((["lm", "train", "--corpus", "c", "--out", "o"], "--restart"), (["demo"], "--fresh"),
                      (["corpus", "import", "f", "--out", "o"], None), (["corpus", "harvest", "--out", "o"], None)):
        assert p.parse_args([*argv, "--overwrite"]).overwrite is True
        assert p.parse_args(argv).overwrite is False
        if old:
            assert p.parse_args([*argv, old]).overwrite is True  # the old spelling still works, hidden


def test_old_spellings_are_hidden(capsys):
    for argv, old in ((["lm", "train"], "--restart"), (["demo"], "--fresh")):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "--overwrite" in out and old not in out


def test_token_admin_and_shard_files(tmp_path, capsys):
    import os
    import stat

    for kind in ("admin", "shard"):
        path = tmp_path / f"{kind}.token"
        with pytest.raises(SystemExit) as e:
            main(["token", kind, "--out", str(path)])
            raise SystemExit(0)
        out = capsys.readouterr()
        token = path.read_text().strip()
        assert e.value.code == 0 and len(token) == 64 and int(token, 16) >= 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert out.out == "" and str(path) in out.err and token not in out.err
        with pytest.raises(SystemExit) as e:
            main(["token", kind, "--out", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert path.read_text().strip() == token
        main(["token", kind, "--out", str(path), "--overwrite"])
        capsys.readouterr()
        assert path.read_text().strip() != token


def test_global_quiet_and_log_level(tmp_path, capsys):
    import logging

    from silo import progress

    calib = tmp_path / "calibration.json"
    try:
        with pytest.raises(SystemExit):
            main(["--quiet", "--log-level", "debug", "plan", "--calibration", str(calib)])
        assert not progress.enabled() and logging.getLogger().level == logging.DEBUG
    finally:
        progress.set_quiet(False)
        logging.getLogger().setLevel(logging.WARNING)
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "loud", "stats"])
    assert e.value.code == 2


def test_client_deadline_flag_and_environment(monkeypatch):
    p = build_parser()
    assert p.parse_args(["generate", "x"]).timeout is None and p.parse_args(["score", "x"]).timeout is None
    for verb in (["stats"], ["search", "--query", "q"], ["trace", "x"], ["optout", "--owner", "o"], ["compact"]):
        assert p.parse_args(verb).timeout == 60
        assert p.parse_args([*verb, "--timeout", "2.5"]).timeout == 2.5
    from silo.app.cli import parse_args

    monkeypatch.setenv("SILO_TARGET", "10.0.0.1:1234")
    monkeypatch.setenv("SILO_TIMEOUT", "7")
    a = parse_args(["stats"])
    assert a.target == "10.0.0.1:1234" and a.timeout == 7
    a = parse_args(["stats", "--target", "h:1", "--timeout", "3"])
    assert a.target == "h:1" and a.timeout == 3


def test_bad_config_is_one_line(tmp_path, capsys):
    for name, text, said in (("a.toml", "modle = 'm'\n", "'modle' is not a setting"),
                             ("b.yaml", "port: many\n", "port"), ("c.toml", "port = [\n", "not valid TOML"),
                             ("missing.toml", None, "no such config file")):
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["serve", "--config", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, (name, err)
