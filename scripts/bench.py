"""Benchmarks: LoRA's claims and the pipeline's speed, measured side by side with the ecosystem.

    python scripts/bench.py [order lora_vs_full inference batching ecosystem variants qlora serve fsdp gpu] [--quick]
                            [--device cpu|cuda] [--repeats N] [--threads N] [--write [docs/BENCHMARKS.md]]

No names runs them all (gpu only with --device cuda). Each sub-benchmark is one function returning
(rows, notes): rows are dicts printed as a table, notes are lines such as ratios and targets (met/missed,
never asserted). --write rewrites the named sections of docs/BENCHMARKS.md and keeps the others.
Timing: time.perf_counter, warmup first, median of repeats, explicit torch threads; competing variants run
interleaved (a, b, a, b, ...) so that machine noise hits both alike. --quick: tiny sizes, a smoke test.
transformers, peft and bitsandbytes are imported lazily, by `ecosystem`, `variants` and `qlora` only.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import tempfile
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset.lm_dataset import (DEMO_DIR, LengthGroupedBatchSampler, PadCollator, PretrainDataset,  # noqa: E402
                                SFTDataset)
from model.model_lora import apply_lora, lora_layers, merge_lora, set_adapter, unmerge_lora  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

ALL = ("order", "lora_vs_full", "inference", "batching", "ecosystem", "variants", "qlora", "serve", "fsdp", "gpu")
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DEMO = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
MINIMIND3 = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; matched against the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


# ---- measuring ---------------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device="cpu", warmup: int = 1, inner: int = 1) -> dict:
    """Seconds per call of each fn, {name: [one per repeat]}, running a, b, a, b, ... after a warmup of each.
    inner > 1 times a loop of that many calls (for microsecond-scale work)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def calls_per_sample(fn, target_s: float = 0.02, device="cpu") -> int:
    """How many calls make one timing sample last about target_s (one untimed call calibrates)."""
    start = time.perf_counter()
    fn()
    sync(device)
    return max(1, min(1000, int(target_s / max(time.perf_counter() - start, 1e-7))))


def med(xs) -> float:
    return statistics.median(xs)


def spread(ours, theirs) -> tuple:
    """min/median/max of the per-repeat ratios ours/theirs (repeat i of each ran back to back)."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return min(ratios), med(ratios), max(ratios)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def build_model(dims: dict, device="cpu", seed: int = 0, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**{"vocab_size": 6400, **dims, **kw})).to(device)


def scale_name(dims: dict) -> str:
    return f"{dims['hidden_size']}x{dims['num_hidden_layers']}"


def train_step(model, optimizer, x, y, autocast=contextlib.nullcontext()):
    with autocast:
        loss = model(input_ids=x, labels=y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=torch.device(device).type == "cuda")


def randomize_lora_B(model, seed: int = 1) -> None:
    """B starts at 0; give it values so that an adapter (and merging it) changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for lora in m.lora.values():
                lora.B.weight.copy_(torch.randn(lora.B.weight.shape, generator=g).to(lora.B.weight) * 0.01)


# ---- 1. order: B(Ax) vs (BA)x ------------------------------------------------------------------------------

def bench_order(args):
    dims, ranks, tokens = ([64, 256], [8], [1, 64]) if args.quick else ([768, 4096], [8, 16, 64], [1, 64, 2048])
    rows, dev = [], args.device
    for d in dims:
        k = d
        W0 = torch.randn(d, k, device=dev) / math.sqrt(k)
        for r in ranks:
            A, B = torch.randn(r, k, device=dev) / math.sqrt(k), torch.randn(d, r, device=dev) / math.sqrt(r)
            for n in tokens:
                x = torch.randn(n, k, device=dev)
                fns = {"W0x": lambda: x @ W0.T,
                       "B(Ax)": lambda: (x @ A.T) @ B.T,
                       "(BA)x": lambda: x @ (B @ A).T}
                inner = calls_per_sample(fns["(BA)x"], device=dev)
                t = interleaved(fns, args.repeats, dev, inner=inner)
                flops_lora, flops_full = 2 * n * r * (d + k), 2 * d * r * k + 2 * n * d * k
                rows.append({"d=k": d, "r": r, "tokens": n, "W0x us": 1e6 * med(t["W0x"]),
                             "B(Ax) us": 1e6 * med(t["B(Ax)"]), "(BA)x us": 1e6 * med(t["(BA)x"]),
                             "B(Ax) FLOPs": flops_lora, "(BA)x FLOPs": flops_full,
                             "time ratio": med(t["B(Ax)"]) / med(t["(BA)x"]), "FLOP ratio": flops_lora / flops_full})
    notes = []
    for row in rows:
        if row["d=k"] == dims[-1] and row["r"] == ranks[0]:
            notes.append(f"ratio B(Ax)/(BA)x at d=k={row['d=k']}, r={row['r']}, {row['tokens']} tokens: "
                         f"time {row['time ratio']:.3f}x, FLOPs {row['FLOP ratio']:.4f}x")
    notes.append("W0x is the frozen layer's own matmul, for scale: B(Ax) adds a small fraction of it, "
                 "(BA)x adds more than it (and builds a d x k matrix).")
    return rows, notes


# ---- 2. lora_vs_full: one training step, memory, trainable parameters ---------------------------------------

LORA_SETTINGS = {"LoRA r=8 q,o": "square", "LoRA r=8 all-linear": "all-linear", "full": None}


def train_step_child(spec: dict) -> dict:
    """One setting in a fresh process (peak RSS never goes down): build, warm up, time steps, measure."""
    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    adamw([torch.zeros(1, requires_grad=True)], "cpu")  # the first optimizer imports torch._dynamo (~100 MB)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_model(spec["dims"], dev)
    if spec["targets"] is not None:
        apply_lora(model, rank=8, alpha=16, target_modules=spec["targets"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=g).to(dev)
    model.train()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = interleaved({"step": lambda: train_step(model, optimizer, x, x)}, spec["repeats"], dev)["step"]
    return {"step_s": med(times), "trainable": sum(p.numel() for p in trainable),
            "total": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": sum(t.nbytes for s in optimizer.state.values() for t in s.values()
                                         if torch.is_tensor(t)),
            "peak_bytes": (torch.cuda.max_memory_allocated() if dev.startswith("cuda")
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "base_bytes": 0 if dev.startswith("cuda") else base_rss}


def run_child(spec: dict) -> dict:
    """Run CHILDREN[spec["child"]](spec) in a fresh Python process; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['child']} child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_memory_7b() -> list:
    """Our accounting for LLaMA-2-7B dims, built on the meta device (no allocation): bf16 weights and grads,
    fp32 Adam m and v (+ an fp32 master copy of what trains, as mixed precision keeps); activations excluded."""
    cfg = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False)
    rows = []
    for name, targets in (("full", None), ("LoRA r=8 q,v", ["q_proj", "v_proj"]), ("LoRA r=8 all-linear", "all-linear")):
        with torch.device("meta"):
            model = MiniMindForCausalLM(MiniMindConfig(**cfg))
            if targets is not None:
                apply_lora(model, rank=8, alpha=16, target_modules=targets)
        total = sum(p.numel() for p in model.parameters())
        train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weights, grads, adam, master = 2 * total, 2 * train, 8 * train, 4 * train
        rows.append({"7B-class": name, "params": total, "trainable": train, "weights GB": weights / 1e9,
                     "grads GB": grads / 1e9, "Adam m,v GB": adam / 1e9,
                     "total GB": (weights + grads + adam) / 1e9,
                     "+fp32 master GB": (weights + grads + adam + master) / 1e9,
                     "seed notes": "60-80 GB" if targets is None else "15-25 GB"})
    return rows


def bench_lora_vs_full(args):
    scales = [(TINY, 2, 32)] if args.quick else [(DEMO, 8, 256), (MINIMIND3, 8, 256)]
    rows = []
    for dims, batch, seq in scales:
        for name, targets in LORA_SETTINGS.items():
            r = run_child({"child": "train_step", "dims": dims, "targets": targets, "batch": batch, "seq": seq,
                           "repeats": args.repeats, "device": args.device, "threads": args.threads})
            rows.append({"scale": scale_name(dims), "batch x seq": f"{batch}x{seq}", "setting": name,
                         "step ms": 1e3 * r["step_s"], "trainable": r["trainable"],
                         "trainable %": 100 * r["trainable"] / r["total"],
                         "optimizer state MB": r["optimizer_state_bytes"] / 2**20,
                         ("peak alloc MB" if args.device.startswith("cuda") else "peak RSS MB"): r["peak_bytes"] / 2**20,
                         "over start MB": (r["peak_bytes"] - r["base_bytes"]) / 2**20})
    notes = []
    for dims, *_ in scales:
        by = {row["setting"]: row for row in rows if row["scale"] == scale_name(dims)}
        full, qo = by["full"], by["LoRA r=8 q,o"]
        mem = "peak alloc MB" if args.device.startswith("cuda") else "over start MB"
        notes.append(f"ratio LoRA r=8 q,o / full at {scale_name(dims)}: step time {qo['step ms'] / full['step ms']:.2f}x, "
                     f"memory {qo[mem] / full[mem]:.2f}x, optimizer state "
                     f"{qo['optimizer state MB'] / full['optimizer state MB']:.4f}x")
    notes.append("On CPU, memory is peak RSS of a fresh process per setting; 'over start' subtracts the RSS before "
                 "the model was built. At these sizes activations dominate, so LoRA saves less memory than "
                 "its optimizer-state ratio suggests.")
    return rows, notes


# ---- 3. inference: decode speed with and without an adapter, swap and merge costs ---------------------------

def bench_inference(args):
    scales = [TINY] if args.quick else [DEMO, MINIMIND3]
    new_tokens, dev = (16 if args.quick else 64), args.device
    rows, notes = [], []
    for dims in scales:
        prompt = torch.randint(3, 6400, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
        base = build_model(dims, dev).eval()
        unmerged = copy.deepcopy(base)
        apply_lora(unmerged, rank=8, alpha=16)
        randomize_lora_B(unmerged)
        merged = copy.deepcopy(unmerged)
        merge_lora(merged)
        all_linear = copy.deepcopy(base)
        apply_lora(all_linear, rank=8, alpha=16, target_modules="all-linear")
        randomize_lora_B(all_linear)
        # "base copy" is the same model again: its ratio to base is the noise floor a difference must clear.
        models = {"base": base, "base copy": copy.deepcopy(base), "LoRA r=8 q,o unmerged": unmerged,
                  "LoRA r=8 q,o merged": merged, "LoRA r=8 all-linear unmerged": all_linear}
        fns = {name: (lambda m=m: m.generate(prompt, max_new_tokens=new_tokens, temperature=0, eos_token_id=-1))
               for name, m in models.items()}
        t = interleaved(fns, args.repeats, dev)
        tok_s = {name: new_tokens / med(ts) for name, ts in t.items()}
        # vs base: median over repeats of base time / this time, each pair run back to back (noise cancels).
        vs_base = {name: med([b / a for a, b in zip(t[name], t["base"])]) for name in models}
        for name in models:
            rows.append({"scale": scale_name(dims), "what": f"decode {name}", "tokens/s": tok_s[name],
                         "ms": 1e3 * med(t[name]), "vs base": vs_base[name]})

        two = copy.deepcopy(base)
        apply_lora(two, rank=8, alpha=16, adapter_name="a")
        apply_lora(two, rank=8, alpha=16, adapter_name="b")
        randomize_lora_B(two)
        swap = lambda: (set_adapter(two, "a"), set_adapter(two, "b"))  # noqa: E731
        t_swap = interleaved({"swap": swap}, args.repeats, dev, inner=calls_per_sample(swap, device=dev))["swap"]
        t_mu = interleaved({"merge": lambda: merge_lora(two, "a"), "unmerge": lambda: unmerge_lora(two)},
                           args.repeats, dev)
        for what, ts, per in (("set_adapter a<->b", t_swap, 2), ("merge_lora", t_mu["merge"], 1),
                              ("unmerge_lora", t_mu["unmerge"], 1)):
            rows.append({"scale": scale_name(dims), "what": what, "tokens/s": None, "ms": 1e3 * med(ts) / per,
                         "vs base": None})
        m, u = vs_base["LoRA r=8 q,o merged"], vs_base["LoRA r=8 q,o unmerged"]
        lo_m, _, hi_m = spread(t["base"], t["LoRA r=8 q,o merged"])
        lo_c, _, hi_c = spread(t["base"], t["base copy"])
        notes.append(f"ratio merged/base tokens/s at {scale_name(dims)}: {m:.3f} (target >= 0.97: {verdict(m >= 0.97)}); "
                     f"unmerged/base: {u:.3f} (target >= 0.85: {verdict(u >= 0.85)}); paired merged/base ratios "
                     f"{lo_m:.3f}-{hi_m:.3f} against {lo_c:.3f}-{hi_c:.3f} for base copy/base (the noise floor: the "
                     f"same model timed twice): merged's median is {'inside' if lo_c <= m <= hi_c else 'outside'} "
                     f"the noise floor's range")
    notes.append(f"Greedy decode, batch 1, 16-token prompt, {new_tokens} new tokens (eos disabled); tokens/s = "
                 f"new tokens / whole generate() time, prefill included.")
    return rows, notes


# ---- 4. batching: useful tokens/s, our batching vs padding to max_seq_len ----------------------------------

def padding_fractions(lengths, batches) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def bench_batching(args):
    from model.tokenizer import Tokenizer
    tok = Tokenizer()
    dims = TINY if args.quick else DEMO
    batch, n_batches = (4, 2) if args.quick else (8, 8)
    dev = args.device
    rows, notes = [], []
    for name, cls, max_len in (("pretrain", PretrainDataset, 256), ("sft", SFTDataset, 512)):
        ds = cls(DEMO_DIR / f"{name}.jsonl", tok, max_len)
        # Ours: the trainer's length-grouped batches over the whole file; take the first n_batches of them.
        ours_batches = list(LengthGroupedBatchSampler(ds, batch, seed=0, group_size=64))[:n_batches]
        chosen = [i for b in ours_batches for i in b]
        # MiniMind's: the same samples in random batches, each padded to max_seq_len.
        g = torch.Generator().manual_seed(0)
        shuffled = [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]
        their_batches = [shuffled[k: k + batch] for k in range(0, len(shuffled), batch)]
        samples = {i: ds[i] for i in chosen}
        lengths = {i: len(samples[i][0]) for i in chosen}
        useful = sum(lengths.values())
        ours = [PadCollator(tok.pad_token_id)([samples[i] for i in b]) for b in ours_batches]
        theirs = [PadCollator(tok.pad_token_id, max_length=max_len)([samples[i] for i in b]) for b in their_batches]

        model = build_model(dims, dev)
        model.train()
        optimizer = adamw(model.parameters(), dev)

        def epoch(batches):
            for b in batches:
                train_step(model, optimizer, b["input_ids"].to(dev), b["labels"].to(dev))

        variants = {"ours": ours, "theirs": theirs}
        if name == "pretrain":  # --pack 1: the same texts end to end in rows of max_len, half as many rows per batch
            stream = torch.cat([samples[i][0] for i in chosen])
            packed_rows = stream[: len(stream) // max_len * max_len].view(-1, max_len)
            variants["packed"] = [{"input_ids": r, "labels": r} for r in packed_rows.split(max(1, batch // 2))]
        for b in variants.values():  # warm up every shape once
            train_step(model, optimizer, b[0]["input_ids"].to(dev), b[0]["labels"].to(dev))
        t = interleaved({k: (lambda v=v: epoch(v)) for k, v in variants.items()}, args.repeats, dev, warmup=0)
        lo, mid, hi = spread([1 / x for x in t["ours"]], [1 / x for x in t["theirs"]])
        labels = {"ours": "ours: length-grouped, pad to longest", "theirs": f"MiniMind: random, pad to {max_len}",
                  "packed": f"--pack 1: rows of {max_len}, batch {max(1, batch // 2)}"}
        for key, batches in variants.items():
            processed = sum(b["input_ids"].numel() for b in batches)
            kept = useful if key != "packed" else processed  # the packed stream's tail that fills no row is dropped
            rows.append({"data": name, "batching": labels[key], "samples": len(chosen), "useful tokens": kept,
                         "pad %": 100 * (1 - kept / processed), "seconds": med(t[key]),
                         "useful tokens/s": kept / med(t[key])})
        notes.append(f"ratio useful tokens/s ours/MiniMind on {name} (max_seq_len {max_len}): {mid:.2f}x "
                     f"(min {lo:.2f}, max {hi:.2f})" + (f"; target >= 1.5x: {verdict(mid >= 1.5)}" if name == "sft" else ""))
        if "packed" in variants:
            n_packed = sum(b["input_ids"].numel() for b in variants["packed"])
            lo, mid, hi = spread([n_packed / x for x in t["packed"]], [useful / x for x in t["ours"]])
            notes.append(f"ratio useful tokens/s packed/ours on pretrain: {mid:.2f}x (min {lo:.2f}, max {hi:.2f})")
        if not args.quick:
            # Where our grouping (by line bytes) stands between random batches and grouping by token count.
            all_len = [len(ds[i][0]) for i in range(len(ds))]
            sampler = LengthGroupedBatchSampler(ds, batch, seed=0, group_size=64)
            random_batches = list(LengthGroupedBatchSampler(ds, batch, seed=0, group_size=1))
            by_tokens = LengthGroupedBatchSampler(ds, batch, seed=0, group_size=64, lengths=ds.token_lengths())
            notes.append(f"{name}, whole file, pad to longest: random batches {100 * padding_fractions(all_len, random_batches):.1f}% "
                         f"pad, grouped by line bytes (ours) {100 * padding_fractions(all_len, list(sampler)):.1f}%, "
                         f"grouped by token count {100 * padding_fractions(all_len, list(by_tokens)):.1f}%")
    notes.append(f"Full training step (forward+backward+AdamW) at {scale_name(dims)}, batch {batch}; useful tokens = "
                 f"real (non-pad) tokens; same samples both ways.")
    return rows, notes


# ---- 5. ecosystem: ours vs transformers (+ PEFT), same weights, interleaved -------------------------------

def hf_twin(model, transformers):
    from model.checkpoint import hf_config_dict
    cfg = {k: v for k, v in hf_config_dict(model.config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.config._attn_implementation == "sdpa"
    return hf.to(next(model.parameters()).device)


ECO_TARGETS = {"train": 0.8, "generate": 0.6, "train compiled": 0.65, "generate compiled": 0.35,
               "generate compiled vs theirs compiled": 0.8}  # ours / theirs time, on the CPU


def bench_ecosystem(args):
    try:
        import peft
        import transformers
    except ImportError as e:
        return [], [f"skipped: {e.name} is not installed (pip install -r requirements-dev.txt)"]
    scales = [(TINY, 2, 32, 8)] if args.quick else [(DEMO, 8, 256, 64), (MINIMIND3, 8, 256, 64)]
    rows, notes, costs = [], [], []
    for dims, batch, seq, new_tokens in scales:
        spec = {"dims": dims, "batch": batch, "seq": seq, "new_tokens": new_tokens, "repeats": args.repeats,
                "threads": torch.get_num_threads(), "device": args.device}
        with tempfile.TemporaryDirectory() as cache:  # compile cost from an empty cache, then from the kept one
            spec["cache"] = cache
            cold, warm = run_child({**spec, "child": "compile_cost"}), run_child({**spec, "child": "compile_cost"})
            # A fresh process per scale: what earlier sections left in the allocator must not tilt the comparison.
            r = run_child({**spec, "child": "ecosystem"})
        costs.append(f"{scale_name(dims)}: first compiled LoRA step {cold['train']:.1f} s with an empty compile cache, "
                     f"{warm['train']:.1f} s with the cache a previous run left; first compiled generate "
                     f"{cold['generate']:.1f} s / {warm['generate']:.1f} s; theirs static+compiled "
                     f"{r['theirs_compile_s']:.1f} s (empty cache)")
        for key, label in (("train", f"LoRA train step, batch {batch}x{seq}"),
                           ("train compiled", f"LoRA train step, batch {batch}x{seq}, ours compiled"),
                           ("generate", f"greedy generate {new_tokens} tokens"),
                           ("generate compiled", f"greedy generate {new_tokens} tokens, ours compiled"),
                           ("generate compiled vs theirs compiled",
                            f"greedy generate {new_tokens} tokens, both static cache + compiled")):
            row = eco_row(dims, label, r[key])
            row["key"] = key
            if "generate" in key:
                row["same tokens"] = "yes" if r["same_tokens"][key] else "no"
            rows.append(row)
    for row in rows:
        key = row.pop("key")
        check = (f"; target <= {ECO_TARGETS[key]}x on CPU: {verdict(row['ratio med'] <= ECO_TARGETS[key])}"
                 if args.device == "cpu" else "")
        notes.append(f"ratio ours/theirs time, {row['task']} at {row['scale']}: {row['ratio med']:.2f}x "
                     f"(min {row['ratio min']:.2f}, max {row['ratio max']:.2f}){check}")
    notes.append("compile cost (one-time per shape; kept in the inductor cache between runs): " + "; ".join(costs))
    notes.append(f"theirs = transformers {transformers.__version__} Qwen3ForCausalLM (sdpa attention) + peft "
                 f"{peft.__version__} for the LoRA step, eager unless the row says compiled (theirs compiled: "
                 f"generate(cache_implementation='static') with a CompileConfig, fullgraph, C++ wrapper as ours); "
                 f"ours compiled: torch.compile(model) for the step (what --use_compile 1 runs), generate(compile="
                 f"True) for decoding; fp32; same {torch.get_num_threads()} threads; one fresh process per scale, "
                 f"every variant in it, warmed up, then run interleaved.")
    return rows, notes


def lora_pair(base, peft, transformers):
    """Ours and theirs with identical weights: r=8, alpha 16 on q,k,v,o, in training mode."""
    ours = copy.deepcopy(base).train()
    apply_lora(ours, rank=8, alpha=16, target_modules=QKVO)
    theirs = peft.get_peft_model(hf_twin(base, transformers), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=QKVO, lora_dropout=0.0)).train()
    with torch.no_grad():
        for name, m in lora_layers(ours):
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(m.lora["default"].A.weight)
            target.lora_B["default"].weight.copy_(m.lora["default"].B.weight)
    return ours, theirs


def compile_cost_child(spec: dict) -> dict:
    """Seconds of the first compiled LoRA step and the first compiled generate, with spec["cache"] as the cache."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["cache"]
    torch.set_num_threads(spec["threads"])
    dev, base = spec["device"], build_model(spec["dims"], spec["device"])
    ours = copy.deepcopy(base).train()
    apply_lora(ours, rank=8, alpha=16, target_modules=QKVO)
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)).to(dev)
    net, opt = torch.compile(ours), adamw([p for p in ours.parameters() if p.requires_grad], dev)
    start = time.perf_counter()
    train_step(net, opt, x, x)
    sync(dev)
    train_s = time.perf_counter() - start
    prompt = torch.randint(3, 6400, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    start = time.perf_counter()
    base.eval().generate(prompt, max_new_tokens=spec["new_tokens"], eos_token_id=-1, compile=True)
    sync(dev)
    return {"train": train_s, "generate": time.perf_counter() - start}


def ecosystem_child(spec: dict) -> dict:
    """One scale: ours (eager and compiled) vs transformers (+ PEFT) on identical weights, interleaved; raw times."""
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls APIs transformers deprecates
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["cache"]
    torch.set_num_threads(spec["threads"])
    dev, dims, repeats = spec["device"], spec["dims"], spec["repeats"]
    base = build_model(dims, dev)
    # LoRA training step: r=8, alpha 16 on q,k,v,o, AdamW over the LoRA parameters, identical weights.
    ours, theirs = lora_pair(base, peft, transformers)
    compiled = copy.deepcopy(ours)
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)).to(dev)
    opts = [adamw([p for p in m.parameters() if p.requires_grad], dev) for m in (ours, compiled, theirs)]
    net = torch.compile(compiled)
    t = interleaved({"ours": lambda: train_step(ours, opts[0], x, x),
                     "compiled": lambda: train_step(net, opts[1], x, x),
                     "theirs": lambda: train_step(theirs, opts[2], x, x)}, repeats, dev, warmup=2)
    result = {"train": {"ours": t["ours"], "theirs": t["theirs"]},
              "train compiled": {"ours": t["compiled"], "theirs": t["theirs"]}}
    del ours, theirs, compiled, net, opts

    # Greedy generation of exactly new_tokens tokens with the KV cache, batch 1.
    new_tokens = spec["new_tokens"]
    ours, theirs = base.eval(), hf_twin(base, transformers).eval()
    prompt = torch.randint(3, 6400, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(prompt)
    compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode=None,
                                                options={"cpp_wrapper": True})
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    out = {}

    def ours_gen(compile=False):
        out["ours compiled" if compile else "ours"] = ours.generate(prompt, max_new_tokens=new_tokens,
                                                                    eos_token_id=-1, compile=compile)

    def theirs_gen(static=False):
        kw = {"cache_implementation": "static", "compile_config": compile_config} if static else {}
        with torch.inference_mode():
            out["theirs compiled" if static else "theirs"] = theirs.generate(
                prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=0, **kw)

    start = time.perf_counter()
    theirs_gen(static=True)
    sync(dev)
    result["theirs_compile_s"] = time.perf_counter() - start
    t = interleaved({"ours": ours_gen, "compiled": lambda: ours_gen(True), "theirs": theirs_gen,
                     "theirs compiled": lambda: theirs_gen(True)}, repeats, dev, warmup=2)
    for name, tokens in out.items():
        assert tokens.shape == (1, 16 + new_tokens), (name, tokens.shape)
    result.update({"generate": {"ours": t["ours"], "theirs": t["theirs"]},
                   "generate compiled": {"ours": t["compiled"], "theirs": t["theirs"]},
                   "generate compiled vs theirs compiled": {"ours": t["compiled"], "theirs": t["theirs compiled"]}})
    result["same_tokens"] = {
        "generate": torch.equal(out["ours"], out["theirs"]),
        "generate compiled": torch.equal(out["ours compiled"], out["theirs"]),
        "generate compiled vs theirs compiled": torch.equal(out["ours compiled"], out["theirs compiled"])}
    return result


def eco_row(dims, task, t) -> dict:
    lo, mid, hi = spread(t["ours"], t["theirs"])
    return {"scale": scale_name(dims), "task": task, "ours ms": 1e3 * med(t["ours"]),
            "theirs ms": 1e3 * med(t["theirs"]), "ratio min": lo, "ratio med": mid, "ratio max": hi}


# ---- 5b. qlora: LoRA on an NF4 base, against our fp32 LoRA and transformers + bitsandbytes + PEFT -------------

QLORA_TARGETS = {"ours NF4 / theirs QLoRA": 0.9, "ours NF4 / ours fp32 LoRA": 1.5, "NF4 / fp32 projection bytes": 0.16}


def qlora_models(spec: dict, variants) -> dict:
    """{variant: (model, optimizer)} with identical base weights and adapters: r=8, alpha 16, all-linear, training
    mode. "nf4": ours on quantize_base(nf4); "fp32": ours on the float base; "theirs": our --to_hf export loaded by
    transformers with BitsAndBytesConfig (NF4, double quantisation, float32 compute), get_peft_model on top."""
    from model.quantize import quantize_base
    dev, base = spec["device"], build_model(spec["dims"], spec["device"])
    models = {}
    for name in ("fp32", "nf4"):
        if name in variants or "theirs" in variants:
            m = copy.deepcopy(base)
            if name == "nf4":
                quantize_base(m, "nf4")
            apply_lora(m, rank=8, alpha=16, target_modules="all-linear")
            randomize_lora_B(m)
            models[name] = m.train()
    if "theirs" in variants:
        import peft
        import transformers
        from scripts.convert_model import export_hf
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")  # bitsandbytes and peft warn about CPU use and deprecations
        with tempfile.TemporaryDirectory() as folder:
            export_hf(base, folder, torch.float32)
            del base
            config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.float32)
            hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, quantization_config=config, device_map=dev,
                                                               dtype=torch.float32)
        theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                         lora_dropout=0.0)).train()
        with torch.no_grad():
            for name, m in lora_layers(models["nf4"]):
                target = theirs.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(m.lora["default"].A.weight)
                target.lora_B["default"].weight.copy_(m.lora["default"].B.weight)
        models["theirs"] = theirs
    return {name: (m, adamw([p for p in m.parameters() if p.requires_grad], dev))
            for name, m in models.items() if name in variants}


def qlora_child(spec: dict) -> dict:
    """The three steps in one process, interleaved (time); or one variant alone (memory: peak over the step)."""
    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)).to(dev)
    if spec["measure"] == "time":
        from model.quantize import quantization_of
        models = qlora_models(spec, ("nf4", "fp32", "theirs"))
        with torch.no_grad():
            losses = {name: m(input_ids=x, labels=x).loss.item() for name, (m, _) in models.items()}
        q = quantization_of(models["nf4"][0])
        t = interleaved({name: (lambda m=m, o=o: train_step(m, o, x, x)) for name, (m, o) in models.items()},
                        spec["repeats"], dev, warmup=spec["warmup"])
        return {"times": t, "losses": losses, "bytes": q["bytes"], "fp32_bytes": q["fp32_bytes"],
                "bits_per_weight": q["bits_per_weight"]}
    (model, optimizer), = qlora_models(spec, (spec["measure"],)).values()
    train_step(model, optimizer, x, x)  # optimizer state and allocator pools exist before the peak is reset
    sync(dev)
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap (the float base quantised from)
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if dev.startswith("cuda"):
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = _proc_status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
            f.write("5")
    train_step(model, optimizer, x, x)
    sync(dev)
    peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else _proc_status_kb("VmHWM") * 1024
    return {"resident": resident, "peak": peak}


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def bench_qlora(args):
    try:
        import bitsandbytes  # noqa: F401
        import peft
        import transformers
    except ImportError as e:
        return [], [f"skipped: {e.name} is not installed (pip install -r requirements-dev.txt)"]
    scales = [(TINY, 2, 32)] if args.quick else [(DEMO, 8, 256), (MINIMIND3, 8, 256)]
    labels = {"nf4": "ours, NF4 base", "fp32": "ours, fp32 base", "theirs": "transformers + bitsandbytes + PEFT, NF4"}
    rows, notes = [], []
    mem = "peak alloc MB" if args.device.startswith("cuda") else "peak RSS MB"
    for dims, batch, seq in scales:
        spec = {"child": "qlora", "dims": dims, "batch": batch, "seq": seq, "repeats": args.repeats,
                "warmup": 1 if args.quick else 2, "device": args.device, "threads": args.threads}
        r = run_child({**spec, "measure": "time"})
        # memory: a fresh process each (peak RSS never goes down); --quick leaves it out, as a smoke test
        memory = {} if args.quick else {name: run_child({**spec, "measure": name}) for name in labels}
        for name, label in labels.items():
            rows.append({"scale": scale_name(dims), "batch x seq": f"{batch}x{seq}", "setting": label,
                         "step ms": 1e3 * med(r["times"][name]), "first loss": r["losses"][name],
                         **({"resident before step MB": memory[name]["resident"] / 2**20,
                             mem: memory[name]["peak"] / 2**20} if memory else {})})
        for key, (a, b) in (("ours NF4 / theirs QLoRA", ("nf4", "theirs")),
                            ("ours NF4 / ours fp32 LoRA", ("nf4", "fp32"))):
            lo, mid, hi = spread(r["times"][a], r["times"][b])
            peak = f"; peak memory {memory[a]['peak'] / memory[b]['peak']:.2f}x" if memory else ""
            notes.append(f"ratio {key} step time at {scale_name(dims)}: {mid:.2f}x (min {lo:.2f}, max {hi:.2f})"
                         f"{peak}; target <= {QLORA_TARGETS[key]}x: {verdict(mid <= QLORA_TARGETS[key])}")
        if dims is scales[-1][0]:
            share = r["bytes"] / r["fp32_bytes"]
            notes.append(f"ratio NF4 / fp32 frozen projection bytes at {scale_name(dims)}: {share:.4f}x "
                         f"({r['bytes'] / 2**20:.1f} MiB vs {r['fp32_bytes'] / 2**20:.1f} MiB, "
                         f"{r['bits_per_weight']:.3f} bits per weight); target <= "
                         f"{QLORA_TARGETS['NF4 / fp32 projection bytes']}x: "
                         f"{verdict(share <= QLORA_TARGETS['NF4 / fp32 projection bytes'])}")
    notes.append(f"LoRA r=8, alpha 16 on all seven projections, AdamW over A and B, fp32 compute, identical base "
                 f"weights and adapters in all three (first loss: the same batch before any step). theirs = "
                 f"transformers {transformers.__version__} loading our --to_hf export with BitsAndBytesConfig(nf4, "
                 f"double quantisation, compute float32) + peft {peft.__version__} get_peft_model; bitsandbytes "
                 f"{bitsandbytes.__version__}. Time: one process, the three steps interleaved after "
                 f"{spec['warmup']} untimed round(s), {args.threads} threads. Memory: "
                 + ("not measured with --quick." if args.quick else "one fresh process per setting; resident = after "
                    "building and one step, peak = the highest during the next step."))
    return rows, notes


# ---- 5b. variants: DoRA, LoRA+, PiSSA init, each against plain LoRA and against PEFT's own -----------------

VARIANTS = {"LoRA": {}, "DoRA": {"use_dora": True}, "LoRA+": {"loraplus": 16}, "PiSSA init": {"init": "pissa"}}
VARIANT_TARGETS = {"vs PEFT": 0.9, "DoRA vs LoRA": 1.5}  # ours / theirs time; DoRA / plain LoRA, both ours


def bench_variants(args):
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return [], [f"skipped: {e.name} is not installed (pip install -r requirements-dev.txt)"]
    scales = [(TINY, 2, 32)] if args.quick else [(DEMO, 8, 256), (MINIMIND3, 8, 256)]
    rows, notes = [], []
    cuda = args.device.startswith("cuda")
    mem = "peak alloc MB" if cuda else "saved activations MB"
    for dims, batch, seq in scales:
        r = run_child({"child": "variants", "dims": dims, "batch": batch, "seq": seq, "repeats": args.repeats,
                       "threads": torch.get_num_threads(), "device": args.device})
        plain = r["ours LoRA"]["times"]
        for name in VARIANTS:
            ours, theirs = r[f"ours {name}"], r[f"PEFT {name}"]
            lo, mid, hi = spread(ours["times"], theirs["times"])
            rows.append({"scale": scale_name(dims), "batch x seq": f"{batch}x{seq}", "variant": name,
                         "ours ms": 1e3 * med(ours["times"]), "PEFT ms": 1e3 * med(theirs["times"]),
                         "ours/PEFT": mid, "ours/PEFT min": lo, "ours/PEFT max": hi,
                         "ours/our LoRA": spread(ours["times"], plain)[1],
                         f"ours {mem}": ours["bytes"] / 2**20, f"PEFT {mem}": theirs["bytes"] / 2**20,
                         "same loss": "yes" if abs(ours["loss"] - theirs["loss"]) <= 1e-4 else "no"})
    for row in rows:
        notes.append(f"ratio ours/PEFT time, {row['variant']} step at {row['scale']}: {row['ours/PEFT']:.2f}x (min "
                     f"{row['ours/PEFT min']:.2f}, max {row['ours/PEFT max']:.2f}); target <= "
                     f"{VARIANT_TARGETS['vs PEFT']}x: {verdict(row['ours/PEFT'] <= VARIANT_TARGETS['vs PEFT'])}")
    for row in rows:
        if row["variant"] == "DoRA":
            notes.append(f"ratio DoRA / plain LoRA time (both ours) at {row['scale']}: {row['ours/our LoRA']:.2f}x; "
                         f"target <= {VARIANT_TARGETS['DoRA vs LoRA']}x: "
                         f"{verdict(row['ours/our LoRA'] <= VARIANT_TARGETS['DoRA vs LoRA'])}")
    notes.append("r=8, alpha 16 on all seven projections (train_lora's targets), AdamW over what trains, fp32; LoRA+ "
                 "ratio 16 (ours: loraplus_param_groups, PEFT: create_loraplus_optimizer); PiSSA init is the same step "
                 "as LoRA after an SVD start. PEFT = transformers' Qwen3 + peft "
                 f"{peft.__version__} with the same weights (A, B, magnitude copied; PiSSA's SVD gives both the same "
                 "start); 'same loss' compares the first step's loss (<= 1e-4). One fresh process per scale, every "
                 "variant of both in it, warmed up, then run interleaved.")
    notes.append("memory: " + ("torch.cuda.max_memory_allocated over one step, minus what was allocated before it"
                               if cuda else "bytes of the tensors autograd saves for backward in one step (storages "
                               "counted once, parameters excluded): what the variant adds to a step's peak; peak RSS "
                               "cannot be taken per variant inside one process"))
    return rows, notes


def variant_pair(base, name, spec, peft, transformers):
    """Ours and PEFT's model of one variant, equal weights, in training mode, each with its optimizer."""
    from model.lora_variants import loraplus_param_groups
    from peft.optimizers import create_loraplus_optimizer
    v, dev = VARIANTS[name], spec["device"]
    ours = copy.deepcopy(base).train()
    apply_lora(ours, rank=8, alpha=16, target_modules="all-linear", use_dora=v.get("use_dora", False),
               init_lora_weights=v.get("init", "default"))
    theirs = peft.get_peft_model(hf_twin(base, transformers), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=v.get("use_dora", False),
        init_lora_weights=v.get("init", True))).train()
    if "init" not in v:  # PiSSA: the same SVD already gave both the same A and B
        randomize_lora_B(ours)
        with torch.no_grad():
            for module, m in lora_layers(ours):
                t, lora = theirs.base_model.model.get_submodule(module), m.lora["default"]
                t.lora_A["default"].weight.copy_(lora.A.weight)
                t.lora_B["default"].weight.copy_(lora.B.weight)
                if hasattr(lora, "magnitude"):
                    t.lora_magnitude_vector["default"].weight.copy_(lora.magnitude)
    fused = torch.device(dev).type == "cuda"
    if "loraplus" in v:
        ours_opt = torch.optim.AdamW(loraplus_param_groups(ours, 1e-4, v["loraplus"]), lr=1e-4, weight_decay=0.0,
                                     fused=fused)
        theirs_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=v["loraplus"],
                                               weight_decay=0.0, fused=fused)
    else:
        ours_opt, theirs_opt = (adamw([p for p in m.parameters() if p.requires_grad], dev) for m in (ours, theirs))
    return (ours, ours_opt), (theirs, theirs_opt)


def step_memory(model, x, device) -> int:
    """One forward/backward: CUDA's peak allocation over it, or on the CPU the bytes autograd saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    sync(device)
    start = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0
    if start:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return torch.cuda.max_memory_allocated() - start if start else sum(saved.values())


def variants_child(spec: dict) -> dict:
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")  # peft warns about APIs transformers deprecates
    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    base = build_model(spec["dims"], dev)
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)).to(dev)
    fns, result = {}, {}
    for name in VARIANTS:
        for who, (model, opt) in zip(("ours", "PEFT"), variant_pair(base, name, spec, peft, transformers)):
            with torch.no_grad():
                loss = model(input_ids=x, labels=x).loss.item()
            result[f"{who} {name}"] = {"loss": loss, "bytes": step_memory(model, x, dev)}
            fns[f"{who} {name}"] = lambda m=model, o=opt: train_step(m, o, x, x)
    times = interleaved(fns, spec["repeats"], dev, warmup=2)
    for key, t in times.items():
        result[key]["times"] = t
    return result


# ---- 6. serve: many adapters on one base, through the real server ------------------------------------------

def start_server(folder: Path, h: int, flags: list, threads: int):
    """scripts/serve_openai_api.py on a free port in its own process; returns (process, url) once it answers."""
    import socket
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "scripts" / "serve_openai_api.py"), "--save_dir", str(folder), "--hidden_size",
           str(h), "--port", str(port), "--device", "cpu", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)


def post(url: str, path: str, body: dict):
    import urllib.request
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def stream_reply(url: str, model: str, max_tokens: int) -> tuple:
    """(seconds to the first content, completion tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with post(url, "/v1/chat/completions", body) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return ttft, tokens


def load_clients(url: str, models: list, per_client: int, max_tokens: int) -> dict:
    """len(models) concurrent clients, client i sending per_client requests to models[i] one after another."""
    import concurrent.futures

    def client(model):
        return [stream_reply(url, model, max_tokens) for _ in range(per_client)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = [r for rs in pool.map(client, models) for r in rs]
    wall = time.perf_counter() - t0
    return {"tokens/s": sum(t for _, t in results) / wall, "ttft ms": 1e3 * med([f for f, _ in results if f])}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_serve(args):
    import tempfile
    from model.checkpoint import save_model
    from model.model_lora import save_lora
    from model.tokenizer import Tokenizer
    if args.device != "cpu":
        return [], ["skipped: the serving benchmark runs on the CPU (the server's own --device is not timed here)"]
    dims = TINY if args.quick else DEMO
    levels, per_client, new = ((1, 4), 1, 16) if args.quick else ((1, 4, 16), 2, 64)
    threads, h = torch.get_num_threads(), dims["hidden_size"]
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = build_model(dims, vocab_size=Tokenizer().vocab_size).eval()
    save_model(model, folder / f"full_sft_{h}.pth")
    apply_lora(model, rank=16, alpha=32, target_modules="all-linear", adapter_name="x")
    for i in range(100):  # the demo's adapter shape: r=16 on all seven projections
        randomize_lora_B(model, seed=i)
        save_lora(model, folder / "lora" / f"lora_{i:03d}_{h}.pth", "x")
    names = [f"lora_{i:03d}" for i in range(100)]
    top = max(levels)
    flags = ["--lora_weight", ",".join(names[:top]), "--max_seq_len", "256", "--max_loras", str(top),
             "--allow_runtime_lora"]
    rows, notes, got = [], [], {}
    batched, url = start_server(folder, h, flags + ["--max_batch", str(top)], threads)
    single, url1 = start_server(folder, h, flags + ["--max_batch", "1"], threads)
    try:
        for url_, n in ((url, 1), (url1, 1)):
            load_clients(url_, names[:n], 1, 4)  # warm up both servers
        for n in levels:
            for rep in range(2 if args.quick else 3):  # interleaved repeats; the median is reported
                for case, target, models in (("a", url, [names[0]] * n), ("b", url, names[:n]),
                                             ("c", url1, names[:n])):
                    got.setdefault((case, n), []).append(load_clients(target, models, per_client, new))
        what = {"a": "all on one adapter", "b": "each on its own adapter",
                "c": "one request at a time (max_batch 1)"}
        for (case, n), results in got.items():
            rows.append({"clients": n, "case": f"({case}) {what[case]}",
                         "tokens/s": med([r["tokens/s"] for r in results]),
                         "ttft ms": med([r["ttft ms"] for r in results])})
        rss_before = rss_mb(batched.pid)
        for i, name in enumerate(names[top:]):
            post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(
                folder / "lora" / f"{name}_{h}.pth")}).read()
        rss_registered = rss_mb(batched.pid)
        load_clients(url, names[-top:], 1, 4)  # swap in adapters that were only registered
        rss_after = rss_mb(batched.pid)
    finally:
        for proc in (batched, single):
            proc.terminate()
            proc.wait(30)
    tps = {key: med([r["tokens/s"] for r in v]) for key, v in got.items()}
    b_a, b_c = tps[("b", top)] / tps[("a", top)], tps[("b", top)] / tps[("c", top)]
    ttft = med([r["ttft ms"] for r in got[("b", top)]])
    notes.append(f"ratio (b)/(a) tokens/s at {top} clients: {b_a:.2f} (target >= 0.85: {verdict(b_a >= 0.85)}); "
                 f"(b)/(c): {b_c:.2f} (target >= 3: {verdict(b_c >= 3)}); time to first token at {top} clients, "
                 f"each on its own adapter: {ttft:.0f} ms (median)")
    notes.append(f"resident memory of the server (max_loras {top}): {rss_before:.0f} MB with {top} adapters registered, "
                 f"{rss_registered:.0f} MB with 100 registered, {rss_after:.0f} MB after {top} of the others were "
                 f"swapped in from disk")
    notes.append(f"Model {scale_name(dims)} (random weights), adapters r=16 alpha 32 on all seven projections; each "
                 f"client sends {per_client} streamed greedy requests of {new} tokens one after another; tokens/s = "
                 f"all completion tokens / wall time; (c) is the same server with --max_batch 1, i.e. one request at "
                 f"a time with its adapter set for it. Server and clients share this machine's {os.cpu_count()} "
                 f"cores; the server runs {threads} torch threads.")
    return rows, notes


# ---- 7. gpu: pretraining MFU --------------------------------------------------------------------------------

def peak_flops(args) -> tuple:
    if args.peak_flops:
        return args.peak_flops, "--peak_flops"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():  # specific names first
        if key in name:
            return flops, key
    return None, name


def bench_gpu(args):
    if not args.device.startswith("cuda"):
        return [], ["skipped: needs --device cuda"]
    if not torch.cuda.is_available():
        return [], ["skipped: CUDA is not available here"]
    dims, batch, seq = (TINY, 4, 128) if args.quick else (MINIMIND3, 32, 512)
    peak, matched = peak_flops(args)
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randint(0, 6400, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    rows, notes = [], []
    for compiled in (False, True):
        model = build_model(dims, dev).train()
        n_params = model.num_parameters()
        optimizer = adamw(model.parameters(), dev)
        net = torch.compile(model) if compiled else model
        step = lambda: train_step(net, optimizer, x, x, autocast)  # noqa: E731
        torch.cuda.reset_peak_memory_stats()
        ts = interleaved({"step": step}, max(args.repeats, 3) * 4, dev, warmup=3)["step"]
        tok_s = batch * seq / med(ts)
        mfu = 6 * n_params * tok_s / peak if peak else None
        rows.append({"scale": scale_name(dims), "batch x seq": f"{batch}x{seq}", "torch.compile": compiled,
                     "params": n_params, "step ms": 1e3 * med(ts), "tokens/s": tok_s,
                     "MFU %": 100 * mfu if mfu else None, "peak alloc MB": torch.cuda.max_memory_allocated() / 2**20})
        del model, net, optimizer
    best = max((r["MFU %"] or 0) for r in rows)
    notes.append(f"ratio MFU (6·N·tokens/s / peak), best of eager/compiled: {best:.1f}% "
                 f"(target >= 40%: {verdict(best >= 40)}); device {torch.cuda.get_device_name()}, peak "
                 f"{peak / 1e12 if peak else float('nan'):.0f} TFLOPs bf16 dense ({matched})")
    notes.append("N counts every parameter once (tied lm_head included: its matmul is real work); attention's "
                 "own FLOPs are not counted, so MFU is slightly understated. Peak bf16 dense FLOPs used: "
                 + ", ".join(f"{k} {v / 1e12:.0f}T" for k, v in PEAK_BF16_FLOPS.items()) + ".")
    return rows, notes


def local_bytes(tensors) -> int:
    """Bytes this rank holds of the tensors: a sharded DTensor counts its local shard only."""
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if torch.is_tensor(t))


def fsdp_child(spec: dict) -> dict:
    """One rank of a torchrun launch: the same model under DDP and under FSDP2 (trainer/distributed.py's
    sharding), stepped interleaved; bytes of parameters, gradients and AdamW state this rank holds."""
    import torch.distributed as dist
    from trainer import distributed
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(dist.get_rank()))
    setups, out = {}, {}
    for mode in ("DDP", "FSDP2"):
        model = build_model(spec["dims"]).train()
        if mode == "DDP":
            net, params = torch.nn.parallel.DistributedDataParallel(model), list(model.parameters())
        else:
            net, params = model, distributed.shard(model, torch.device("cpu"), torch.float32, list(model.parameters()))
        setups[mode] = (net, params, adamw(params, "cpu"))
    for mode, (net, params, optimizer) in setups.items():
        net(input_ids=x, labels=x).loss.backward()
        grads = local_bytes([p.grad for p in params])
        optimizer.step()  # creates AdamW's moments
        optimizer.zero_grad(set_to_none=True)
        out[mode] = {"params": local_bytes(params), "grads": grads,
                     "optimizer": local_bytes([t for st in optimizer.state.values() for t in st.values()])}
    times = interleaved({m: (lambda s=s: train_step(s[0], s[2], x, x)) for m, s in setups.items()},
                        spec["repeats"], warmup=1)
    for mode in setups:
        out[mode]["times"] = times[mode]
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return out if rank == 0 else None


def bench_fsdp(args):
    if args.device != "cpu":
        return [], ["skipped: needs --device cpu (2 gloo processes); on GPUs see the command in its notes"]
    dims, batch, seq = (TINY, 2, 32) if args.quick else (MINIMIND3, 2, 128)
    spec = {"child": "fsdp", "dims": dims, "batch": batch, "seq": seq, "repeats": args.repeats,
            "threads": max(1, args.threads // 2)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "--_child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if done.returncode != 0:
        raise RuntimeError(f"fsdp child failed: {done.stderr.strip().splitlines()[-1:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's; every rank holds the same sizes
    rows = []
    for mode in ("DDP", "FSDP2"):
        r = res[mode]
        total = r["params"] + r["grads"] + r["optimizer"]
        rows.append({"mode": mode, "scale": scale_name(dims), "batch x seq per rank": f"{batch}x{seq}",
                     "params MB/rank": r["params"] / 2**20, "grads MB/rank": r["grads"] / 2**20,
                     "AdamW MB/rank": r["optimizer"] / 2**20, "total MB/rank": total / 2**20,
                     "step s": med(r["times"])})
    ratio = rows[1]["total MB/rank"] / rows[0]["total MB/rank"]
    lo, mid, hi = spread(res["FSDP2"]["times"], res["DDP"]["times"])
    return rows, [f"ratio FSDP2/DDP bytes per rank (parameters + gradients + AdamW state): {ratio:.3f} "
                  f"(target <= 0.55: {verdict(ratio <= 0.55)})",
                  f"ratio FSDP2/DDP step time: {mid:.2f} (min {lo:.2f}, max {hi:.2f}; gloo on CPU: all-gathers and "
                  f"reduce-scatters per layer cost more than DDP's one bucketed all-reduce)",
                  "Bytes are counted tensor by tensor (a DTensor's local shard), float32; DDP also keeps a bucket "
                  "copy of the gradients for its all-reduce, not counted here. Activations are not counted.",
                  "On GPUs (not yet run there): `torchrun --nproc_per_node 8 trainer/train_pretrain.py --hidden_size "
                  "768 --num_hidden_layers 8 --fsdp 1` against the same command without `--fsdp 1` (DDP); compare "
                  "`torch.cuda.max_memory_allocated()` per rank and tokens/s. bf16 parameters, fp32 gradient "
                  "reduction (`--dtype bfloat16`, the default)."]


# ---- output ------------------------------------------------------------------------------------------------

def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def table(rows) -> str:
    """A Markdown table (also readable on a terminal) over the union of the rows' keys, in order."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[fmt(row.get(c)) for c in cols] for row in rows]
    width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in cells])


TITLES = {"order": "LoRA matmul order: B(Ax) vs (BA)x", "lora_vs_full": "LoRA vs full fine-tuning: one training step",
          "inference": "Inference: decode with adapters, swap and merge",
          "batching": "Batching: useful tokens/s vs padding to max_seq_len",
          "ecosystem": "Ecosystem: ours vs transformers + PEFT",
          "qlora": "QLoRA: LoRA on an NF4 base vs fp32 LoRA and transformers + bitsandbytes + PEFT",
          "variants": "LoRA variants: one training step, ours vs PEFT's implementation of each",
          "serve": "Serving: many adapters on one base (scripts/serve_openai_api.py)",
          "fsdp": "FSDP2 vs DDP: per-rank training state and step time, 2 processes", "gpu": "GPU: pretraining MFU"}


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def section(name, rows, notes, args, run) -> str:
    heading = f"## {name} ({torch.device(args.device).type}): {TITLES[name]}"
    body = [heading, "", f"Run {run['date']} on {run['where']}: `{run['command']}`", ""]
    if rows:
        body += [table(rows), ""]
    if name == "lora_vs_full" and rows:
        body += [table(training_memory_7b()), ""]
    return "\n".join(body + [f"- {n}" for n in notes]) + "\n"


def write_markdown(path: Path, sections: dict, run) -> None:
    """Replace this run's sections in the file, keep every other section (e.g. a GPU run's) as it was."""
    kept = {}
    if path.is_file():
        current = None
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith("## "):
                current = line.split(":", 1)[0]
                kept[current] = ""
            if current is not None:
                kept[current] += line
    for text in sections.values():
        kept[text.split(":", 1)[0]] = text
    header = ["# Benchmarks", "", "Made by `scripts/bench.py` (see its docstring); each section names the run, "
              "machine and command that produced it. Regenerate a section by running its name with `--write`.",
              "", f"Last run: {run['date']}, {run['where']}: `{run['command']}`", ""]
    order = sorted(kept, key=lambda h: (ALL.index(h.split()[1]) if h.split()[1] in ALL else 99, h))
    text = "\n".join(header) + "\n" + "\n".join(kept[h].rstrip("\n") + "\n" for h in order)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


CHILDREN = {"train_step": train_step_child, "ecosystem": ecosystem_child, "compile_cost": compile_cost_child,
            "qlora": qlora_child, "variants": variants_child, "fsdp": fsdp_child}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        spec = json.loads(argv[1])
        result = CHILDREN[spec["child"]](spec)
        if result is not None:  # one line per run: of a torchrun launch's ranks, rank 0 reports
            print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("names", nargs="*", help=f"sub-benchmarks (default: all): {', '.join(ALL)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 repeats: a smoke test in seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after warmup (default 7, quick 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (all cores)")
    p.add_argument("--peak_flops", type=float, default=None, help="bf16 peak FLOP/s for MFU on an unlisted GPU")
    p.add_argument("--write", nargs="?", const=str(ROOT / "docs" / "BENCHMARKS.md"), default=None,
                   help="write Markdown (default path docs/BENCHMARKS.md); without it only print")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    names = args.names or list(ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        p.error(f"unknown sub-benchmark {unknown[0]!r}; choose from {', '.join(ALL)}")
    torch.set_num_threads(args.threads)
    info = machine()
    where = f"{info['cpu']} ({info['cores']} cores, {args.threads} threads)" + \
            (f", {info['gpu']}" if args.device.startswith("cuda") else "") + f", torch {info['torch']}"
    run = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "where": where,
           "command": "python scripts/bench.py " + " ".join(shlex.quote(a) for a in argv)}
    print(f"# {run['where']}\n# {run['command']}")
    sections = {}
    for name in names:
        start = time.perf_counter()
        rows, notes = globals()[f"bench_{name}"](args)
        text = section(name, rows, notes, args, run)
        print("\n" + text + f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)
        if rows or not notes[0].startswith("skipped: needs"):
            sections[name] = text
    if args.write:
        write_markdown(Path(args.write), sections, run)
        print(f"\nwrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
