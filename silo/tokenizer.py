"""SentencePiece tokenizer trained on the permissive tiers, saved as a transformers folder.

The trained model is converted through `LlamaTokenizer.from_pretrained(DIR)` with the
SentencePiece file at `DIR/tokenizer.model` (building it from `vocab_file=` silently gives
a broken tokenizer) and saved with `save_pretrained`, so `AutoTokenizer.from_pretrained`
loads the folder. Options chosen so code and prose round-trip exactly: byte fallback (no
unknown characters), identity normalization, whitespace kept as is, no dummy prefix.
Special ids: 0 <unk>, 1 <s> (document start), 2 </s> (document end), 3 <pad> — padding
is never EOS.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer

from silo.corpus import iter_documents, open_corpus, tier_guard
from silo.errors import SiloError
from silo.progress import bar as progress_bar

CHUNK_CHARS = 4096  # SentencePiece trains on "sentences": feed documents in line-aligned chunks


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    for text in texts:
        start = 0
        while start < len(text):
            end = min(start + max_chars, len(text))
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield text[start:end]
            start = end


def train_tokenizer(texts: Iterable[str], out: str | os.PathLike, vocab_size: int = 8192,
                    max_chars: int = 50_000_000, progress: bool = True, expected_chars: int | None = None):
    """Train SentencePiece (BPE) on `texts` (at most `max_chars`; `expected_chars`, when
    known, is the progress bar's total), save a HF tokenizer folder."""
    def limited() -> Iterator[str]:
        total = 0
        with progress_bar(desc="tokenizer: read text", total=min(max_chars, expected_chars or max_chars), unit="char",
                          unit_scale=True,
                          progress=progress) as bar:
            for chunk in _chunks(texts, CHUNK_CHARS):
                if total >= max_chars:
                    return
                total += len(chunk)
                bar.update(len(chunk))
                yield chunk

    # Materialised (≤ max_chars) so errors from `texts`, e.g. the tier guard, surface as
    # themselves instead of being wrapped by SentencePiece's C++ trainer.
    chunks = list(limited())
    if not chunks:
        raise SiloError("no text to train a tokenizer on")
    model = io.BytesIO()
    try:
        _train_sentencepiece(chunks, model, vocab_size)
    except RuntimeError as e:  # SentencePiece's own checks (e.g. a vocabulary too small for the text's characters)
        why = str(e).rsplit("]", 1)[-1].split(" Increase ")[0].strip()
        hint = "; train with a larger vocabulary (--vocab-size)" if "smaller than required_chars" in why else ""
        raise SiloError(f"tokenizer training failed: {why}{hint}") from e
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        tok = LlamaTokenizer.from_pretrained(tmp, pad_token="<pad>", add_prefix_space=False,
                                             add_bos_token=False, add_eos_token=False)
    tok.save_pretrained(out)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return tok


def _train_sentencepiece(chunks: list[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=0.9995,
        max_sentence_length=CHUNK_CHARS * 4, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2, hard_vocab_limit=False,
    )


def train_tokenizer_on_corpus(corpus: str | os.PathLike, out: str | os.PathLike, tiers: Iterable[str],
                              vocab_size: int = 8192, max_chars: int = 50_000_000, allow_restricted: bool = False,
                              clean: Callable[[dict], str | None] | None = None):
    """Train the tokenizer on the train split of the given tiers only (same guard as the LM);
    `clean` (the leakage scan's) gives each document's text to train on, None to leave it out."""
    tiers = tuple(tiers)

    def texts() -> Iterator[str]:
        for doc in iter_documents(corpus, tiers=tiers, split="train",
                                  columns=["text", "license", "license_classifiers"]):
            tier_guard(doc, tiers, allow_restricted)
            text = doc["text"] if clean is None else clean(doc)
            if text is not None:
                yield text

    # the corpus manifest's bytes of these tiers bound the text read (all splits; characters ≤ bytes)
    expected = sum(open_corpus(corpus).get("bytes", {}).get(t, 0) for t in tiers) or None
    return train_tokenizer(texts(), out, vocab_size=vocab_size, max_chars=max_chars, expected_chars=expected)


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a local folder, with a clear error if there is none."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SiloError(f"{path}: no usable tokenizer in this folder ({e})") from e
    return tok


def tokenize_text(tok, text: str, **kwargs):
    """`tok(text)` for text from a document or a client: no special tokens added, and none
    parsed out of the text. A literal "</s>" or "<s>" in a text is those characters, never
    a document separator: a client cannot end a document inside its query (and so make a
    match span two documents), and a document cannot end itself early in a store."""
    return tok(text, add_special_tokens=False, split_special_tokens=True, **kwargs)


def text_ids(tok, text: str) -> list[int]:
    """Token ids of `text` as plain text (`tokenize_text`)."""
    return tokenize_text(tok, text)["input_ids"]


def encode_document(tok, text: str) -> list[int]:
    """Token ids of one document framed as <s> … </s> (the document separators)."""
    ids = text_ids(tok, text)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return bos + ids + eos


class StreamDecoder:
    """Text of generated tokens, one piece per token, at constant cost per token.

    Decoding the whole continuation at every step costs O(n) per token (O(n²) for a
    generation). Like TGI's streaming detokenizer, only a short tail is decoded: the text
    of tokens [prefix, read) already emitted, and of [prefix, end); the new piece is the
    difference. A piece ending in U+FFFD (a byte-fallback character still incomplete) is
    held back until the character completes, and the window then moves on."""

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
