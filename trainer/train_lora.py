"""Train a LoRA adapter on a frozen base (default: out/full_sft_{h}.pth):
python trainer/train_lora.py --lora_name lora_identity [flags]
The adapter alone is saved, to {save_dir}/lora/{lora_name}_{h}.pth."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import SFTDataset  # noqa: E402
from model.model_lora import (apply_lora, load_lora_state_dict, lora_parameters, lora_state_dict,  # noqa: E402
                              save_lora, trainable_summary)
from trainer.trainer_utils import DEMO_DIR, build_parser, fit, run_main  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__, save_weight=None, data_path=None, from_weight="full_sft",
                          learning_rate=2e-3, batch_size=16, epochs=4)
    parser.add_argument("--lora_name", default="lora_identity", help="adapter name; also the output file's prefix")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_targets", default=None,
                        help="comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear "
                             "(default: MiniMind's rule, the square projections: q_proj,o_proj under GQA)")
    parser.add_argument("--use_rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    args = parser.parse_args(argv)
    args.save_weight = args.save_weight or args.lora_name
    # --lora_name alone picks the matching demo file, as MiniMind's dataset/lora_{task}.jsonl
    args.data_path = args.data_path or str(DEMO_DIR / f"{args.lora_name}.jsonl")
    out = Path(args.save_dir) / "lora" / f"{args.lora_name}_{args.hidden_size}.pth"

    def prepare(model):
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_targets, use_rslora=args.use_rslora, adapter_name=args.lora_name)
        print(trainable_summary(model))
        return lora_parameters(model, args.lora_name)

    return fit(args, SFTDataset, prepare_model=prepare,
               save=lambda model: save_lora(model, out, args.lora_name),
               trainable_state=lambda model: lora_state_dict(model, args.lora_name),
               load_trainable_state=lambda model, state: load_lora_state_dict(
                   model, state, args.lora_name, source="the resume checkpoint's adapter"))


if __name__ == "__main__":
    sys.exit(run_main(main))
