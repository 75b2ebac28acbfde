"""tools/bench.py rewrites BENCHMARKS.md's table: rows of benchmarks it did not run stay, and
so do the sections other tools wrote after the table (tools/lmeval_modes.py's lm-eval
results)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("silo_tools_bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewriting_the_table_keeps_other_benchmarks_rows_and_other_sections(tmp_path):
    bench = _bench()
    names = list(bench.BENCHMARKS)
    ran, kept = names[0], names[1]
    path = tmp_path / "BENCHMARKS.md"
    row = {"bench": ran, "figure": "f", "value": "1.0x", "against": "a", "detail": "d"}
    bench.write_markdown([row, {**row, "bench": kept, "value": "2.0x"}], path, "machine-a", [ran, kept])
    section = "## lm-eval-harness (silo_cloze)\n\nwritten by another tool\n\n| mode | acc |\n|---|---|\n| knn | 0.5 |\n"
    path.write_text(path.read_text() + "\n" + section)

    bench.write_markdown([{**row, "value": "3.0x"}], path, "machine-b", [ran])
    text = path.read_text()
    assert "| 3.0x |" in text and "| 1.0x |" not in text  # this run's row replaces the old one
    assert "| 2.0x |" in text  # the benchmark not run keeps its row
    assert text.endswith(section)  # the other tool's section is still there, once, after the table
    assert text.count("## lm-eval-harness") == 1
    assert text.index("| 3.0x |") < text.index("## lm-eval-harness")
