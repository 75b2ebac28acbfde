"""The parametric LM: named Llama-style configs and loading of any local causal-LM folder.

Sizes are named: `tiny` (a test trains it in seconds), `small` (the demo trains it in a
few minutes on 2 CPU cores), `1.3b` (SILO's architecture: 24 layers, d 2048, 16 heads,
SwiGLU 5632, RoPE, untied embeddings, seq 2048 — for GPUs). The vocabulary size always
comes from the tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from silo.errors import SiloError
from silo.tokenizer import load_tokenizer


@dataclass(frozen=True)
class LMConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    # training defaults for this size
    seq_len: int
    batch_size: int
    lr: float
    steps: int
    warmup: int


CONFIGS: dict[str, LMConfig] = {
    "tiny": LMConfig(64, 2, 4, 176, 512, True, seq_len=128, batch_size=8, lr=3e-3, steps=60, warmup=10),
    "small": LMConfig(256, 4, 4, 688, 1024, True, seq_len=256, batch_size=16, lr=2e-3, steps=400, warmup=40),
    "1.3b": LMConfig(2048, 24, 16, 5632, 2048, False, seq_len=2048, batch_size=1280, lr=1e-3,
                     steps=100_000, warmup=2000),
}


def build_model(config: str | LMConfig, tokenizer, seed: int = 0):
    """A freshly initialised `LlamaForCausalLM` of a named size for `tokenizer`."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    hf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf)


class NotACausalLMError(SiloError):
    """The folder holds no causal LM that transformers can load (safely)."""


def load_causal_lm(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local HF folder: ours, Pythia, GPT-2, the SILO checkpoints.

    Weights are read only from safetensors: a folder that has only pickled weights
    (`pytorch_model.bin`) is refused rather than unpickled."""
    hf_logging.disable_progress_bar()  # one-line loads; SILO shows its own progress for long work
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NotACausalLMError(f"{path}: not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotACausalLMError(f"{path}: unreadable model config: {e}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotACausalLMError(f"{path}: {config.model_type!r} is not a causal language model")
    if not list(path.glob("*.safetensors")):
        has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = " (it has only pickled weights, which SILO never loads; convert them to safetensors)" if has_pickle else ""
        raise NotACausalLMError(f"{path}: no safetensors weights{hint}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     dtype=dtype or torch.float32)
    except ValueError as e:  # transformers says "Unrecognized configuration class ..." for non-causal models
        raise NotACausalLMError(f"{path}: {config.model_type!r} is not a causal language model ({e})") from e
    model.to(device).eval()
    return model, load_tokenizer(path)


def model_info(path: str | os.PathLike) -> dict:
    """SILO's training record for a model folder (`silo_model.json`), or {} for foreign models."""
    p = Path(path) / "silo_model.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def trained_tiers(info: dict) -> list[str]:
    """The tiers a model was trained on, from its training record; ["unknown"] for a model
    without one (an outside checkpoint: nothing here says what its weights saw)."""
    return list(info.get("tiers") or ()) or ["unknown"]


class RestrictedModel(SiloError):
    """A model whose weights saw restricted text was about to be served."""


def check_servable(path: str | os.PathLike, allow_restricted: bool = False) -> dict:
    """The model's training record, after refusing a model trained on restricted text (an
    oracle for evaluation): its weights hold text that no opt-out can reach, so serving it
    would break the promise that removed text is never used. `allow_restricted` is the
    operator's explicit, logged exception (a private evaluation server)."""
    info = model_info(path)
    restricted = info.get("trained_on_restricted") or "restricted" in (info.get("tiers") or ())
    if restricted and not allow_restricted:
        raise RestrictedModel(
            f"{Path(path).name} was trained on restricted text (an oracle, for evaluation only): its weights "
            "hold text that no opt-out can remove, so it is not served. Serve a model trained on permissive "
            "tiers, or pass --serve-restricted-model for a private evaluation server")
    return info


def config_dict(name: str) -> dict:
    return {"name": name, **asdict(CONFIGS[name])}
