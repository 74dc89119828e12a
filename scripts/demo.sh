#!/usr/bin/env bash
# The README's main command: set-up, then the pipeline on the bundled demo data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" requirements.txt
cd "$ROOT"
python dataset/make_demo_data.py
python trainer/train_tokenizer.py
git diff --quiet -- model/tokenizer.json 2>/dev/null || echo "note: model/tokenizer.json changed; weights trained with the old one no longer match"
python trainer/train_pretrain.py
python trainer/train_full_sft.py
