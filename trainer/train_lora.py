"""Train a LoRA adapter on a frozen base (default: out/full_sft_{h}.pth):
python trainer/train_lora.py --data_path my_task.jsonl          # adapter named my_task
python trainer/train_lora.py --lora_name lora_identity          # the demo's data: dataset/demo/lora_identity.jsonl
The adapter alone is saved, to {save_dir}/lora/{lora_name}_{h}.pth; an existing one is kept unless --overwrite 1.
The defaults are a recipe that teaches a small file (tens of conversations) on the demo base: all linear layers,
rank 16, as many epochs as about 300 optimizer steps take, and the base's own chat data replayed beside it so
its general answers survive. MiniMind's rule (q_proj,o_proj, rank 8) is `--lora_targets square --lora_rank 8`."""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import SFTDataset  # noqa: E402
from model.checkpoint import CheckpointError, safe_torch_load  # noqa: E402
from model.lora_variants import check_init, loraplus_param_groups  # noqa: E402
from model.model_lora import (CONFIG_KEY, LoRAError, adapter_config, apply_lora, load_lora_state_dict,  # noqa: E402
                              lora_parameters, lora_state_dict, save_lora, trainable_summary)
from model.quantize import KINDS, describe_quantization, quantize_base  # noqa: E402
from trainer.trainer_utils import (DEMO_DIR, TrainError, build_parser, fit, nonnegative_float,  # noqa: E402
                                   positive_float, positive_int, run_main)

DEMO_ADAPTERS = ("lora_identity", "lora_medical")


def main(argv=None):
    parser = build_parser(__doc__, save_weight=None, data_path=None, from_weight="full_sft",
                          learning_rate=2e-3, batch_size=16, epochs=None, auto_epochs_steps=300)
    parser.add_argument("--lora_name", default=None,
                        help="adapter name and output prefix (default: the --data_path file's name, else "
                             "lora_identity)")
    parser.add_argument("--lora_rank", type=positive_int, default=16, help="r: the adapter's inner width")
    parser.add_argument("--lora_alpha", type=nonnegative_float, default=32, help="scale = alpha / r")
    parser.add_argument("--lora_dropout", type=nonnegative_float, default=0.0, help="dropout on the adapter's input")
    parser.add_argument("--lora_targets", default="all-linear",
                        help="comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, all-linear, "
                             "or square (MiniMind's rule: the square projections, q_proj,o_proj under GQA)")
    parser.add_argument("--use_rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    parser.add_argument("--use_dora", action="store_true",
                        help="DoRA: a trained magnitude per output row times the LoRA-updated direction "
                             "(PEFT's use_dora)")
    parser.add_argument("--init_lora_weights", default="default",
                        help="default (A Kaiming-uniform, B 0), gaussian, pissa, pissa_niter_N or olora (PEFT's "
                             "meanings; pissa/olora take A, B from the base weights; the saved adapter still fits the "
                             "unmodified base)")
    parser.add_argument("--loraplus_lr_ratio", type=positive_float, default=None,
                        help="LoRA+: B (and DoRA's magnitude) learn this many times faster than A, e.g. 16 "
                             "(default: off; a resumed run keeps its saved ratio)")
    parser.add_argument("--quantize_base", default="none", choices=["none", *KINDS],
                        help="QLoRA: store the frozen projections in 4-bit NF4 (bitsandbytes' layout, double-quantised "
                             "absmax) or int8 per row, dequantised on the fly; the adapter alone trains")
    parser.add_argument("--replay_data", default="auto",
                        help="general chat jsonl mixed into training so the base's answers survive; auto: the "
                             "chat data the base was trained on (its .json records it), none: no replay")
    parser.add_argument("--replay_ratio", type=nonnegative_float, default=2.0,
                        help="replay samples per task sample, drawn afresh each epoch (2: eval_general within 3 "
                             "points of the base's on four adapter seeds, docs/OWN_ADAPTER.md)")
    parser.add_argument("--overwrite", type=int, default=0, choices=[0, 1], help="1: replace an existing adapter file")
    args = parser.parse_args(argv)
    if args.lora_name is None:
        args.lora_name = Path(args.data_path).stem if args.data_path else "lora_identity"
    if not re.fullmatch(r"[\w\-]+", args.lora_name):
        fixed = re.sub(r"[^\w\-]", "_", args.lora_name)
        raise TrainError(f"--lora_name {args.lora_name!r}: an adapter name may hold letters, digits, '_' and '-' "
                         f"only (it becomes a module key and a file name); use --lora_name {fixed}")
    args.save_weight = args.save_weight or args.lora_name
    try:  # refused before any data or weights are read
        args.init_lora_weights = check_init(args.init_lora_weights)
    except LoRAError as e:
        raise TrainError(str(e)) from None
    if args.data_path is None:  # --lora_name alone picks the matching demo file, as MiniMind's lora_{task}.jsonl
        demo_file = DEMO_DIR / f"{args.lora_name}.jsonl"
        if not demo_file.is_file() and args.lora_name not in DEMO_ADAPTERS:
            raise TrainError(f"--lora_name {args.lora_name}: no demo data {demo_file}; pass your data with "
                             f"--data_path FILE (the demo's adapters: {', '.join(DEMO_ADAPTERS)})")
        args.data_path = str(demo_file)

    def out_path():  # the base's width decides {h}, known once it is loaded
        return Path(args.save_dir) / "lora" / f"{args.lora_name}_{args.hidden_size}.pth"

    def run_config():  # facts of the run beside the adapter's own, in the file and in the resume checkpoint
        return {"loraplus_lr_ratio": args.loraplus_lr_ratio} if args.loraplus_lr_ratio else {}

    def prepare(model):
        if args.quantize_base != "none":
            if args.use_compile:
                raise TrainError("--use_compile 1 with --quantize_base is not supported; drop one of them")
            quantize_base(model, args.quantize_base)
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_targets, use_rslora=args.use_rslora, adapter_name=args.lora_name,
                   use_dora=args.use_dora, init_lora_weights=args.init_lora_weights)
        out = out_path()  # checked before the first step: nothing is lost to a refused run
        if out.exists() and not args.overwrite and not args.from_resume:
            raise TrainError(f"{out} exists; pass --overwrite 1 to replace it, or --lora_name NAME to save another "
                             f"adapter")
        if args.from_resume:
            restore_loraplus_ratio()
        quantized = (f"; {describe_quantization(model)} (buffers, not counted as parameters)"
                     if args.quantize_base != "none" else "")
        summary = trainable_summary(model, counts=False) + "".join(
            [", DoRA" if args.use_dora else "", f", init {args.init_lora_weights}" if args.init_lora_weights !=
             "default" else "", f", LoRA+ (B's lr x {args.loraplus_lr_ratio:g})" if args.loraplus_lr_ratio else ""]) + quantized
        if args.loraplus_lr_ratio:
            return (loraplus_param_groups(model, args.learning_rate, args.loraplus_lr_ratio, args.lora_name,
                                          args.weight_decay), summary)
        return lora_parameters(model, args.lora_name), summary

    def restore_loraplus_ratio():
        """A resumed run keeps the ratio it was saved with: the optimizer's groups must be the same ones."""
        path = Path(args.save_dir) / "checkpoints" / f"{args.save_weight}_{args.hidden_size}_resume.pth"
        try:
            saved = json.loads(safe_torch_load(path)["model"][CONFIG_KEY]).get("loraplus_lr_ratio")
        except (CheckpointError, KeyError, TypeError, ValueError):
            return  # no readable checkpoint: the loop's own resume says what is wrong with it
        if args.loraplus_lr_ratio is None:
            args.loraplus_lr_ratio = saved
        elif saved != args.loraplus_lr_ratio:
            raise TrainError(f"{path}: saved with --loraplus_lr_ratio {saved or 'off'}, this run asks for "
                             f"{args.loraplus_lr_ratio:g}; resume without --loraplus_lr_ratio (the saved ratio is "
                             f"kept), or start again without --from_resume")

    def resume(model, state):
        saved, want = json.loads(state.get(CONFIG_KEY) or "{}"), adapter_config(model, args.lora_name)
        shape = ("rank", "target_modules")
        variant = next((k for k in ("use_dora", "init_lora_weights") if k in saved and saved[k] != want[k]), None)
        if variant is not None:
            raise TrainError(f"the resume checkpoint's adapter has {variant} {saved[variant]}, this run's "
                             f"{want[variant]}; resume with the flags of the run that saved it")
        if saved and any(saved.get(k) != want[k] for k in shape):
            raise TrainError(f"the resume checkpoint's adapter is rank {saved.get('rank')} on "
                             f"{','.join(saved.get('target_modules') or [])}, this run's rank {want['rank']} on "
                             f"{','.join(want['target_modules'])}; resume with --lora_rank {saved.get('rank')} "
                             f"--lora_targets {','.join(saved.get('target_modules') or [])}, or start again without "
                             f"--from_resume")
        load_lora_state_dict(model, state, args.lora_name, source="the resume checkpoint's adapter")

    return fit(args, SFTDataset, prepare_model=prepare,
               save=lambda model: save_lora(model, out_path(), args.lora_name, extra_config=run_config()),
               trainable_state=lambda model: lora_state_dict(model, args.lora_name, as_trained=True,
                                                             extra_config=run_config()),
               load_trainable_state=resume)


if __name__ == "__main__":
    sys.exit(run_main(main))
