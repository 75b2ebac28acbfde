"""Tables for people: what the CLI and the demo print (the work itself lives elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

MODE_NAMES = {"lm": "LM only", "knn": "kNN-LM", "infgram": "∞-gram", "ric": "RIC-LM", "oracle": "oracle LM"}


def write_section(path: Path, heading: str, lines: list[str]) -> None:
    """Add or replace the section `heading` ("## …") of a markdown file, up to the next
    heading of its level or above (the tools' figures in BENCHMARKS.md)."""
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^#{{1,2}} |\Z)", re.M | re.S)
    new = "\n".join([heading, "", *lines, ""]) + "\n"
    if pattern.search(old):
        text = pattern.sub(lambda _: new, old, count=1)
    else:
        text = (old.rstrip("\n") + "\n\n" if old.strip() else "") + new
    path.write_text(text.rstrip("\n") + "\n")


def print_table(rows: list[list], header: list[str]) -> None:
    """A plain aligned table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def mode_figures(rep: dict, mode: str) -> dict:
    """One mode of a `silo.eval_modes.run_eval` report: perplexity, bits per byte and the gap
    closed (per token where the oracle shares the tokenizer, else per byte; None without one)."""
    return {"perplexity": rep[mode], "bits_per_byte": rep.get("bits_per_byte", {}).get(mode),
            "gap_closed": rep.get(f"gap_closed_{mode}", rep.get(f"gap_closed_bpb_{mode}"))}


def eval_rows(rep: dict, names: dict[str, str] | None = None) -> list[list]:
    """One row per mode of a `run_eval` report (in `MODE_NAMES` order, named by `names` where
    given): tokens, perplexity, bits/byte, gap closed."""
    rows = []
    for m, name in MODE_NAMES.items():
        if m not in rep:
            continue
        f = mode_figures(rep, m)
        rows.append([(names or {}).get(m, name), rep["modes"][m]["tokens"] if m in rep.get("modes", {}) else "",
                     f"{f['perplexity']:.3f}", "" if f["bits_per_byte"] is None else f"{f['bits_per_byte']:.4f}",
                     "" if f["gap_closed"] is None else f"{100 * f['gap_closed']:.1f}%"])
    return rows


EVAL_HEADER = ["mode", "tokens", "perplexity", "bits/byte", "gap closed"]


def print_eval_table(rep: dict) -> None:
    print_table(eval_rows(rep), EVAL_HEADER)
    if rep.get("oracle_tokenizer", "same") != "same":
        print("the oracle has another tokenizer: its perplexity is per its own tokens; the gap is closed in bits/byte")
    else:
        print("gap closed = (ppl_LM - ppl_mode) / (ppl_LM - ppl_oracle)")
    for store, c in rep.get("checks", {}).items():
        print(f"{store}: {c['leaked_eval_docs']} evaluation documents found in the store, "
              f"{c['decontaminated_store_docs']} store documents dropped as near-copies of evaluation text")
