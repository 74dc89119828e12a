"""LoRA, white-box: y = W0 x + s * B(A(dropout(x))), s = alpha / r (rsLoRA: alpha / sqrt(r)).

- `LoRALinear` wraps a frozen nn.Linear by composition and keeps its `weight`/`bias` Parameters, so the
  base keys (`...q_proj.weight`) never change; adapters live in `...q_proj.lora.{adapter}.A/B`.
- Several named adapters per layer, one active at a time (or none); switching never touches W0.
- Adapter files hold only A and B under MiniMind's keys (`{module}.lora.A.weight`, r x in;
  `{module}.lora.B.weight`, out x r) plus a JSON config: in `.pth` as the string under
  `"__lora_config__"`, in `.safetensors` in the header. A file without it is MiniMind's: scale 1.
  A DoRA adapter adds `{module}.lora.magnitude` (out,); variants live in lora_variants.py.
- Default targets follow MiniMind: the square projections (q_proj and o_proj under GQA).
"""
import contextlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import (REPLACE_HINT, REPO_ROOT, CheckpointError, atomic_torch_save, atomic_write,
                              clean_state_dict, safe_torch_load, unwrap)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_KEY = "__lora_config__"          # extra .pth key; MiniMind's loader only reads keys containing `.lora.`
SAFETENSORS_CONFIG_KEY = "lora_config"
FORMAT_VERSION = 1
FINGERPRINT_DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size")
_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<matrix>[AB])\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora\.magnitude$")  # DoRA's magnitude vector, (out,)


class LoRAError(CheckpointError, ValueError):
    """An adapter request that cannot be met; the one-line message names what and where."""


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    # alpha/r: the update's size does not grow with rank, so changing r needs no new learning rate.
    # rsLoRA's alpha/sqrt(r) stops large ranks from learning slower than small ones.
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRADropout(nn.Module):
    """Inverted dropout, as nn.Dropout, with the mask cut from 64-bit random draws, four 16-bit numbers each:
    torch's CPU generator makes one draw per element (150 steps of the demo's medical adapter: 47 s with
    nn.Dropout, 33 s with this, 30 s without dropout). p is rounded to a multiple of 1/65536."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {p}")
        self.p, dropped = p, round(p * 65536)
        self.threshold, self.keep_scale = dropped - 32768, 65536 / (65536 - dropped)  # keep an int16 >= threshold

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * self.keep_scale


class LoRA(nn.Module):
    """One adapter: x -> scale * B(A(dropout(x))), with A: in -> r and B: r -> out."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.set_scale(alpha, use_rslora)
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        # A != 0: B's gradient is (dL/dy) (Ax)^T, so A must be nonzero or B (and then A) never moves.
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # PEFT's choice
        # B = 0: B @ A = 0, so training starts exactly at the base model.
        nn.init.zeros_(self.B.weight)

    def set_scale(self, alpha: float, use_rslora: bool = False) -> None:
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scale = lora_scale(alpha, self.rank, use_rslora)

    def forward(self, x):
        # B(Ax): r*(d+k) multiply-adds per token; the d x k matrix B @ A is never built here.
        return self.B(self.A(self.dropout(x))) * self.scale

    def add_to(self, y, x, layer=None):
        """y + forward(x), with the scale and the sum done inside one matmul (no (tokens, out) temporaries).
        `layer` (the LoRALinear) is for variants whose branch reads W0, such as DoRA."""
        ax = self.A(self.dropout(x))
        return torch.addmm(y.flatten(0, -2), ax.flatten(0, -2), self.B.weight.t(), alpha=self.scale).view_as(y)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, the d x k update; only merging needs it."""
        return (self.B.weight.float() @ self.A.weight.float()) * self.scale

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight with this adapter folded in; `unmerged` inverts it."""
        return weight + self.delta_weight()

    def unmerged(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()


class LoRALinear(nn.Module):
    """A frozen linear layer plus named adapters. Holds the base layer's own `weight`/`bias` Parameters,
    so a LoRA model's state dict keeps the base names and its base part loads into a plain model."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.merged_adapter: Optional[str] = None  # folded into `weight`: forward skips the branch
        self.bank: Optional["AdapterBank"] = None  # serving: one adapter per batch row (see AdapterBank)

    def forward(self, x):
        # a quantised W0 (model/quantize.py) is a module that dequantises itself for the product
        quantised = not isinstance(self.weight, torch.Tensor)
        y = self.weight.linear(x, self.bias) if quantised else F.linear(x, self.weight, self.bias)
        if self.bank is not None and self.bank.rows is not None:
            return self.bank.add_rows(self, y, x)
        if self.active_adapter is None or self.merged_adapter is not None:
            return y
        return self.lora[self.active_adapter].add_to(y, x, self)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if not isinstance(self.weight, torch.Tensor):
            raise LoRAError("cannot merge into a quantised base; call model.quantize.dequantize_base(model) first "
                            "(the merged weights are then full precision)")
        # In bf16/fp16, W0 + delta - delta rounds twice (5% of a bf16 W0's entries moved): keep W0 to restore it.
        self.unmerged_weight = None if self.weight.dtype == torch.float32 else self.weight.detach().clone()
        self.weight.copy_(self.lora[name].merged(self.weight.float()).to(self.weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if getattr(self, "unmerged_weight", None) is not None:
            self.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None
        else:
            self.weight.copy_(self.lora[self.merged_adapter].unmerged(self.weight.float()).to(self.weight.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active={self.active_adapter!r}"


def lora_layers(model) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear, names as in the unwrapped model."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)]


def find_targets(root: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """The linear layers to adapt: None/'square' = MiniMind's square rule; a list or 'a,b' string of
    projection names; 'all-linear' = all seven projections. Never embeddings or lm_head."""
    if isinstance(target_modules, str) and target_modules.strip() in ("", "square"):
        target_modules = None
    if target_modules == "all-linear":
        kinds = set(PROJECTIONS)
    elif target_modules is not None:
        names = target_modules.split(",") if isinstance(target_modules, str) else list(target_modules)
        kinds = {n.strip() for n in names if n.strip()}
        unknown = sorted(kinds - set(PROJECTIONS))
        if unknown or not kinds:
            raise LoRAError(f"unknown LoRA target {unknown[0] if unknown else '(empty)'!r}; valid: "
                            f"{', '.join(PROJECTIONS)}, all-linear, or square (MiniMind's rule: the square "
                            f"projections); comma-separate several")
    chosen = []
    for name, m in root.named_modules():
        if not isinstance(m, (nn.Linear, LoRALinear)) or name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        if target_modules is None and m.in_features != m.out_features:
            continue
        if target_modules is None or name.rsplit(".", 1)[-1] in kinds:
            chosen.append((name, m))
    if not chosen:
        raise LoRAError(f"no linear layer matches LoRA targets {target_modules!r}")
    return chosen


def _wrap(root: nn.Module, name: str, layer: nn.Module) -> LoRALinear:
    if isinstance(layer, LoRALinear):
        return layer
    parent_name, _, leaf = name.rpartition(".")
    wrapped = LoRALinear(layer).train(layer.training)  # a new module is in training mode; keep the model's
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, wrapped)
    return wrapped


def _check_not_merged(model, doing: str) -> None:
    for _, m in lora_layers(model):
        if m.merged_adapter is not None:
            raise LoRAError(f"adapter {m.merged_adapter!r} is merged into the base weights; "
                            f"call unmerge_lora(model) before {doing}")


def apply_lora(model, rank: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=None,
               use_rslora: bool = False, adapter_name: str = "default", use_dora: bool = False,
               init_lora_weights: str = "default") -> dict:
    """Add a new adapter `adapter_name` to the target layers, make it the active one and the only
    trainable parameters (base weights and other adapters frozen). Returns `adapter_stats`.
    target_modules: None (MiniMind's square layers), names from PROJECTIONS (list or 'q_proj,v_proj'),
    or 'all-linear'. Calling it again with another adapter_name adds a second adapter.
    use_dora, init_lora_weights (default, gaussian, pissa, pissa_niter_N, olora): PEFT's variants, see lora_variants."""
    from model.lora_variants import changes_base, check_init, make_lora
    root = unwrap(model)
    _check_name(adapter_name)
    _check_not_merged(root, "adding an adapter")
    init = check_init(init_lora_weights)
    targets = find_targets(root, target_modules)
    if adapter_name in list_adapters(root):
        raise LoRAError(f"adapter {adapter_name!r} already exists; pick another adapter_name")
    if changes_base(init) and list_adapters(root):  # the others were made for W0, not for W0 - sBA
        raise LoRAError(f"init_lora_weights {init!r} changes the base weights, but the model already holds adapters "
                        f"{list_adapters(root)}; apply it to a model without adapters")
    for name, layer in targets:
        layer = _wrap(root, name, layer)
        lora = make_lora(layer, rank, alpha, dropout, use_rslora, use_dora, init)
        layer.lora[adapter_name] = lora.train(root.training)  # follow the model's mode
    mark_only_lora_trainable(root, adapter_name)
    set_adapter(root, adapter_name)
    return adapter_stats(root, adapter_name)


def _check_name(adapter_name: str) -> None:
    # nn.ModuleDict keys name submodules, so a '.' in a name would split it into two.
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LoRAError(f"adapter name {adapter_name!r}: must be a non-empty string without '.'; e.g. "
                        f"{str(adapter_name).replace('.', '_') or 'default'!r}")


def mark_only_lora_trainable(model, adapter_name: str) -> None:
    """Freeze everything except adapter `adapter_name`'s A and B."""
    root = unwrap(model)
    for p in root.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(root, adapter_name):
        p.requires_grad_(True)


def lora_parameters(model, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
    """A and B of one adapter (default: the active one): what the optimizer gets."""
    name = _resolve_name(model, adapter_name)
    return [p for _, m in lora_layers(model) if name in m.lora for p in m.lora[name].parameters()]


def list_adapters(model) -> list[str]:
    """Adapter names in the order they were added."""
    return list(dict.fromkeys(n for _, m in lora_layers(model) for n in m.lora))


def active_adapter(model) -> Optional[str]:
    return next((m.active_adapter for _, m in lora_layers(model) if m.active_adapter is not None), None)


def _resolve_name(model, adapter_name: Optional[str]) -> str:
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise LoRAError("no active LoRA adapter; name one")
    if name not in list_adapters(model):
        raise LoRAError(f"no adapter named {name!r}; the model has {list_adapters(model) or 'none'}")
    return name


def adapter_config(model, adapter_name: Optional[str] = None) -> dict:
    """What was trained: rank, alpha, rslora, dropout, targets, dtype, and the base's fingerprint."""
    name = _resolve_name(model, adapter_name)
    layers = [(n, m) for n, m in lora_layers(model) if name in m.lora]
    first = layers[0][1].lora[name]
    kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in layers}, key=PROJECTIONS.index)
    return {"format_version": FORMAT_VERSION, "adapter_name": name, "rank": first.rank, "alpha": first.alpha,
            "use_rslora": first.use_rslora, "dropout": getattr(first.dropout, "p", 0.0),
            "use_dora": hasattr(first, "magnitude"),
            "init_lora_weights": getattr(first, "init_lora_weights", "default"),
            "target_modules": kinds, "dtype": str(first.A.weight.dtype).removeprefix("torch."),
            "base": base_fingerprint(model, layers)}


def base_fingerprint(model, layers: Iterable[tuple[str, nn.Module]]) -> dict:
    """Config dims, the (out, in) shape of each targeted layer kind, and a probe of the base's weights (a few
    values of its embedding and first targeted layer), which tells two bases of the same shape apart."""
    root = unwrap(model)
    config = getattr(root, "config", None)
    dims = {k: getattr(config, k) for k in FINGERPRINT_DIMS if hasattr(config, k)}
    shapes = {}
    layers = list(layers)
    for name, m in layers:
        shapes.setdefault(name.rsplit(".", 1)[-1], [m.out_features, m.in_features])
    keys = ["model.embed_tokens.weight"] + [f"{name}.weight" for name, _ in list(layers)[:1]]
    probe = {k: v for k in keys if (v := _probe(root, k))}
    name = getattr(root, "name_or_path", None)
    quantization = getattr(root, "quantization", None)  # set by model/quantize.py: the W0 the adapter was trained on
    return {**dims, "layer_shapes": shapes, "probe": probe, **({"name_or_path": name} if name else {}),
            **({"quantization": quantization} if quantization else {})}


PROBE_POINTS = 16


def _probe(root: nn.Module, key: str) -> list:
    """PROBE_POINTS evenly spaced values of a base tensor, rounded (a bf16 copy of the base must still match)."""
    try:
        w = root.get_parameter(key).detach().flatten()
    except (AttributeError, ValueError):
        return []
    if w.is_meta:  # a model built only to count parameters has no values
        return []
    idx = torch.linspace(0, w.numel() - 1, PROBE_POINTS).long().to(w.device)
    layer = root.get_submodule(key.removesuffix(".weight")) if key.endswith(".weight") else None
    if isinstance(layer, LoRALinear):  # PiSSA/OLoRA hold W0 - sB0A0 in the base: probe W0, what the file fits
        from model.lora_variants import residual
        for lora in layer.lora.values():
            if (res := residual(lora)) is not None:
                w = w.float() + res.flatten().to(w.device)
    return [float(f"{v:.4g}") for v in w[idx].float().tolist()]


def _warn_if_other_base(root: nn.Module, config: Optional[dict], source: str) -> None:
    """One line on stderr when the adapter's recorded probe values differ from this base's weights."""
    recorded = ((config or {}).get("base") or {}).get("probe") or {}
    for key, values in recorded.items():
        have = _probe(root, key)
        if have and len(have) == len(values) and any(abs(a - b) > 2e-2 * abs(b) + 1e-4 for a, b in zip(have, values)):
            trained_on = ((config or {}).get("base") or {}).get("name_or_path", "another base")
            here = getattr(root, "name_or_path", "this model")
            print(f"warning: {source} was trained on {trained_on}, whose weights differ from {here} (same shapes); "
                  f"its outputs here are not what it learned", file=sys.stderr, flush=True)
            return


def adapter_stats(model, adapter_name: Optional[str] = None) -> dict:
    """Trainable count and share of the whole model, for logging (see trainable_summary)."""
    root = unwrap(model)
    cfg = adapter_config(root, adapter_name)
    trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
    total = sum(p.numel() for p in root.parameters())
    adapter = sum(p.numel() for p in lora_parameters(root, cfg["adapter_name"]))
    return {"adapter_name": cfg["adapter_name"], "rank": cfg["rank"], "alpha": cfg["alpha"],
            "use_rslora": cfg["use_rslora"], "target_modules": cfg["target_modules"],
            "num_modules": sum(cfg["adapter_name"] in m.lora for _, m in lora_layers(root)),
            "adapter_params": adapter, "trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total}


def trainable_summary(model, adapter_name: Optional[str] = None, counts: bool = True) -> str:
    """One log line: which adapter, where, and (counts) how many parameters train."""
    s = adapter_stats(model, adapter_name)
    scale = "alpha/sqrt(r)" if s["use_rslora"] else "alpha/r"
    where = (f"LoRA {s['adapter_name']!r}: r={s['rank']} alpha={s['alpha']:g} ({scale}) on "
             f"{','.join(s['target_modules'])} ({s['num_modules']} modules)")
    return where + (f"; trainable {s['trainable_params']:,} of {s['total_params']:,} parameters "
                    f"({100 * s['trainable_share']:.3f}%)" if counts else "")


def set_adapter(model, adapter_name: Optional[str]) -> None:
    """Make `adapter_name` the active adapter in every layer that has it; None runs the bare base."""
    layers = lora_layers(model)
    if any(m.merged_adapter not in (None, adapter_name) for _, m in layers):
        _check_not_merged(model, "switching adapters")
    if adapter_name is not None:
        _resolve_name(model, adapter_name)
    for _, m in layers:
        m.active_adapter = adapter_name if adapter_name in m.lora else None


@contextlib.contextmanager
def disable_adapters(model):
    """`with disable_adapters(model):` runs the base model, then restores the active adapter."""
    _check_not_merged(model, "disabling adapters")
    layers = lora_layers(model)
    saved = [m.active_adapter for _, m in layers]
    for _, m in layers:
        m.active_adapter = None
    try:
        yield model
    finally:
        for (_, m), name in zip(layers, saved):
            m.active_adapter = name


def merge_lora(model, adapter_name: Optional[str] = None) -> str:
    """Fold s * B @ A of `adapter_name` (default: the active one) into W0 in place and make it active;
    forward then costs what the base costs. Raises if an adapter is already merged; while merged,
    set_adapter to another adapter and disable_adapters raise too (unmerge_lora first)."""
    _check_not_merged(model, "merging again")
    name = _resolve_name(model, adapter_name)
    set_adapter(model, name)
    for _, m in lora_layers(model):
        if name in m.lora:
            m.merge(name)
    return name


def unmerge_lora(model) -> Optional[str]:
    """Take the merged adapter out of W0 again; returns its name, or None. An fp32 W0 gets the delta subtracted
    (exact up to fp32 rounding); a bf16/fp16 W0 is restored bit for bit from the copy merge kept."""
    name = None
    for _, m in lora_layers(model):
        if m.merged_adapter is not None:
            name = m.merged_adapter
            m.unmerge()
    return name


def unload_lora(model) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear with the same weight (merged or not) and drop all
    adapters. After merge_lora this gives a plain model with the adapter baked in."""
    root = unwrap(model)
    for name, m in lora_layers(root):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, leaf, plain)
    return root


def lora_state_dict(model, adapter_name: Optional[str] = None, as_trained: bool = False,
                    extra_config: Optional[dict] = None) -> dict:
    """One adapter's A and B (DoRA: and magnitude) under MiniMind's keys, on CPU, plus its JSON config under
    CONFIG_KEY. A PiSSA/OLoRA adapter comes converted to fit the unmodified base (rank 2r), unless `as_trained`
    (a resume checkpoint: the run rebuilds the same residual base and goes on from A and B). extra_config: more
    facts of the run for the config, such as LoRA+'s loraplus_lr_ratio."""
    from model.lora_variants import converted
    name = _resolve_name(model, adapter_name)
    state, config = {}, {**adapter_config(model, name), **(extra_config or {})}
    for module, m in lora_layers(model):
        if name in m.lora:
            lora = m.lora[name]
            a, b = lora.A.weight.detach(), lora.B.weight.detach()
            if getattr(lora, "A0", None) is not None and not as_trained:
                a, b, config["alpha"] = converted(lora)
                config["rank"] = a.shape[0]
            state[f"{module}.lora.A.weight"] = a.cpu().contiguous()
            state[f"{module}.lora.B.weight"] = b.cpu().contiguous()
            if hasattr(lora, "magnitude"):
                state[f"{module}.lora.magnitude"] = lora.magnitude.detach().cpu().contiguous()
    state = clean_state_dict(state)  # names come from the unwrapped model; belt and braces
    state[CONFIG_KEY] = json.dumps(config)
    return state


def save_lora(model, path, adapter_name: Optional[str] = None, extra_config: Optional[dict] = None) -> Path:
    """Write one adapter (default: the active one) to `.pth` or `.safetensors`, atomically; returns the path."""
    state = lora_state_dict(model, adapter_name, extra_config=extra_config)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        config = state.pop(CONFIG_KEY)
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={SAFETENSORS_CONFIG_KEY: config}))
    else:
        atomic_torch_save(state, path)
    return path


def read_lora_file(path) -> dict:
    """The file's tensors (prefixes stripped) and, if present, its config JSON under CONFIG_KEY.
    Never unpickles objects: safetensors, or torch.load(weights_only=True). A folder is read as a PEFT adapter."""
    path = Path(path)
    if path.is_dir():
        from model.peft_io import read_peft_folder  # imported here: peft_io builds on this module
        return read_peft_folder(path)
    if not path.is_file():
        raise LoRAError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                config = (f.metadata() or {}).get(SAFETENSORS_CONFIG_KEY)
        except Exception as e:  # safetensors raises its own error types
            raise LoRAError(f"{path}: not a readable safetensors file ({e}); {REPLACE_HINT}") from None
        if config is not None:
            state[CONFIG_KEY] = config
    else:
        try:
            state = safe_torch_load(path)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
        if not isinstance(state, dict):
            raise LoRAError(f"{path}: holds a {type(state).__name__}, not a LoRA state dict")
    return clean_state_dict(state)


def find_adapter(name_or_path, hidden_size: Optional[int] = None, out_dir=REPO_ROOT / "out") -> Path:
    """An existing file (or PEFT adapter folder) as given, else MiniMind's naming: {out}/lora/{name}_{h}.pth,
    then {out}/{name}_{h}.pth (.safetensors after .pth; without hidden_size, {name}.pth)."""
    given = Path(name_or_path)
    if given.is_file() or given.is_dir():
        return given
    stem = f"{given.name}_{hidden_size}" if hidden_size else given.name
    tried = [Path(out_dir) / sub / f"{stem}{ext}" for sub in ("lora", ".") for ext in (".pth", ".safetensors")]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise LoRAError(f"{name_or_path}: no such adapter file (also looked for {tried[0]} and {tried[2]})")
    return found


def default_adapter_name(path, model=None) -> str:
    """The file stem, minus a trailing `_{hidden_size}` of the model: lora_identity_256.pth -> lora_identity;
    a '.' becomes '_' (lora_id.v2_256.pth -> lora_id_v2), since adapter names are module keys."""
    stem = Path(path).stem.replace(".", "_")
    hidden = getattr(getattr(unwrap(model), "config", None), "hidden_size", None) if model is not None else None
    suffix = f"_{hidden}"
    return stem[:-len(suffix)] if hidden is not None and stem.endswith(suffix) and stem != suffix else stem


def load_lora(model, path, adapter_name: Optional[str] = None) -> str:
    """Load an adapter file into the model and make it active; returns the adapter's name.
    adapter_name defaults to `default_adapter_name(path)`. An existing adapter of that name is
    overwritten (its rank and modules must match; the file's alpha wins); otherwise it is created,
    frozen, from the file. Files without a config are MiniMind's: scale 1 (alpha = r)."""
    state = read_lora_file(path)
    name = adapter_name if adapter_name is not None else default_adapter_name(path, model)
    return load_lora_state_dict(model, state, name, source=str(path))


def _parse_adapter(state: dict, source: str, magnitudes: Optional[dict] = None) -> tuple[dict, Optional[dict]]:
    """{module: (A, B)} and the config (None for a MiniMind file), with shape checks of the file itself.
    DoRA's `{module}.lora.magnitude` vectors go into `magnitudes` when given, and are refused otherwise."""
    state = dict(state)
    config = state.pop(CONFIG_KEY, None)
    try:
        config = json.loads(config) if isinstance(config, str) else config
    except ValueError as e:
        raise LoRAError(f"{source}: the adapter's config is not valid JSON ({e}); {REPLACE_HINT}") from None
    if config is not None and not isinstance(config, dict):
        raise LoRAError(f"{source}: the adapter's config is a JSON {type(config).__name__}, not an object; "
                        f"{REPLACE_HINT}")
    pairs: dict[str, dict] = {}
    found_magnitudes = {}
    for key, tensor in state.items():
        match = _MAGNITUDE_KEY.match(key)
        if match is not None and isinstance(tensor, torch.Tensor):
            found_magnitudes[match["module"]] = tensor
            continue
        match = _KEY.match(key)
        if match is None or not isinstance(tensor, torch.Tensor):
            raise LoRAError(f"{source}: unexpected key {key!r}; an adapter holds only "
                            f"{{module}}.lora.A.weight and {{module}}.lora.B.weight (is this a base checkpoint?)")
        pairs.setdefault(match["module"], {})[match["matrix"]] = tensor
    if not pairs:
        raise LoRAError(f"{source}: no LoRA weights ({{module}}.lora.A.weight) in the file")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{source}: {module} has lora.{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{source}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                            f"expected (r, in) and (out, r)")
        if config is not None and a.shape[0] != config.get("rank", a.shape[0]):
            raise LoRAError(f"{source}: {module} has rank {a.shape[0]} but the config says {config['rank']}")
    pairs = {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}
    _check_magnitudes(found_magnitudes, pairs, config, source, magnitudes is not None)
    if magnitudes is not None:
        magnitudes.update(found_magnitudes)
    return pairs, config


def _check_magnitudes(found: dict, pairs: dict, config: Optional[dict], source: str, supported: bool) -> None:
    """DoRA's magnitudes: one (out,) vector for every module with A and B, or none at all."""
    if found and not supported:
        raise LoRAError(f"{source}: DoRA adapters (lora.magnitude) are not supported here; use a plain LoRA adapter")
    if not found and (config or {}).get("use_dora"):
        raise LoRAError(f"{source}: the config says use_dora but the file holds no lora.magnitude vectors; "
                        f"{REPLACE_HINT}")
    for module, m in found.items():
        if module not in pairs:
            raise LoRAError(f"{source}: {module} has lora.magnitude but no lora.A and lora.B")
        if m.ndim != 1 or m.shape[0] != pairs[module][1].shape[0]:
            raise LoRAError(f"{source}: {module} has lora.magnitude of shape {tuple(m.shape)}; expected "
                            f"({pairs[module][1].shape[0]},), one per output row")
    missing = next((m for m in pairs if found and m not in found), None)
    if missing is not None:
        raise LoRAError(f"{source}: {missing} has no lora.magnitude while other modules have one (DoRA)")


def _check_fits_base(root: nn.Module, pairs: dict, config: Optional[dict], source: str) -> None:
    """Raise on the first module the base lacks or whose shape differs, then on a fingerprint mismatch."""
    modules = dict(root.named_modules())
    for module, (a, b) in pairs.items():
        layer = modules.get(module)
        if not isinstance(layer, (nn.Linear, LoRALinear)):
            raise LoRAError(f"{source}: {module} is not a linear layer of this model; "
                            f"the adapter was trained on another base")
        want, have = (b.shape[0], a.shape[1]), (layer.out_features, layer.in_features)
        if want != have:
            raise LoRAError(f"{source}: {module} is {have} (out, in) in the model but {want} in the adapter; "
                            f"the adapter was trained on another base")
    base = (config or {}).get("base") or {}
    config_of_model = getattr(root, "config", None)
    for dim in FINGERPRINT_DIMS:
        if dim in base and hasattr(config_of_model, dim) and base[dim] != getattr(config_of_model, dim):
            raise LoRAError(f"{source}: the adapter's base has {dim}={base[dim]}, this model has "
                            f"{dim}={getattr(config_of_model, dim)}")


def load_lora_state_dict(model, state: dict, adapter_name: str = "default", source: str = "state dict") -> str:
    """load_lora for an in-memory dict such as lora_state_dict's (e.g. from a resume checkpoint).
    Everything is checked before anything changes, so a refused file leaves the model as it was."""
    root = unwrap(model)
    _check_name(adapter_name)
    _check_not_merged(root, "loading an adapter")
    magnitudes = {}
    pairs, config = _parse_adapter(clean_state_dict(state), source, magnitudes)
    _check_fits_base(root, pairs, config, source)
    _warn_if_other_base(root, config, source)
    existing = {n: m.lora[adapter_name] for n, m in lora_layers(root) if adapter_name in m.lora}
    if existing and set(existing) != set(pairs):
        module = sorted(set(existing) ^ set(pairs))[0]
        raise LoRAError(f"{source}: adapter {adapter_name!r} covers {module} only in the "
                        f"{'file' if module in pairs else 'model'}; load it under another adapter_name")
    for module, old in existing.items():
        if old.rank != pairs[module][0].shape[0]:
            raise LoRAError(f"{source}: {module} has rank {pairs[module][0].shape[0]} in the file but "
                            f"{old.rank} in adapter {adapter_name!r}")
        if hasattr(old, "magnitude") != (module in magnitudes):
            raise LoRAError(f"{source}: the file is {'DoRA' if magnitudes else 'plain LoRA'} but adapter "
                            f"{adapter_name!r} is {'DoRA' if hasattr(old, 'magnitude') else 'plain LoRA'}; load it "
                            f"under another adapter_name")
    modules = dict(root.named_modules())
    if magnitudes and any(not isinstance(modules[m].weight, torch.Tensor) for m in pairs):
        raise LoRAError(f"{source}: DoRA on a quantised base is not supported (its row norms need W0 itself); load "
                        f"it without --quantize_base")
    # No config: a MiniMind file, whose forward is W0x + B(Ax), i.e. scale 1, so alpha = r.
    config = config or {}
    for module, (a, b) in pairs.items():
        rank = a.shape[0]
        alpha, use_rslora = config.get("alpha", rank), bool(config.get("use_rslora", False))
        layer = _wrap(root, module, modules[module])
        lora = existing.get(module)
        if lora is None:
            from model.lora_variants import DoRA
            lora = (DoRA if module in magnitudes else LoRA)(layer.in_features, layer.out_features, rank, alpha,
                                                            config.get("dropout", 0.0), device=layer.weight.device,
                                                            dtype=layer.weight.dtype)
            lora.init_lora_weights = config.get("init_lora_weights", "default")  # a record: the file fits W0 as is
            lora.requires_grad_(False)  # loaded for inference; apply_lora then load into its name to train on
            lora.train(root.training)  # a new module is in training mode: its dropout would fire in an eval model
            layer.lora[adapter_name] = lora
        lora.set_scale(alpha, use_rslora)  # the file records what was trained: it wins
        with torch.no_grad():
            lora.A.weight.copy_(a)  # copy_ casts: MiniMind files are often fp16
            lora.B.weight.copy_(b)
            if module in magnitudes:
                lora.magnitude.copy_(magnitudes[module])
    set_adapter(root, adapter_name)
    return adapter_name


_CONFIG_FIELDS = {"rank": "an integer of at least 1", "alpha": "a finite number", "dropout": "a finite number",
                  "use_rslora": "true or false", "use_dora": "true or false", "base": "an object"}


def _bank_config(raw, source: str) -> Optional[dict]:
    """An adapter file's config as a dict whose fields the bank reads have the right types (None: no config)."""
    if raw is None:
        return None
    try:
        config = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise LoRAError(f"{source}: the adapter's config is not valid JSON; {REPLACE_HINT}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{source}: the adapter's config is a JSON {type(config).__name__}, not an object")
    for key, expected in _CONFIG_FIELDS.items():
        value = config.get(key)
        if value is None:
            continue
        if key in ("use_rslora", "use_dora"):
            ok = isinstance(value, bool)
        elif key == "base":
            ok = isinstance(value, dict)
        else:  # JSON's true is not a number here, and Python's json reads NaN and Infinity
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (key != "rank" or (isinstance(value, int) and value >= 1))
        if not ok:
            raise LoRAError(f"{source}: the adapter's config has a wrong {key!r}; expected {expected}")
    return config


class AdapterBank:
    """Many adapters in one batch, each row with its own (S-LoRA's and Punica's idea in plain PyTorch).
    Every projection keeps the resident adapters' A and B stacked in slots (`bank_A`: slots x max_rank x in,
    `bank_B`: slots x out x max_rank; slot 0 stays zero = no adapter); `select(slot of each row)` before a
    forward, and each layer adds gather-then-batched B(Ax) per row. Nothing is merged or switched, so no
    row can change another row's adapter. A smaller rank is zero-padded, which adds exact zeros.
    DoRA: served weights are frozen, so each slot's m / ||W0 + sBA|| is computed once, at load (`bank_factor`,
    slots x out, ones for plain LoRA), and a row's output is that factor times W0x + sBAx."""

    def __init__(self, model, slots: int, max_rank: int = 16):
        root = unwrap(model)
        _check_not_merged(root, "serving adapters from a bank")
        self.root, self.slots, self.max_rank = root, slots, max_rank
        self.layers: dict[str, LoRALinear] = {}
        for name, layer in find_targets(root, "all-linear"):
            layer = _wrap(root, name, layer)
            w = layer.weight
            layer.bank = self
            layer.bank_A = w.new_zeros(slots + 1, max_rank, layer.in_features)
            layer.bank_B = w.new_zeros(slots + 1, layer.out_features, max_rank)
            layer.bank_factor = w.new_ones(slots + 1, layer.out_features)
            self.layers[name] = layer
        self.scale = w.new_zeros(slots + 1)
        self.dora = torch.zeros(slots + 1, dtype=torch.bool)  # slots holding a DoRA adapter
        self.rows_dora = False
        self.rows: Optional[torch.Tensor] = None   # (B,) slot per row; None while no row has an adapter
        self.row_scale: Optional[torch.Tensor] = None

    def check(self, path) -> tuple[dict, float]:
        """Read an adapter file and check all of it fits this bank: ({module: (A, B)}, scale)."""
        return self._read(path)[:2]

    def _read(self, path) -> tuple[dict, float, dict]:
        """check's answer plus DoRA's {module: magnitude}. A server reads files again long after registering them, so
        anything wrong with one becomes a one-line LoRAError, never a crash."""
        source = str(path)
        magnitudes = {}
        try:
            state = read_lora_file(path)
            config = _bank_config(state.get(CONFIG_KEY), source)
            pairs, config = _parse_adapter({**state, CONFIG_KEY: config} if config is not None else state, source,
                                           magnitudes)
            _check_fits_base(self.root, pairs, config, source)
            foreign = next((m for m in pairs if m not in self.layers), None)
            if foreign is not None:  # e.g. lm_head: a linear layer of the model, but no slot holds it
                raise LoRAError(f"{source}: {foreign} is not a layer the bank serves; adapters here cover only "
                                f"{', '.join(PROJECTIONS)}")
            for module, (a, b) in pairs.items():
                if a.shape[0] < 1:
                    raise LoRAError(f"{source}: {module} has rank 0")
                if not (a.is_floating_point() and b.is_floating_point() and a.isfinite().all() and b.isfinite().all()):
                    raise LoRAError(f"{source}: {module} holds values that are not finite floats")
                m = magnitudes.get(module)
                if m is not None and not (m.is_floating_point() and m.isfinite().all()):
                    raise LoRAError(f"{source}: {module} has a lora.magnitude that is not finite floats")
        except LoRAError:
            raise
        except Exception as e:  # whatever else a damaged or hostile file trips; named by type only, never by content
            raise LoRAError(f"{source}: not a usable adapter file ({type(e).__name__}); {REPLACE_HINT}") from None
        ranks = sorted({a.shape[0] for a, _ in pairs.values()})
        if ranks[-1] > self.max_rank:  # every module, not only the first: a larger one would not fit its slot
            raise LoRAError(f"{source}: rank {ranks[-1]} is above the bank's maximum {self.max_rank}; "
                            f"start the server with --max_lora_rank {ranks[-1]} or more")
        if config is not None and len(ranks) > 1:  # one scale per slot, so alpha / r must be one number
            raise LoRAError(f"{source}: modules have ranks {ranks}; an adapter with a config has one rank")
        if magnitudes and any(not isinstance(m.weight, torch.Tensor) for m in self.layers.values()):
            raise LoRAError(f"{source}: a DoRA adapter on a quantised base is not supported (its row norms need W0 "
                            f"itself); serve it without --quantize_base")
        config = config or {}  # no config: a MiniMind file, scale 1 in every module whatever its rank
        scale = lora_scale(config.get("alpha", ranks[0]), ranks[0], bool(config.get("use_rslora", False)))
        return pairs, scale, magnitudes

    @torch.no_grad()
    def load(self, slot: int, path) -> None:
        """Put the adapter file into `slot` (1..slots), replacing what was there."""
        if not 1 <= slot <= self.slots:
            raise LoRAError(f"slot {slot} is outside 1..{self.slots}")
        pairs, scale, magnitudes = self._read(path)
        self.clear(slot)
        for module, (a, b) in pairs.items():
            layer = self.layers[module]
            layer.bank_A[slot, :a.shape[0]] = a
            layer.bank_B[slot, :, :a.shape[0]] = b
            if module in magnitudes:  # DoRA's m / ||W0 + sBA||, in fp32 as in training
                w = torch.addmm(layer.weight.float(), b.float().to(layer.weight.device),
                                a.float().to(layer.weight.device), alpha=scale)
                layer.bank_factor[slot] = magnitudes[module].float().to(w.device) / torch.linalg.vector_norm(w, dim=1)
        self.scale[slot] = scale
        self.dora[slot] = bool(magnitudes)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.bank_A[slot].zero_()
            layer.bank_B[slot].zero_()
            layer.bank_factor[slot].fill_(1.0)
        self.scale[slot] = 0.0
        self.dora[slot] = False

    def select(self, slots, always: bool = False) -> None:
        """The slot of each batch row for the next forwards (0: no adapter); all zeros skips the branch unless
        `always` (a compiled step keeps one graph: slot 0 adds exact zeros)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.scale.device)
        self.rows = slots if always or bool(slots.any()) else None
        self.row_scale = self.scale[slots][:, None, None] if self.rows is not None else None
        self.rows_dora = self.rows is not None and bool(self.dora[slots.cpu()].any())

    def add_rows(self, layer: LoRALinear, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + scale_b * B_b(A_b x_b) for each row b of x (B, T, in)."""
        a = layer.bank_A[self.rows]  # (B, r, in): gather each row's A
        b = layer.bank_B[self.rows]  # (B, out, r)
        ax = torch.bmm(x, a.transpose(1, 2)) * self.row_scale
        z = torch.baddbmm(y, ax, b.transpose(1, 2))
        if not self.rows_dora:
            return z
        f = layer.bank_factor[self.rows][:, None, :].to(z.dtype)  # (B, 1, out); 1 for rows without DoRA
        return z * f if layer.bias is None else (z - layer.bias) * f + layer.bias
