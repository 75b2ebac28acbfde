"""Copyright traps (Meeus et al., 2024): sequences a data owner plants in their documents so
that, later, anyone can test whether a model was trained on them; and the experiment that
checks both halves of SILO's promise with them.

A trap is a sentence of words drawn at random from the corpus's own vocabulary (a text no
document holds, and one a model finds unlikely unless it has seen it). The traps come in
cells: for each length (in words) and each number of repetitions (1, 10, 100 …), `per_cell`
traps are planted, each into its own host document (a restricted, train-split document),
repeated at random sentence boundaries of it. For every length, as many control traps are
drawn the same way and planted nowhere: they are the non-members a planted trap is
compared with.

- **The weights' side.** Each model scores every trap alone after [BOS]: its mean
  log-probability (the loss attack, the score Meeus et al. calibrate) and Min-K%++
  (`silo.membership`). The trap-detection AUC of a cell is P(planted trap scores higher
  than a control of its length). A model trained on the restricted tier (the oracle) can
  detect the frequent traps; SILO's LM, trained on the permissive tiers only, cannot:
  its AUC is ≈ 0.5 by construction, the traps never reached it.
- **The datastore's side.** A store built over the restricted tier holds the traps: the
  ∞-gram store counts them, Trace finds them verbatim in their hosts, and kNN-LM predicts
  them far better than the LM alone. The host documents are then opted out
  (`silo.datastore.removal.remove`, the server's own path), and the same three are measured
  again: the counts are 0, Trace finds nothing, and kNN-LM's perplexity on the traps is
  back to the LM's (as on the controls, which no store ever held).

A corpus with traps planted carries them in `CORPUS/traps.json` (published with the corpus,
atomically), so every later step knows which documents host which trap.
`run_trap_experiment` runs the whole experiment (tools/traps.py, the slow test);
`silo demo` plants the traps into its harvest and reports both sides.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from silo.build import BuildArgs, build_store
from silo.corpus import CorpusWriter, iter_documents, open_corpus
from silo.datastore.infgram import InfgramStore
from silo.datastore.kinds import open_store
from silo.datastore.removal import remove
from silo.errors import SiloError
from silo.infgram import trace
from silo.knnlm import KNNParams, knn_score
from silo.lm import load_causal_lm
from silo.membership import auroc, bootstrap_interval, score_text
from silo.report import print_table
from silo.tokenizer import encode_document, text_ids
from silo.train import TrainArgs, train

TRAPS_FILE = "traps.json"
HOST_TIER = "restricted"
MAX_HOST_WORDS = 5000  # a trap goes into an ordinary document, not a whole manual
_WORD = re.compile(r"[a-z]{3,12}")


@dataclass(frozen=True)
class TrapSpec:
    """Which traps: lengths in words × repetitions, `per_cell` planted traps per cell."""

    lengths: tuple[int, ...] = (16, 32, 64)
    repeats: tuple[int, ...] = (1, 10, 100)
    per_cell: int = 8
    seed: int = 0

    def check(self) -> TrapSpec:
        if not self.lengths or min(self.lengths) < 4 or not self.repeats or min(self.repeats) < 1:
            raise SiloError("trap lengths must be ≥ 4 words and repetitions ≥ 1")
        if self.per_cell < 2:
            raise SiloError("an AUC needs at least 2 traps per cell")
        return self


@dataclass
class Trap:
    trap_id: str
    text: str
    words: int
    repeats: int  # 0: a control, planted nowhere
    host: str | None = None  # the doc id of the document it is planted in

    @property
    def planted(self) -> bool:
        return self.repeats > 0


def trap_vocabulary(corpus: str | os.PathLike, min_count: int = 3, max_docs: int = 2000) -> list[str]:
    """Lower-case words (3–12 letters) seen at least `min_count` times in the host tier."""
    counts: Counter = Counter()
    for i, doc in enumerate(iter_documents(corpus, tiers=(HOST_TIER,), split="train", columns=["text"])):
        if i >= max_docs:
            break
        counts.update(_WORD.findall(doc["text"].lower()))
    words = sorted(w for w, c in counts.items() if c >= min_count)
    if len(words) < 50:
        raise SiloError(f"{corpus}: only {len(words)} words occur {min_count}+ times in the {HOST_TIER} tier; "
                        "traps need a vocabulary of at least 50")
    return words


def make_traps(spec: TrapSpec, vocabulary: list[str]) -> list[Trap]:
    """The planted traps (hosts still unassigned) and, per length, as many controls."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    vocab = np.asarray(vocabulary)

    def sentence(n: int) -> str:
        words = list(rng.choice(vocab, n))
        return " ".join([words[0].capitalize(), *words[1:]]) + "."

    traps = []
    for n in spec.lengths:
        for r in spec.repeats:
            traps += [Trap(f"trap-w{n}-r{r}-{i}", sentence(n), n, r) for i in range(spec.per_cell)]
        traps += [Trap(f"control-w{n}-{i}", sentence(n), n, 0) for i in range(spec.per_cell * len(spec.repeats))]
    return traps


def _insert(text: str, starts: list[int], trap: str, repeats: int, rng: np.random.Generator) -> str:
    """`text` with `repeats` copies of `trap`, each before a sentence start or on a line of
    its own at the end."""
    points = sorted(int(p) for p in rng.choice([*starts, len(text)], repeats))
    out, last = [], 0
    for p in points:
        out += [text[last:p], trap + " " if p < len(text) else "\n" + trap]
        last = p
    out.append(text[last:])
    return "".join(out)


def plant_traps(corpus: str | os.PathLike, traps: list[Trap], out: str | os.PathLike | None = None,
                seed: int = 0, max_host_words: int | None = MAX_HOST_WORDS) -> list[Trap]:
    """Plant the traps, one host each: the first restricted train-split documents of at most
    `max_host_words` words in corpus order (a store over the tier's first tokens holds
    them), given to the traps in a random order (so no cell is all at the end). Writes the
    corpus to `out` (default: in place) with `traps.json`, atomically; returns the traps with
    their hosts."""
    corpus = Path(corpus)
    if (corpus / TRAPS_FILE).is_file():
        raise SiloError(f"{corpus} already has traps planted ({TRAPS_FILE})")
    rng = np.random.default_rng(seed)
    planted = [t for t in traps if t.planted]
    hosts: list[str] = []
    for doc in iter_documents(corpus, tiers=(HOST_TIER,), split="train", columns=["text"]):
        if len(hosts) == len(planted):
            break
        if max_host_words is None or len(doc["text"].split()) <= max_host_words:
            hosts.append(doc["doc_id"])
    if len(hosts) < len(planted):
        raise SiloError(f"{corpus}: {len(planted)} traps need as many {HOST_TIER} training documents (of at most "
                        f"{max_host_words} words), there are {len(hosts)}")
    for i, h in zip(rng.permutation(len(planted)), hosts, strict=True):
        planted[i].host = h
    by_host = {t.host: t for t in planted}
    with CorpusWriter(out or corpus, overwrite=out is None) as writer:
        for doc in iter_documents(corpus):
            t = by_host.get(doc["doc_id"])
            if t is not None:
                doc = {**doc, "text": _insert(doc["text"], doc["sentence_starts"], t.text, t.repeats, rng)}
            writer.add(doc)
        # published with the corpus: a corpus never holds traps without their list
        (writer.tmp / TRAPS_FILE).write_text(json.dumps([asdict(t) for t in traps], indent=1))
    return traps


def load_traps(corpus: str | os.PathLike) -> list[Trap] | None:
    """The traps planted in a corpus; None when it has none."""
    path = Path(corpus) / TRAPS_FILE
    if not path.is_file():
        return None
    try:
        return [Trap(**t) for t in json.loads(path.read_text())]
    except (ValueError, TypeError) as e:
        raise SiloError(f"{path} is corrupt: {e}") from e


def trap_hosts(corpus: str | os.PathLike) -> set[str]:
    """The doc ids of the documents traps are planted in (empty without traps)."""
    return {t.host for t in load_traps(corpus) or () if t.host}


# ---------------------------------------------------------------------------- the weights' side


def trap_scores(model, tok, traps: list[Trap]) -> np.ndarray:
    """(n, 2): each trap's mean log-probability and Min-K%++, scored alone after [BOS]."""
    rows = []
    for t in traps:
        s = score_text(model, tok, t.text)
        if s is None:
            raise SiloError(f"trap {t.trap_id} is too short to score: use longer traps")
        rows.append((s.mean_logprob, s.min_k_pp))
    return np.asarray(rows, np.float64).reshape(-1, 2)


def detection(traps: list[Trap], scores: np.ndarray, rounds: int = 1000) -> list[dict]:
    """Per (length, repetitions): the trap-detection AUC of each score with its bootstrap 95%
    interval, planted traps against the controls of their length."""
    def row(words, repeats, cell: np.ndarray, controls: np.ndarray) -> dict:
        out = {"words": words, "repeats": repeats, "traps": len(cell), "controls": len(controls)}
        for j, name in enumerate(("loss", "min_k_pp")):
            lo, hi = bootstrap_interval(scores[cell, j], scores[controls, j], rounds=rounds)
            out[name] = {"auc": round(auroc(scores[cell, j], scores[controls, j]), 3),
                         "ci95": [round(lo, 3), round(hi, 3)]}
        return out

    assert scores.shape == (len(traps), 2), scores.shape
    planted = [i for i, t in enumerate(traps) if t.planted]
    rows = []
    for n in sorted({t.words for t in traps}):
        controls = np.array([i for i, t in enumerate(traps) if t.words == n and not t.planted])
        for r in sorted({traps[i].repeats for i in planted}):
            cell = np.array([i for i in planted if traps[i].words == n and traps[i].repeats == r])
            if len(cell) and len(controls):
                rows.append(row(n, r, cell, controls))
    # pooled over lengths, then over everything: more traps a row (controls of every length)
    controls = np.array([i for i, t in enumerate(traps) if not t.planted])
    for r in sorted({traps[i].repeats for i in planted}):
        rows.append(row("all", r, np.array([i for i in planted if traps[i].repeats == r]), controls))
    rows.append(row("all", "all", np.array(planted), controls))
    return rows


def weights_side(model_dirs: dict[str, str | os.PathLike], traps: list[Trap]) -> dict[str, list[dict]]:
    """`detection` for each named model."""
    out = {}
    for name, d in model_dirs.items():
        model, tok = load_causal_lm(d)
        out[name] = detection(traps, trap_scores(model, tok, traps))
    return out


# ---------------------------------------------------------------------------- the datastore's side


@dataclass
class StoreMeasure:
    traps: int
    infgram_counts: list[int]  # occurrences of each trap's inner tokens in the ∞-gram store
    traced_in_hosts: int  # traps Trace finds verbatim (≥ min_tokens) in their own host
    lm_perplexity: float  # on the traps' tokens
    knn_perplexity: float
    controls_lm_perplexity: float
    controls_knn_perplexity: float


def _perplexities(model, tok, store, texts: list[str], params: KNNParams) -> tuple[float, float]:
    lm, mixed = [], []
    for text in texts:
        a, b = knn_score(model, store, encode_document(tok, text), params, window=256, stride=128)
        lm.append(a)
        mixed.append(b)
    return math.exp(-np.concatenate(lm).mean()), math.exp(-np.concatenate(mixed).mean())


def _measure(model, tok, token_store, infgram_store, traps: list[Trap], controls: list[Trap], params: KNNParams,
             min_tokens: int) -> StoreMeasure:
    # a trap's tokens but its first and last, which merge with their neighbours in a document
    # differently than alone
    counts = [infgram_store.index.count(text_ids(tok, t.text)[1:-1]) for t in traps]
    traced = sum(any(d["doc_id"] == t.host for sp in trace(infgram_store, tok, t.text, min_tokens)
                     for d in sp.documents) for t in traps)
    lm, knn = _perplexities(model, tok, token_store, [t.text for t in traps], params)
    clm, cknn = _perplexities(model, tok, token_store, [t.text for t in controls], params)
    return StoreMeasure(len(traps), counts, traced, lm, knn, clm, cknn)


def datastore_side(model_dir: str | os.PathLike, token_store: str | os.PathLike, infgram_store: str | os.PathLike,
                   traps: list[Trap], min_tokens: int = 8, reason: str = "copyright-trap experiment") -> dict:
    """Measure the traps in the stores, opt their host documents out of both, measure again.
    Only traps whose host both stores hold are measured (a store built over part of the
    tier may hold some of them)."""
    model, tok = load_causal_lm(model_dir)
    tstore = open_store(token_store)
    istore = InfgramStore.open(infgram_store)
    try:
        held = [t for t in traps if t.planted and all(s.doc_index(t.host) is not None for s in (tstore, istore))]
        if not held:
            return {"traps_in_store": 0}
        controls = [t for t in traps if not t.planted and t.words in {h.words for h in held}]
        params = KNNParams.merged(tstore.manifest.defaults).validate()
        before = _measure(model, tok, tstore, istore, held, controls, params, min_tokens)
        hosts = sorted({t.host for t in held})
        removal = remove([tstore, istore], "doc_ids", hosts, reason=reason, confirm_large=True)
        after = _measure(model, tok, tstore, istore, held, controls, params, min_tokens)
        return {"traps_in_store": len(held), "hosts_removed": len(removal.doc_ids), "receipt": removal.receipt,
                "knn": {"k": params.k, "lambda": params.lam, "temperature": params.temperature},
                "before": asdict(before), "after": asdict(after)}
    finally:
        tstore.close()
        istore.close()


def trap_store_documents(corpus: str | os.PathLike, traps: list[Trap],
                         filler_words: int | None = None) -> list[str]:
    """The documents of a trap experiment's stores: every host, and other restricted training
    documents (of at most MAX_HOST_WORDS words, in corpus order) holding about
    `filler_words` words (default: as many as the hosts), so that a store from which the
    hosts are removed still holds text."""
    hosts = {t.host for t in traps if t.host}
    host_words, others = 0, []
    for doc in iter_documents(corpus, tiers=(HOST_TIER,), split="train", columns=["text"]):
        n = len(doc["text"].split())
        if doc["doc_id"] in hosts:
            host_words += n
        elif n <= MAX_HOST_WORDS:
            others.append((doc["doc_id"], n))
    budget = host_words if filler_words is None else filler_words
    kept, words = [], 0
    for d, n in others:
        if words >= budget:
            break
        kept.append(d)
        words += n
    return sorted(hosts) + kept


def build_trap_stores(model_dir: str | os.PathLike, corpus: str | os.PathLike, traps: list[Trap],
                      out: str | os.PathLike, filler_words: int | None = None,
                      progress: bool = False) -> dict[str, Path]:
    """A token store and an ∞-gram store over `trap_store_documents`, in `out`, with their own
    removal ledger (`out/removals.log`): the experiment's opt-outs do not reach the corpus's
    other stores. Finished stores are reused."""
    out = Path(out)
    docs = tuple(trap_store_documents(corpus, traps, filler_words))
    stores = {}
    for kind in ("token", "infgram"):
        stores[kind] = out / f"store-{kind}"
        if not (stores[kind] / "manifest.json").is_file():
            build_store(BuildArgs(out=str(stores[kind]), model=str(model_dir), corpus=str(corpus), kind=kind,
                                  tiers=(HOST_TIER,), only_doc_ids=docs, window=256, stride=128,
                                  ledger=str(out / "removals.log"), progress=progress))
    return stores


# ---------------------------------------------------------------------------- reports


def cell_name(cell: dict) -> str:
    if cell["repeats"] == "all":
        return "all traps"
    return f"{cell['words'] if cell['words'] != 'all' else 'any'} words x{cell['repeats']}"


def print_detection(weights: dict[str, list[dict]]) -> None:
    """One row per cell: each model's AUC under each score."""
    names = list(weights)
    rows = []
    for i, cell in enumerate(weights[names[0]]):
        row = [cell_name(cell), f"{cell['traps']}/{cell['controls']}"]
        for name in names:
            c = weights[name][i]
            row += [f"{c['loss']['auc']:.2f} ({c['loss']['ci95'][0]:.2f}-{c['loss']['ci95'][1]:.2f})",
                    f"{c['min_k_pp']['auc']:.2f}"]
        rows.append(row)
    header = ["trap cell", "traps/controls"]
    for name in names:
        header += [f"{name} AUC loss (95% CI)", f"{name} Min-K%++"]
    print_table(rows, header)


def print_datastore(rep: dict) -> None:
    if not rep.get("traps_in_store"):
        print("no trap-bearing document is in the stores: nothing to measure")
        return
    b, a = rep["before"], rep["after"]
    rows = [[when, sum(c > 0 for c in m["infgram_counts"]), sum(m["infgram_counts"]), m["traced_in_hosts"],
             f"{m['lm_perplexity']:.1f}", f"{m['knn_perplexity']:.1f}",
             f"{m['knn_perplexity'] / m['lm_perplexity']:.2f}",
             f"{m['controls_knn_perplexity'] / m['controls_lm_perplexity']:.2f}"]
            for when, m in (("before opt-out", b), ("after opt-out", a))]
    print_table(rows, ["", "traps counted", "∞-gram count", "traced to host", "LM ppl", "kNN-LM ppl",
                       "kNN/LM", "kNN/LM controls"])


# ---------------------------------------------------------------------------- the experiment


@dataclass
class TrapArgs:
    corpus: str  # a corpus without traps; traps are planted into a copy under `work`
    work: str
    spec: TrapSpec = field(default_factory=TrapSpec)
    permissive_tiers: tuple[str, ...] = ("pd", "sw")
    config: str = "tiny"
    steps: int | None = 600
    seq_len: int | None = None
    vocab_size: int = 8192
    filler_words: int | None = None  # other restricted text in the stores beside the hosts (None: as much)
    progress: bool = True


def run_trap_experiment(a: TrapArgs) -> dict:
    """Plant, train SILO's LM and the oracle on the same corpus, measure both sides."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    if load_traps(a.corpus) is not None:  # planted already (silo demo's harvest): those traps
        corpus = Path(a.corpus)
    elif not (corpus / TRAPS_FILE).is_file():
        open_corpus(a.corpus)
        plant_traps(a.corpus, make_traps(a.spec, trap_vocabulary(a.corpus)), out=corpus, seed=a.spec.seed)
    traps = load_traps(corpus)
    kw = dict(corpus=str(corpus), config=a.config, steps=a.steps, seq_len=a.seq_len, vocab_size=a.vocab_size,
              progress=a.progress)
    silo_lm, oracle = work / "silo-lm", work / "oracle"
    for out, extra in ((silo_lm, dict(tiers=a.permissive_tiers)),
                       (oracle, dict(tiers=(*a.permissive_tiers, HOST_TIER), allow_restricted=True,
                                     tokenizer=str(silo_lm)))):
        if not (out / "model.safetensors").is_file():
            train(TrainArgs(out=str(out), **kw, **extra))
    stores = build_trap_stores(silo_lm, corpus, traps, work, a.filler_words, a.progress)
    planted = [t for t in traps if t.planted]
    spec = {"lengths": sorted({t.words for t in planted}), "repeats": sorted({t.repeats for t in planted}),
            "per_cell": sum(t.words == planted[0].words and t.repeats == planted[0].repeats for t in planted)}
    rep = {"spec": spec, "planted": sum(t.planted for t in traps),
           "controls": sum(not t.planted for t in traps),
           "weights": weights_side({"SILO LM": silo_lm, "oracle": oracle}, traps)}
    rep["datastore"] = datastore_side(silo_lm, stores["token"], stores["infgram"], traps)
    (work / "traps-report.json").write_text(json.dumps(rep, indent=2))
    return rep
