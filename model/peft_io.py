"""PEFT LoRA adapter folders <-> our adapter state (`{module}.lora.A/B.weight` + config JSON), no peft import.

A PEFT folder is `adapter_config.json` plus `adapter_model.safetensors` (or the older `adapter_model.bin`) with
keys `base_model.model.{module}.lora_A.weight` (r x in) and `.lora_B.weight` (out x r): our A and B under
another name, since our module names are Hugging Face Qwen3's. The maths is the same (`lora_alpha / r`, or
`/ sqrt(r)` with use_rslora), so a conversion copies tensors and renames keys; it never changes a value.
DoRA (`use_dora`) converts too: PEFT's `{module}.lora_magnitude_vector` is our `{module}.lora.magnitude`.
Other options that change what the adapter computes are refused, one line naming the option.
"""
import json
import re
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, atomic_json_save, atomic_torch_save, atomic_write, safe_torch_load
from model.model_lora import (CONFIG_KEY, FORMAT_VERSION, PROJECTIONS, SAFETENSORS_CONFIG_KEY, LoRAError,
                              _check_fits_base, _parse_adapter, find_targets)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight$")
_PEFT_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector$")
# A target_modules regex we can read as names: optional `^`, `.*` / `.*\.` / `(.*\.)?`, then `name` or `(a|b)`, `$`.
_NAME_REGEX = re.compile(r"^\^?(?:\.\*(?:\\\.)?|\(\.\*\\\.\)\?)?(?P<paren>\()?(?P<names>\w+(?:\|\w+)*)(?(paren)\))\$?$")

# PEFT options that change what the adapter computes or which weights it needs; any value but unset is refused.
UNSUPPORTED = {
    "fan_in_fan_out": "Conv1D-style (in, out) weights",
    "modules_to_save": "full copies of whole modules, not LoRA",
    "rank_pattern": "a rank per module; one rank for all is supported",
    "alpha_pattern": "an alpha per module; one alpha for all is supported",
    "lora_bias": "a bias on lora_B",
    "layer_replication": "it changes the base's layers",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on bare parameters",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "use_qalora": "QALoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # saved unconverted, these need a modified base


def _unset(value) -> bool:
    return value is None or value is False or value == {} or value == []


def check_peft_config(config: dict, source: str) -> None:
    """Raise LoRAError naming the first option of `config` (adapter_config.json) we do not implement."""
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{source}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters convert")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{source}: bias={json.dumps(config['bias'])} is not supported; only bias \"none\" "
                        f"(the base's biases stay untrained)")
    for option, why in UNSUPPORTED.items():
        if not _unset(config.get(option)):
            raise LoRAError(f"{source}: {option}={json.dumps(config[option])} is not supported ({why}); "
                            f"only LoRA and DoRA adapters convert")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise LoRAError(f"{source}: init_lora_weights={json.dumps(init)} is not supported: the adapter needs a "
                        f"modified base; save it converted to plain LoRA (path_initial_model_for_weight_conversion)")
    check_targets(config.get("target_modules"), source)


def check_targets(target_modules, source: str) -> None:
    """PEFT's target_modules must name only projections: a list (names or dotted paths), 'all-linear', or a
    regex that is only a name alternation. The weights, not this field, say which modules are adapted."""
    if target_modules is None or target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        match = _NAME_REGEX.match(target_modules)
        if match is None:
            raise LoRAError(f"{source}: target_modules regex {target_modules!r} is not supported; give a list of "
                            f"projection names ({', '.join(PROJECTIONS)}) or \"all-linear\"")
        target_modules = match["names"].split("|")
    for target in target_modules:
        if str(target).rsplit(".", 1)[-1] not in PROJECTIONS:
            raise LoRAError(f"{source}: target module {target!r} is not supported; LoRA here adapts only "
                            f"{', '.join(PROJECTIONS)}")


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{path}: holds a JSON {type(config).__name__}, not an adapter config")
    return config


def _read_peft_weights(folder: Path) -> dict:
    """The tensors of adapter_model.safetensors, or of adapter_model.bin read with weights_only=True."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None
    if (folder / BIN_WEIGHTS_NAME).is_file():
        try:
            state = safe_torch_load(folder / BIN_WEIGHTS_NAME)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        raise LoRAError(f"{folder / BIN_WEIGHTS_NAME}: not a state dict of tensors")
    raise LoRAError(f"{folder}: no {WEIGHTS_NAME} (nor {BIN_WEIGHTS_NAME}) beside {CONFIG_NAME}")


def _shape_fingerprint(pairs: dict) -> dict:
    """What the adapter's shapes tell of its base: each kind's (out, in), hidden and intermediate size."""
    shapes, dims = {}, {}
    for module, (a, b) in pairs.items():
        kind = module.rsplit(".", 1)[-1]
        out_features, in_features = shapes.setdefault(kind, [b.shape[0], a.shape[1]])
        dims.setdefault("hidden_size", out_features if kind in ("o_proj", "down_proj") else in_features)
        if kind in ("gate_proj", "up_proj", "down_proj"):
            dims.setdefault("intermediate_size", in_features if kind == "down_proj" else out_features)
    return {**dims, "layer_shapes": shapes}


def read_peft_folder(folder) -> dict:
    """A PEFT LoRA folder as read_lora_file returns our files: `{module}.lora.A/B.weight` plus CONFIG_KEY."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoRAError(f"{folder}: not a folder; a PEFT adapter is a folder with {CONFIG_NAME}")
    if not (folder / CONFIG_NAME).is_file():
        raise LoRAError(f"{folder}: not a PEFT adapter folder (no {CONFIG_NAME})")
    peft_config = _read_json(folder / CONFIG_NAME)
    source = str(folder)
    check_peft_config(peft_config, source)
    state = {}
    use_dora = bool(peft_config.get("use_dora", False))
    for key, tensor in _read_peft_weights(folder).items():
        match = _PEFT_KEY.match(key) or (_PEFT_MAGNITUDE_KEY.match(key) if use_dora else None)
        if match is None:
            raise LoRAError(f"{source}: unexpected key {key!r}; a LoRA adapter holds only "
                            f"{PEFT_PREFIX}{{module}}.lora_A.weight and .lora_B.weight (DoRA: and "
                            f".lora_magnitude_vector, with use_dora true)")
        if match["module"].rsplit(".", 1)[-1] not in PROJECTIONS:
            raise LoRAError(f"{source}: LoRA on {match['module']} is not supported; LoRA here adapts only "
                            f"{', '.join(PROJECTIONS)}")
        what = f"{match['matrix']}.weight" if "matrix" in match.groupdict() else "magnitude"
        state[f"{match['module']}.lora.{what}"] = tensor
    pairs, _ = _parse_adapter({**state, CONFIG_KEY: {"use_dora": use_dora}}, source, {})
    rank = peft_config.get("r", 8)  # PEFT's defaults stand for what the file leaves out
    for module, (a, _) in pairs.items():
        if a.shape[0] != rank:
            raise LoRAError(f"{source}: {module} has rank {a.shape[0]} but r is {rank}")
    some_a = next(iter(pairs.values()))[0]
    config = {"format_version": FORMAT_VERSION, "rank": rank, "alpha": peft_config.get("lora_alpha", 8),
              "use_rslora": bool(peft_config.get("use_rslora", False)),
              "dropout": peft_config.get("lora_dropout", 0.0), "use_dora": use_dora,
              "init_lora_weights": _our_init(peft_config.get("init_lora_weights", True)),
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}, key=PROJECTIONS.index),
              "dtype": str(some_a.dtype).removeprefix("torch."), "base": _shape_fingerprint(pairs)}
    state[CONFIG_KEY] = json.dumps(config)
    return state


def _our_init(init) -> str:
    return "default" if init is True else str(init)


def peft_adapter(state: dict, base_model, base_model_name_or_path: str, source: str) -> tuple[dict, dict]:
    """Our adapter state (read_lora_file's form) as PEFT's (tensors, adapter_config) for `base_model`,
    which it must fit. target_modules is the kinds when they cover every layer, else the module paths."""
    magnitudes = {}
    pairs, config = _parse_adapter(state, source, magnitudes)
    _check_fits_base(base_model, pairs, config, source)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    if len(ranks) > 1:
        raise LoRAError(f"{source}: modules have ranks {ranks}; a PEFT adapter without rank_pattern has one rank")
    config = config or {}  # no config: a MiniMind file, whose scale is 1, i.e. alpha = r
    kinds = sorted({m.rsplit(".", 1)[-1] for m in pairs}, key=PROJECTIONS.index)
    every_layer = {name for name, _ in find_targets(base_model, kinds)} == set(pairs)
    tensors = {}
    for module, (a, b) in sorted(pairs.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        if module in magnitudes:
            tensors[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = magnitudes[module].contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks[0], "lora_alpha": config.get("alpha", ranks[0]),
        "use_rslora": bool(config.get("use_rslora", False)), "lora_dropout": config.get("dropout", 0.0),
        "target_modules": kinds if every_layer else sorted(pairs), "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": False, "modules_to_save": None,
        "use_dora": bool(magnitudes), "inference_mode": True, "init_lora_weights": _peft_init(config),
        "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
        "revision": None,
    }
    return tensors, peft_config


def _peft_init(config: dict):
    # A PiSSA/OLoRA file is saved converted, for the unmodified base: PEFT then records True, as its conversion does.
    init = config.get("init_lora_weights", "default")
    return "gaussian" if init == "gaussian" else True


def save_peft_folder(state: dict, out_dir, base_model, base_model_name_or_path: str, source: str) -> Path:
    """Write our adapter state as a PEFT folder; everything is checked before the first file is written."""
    from safetensors.torch import save_file
    tensors, peft_config = peft_adapter(state, base_model, base_model_name_or_path, source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LoRAError(f"{out_dir}: exists and is not a folder")
    # Weights first: a new folder counts as an adapter only once its config is written.
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_json_save(peft_config, out_dir / CONFIG_NAME)
    return out_dir


def save_lora_file(state: dict, path) -> Path:
    """Our adapter state (tensors + CONFIG_KEY) to `.pth` or `.safetensors`, in save_lora's layout, atomically."""
    path = Path(path)
    if path.suffix not in (".pth", ".safetensors"):
        raise LoRAError(f"{path}: an adapter file ends in .pth or .safetensors")
    if path.is_dir():
        raise LoRAError(f"{path}: is a folder, not an adapter file")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in state.items() if k != CONFIG_KEY}
        metadata = {SAFETENSORS_CONFIG_KEY: state[CONFIG_KEY]} if CONFIG_KEY in state else None
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_torch_save(dict(state), path)
    return path
