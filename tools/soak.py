"""Soak test: a real `silo serve` process under a mixed load, opt-outs and a compaction.

    python tools/soak.py --model runs/demo/lm-pdsw --store runs/bench/store-restricted-1000000-s1 \\
        --duration 60 --clients 16 --json runs/bench/soak/summary.json

1. the store is COPIED into `--work` (opt-outs and the compaction change it), with a copy of
   its removal ledger (the soak's opt-outs must not reach the corpus's other stores);
2. an admin token and owner credentials (`silo.server.auth.OwnerCredentials`, a few owners of
   the store's documents) are written, and `python -m silo.app.cli serve` starts on them;
3. `--clients` threads issue, for `--duration` seconds, a mix of Generate (kNN, a few
   tokens), Score (kNN), Search, OptOut (single documents: admin or owner tokens, some dry
   runs, some that must be refused) and OptOutStatus; at `--compact-at` seconds one more
   client calls Compact;
4. every call is recorded: RPC, start and end time, status code, the documents its hits or
   attributions name.

Checked afterwards:

- status codes: INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION (a
  refused large removal, a compaction already running) and RESOURCE_EXHAUSTED (overload)
  are documented; any other error is a failure. A call whose code is not the one its
  kind expects (an owner removing another owner's document must get PERMISSION_DENIED,
  an unknown doc id NOT_FOUND) is a failure too;
- the promise: once an opt-out is acknowledged, no Search hit and no Generate attribution
  of a call *started after the acknowledgement* names that document (Score returns no
  attribution: it cannot be checked from outside); OptOutStatus of an acknowledged
  document must say it is removed and tombstoned;
- the server's RSS (from /proc) after a warm-up and at the end: RssAnon growth ≤ 10%
  (VmRSS, which also counts mapped file pages, is reported beside it).

Exit status 0 when every check passes, 1 otherwise; `--json` writes the summary.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo.datastore.manifest import Manifest  # noqa: E402
from silo.datastore.store import Datastore  # noqa: E402
from silo.server.auth import OwnerCredentials  # noqa: E402
from silo.server.client import SiloClient  # noqa: E402

from silo.corpus import iter_documents  # noqa: E402

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
ADMIN_TOKEN = "soak-admin-token-" + os.urandom(12).hex()
OPS = (("Search", 35), ("Generate", 20), ("Score", 20), ("OptOut", 15), ("OptOutStatus", 10))


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


class Soak:
    def __init__(self, a: argparse.Namespace, target: str, store: Datastore, owners: dict[str, str],
                 texts: list[str]):
        self.a, self.target, self.texts = a, target, texts
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.calls: list[dict] = []
        self.acked: dict[str, float] = {}  # doc id -> time its removal was acknowledged
        self.receipts: dict[str, str] = {}  # doc id -> receipt
        self.removals_started = 0
        self.recent: collections.deque = collections.deque(maxlen=200)  # (query, doc id) seen in hits
        self.replay: collections.deque = collections.deque(maxlen=100)  # queries that found a removed doc
        self.owner_tokens = owners  # owner -> token
        live = ~store.dead_docs  # a document removed before the soak cannot be removed again
        owner_of = [o for o, x in zip(store.docs.column("owner"), live, strict=True) if x]  # "" for none
        self.doc_ids = [d for d, x in zip(store.docs.doc_ids.to_pylist(), live, strict=True) if x]
        self.owner_docs = {o: [d for d, x in zip(self.doc_ids, owner_of, strict=True) if x == o] for o in owners}
        self.foreign = [d for d, x in zip(self.doc_ids, owner_of, strict=True) if x not in owners]
        self.owner_of = dict(zip(self.doc_ids, owner_of, strict=True))
        self.stop = threading.Event()
        self.compact_info: dict = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ one call

    def record(self, op: str, start: float, code: str, expected: set[str], hits: list[str] | None = None,
               detail: str = "") -> None:
        with self.lock:
            self.calls.append({"op": op, "start": start, "end": self.now(), "code": code,
                               "expected": sorted(expected), "hits": hits, "detail": detail[:300]})

    def call(self, op: str, fn, expected: set[str]):
        start = self.now()
        try:
            result = fn()
            return start, "OK", result
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "UNKNOWN"
            self.record(op, start, code, expected, detail=e.details() or "")
            return start, code, None

    # ------------------------------------------------------------------ the RPCs

    def search(self, c: SiloClient, rng: random.Random) -> None:
        if self.replay and rng.random() < 0.5:
            query = rng.choice(list(self.replay))
        else:
            text = rng.choice(self.texts)
            a = rng.randrange(max(1, len(text) - 200))
            query = text[a : a + rng.randint(40, 200)]
        start, code, res = self.call("Search", lambda: c.search(query, k=16), {"OK"})
        if res is not None:
            hits = [h.doc_id for h in res.hits]
            self.record("Search", start, code, {"OK"}, hits)
            with self.lock:
                self.recent.extend((query, d) for d in hits[:4])

    def generate(self, c: SiloClient, rng: random.Random) -> None:
        text = rng.choice(self.texts)
        a = rng.randrange(max(1, len(text) - 150))
        prompt = text[a : a + rng.randint(30, 150)]
        start = self.now()
        hits: list[str] = []
        try:
            for ev in c.generate(prompt, max_new_tokens=rng.randint(2, 6), attribution_top=4, mode="knn", k=32):
                if ev.HasField("token"):
                    hits.extend(h.doc_id for h in ev.token.attribution)
                else:
                    hits.extend(x.doc_id for x in ev.summary.citations)
        except grpc.RpcError as e:
            self.record("Generate", start, e.code().name, {"OK"}, detail=e.details() or "")
            return
        self.record("Generate", start, "OK", {"OK"}, hits)
        with self.lock:
            self.recent.extend((prompt, d) for d in hits[:2])

    def score(self, c: SiloClient, rng: random.Random) -> None:
        text = rng.choice(self.texts)
        a = rng.randrange(max(1, len(text) - 400))
        start, code, res = self.call("Score", lambda: c.score(text[a : a + 300], mode="knn", k=32), {"OK"})
        if res is not None:
            self.record("Score", start, code, {"OK"}, None, f"{res.num_tokens} tokens")

    def optout(self, admin: SiloClient, owners: dict[str, SiloClient], rng: random.Random) -> None:
        kind = rng.random()
        with self.lock:
            budget = self.removals_started < self.a.max_removals
            candidates = [(q, d) for q, d in self.recent if d not in self.acked]
        if kind < 0.40:  # the admin removes a document it has just been served
            if candidates:
                query, doc = rng.choice(candidates)
                if budget:
                    self._remove("OptOut admin", admin, doc, query, {"OK"})
                else:
                    self._dry_run(admin, doc)
        elif kind < 0.60:  # an owner removes one of their own documents
            owner = rng.choice(list(owners))
            docs = [d for d in self.owner_docs[owner] if d not in self.acked]
            if docs and budget:
                self._remove("OptOut owner", owners[owner], rng.choice(docs), None, {"OK"})
            elif docs:
                self._dry_run(owners[owner], rng.choice(docs))
        elif kind < 0.70 and self.foreign:  # an owner tries another owner's document: refused
            owner = rng.choice(list(owners))
            doc = rng.choice(self.foreign)
            start, code, _ = self.call("OptOut foreign", lambda: owners[owner].optout(doc_ids=[doc]),
                                       {"PERMISSION_DENIED"})
            if code == "OK":
                self.record("OptOut foreign", start, code, {"PERMISSION_DENIED"}, detail=f"{owner} removed {doc}")
                with self.lock:
                    self.acked.setdefault(doc, self.now())
        elif kind < 0.78:  # an unknown document
            doc = f"no-such-doc-{rng.randrange(1 << 30)}"
            start, code, _ = self.call("OptOut unknown", lambda: admin.optout(doc_ids=[doc]), {"NOT_FOUND"})
            if code == "OK":
                self.record("OptOut unknown", start, code, {"NOT_FOUND"})
        else:  # a dry run: nothing may change
            self._dry_run(admin, rng.choice(self.doc_ids))

    def _dry_run(self, client: SiloClient, doc: str) -> None:
        start, code, res = self.call("OptOut dry run", lambda: client.optout(doc_ids=[doc], dry_run=True), {"OK"})
        if res is not None:
            self.record("OptOut dry run", start, code, {"OK"}, detail=f"{doc}: {list(res.removed_doc_ids)}")

    def _remove(self, op: str, client: SiloClient, doc: str, query: str | None, expected: set[str]) -> None:
        with self.lock:
            self.removals_started += 1
        start, code, res = self.call(op, lambda: client.optout(doc_ids=[doc], reason="soak"), expected)
        if res is None:
            return
        ack = self.now()  # the response is in hand: from now on the document is gone
        self.record(op, start, code, expected, detail=f"{doc} receipt {res.receipt_id}")
        with self.lock:
            self.acked.setdefault(doc, ack)
            self.receipts.setdefault(doc, res.receipt_id)
            if query is not None:
                self.replay.append(query)

    def status(self, admin: SiloClient, owners: dict[str, SiloClient], rng: random.Random) -> None:
        with self.lock:
            done = list(self.receipts.items())
        if not done:
            doc = rng.choice(self.doc_ids)
            start, code, res = self.call("OptOutStatus", lambda: admin.optout_status(doc_id=doc), {"OK"})
            if res is not None:
                self.record("OptOutStatus", start, code, {"OK"})
            return
        doc, receipt = rng.choice(done)
        owner = self.owner_of.get(doc)
        client = owners[owner] if owner in owners and rng.random() < 0.5 else admin
        by_receipt = rng.random() < 0.5
        start, code, res = self.call(
            "OptOutStatus", lambda: client.optout_status(receipt_id=receipt) if by_receipt
            else client.optout_status(doc_id=doc), {"OK"})
        if res is not None:
            ok = res.removed and res.tombstoned and doc in res.removed_doc_ids
            self.record("OptOutStatus", start, code if ok else "STATUS_NOT_REMOVED", {"OK"},
                        detail=f"{doc}: removed={res.removed} tombstoned={res.tombstoned}")

    # ------------------------------------------------------------------ clients

    def client(self, i: int) -> None:
        rng = random.Random(self.a.seed * 1000 + i)
        admin = SiloClient(self.target, token=ADMIN_TOKEN, timeout=120)
        owners = {o: SiloClient(self.target, token=t, timeout=120) for o, t in self.owner_tokens.items()}
        anon = SiloClient(self.target, timeout=120)
        names, weights = zip(*OPS, strict=True)
        try:
            while not self.stop.is_set():
                op = rng.choices(names, weights)[0]
                try:
                    if op == "Search":
                        self.search(anon, rng)
                    elif op == "Generate":
                        self.generate(anon, rng)
                    elif op == "Score":
                        self.score(anon, rng)
                    elif op == "OptOut":
                        self.optout(admin, owners, rng)
                    else:
                        self.status(admin, owners, rng)
                except Exception as e:  # noqa: BLE001 - a client-side failure is a failure of the soak
                    self.record(op, self.now(), "CLIENT_ERROR", {"OK"}, detail=repr(e))
        finally:
            for c in (admin, anon, *owners.values()):
                c.close()

    def compactor(self) -> None:
        if self.stop.wait(self.a.compact_at):
            return
        c = SiloClient(self.target, token=ADMIN_TOKEN, timeout=None)
        start = self.now()
        self.compact_info = {"started_s": start}
        try:
            res = c.compact()
            self.compact_info.update(status="OK", seconds=self.now() - start, removed_entries=res.removed_entries,
                                     rewritten_shards=res.rewritten_shards)
            self.record("Compact", start, "OK", {"OK"}, detail=str(res).replace("\n", " "))
        except grpc.RpcError as e:
            self.compact_info.update(status=e.code().name, seconds=self.now() - start, detail=e.details())
            self.record("Compact", start, e.code().name, {"OK", "FAILED_PRECONDITION"}, detail=e.details() or "")
        finally:
            c.close()

    def run(self) -> float:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.a.clients)]
        comp = threading.Thread(target=self.compactor, daemon=True)
        t = time.monotonic()
        for th in [*threads, comp]:
            th.start()
        time.sleep(self.a.duration)
        self.stop.set()
        for th in threads:
            th.join(timeout=300)
        comp.join(timeout=1200)  # a compaction that started is waited for
        return time.monotonic() - t

    # ------------------------------------------------------------------ the verdict

    def analyse(self) -> dict:
        calls = self.calls
        codes = collections.Counter(c["code"] for c in calls)
        unexpected = [c for c in calls if c["code"] not in DOCUMENTED or c["code"] not in c["expected"]]
        violations, checked_calls, checked_hits, later = [], 0, 0, 0
        for c in calls:
            if c["hits"] is None:
                continue
            checked_calls += 1
            for d in c["hits"]:
                checked_hits += 1
                ack = self.acked.get(d)
                if ack is None:
                    continue
                if ack < c["start"]:
                    violations.append({"op": c["op"], "doc": d, "ack_s": round(ack, 3), "call_start_s": round(c["start"], 3)})
                else:
                    later += 1
        latency = {}
        for op in sorted({c["op"] for c in calls}):
            mine = [c for c in calls if c["op"] == op]
            lat = np.array([c["end"] - c["start"] for c in mine]) * 1e3
            latency[op] = {"calls": len(mine), "ok": sum(c["code"] == "OK" for c in mine),
                           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                           "codes": dict(collections.Counter(c["code"] for c in mine))}
        return {"calls": len(calls), "codes": dict(codes), "unexpected_errors": len(unexpected),
                "unexpected": [f"{c['op']} {c['code']} (expected {'/'.join(c['expected'])}): {c['detail']}"
                               for c in unexpected[:20]],
                "violations": len(violations), "violation_examples": violations[:20],
                "checked_calls": checked_calls, "checked_hits": checked_hits, "hits_of_later_removed": later,
                "acked_removals": len(self.acked),
                "optouts_admin": sum(c["op"] == "OptOut admin" and c["code"] == "OK" for c in calls),
                "optouts_owner": sum(c["op"] == "OptOut owner" and c["code"] == "OK" for c in calls),
                "dry_runs": sum(c["op"] == "OptOut dry run" for c in calls),
                "latency": latency, "compact": self.compact_info}


def private_ledger(store: Path, ledger: Path) -> None:
    """Points the copied store at a copy of its removal ledger: the soak's opt-outs must not
    reach the corpus's ledger, which every other store built from the corpus honours."""
    manifest = Manifest.load(store)
    if manifest.ledger:
        shutil.copyfile(manifest.ledger, ledger)
        manifest.ledger = str(ledger)
        manifest.save(store)


def pick_owners(store: Datastore, n: int, rng: random.Random) -> list[str]:
    """Owners with a few documents each (2–50): enough to remove, not a whole store."""
    counts = collections.Counter(store.docs.column("owner"))
    fit = sorted(o for o, c in counts.items() if o and 2 <= c <= 50)
    return rng.sample(fit, min(n, len(fit)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/lm-pdsw")
    p.add_argument("--store", required=True, help="a token store; a copy of it is served and changed")
    p.add_argument("--work", default="runs/bench/soak")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--compact-at", type=float, help="seconds into the run (default: half the duration)")
    p.add_argument("--owners", type=int, default=4, help="owners given a token")
    p.add_argument("--max-removals", type=int, default=40, help="real removals at most (then dry runs)")
    p.add_argument("--workers", type=int, help="server worker threads (default: the server's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="RssAnon growth allowed from warm-up to the end (a run of a few seconds has no steady state)")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args()
    a.compact_at = a.duration / 2 if a.compact_at is None else a.compact_at
    work = Path(a.work).resolve()  # the server runs from the repository root: no path may be relative
    shutil.rmtree(work / "store", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    shutil.copytree(a.store, work / "store", ignore=shutil.ignore_patterns("*.lock", ".ingest"))
    print(f"copied {a.store} in {time.perf_counter() - t:.0f} s", flush=True)
    private_ledger(work / "store", work / "removals.log")
    store = Datastore.open(work / "store", load_index=False)
    rng = random.Random(a.seed)
    token_file = work / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    token_file.chmod(0o600)
    cred_path = work / "owners.json"
    cred_path.unlink(missing_ok=True)
    creds = OwnerCredentials(cred_path)
    owners = {o: creds.issue(o)[0] for o in pick_owners(store, a.owners, rng)}
    # request texts: held-out restricted documents first, then stored ones (a small corpus has few held out)
    docs = itertools.chain(*(iter_documents(store.manifest.corpus, tiers=("restricted",), split=split)
                             for split in ("test", "train")))
    texts = list(itertools.islice((d["text"] for d in docs if len(d["text"]) > 200), 300))
    if len(texts) < 3:
        raise SystemExit(f"{store.manifest.corpus} has {len(texts)} restricted documents over 200 characters; "
                         "the soak needs 3 at least")
    ready = work / "ready"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "silo.app.cli", "serve", "--model", str(Path(a.model).resolve()), "--store", str(work / "store"), "--port", "0",
           "--token-file", str(token_file), "--credentials", str(cred_path), "--ready-file", str(ready),
           "--max-concurrent", "64", *(["--workers", str(a.workers)] if a.workers else [])]
    log = open(work / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    summary: dict = {}
    try:
        t = time.perf_counter()
        while not ready.is_file() or not ready.read_text().strip():
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}); see {work / 'server.log'}")
            if time.perf_counter() - t > 900:
                raise SystemExit("the server did not start within 15 minutes")
            time.sleep(0.5)
        target = f"127.0.0.1:{ready.read_text().strip()}"
        load_s = time.perf_counter() - t
        print(f"server pid {server.pid} on {target}, loaded in {load_s:.0f} s; owners: {', '.join(owners)}", flush=True)
        soak = Soak(a, target, store, owners, texts)
        warm = SiloClient(target, token=ADMIN_TOKEN)
        warm.wait_ready()
        for _ in range(3):  # warm-up: every path once, so RSS "before" is the steady state
            warm.search(texts[0][:120], k=16)
            list(warm.generate(texts[1][:120], max_new_tokens=4, mode="knn", k=32))
            warm.score(texts[2][:300], mode="knn", k=32)
            warm.optout(doc_ids=[soak.doc_ids[0]], dry_run=True)
            warm.optout_status(doc_id=soak.doc_ids[0])
        stats_before = warm.stats().stores[0]
        rss_before = rss_kb(server.pid)
        print(f"RSS before: {rss_before}; running {a.clients} clients for {a.duration:.0f} s, Compact at "
              f"{a.compact_at:.0f} s", flush=True)
        soak.t0 = time.monotonic()
        wall = soak.run()
        rss_after = rss_kb(server.pid)
        stats_after = warm.stats().stores[0]
        warm.close()
        summary = soak.analyse()
        removed_entries = stats_before.live_entries - stats_after.live_entries
        summary.update(clients=a.clients, cpus=os.cpu_count(), duration_s=wall, rss_before=rss_before, rss_after=rss_after,
                       server_load_s=load_s, store_entries=store.n_entries, owners=list(owners),
                       live_documents_before=stats_before.live_documents, live_documents_after=stats_after.live_documents,
                       live_entries_removed=removed_entries, calls_per_s=summary["calls"] / wall)
        # Stats must agree with what was acknowledged
        summary["stats_consistent"] = stats_before.live_documents - stats_after.live_documents == len(soak.acked)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    # the check: anonymous memory (heap, index); VmRSS also counts file pages the kernel maps
    # in and drops as it likes (the store's memory-mapped columns), so it is only reported
    growth = summary["rss_after"]["RssAnon"] / summary["rss_before"]["RssAnon"] - 1
    summary["rss_growth"] = growth
    summary["vmrss_growth"] = summary["rss_after"]["VmRSS"] / summary["rss_before"]["VmRSS"] - 1
    summary["passed"] = (summary["unexpected_errors"] == 0 and summary["violations"] == 0 and growth <= a.max_rss_growth
                         and summary["stats_consistent"])
    print(json.dumps({k: v for k, v in summary.items() if k not in ("latency",)}, indent=1, default=str))
    for op, st in summary["latency"].items():
        print(f"{op:18s} {st['calls']:6d} calls  p50 {st['p50_ms']:8.1f} ms  p99 {st['p99_ms']:8.1f} ms  {st['codes']}")
    print("PASSED" if summary["passed"] else "FAILED")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1, default=str))
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
