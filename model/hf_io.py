"""Import a Hugging Face folder: Qwen3 (`model_type: qwen3`) or MiniMind's transformers format (`minimind`).

Our parameter names are Qwen3's, so importing is reading, not renaming: `read_hf_folder` returns the state dict
and a `MiniMindConfig`, after checking that the folder describes exactly this architecture. Anything it does not
have (MoE, attention bias, sliding windows, another activation, rope scaling) is refused with one line naming the
config key, never approximated. Weights are read from safetensors (one file, or shards listed in
`model.safetensors.index.json`); a `pytorch_model.bin` folder is read with `torch.load(weights_only=True)`.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load, save_model
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

# (single file, index of shards, reader) in Hugging Face's order of preference.
WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json", "safetensors"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json", "torch"))
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Values save_pretrained may leave out of config.json (equal to the class defaults): those of the class that wrote it.
DEFAULTS = {"qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
            "minimind": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768}}


def read_hf_folder(path) -> tuple[dict, MiniMindConfig]:
    """(state dict with our key names, config) of a Qwen3 or MiniMind Hugging Face folder; CheckpointError if the
    folder is broken or describes an architecture feature this model lacks. A tied lm_head is left out."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    hf = read_config_json(folder / "config.json")
    model_type = check_architecture(hf, folder / "config.json")
    state, origin, source = read_weights(folder)
    config = build_config(hf, model_type, state, folder / "config.json")
    check_tensors(state, origin, source, config)
    if config.tie_word_embeddings and "lm_head.weight" in state:
        # MiniMind writes both names of the tied tensor; anything else would be a silently dropped head.
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise CheckpointError(f"{origin['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight "
                                  f"but config.json says tie_word_embeddings; set it to false if the head is separate")
        del state["lm_head.weight"]
    return state, config


def convert_hf_folder(src_dir, out_file, dtype=None) -> Path:
    """`--from_hf`: the folder as our checkpoint (weights + .json config, written atomically), in the folder's
    weight dtype unless `dtype` is given."""
    state, config = read_hf_folder(src_dir)
    model = MiniMindForCausalLM(config)
    load_state_dict_strict(model, state, src_dir)
    dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
    return save_model(model.to(dtype), out_file, extra_config={"converted_from": str(src_dir)})


def read_config_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; a Hugging Face model folder needs its config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file from the model's source") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    return hf


def check_architecture(hf: dict, path: Path) -> str:
    """The model_type, after refusing every feature of the config that this model does not have."""
    model_type = hf.get("model_type")
    if model_type not in DEFAULTS:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; only qwen3 and minimind folders "
                              f"import (the architecture this model has)")

    def refuse(key, what):
        raise CheckpointError(f"{path}: {key} = {json.dumps(hf[key])}: {what} is not supported by this model")

    if hf.get("use_moe"):
        refuse("use_moe", "a mixture of experts")
    if hf.get("attention_bias"):
        refuse("attention_bias", "bias in the attention projections")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # two names of one function in transformers
        refuse("hidden_act", "an activation other than silu")
    if "sliding_attention" in (hf.get("layer_types") or []):
        refuse("layer_types", "sliding-window attention")
    if (hf.get("use_sliding_window") and hf.get("sliding_window") is not None
            and hf.get("max_window_layers", 0) < hf.get("num_hidden_layers", 0)):
        refuse("use_sliding_window", "sliding-window attention")
    if hf.get("inference_rope_scaling"):
        refuse("inference_rope_scaling", "rope scaling (YaRN)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(key, "rope scaling")
    return model_type


def read_weights(folder: Path) -> tuple[dict, dict, Path]:
    """All tensors of the folder, the file each came from, and the file that lists them (for error messages)."""
    for single, index, kind in WEIGHT_FORMATS:
        if (folder / single).is_file():
            source, weight_map = folder / single, {}
            files = [source]
        elif (folder / index).is_file():
            source, weight_map = folder / index, read_index(folder / index)
            files = [folder / name for name in sorted(set(weight_map.values()))]
        else:
            continue
        state, origin = {}, {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file, but {index} lists it; download the missing shard")
            tensors = read_tensors(f, kind)
            state.update(tensors)
            origin.update(dict.fromkeys(tensors, f))
        for key, name in weight_map.items():
            if key not in state:
                raise CheckpointError(f"{folder / name}: missing tensor {key}, which {index} places there; "
                                      f"the shard is incomplete, download it again")
        return state, origin, source
    hint = "; this is a PEFT adapter folder, not a model" if (folder / "adapter_config.json").is_file() else ""
    raise CheckpointError(f"{folder}: no model.safetensors (or model.safetensors.index.json with its shards, or "
                          f"pytorch_model.bin){hint}")


def read_index(index: Path) -> dict:
    """The index's weight_map: tensor name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("a file name is not a string")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e}); it needs a "
                              f"\"weight_map\" of tensor name -> file") from None
    return weight_map


def read_tensors(path: Path, kind: str) -> dict:
    if kind == "torch":
        state = safe_torch_load(path)  # weights_only: a pickle payload is refused, never run
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        return state
    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt, "
                              f"download it again") from None


def build_config(hf: dict, model_type: str, state: dict, path: Path) -> MiniMindConfig:
    missing = [k for k in REQUIRED_KEYS if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]}; the config must give the model's sizes")
    d = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    d["rope_theta"] = rope.get("rope_theta", d["rope_theta"])
    # Sizes a MiniMind config may leave out (intermediate_size: null, num_key_value_heads), read off the tensors.
    gate, k_proj = state.get("model.layers.0.mlp.gate_proj.weight"), state.get("model.layers.0.self_attn.k_proj.weight")
    if d.get("intermediate_size") is None and gate is not None:
        d["intermediate_size"] = gate.shape[0]
    if d.get("num_key_value_heads") is None:
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        d["num_key_value_heads"] = k_proj.shape[0] // head_dim if k_proj is not None else d["num_attention_heads"]
    if "tie_word_embeddings" not in hf:  # the class defaults differ (Qwen3 unties, MiniMind ties): ask the weights
        head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
        d["tie_word_embeddings"] = head is None or (embed is not None and torch.equal(head, embed))
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    try:
        return MiniMindConfig.from_dict(d)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a consistent configuration ({e})") from None


def check_tensors(state: dict, origin: dict, source: Path, config: MiniMindConfig) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    with torch.device("meta"):
        expected = MiniMindForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    for key, want in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing tensor {key}; config.json describes {config.num_hidden_layers} "
                                  f"layers of this architecture, the weights are incomplete or of another one")
        if tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{origin[key]}: {key} has shape {tuple(state[key].shape)} but config.json implies "
                                  f"{tuple(want.shape)}; the config and the weights disagree")
    extra = [k for k in state if k not in expected and k != "lm_head.weight"]
    if extra:
        raise CheckpointError(f"{origin[extra[0]]}: unexpected tensor {extra[0]} (and {len(extra) - 1} more): "
                              f"a part this architecture does not have")
