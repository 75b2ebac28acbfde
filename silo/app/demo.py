"""`silo demo`: the whole pipeline on the embedded default corpus, on this machine.

 1. harvest this machine's license-labelled text        -> corpus (parquet, tiers)
 2. tokenizer + small LM on the permissive tiers (pd,sw) -> the parametric model
 3. LM perplexity on held-out permissive vs restricted text
 4. datastores from the restricted tier (train split): a token store (kNN-LM), an ∞-gram
    store, and passage stores with BM25 and with MiniLM (RIC-LM)
 5. an oracle LM trained on all tiers (for the gap only; never served)
 6. λ, k, T and the ∞-gram λ tuned on validation; the SILO table on held-out restricted text
 7. the datastore scaling curve (plot)
 8. a gRPC server: kNN-LM generation with sources and a verbatim trace of its output,
    an opt-out, the document gone, a compaction
 9. copyright traps (planted into the harvest's restricted tier at step 1): the oracle's
    weights detect the frequent ones, SILO's LM's cannot; stores of their documents serve
    them until the owners opt out, then nothing of them (silo.traps)

Each finished stage is kept in the work folder and reused by the next run (`--fresh`
starts over), so an interrupted demo continues where it stopped.

Two sizes: the default shows the whole story in about a quarter of an hour on 2 CPU cores
(a smaller harvest, a shorter LM run, smaller stores, fewer held-out tokens); `--full` is
the hour-long run whose figures the README quotes. Each size has its own work folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from silo.build import BuildArgs, build_store
from silo.corpus import corpus_stats, open_corpus
from silo.datastore.errors import StoreError
from silo.datastore.kinds import open_store
from silo.datastore.manifest import Manifest
from silo.errors import SiloError
from silo.eval_modes import EvalArgs, run_eval
from silo.evaluate import evaluate_lm
from silo.harvest import harvest_corpus
from silo.leakage import summary_line
from silo.lm import load_causal_lm
from silo.provenance import TrainingRecord
from silo.report import EVAL_HEADER, MODE_NAMES, eval_rows, mode_figures, print_table
from silo.scaling import CurveArgs, scaling_curve
from silo.server.app import build_server, load_state, new_token
from silo.server.auth import Auth
from silo.server.client import SiloClient
from silo.server.servicers import DatastoreServicer, LanguageModelServicer
from silo.train import TrainArgs, train
from silo.traps import (
    Trap,
    TrapSpec,
    build_trap_stores,
    datastore_side,
    load_traps,
    make_traps,
    plant_traps,
    print_datastore,
    print_detection,
    trap_vocabulary,
    weights_side,
)


@dataclass(frozen=True)
class DemoSize:
    """How much of everything a demo run uses."""

    name: str
    limit_bytes: int  # harvested text
    lm_steps: int | None  # training steps of the LM and the oracle (None: the small config's own)
    store_tokens: int  # restricted training text put in the datastores
    eval_tokens: int  # held-out tokens per row of the SILO table
    curve_fractions: tuple[float, ...]
    curve_seeds: int
    workdir: str
    lm_config: str = "small"  # the LM's (and the oracle's) named size (silo.lm.CONFIGS)
    traps: TrapSpec = TrapSpec()  # copyright traps planted into the harvest (step 9)


# the quick run trains the tiny config (seconds per hundred steps on 2 cores) for longer,
# where the small config at a few dozen steps would have learnt less in more time
QUICK = DemoSize("quick", 12 << 20, 600, 300_000, 6_000, (0.1, 0.3, 1.0), 1, "runs/demo", lm_config="tiny",
                 traps=TrapSpec(per_cell=4))
FULL = DemoSize("full", 40 << 20, None, 1_500_000, 30_000, (0.03, 0.1, 0.3, 1.0), 3, "runs/demo-full")


_T0 = [time.perf_counter()]


def _stage(title: str) -> None:
    elapsed = time.perf_counter() - _T0[0]
    print(f"\n=== {title} ===  [{int(elapsed // 60)}m{int(elapsed % 60):02d}s]", flush=True)


def _train(corpus: Path, out: Path, steps: int | None, config: str, **kw) -> dict:
    """The demo's LM (or oracle), reused when finished."""
    if (out / "silo_model.json").is_file() and (out / "model.safetensors").is_file():
        print(f"reusing {out}")
        return json.loads((out / "silo_model.json").read_text())
    return train(TrainArgs(corpus=str(corpus), out=str(out), config=config, steps=steps, max_tokens=20_000_000, **kw))


def _lm_line(rec: dict) -> str:
    return (f"{rec['parameters'] / 1e6:.1f}M parameters, {rec['steps']} steps, {rec['tokens_seen']:,} tokens in "
            f"{rec['train_seconds']:.0f} s; validation ppl {rec['val_perplexity']:.2f} "
            f"(unigram baseline {rec['unigram_val_perplexity']:.2f})")


def _store(out: Path, store_tokens: int, **kw) -> Path:
    """A demo store, reused when finished; any unfinished or older one is built again."""
    if (out / "manifest.json").is_file():
        try:
            open_store(out, load_index=False, with_text=False).close()
            print(f"reusing {out}")
            return out
        except StoreError as e:  # a store of an older format: built again
            print(f"rebuilding {out} ({e})")
    shutil.rmtree(out, ignore_errors=True)
    build_store(BuildArgs(out=str(out), tiers=("restricted",), max_tokens=store_tokens, **kw))
    return out


def run_demo(size: DemoSize = QUICK, workdir: str | Path | None = None, limit_bytes: int | None = None,
             steps: int | None = None, fresh: bool = False) -> dict:
    """Run every stage (see the module docstring); `limit_bytes` and `steps` override the size's."""
    work = Path(workdir or size.workdir)
    limit_bytes = limit_bytes or size.limit_bytes
    steps = steps or size.lm_steps
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, model_dir, oracle_dir = work / "corpus", work / "lm-pdsw", work / "oracle-all-tiers"
    figures: dict = {"size": asdict(size)}
    t_start = _T0[0] = time.perf_counter()
    print(f"SILO demo ({size.name}: {limit_bytes >> 20} MB harvested, {size.store_tokens:,} datastore tokens, "
          f"{size.eval_tokens:,} held-out tokens per row) in {work}", flush=True)

    _stage("1. harvest the embedded default corpus (this machine's packages and docs)")
    try:
        open_corpus(corpus)
        print(f"reusing {corpus}")
    except SiloError:
        harvest_corpus(corpus, limit_bytes, overwrite=True)
    traps = _planted_traps(corpus, size.traps)
    hosts = tuple(sorted(t.host for t in traps if t.host))
    stats = corpus_stats(corpus)
    figures["corpus"] = stats["tier"]
    print_table([[t, v["documents"], v["tokens"], v["bytes"]] for t, v in stats["tier"].items()],
                ["tier", "documents", "words", "bytes"])

    _stage(f"2. tokenizer + {size.lm_config} Llama-style LM, trained on tiers pd,sw only")
    rec = _train(corpus, model_dir, steps, size.lm_config, tiers=("pd", "sw"))
    figures["lm"] = {k: rec[k] for k in ("parameters", "steps", "tokens_seen", "train_seconds",
                                         "train_tokens_per_second", "val_perplexity", "unigram_val_perplexity")}
    print(_lm_line(rec))
    record = TrainingRecord.open(model_dir)
    if record is not None:  # the weights' side: what was cut before training, and what was trained on
        leakage = record.record.get("leakage", {})
        figures["training_record"] = {"documents": record.record["documents"], "tokens": record.record["tokens"],
                                      "leakage": {k: leakage.get(k) for k in ("documents_with_copies", "words_cut")}}
        if "documents_scanned" in leakage:
            print(summary_line(leakage))
        print(f"training record: {record.record['documents']:,} documents, {record.record['tokens']:,} tokens, "
              f"membership filter {record.record['membership']['bytes_per_token']} bytes/token "
              f"(`silo lm card {model_dir}`)")

    _stage("3. LM perplexity on held-out text (test split)")
    model, tok = load_causal_lm(model_dir)
    rows = []
    figures["perplexity"] = {}
    for name, tiers in (("permissive (pd,sw)", ("pd", "sw")), ("restricted", ("restricted",))):
        try:
            rep = evaluate_lm(model, tok, str(corpus), "test", tiers, window=256, stride=128, batch_size=8,
                              max_tokens=size.eval_tokens)
        except SiloError as e:  # a tiny harvest may have no test documents of a tier
            print(f"{name}: skipped ({e})")
            continue
        figures["perplexity"][name] = rep["perplexity"]
        rows.append([name, rep["documents"], rep["tokens"], f"{rep['perplexity']:.2f}"])
    print_table(rows, ["held-out text", "documents", "tokens", "LM perplexity"])
    print("The LM never saw restricted text: its perplexity there is what the datastore has to close.")

    _stage("4. datastores over the restricted tier (train split): token, ∞-gram, passages (BM25, MiniLM)")
    # the trap-bearing documents get stores of their own at step 9 (their opt-out is the
    # experiment's), so these stores, served and opted out of at step 8, hold none of them
    common = dict(model=str(model_dir), corpus=str(corpus), store_tokens=size.store_tokens, exclude_doc_ids=hosts)
    token_store = _store(work / "store-token", **common, kind="token", shards=2, window=256, stride=128,
                         batch_size=16, keep_keys=True)
    infgram_store = _store(work / "store-infgram", **common, kind="infgram", shards=2)
    bm25_store = _store(work / "store-passage", **common, kind="passage", passage_tokens=128)
    minilm_store = _store(work / "store-minilm", **common, kind="passage", passage_tokens=128, retrievers=("dense",),
                          embedder="minilm", batch_size=32)
    stores_info = {}
    for path in (token_store, infgram_store, bm25_store, minilm_store):
        st = open_store(path, load_index=False, with_text=False)
        stores_info[path.name] = {"kind": st.manifest.kind, "entries": st.n_entries, "documents": st.n_documents,
                                  "shards": len(st.shards), "index": st.manifest.index,
                                  "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
        st.close()
    figures["stores"] = stores_info
    print_table([[n, v["kind"], v["index"], v["entries"], v["documents"], v["shards"], v["bytes"]]
                 for n, v in stores_info.items()], ["store", "kind", "index", "entries", "documents", "shards", "bytes"])

    _stage("5. oracle LM on all tiers (evaluation only: it shows what the restricted text is worth)")
    orec = _train(corpus, oracle_dir, steps, size.lm_config, tiers=("pd", "sw", "by", "restricted"),
                  allow_restricted=True,
                  tokenizer=str(model_dir))
    print(_lm_line(orec))

    _stage("6. LM / kNN-LM / ∞-gram / RIC-LM vs the oracle on held-out restricted text")
    needs_tuning = not all(Manifest.load(p).defaults for p in (token_store, infgram_store))
    ev = dict(model=str(model_dir), corpus=str(corpus), tiers=("restricted",), window=256, stride=128,
              max_tokens=size.eval_tokens, progress=True, oracle=str(oracle_dir))
    rep = run_eval(EvalArgs(stores=(str(token_store), str(infgram_store), str(bm25_store)),
                            modes=("lm", "knn", "infgram", "ric"), ric_stride=64, sweep=needs_tuning,
                            save_defaults=needs_tuning, **ev))
    minilm = run_eval(EvalArgs(stores=(str(minilm_store),), modes=("lm", "ric"), ric_retriever="dense",
                               ric_stride=64, **ev))
    (work / "eval.json").write_text(json.dumps({"main": rep, "ric_minilm": minilm}, indent=2))
    if "sweeps" in rep:
        s = rep["sweeps"]
        print(f"tuned on validation: kNN-LM k={s['knn']['k']} λ={s['knn']['lambda']} T={s['knn']['temperature']}; "
              f"∞-gram λ={s['infgram']['lambda']:.2f} (by suffix length: {s['infgram']['lambda_by_suffix']})")
    bm25_name, minilm_name = "RIC-LM (BM25)", "RIC-LM (MiniLM)"
    rows = eval_rows(rep, {"ric": bm25_name})
    rows[-1:-1] = [r for r in eval_rows(minilm, {"ric": minilm_name}) if r[0] == minilm_name]  # before the oracle
    print_table(rows, EVAL_HEADER)
    print("gap closed = (ppl_LM - ppl_mode) / (ppl_LM - ppl_oracle); bits/byte compare any tokenizer")
    figures["silo_table"] = {**{MODE_NAMES[m]: mode_figures(rep, m) for m in ("lm", "knn", "infgram", "oracle")},
                             bm25_name: mode_figures(rep, "ric"), minilm_name: mode_figures(minilm, "ric")}
    figures["checks"] = rep["checks"]

    _stage("7. datastore scaling curve (one retrieval, nested subsamples)")
    curve = work / "scaling"
    if not (curve / "scaling.png").is_file():
        # the table's tokens, k and T; λ tuned per store size on validation: the full store's
        # point is the table's kNN-LM row
        rows = scaling_curve(CurveArgs(model=str(model_dir), store=str(token_store), corpus=str(corpus),
                                       out=str(curve), fractions=size.curve_fractions, seeds=size.curve_seeds,
                                       depth=2048, window=256, stride=128, max_tokens=size.eval_tokens,
                                       oracle=str(oracle_dir), passage_store=str(bm25_store)))
        print_table([[r["mode"], r["fraction"], r["tokens"], f"{r['perplexity']:.2f}", r.get("lambda", ""),
                      r["k_satisfied"]] for r in rows if r["seed"] == 0],
                    ["mode", "fraction", "store tokens", "perplexity", "λ", "k satisfied"])
        print("(the table's tokens, k and T; λ tuned per store size on validation, 0 — no store — among the "
              "choices; k satisfied < 1: fewer than k of the 2,048 retrieved survive the subsample)")
    print(f"plot: {curve / 'scaling.png'}  (data: {curve / 'scaling.csv'})")

    _stage("8. serving: kNN-LM generation with sources and a verbatim trace, then an opt-out")
    figures["serving"] = serve_and_opt_out(model_dir, token_store, infgram_store, work)

    _stage("9. copyright traps: the owners' canaries, in the weights and in the datastore")
    figures["traps"] = trap_experiment(traps, model_dir, oracle_dir, corpus, work / "traps")

    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "demo.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"\ndemo finished in {figures['seconds']:.0f} s; figures -> {work / 'demo.json'}")
    return figures


def _planted_traps(corpus: Path, spec: TrapSpec) -> list[Trap]:
    """The traps of the corpus, planted now if it has none; whatever else the work folder
    holds was made from the corpus before them, and goes."""
    traps = load_traps(corpus)
    if traps is None:
        traps = plant_traps(corpus, make_traps(spec, trap_vocabulary(corpus)), seed=spec.seed)
        for stale in corpus.parent.iterdir():
            if stale != corpus:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    planted = [t for t in traps if t.planted]
    lengths = sorted({t.words for t in planted})
    repeats = sorted({t.repeats for t in planted})
    print(f"copyright traps: {len(planted)} random sentences of {'/'.join(map(str, lengths))} words, each planted "
          f"{'/'.join(map(str, repeats))} times into its own restricted training document; "
          f"{len(traps) - len(planted)} controls planted nowhere ({corpus / 'traps.json'}; checked at step 9)")
    return traps


def trap_experiment(traps: list[Trap], model_dir: Path, oracle_dir: Path, corpus: Path, out: Path) -> dict:
    """Step 9 (silo.traps): trap detection from both models' weights; the datastore half on
    stores of the trap-bearing documents (and as much other restricted text), whose hosts are
    opted out. Reused when finished."""
    report = out / "traps-report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        print(f"reusing {report}")
    else:
        shutil.rmtree(out, ignore_errors=True)  # an unfinished run may have removed hosts already
        rep = {"weights": weights_side({"SILO LM": model_dir, "oracle": oracle_dir}, traps)}
        stores = build_trap_stores(model_dir, corpus, traps, out, progress=True)
        rep["datastore"] = datastore_side(model_dir, stores["token"], stores["infgram"], traps,
                                          reason="demo: the trap owners opted out")
        report.write_text(json.dumps(rep, indent=2))
    print("Can the weights tell a planted trap from a control never planted? (AUC; 0.5: they cannot)")
    print_detection(rep["weights"])
    print("SILO's LM never trained on restricted text: its AUC is 0.5 up to noise. The oracle, trained on it, "
          "detects the traps it saw often.")
    print(f"\nThe datastore: {rep['datastore'].get('traps_in_store', 0)} traps in stores of their documents and "
          "as much other restricted text; their owners opt out:")
    print_datastore(rep["datastore"])
    print("After the opt-out the ∞-gram store counts none of them, Trace finds none, and kNN-LM predicts them as "
          "it does text no store ever held (the controls).")
    return rep


def serve_and_opt_out(model_dir: Path, token_store: Path, infgram_store: Path, work: Path) -> dict:
    """Start a real gRPC server on loopback, use it as a client would, stop it."""
    served = []
    for store in (token_store, infgram_store):  # the demo removes a document: do it on copies
        copy = work / f"{store.name}-served"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy)
        served.append(str(copy))
    token = new_token()
    auth = Auth(admin_token=token)
    state = load_state(str(model_dir), served, auth=auth)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, auth=auth)
    out: dict = {"port": port}
    try:
        client = SiloClient(f"127.0.0.1:{port}", token=token)
        prompt = _demo_prompt(state.stores["token"])
        print(f"server on 127.0.0.1:{port}; prompt (from a restricted document in the store): {prompt!r}")
        events = list(client.generate(prompt, max_new_tokens=16, mode="knn", temperature=0.0, trace=True,
                                      trace_min_tokens=4))
        summary = events[-1].summary
        print(f"generated: {prompt}\033[1m{summary.text}\033[0m")
        print(f"top sources ({len(summary.citations)} cited):")
        for c in summary.citations[:5]:
            print(f"  {c.total_weight:6.3f}  {c.doc_id}  [{c.source} | {c.license or 'no license'}]  {c.obligation}")
        print("verbatim in the ∞-gram store (spans of ≥ 4 tokens of the generated text):")
        for sp in summary.trace[:5]:
            docs = ", ".join(f"{d.doc_id} [{d.license or 'no license'}]" for d in sp.documents[:2])
            print(f"  {sp.end_token - sp.start_token:3d} tokens, {sp.count}x  {sp.text[:70]!r}  <- {docs}")
        if not summary.trace:
            print("  (no span of 4 tokens or more: the output is not a copy)")
        before = [h.doc_id for h in client.search(prompt, k=10).hits]
        cited = [c.doc_id for c in summary.citations]
        victim = next((d for d in cited if d in before), before[0] if before else None)
        if victim is None:
            print("nothing retrieved: nothing to opt out")
            return out
        r = client.optout(doc_ids=[victim], reason="demo: the owner asked")
        after = [h.doc_id for h in client.search(prompt, k=10).hits]
        events2 = list(client.generate(prompt, max_new_tokens=16, mode="knn", temperature=0.0, trace=True,
                                       trace_min_tokens=4))
        cited2 = {c.doc_id for c in events2[-1].summary.citations}
        traced2 = {d.doc_id for sp in events2[-1].summary.trace for d in sp.documents}
        status = client.optout_status(receipt_id=r.receipt_id)
        print(f"opt-out of {victim}: receipt {r.receipt_id}, {r.removed_entries} entries removed (fsync'd log)")
        print(f"  in the top-10 search hits for the prompt: before {victim in before}, after {victim in after}")
        print(f"  cited by the generation: before {victim in cited}, after {victim in cited2}; "
              f"in its trace after: {victim in traced2}")
        print(f"  status: logged {status.logged}, tombstoned in {len(status.stores)} open store(s) {status.tombstoned}")
        print(f"  weights: {status.weights.statement}")
        print(f"  generated after: {prompt}\033[1m{events2[-1].summary.text}\033[0m")
        c = client.compact()
        print(f"  compaction: {c.rewritten_shards} shard(s) rewritten, {c.removed_entries} entries physically removed")
        out.update(victim=victim, receipt=r.receipt_id, before=victim in before, after=victim in after,
                   cited_after=victim in cited2, traced_after=victim in traced2, generated=summary.text,
                   weights=status.weights.statement, weights_trained=list(status.weights.trained_doc_ids),
                   trace=[{"text": sp.text, "tokens": sp.end_token - sp.start_token, "count": sp.count,
                           "documents": [d.doc_id for d in sp.documents]} for sp in summary.trace])
    finally:
        server.stop(0)
        print("server stopped")
    return out


def _demo_prompt(store) -> str:
    """The opening words of an English sentence of a restricted document in the store."""
    for d in range(min(400, store.n_documents)):
        row = store.doc_row(d)
        starts = row["sentence_starts"] + [len(row["text"])]
        for a, b in zip(starts, starts[1:], strict=False):
            words = row["text"][a:b].split()
            letters = sum(c.isalpha() or c == " " for c in " ".join(words))
            if len(words) >= 14 and words[0][:1].isupper() and letters > 0.95 * len(" ".join(words)):
                return " ".join(words[:10])
    return "The"

