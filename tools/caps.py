"""What the largest request each work cap still allows costs: peak RSS next to the caps.

    python tools/caps.py                      # a tiny model and stores are built under runs/caps
    python tools/caps.py --only knn-k,search  # some cases

`silo.server.limits.Limits` caps every request's work (tokens x k x refine, candidates per
search, tokens through the LM, RIC passages) before anything is allocated; this measures
what a request *at* those caps costs. Each case runs in a fresh process: load the model
and stores, start a real gRPC server on loopback, send one small request (warm-up), reset
the kernel's peak-RSS mark (/proc/self/clear_refs), send the largest request the default
caps allow, and read the peak (VmHWM). Figures are the growth above the loaded server, so
they hold for any model and store of this size; a real model adds its own forward
activations per batch (batch x window x vocabulary x 4 B of logits).

A benchmark, not a test: it prints a table and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo.server.app import build_server, load_state  # noqa: E402
from silo.server.auth import Auth  # noqa: E402
from silo.server.client import SiloClient  # noqa: E402
from silo.server.gen import silo_pb2 as pb  # noqa: E402
from silo.server.limits import Limits  # noqa: E402
from silo.server.servicers import DatastoreServicer, LanguageModelServicer  # noqa: E402

from silo.build import BuildArgs, build_store  # noqa: E402
from silo.corpus import write_corpus  # noqa: E402
from silo.tokenizer import encode_document  # noqa: E402

L = Limits()
WINDOW = 512  # the server's window (the tiny model's context)
PLACES = ["Lisbon", "Kyoto", "Quito", "Oslo", "Nairobi", "Tallinn", "Hobart", "Recife"]
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "Emmy Noether"]
THINGS = ["lighthouse", "observatory", "library", "bridge", "museum", "harbour", "archive", "tower"]


def prose(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        i = rng.randrange(len(PLACES))
        out.append(f"The {THINGS[i]} of {PLACES[i]} was built in {1700 + 17 * i} by {PEOPLE[i % len(PEOPLE)]}, "
                   f"and visitors still count {rng.randint(2, 999)} steps to the top.")
    return " ".join(out)


def build(work: Path) -> tuple[Path, Path, Path]:
    """The tiny model, a token store with kept keys (refine matters) and a passage store."""
    from silo.train import TrainArgs, train

    rng = random.Random(0)
    corpus, model, tokens, passages = work / "corpus", work / "model", work / "tokens", work / "passages"
    if not corpus.exists():
        licenses = {"pd": "CC0-1.0", "sw": "MIT", "restricted": "All rights reserved"}
        records = [{"doc_id": f"doc-{i:05d}", "text": prose(rng, 12), "source": "caps",
                    "license": licenses[["pd", "sw", "restricted"][i % 3]], "owner": f"owner-{i % 7}"}
                   for i in range(1500)]
        write_corpus(records, corpus)
    if not (model / "config.json").exists():
        train(TrainArgs(corpus=str(corpus), out=str(model), config="tiny", vocab_size=1024, steps=60,
                        progress=False))
    if not tokens.exists():
        build_store(BuildArgs(model=str(model), corpus=str(corpus), out=str(tokens), tiers=("restricted",),
                              shards=2, window=256, stride=128, keep_keys=True, progress=False))
    if not passages.exists():
        build_store(BuildArgs(model=str(model), kind="passage", corpus=str(corpus), out=str(passages),
                              tiers=("restricted",), passage_tokens=64, progress=False))
    return model, tokens, passages


def text_of(tok, n_tokens: int) -> str:
    """A text of at most `n_tokens` tokens as the server counts them (<s> … </s>), close to
    it, and of at most `max_text_chars` characters (the first bound a text meets)."""
    rng = random.Random(1)
    text = prose(rng, n_tokens // 20 + 10)
    ids = encode_document(tok, text)[1:-1]
    m = n_tokens - 2
    while True:
        t = tok.decode(ids[:m])
        if len(encode_document(tok, t)) <= n_tokens and len(t) <= L.max_text_chars:
            return t
        m -= max(8, (len(t) - L.max_text_chars) // 8)


def tokens_of(tok, n_tokens: int) -> int:
    return len(encode_document(tok, text_of(tok, n_tokens)))


def knn(k: int, refine: int = 1) -> pb.RetrievalOptions:
    return pb.RetrievalOptions(mode=pb.RETRIEVAL_KNN, k=k, refine_factor=refine, lambda_=0.25)


def cases(tok) -> dict[str, tuple[str, object]]:
    """name -> (what it is, a function of a client sending the request)."""
    slots, cand = L.max_neighbour_slots, L.max_query_candidates
    k_max = L.max_k
    ric_k = 16
    ric_blocks = min(L.max_ric_passages // ric_k, L.max_forward_tokens // WINDOW)
    longest = tokens_of(tok, L.max_request_tokens)  # the longest text the server takes
    return {
        "knn-k": (f"kNN-LM Score, k {k_max}, {slots // k_max:,} tokens (= max_neighbour_slots)",
                  lambda c: c.lm.Score(pb.ScoreRequest(text=text_of(tok, slots // k_max + 1),
                                                       retrieval=knn(k_max)), timeout=3600)),
        "knn-tokens": (f"kNN-LM Score, {longest:,} tokens (max_request_tokens / max_text_chars), "
                       f"k {slots // longest}",
                       lambda c: c.lm.Score(pb.ScoreRequest(text=text_of(tok, L.max_request_tokens),
                                                            retrieval=knn(slots // longest)), timeout=3600)),
        "knn-refine": (f"kNN-LM Score, k {cand // L.max_refine_factor} x refine {L.max_refine_factor} "
                       f"(= max_query_candidates), {slots // cand:,} tokens",
                       lambda c: c.lm.Score(pb.ScoreRequest(text=text_of(tok, slots // cand + 1),
                                                            retrieval=knn(cand // L.max_refine_factor,
                                                                          L.max_refine_factor)), timeout=3600)),
        "ric": (f"RIC-LM Score, ric_stride 1, {ric_blocks:,} blocks x {ric_k} passages "
                f"(max_ric_passages; x window {WINDOW} = max_forward_tokens)",
                lambda c: c.lm.Score(pb.ScoreRequest(text=text_of(tok, ric_blocks + 1), retrieval=pb.RetrievalOptions(
                    mode=pb.RETRIEVAL_RIC, ric_stride=1, k=ric_k)), timeout=3600)),
        "generate": (f"kNN-LM Generate, {L.max_new_tokens} steps x k {k_max} x refine {cand // k_max}",
                     lambda c: list(c.lm.Generate(pb.GenerateRequest(
                         prompt="The lighthouse of Lisbon", max_new_tokens=L.max_new_tokens,
                         retrieval=knn(k_max, cand // k_max)), timeout=3600))),
        "search": (f"Search, k {k_max} x refine {cand // k_max} (= max_query_candidates)",
                   lambda c: c.ds.Search(pb.SearchRequest(query="The lighthouse of Lisbon", k=k_max,
                                                          refine_factor=cand // k_max), timeout=3600)),
        "lm-score": (f"LM-only Score, {longest:,} tokens, stride 128",
                     lambda c: c.lm.Score(pb.ScoreRequest(text=text_of(tok, L.max_request_tokens), stride=128),
                                          timeout=3600)),
    }


def status_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


def run_case(name: str, model: Path, tokens: Path, passages: Path) -> dict:
    """In this (fresh) process: serve, warm up, reset the peak, send the case, read the peak."""
    state = load_state(str(model), [str(tokens), str(passages)], limits=L)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, auth=Auth(), limits=L)
    c = SiloClient(f"127.0.0.1:{port}", timeout=3600)
    what, send = cases(state.tok)[name]
    c.score("The lighthouse of Lisbon was built", mode="knn", k=8)  # warm-up: every code path loaded
    list(c.generate("The lighthouse", max_new_tokens=2, mode="knn", k=8))
    base = status_kb()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    t0 = time.perf_counter()
    send(c)
    seconds = time.perf_counter() - t0
    peak = status_kb()
    server.stop(0)
    return {"case": name, "what": what, "seconds": round(seconds, 1), "base_rss_mb": base["VmRSS"] / 1024,
            "peak_rss_mb": peak["VmHWM"] / 1024, "growth_mb": (peak["VmHWM"] - base["VmRSS"]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "caps"))
    ap.add_argument("--only", help="comma-separated cases")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (the child)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tokens, passages = build(work)
    if a.case:
        print(json.dumps(run_case(a.case, model, tokens, passages)), flush=True)
        os._exit(0)  # measured: skip the teardown of gRPC's, FAISS's and torch's threads
    from silo.lm import load_causal_lm

    names = a.only.split(",") if a.only else list(cases(load_causal_lm(str(model))[1]))
    print("caps:", ", ".join(f"{k}={v:,}" for k, v in asdict(L).items() if k in (
        "max_k", "max_refine_factor", "max_new_tokens", "max_request_tokens", "max_neighbour_slots",
        "max_query_candidates", "max_forward_tokens", "max_ric_passages")), flush=True)
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--case", name], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['what']:<90} {row['seconds']:>7.1f} s  server {row['base_rss_mb']:>6.0f} MB  "
              f"peak {row['peak_rss_mb']:>6.0f} MB  growth {row['growth_mb']:>6.0f} MB", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
