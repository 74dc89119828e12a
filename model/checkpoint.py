"""Checkpoint I/O in one place: atomic writes, safe reads, the config kept beside the weights.

`out/full_sft_160.pth` is a plain state dict with Hugging Face Qwen3 key names (MiniMind-compatible);
`out/full_sft_160.json` beside it holds the `MiniMindConfig`, so our loaders need no architecture flags.
"""
import codecs
import json
import os
import pickle
import re
import tempfile
import types
import typing
from dataclasses import fields
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


REPLACE_HINT = "replace it with a good copy (rerun the step that wrote it, or download it again)"


def safe_torch_load(path, map_location="cpu", hint: str = REPLACE_HINT):
    """torch.load that never unpickles arbitrary objects. Any file it cannot read (empty, truncated, damaged,
    another format) becomes one CheckpointError naming the file, what it is, and `hint` (what to do)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), None)
        if refused:
            raise CheckpointError(f"{path}: refused to load, the file holds objects other than tensors "
                                  f"(weights_only=True) {refused}") from None
        problem, fix = _what_is(path, e)
    except Exception as e:  # by the damage: OSError, EOFError, RuntimeError, KeyError, zip and pickle errors
        problem, fix = _what_is(path, e)
    raise CheckpointError(f"{path}: {problem}; {fix or hint}")


def _what_is(path: Path, error: Exception) -> tuple[str, Optional[str]]:
    """What a file that torch.load could not read is (judged by its first and last bytes), and the fix when
    it is not the caller's hint."""
    if isinstance(error, PermissionError):
        return f"cannot be read ({error.strerror})", "check its permissions"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - 22))
        tail = f.read()
    if not head:
        return "the file is empty (0 bytes), not a checkpoint", None
    if path.suffix == ".safetensors":  # torch.load reads these with safetensors
        return f"not a readable safetensors file ({' '.join(str(error).split())})", None
    if head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive, which ends with an end record
        if not tail.startswith(b"PK\x05\x06"):
            return "truncated (the zip archive has no end record), e.g. by an interrupted copy or download", None
        return "a zip archive that torch.load cannot read, damaged or not written by torch.save", None
    if head.startswith(b"\x80\x02\x8a\x0a"):  # the pickled magic number of torch's pre-1.6 format
        return "damaged or truncated (a torch file of the old, pre-zip format)", None
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights", "fetch them with `git lfs pull`"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:  # safetensors: header length, then JSON
        return "a safetensors file under another name", "rename it to .safetensors"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"a text file, not a checkpoint (it starts with {text[:24]!r})", None
    except UnicodeDecodeError:
        pass
    return "not a PyTorch checkpoint (unknown format)", None


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


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "max_position_embeddings")


def config_from_state(state: dict) -> dict:
    """The architecture a state dict of base weights implies, read off its tensors' shapes (for checkpoints
    without a sidecar, such as MiniMind's): vocabulary and width from the embedding, layers from the keys, the
    head size from q_norm, heads from q_proj and k_proj, the MLP width from gate_proj. Fields the shapes do not
    show (rope_theta, rms_norm_eps) keep MiniMindConfig's defaults. {} when the keys are not a MiniMind model's."""
    def shape(key):
        value = state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    embed, q, k = shape("model.embed_tokens.weight"), shape("model.layers.0.self_attn.q_proj.weight"), \
        shape("model.layers.0.self_attn.k_proj.weight")
    q_norm, gate = shape("model.layers.0.self_attn.q_norm.weight"), shape("model.layers.0.mlp.gate_proj.weight")
    if not (embed and q and k and q_norm and gate) or len(embed) != 2:
        return {}
    head_dim = q_norm[0]
    layers = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    return {"vocab_size": embed[0], "hidden_size": embed[1], "num_hidden_layers": max(layers) + 1,
            "head_dim": head_dim, "num_attention_heads": q[0] // head_dim, "num_key_value_heads": k[0] // head_dim,
            "intermediate_size": gate[0], "tie_word_embeddings": _tied(state)}


def _tied(state: dict) -> bool:
    # A tied model saves lm_head.weight as the embedding itself (or, as Hugging Face does, not at all).
    head = state.get("lm_head.weight")
    return head is None or torch.equal(head, state["model.embed_tokens.weight"])


def load_config(weight_path, state: Optional[dict] = None, **overrides) -> MiniMindConfig:
    """The config saved beside the weights; for foreign checkpoints (no sidecar), read off the tensors' shapes
    (`state`), with any non-None overrides on top (a wrong one then fails the strict load, naming the shapes).
    A sidecar that is not valid JSON, not an object, or has fields of the wrong type raises CheckpointError."""
    cfg_file = config_path(weight_path)
    if not cfg_file.is_file():
        given = {k: v for k, v in overrides.items() if v is not None}
        return MiniMindConfig(**{**(config_from_state(state) if state is not None else {}), **given})
    fix = "fix it, or delete it to give the architecture as flags instead (--hidden_size, --num_hidden_layers, ...)"
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{cfg_file}: the config of {Path(weight_path).name} is not valid JSON ({e}); {fix}") \
            from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file}: the config of {Path(weight_path).name} is a JSON {type(d).__name__}, "
                              f"not an object of config fields; {fix}")
    problem = _config_problem(d)
    if problem is None:
        try:
            return MiniMindConfig.from_dict(d)
        except (TypeError, ValueError, ArithmeticError) as e:
            problem = str(e)
    raise CheckpointError(f"{cfg_file}: the config of {Path(weight_path).name} is wrong: {problem}; {fix}")


def _config_problem(d: dict) -> Optional[str]:
    """The first config field whose value has the wrong type, or a size below 1; None if all look right."""
    hints = typing.get_type_hints(MiniMindConfig)
    for f in fields(MiniMindConfig):
        if f.name not in d:
            continue
        value, kind = d[f.name], hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[int]: None, or the type
            if value is None:
                continue
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)  # Python's True is an int, JSON's is not
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            return f'"{f.name}" is {json.dumps(value)}, expected {"a number" if kind is float else kind.__name__}'
        if f.name in SIZE_FIELDS and value < 1:
            return f'"{f.name}" is {value}, expected at least 1'
    return None


def load_state_dict_strict(model, state_dict: dict, source) -> None:
    """load_state_dict(strict=True) whose error names the first mismatching key and both shapes."""
    _check_base_weights(state_dict, source)
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
        raise CheckpointError(f"{source}: unexpected key {extra[0]} (and {len(extra) - 1} more); the checkpoint "
                              f"was made for another architecture (--num_hidden_layers, ...)")
    model.load_state_dict(state_dict, strict=False)


def _check_base_weights(state, source) -> None:
    """Refuse what is no state dict of base weights: another object, an adapter, a resume checkpoint."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, not a state dict of base weights")
    if any(".lora." in k for k in state) or "__lora_config__" in state:
        raise CheckpointError(f"{source}: is a LoRA adapter, not base weights; pass the base model here "
                              f"and the adapter where adapters go (eval_llm.py --lora_weight)")
    if "optimizer" in state and "model" in state:
        raise CheckpointError(f"{source}: is a trainer's resume checkpoint, not base weights; pass the weights "
                              f"the trainer saved ({{save_dir}}/{{save_weight}}_{{hidden_size}}.pth)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: {bad!r} holds a {type(state[bad]).__name__}, not a tensor; "
                              f"not a state dict of base weights")


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, **config_overrides) -> MiniMindForCausalLM:
    """Build the model from the sidecar config (or overrides) and load the weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    state = safe_torch_load(path)
    model = MiniMindForCausalLM(load_config(path, state, **config_overrides))
    load_state_dict_strict(model, state, path)
    model.name_or_path = str(path)  # names the base in messages, as transformers' name_or_path
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
