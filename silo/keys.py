"""Datastore keys: the LM's hidden state at each position, taken with a forward hook.

Default (`ffn_input`): the input of the last block's feed-forward, after its layer norm —
the kNN-LM / knn-transformers choice, which retrieves better than the block output.
Option (`final`): the final hidden state (after the last norm), SILO's choice.

The hook finds the last decoder block and its MLP by architecture: Llama/Mistral/Qwen
(`model.layers[i].mlp`), GPT-NeoX/Pythia (`gpt_neox.layers[i].mlp`), GPT-2/GPT-J
(`transformer.h[i].mlp`), OPT (`model.decoder.layers[i].fc1`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch

from silo.tokenizer import text_ids

KEY_TYPES = ("ffn_input", "final")


def _last_block_ffn(model) -> torch.nn.Module:
    base = getattr(model, model.base_model_prefix, model)
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(base, attr, None)
        if blocks is None and hasattr(base, "decoder"):
            blocks = getattr(base.decoder, attr, None)
        if blocks is not None:
            last = blocks[-1]
            for name in ("mlp", "feed_forward", "ffn", "fc1"):
                if hasattr(last, name):
                    return getattr(last, name)
    raise ValueError(f"cannot find the last block's feed-forward in {type(model).__name__}; "
                     "use key type 'final'")


_install_lock = threading.Lock()
_local = threading.local()  # per thread: (id(model), key_type) -> the box of the open capture


def _install(model, key_type: str) -> None:
    """One persistent hook per (model, key type), writing into the calling thread's box.

    A server runs forwards of one shared model in many threads at once: hooks registered
    per call would fire for every thread's forward (and registering them races), so each
    thread gets its own box instead, and the hook — run in the thread doing the forward —
    fills only that one."""
    attr = f"_silo_key_hook_{key_type}"
    with _install_lock:
        if getattr(model, attr, None) is not None:
            return
        key = (id(model), key_type)

        def store(x: torch.Tensor) -> None:
            box = getattr(_local, "boxes", {}).get(key)
            if box is not None:
                box["keys"] = x.detach()

        if key_type == "ffn_input":
            def pre_hook(_module, args, kwargs):
                store(args[0] if args else next(iter(kwargs.values())))

            handle = _last_block_ffn(model).register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def post_hook(_module, _args, output):
                store(output[0] if isinstance(output, tuple) else output)

            handle = _final_norm(model).register_forward_hook(post_hook)
        object.__setattr__(model, attr, handle)


@contextmanager
def capture_keys(model, key_type: str = "ffn_input"):
    """Within the block, `box["keys"]` holds the (batch, seq, dim) keys of this thread's
    last forward of `model`."""
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
    _install(model, key_type)
    boxes = _local.__dict__.setdefault("boxes", {})
    key = (id(model), key_type)
    outer = boxes.get(key)
    box: dict[str, torch.Tensor] = {}
    boxes[key] = box
    try:
        yield box
    finally:
        if outer is None:
            boxes.pop(key, None)
        else:
            boxes[key] = outer


def _final_norm(model) -> torch.nn.Module:
    base = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "final_layer_norm", "ln_f", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    if hasattr(base, "decoder") and hasattr(base.decoder, "final_layer_norm"):
        return base.decoder.final_layer_norm
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


def key_dim(model, key_type: str = "ffn_input") -> int:
    """Dimension of the keys for this model (one tiny forward pass)."""
    with torch.no_grad(), capture_keys(model, key_type) as box:
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    return int(box["keys"].shape[-1])


@torch.no_grad()
def text_keys(model, tok, texts: list[str], key_type: str = "ffn_input"):
    """The key at the last position of each `<s> text` — what a token store is searched with
    to find contexts that continue like this text."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out = []
    device = next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", 2048)
    with capture_keys(model, key_type) as box:
        for text in texts:
            ids = (bos + text_ids(tok, text))[-max_pos:]
            model(input_ids=torch.tensor([ids], device=device))
            out.append(box["keys"][0, -1].float().cpu().numpy())
    return np.stack(out)
