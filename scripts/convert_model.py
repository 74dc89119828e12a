"""Merge an adapter into a base checkpoint, or export a checkpoint as a Hugging Face Qwen3 folder.

    python scripts/convert_model.py --merge --weight out/full_sft_256.pth \\
        --lora out/lora/lora_identity_256.pth --out out/full_sft_identity_256.pth
    python scripts/convert_model.py --to_hf out/hf_minimind --weight out/full_sft_256.pth [--lora lora_identity]

Our keys are Hugging Face Qwen3's, so the export is a copy (the tied lm_head is left to HF to re-tie).
Every file is written atomically; the merge is done in fp32 and saved in the base file's dtype.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import (REPO_ROOT, CheckpointError, atomic_json_save, atomic_write, hf_config_dict,  # noqa: E402
                              load_config, load_state_dict_strict, safe_torch_load, save_model)
from model.model_lora import find_adapter, load_lora, merge_lora, unload_lora  # noqa: E402
from model.model_minimind import MiniMindForCausalLM  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def existing(path) -> Path:
    """The path as given, or relative to the repository, so the script runs from any directory."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() or not (REPO_ROOT / path).exists() else REPO_ROOT / path


def load_merged(weight, lora=None, **config_overrides) -> tuple[MiniMindForCausalLM, torch.dtype]:
    """The base model in fp32 with the adapter (if any) folded in and removed; plus the base file's dtype."""
    weight = existing(weight)
    state = safe_torch_load(weight)
    model = MiniMindForCausalLM(load_config(weight, **config_overrides))
    load_state_dict_strict(model, state, weight)
    dtype = next(v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    if lora:
        load_lora(model, find_adapter(existing(lora), model.config.hidden_size))
        merge_lora(model)
        unload_lora(model)
    return model.eval(), dtype


def export_hf(model: MiniMindForCausalLM, out_dir, dtype: torch.dtype, tokenizer_dir=REPO_ROOT / "model") -> None:
    """A folder that `Qwen3ForCausalLM.from_pretrained(out_dir)` loads: weights, config, tokenizer."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; HF re-ties it on load
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_json_save({**hf_config_dict(model.config), "torch_dtype": str(dtype).removeprefix("torch.")},
                     out_dir / "config.json")
    c = model.config
    atomic_json_save({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                      "pad_token_id": c.pad_token_id}, out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            atomic_write(out_dir / name, lambda tmp, n=name: shutil.copyfile(Path(tokenizer_dir) / n, tmp))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="merge --lora into --weight, save to --out")
    mode.add_argument("--to_hf", metavar="DIR", help="export --weight (merged with --lora if given) to DIR")
    p.add_argument("--weight", required=True, help="base checkpoint, e.g. out/full_sft_256.pth")
    p.add_argument("--lora", help="adapter file, or a name looked up in out/lora/ then out/")
    p.add_argument("--out", help="merged checkpoint to write (its .json config is written beside it)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: the base file's")
    p.add_argument("--hidden_size", type=int, help="only for checkpoints without a .json config")
    p.add_argument("--num_hidden_layers", type=int, help="only for checkpoints without a .json config")
    args = p.parse_args(argv)
    if args.merge and not (args.lora and args.out):
        p.error("--merge needs --lora and --out")
    try:
        model, dtype = load_merged(args.weight, args.lora, hidden_size=args.hidden_size,
                                   num_hidden_layers=args.num_hidden_layers)
        dtype = getattr(torch, args.dtype) if args.dtype else dtype
        if args.merge:
            save_model(model.to(dtype), args.out, extra_config={"merged_from": {"weight": str(args.weight),
                                                                                "lora": str(args.lora)}})
            print(f"merged {args.lora} into {args.weight} -> {args.out}")
        else:
            export_hf(model, args.to_hf, dtype)
            print(f"exported {args.weight}{' + ' + args.lora if args.lora else ''} -> {args.to_hf} (Qwen3)")
    except (CheckpointError, OSError, json.JSONDecodeError) as e:  # LoRAError is a CheckpointError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
