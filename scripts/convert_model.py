"""Merge an adapter into a base checkpoint; convert checkpoints and adapters to and from Hugging Face / PEFT.

    python scripts/convert_model.py --merge --weight out/full_sft_160.pth \\
        --lora out/lora/lora_identity_160.pth --out out/full_sft_identity_160.pth
    python scripts/convert_model.py --to_hf out/hf_minimind --weight out/full_sft_160.pth [--lora lora_identity]
    python scripts/convert_model.py --to_peft out/peft_identity --weight out/full_sft_160.pth \\
        --lora lora_identity [--base_model_name_or_path out/hf_minimind]
    python scripts/convert_model.py --from_peft out/peft_identity --out out/lora/lora_identity_160.safetensors
    python scripts/convert_model.py --from_hf path/to/Qwen3-or-MiniMind-folder --out out/full_sft_768.pth

Our keys are Hugging Face Qwen3's, so the export is a copy (the tied lm_head is left to HF to re-tie); a PEFT
adapter is our A and B under PEFT's key names (model/peft_io.py); a Qwen3 or MiniMind transformers folder
imports the same way back (model/hf_io.py). `load_lora` and eval_llm.py's --lora_weight
read a PEFT folder directly. Every file is written atomically; the merge is done in fp32 and saved in the base
file's dtype. Errors are one `error: ...` line with exit code 2, and nothing is written.
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
from model.model_lora import (CONFIG_KEY, find_adapter, load_lora, merge_lora, read_lora_file,  # noqa: E402
                              unload_lora)
from model.model_minimind import MiniMindForCausalLM  # noqa: E402
from model.quantize import KINDS, dequantize_base, quantize_base  # noqa: E402
from model.hf_io import convert_hf_folder  # noqa: E402
from model.peft_io import read_peft_folder, save_lora_file, save_peft_folder  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def existing(path) -> Path:
    """The path as given, or relative to the repository, so the script runs from any directory."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() or not (REPO_ROOT / path).exists() else REPO_ROOT / path


def load_merged(weight, lora=None, save_dir=REPO_ROOT / "out", quantize_base_as=None,
                **config_overrides) -> tuple[MiniMindForCausalLM, torch.dtype]:
    """The base model in fp32 with the adapter (if any) folded in and removed; plus the base file's dtype.
    quantize_base_as "nf4"/"int8": the base as QLoRA trained on it, quantised then dequantised, so in fp32."""
    weight = existing(weight)
    state = safe_torch_load(weight)
    model = MiniMindForCausalLM(load_config(weight, state, **config_overrides))
    load_state_dict_strict(model, state, weight)
    dtype = next(v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    if quantize_base_as not in (None, "none"):
        quantize_base(model, quantize_base_as)
        dequantize_base(model)
        dtype = torch.float32  # the dequantised values are not those of a bf16/fp16 file
    if lora:
        path = find_adapter(existing(lora), model.config.hidden_size, out_dir=save_dir)
        trained_on = _trained_on_quantised(path)
        if trained_on and quantize_base_as in (None, "none"):
            print(f"note: {path} was trained on a {trained_on} base; it is merged onto the float base as given "
                  f"(--quantize_base {trained_on}: onto the dequantised weights it was trained on)", file=sys.stderr)
        load_lora(model, path)
        merge_lora(model)
        unload_lora(model)
    return model.eval(), dtype


def _trained_on_quantised(path):
    """The quantisation an adapter's config records for its base ("nf4", "int8"), or None."""
    config = read_lora_file(path).get(CONFIG_KEY)
    try:
        quantization = ((json.loads(config) if isinstance(config, str) else config or {}).get("base") or {})
        return (quantization.get("quantization") or {}).get("kind")
    except (ValueError, AttributeError):
        return None  # load_lora names what is wrong with the config


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


def _dequantised(args, dtype) -> str:
    if args.quantize_base == "none":
        return ""
    return (f" (on the {args.quantize_base}-dequantised base the adapter was trained on; written in full precision, "
            f"{str(dtype).removeprefix('torch.')}, not {args.quantize_base})")


def merge(args) -> str:
    model, dtype = load_merged(args.weight, args.lora, args.save_dir, args.quantize_base, **args.arch)
    save_model(model.to(args.dtype or dtype), args.out,
               extra_config={"merged_from": {"weight": str(args.weight), "lora": str(args.lora),
                                             **({"quantize_base": args.quantize_base}
                                                if args.quantize_base != "none" else {})}})
    return f"merged {args.lora} into {args.weight} -> {args.out}{_dequantised(args, args.dtype or dtype)}"


def to_hf(args) -> str:
    model, dtype = load_merged(args.weight, args.lora, args.save_dir, args.quantize_base, **args.arch)
    export_hf(model, args.to_hf, args.dtype or dtype)
    return (f"exported {args.weight}{' + ' + args.lora if args.lora else ''} -> {args.to_hf} (Qwen3)"
            f"{_dequantised(args, args.dtype or dtype)}")


def to_peft(args) -> str:
    model, _ = load_merged(args.weight, **args.arch)  # the base the adapter must fit
    path = find_adapter(existing(args.lora), model.config.hidden_size, out_dir=args.save_dir)
    save_peft_folder(read_lora_file(path), args.to_peft, model,
                     args.base_model_name_or_path or str(args.weight), source=str(path))
    return f"exported {path} -> {args.to_peft} (PEFT LoRA)"


def from_peft(args) -> str:
    save_lora_file(read_peft_folder(existing(args.from_peft)), args.out)
    return f"converted {args.from_peft} (PEFT LoRA) -> {args.out}"


def from_hf(args) -> str:
    convert_hf_folder(existing(args.from_hf), args.out, args.dtype)
    return f"converted {args.from_hf} (Hugging Face) -> {args.out} (+ .json config)"


# mode: (what it does, the options it needs); every mode is one function of the parsed args above.
MODES = {
    "merge": (merge, ("weight", "lora", "out")),
    "to_hf": (to_hf, ("weight",)),
    "to_peft": (to_peft, ("weight", "lora")),
    "from_peft": (from_peft, ("out",)),
    "from_hf": (from_hf, ("out",)),
}


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage first; every error here is one line
        fail(message)


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="merge --lora into --weight, save to --out")
    mode.add_argument("--to_hf", metavar="DIR", help="export --weight (merged with --lora if given) to DIR")
    mode.add_argument("--to_peft", metavar="DIR", help="export adapter --lora of base --weight as a PEFT folder")
    mode.add_argument("--from_peft", metavar="DIR", help="convert a PEFT LoRA folder to our adapter file --out")
    mode.add_argument("--from_hf", metavar="DIR", help="convert a Qwen3 / MiniMind transformers folder to our "
                                                       "checkpoint --out (.pth + .json)")
    p.add_argument("--weight", help="base checkpoint, e.g. out/full_sft_160.pth")
    p.add_argument("--lora", help="adapter file (or PEFT folder), or a name looked up in {save_dir}/lora/ then "
                                  "{save_dir}/, as eval_llm.py does")
    p.add_argument("--save_dir", default=str(REPO_ROOT / "out"), help="where adapter names are looked up")
    p.add_argument("--out", help="--merge, --from_hf: checkpoint to write (its .json config beside it); "
                                 "--from_peft: adapter file, .pth or .safetensors")
    p.add_argument("--base_model_name_or_path", help="--to_peft: recorded in adapter_config.json, e.g. the "
                                                     "--to_hf folder of the same base (default: --weight)")
    p.add_argument("--quantize_base", default="none", choices=("none", *KINDS),
                   help="--merge, --to_hf: merge onto the base as QLoRA trained on it (quantised, then dequantised); "
                        "the result is full precision")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: the base file's")
    p.add_argument("--hidden_size", type=int, help="checkpoints without a .json config: overrides what the "
                                                   "tensors' shapes say (default: read off the shapes)")
    p.add_argument("--num_hidden_layers", type=int, help="as --hidden_size")
    args = p.parse_args(argv)
    name = next(m for m in MODES if getattr(args, m))
    run, needs = MODES[name]
    missing = [f"--{o}" for o in needs if not getattr(args, o)]
    if missing:
        fail(f"--{name} needs {' and '.join(missing)}")
    args.dtype = getattr(torch, args.dtype) if args.dtype else None
    args.arch = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}
    try:
        print(run(args))
    except (CheckpointError, OSError, json.JSONDecodeError) as e:  # LoRAError is a CheckpointError
        fail(str(e))


if __name__ == "__main__":
    main()
