"""Full-parameter SFT on {"conversations": [...]} lines, from the pretrained weights:
python trainer/train_full_sft.py [flags]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.lm_dataset import SFTDataset  # noqa: E402
from trainer.trainer_utils import DEMO_DIR, build_parser, fit_full, run_main  # noqa: E402


def main(argv=None):
    args = build_parser(__doc__, save_weight="full_sft", data_path=DEMO_DIR / "sft.jsonl", from_weight="pretrain",
                        learning_rate=1.5e-3, batch_size=8, epochs=3).parse_args(argv)
    return fit_full(args, SFTDataset)


if __name__ == "__main__":
    sys.exit(run_main(main))
