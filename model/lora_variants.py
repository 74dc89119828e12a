"""LoRA variants beside plain LoRA (model_lora.py), each with PEFT's name and numbers.

- DoRA (`use_dora`, Liu et al. 2024): W = m * (W0 + sBA) / ||W0 + sBA||_row. A magnitude m per output row
  trains with A and B; the row norm is detached (the paper's section 4.3), so it costs no backward.
- Initialisation (`init_lora_weights`): default (A Kaiming-uniform, B 0), gaussian (A ~ N(0, 1/r)), and PiSSA /
  OLoRA, which take A and B from W0 (SVD / QR) and leave W0 - sBA in the base. Such an adapter is saved as
  PEFT's `path_initial_model_for_weight_conversion` saves it: rank 2r, A' = [A; A0], B' = [B, -B0], so the file
  applies to the unmodified base.
- LoRA+ (`loraplus_lr_ratio`, Hayou et al. 2024): B (and DoRA's magnitude) learn R times faster than A,
  in the groups of PEFT's `create_loraplus_optimizer`.
"""
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.model_lora import LoRA, LoRAError

INITS = ("default", "gaussian", "pissa", "olora")  # and pissa_niter_N
BASE_CHANGING = ("pissa", "olora")


def check_init(init: str) -> str:
    """The init name as PEFT spells it (True -> default); unknown values refused in one line."""
    init = "default" if init in (True, None, "true", "True") else init
    if init in INITS or (isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init)):
        return init
    raise LoRAError(f"init_lora_weights {init!r} is not known; use one of {', '.join(INITS)} or pissa_niter_N "
                    f"(N >= 1: PiSSA by a randomised SVD of N iterations)")


def changes_base(init: str) -> bool:
    return init.startswith(BASE_CHANGING)


class DoRA(LoRA):
    """DoRA's branch: the output y0 = W0x(+b) of the frozen layer becomes m/n * (W0x + sBAx) (+b), n = ||W0 + sBA||."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.magnitude = nn.Parameter(torch.ones(self.B.weight.shape[0], dtype=self.B.weight.dtype,
                                                 device=self.B.weight.device))

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        # m starts at the row norms of W0 + sBA: the adapted layer starts as the layer it wraps.
        self.magnitude.copy_(self.weight_norm(weight))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A|| per output row, in fp32, detached: one d x k temporary, the least the norm needs.
        Kept until W0, A or B change (their version counters tell), so decoding a token does not redo it."""
        a, b = self.A.weight, self.B.weight
        keep = not torch.compiler.is_compiling()  # a compiled graph recomputes it (version counters are eager-only)
        if keep:
            key = tuple((t.data_ptr(), t._version) for t in (weight, a, b)) + (self.scale,)
            if getattr(self, "_norm_key", None) == key:
                return self._norm
        with torch.autocast(weight.device.type, enabled=False):
            w = torch.addmm(weight.float(), b.float(), a.float(), alpha=self.scale)
            norm = torch.linalg.vector_norm(w, dim=1)
        if keep:
            self._norm_key, self._norm = key, norm
        return norm

    def factor(self, weight: torch.Tensor) -> torch.Tensor:
        return self.magnitude / self.weight_norm(weight)

    def add_to(self, y, x, layer=None):
        """y = W0x + b of `layer` -> PEFT's y + (m/n - 1) W0x + m/n * s B(A x)."""
        f = self.factor(layer.weight).to(y.dtype)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # Dropout on the branch: W0 sees the dropped input too, so W0 x_d costs one more matmul (as in PEFT).
            xd = self.dropout(x)
            return y + (f - 1) * F.linear(xd, layer.weight) + f * self.forward_dropped(xd)
        # No dropout: m/n * (W0x + sBAx) in one addmm and one multiply, without a (tokens, out) copy of W0x.
        z = y if layer.bias is None else y - layer.bias
        z = torch.addmm(z.flatten(0, -2), self.A(x).flatten(0, -2), self.B.weight.t(), alpha=self.scale).view_as(y)
        return z * f if layer.bias is None else z * f + layer.bias

    def forward_dropped(self, xd):
        return self.B(self.A(xd)) * self.scale

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        # The norm of the unmerged weight is kept: unmerging needs it, and the merged weight no longer tells it.
        self.merge_norm = self.weight_norm(weight)
        return (self.magnitude.detach().float() / self.merge_norm)[:, None] * (weight + self.delta_weight())

    def unmerged(self, weight: torch.Tensor) -> torch.Tensor:
        f = self.magnitude.detach().float() / self.merge_norm
        return weight / f[:, None] - self.delta_weight()


def make_lora(layer, rank: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
              init: str = "default") -> LoRA:
    """A new adapter for `layer` (a LoRALinear), initialised as `init` says; PiSSA/OLoRA change layer.weight."""
    w = layer.weight
    if (use_dora or changes_base(init)) and not isinstance(w, torch.Tensor):  # a QuantizedWeight (model/quantize.py)
        raise LoRAError(f"{'DoRA' if use_dora else init} on a quantised base is not supported (it needs W0 itself); "
                        f"drop --quantize_base or {'--use_dora' if use_dora else '--init_lora_weights'}")
    cls = DoRA if use_dora else LoRA
    lora = cls(layer.in_features, layer.out_features, rank, alpha, dropout, use_rslora, device=w.device, dtype=w.dtype)
    lora.init_lora_weights = init
    if init == "gaussian":
        with torch.no_grad():
            nn.init.normal_(lora.A.weight, std=1 / rank)
    elif changes_base(init):
        _init_from_base(layer, lora, init)
    if use_dora:
        lora.init_magnitude(w)
    return lora


@torch.no_grad()
def _init_from_base(layer, lora: LoRA, init: str) -> None:
    """PEFT's pissa_init / olora_init: A, B from W0 in fp32, the base keeps W0 - sBA; A0, B0 are kept for saving."""
    w = layer.weight.float()
    r = lora.rank
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        if init == "pissa":
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r] / lora.scale, uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(w, r, niter=int(init.split("_niter_")[-1]))
            sr, uhr = sr / lora.scale, ur.t()
        a, b = torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))
    lora.A.weight.copy_(a)
    lora.B.weight.copy_(b)
    layer.weight.copy_((w - lora.scale * b @ a).to(layer.weight.dtype))
    # Kept beside A and B (not in the state dict): W0 = W_res + s B0 A0 gives the saved file and the base's probe.
    lora.register_buffer("A0", lora.A.weight.detach().clone(), persistent=False)
    lora.register_buffer("B0", lora.B.weight.detach().clone(), persistent=False)


def residual(lora: LoRA) -> Optional[torch.Tensor]:
    """s * B0 @ A0, what PiSSA/OLoRA took out of the base (None for other inits)."""
    if getattr(lora, "A0", None) is None:
        return None
    return lora.scale * (lora.B0.float() @ lora.A0.float())


def converted(lora: LoRA) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', alpha') of a PiSSA/OLoRA adapter on the unmodified base: W_res + sBA = W0 + s'(B'A'), rank 2r."""
    a = torch.cat([lora.A.weight.detach(), lora.A0], dim=0)
    b = torch.cat([lora.B.weight.detach(), -lora.B0], dim=1)
    # Rank 2r keeps the scale: alpha doubles (alpha/r), or grows by sqrt(2) (rsLoRA's alpha/sqrt(r)).
    return a, b, lora.alpha * (math.sqrt(2) if lora.use_rslora else 2)


def loraplus_param_groups(model, lr: float, loraplus_lr_ratio: float, adapter_name: Optional[str] = None,
                          weight_decay: float = 0.0) -> list:
    """PEFT's create_loraplus_optimizer groups for our adapter: A at lr; B and every 1-d parameter (DoRA's
    magnitude) at lr * ratio, both with weight_decay. Each group's `lr_ratio` lets a schedule scale both alike."""
    from model.model_lora import _resolve_name, lora_layers
    name = _resolve_name(model, adapter_name)
    group_a, group_b = [], []
    for _, m in lora_layers(model):
        if name in m.lora:  # PEFT's order: A, B, then the magnitude
            lora = m.lora[name]
            group_a.append(lora.A.weight)
            group_b += [lora.B.weight] + ([lora.magnitude] if hasattr(lora, "magnitude") else [])
    return [{"params": group_a, "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0},
            {"params": group_b, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay,
             "lr_ratio": loraplus_lr_ratio}]
