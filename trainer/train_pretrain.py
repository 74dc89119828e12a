"""Pretrain MiniMind from scratch on {"text": ...} lines: python trainer/train_pretrain.py [flags]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import PretrainDataset  # noqa: E402
from trainer.trainer_utils import DEMO_DIR, build_parser, fit_full, run_main  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__, save_weight="pretrain", data_path=DEMO_DIR / "pretrain.jsonl", from_weight="none",
                          learning_rate=1.5e-3, batch_size=8, epochs=2, max_seq_len=512)
    parser.add_argument("--pack", type=int, default=0, choices=[0, 1],
                        help="1: join the shuffled texts into one stream cut into rows of --max_seq_len tokens "
                             "(no padding); 0 (default): one text per row, padded, batched by length")
    args = parser.parse_args(argv)
    return fit_full(args, PretrainDataset)


if __name__ == "__main__":
    sys.exit(run_main(main))
