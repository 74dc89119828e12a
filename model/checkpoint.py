"""Checkpoint I/O in one place: atomic writes, safe reads, the config kept beside the weights.

`out/full_sft_256.pth` is a plain state dict with Hugging Face Qwen3 key names (MiniMind-compatible);
`out/full_sft_256.json` beside it holds the `MiniMindConfig`, so our loaders need no architecture flags.
"""
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Optional

import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn) -> None:
    """Write via write_fn(tmp_path), then rename: a kill mid-save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json_save(obj, path) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    atomic_write(path, write)


def safe_torch_load(path, map_location="cpu"):
    """torch.load that never unpickles arbitrary objects; a refused payload becomes one clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(f"{path}: refused to load, the file holds objects other than tensors "
                              f"(weights_only=True) {why}".rstrip()) from None
    except RuntimeError as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the `module.` / `_orig_mod.` prefixes that DDP and torch.compile put on keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def config_path(weight_path) -> Path:
    return Path(weight_path).with_suffix(".json")


def save_model(model, path, extra_config: Optional[dict] = None) -> Path:
    """Base weights as a plain state dict plus the config beside them (both atomic); returns the path."""
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in clean_state_dict(model.state_dict()).items()}
    atomic_torch_save(state, path)
    atomic_json_save({**model.config.to_dict(), **(extra_config or {})}, config_path(path))
    return Path(path)


def load_config(weight_path, **overrides) -> MiniMindConfig:
    """The config saved beside the weights; for foreign checkpoints (no sidecar), built from overrides."""
    cfg_file = config_path(weight_path)
    if cfg_file.is_file():
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
        return MiniMindConfig.from_dict(d)
    return MiniMindConfig(**{k: v for k, v in overrides.items() if v is not None})


def load_state_dict_strict(model, state_dict: dict, source) -> None:
    """load_state_dict(strict=True) whose error names the first mismatching key and both shapes."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    for k, v in own.items():
        if k not in state_dict:
            if k == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied: the embedding carries it
            raise CheckpointError(f"{source}: missing key {k} (shape {tuple(v.shape)}); "
                                  f"the checkpoint was made for another architecture")
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state_dict[k].shape)} in the file but "
                                  f"{tuple(v.shape)} in the model; pass the architecture it was trained with "
                                  f"(--hidden_size, --num_hidden_layers, ...)")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]} (and {len(extra) - 1} more); "
                              f"is this a LoRA adapter? load it with --lora_weight")
    model.load_state_dict(state_dict, strict=False)


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, **config_overrides) -> MiniMindForCausalLM:
    """Build the model from the sidecar config (or overrides) and load the weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    config = load_config(path, **config_overrides)
    model = MiniMindForCausalLM(config)
    load_state_dict_strict(model, safe_torch_load(path), path)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def hf_config_dict(config: MiniMindConfig) -> dict:
    """The Hugging Face `config.json` of a Qwen3ForCausalLM with the same architecture as `config`."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "torch_dtype": "float32",
    }
