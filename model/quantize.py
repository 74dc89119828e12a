"""QLoRA's frozen base: the projections' W0 stored in 4 bits (NF4) or 8 bits (int8), dequantised on the fly.

`quantize_base(model, "nf4")` replaces the weight of every q,k,v,o,gate,up,down projection (never embeddings,
norms or lm_head) by a `QuantizedWeight`; LoRA (model/model_lora.py) wraps such a layer as it wraps any other,
and its forward asks the weight for `linear(x)`. The weight holds buffers, not Parameters: no gradient reaches it.

- NF4 is bitsandbytes' layout, value for value (Dettmers et al. 2023): 16 normal quantiles in [-1, 1], one
  absmax per block of 64 weights of the row-major matrix, two codes per byte (the first in the high nibble).
  Double quantisation stores those absmax values minus their mean in bitsandbytes' signed 8-bit dynamic map,
  one float32 scale per block of 256: 4.127 bits per weight instead of 4.5.
- int8 is bitsandbytes' row-wise scheme (LLM.int8()'s weight side, without outliers): round(127 w / max|row|).
- Dequantisation is one table lookup per byte (both nibbles at once) and one multiply; forward and backward each
  redo it, so between the two only the codes stay in memory (as bitsandbytes' MatMul4Bit does).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import unwrap
from model.model_lora import PROJECTIONS, LoRAError, LoRALinear

KINDS = ("nf4", "int8")
NF4_BLOCK = 64          # weights per absmax, bitsandbytes' QLoRA default
ABSMAX_BLOCK = 256      # absmax values per 8-bit block under double quantisation (bitsandbytes' choice)

# bitsandbytes' get_4bit_type("nf4"): create_normal_map(offset=0.9677083), written out as it does
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
INT8_INV_127 = 7.874015718698502e-3  # bitsandbytes multiplies by this float rather than dividing by 127


class QuantizeError(LoRAError):
    """A base that cannot be quantised as asked; the message names the layer and the fix."""


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): for exponents 10^-6..10^0, the
    midpoints of a linear grid on [0.1, 1], doubling in count per decade, both signs, plus 0 and 1; 256 sorted."""
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


_TABLES: dict = {}


def _table(name: str, device) -> torch.Tensor:
    key = (name, str(device))
    if key not in _TABLES:
        if name == "nf4_pairs":  # byte -> (code of its high nibble, code of its low nibble), as one 8-byte item
            code = torch.tensor(NF4_CODE, dtype=torch.float32)
            table = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).view(torch.int64).view(-1)
        elif name == "dynamic":
            table = dynamic_map()
        else:  # "dynamic_lut": bitsandbytes' CPU quantiser maps [-1, 1] onto 65536 bins, each to its nearest code
            code = dynamic_map()
            mids = 0.5 * (code[:-1] + code[1:])
            bins = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
            table = torch.searchsorted(mids, bins)  # the count of midpoints below the bin's value
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def quantize_nf4(w: torch.Tensor, blocksize: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes (out, in/2) uint8, absmax per block float32), as bitsandbytes' quantize_4bit(quant_type="nf4")."""
    blocks = w.detach().reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8).view(-1)  # nearest code; ties go down
    return ((q[0::2] << 4) | q[1::2]).view(w.shape[0], -1), absmax


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = ABSMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, absmax per block), as bitsandbytes' CPU quantize_blockwise with its dynamic map: the value
    times 1/absmax goes to one of 65536 bins of [-1, 1], and the bin to its nearest code (not the exact nearest)."""
    n = x.numel()
    blocks = F.pad(x.detach().float().reshape(-1), (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * 65535 + 0.5).to(torch.int64)  # C's float -> uint16 truncates
    codes = _table("dynamic_lut", x.device)[bins]
    codes = torch.where(absmax[:, None] == 0, 0, codes).to(torch.uint8)  # bitsandbytes writes code 0 for a zero block
    return codes.view(-1)[:n], absmax


class QuantizedWeight(nn.Module):
    """One projection's frozen W0 in NF4 or int8. Quacks like the weight tensor where LoRA reads one (`shape`,
    `dtype`, `device`, `new_zeros`, `new_ones`); `dequantize()` gives the matrix back, `linear(x, bias)` computes x W0^T + b."""

    def __init__(self, weight: torch.Tensor, kind: str = "nf4", double_quant: bool = True,
                 blocksize: int = NF4_BLOCK):
        super().__init__()
        self.kind, self.double_quant, self.blocksize = kind, double_quant and kind == "nf4", blocksize
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        w = weight.detach()
        if kind == "int8":
            scale = w.float().abs().amax(1)  # bitsandbytes' int8_vectorwise_quant: one absmax per output row
            self.register_buffer("codes", torch.round(w.float() * (127.0 / scale.clamp(min=1e-38))[:, None])
                                 .to(torch.int8))
            self.register_buffer("scale", scale)
            return
        codes, absmax = quantize_nf4(w, blocksize)
        self.register_buffer("codes", codes)
        if self.double_quant:
            offset = absmax.mean()  # the absmax values are all positive: centring them uses the signed map fully
            absmax_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset)
            self.register_buffer("absmax_codes", absmax_codes)
            self.register_buffer("absmax_scale", absmax_scale)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def new_zeros(self, *size) -> torch.Tensor:
        return torch.zeros(*size, dtype=self.dtype, device=self.device)

    def new_ones(self, *size) -> torch.Tensor:
        return torch.ones(*size, dtype=self.dtype, device=self.device)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of each 64-weight block (8-bit codes times their block's scale, plus the mean)."""
        if not self.double_quant:
            return self.absmax.float()
        code = _table("dynamic", self.device)[self.absmax_codes.long()]
        n = code.numel()
        scaled = (F.pad(code, (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK) * self.absmax_scale.float()[:, None])
        return scaled.view(-1)[:n] + self.absmax_offset.float()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W0 as a (out, in) tensor of `dtype` (default: the dtype it was quantised from), computed in float32."""
        if self.kind == "int8":
            w = self.codes * self.scale.float()[:, None] * INT8_INV_127
        else:
            # one lookup per byte; a 1-D gather of 8-byte items is 3x faster on CPU than one of (256, 2) rows
            w = _table("nf4_pairs", self.device).index_select(0, self.codes.view(-1).int()).view(torch.float32)
            w = w.view(-1, self.blocksize).mul_(self.block_absmax()[:, None])
        return w.view(self.shape).to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _DequantLinear.apply(x, self, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        layout = f"blocks of {self.blocksize}" + (", double-quantised absmax" if self.double_quant else "")
        return f"{self.kind}, shape={self.shape}, " + (layout if self.kind == "nf4" else "absmax per row")


class _DequantLinear(torch.autograd.Function):
    """x W0^T + b whose backward dequantises W0 again instead of keeping it from the forward: a float W0 held
    from forward to backward in every layer would cost the memory the 4 bits save."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # under CUDA autocast, the backward product runs in the forward's dtype
    def forward(ctx, x, weight: QuantizedWeight, bias):
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class QuantizedLinear(nn.Linear):
    """A frozen projection whose weight is a QuantizedWeight. An nn.Linear to the code that looks for targets,
    so LoRA wraps it as any other; it skips nn.Linear's __init__, which would allocate a float weight."""

    def __init__(self, linear: nn.Linear, weight: QuantizedWeight):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        return self.weight.linear(x, self.bias)


def quantize_base(model, kind: str, double_quant: bool = True, blocksize: int = NF4_BLOCK) -> dict:
    """Store every projection's W0 (q,k,v,o,gate,up,down; plain or already wrapped by LoRA) as `kind` ("nf4" or
    "int8"), in place; the bias stays as it was. Returns what `quantization_of` reports. Adapters are untouched."""
    if kind not in KINDS:
        raise QuantizeError(f"unknown quantisation {kind!r}; choose nf4 (4-bit NormalFloat, QLoRA) or int8 "
                            f"(per output row), or none")
    root = unwrap(model)
    layers = [(n, m) for n, m in root.named_modules()
              if isinstance(m, (nn.Linear, LoRALinear)) and n.rsplit(".", 1)[-1] in PROJECTIONS]
    if not layers:
        raise QuantizeError("the model has no q,k,v,o,gate,up,down projection to quantise")
    for name, m in layers:  # every layer is checked before any changes
        if getattr(m, "merged_adapter", None) is not None:
            raise QuantizeError(f"{name}: adapter {m.merged_adapter!r} is merged into W0; call unmerge_lora(model) "
                                f"before quantize_base")
        if kind == "nf4" and m.in_features % blocksize:
            raise QuantizeError(f"{name}: input size {m.in_features} is not a multiple of the NF4 block size "
                                f"{blocksize} (a block must not straddle two rows); use --quantize_base int8 or none")
    for name, m in layers:
        if isinstance(m.weight, QuantizedWeight):
            continue
        q = QuantizedWeight(m.weight, kind, double_quant, blocksize)
        if isinstance(m, LoRALinear):
            del m.weight  # the Parameter goes; the module takes its place under the same name
            m.weight = q
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, QuantizedLinear(m, q))
    root.quantization = {"kind": kind, **({"blocksize": blocksize, "double_quant": double_quant}
                                          if kind == "nf4" else {})}
    return quantization_of(root)


def quantized_bytes(out_features: int, in_features: int, kind: str, double_quant: bool = True,
                    blocksize: int = NF4_BLOCK) -> int:
    """What QuantizedWeight stores for a (out, in) matrix, worked out from the shape (for models on the meta device)."""
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features  # a code per weight, a float32 absmax per row
    blocks = n // blocksize
    absmax = blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4 if double_quant else 4 * blocks
    return n // 2 + absmax


def quantized_weights(model) -> list[tuple[str, QuantizedWeight]]:
    return [(n.removesuffix(".weight"), m) for n, m in unwrap(model).named_modules() if isinstance(m, QuantizedWeight)]


def quantization_of(model) -> Optional[dict]:
    """None for a float base; else the scheme and the projections' bytes against their float32 bytes."""
    weights = quantized_weights(model)
    if not weights:
        return None
    stored = sum(w.nbytes() for _, w in weights)
    numel = sum(w.shape[0] * w.shape[1] for _, w in weights)
    return {**unwrap(model).quantization, "layers": len(weights), "bytes": stored, "fp32_bytes": 4 * numel,
            "bits_per_weight": 8 * stored / numel}


def describe_quantization(model) -> str:
    q = quantization_of(model)
    if q is None:
        return "base not quantised"
    return (f"base projections in {q['kind']}{' (double-quantised absmax)' if q.get('double_quant') else ''}: "
            f"{q['layers']} layers, {q['bytes'] / 2 ** 20:.2f} MiB, {q['bytes'] / q['fp32_bytes']:.3f}x their "
            f"float32 bytes, {q['bits_per_weight']:.3f} bits per weight")


@torch.no_grad()
def dequantize_base(model) -> int:
    """Put float Parameters (the dequantised values, in the dtype quantised from) back in place of every quantised
    weight, e.g. to merge an adapter: the result is full precision, not re-quantised. Returns how many layers."""
    root = unwrap(model)
    weights = quantized_weights(root)
    for name, q in weights:
        m = root.get_submodule(name)
        w = nn.Parameter(q.dequantize(), requires_grad=False)
        if isinstance(m, QuantizedLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = w, m.bias
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, plain.train(m.training))
        else:
            del m.weight
            m.weight = w
    if weights:
        del root.quantization
    return len(weights)
