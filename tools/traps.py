"""The copyright-trap experiment at full size (silo.traps), both halves of the promise.

    python tools/traps.py --corpus runs/demo/corpus --work runs/traps --benchmarks BENCHMARKS.md

1. traps (random sentences of the corpus's words: 16, 32 and 64 words, each planted 1, 10 or
   100 times into its own restricted training document, 8 a cell, and as many controls of
   each length planted nowhere) go into a copy of the corpus (WORK/corpus), or the corpus's
   own traps are used if it has some (`silo demo` plants them into its harvest);
2. SILO's LM (tiers pd,sw) and the oracle (every tier) are trained on that corpus with the
   same tokenizer, steps and config;
3. each model scores every trap alone: the trap-detection AUC per cell, loss (mean
   log-probability) and Min-K%++, with bootstrap 95% intervals;
4. a token store and an ∞-gram store over the trap-bearing documents and as much other
   restricted text count, trace and predict the traps; the hosts are opted out (the
   experiment's own ledger, WORK/removals.log); the same is measured again.

Every finished step is kept in WORK and reused. With `--benchmarks FILE`, the section
"## Copyright traps" of FILE is added or replaced with the tables, the date and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo.report import write_section  # noqa: E402
from silo.traps import (  # noqa: E402
    TrapArgs,
    TrapSpec,
    cell_name,
    print_datastore,
    print_detection,
    run_trap_experiment,
)

SECTION = "## Copyright traps"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def markdown(rep: dict, a: argparse.Namespace, seconds: float) -> list[str]:
    """The section's lines: the detection table, then the datastore half."""
    import torch

    names = list(rep["weights"])
    lines = [f"Written by `python tools/traps.py` on {time.strftime('%Y-%m-%d')}, {platform.machine()} "
             f"{os.cpu_count()} cores, torch {torch.__version__}, in {seconds:.0f} s: {rep['planted']} traps planted "
             f"in the restricted tier of `{a.corpus}` ({rep['controls']} controls planted nowhere), SILO's LM "
             f"(pd,sw) and the oracle (all tiers) trained on it ({a.config} config, {a.steps} steps each). AUC: a "
             "planted trap scores higher than a control of its length (0.5: the weights cannot tell).", "",
             "| trap cell | traps/controls | " + " | ".join(f"{n} AUC loss (95% CI) | {n} AUC Min-K%++" for n in names)
             + " |", "|" + "---|" * (2 + 2 * len(names))]
    for i, cell in enumerate(rep["weights"][names[0]]):
        row = [cell_name(cell), f"{cell['traps']}/{cell['controls']}"]
        for n in names:
            c = rep["weights"][n][i]
            row += [f"{c['loss']['auc']:.2f} ({c['loss']['ci95'][0]:.2f}–{c['loss']['ci95'][1]:.2f})",
                    f"{c['min_k_pp']['auc']:.2f} ({c['min_k_pp']['ci95'][0]:.2f}–{c['min_k_pp']['ci95'][1]:.2f})"]
        lines.append("| " + " | ".join(row) + " |")
    d = rep["datastore"]
    if d.get("traps_in_store"):
        lines += ["", f"The datastore half: {d['traps_in_store']} of the traps have their host in the stores "
                  f"(the trap-bearing documents and as much other restricted text); kNN-LM at the store's defaults "
                  f"(k={d['knn']['k']}, λ={d['knn']['lambda']}, T={d['knn']['temperature']}); then their "
                  f"{d['hosts_removed']} host documents are opted out.", "",
                  "| | traps with ∞-gram count > 0 | total ∞-gram count | traced to their host | LM ppl | kNN-LM ppl "
                  "| kNN/LM on traps | kNN/LM on controls |", "|---|---|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            m = d[when]
            lines.append(f"| {when} opt-out | {sum(c > 0 for c in m['infgram_counts'])} | {sum(m['infgram_counts'])} "
                         f"| {m['traced_in_hosts']} | {m['lm_perplexity']:.1f} | {m['knn_perplexity']:.1f} | "
                         f"{m['knn_perplexity'] / m['lm_perplexity']:.2f} | "
                         f"{m['controls_knn_perplexity'] / m['controls_lm_perplexity']:.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="a corpus with a restricted tier (traps planted into a copy)")
    p.add_argument("--work", default="runs/traps")
    p.add_argument("--lengths", default="16,32,64", help="trap lengths in words")
    p.add_argument("--repeats", default="1,10,100", help="how often each trap of a cell is planted")
    p.add_argument("--per-cell", type=int, default=8, help="traps per (length, repeats) cell")
    p.add_argument("--config", default="tiny", help="the LMs' named size (silo.lm.CONFIGS)")
    p.add_argument("--steps", type=int, default=600, help="training steps of each LM")
    p.add_argument("--filler-words", type=int, help="other restricted text in the stores beside the trap-bearing "
                   "documents (default: as many words as they hold)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmarks", metavar="FILE", help="add or replace the section in this markdown file")
    a = p.parse_args()
    t0 = time.perf_counter()
    spec = TrapSpec(_ints(a.lengths), _ints(a.repeats), a.per_cell, a.seed).check()
    rep = run_trap_experiment(TrapArgs(corpus=a.corpus, work=a.work, spec=spec, config=a.config, steps=a.steps,
                                       filler_words=a.filler_words))
    seconds = time.perf_counter() - t0
    print("\ntrap detection from the weights (AUC; 0.5: cannot tell planted traps from controls)")
    print_detection(rep["weights"])
    print("\nthe datastore, before and after the hosts' opt-out")
    print_datastore(rep["datastore"])
    print(f"\n{seconds:.0f} s; report -> {Path(a.work) / 'traps-report.json'}")
    if a.benchmarks:
        write_section(Path(a.benchmarks), SECTION, markdown(rep, a, seconds))
        print(f"-> {a.benchmarks}")


if __name__ == "__main__":
    main()
