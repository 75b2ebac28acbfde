"""lm-evaluation-harness against a live `silo serve`, in LM-only, kNN-LM and ∞-gram modes.

    python tools/lmeval_modes.py --model runs/demo/lm-pdsw --store runs/demo/store-token \\
        --store runs/demo/store-infgram --corpus runs/demo/corpus --limit 100 --benchmarks BENCHMARKS.md

1. the task `silo_cloze` is written from the corpus's held-out documents
   (`silo.lmeval_task.write_cloze_task`, into WORK/task);
2. `python -m silo serve --port 0 --http-port 0` starts on the model and the stores and
   says its ports in ready files (its log: WORK/server.log);
3. `lm_eval` (the harness's own command, `local-completions` on `/v1/completions`, the
   server's tokenizer) runs the task once per mode, model ids `MODEL:none`, `MODEL:knn`,
   `MODEL:infgram`, offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); its results and logged
   samples are under WORK/MODE;
4. a table: mode, acc, acc_norm, items, seconds; with `--benchmarks FILE`, the section
   "## lm-eval-harness (silo_cloze)" of FILE is added or replaced with it, the date and the
   machine.

The server is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo.lmeval_task import (  # noqa: E402
    OFFLINE_ENV,
    TASK,
    lm_eval_args,
    model_context,
    read_results,
    write_cloze_task,
)
from silo.report import print_table, write_section  # noqa: E402

SECTION = f"## lm-eval-harness ({TASK})"
HEADER = ["mode", "acc", "acc_norm", "items", "seconds"]


def start_server(model: str, stores: list[str], work: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`silo serve` with the HTTP API on free ports; (process, HTTP base URL) once it serves."""
    ready, http_ready = work / "grpc.port", work / "http.port"
    for f in (ready, http_ready):
        f.unlink(missing_ok=True)
    # absolute paths: the server runs in the repository's folder, not the caller's
    model, stores = str(Path(model).resolve()), [str(Path(s).resolve()) for s in stores]
    cmd = [sys.executable, "-m", "silo", "--quiet", "serve", "--model", model, "--port", "0", "--host", "127.0.0.1",
           "--ready-file", str(ready), "--http-port", "0", "--http-ready-file", str(http_ready)]
    for s in stores:
        cmd += ["--store", s]
    log = open(work / "server.log", "w")  # noqa: SIM115 - the server writes to it until it is stopped
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not (ready.is_file() and ready.read_text().strip() and http_ready.is_file()
               and http_ready.read_text().strip()):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            tail = (work / "server.log").read_text()[-3000:]
            raise SystemExit(f"silo serve did not start (exit {server.returncode}); its log ends:\n{tail}")
        time.sleep(0.2)
    return server, f"http://127.0.0.1:{http_ready.read_text().strip()}"


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_mode(task_dir: str, model: str, mode: str, url: str, work: Path, limit: int | None,
             max_length: int | None) -> dict:
    """One `lm_eval` run; its acc, acc_norm, items and wall time."""
    out = work / mode
    args = lm_eval_args(task_dir, Path(model).resolve().name, mode, url, max_length=max_length, limit=limit,
                        output_path=out, log_samples=True)
    log = work / f"lm_eval-{mode}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "lm_eval", *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **OFFLINE_ENV}).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"lm_eval failed in mode {mode} (exit {rc}); its log ends:\n{log.read_text()[-3000:]}")
    metrics, samples = read_results(out)
    return {"mode": mode, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
            "acc_stderr": metrics.get("acc_stderr,none"), "items": len(samples), "seconds": seconds}


def machine() -> str:
    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "?"

    return f"{platform.machine()} {os.cpu_count()} cores, torch {v('torch')}, lm-eval {v('lm_eval')}"


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["mode"], f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}", r["items"], f"{r['seconds']:.0f}"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model folder to serve")
    p.add_argument("--store", action="append", required=True, help="a token and an ∞-gram store (repeat)")
    p.add_argument("--corpus", required=True, help="the corpus the task's held-out documents come from")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--tiers", default="restricted", help="comma list of the documents' tiers (default restricted)")
    p.add_argument("-n", type=int, default=200, help="items in the task (at most)")
    p.add_argument("--limit", type=int, help="items the harness runs per mode (default: all)")
    p.add_argument("--modes", default="none,knn,infgram")
    p.add_argument("--work", default="runs/lmeval")
    p.add_argument("--benchmarks", metavar="FILE", help="add or replace the section in this markdown file")
    a = p.parse_args()
    # a SIGTERM runs the `finally` below like Ctrl-C does: the server is never left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tiers = tuple(t for t in a.tiers.split(",") if t)
    task = write_cloze_task(a.corpus, work / "task", split=a.split, tiers=tiers, n=a.n, overwrite=True)
    print(f"{TASK}: {task['items']} items from the {a.split} split ({', '.join(tiers)}) -> {task['include_path']}",
          flush=True)
    context = model_context(a.model)
    server, url = start_server(a.model, a.store, work)
    rows = []
    try:
        print(f"silo serve: {url}", flush=True)
        for mode in [m for m in a.modes.split(",") if m]:
            rows.append(run_mode(task["include_path"], a.model, mode, url, work, a.limit,
                                 context - 1 if context else None))
            print(f"{mode}: acc {rows[-1]['acc']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    finally:
        stop_server(server)
    print_table(table_rows(rows), HEADER)
    if a.benchmarks:
        about = (f"Written by `python tools/lmeval_modes.py` on {time.strftime('%Y-%m-%d')}, {machine()}: "
                 f"lm-evaluation-harness (`local-completions`, the server's tokenizer) on `{TASK}`, a {task['choices']}-"
                 f"way cloze task from the {a.split} split ({', '.join(tiers)}) of `{a.corpus}` ({task['items']} items"
                 f"{f', the first {a.limit} run' if a.limit else ''}), model `{Path(a.model).name}` served by "
                 f"`silo serve --http-port` with {', '.join(Path(s).name for s in a.store)}; seconds are each "
                 "run's wall time, harness start-up included.")
        write_section(Path(a.benchmarks), SECTION, [
            about, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in table_rows(rows))])
        print(f"-> {a.benchmarks}")


if __name__ == "__main__":
    main()
