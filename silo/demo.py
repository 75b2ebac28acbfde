"""`silo demo`: the whole pipeline on the embedded default corpus, on this machine.

 1. harvest this machine's license-labelled text        -> corpus (parquet, tiers)
 2. tokenizer + small LM on the permissive tiers (pd,sw) -> the parametric model
 3. LM perplexity on held-out permissive vs restricted text
 4. datastores from the restricted tier (train split)    -> token store + BM25 passage store
 5. an oracle LM trained on all tiers (for the gap only; never served)
 6. λ, k, T tuned on validation; the SILO table on held-out restricted text
 7. the datastore scaling curve (plot)
 8. a gRPC server: kNN-LM generation with sources, an opt-out, the document gone

Each finished stage is kept in the work folder and reused by the next run (`--fresh`
starts over), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from silo.build import BuildArgs, build_store
from silo.corpus import CorpusWriter, corpus_stats, open_corpus
from silo.errors import SiloError

EVAL_TOKENS = 30_000  # held-out tokens per row: a stable perplexity in seconds to minutes
STORE_TOKENS = 1_500_000  # restricted training text put in the demo's datastores


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _table(rows: list[list], header: list[str]) -> None:
    from silo.cli import _print_table

    _print_table(rows, header)


def harvest_corpus(out: Path, limit_bytes: int) -> None:
    from tqdm import tqdm

    from silo.harvest import iter_harvest

    with CorpusWriter(out, overwrite=True) as writer:
        bar = tqdm(desc="harvest", unit="B", unit_scale=True, total=limit_bytes)
        for record in iter_harvest(limit_bytes):
            writer.add(record)
            bar.update(len(record["text"].encode("utf-8", "surrogatepass")))
        bar.close()


def _train(corpus: Path, out: Path, steps: int | None, **kw) -> dict:
    from silo.train import TrainArgs, train

    if (out / "silo_model.json").is_file() and (out / "model.safetensors").is_file():
        print(f"reusing {out}")
        return json.loads((out / "silo_model.json").read_text())
    return train(TrainArgs(corpus=str(corpus), out=str(out), config="small", steps=steps, max_tokens=20_000_000, **kw))


def _lm_line(rec: dict) -> str:
    return (f"{rec['parameters'] / 1e6:.1f}M parameters, {rec['steps']} steps, {rec['tokens_seen']:,} tokens in "
            f"{rec['train_seconds']:.0f} s; validation ppl {rec['val_perplexity']:.2f} "
            f"(unigram baseline {rec['unigram_val_perplexity']:.2f})")


def run_demo(workdir: str | Path = "runs/demo", limit_bytes: int = 40 << 20, steps: int | None = None,
             fresh: bool = False) -> dict:
    from silo.eval_modes import EvalArgs, run_eval, sweep_knn
    from silo.evaluate import evaluate_lm
    from silo.lm import load_causal_lm

    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, model_dir, oracle_dir = work / "corpus", work / "lm-pdsw", work / "oracle-all-tiers"
    token_store, passage_store = work / "store-token", work / "store-passage"
    figures: dict = {}
    t_start = time.perf_counter()

    _stage("1. harvest the embedded default corpus (this machine's packages and docs)")
    try:
        open_corpus(corpus)
        print(f"reusing {corpus}")
    except SiloError:
        harvest_corpus(corpus, limit_bytes)
    stats = corpus_stats(corpus)
    figures["corpus"] = stats["tier"]
    _table([[t, v["documents"], v["tokens"], v["bytes"]] for t, v in stats["tier"].items()],
           ["tier", "documents", "words", "bytes"])

    _stage("2. tokenizer + small Llama-style LM, trained on tiers pd,sw only")
    rec = _train(corpus, model_dir, steps, tiers=("pd", "sw"))
    figures["lm"] = {k: rec[k] for k in ("parameters", "steps", "tokens_seen", "train_seconds",
                                         "train_tokens_per_second", "val_perplexity", "unigram_val_perplexity")}
    print(_lm_line(rec))

    _stage("3. LM perplexity on held-out text (test split)")
    model, tok = load_causal_lm(model_dir)
    rows = []
    figures["perplexity"] = {}
    for name, tiers in (("permissive (pd,sw)", ("pd", "sw")), ("restricted", ("restricted",))):
        try:
            rep = evaluate_lm(model, tok, str(corpus), "test", tiers, window=256, stride=128, batch_size=8,
                              max_tokens=EVAL_TOKENS)
        except SiloError as e:  # a tiny harvest may have no test documents of a tier
            print(f"{name}: skipped ({e})")
            continue
        figures["perplexity"][name] = rep["perplexity"]
        rows.append([name, rep["documents"], rep["tokens"], f"{rep['perplexity']:.2f}"])
    _table(rows, ["held-out text", "documents", "tokens", "LM perplexity"])
    print("The LM never saw restricted text: its perplexity there is what the datastore has to close.")

    _stage("4. datastores over the restricted tier (train split): token store + BM25 passage store")
    if not (token_store / "manifest.json").is_file():
        shutil.rmtree(token_store, ignore_errors=True)
        build_store(BuildArgs(model=str(model_dir), corpus=str(corpus), out=str(token_store),
                              tiers=("restricted",), shards=2, max_tokens=STORE_TOKENS, window=256, stride=128,
                              batch_size=16, keep_keys=True))
    have_passages = _passage_store(model_dir, corpus, passage_store)
    from datastore.store import Datastore

    st = Datastore.open(token_store, load_index=False)
    print(f"token store: {st.n_entries:,} entries in {len(st.shards)} shards ({st.manifest.index}), "
          f"{st.manifest.documents:,} documents")
    figures["token_store"] = {"entries": st.n_entries, "documents": st.manifest.documents,
                              "index": st.manifest.index}

    _stage("5. oracle LM on all tiers (evaluation only: it shows what the restricted text is worth)")
    orec = _train(corpus, oracle_dir, steps, tiers=("pd", "sw", "by", "restricted"), allow_restricted=True,
                  tokenizer=str(model_dir))
    print(_lm_line(orec))

    _stage("6. kNN-LM / RIC-LM vs LM-only vs oracle on held-out restricted text")
    if not st.manifest.defaults:
        res = sweep_knn(str(model_dir), str(token_store), str(corpus), window=256, stride=128, max_tokens=10_000,
                        progress=True)
        print(f"tuned on validation: k={res['k']} λ={res['lambda']} T={res['temperature']}")
    modes = ("lm", "knn", "ric") if have_passages else ("lm", "knn")
    rep = run_eval(EvalArgs(model=str(model_dir), corpus=str(corpus),
                            stores=(str(token_store),) + ((str(passage_store),) if have_passages else ()), modes=modes,
                            oracle=str(oracle_dir), tiers=("restricted",), window=256, stride=128,
                            max_tokens=EVAL_TOKENS, ric_stride=64, progress=True))
    (work / "eval.json").write_text(json.dumps(rep, indent=2))
    from silo.cli import print_eval_table

    print_eval_table(rep)
    figures["silo_table"] = {k: rep.get(k) for k in ("lm", "knn", "ric", "oracle", "gap_closed", "gap_closed_ric")}

    _stage("7. datastore scaling curve (one retrieval, nested subsamples)")
    from silo.scaling import CurveArgs, scaling_curve

    curve = work / "scaling"
    if not (curve / "scaling.png").is_file():
        from silo.eval_modes import store_knn_params
        from silo.knnlm import KNNParams

        tuned = store_knn_params(Datastore.open(token_store, load_index=False))
        # a small k and a deep first retrieval: ≥ k survivors at every fraction keeps the trick exact
        rows = scaling_curve(CurveArgs(model=str(model_dir), store=str(token_store), corpus=str(corpus),
                                       out=str(curve), fractions=(0.03, 0.1, 0.3, 1.0), seeds=3, depth=2048,
                                       knn=KNNParams(k=16, lam=tuned.lam, temperature=tuned.temperature,
                                                     nprobe=tuned.nprobe),
                                       window=256, stride=128, max_tokens=5_000, oracle=str(oracle_dir),
                                       passage_store=str(passage_store) if have_passages else None))
        _table([[r["mode"], r["fraction"], r["tokens"], f"{r['perplexity']:.2f}", r["k_satisfied"]]
                for r in rows if r["seed"] == 0], ["mode", "fraction", "store tokens", "perplexity", "k satisfied"])
    print(f"plot: {curve / 'scaling.png'}  (data: {curve / 'scaling.csv'})")

    _stage("8. serving: kNN-LM generation with sources, then an opt-out")
    figures["serving"] = serve_and_opt_out(model_dir, token_store, work)

    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "demo.json").write_text(json.dumps(figures, indent=2, default=str))
    print(f"\ndemo finished in {figures['seconds']:.0f} s; figures -> {work / 'demo.json'}")
    return figures


def _passage_store(model_dir: Path, corpus: Path, out: Path) -> bool:
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        build_store(BuildArgs(model=str(model_dir), corpus=str(corpus), out=str(out), kind="passage",
                              tiers=("restricted",), max_tokens=STORE_TOKENS, passage_tokens=128))
    return True


def serve_and_opt_out(model_dir: Path, token_store: Path, work: Path) -> dict:
    """Start a real gRPC server on loopback, use it as a client would, stop it."""
    from server.app import build_server, load_state, new_token
    from server.auth import Auth
    from server.client import SiloClient
    from server.servicers import DatastoreServicer, LanguageModelServicer

    served = work / "store-served"  # the demo removes a document: do it on a copy
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(token_store, served)
    token = new_token()
    auth = Auth(admin_token=token)
    state = load_state(str(model_dir), [str(served)], auth=auth)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, auth=auth)
    out: dict = {"port": port}
    try:
        client = SiloClient(f"127.0.0.1:{port}", token=token)
        prompt = _demo_prompt(state.token_store)
        print(f"server on 127.0.0.1:{port}; prompt (from a restricted document in the store): {prompt!r}")
        events = list(client.generate(prompt, max_new_tokens=16, mode="knn", temperature=0.0))
        summary = events[-1].summary
        print(f"generated: {prompt}\033[1m{summary.text}\033[0m")
        print(f"top sources ({len(summary.citations)} cited):")
        for c in summary.citations[:5]:
            print(f"  {c.total_weight:6.3f}  {c.doc_id}  [{c.source} | {c.license or 'no license'}]  {c.obligation}")
        before = [h.doc_id for h in client.search(prompt, k=10).hits]
        cited = [c.doc_id for c in summary.citations]
        victim = next((d for d in cited if d in before), before[0] if before else None)
        if victim is None:
            print("nothing retrieved: nothing to opt out")
            return out
        r = client.optout(doc_ids=[victim], reason="demo: the owner asked")
        after = [h.doc_id for h in client.search(prompt, k=10).hits]
        events2 = list(client.generate(prompt, max_new_tokens=16, mode="knn", temperature=0.0))
        cited2 = {c.doc_id for c in events2[-1].summary.citations}
        print(f"opt-out of {victim}: receipt {r.receipt_id}, {r.removed_entries} entries removed (fsync'd log)")
        print(f"  in the top-10 search hits for the prompt: before {victim in before}, after {victim in after}")
        print(f"  cited by the generation: before {victim in cited}, after {victim in cited2}")
        print(f"  generated after: {prompt}\033[1m{events2[-1].summary.text}\033[0m")
        c = client.compact()
        print(f"  compaction: {c.rewritten_shards} shard(s) rewritten, {c.removed_entries} entries physically removed")
        out.update(victim=victim, receipt=r.receipt_id, before=victim in before, after=victim in after,
                   cited_after=victim in cited2, generated=summary.text)
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
