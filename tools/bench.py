"""SILO's benchmark suite: every speed/memory figure, measured side by side, into BENCHMARKS.md.

    python tools/bench.py                    # all benchmarks (model/corpus from `silo demo`)
    python tools/bench.py --only knn,recall  # some of them
    python tools/bench.py --entries 1000000 --model runs/demo/lm-pdsw --corpus runs/demo/corpus

Machines here are shared and noisy, so every figure is a *ratio measured in one run*
(the thing and its baseline alternately, best of `--repeat`), and each row says what it is
measured against. The table in BENCHMARKS.md is rewritten, with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datastore.build import BuildArgs, build_token_store  # noqa: E402
from datastore.store import Datastore  # noqa: E402
from silo.evaluate import load_eval_docs, score_documents  # noqa: E402
from silo.knnlm import KNNParams, retrieve_neighbours  # noqa: E402
from silo.lm import load_causal_lm  # noqa: E402

BENCHMARKS: dict[str, Callable] = {}


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class Context:
    """Shared, lazily built artefacts: the model and a ≥1M-entry IVF-PQ token store."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_causal_lm(self.args.model)
        return self._model

    def store(self, kind: str = "ivf") -> Path:
        """Token store over the restricted tier with `--entries` entries (built once, reused)."""
        path = self.work / f"store-{kind}-{self.args.entries}"
        if not (path / "manifest.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            t = time.perf_counter()
            build_token_store(BuildArgs(
                model=self.args.model, corpus=self.args.corpus, out=str(path), tiers=("restricted",),
                shards=2, max_tokens=self.args.entries, window=256, stride=128, batch_size=16,
                memory_budget=self.args.memory_budget if kind == "ivf" else 1 << 40,
                factory=None if kind == "ivf" else "Flat", keep_keys=kind == "ivf"))
            print(f"built {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
        return path

    def eval_docs(self, tokens: int):
        _, tok = self.model
        return load_eval_docs(self.args.corpus, tok, "test", ("restricted",), max_tokens=tokens)[1]


@benchmark("knn")
def bench_knn_vs_lm(ctx: Context) -> list[dict]:
    """kNN-LM scoring throughput as a ratio to LM-only scoring: same model, same tokens."""
    model, tok = ctx.model
    store = Datastore.open(ctx.store("ivf"))
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    n = sum(len(d) - 1 for d in docs)
    p = KNNParams(k=ctx.args.k, nprobe=ctx.args.nprobe)
    kw = dict(window=256, stride=128, batch_size=16, pad_id=tok.pad_token_id or 0)
    t_lm = best_of(ctx.args.repeat, lambda: score_documents(model, docs, **kw))
    t_knn = best_of(ctx.args.repeat, lambda: retrieve_neighbours(model, store, docs, p.k, nprobe=p.nprobe, **kw))
    return [
        {"figure": "kNN-LM scoring slowdown vs LM-only", "value": f"{t_knn / t_lm:.2f}x",
         "against": f"LM-only scoring of the same {n:,} tokens (aim ≤ 2x; CPU kNN-LM ~20x, efficient kNN-LM ~2.8x)",
         "detail": f"store {store.n_entries:,} entries {store.manifest.build['factory']}, k={p.k}, nprobe={p.nprobe}; "
                   f"LM {n / t_lm:,.0f} tok/s, kNN-LM {n / t_knn:,.0f} tok/s"},
    ]


@benchmark("recall")
def bench_recall(ctx: Context) -> list[dict]:
    """Recall@k of the chosen IVF-PQ configuration against exact search, and queries/s."""
    store = Datastore.open(ctx.store("ivf"))
    keys = np.concatenate([np.load(s.path / "keys.npy", mmap_mode="r") for s in store.shards]).astype(np.float32)
    rng = np.random.default_rng(0)
    q = keys[rng.choice(len(keys), ctx.args.queries, replace=False)] + rng.normal(0, 0.01, (ctx.args.queries, keys.shape[1])).astype(np.float32)
    import faiss

    exact = faiss.IndexFlatL2(keys.shape[1])
    exact.add(keys)
    k = ctx.args.k
    t_exact = best_of(1, lambda: exact.search(q, k))
    _, ie = exact.search(q, k)
    rows = []
    for nprobe in (1, 8, 32, 128):
        t = best_of(ctx.args.repeat, lambda nprobe=nprobe: store.search(q, k, nprobe=nprobe))
        _, ia = store.search(q, k, nprobe=nprobe)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ie, ia, strict=True)])
        rows.append({"figure": f"recall@{k} IVF-PQ, nprobe {nprobe}", "value": f"{recall:.3f}",
                     "against": f"exact Flat search over the same {len(keys):,} fp16 keys",
                     "detail": f"{len(q) / t:,.0f} q/s vs exact {len(q) / t_exact:,.0f} q/s "
                               f"({t_exact / t:.1f}x faster); {store.manifest.build['factory']}"})
    return rows


@benchmark("bytes")
def bench_bytes(ctx: Context) -> list[dict]:
    """Store bytes per entry (index + metadata) vs the FAISS code size + 8-byte id."""
    import faiss

    path = ctx.store("ivf")
    store = Datastore.open(path)
    n = store.n_entries
    index_b = sum((s.path / "index.faiss").stat().st_size for s in store.shards)
    entries_b = sum((s.path / "entries.parquet").stat().st_size for s in store.shards)
    keys_b = sum((s.path / "keys.npy").stat().st_size for s in store.shards)
    docs_b = (path / "docs.parquet").stat().st_size
    ivf = faiss.extract_index_ivf(store.shards[0].index)
    code = ivf.code_size
    return [{"figure": "store bytes per entry (index + entry metadata)", "value": f"{(index_b + entries_b) / n:.1f} B",
             "against": f"FAISS code {code} B + id 8 B = {code + 8} B (SILO: 72 B + 4 KB raw keys)",
             "detail": f"index {index_b / n:.1f} B, entries.parquet {entries_b / n:.1f} B, docs+text "
                       f"{docs_b / n:.1f} B, optional fp16 keys {keys_b / n:.0f} B per entry; {n:,} entries"}]


@benchmark("build")
def bench_build(ctx: Context) -> list[dict]:
    """Build throughput (tokens/s) as a ratio to the LM's plain forward throughput."""
    model, tok = ctx.model
    docs = ctx.eval_docs(ctx.args.build_tokens)
    n = sum(len(d) - 1 for d in docs)
    out = ctx.work / "build-bench"

    def forward():
        score_documents(model, docs, window=256, stride=128, batch_size=16, pad_id=tok.pad_token_id or 0)

    def build():
        shutil.rmtree(out, ignore_errors=True)
        build_token_store(BuildArgs(model=ctx.args.model, corpus=ctx.args.corpus, out=str(out), tiers=("restricted",),
                                    split="test", max_tokens=ctx.args.build_tokens, window=256, stride=128,
                                    batch_size=16, factory="Flat", progress=False))

    t_fwd = best_of(ctx.args.repeat, forward)
    t_build = best_of(ctx.args.repeat, build)
    entries = Datastore.open(out, load_index=False).n_entries
    return [{"figure": "token-store build throughput vs plain forward", "value": f"{t_fwd / t_build * entries / n:.2f}x",
             "against": "the LM's forward pass over the same text (the physical floor; 1.00x = no overhead)",
             "detail": f"build {entries / t_build:,.0f} entries/s (tokenize, keys, index, write), "
                       f"forward {n / t_fwd:,.0f} tok/s"}]


def write_markdown(rows: list[dict], path: Path, machine: str) -> None:
    date = time.strftime("%Y-%m-%d")
    old = path.read_text() if path.exists() else ""
    keep = []  # rows of benchmarks not run this time stay as they were
    names = {r["figure"] for r in rows}
    for line in old.splitlines():
        if line.startswith("| ") and not line.startswith("| figure") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] not in names:
                keep.append(line)
    lines = ["# Benchmarks", "", "Written by `python tools/bench.py`; every value is a ratio or rate measured "
             "side by side in one run (best of N), on the machine named in its row.", "",
             "| figure | value | measured against | detail | date | machine |", "|---|---|---|---|---|---|", *keep]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['value']} | {r['against']} | {r['detail']} | {date} | {machine} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--model", default="runs/demo/lm-pdsw")
    p.add_argument("--corpus", default="runs/demo/corpus")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--memory-budget", type=int, default=48_000_000, help="index budget for the IVF-PQ store")
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--build-tokens", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    for path in (args.model, args.corpus):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: run `silo demo` first, or pass --model/--corpus")
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    ctx = Context(args)
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    rows = []
    for name in names:
        print(f"== {name}: {BENCHMARKS[name].__doc__.strip().splitlines()[0]}", flush=True)
        for r in BENCHMARKS[name](ctx):
            print(json.dumps(r, ensure_ascii=False), flush=True)
            rows.append(r)
    write_markdown(rows, Path(args.out), machine)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
