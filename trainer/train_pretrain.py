"""Pretrain MiniMind from scratch on {"text": ...} lines: python trainer/train_pretrain.py [flags]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import PretrainDataset  # noqa: E402
from model.checkpoint import save_model  # noqa: E402
from trainer.trainer_utils import DEMO_DIR, build_parser, fit, load_full_state, run_main, weight_path  # noqa: E402


def main(argv=None):
    args = build_parser(__doc__, save_weight="pretrain", data_path=DEMO_DIR / "pretrain.jsonl", from_weight="none",
                        learning_rate=1e-3, batch_size=32, epochs=1).parse_args(argv)
    return fit(args, PretrainDataset,
               prepare_model=lambda model: list(model.parameters()),
               save=lambda model: save_model(model, weight_path(args.save_dir, args.save_weight, args.hidden_size)),
               trainable_state=lambda model: model.state_dict(),
               load_trainable_state=load_full_state)


if __name__ == "__main__":
    sys.exit(run_main(main))
