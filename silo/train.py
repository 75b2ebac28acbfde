"""Training the parametric LM on the permissive tiers only.

nanoGPT-style: the allowed documents of the train (and validation) split are tokenized
once into flat token files (`<s> doc </s> <s> doc </s> …`: packed, with document
separators), and each step samples `batch_size` windows at offsets drawn from an RNG
seeded by (seed, step) — so the batch of any step is known without replaying earlier ones
and a resumed run is bit-for-bit the same as an uninterrupted one.

The loader runs every document through `tier_guard`: restricted text raises instead of
being trained on, unless the caller asks for an oracle (`allow_restricted=True`), and the
model folder then records that it saw restricted text.

AdamW (β2 0.95, weight decay 0.1 on matrices), linear warmup + cosine decay to 10%,
gradient clipping at 1.0. Checkpoints (model, optimizer state, step) are safetensors +
JSON, written to a temporary folder and renamed, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from silo.corpus import RestrictedTextError, expected_documents, iter_documents, tier_guard
from silo.errors import SiloError
from silo.leakage import DEFAULT_MIN_WORDS, LeakageScan
from silo.lm import CONFIGS, build_model
from silo.progress import bar as progress_bar
from silo.provenance import DEFAULT_FPR, RecordWriter, TrainingRecord
from silo.ric_train import RICBatches, RICTrainParams, TrainingPassages
from silo.tokenizer import encode_document, load_tokenizer, train_tokenizer_on_corpus


class NoTrainableTextError(SiloError):
    """The corpus has no documents in the requested tiers."""


@dataclass
class TrainArgs:
    corpus: str
    out: str
    tiers: tuple[str, ...] = ("pd", "sw")
    config: str = "tiny"
    tokenizer: str | None = None  # a tokenizer folder; default: train one on the same tiers
    vocab_size: int = 8192
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    allow_restricted: bool = False  # oracle models only
    resume: bool = True
    max_tokens: int | None = None  # cap on training tokens tokenized (quick runs)
    record_fpr: float = DEFAULT_FPR  # the training record's membership filter, per 13-word shingle
    leakage_scan: bool = True  # cut copies of restricted text out of the trained tiers first (silo.leakage)
    leakage_min_words: int = DEFAULT_MIN_WORDS
    leakage_action: str = "cut"  # or "exclude" the whole document
    ric: float = 0.0  # RIC-LM rows with retrieved passages added per plain row of a batch (silo.ric_train)
    ric_passages: int = 1
    ric_passage_tokens: int = 128  # as the passage store RIC-LM will read (`--passage-tokens`)
    time_budget: float | None = None  # seconds; stop early (the checkpoint stays resumable)
    progress: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the first line of the legal promise: restricted text is never trained on, unless an
        # oracle (an evaluation-only model, marked as such in its folder) asks for it by name
        self.tiers = tuple(self.tiers)
        if not 0 <= self.ric <= 1:
            raise SiloError(f"--ric is the RIC rows added per plain row of a batch, in [0, 1]; got {self.ric}")
        if "restricted" in self.tiers and not self.allow_restricted:
            raise RestrictedTextError("tier 'restricted' is never trained on; allow_restricted (--allow-restricted) "
                                      "is only for oracle models used in evaluation")


# ---------------------------------------------------------------------------- data


def _leakage_report(args: TrainArgs, scan: LeakageScan | None, tokenize_seconds: float) -> dict:
    """The leakage scan's report for the training record; why there is none when skipped."""
    if scan is None:
        why = ("the trained tiers include restricted (an oracle)" if "restricted" in args.tiers
               else "skipped by --skip-leakage-scan: copies of restricted text were trained on unchecked")
        return {"skipped": why}
    # the scan's own time beside the tokenization it ran inside (the plain tokenization's cost)
    return scan.report() | {"tokenize_seconds": round(tokenize_seconds - scan.seconds, 3)}


def tokenize_split(corpus: str, tok, tiers: tuple[str, ...], split: str, out: Path,
                   allow_restricted: bool = False, max_tokens: int | None = None,
                   progress: bool = False, record: RecordWriter | None = None,
                   scan: LeakageScan | None = None) -> dict:
    """Tokenize the allowed documents of one split into a flat uint16/uint32 file; each
    document whose tokens are written goes into `record` (the training record), if given,
    with the text the leakage `scan` left of it (copies of restricted text cut, or left out)."""
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    tmp = out.with_suffix(".tmp")
    n_docs = n_tokens = 0
    with open(tmp, "wb") as f:
        docs = iter_documents(corpus, tiers=tiers, split=split,
                              columns=["text", "source", "license", "license_classifiers", "owner"])
        for doc in progress_bar(docs, desc=f"tokenize {split}", unit="doc", progress=progress,
                                total=expected_documents(corpus, tiers, split)):
            tier_guard(doc, tiers, allow_restricted)
            if scan is not None:
                text = scan.clean(doc)
                if text is None:
                    continue
                doc = {**doc, "text": text}
            ids = np.asarray(encode_document(tok, doc["text"]), dtype=dtype)
            f.write(ids.tobytes())
            if record is not None:
                record.add(doc, len(ids))
            n_docs += 1
            n_tokens += len(ids)
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    os.replace(tmp, out)
    return {"documents": n_docs, "tokens": n_tokens, "dtype": np.dtype(dtype).name}


class TokenStream:
    """Random windows of a flat token file; the batch of step s depends only on (seed, s)."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        if len(self.data) < seq_len + 1:
            raise NoTrainableTextError(f"{path}: only {len(self.data)} tokens, need more than seq_len={seq_len}")

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.data) - self.seq_len - 1, size=batch_size)
        x = np.stack([self.data[s : s + self.seq_len + 1].astype(np.int64) for s in starts])
        x = torch.from_numpy(x)
        return x[:, :-1], x[:, 1:]


def unigram_perplexity(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Add-one unigram baseline: what a model that ignores context would score."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[valid].mean()))


# ---------------------------------------------------------------------------- optimizer state


def _save_checkpoint(path: Path, model, opt, step: int, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}, tmp / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = value.detach().clone().contiguous()
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model, opt) -> dict:
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})")
    params = dict(model.named_parameters())
    for key, value in load_file(path / "optimizer.safetensors").items():
        name, slot = key.split("::")
        opt.state[params[name]][slot] = value
    return json.loads((path / "state.json").read_text())


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def estimate_loss(model, stream: TokenStream, batches: int, batch_size: int, seed: int = 1234) -> float:
    model.eval()
    losses = []
    for i in range(batches):
        x, y = stream.batch(i, batch_size, seed)
        losses.append(model(input_ids=x, labels=None).logits.log_softmax(-1).gather(-1, y[..., None]).mean().neg().item())
    model.train()
    return float(np.mean(losses))


# ---------------------------------------------------------------------------- training


def train(args: TrainArgs) -> dict:
    """Train (or resume) a model into `args.out`; returns the training record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    steps = args.steps or cfg.steps
    batch_size = args.batch_size or cfg.batch_size
    seq_len = args.seq_len or cfg.seq_len
    lr = args.lr or cfg.lr
    warmup = min(args.warmup if args.warmup is not None else cfg.warmup, max(steps // 2, 1))
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint"

    # Fail early, naming what is there, if the requested tiers hold nothing.
    found = {}
    for doc in iter_documents(args.corpus, columns=[]):
        found[doc["tier"]] = found.get(doc["tier"], 0) + 1
    if not any(found.get(t) for t in args.tiers):
        have = ", ".join(f"{t}: {n}" for t, n in sorted(found.items())) or "no documents at all"
        raise NoTrainableTextError(f"no trainable text in tiers {','.join(args.tiers)}; corpus has {have}")

    scan: LeakageScan | None = None

    def leakage_scan() -> LeakageScan | None:
        """The restricted tier's index, built once, the first time a pass over the text needs it."""
        nonlocal scan
        if scan is None and args.leakage_scan and "restricted" not in args.tiers:
            scan = LeakageScan.build(args.corpus, min_words=args.leakage_min_words, action=args.leakage_action,
                                     progress=args.progress)
        return scan

    tok_dir = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if args.tokenizer or (tok_dir / "tokenizer.json").is_file() and args.resume:
        tok = load_tokenizer(tok_dir)
    else:
        cleaner = leakage_scan()
        tok = train_tokenizer_on_corpus(args.corpus, tok_dir, args.tiers, args.vocab_size,
                                        allow_restricted=args.allow_restricted,
                                        clean=cleaner.clean if cleaner else None)

    data_meta_path = work / "data.json"
    if data_meta_path.is_file() and args.resume and TrainingRecord.open(out) is not None:
        data_meta = json.loads(data_meta_path.read_text())
    else:
        # the training record is written with the training tokens, from the same documents
        record = RecordWriter(out, args.tiers, args.corpus, fpr=args.record_fpr)
        try:
            t0 = time.perf_counter()
            data_meta = {
                split: tokenize_split(args.corpus, tok, args.tiers, split, work / f"{split}.bin",
                                      args.allow_restricted, args.max_tokens if split == "train" else None,
                                      args.progress, record if split == "train" else None, leakage_scan())
                for split in ("train", "validation")
            }
            tokenize_seconds = time.perf_counter() - t0
        except BaseException:
            record.abort()
            raise
        record.validation_documents = data_meta["validation"]["documents"]
        record.leakage = _leakage_report(args, scan, tokenize_seconds)
        record.close()
        data_meta_path.write_text(json.dumps(data_meta, indent=2))
    train_stream = TokenStream(work / "train.bin", data_meta["train"]["dtype"], seq_len)
    val_file = "validation.bin" if data_meta["validation"]["tokens"] > seq_len + 1 else "train.bin"
    val_stream = TokenStream(work / val_file, data_meta["train"]["dtype"], seq_len)

    model = build_model(cfg, tok, seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    start, history, elapsed = 0, [], 0.0
    if args.resume and (ckpt / "state.json").is_file():
        state = _load_checkpoint(ckpt, model, opt)
        start, history, elapsed = state["step"], state["history"], state["elapsed"]

    ric = None
    if args.ric:  # retrieval-augmented training: a share of the batches laid out as RIC-LM blocks
        rp = RICTrainParams(share=args.ric, passages=args.ric_passages, passage_tokens=args.ric_passage_tokens,
                            block=min(64, seq_len // 4), query_tokens=min(32, seq_len // 8)).check(seq_len)
        index = TrainingPassages(out, train_stream.data, tok, args.tiers, args.allow_restricted, rp, args.progress)
        ric = RICBatches(train_stream, index, tok, seq_len, batch_size, args.seed, rp, start, steps)
    waited = 0.0  # seconds the step waited for a RIC batch: what retrieval adds to training

    model.train()
    t0 = time.perf_counter() - elapsed
    bar = progress_bar(range(start, steps), initial=start, total=steps, desc=f"train {args.config}",
                       progress=args.progress)
    step = start
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, steps)
        if ric is not None:
            w0 = time.perf_counter()
            x, y = ric.batch(step)
            waited += time.perf_counter() - w0
        else:
            x, y = train_stream.batch(step, batch_size, args.seed)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        history.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        out_of_time = args.time_budget is not None and time.perf_counter() - t0 > args.time_budget
        if done % args.checkpoint_every == 0 or done == steps or out_of_time:
            _save_checkpoint(ckpt, model, opt, done, {"history": history, "elapsed": time.perf_counter() - t0})
        if out_of_time:
            step = done
            break
    else:
        step = steps
    train_seconds = time.perf_counter() - t0
    if ric is not None:
        ric.close()

    val_loss = estimate_loss(model, val_stream, args.eval_batches, batch_size)
    train_tokens = np.memmap(work / "train.bin", dtype=data_meta["train"]["dtype"], mode="r")
    val_tokens = np.memmap(work / val_file, dtype=data_meta["train"]["dtype"], mode="r")
    record = {
        "config": args.config,
        "tiers": list(args.tiers),
        "trained_on_restricted": bool(args.allow_restricted and "restricted" in args.tiers),
        "corpus": str(Path(args.corpus).resolve()),
        "steps": step,
        "target_steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_seen": step * batch_size * seq_len,
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(max(step - start, 0) * batch_size * seq_len / max(train_seconds - elapsed, 1e-9), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": data_meta,
        "loss_first": history[0] if history else None,
        "loss_last": float(np.mean(history[-10:])) if history else None,
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 3),
        "unigram_val_perplexity": round(unigram_perplexity(np.asarray(train_tokens), np.asarray(val_tokens), len(tok)), 3),
        "seed": args.seed,
    }
    if ric is not None:
        ran = train_seconds - elapsed
        record["ric"] = {**asdict(rp), "passages_indexed": len(index.spans), **ric.stats,
                         "batch_wait_seconds": round(waited, 2),
                         # this run's steps against the same steps without the wait for retrieval
                         "step_seconds_ratio": round(ran / (ran - waited), 3) if ran > waited > 0 else None}
    hf_logging.disable_progress_bar()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "silo_model.json").write_text(json.dumps(record, indent=2))
    (out / "silo_train_args.json").write_text(json.dumps(asdict(args), indent=2, default=str))
    return record
