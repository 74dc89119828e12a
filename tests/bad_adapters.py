"""Adapter files that look servable but are not: each one once got past registration and broke the engine."""
import json
from pathlib import Path

import torch

from model.checkpoint import atomic_torch_save
from model.model_lora import CONFIG_KEY


def lm_head_adapter(path: Path, hidden: int, vocab: int, rank: int = 4) -> Path:
    """A LoRA pair on lm_head: a linear layer of the model, but not one the bank holds."""
    torch.manual_seed(0)
    atomic_torch_save({"lm_head.lora.A.weight": torch.randn(rank, hidden),
                       "lm_head.lora.B.weight": torch.randn(vocab, rank)}, path)
    return path


def mixed_rank_adapter(good: Path, path: Path, big_rank: int = 32) -> Path:
    """A MiniMind-style file (no config) made from `good`: its first module keeps its rank, its last gets big_rank."""
    state = torch.load(good, weights_only=True)
    state.pop(CONFIG_KEY, None)
    last = [k for k in state if k.endswith(".lora.A.weight")][-1].removesuffix(".lora.A.weight")
    a, b = state[f"{last}.lora.A.weight"], state[f"{last}.lora.B.weight"]
    torch.manual_seed(1)
    state[f"{last}.lora.A.weight"] = torch.randn(big_rank, a.shape[1]) * 0.01
    state[f"{last}.lora.B.weight"] = torch.randn(b.shape[0], big_rank) * 0.01
    atomic_torch_save(state, path)
    return path


def with_config(good: Path, path: Path, config) -> Path:
    """`good`'s weights under another config: a str is stored as is (e.g. truncated JSON), anything else as JSON."""
    state = torch.load(good, weights_only=True)
    state[CONFIG_KEY] = config if isinstance(config, str) else json.dumps(config)
    atomic_torch_save(state, path)
    return path


def truncate_config(path: Path) -> Path:
    """Rewrite the file with the first half of its config JSON, as a crashed writer or a bad edit leaves it."""
    state = torch.load(path, weights_only=True)
    return with_config(path, path, state[CONFIG_KEY][:len(state[CONFIG_KEY]) // 2])


def config_of(path: Path) -> dict:
    return json.loads(torch.load(path, weights_only=True)[CONFIG_KEY])
