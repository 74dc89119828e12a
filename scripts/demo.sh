#!/usr/bin/env bash
# The README's main command: set-up, then the whole pipeline on the bundled demo data, then the eval table.
# Extra arguments go to every trainer (e.g. --device cuda:0); OUT=dir picks the output folder (default out/);
# SEED=n seeds initialisation and data order of every stage (default 42; the data files stay the same).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
source "$ROOT/scripts/setup_env.sh" requirements.txt
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
SEED="${SEED:-42}"
TIMES=""
stage() {  # stage NAME COMMAND...: run it, remember its wall time
  local name=$1 t0=$(date +%s)
  shift
  echo "== $name: $*"
  "$@"
  TIMES="$TIMES$(printf '%-16s %4ds' "$name" $(( $(date +%s) - t0 )))\n"
}
TIMES="$(printf '%-16s %4ds' set-up $(( $(date +%s) - START )))\n"
stage data python dataset/make_demo_data.py
stage tokenizer python trainer/train_tokenizer.py
git diff --quiet -- model/tokenizer.json 2>/dev/null \
  || echo "note: model/tokenizer.json changed; weights trained with the old one no longer match"
T=(--save_dir "$OUT" --seed "$SEED")
# Muon, one epoch: as good a base as AdamW's two epochs (docs/DEMO_RECIPE.md, "Faster"), in half the steps.
stage pretrain python trainer/train_pretrain.py "${T[@]}" --optimizer muon --epochs 1 "$@"
# lr 1e-3: at 160 wide, 1.5e-3 (the 256-wide recipe's) gave seed 1 81.0% of eval_general with two threads (1e-3: 88.5%).
stage full_sft python trainer/train_full_sft.py "${T[@]}" --learning_rate 1e-3 "$@"
# The persona needs the MLPs too: on q_proj,o_proj alone it wrote "I amina" (256 wide, 0-21% after 4-10 epochs).
# Replay 0.33 of the base's own chat rows per task row, dropout 0.1: at 160 wide with 0.66 the seed-42 base kept its
# old name in half the replies (50%); 0.33 without dropout cost seed 1 (one thread) 4.5 points of eval_general.
stage lora_identity python trainer/train_lora.py "${T[@]}" --lora_name lora_identity \
  --lora_targets all-linear --lora_rank 16 --lora_alpha 32 --learning_rate 3e-3 --epochs 3 --lora_dropout 0.1 \
  --replay_data auto --replay_ratio 0.33 --overwrite 1 "$@"
# New facts need the MLPs: on q_proj,o_proj alone the medical adapter stays under 10%.
# 6 epochs: with 4 or 5, seed 1's adapter cost eval_general 3.5 / 3.0 points (256 wide; 6: 1.5). Replay: about 700
# rows. lr 2e-3: at 160 wide, 3e-3 cost seed 1 4.0 points of eval_general (2e-3: 1.5).
stage lora_medical python trainer/train_lora.py "${T[@]}" --lora_name lora_medical \
  --lora_targets all-linear --lora_rank 16 --lora_alpha 32 --learning_rate 2e-3 --epochs 6 --lora_dropout 0.1 \
  --replay_data auto --replay_ratio 0.5 --overwrite 1 "$@"
D=dataset/demo
EVAL="$D/eval_capitals.jsonl,$D/eval_general.jsonl,$D/outside_general.jsonl,$D/eval_identity.jsonl"
EVAL="$EVAL,$D/outside_identity.jsonl,$D/eval_medical.jsonl,$D/outside_medical.jsonl,$D/eval_pretrain.jsonl"
stage eval python eval_llm.py --save_dir "$OUT" --weight full_sft,pretrain --lora_weight lora_identity,lora_medical \
  --eval "$EVAL" --json_out "$OUT/eval_demo.json"
stage answers python eval_llm.py --save_dir "$OUT" --lora_weight lora_identity,lora_medical --all_settings \
  --temperature 0 --max_new_tokens 40 --prompt "你到底是谁？" --prompt "Who am I talking to?" \
  --prompt "最近老是头痛，有什么建议吗？" --prompt "Doctor, I have a sore throat. What should I pay attention to?" \
  --prompt "肯尼亚的首都是哪座城市？" --prompt "What do 9 and 7 add up to?"
echo
python scripts/demo_targets.py "$OUT/eval_demo.json" || true  # a missed target is reported, not fatal
echo
echo "stage wall times (this run):"
printf "$TIMES"
printf '%-16s %4ds\n' total $(( $(date +%s) - START ))
echo "eval rows: $OUT/eval_demo.json; loss curves: $OUT/*_loss.png"
echo "next: python eval_llm.py --lora_weight lora_identity,lora_medical   (chat; /adapter NAME swaps)"
