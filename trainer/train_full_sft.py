"""Full-parameter SFT on {"conversations": [...]} lines, from the pretrained weights:
python trainer/train_full_sft.py [flags]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import SFTDataset  # noqa: E402
from model.checkpoint import save_model  # noqa: E402
from trainer.trainer_utils import DEMO_DIR, build_parser, fit, load_full_state, run_main, weight_path  # noqa: E402


def main(argv=None):
    args = build_parser(__doc__, save_weight="full_sft", data_path=DEMO_DIR / "sft.jsonl", from_weight="pretrain",
                        learning_rate=5e-4, batch_size=16, epochs=2).parse_args(argv)
    return fit(args, SFTDataset,
               prepare_model=lambda model: list(model.parameters()),
               save=lambda model: save_model(model, weight_path(args.save_dir, args.save_weight, args.hidden_size)),
               trainable_state=lambda model: model.state_dict(),
               load_trainable_state=load_full_state)


if __name__ == "__main__":
    sys.exit(run_main(main))
