"""What LoRA saves, per module and in total, for a model config: parameters and Adam state.

    python scripts/lora_stats.py --preset minimind3 --lora_rank 8
    python scripts/lora_stats.py --preset 7b --lora_rank 16 --lora_targets q_proj,v_proj

The model is built on the meta device (shapes only, no memory), so the table shows its real layers.
A d x k layer costs d*k parameters to fine-tune fully and r(d+k) with LoRA; past the break-even rank
dk/(d+k) the adapter is no smaller than the matrix itself. DoRA (--use_dora) adds a magnitude vector of d values
per module, which trains with A and B.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.model_lora import find_targets  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from model.quantize import KINDS, quantized_bytes  # noqa: E402

PRESETS = {
    "minimind3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=6400),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),  # LLaMA-2-7B's shapes
}
# Adam keeps fp32 m and v per trained parameter (8 bytes), and mixed precision keeps an fp32 gradient (4 bytes).
OPTIMIZER_BYTES_PER_PARAM = 4 + 4 + 4


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024


def lora_table(config: MiniMindConfig, rank: int, targets=None, use_dora: bool = False) -> dict:
    """Per-kind rows (d, k, layers, d*k, r(d+k) (+ d with DoRA), ratio, break-even rank) and totals."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    rows = {}
    for name, layer in find_targets(model, targets):
        kind = name.rsplit(".", 1)[-1]
        d, k = layer.out_features, layer.in_features
        row = rows.setdefault(kind, dict(kind=kind, d=d, k=k, layers=0, full=d * k,
                                         lora=rank * (d + k) + (d if use_dora else 0), magnitude=d if use_dora else 0,
                                         break_even=d * k / (d + k)))
        row["layers"] += 1
    full = sum(r["full"] * r["layers"] for r in rows.values())
    lora = sum(r["lora"] * r["layers"] for r in rows.values())
    magnitudes = sum(r["magnitude"] * r["layers"] for r in rows.values())
    return dict(rows=list(rows.values()), targeted_full=full, lora=lora, model=model.num_parameters(),
                magnitudes=magnitudes, modules=sum(r["layers"] for r in rows.values()), meta=model)


def base_bytes(model, kind: str) -> str:
    """The frozen projections' bytes stored as `kind` against float32 (what --quantize_base saves)."""
    shapes = [(m.out_features, m.in_features) for _, m in find_targets(model, "all-linear")]
    numel = sum(d * k for d, k in shapes)
    stored = sum(quantized_bytes(d, k, kind) for d, k in shapes)
    rest = 4 * (sum(p.numel() for p in model.parameters()) - numel)
    layout = "blocks of 64, double-quantised absmax" if kind == "nf4" else "absmax per row"
    return (f"--quantize_base {kind} ({layout}): the projections take {human_bytes(stored)} instead of "
            f"{human_bytes(4 * numel)} in float32 ({stored / (4 * numel):.3f}x, {8 * stored / numel:.3f} bits per "
            f"weight); with the float32 embeddings and norms ({human_bytes(rest)}) the base takes "
            f"{human_bytes(stored + rest)} instead of {human_bytes(4 * numel + rest)}")


def report(config: MiniMindConfig, rank: int, targets=None, title: str = "custom", use_dora: bool = False,
           quantize_base: str = "none") -> str:
    t = lora_table(config, rank, targets, use_dora)
    # d*k and r(d+k) are per layer; the last row sums them over all targeted layers
    lines = [f"{title}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
             f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), intermediate "
             f"{config.intermediate_size}, vocab {config.vocab_size}: {t['model']:,} parameters",
             f"{'DoRA' if use_dora else 'LoRA'} r={rank} on {targets or 'the square layers (MiniMind default)'}", "",
             f"{'module':<10}{'d':>7}{'k':>7}{'layers':>8}{'d*k':>16}{'r(d+k)+d' if use_dora else 'r(d+k)':>13}"
             f"{'ratio':>9}{'break-even r':>14}"]
    for r in t["rows"]:
        lines.append(f"{r['kind']:<10}{r['d']:>7}{r['k']:>7}{r['layers']:>8}{r['full']:>16,}{r['lora']:>13,}"
                     f"{r['lora'] / r['full']:>9.2%}{r['break_even']:>14.1f}")
    lines.append(f"{'all layers':<32}{t['targeted_full']:>16,}{t['lora']:>13,}{t['lora'] / t['targeted_full']:>9.2%}")
    if use_dora:
        lines.append(f"DoRA magnitude vectors: {t['modules']} (one per module, d values each): "
                     f"{t['magnitudes']:,} of the {t['lora']:,} trained parameters")
    share = t["lora"] / (t["model"] + t["lora"])
    full_state, lora_state = (n * OPTIMIZER_BYTES_PER_PARAM for n in (t["model"], t["lora"]))
    lines += ["", f"trainable: {t['lora']:,} of {t['model'] + t['lora']:,} parameters ({share:.3%}) "
                  f"vs {t['model']:,} (100%) for full fine-tuning",
              f"Adam state (fp32 m, v) + fp32 grads, {OPTIMIZER_BYTES_PER_PARAM} bytes per trained parameter:",
              f"  full fine-tuning {human_bytes(full_state):>12}",
              f"  LoRA             {human_bytes(lora_state):>12}  ({full_state / lora_state:,.0f}x less)"]
    if quantize_base != "none":
        lines.append(base_bytes(t["meta"], quantize_base))
    for r in t["rows"]:
        if rank >= r["break_even"]:
            lines.append(f"warning: r={rank} reaches the break-even rank {r['break_even']:.1f} of {r['kind']} "
                         f"({r['d']}x{r['k']}): there LoRA trains at least as many parameters as the full matrix")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a known model's shape")
    for dim in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        p.add_argument(f"--{dim}", type=int, default=None, help="overrides the preset")
    p.add_argument("--tie_word_embeddings", type=int, choices=(0, 1), default=None, help="overrides the preset")
    p.add_argument("--lora_rank", type=int, default=8, help="r")
    p.add_argument("--use_dora", action="store_true", help="count DoRA's magnitude vectors (d per module) too")
    p.add_argument("--lora_targets", default=None,
                   help="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear; default: square layers")
    p.add_argument("--quantize_base", choices=("none", *KINDS), default="none",
                   help="also show the frozen base's bytes with its projections in NF4 or int8 (QLoRA)")
    args = p.parse_args(argv)
    dims = dict(PRESETS.get(args.preset, {}))
    dims.update({k: v for k, v in vars(args).items() if k in MiniMindConfig.__dataclass_fields__ and v is not None})
    if "tie_word_embeddings" in dims:
        dims["tie_word_embeddings"] = bool(dims["tie_word_embeddings"])
    try:
        print(report(MiniMindConfig(**dims), args.lora_rank, args.lora_targets, args.preset or "custom", args.use_dora,
                     args.quantize_base))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
