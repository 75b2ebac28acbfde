"""`silo demo`: the whole pipeline on the embedded default corpus, on this machine.

harvest -> corpus stats -> tokenizer + small LM on the permissive tiers (pd,sw) ->
perplexity on held-out permissive and held-out restricted text. Each finished stage is
kept in the work folder and reused by the next run (`--fresh` starts over), so a demo that
was interrupted continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from silo.corpus import CorpusWriter, corpus_stats, open_corpus
from silo.harvest import iter_harvest

EVAL_TOKENS = 40_000  # per row of the table: enough for a stable perplexity, seconds to score


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _table(rows: list[list], header: list[str]) -> None:
    from silo.cli import _print_table

    _print_table(rows, header)


def harvest_corpus(out: Path, limit_bytes: int) -> None:
    from tqdm import tqdm

    with CorpusWriter(out, overwrite=True) as writer:
        bar = tqdm(desc="harvest", unit="B", unit_scale=True, total=limit_bytes)
        for record in iter_harvest(limit_bytes):
            writer.add(record)
            bar.update(len(record["text"].encode("utf-8", "surrogatepass")))
        bar.close()


def run_demo(workdir: str | Path = "runs/demo", limit_bytes: int = 40 << 20, steps: int | None = None,
             fresh: bool = False) -> dict:
    from silo.evaluate import evaluate_lm
    from silo.lm import load_causal_lm
    from silo.train import TrainArgs, train

    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, model_dir = work / "corpus", work / "lm-pdsw"
    figures: dict = {}
    t_start = time.perf_counter()

    _stage("1. harvest the embedded default corpus (this machine's packages and docs)")
    try:
        open_corpus(corpus)
        print(f"reusing {corpus}")
    except Exception:
        harvest_corpus(corpus, limit_bytes)
    stats = corpus_stats(corpus)
    figures["corpus"] = stats["tier"]
    _table([[t, v["documents"], v["tokens"], v["bytes"]] for t, v in stats["tier"].items()],
           ["tier", "documents", "words", "bytes"])

    _stage("2. tokenizer + small Llama-style LM, trained on tiers pd,sw only")
    if (model_dir / "silo_model.json").is_file() and (model_dir / "model.safetensors").is_file():
        print(f"reusing {model_dir}")
        rec = json.loads((model_dir / "silo_model.json").read_text())
    else:
        rec = train(TrainArgs(corpus=str(corpus), out=str(model_dir), tiers=("pd", "sw"), config="small",
                              steps=steps, max_tokens=20_000_000))
    figures["lm"] = {k: rec[k] for k in ("parameters", "steps", "tokens_seen", "train_seconds",
                                         "train_tokens_per_second", "val_perplexity", "unigram_val_perplexity")}
    print(f"{rec['parameters'] / 1e6:.1f}M parameters, {rec['steps']} steps, {rec['tokens_seen']:,} tokens "
          f"in {rec['train_seconds']:.0f} s; validation ppl {rec['val_perplexity']:.2f} "
          f"(unigram baseline {rec['unigram_val_perplexity']:.2f})")

    _stage("3. perplexity on held-out text (test split)")
    model, tok = load_causal_lm(model_dir)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    figures["perplexity"] = {}
    for name, tiers in (("permissive (pd,sw)", ("pd", "sw")), ("restricted", ("restricted",))):
        try:
            rep = evaluate_lm(model, tok, str(corpus), "test", tiers, window=256, stride=128, batch_size=8,
                              max_tokens=EVAL_TOKENS)
        except Exception as e:  # a tiny harvest may have no test documents of a tier
            print(f"{name}: skipped ({e})")
            continue
        figures["perplexity"][name] = rep["perplexity"]
        rows.append([name, rep["documents"], rep["tokens"], f"{rep['perplexity']:.2f}"])
    _table(rows, ["held-out text", "documents", "tokens", "LM perplexity"])
    print("\nThe LM never saw restricted text: its perplexity there is what the datastore has to close.")
    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "demo.json").write_text(json.dumps(figures, indent=2))
    print(f"\ndemo finished in {figures['seconds']:.0f} s; figures -> {work / 'demo.json'}")
    return figures
