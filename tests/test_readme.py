"""Every example in README.md and tools/README.md, run as written.

An example is a line of a ```bash block (continuation lines joined, comments dropped). Each
one is either run, in document order, in one temporary folder, or listed in SKIPPED with the
reason it cannot run here. An example that is neither, or an entry here that no README has
any more, fails `test_every_example_is_run_or_listed`: a README change comes with its run.

How an example runs:
- `silo` verbs run through `silo.app.cli.main` in this process (the same code as the
  console script, minus the interpreter start of each); `silo serve` and `silo serve-shards`
  run as real server processes in the background, on a free port (`--port 0 --ready-file`,
  and `--http-port 0 --http-ready-file` for the HTTP API); `python tools/…` scripts,
  `curl` and `lm_eval` run as real subprocesses (the last two through bash, as written);
  `export` sets the environment of the verbs that follow.
- A ```python block is one example, run as a script by this interpreter.
- `[optional flags]` are given; `ID` is the last document id an earlier example printed,
  `RECEIPT` the last opt-out receipt; `MODEL` is the model folder.
- `data/*` holds the generated test corpus (as JSON lines and parquet), `serve.toml` is the
  README's TOML block, and the sizes shrink to test sizes. Each example's own changes are the
  `subs` of its `Run` entry below, so what differs from the README is said in one place.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_records, write_jsonl

from silo.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "tools" / "README.md")
DOC_ID = re.compile(r"\b(?:doc|new)-\d{4}\b")


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


PYTHON_BLOCK = "python-block\n"


def examples(path: Path) -> list[str]:
    """The examples of a markdown file in order: the commands of its ```bash blocks, one per
    line, whitespace normalised; each ```python block whole, after PYTHON_BLOCK."""
    out = []
    for kind, block in re.findall(r"```(bash|python)\n(.*?)```", path.read_text(), re.S):
        if kind == "python":
            out.append(PYTHON_BLOCK + block)
            continue
        for line in re.sub(r"\\\n", " ", block).splitlines():
            cmd = " ".join(_strip_comment(line).split())
            if cmd:
                out.append(cmd)
    return out


def files(path: Path) -> dict[str, str]:
    """The other fenced blocks that name a file in their first line (`# serve.toml`)."""
    return {m.group(2): m.group(3) for m in re.finditer(r"```(toml|yaml)\n# (\S+)\n(.*?)```", path.read_text(), re.S)}


# ------------------------------------------------------------------------- a tiny shell


class Shell:
    """Runs examples in one folder: verbs in process, servers and scripts as processes."""

    def __init__(self, root: Path, capsys, monkeypatch):
        self.root, self.capsys, self.mp = root, capsys, monkeypatch
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.doc_ids: list[str] = []
        self.receipt: str | None = None
        monkeypatch.chdir(root)
        for var in ("SILO_TARGET", "SILO_TOKEN_FILE", "SILO_TLS_CA", "SILO_TIMEOUT"):
            monkeypatch.delenv(var, raising=False)

    def _seen(self, out: str) -> str:
        self.doc_ids += DOC_ID.findall(out)
        if m := re.findall(r"receipt(?:_id)?[\"':\s]+([\w-]{8,})", out):
            self.receipt = m[-1]
        return out

    def silo(self, *argv: str) -> str:
        """`silo ARGV` in this process; its stdout (fails on a non-zero exit)."""
        self.capsys.readouterr()
        code = 0
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = self.capsys.readouterr()
        assert code == 0, f"silo {shlex.join(argv)} exited {code}:\n{out.err[-3000:]}"
        return self._seen(out.out)

    def python(self, *argv: str) -> str:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"python {shlex.join(argv)} exited {proc.returncode}:\n" \
                                     f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return self._seen(proc.stdout)

    def bash(self, cmd: str) -> str:
        """`cmd` as written, in bash (its quoting and `$(...)`); fails on a non-zero exit."""
        proc = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return self._seen(proc.stdout)

    def start(self, name: str, *argv: str) -> int:
        """A `silo serve`/`serve-shards` process in the background; its port once it serves."""
        argv = _drop_flag(list(argv), "--port")
        ready, log = self.root / f"{name}.ready", self.root / f"{name}.log"
        extra = ["--port", "0", "--ready-file", str(ready)]
        http_ready = self.root / f"{name}.http-ready"
        if "--http-port" in argv:  # its HTTP port is `{http}` in later examples
            argv = _drop_flag(argv, "--http-port")
            extra += ["--http-port", "0", "--http-ready-file", str(http_ready)]
        proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", *argv, *extra], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        deadline = time.monotonic() + 300
        for f in (ready, http_ready) if "--http-port" in extra else (ready,):
            while not f.is_file() or not f.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(name)
                    raise AssertionError(f"silo {shlex.join(argv)} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        if "--http-port" in extra:
            self.ports["http"] = int(http_ready.read_text())
        self.ports[name] = int(ready.read_text())
        return self.ports[name]

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def subs(self, cmd: str, subs: tuple[tuple[str, str], ...]) -> str:
        """`cmd` as run here: each (as written, as run) replaced, then `{name}` by its port."""
        for old, new in subs:
            assert old in cmd, f"substitution {old!r} no longer applies to: {cmd}"
            cmd = cmd.replace(old, new)
        return re.sub(r"\{(\w+)\}", lambda m: str(self.ports[m.group(1)]), cmd)

    def run(self, cmd: str, step: Run) -> str:
        if step.before:
            step.before(self)
        cmd = self.subs(cmd, step.subs)
        if cmd.startswith(PYTHON_BLOCK):
            out = self.python("-c", cmd.removeprefix(PYTHON_BLOCK))
            if step.check:
                step.check(self, out)
            return out
        if cmd.split()[0] in ("curl", "lm_eval") or "lm_eval " in cmd:
            out = self.bash(cmd)
            if step.check:
                step.check(self, out)
            return out
        cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd)  # optional flags are given
        words = []
        for w in shlex.split(cmd):
            w = {"ID": (self.doc_ids or ["?"])[-1], "RECEIPT": self.receipt or "?", "MODEL": "model"}.get(w, w)
            quoted = f"'{w}'" in cmd or f'"{w}"' in cmd
            if any(c in w for c in "*?") and not quoted:
                matched = sorted(glob.glob(w))
                assert matched, f"{w} matches nothing"
                words += matched
            else:
                words.append(w)
        if words[0] == "export":
            for assignment in words[1:]:
                key, value = assignment.split("=", 1)
                self.mp.setenv(key, value)
            out = ""
        elif words[0] == "silo" and words[1] in ("serve", "serve-shards"):
            self.start(step.name or words[1], *words[1:])
            out = ""
        elif words[0] == "silo":
            out = self.silo(*words[1:])
        elif words[0] == "python":
            out = self.python(*words[1:])
        else:
            raise AssertionError(f"no way to run: {cmd}")
        if step.check:
            step.check(self, out)
        return out


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


# ------------------------------------------------------------------------- setup steps


def write_data(sh: Shell) -> None:
    """`data/*.jsonl` and `data/*.parquet`: the generated corpus, half in each format."""
    records = make_records(240)
    (sh.root / "data").mkdir()
    write_jsonl(sh.root / "data" / "part-0.jsonl", records[:120])
    pq.write_table(pa.Table.from_pylist(records[120:]), sh.root / "data" / "part-1.parquet")


def write_new_corpus(sh: Shell) -> None:
    """`new-corpus`: twelve new restricted documents to ingest."""
    records = [r | {"doc_id": f"new-{i:04d}", "license": "GPL-3.0-only"} for i, r in enumerate(make_records(12, seed=7))]
    write_jsonl(sh.root / "new.jsonl", records)
    sh.silo("corpus", "import", "new.jsonl", "--out", "new-corpus")


def train_oracle(sh: Shell) -> None:
    """`oracle-model`: the same tiny LM trained on every tier, for the gap the modes close."""
    sh.silo("lm", "train", "--corpus", "corpus", "--tiers", "pd,sw,by,restricted", "--allow-restricted",
            "--config", "tiny", "--out", "oracle-model")


def make_certs(sh: Shell) -> None:
    """`node.pem`/`node.key` (for localhost) and `ca.pem`: a self-signed certificate is its own CA."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out",
                    "node.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    (sh.root / "ca.pem").write_bytes((sh.root / "node.pem").read_bytes())


def second_shard_node(sh: Shell) -> None:
    """The README shows node 1 (shards 0-1); node 2 serves the rest of the store."""
    last = len(json.loads((sh.root / "store" / "manifest.json").read_text())["shards"]) - 1
    sh.start("node2", "serve-shards", "store", "--shards", f"2-{last}", "--host", "0.0.0.0",
             "--shard-token-file", "shard.token", "--tls-cert", "node.pem", "--tls-key", "node.key")


def start_ray_cluster(sh: Shell) -> None:
    """A real two-node Ray cluster on this machine; `--ray-address auto` finds it by RAY_ADDRESS."""
    from ray.cluster_utils import Cluster

    from silo.parallel import threads_per_worker

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": threads_per_worker(2)})
    cluster.add_node(num_cpus=threads_per_worker(2))
    sh.cluster = cluster
    sh.mp.setenv("RAY_ADDRESS", cluster.address)


def stop_ray_cluster(sh: Shell, out: str) -> None:
    sh.cluster.shutdown()
    manifest = json.loads((sh.root / "shared" / "stores" / "restricted" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["entries"] > 0, manifest


def note_ledger(sh: Shell) -> None:
    sh.ledger_before = (sh.root / "corpus" / "removals.log").read_bytes()


def soak_passed(sh: Shell, out: str) -> None:
    summary = json.loads((sh.root / "soak.json").read_text())
    assert summary["passed"] and summary["stats_consistent"] and summary["acked_removals"] > 0, summary
    # the soak removes from its copy of the store: the corpus's ledger is not touched
    assert (sh.root / "corpus" / "removals.log").read_bytes() == sh.ledger_before


# ------------------------------------------------------------------------- checks


def _has_doc(sh: Shell, out: str) -> None:
    assert DOC_ID.search(out), out


def _json(sh: Shell, out: str) -> None:
    json.loads(out)


def _tiers(sh: Shell, out: str) -> None:
    assert "restricted" in out and "sw" in out, out


def _server_answers(name: str, stop: bool) -> Callable[[Shell, str], None]:
    def check(sh: Shell, out: str) -> None:
        info = json.loads(sh.silo("stats", "--target", f"127.0.0.1:{sh.ports[name]}", "--json"))
        assert info, info
        if stop:
            sh.stop(name)
    return check


def _remote_main_scores(sh: Shell, out: str) -> None:
    """The main server over two shard servers scores, and finds what the store finds locally."""
    target = f"127.0.0.1:{sh.ports['remote-main']}"
    res = json.loads(sh.silo("score", "The harbour of Hobart", "--mode", "knn", "--json", "--target", target))
    assert res["mode"] == "RETRIEVAL_KNN" and res["num_tokens"] > 0, res
    query = "The bridge of Quito was built in"
    remote = json.loads(sh.silo("search", "--target", target, "--query", query, "-k", "5", "--json"))["hits"]
    local = json.loads(sh.silo("datastore", "search", "store", "--query", query, "-k", "5", "--json"))["hits"]
    assert [h["doc_id"] for h in remote] == [h["doc_id"] for h in local] and len(remote) == 5, (remote, local)
    sh.stop_all()


def _generated_with_sources(sh: Shell, out: str) -> None:
    assert DOC_ID.search(out) and "verbatim" in out, out  # sources, and the spans traced


def _removed(sh: Shell, out: str) -> None:
    assert "removed 1 document" in out and sh.receipt, out


def _proved(sh: Shell, out: str) -> None:
    assert sh.doc_ids[-1] in out or "removed" in out.lower(), out


FACT = "The harbour of Tallinn was built in 1785 by John Napier."  # a sentence of the generated corpus


def _card(out: str) -> None:
    assert "## Training data" in out and "| pd |" in out and "| restricted |" not in out, out


def _audited(sh: Shell, out: str) -> None:
    assert out.startswith("text 1: too short") and f"{sh.doc_ids[-1]}: not trained on (exact)" in out, out


def _nothing_restricted(sh: Shell, out: str) -> None:
    texts = json.loads(out)["texts"]
    assert texts and not any(t["same_documents"] for t in texts), texts  # no restricted document was trained on


def _auroc(out: str) -> None:
    assert "0 of the train documents are in the training record" in out and re.search(r"Min-K%\+\+ +AUROC", out), out


def _models(sh: Shell, out: str) -> None:
    ids = {m["id"] for m in json.loads(out)["data"]}
    assert {"model", "model:none", "model:knn", "model:infgram"} <= ids, ids


def _completed_with_citations(sh: Shell, out: str) -> None:
    choice = json.loads(out)["choices"][0]
    assert choice["text"] and choice["silo"]["mode"] == "knn" and choice["silo"]["citations"], choice
    _has_doc(sh, out)


def _traced(sh: Shell, out: str) -> None:
    spans = json.loads(out)["spans"]
    assert spans and spans[0]["documents"], out


def _dry_run(sh: Shell, out: str) -> None:
    res = json.loads(out)
    assert res["dry_run"] and res["removed_doc_ids"] and not res["receipt_id"], res


def _check_lm_eval_command(sh: Shell, out: str) -> None:
    """The kNN-LM command `silo lm-eval-task` prints is the README's, as this test runs it."""
    written = sh.subs(LM_EVAL, RUN[LM_EVAL].subs[:2])
    printed = [" ".join(line.split()).replace(str(sh.root / "cloze"), "cloze").removesuffix(" --output_path lmeval-knn")
               for line in out.splitlines() if "model=model:knn" in line]
    assert printed == [written], (printed, written)


def _lm_eval_ran(sh: Shell, out: str) -> None:
    results = sorted(Path("lm-eval").rglob("results_*.json"))
    assert results, out
    acc = json.loads(results[-1].read_text())["results"]["silo_cloze"]
    assert 0 <= acc["acc,none"] <= 1, acc


def _lm_eval_section(path: Path) -> None:
    table = path.read_text().split("## lm-eval-harness (silo_cloze)", 1)[1]
    assert re.search(r"^\| infgram \| [0-9.]+ \|", table, re.M), table


# ------------------------------------------------------------------------- the table


@dataclass
class Run:
    subs: tuple[tuple[str, str], ...] = ()  # (as written, as run here)
    before: Callable[[Shell], None] | None = None
    check: Callable[[Shell, str], None] | None = None
    name: str = ""  # a server's name, for `{name}` (its port) in later examples


SERVE = "silo serve --model model --store store --store ngrams --store passages --port 50051 --token-file admin.token " \
        "--credentials owners.json"
REMOTE = "silo serve --model model --store store --remote-shards node1:50061,node2:50061 --shard-token-file " \
         "shard.token --shard-ca ca.pem --token-file admin.token"
SHARDS = "silo serve-shards store --shards 0-1 --host 0.0.0.0 --port 50061 --shard-token-file shard.token --tls-cert " \
         "node.pem --tls-key node.key"
HTTP_SERVE = "silo serve --model model --store store --store ngrams --port 50052 --http-port 8000 --token-file " \
             "admin.token --credentials owners.json"
OPENAI_EXAMPLE = """from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # or an owner's token
out = client.completions.create(model="model:knn", prompt="The harbour of", max_tokens=16,
                                extra_body={"silo": {"trace": True}})
print(out.choices[0].text, out.choices[0].model_extra["silo"]["citations"])
"""
LM_EVAL = "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model local-completions --model_args " \
          "base_url=http://127.0.0.1:8000/v1/completions,model=model:knn,tokenizer_backend=remote,max_length=1023 " \
          "--include_path cloze --tasks silo_cloze"
LMEVAL_MODES = "python tools/lmeval_modes.py --model runs/demo/lm-pdsw --store runs/demo/store-token --store " \
               "runs/demo/store-infgram --corpus runs/demo/corpus --limit 100 --benchmarks BENCHMARKS.md"
RAY_BUILD = "silo datastore build --kind token --model /shared/models/lm-pdsw --corpus /shared/corpus --tiers " \
            "restricted --shards 256 --memory-budget 200G --out /shared/stores/restricted --backend ray " \
            "--ray-address auto --workers 48"
SOAK = "python tools/soak.py --store runs/bench/store-restricted-1000000-s1 --duration 60 --clients 16 --json " \
       "runs/bench/soak/summary.json"

RUN: dict[str, Run] = {
    # README.md
    "silo corpus import data/*.jsonl data/*.parquet --out corpus": Run(before=write_data, check=_tiers),
    "silo corpus harvest --out corpus --limit-bytes 50M": Run((("--out corpus", "--out harvested"), ("50M", "300k")),
                                                              check=_tiers),
    "silo corpus stats corpus [--tokenizer MODEL] [--json]": Run((("[--tokenizer MODEL] ", ""),), check=_json),
    "silo lm train --corpus corpus --tiers pd,sw --config small --out model": Run((("small", "tiny"),)),
    "silo lm eval model --corpus corpus --split test [--tiers restricted] [--window 512 --stride 256]": Run(),
    "silo datastore build --kind token --model model --corpus corpus --shards 4 --out store": Run(),
    "silo datastore build --kind infgram --model model --corpus corpus --out ngrams": Run(),
    "silo datastore build --kind passage --model model --corpus corpus --retrievers bm25,dense --embedder minilm "
    "--out passages": Run(),
    "silo datastore search store --query \"text\" -k 5 --deny-licenses '*-NC-*' --deny-sources news":
        Run((('"text"', '"The harbour of Hobart"'),), check=_has_doc),
    "silo datastore stats store": Run(),
    "silo datastore add store --corpus new-corpus": Run(before=write_new_corpus),
    "silo datastore optout store --doc-id ID": Run(check=_removed),
    "silo datastore compact store": Run(),
    "silo datastore check store [--repair]": Run(),
    "silo eval --model model --store store --store ngrams --store passages --corpus corpus --split test --modes "
    "lm,knn,ric,infgram --oracle oracle-model --sweep --report report.json":
        Run(before=train_oracle, check=lambda sh, out: json.loads(Path("report.json").read_text())),
    "silo scaling-curve --model model --store store --corpus corpus --fractions 0.01,0.1,1 --out curve/": Run(),
    "silo plan --tokens 1e12 --calibrate --model model --corpus corpus": Run((("1e12", "1e12 --calibrate-tokens 20000"),)),
    "silo lm card model": Run(check=lambda sh, out: _card(out)),
    'silo audit --model model --text "some text" --doc-id ID': Run(check=_audited),
    "silo audit --model model --corpus corpus --split train --tiers restricted --json": Run(check=_nothing_restricted),
    "silo audit --model model --corpus corpus --tiers restricted --auroc": Run(check=lambda sh, out: _auroc(out)),
    "silo token admin --out admin.token": Run(),
    "silo token issue --owner alice --credentials owners.json": Run(),
    SERVE: Run(name="serve"),
    "silo serve --config serve.toml": Run(name="serve-config", check=_server_answers("serve-config", stop=True)),
    "export SILO_TARGET=127.0.0.1:50051 SILO_TOKEN_FILE=admin.token": Run((("50051", "{serve}"),)),
    'silo generate "The harbour of" --mode knn --trace': Run(check=_generated_with_sources),
    'silo score "some text" --mode infgram --json': Run(check=_json),
    'silo trace "some text"': Run(),
    'silo search --query "some text" -k 5 --json': Run((('"some text"', '"The harbour of Hobart"'),), check=_has_doc),
    'silo search --query "some text" --store-kind passage --retriever hybrid --json':
        Run((('"some text"', '"The harbour of Hobart"'),), check=_has_doc),
    "silo optout --doc-id ID": Run(check=_removed),
    "silo optout --status RECEIPT": Run(check=_proved),
    "silo stats": Run(),
    "silo compact": Run(),
    HTTP_SERVE: Run(name="http-main"),
    "curl -s http://127.0.0.1:8000/v1/models": Run(((":8000", ":{http}"),), check=_models),
    "curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"model\", "
    "\"prompt\": \"The harbour of\", \"max_tokens\": 16, \"silo\": {\"mode\": \"knn\", \"k\": 8, \"trace\": true}}'":
        Run(((":8000", ":{http}"),), check=_completed_with_citations),
    "curl -s http://127.0.0.1:8000/v1/silo/trace -d '{\"text\": \"The harbour of Hobart is deep\"}'":
        Run(((":8000", ":{http}"), ("The harbour of Hobart is deep", FACT)), check=_traced),
    "curl -s http://127.0.0.1:8000/v1/silo/optout -H \"Authorization: Bearer $(cat admin.token)\" -d '{\"text_span\": "
    "\"The harbour of Hobart\", \"dry_run\": true}'":
        Run(((":8000", ":{http}"), ("The harbour of Hobart", FACT[:21])), check=_dry_run),
    PYTHON_BLOCK + OPENAI_EXAMPLE: Run(((":8000", ":{http}"),), check=lambda sh, out: _has_doc(sh, out)),
    "silo lm-eval-task --corpus corpus --out cloze --model model --url http://127.0.0.1:8000":
        Run(((":8000", ":{http}"), ("--corpus corpus", "--corpus corpus --tiers restricted,by")), check=_check_lm_eval_command),
    LM_EVAL: Run(((":8000", ":{http}"), ("max_length=1023", "max_length=511"), ("--tasks silo_cloze", "--tasks silo_cloze --limit 2 --output_path lm-eval")),
                 check=_lm_eval_ran),
    "silo token shard --out shard.token": Run(),
    SHARDS: Run(name="node1", before=make_certs),
    REMOTE: Run((("node1:50061,node2:50061", "localhost:{node1},localhost:{node2}"),), before=second_shard_node,
                name="remote-main", check=_remote_main_scores),
    # tools/README.md
    SOAK: Run((("tools/soak.py", str(ROOT / "tools" / "soak.py")), ("runs/bench/store-restricted-1000000-s1", "store"),
               ("--duration 60", "--duration 8 --model model --work soak --compact-at 4"), ("--clients 16", "--clients 3 --max-rss-growth 0.5"),
               ("runs/bench/soak/summary.json", "soak.json")), before=note_ledger, check=soak_passed),
    LMEVAL_MODES: Run((("tools/lmeval_modes.py", str(ROOT / "tools" / "lmeval_modes.py")),
                       ("runs/demo/lm-pdsw", "model"), ("runs/demo/store-token", "store"),
                       ("runs/demo/store-infgram", "ngrams"), ("runs/demo/corpus", "corpus"),
                       ("--limit 100", "--limit 2 --modes infgram --tiers restricted,by --work lmeval-work"),
                       ("BENCHMARKS.md", "bench.md")),
                      check=lambda sh, out: _lm_eval_section(Path("bench.md"))),
    RAY_BUILD: Run((("/shared/", "shared/"), ("--shards 256", "--shards 4"), ("--workers 48", "--workers 2"),
                    ("shared/models/lm-pdsw", "model"), ("shared/corpus", "corpus")),
                   before=start_ray_cluster, check=stop_ray_cluster),
    "silo token shard --out /shared/secrets/shard.token": Run((("/shared/", "shared/"),),
                                                              before=lambda sh: Path("shared/secrets").mkdir()),
    "silo token admin --out /shared/secrets/admin.token": Run((("/shared/", "shared/"),)),
}

SKIPPED: dict[str, str] = {
    "python -m pip install -c constraints.txt -e '.[minilm]' && silo demo":
        "the install is the one this suite runs in; `silo demo` runs end to end in tests/test_demo.py",
    "python -m pip install -c constraints.txt -e '.[dev]' && python -m pytest -q": "this is the suite itself (.ci/run)",
    "python tools/bench.py": "hours: it builds ~60M tokens of stores; figures in BENCHMARKS.md",
    "python tools/bench.py --only knn,refine,shards,generation,bytes,rss,infgram,soak":
        "needs the cached 1M- and 10M-entry stores (an hour of building); figures in BENCHMARKS.md",
    "python tools/bench.py --prepare store,store8,big": "builds the 1M- and 10M-entry stores (an hour)",
    "python tools/bench.py --prepare tiny,growth": "builds the 0.5M…16M-token growth series (hours)",
    "python tools/traps.py --corpus runs/corpus --work runs/traps --per-cell 16 --benchmarks BENCHMARKS.md":
        "trains two LMs on a harvest (10 minutes); tests/test_traps.py runs the same experiment small",
    "ray up tools/ray-cluster.yaml": "starts cloud machines; the build below runs on a local two-node Ray cluster",
    "silo serve-shards /shared/stores/restricted --shards 0-63 --host 0.0.0.0 --port 50061 --shard-token-file "
    "/shared/secrets/shard.token --tls-cert node1.pem --tls-key node1.key":
        "four machines; README.md's shard-server example (the same verb and flags) runs above on loopback",
    "silo serve-shards /shared/stores/restricted --shards 64-127 --host 0.0.0.0 --port 50061 --shard-token-file "
    "/shared/secrets/shard.token --tls-cert node2.pem --tls-key node2.key":
        "four machines; README.md's shard-server example runs above on loopback",
    "silo serve --model /shared/models/lm-pdsw --store /shared/stores/restricted --remote-shards "
    "node1:50061,node2:50061,node3:50061,node4:50061 --shard-token-file /shared/secrets/shard.token --shard-ca ca.pem "
    "--token-file /shared/secrets/admin.token":
        "four machines; README.md's main server over shard servers runs above on loopback",
    "silo serve --model model --store store --ray-address auto --shard-group 0-1 --shard-group 2-3 "
    "--shard-replicas 2 --token-file admin.token":
        "needs a Ray cluster: tests/test_ray_serve.py runs these flags on a three-node Ray cluster on this machine, "
        "killing a replica and a node under load",
}


def test_every_example_is_run_or_listed():
    written = [cmd for path in READMES for cmd in examples(path)]
    assert len(written) > 40, "no examples found: has the README's ```bash fencing changed?"
    missing = [cmd for cmd in written if cmd not in RUN and cmd not in SKIPPED]
    assert not missing, "README examples neither run nor listed in tests/test_readme.py:\n" + "\n".join(missing)
    stale = [cmd for cmd in [*RUN, *SKIPPED] if cmd not in written]
    assert not stale, "tests/test_readme.py lists examples no README has:\n" + "\n".join(stale)
    assert not set(RUN) & set(SKIPPED)
    assert "serve.toml" in files(READMES[0])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_example_runs(tmp_path, capsys, monkeypatch):
    sh = Shell(tmp_path, capsys, monkeypatch)
    try:
        for path in READMES:
            for name, text in files(path).items():
                (tmp_path / name).write_text(text)
            for cmd in examples(path):
                if cmd in RUN:
                    sh.run(cmd, RUN[cmd])
            sh.stop_all()
    finally:
        sh.stop_all()
        if hasattr(sh, "cluster"):
            sh.cluster.shutdown()
