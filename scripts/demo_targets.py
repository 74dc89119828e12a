"""The demo's targets, checked on its eval rows: one column per run, each target's value and whether it holds.

    python scripts/demo_targets.py out/eval_demo.json                 # demo.sh runs this last
    python scripts/demo_targets.py /tmp/s42/eval_demo.json /tmp/s1/eval_demo.json ...   # several seeds side by side

Exit status 0 when every target holds in every run, 1 when one misses, 2 when a file lacks a row a target needs.
The targets and why they are what they are: docs/DEMO_RECIPE.md, "What the demo must show".
"""
import argparse
import json
import sys
from pathlib import Path

BASE, CHAT = "pretrain", "full_sft"  # weight names without their _{hidden_size}

# (what, weight, eval file, adapter or "none", "match" or "mention", at least, at most); rates in %
TARGETS = [
    ("capitals, pretrained base", BASE, "eval_capitals", "none", "match", 90, None),
    ("eval_general, chat model", CHAT, "eval_general", "none", "match", 85, None),
    ("outside_general, chat model", CHAT, "outside_general", "none", "match", 70, None),
    ("identity with lora_identity", CHAT, "eval_identity", "lora_identity", "match", 95, None),
    ("identity without it", CHAT, "eval_identity", "none", "match", None, 5),
    ("outside_identity with it", CHAT, "outside_identity", "lora_identity", "match", 85, None),
    ("remedy with lora_medical", CHAT, "eval_medical", "lora_medical", "match", 90, None),
    ("remedy without it", CHAT, "eval_medical", "none", "match", None, 5),
    ("outside_medical with it", CHAT, "outside_medical", "lora_medical", "match", 75, None),
    ("symptom named under lora_identity", CHAT, "eval_medical", "lora_identity", "mention", 90, None),
]
MOVE = 3.0  # points an adapter may move eval_general, either way


def rate(rows: list, weight: str, name: str, setting: str, what: str, source: str) -> float:
    for r in rows:
        if r["weight"].rpartition("_")[0] == weight and Path(r["file"]).stem == name and r["setting"] == setting:
            value = r["match_rate" if what == "match" else "mention_rate"]
            if value is not None:
                return round(100 * value, 6)  # 0.57 * 100 is 56.99999999999999: a target at the edge must hold
    raise KeyError(f"{source}: no {what} rate for {weight}_* on {name} under {setting}; run the demo's eval "
                   f"(scripts/demo.sh, stage eval) to write every row")


def check(rows: list, source: str) -> list:
    """[(target, value, holds)] for one run's eval rows (eval_llm.py --json_out)."""
    out = []
    for label, weight, name, setting, what, lo, hi in TARGETS:
        v = rate(rows, weight, name, setting, what, source)
        bound = f">= {lo}" if lo is not None else f"<= {hi}"
        out.append((f"{label} ({bound}%)", f"{v:.1f}", (lo is None or v >= lo) and (hi is None or v <= hi)))
    base = rate(rows, CHAT, "eval_general", "none", "match", source)
    for adapter in ("lora_identity", "lora_medical"):
        move = round(rate(rows, CHAT, "eval_general", adapter, "match", source) - base, 6)
        out.append((f"eval_general moved by {adapter} (within {MOVE:g} points)", f"{move:+.1f}", abs(move) <= MOVE))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_json", nargs="+", help="eval rows of a demo run (out/eval_demo.json), one or more")
    args = p.parse_args(argv)
    try:
        runs = [check(json.loads(Path(f).read_text(encoding="utf-8")), f) for f in args.eval_json]
    except (OSError, ValueError) as e:
        print(f"error: {e}; pass the --json_out file of the demo's eval", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    width = max(len(t) for t, _, _ in runs[0])
    names = [f"run {i + 1}" for i in range(len(runs))] if len(runs) > 1 else ["value"]
    if len(runs) > 1:
        print("\n".join(f"run {i + 1}: {f}" for i, f in enumerate(args.eval_json)))
    print(f"{'target':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for i, (target, _, _) in enumerate(runs[0]):
        cells = [f"{run[i][1]}{'' if run[i][2] else ' MISS'}" for run in runs]
        print(f"{target:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    missed = sum(not ok for run in runs for _, _, ok in run)
    print(f"targets: {len(runs[0]) * len(runs) - missed} of {len(runs[0]) * len(runs)} held" +
          (f"; {missed} missed (docs/DEMO_RECIPE.md says what each is for)" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
