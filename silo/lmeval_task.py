"""A multiple-choice cloze task from held-out documents, for lm-evaluation-harness.

`silo lm-eval-task` writes a task folder that the harness loads with `--include_path`:

    OUT/silo_cloze.jsonl   one item a line: {"doc_id", "context", "choices", "label", ...}
    OUT/silo_cloze.yaml    the task config (task: silo_cloze, dataset_path: json, ...)

An item is the beginning of a held-out document (its first sentences, at least
`MIN_CONTEXT_WORDS` words, cut at the sentence offsets the corpus stores) and, among
`choices - 1` distractors, the sentence that really comes next. Distractors are sentences
of *other* held-out documents of the same split and tiers, so nothing here was ever in the
LM's training text (training reads the train split only) and every choice is real text of
the same kind. The harness scores each choice's log-likelihood after the context through
SILO's OpenAI-compatible API (`echo` + `logprobs`), so one task compares the LM alone,
kNN-LM and ∞-gram on the same items (`MODEL:none`, `MODEL:knn`, `MODEL:infgram`).

The continuation is `" " + choice` (the harness's default `target_delimiter`): every
choice follows the context with the same single space, whatever separated the sentences
in the document, so the separator cannot give the answer away. The task needs no network:
the data is a local JSON file, and `lm_eval_command` sets `HF_DATASETS_OFFLINE` and
`HF_HUB_OFFLINE`. Items are a pure function of the corpus, split, tiers and seed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import yaml

from silo.corpus import iter_documents
from silo.errors import SiloError

TASK = "silo_cloze"
MIN_CONTEXT_WORDS = 20  # a context long enough to say something about what comes next
MAX_CONTEXT_WORDS = 200  # ... and short enough for a small model's context with every choice
MIN_CHOICE_WORDS = 4  # shorter sentences ("}", "1.", a heading) are near-empty: no cloze
MAX_POOL_DOCS = 20_000  # held-out documents read for items and distractors: bounded memory
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # the task's data and tokenizer are local

_WORD = re.compile(r"\w+")


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _key(text: str) -> str:
    """What makes two sentences the same choice: their words, whitespace and case aside."""
    return " ".join(text.split()).lower()


def sentences_of(doc: dict) -> list[str]:
    """The document's sentences, cut at the offsets the corpus stores (`sentence_starts`)."""
    text, starts = doc["text"], list(doc.get("sentence_starts") or [0])
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _cloze_point(sents: list[str]) -> tuple[str, str] | None:
    """(context, next sentence) of a document: the first sentences up to at least
    MIN_CONTEXT_WORDS words, then the first sentence after them that is not near-empty."""
    words = 0
    for j, sent in enumerate(sents):
        if words >= MIN_CONTEXT_WORDS and _words(sent) >= MIN_CHOICE_WORDS:
            return "".join(sents[:j]).rstrip(), sent.strip()
        words += _words(sent)
        if words > MAX_CONTEXT_WORDS:
            return None
    return None


def build_cloze_items(corpus: str | os.PathLike, split: str = "test", tiers: Iterable[str] | None = ("restricted",),
                      n: int = 200, choices: int = 4, seed: int = 0) -> list[dict]:
    """Up to `n` cloze items from the `split` documents of `tiers` (None: all tiers).

    Raises SiloError when there are too few held-out documents: an item's distractors come
    from other documents, so at least two usable ones are needed (and enough distinct
    sentences among them)."""
    if choices < 2:
        raise SiloError(f"a multiple-choice item needs at least 2 choices, got {choices}")
    if n < 1:
        raise SiloError(f"n must be at least 1, got {n}")
    tiers = tuple(tiers) if tiers is not None else None
    docs = []
    for doc in iter_documents(corpus, tiers=tiers, split=split, columns=["text", "source", "sentence_starts"]):
        docs.append(doc)
        if len(docs) >= MAX_POOL_DOCS:
            break
    docs.sort(key=lambda d: d["doc_id"])  # shard order aside: the items depend on the documents only
    where = f"{corpus}: the {split} split of tier(s) {', '.join(tiers) if tiers else 'all'}"
    points = {d["doc_id"]: p for d in docs if (p := _cloze_point(sentences_of(d))) is not None}
    if len(points) < 2 or len(docs) < 2:
        raise SiloError(f"{where} has {len(docs)} document(s), {len(points)} with a context of "
                        f"{MIN_CONTEXT_WORDS}+ words and a next sentence: too few for a cloze task (distractors come "
                        "from other held-out documents; at least 2 are needed). Use a larger corpus, more --tiers "
                        "or another --split")
    # the distractor pool: distinct, not near-empty sentences of every held-out document
    pool: list[tuple[str, str]] = []  # (doc_id, sentence)
    seen: set[str] = set()
    for d in docs:
        for sent in sentences_of(d):
            s = sent.strip()
            if _words(s) >= MIN_CHOICE_WORDS and _key(s) not in seen:
                seen.add(_key(s))
                pool.append((d["doc_id"], s))
    rng = random.Random(seed)
    order = list(points)
    rng.shuffle(order)
    items, contexts = [], set()
    by_id = {d["doc_id"]: d for d in docs}
    for doc_id in order:
        context, answer = points[doc_id]
        if _key(context) in contexts:  # the same opening twice (a duplicated document): one item
            continue
        candidates = [s for other, s in pool if other != doc_id and _key(s) != _key(answer)]
        if len(candidates) < choices - 1:
            continue
        options = [answer, *rng.sample(candidates, choices - 1)]
        rng.shuffle(options)
        contexts.add(_key(context))
        doc = by_id[doc_id]
        items.append({"doc_id": doc_id, "source": doc["source"], "tier": doc["tier"], "context": context,
                      "choices": options, "label": options.index(answer)})
        if len(items) >= n:
            break
    if not items:
        raise SiloError(f"{where}: no item has {choices - 1} distinct distractor sentences from other documents; "
                        "too few held-out documents (use a larger corpus, more --tiers or fewer choices)")
    return items


def task_config(data_file: str | os.PathLike) -> dict:
    """The lm-evaluation-harness task config for the items in `data_file` (its absolute path)."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # field names: the harness reads doc[field]
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",  # the continuation is " " + choice (contexts end without whitespace)
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_cloze_task(corpus: str | os.PathLike, out: str | os.PathLike, split: str = "test",
                     tiers: Iterable[str] | None = ("restricted",), n: int = 200, choices: int = 4, seed: int = 0,
                     overwrite: bool = False) -> dict:
    """Write OUT/silo_cloze.jsonl and OUT/silo_cloze.yaml; returns a summary (items, paths)."""
    out = Path(out)
    data, config = out / f"{TASK}.jsonl", out / f"{TASK}.yaml"
    if not overwrite and (data.exists() or config.exists()):
        raise FileExistsError(f"{out} already holds a {TASK} task (pass overwrite=True / --overwrite)")
    items = build_cloze_items(corpus, split, tiers, n, choices, seed)
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    config.write_text(f"# written by `silo lm-eval-task` from {Path(corpus).resolve()}\n"
                      + yaml.safe_dump(task_config(data), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {"task": TASK, "items": len(items), "choices": choices, "split": split,
            "tiers": list(tiers) if tiers is not None else None, "seed": seed, "include_path": str(out.resolve()),
            "data": str(data.resolve()), "config": str(config.resolve())}


# ---------------------------------------------------------------------------- running the harness


def lm_eval_args(include_path: str | os.PathLike, model: str, mode: str | None = "knn",
                 base_url: str = "http://127.0.0.1:8000", tokenizer: str | os.PathLike | None = None,
                 max_length: int | None = None, limit: int | None = None, output_path: str | os.PathLike | None = None,
                 log_samples: bool = False, num_concurrent: int = 1) -> list[str]:
    """The arguments of `lm_eval` (after the program name) that run the task against a SILO
    HTTP server: `local-completions` on `/v1/completions`, the model id `MODEL:MODE`.

    The harness tokenizes context and continuation itself to know where the continuation
    starts: with the server's tokenizer (`tokenizer_backend=remote`: `/tokenize`), or with
    `tokenizer` = the model folder here (`huggingface`, offline). `max_length` should be the
    model's context minus one: the server scores [BOS] + the prompt + one new token, and
    the harness cuts prompts to `max_length - 1` tokens."""
    name = f"{model}:{mode}" if mode else model
    margs = [f"base_url={base_url.rstrip('/')}/v1/completions", f"model={name}"]
    margs += ([f"tokenizer_backend=huggingface,tokenizer={Path(tokenizer).resolve()}"] if tokenizer
              else ["tokenizer_backend=remote"])
    if max_length:
        margs.append(f"max_length={max_length}")
    if num_concurrent > 1:
        margs.append(f"num_concurrent={num_concurrent}")
    args = ["--model", "local-completions", "--model_args", ",".join(margs),
            "--include_path", str(Path(include_path).resolve()), "--tasks", TASK]
    if limit is not None:
        args += ["--limit", str(limit)]
    if output_path is not None:
        args += ["--output_path", str(output_path)]
    if log_samples:
        args.append("--log_samples")
    return args


def shell_command(args: list[str], program: str = "lm_eval") -> str:
    """`args` as one shell line, with the offline settings in front."""
    env = " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())
    return f"{env} {program} {shlex.join(args)}"


def read_results(output_path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(the task's metrics, its logged samples) from the newest results of a harness run
    with `--output_path` (and `--log_samples`; no samples without it). The harness writes
    OUTPUT_PATH/<model name>/results_<time>.json and samples_<task>_<time>.jsonl."""
    results = sorted(Path(output_path).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise SiloError(f"{output_path}: no lm-eval results (results_*.json) here")
    metrics = json.loads(results[-1].read_text())["results"][TASK]
    samples_files = sorted(results[-1].parent.glob(f"samples_{TASK}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    samples = ([json.loads(line) for line in samples_files[-1].read_text().splitlines() if line.strip()]
               if samples_files else [])
    return metrics, samples


def model_context(model_dir: str | os.PathLike) -> int | None:
    """The model's context in tokens (`max_position_embeddings` of its config.json), if it says."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def task_commands(include_path: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                  base_url: str = "http://127.0.0.1:8000", modes: Iterable[str] = ("none", "knn", "infgram"),
                  program: str = "lm_eval") -> dict[str, str]:
    """One shell line per mode that runs the task against a server of `model_dir` (MODEL
    when not given: the served model folder's name); results go to ./lmeval-MODE."""
    model = Path(model_dir).resolve().name if model_dir else "MODEL"
    context = model_context(model_dir) if model_dir else None
    return {m: shell_command(lm_eval_args(include_path, model, m, base_url,
                                          max_length=context - 1 if context else None,
                                          output_path=f"lmeval-{m}"), program) for m in modes}
