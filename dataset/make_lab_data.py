"""Generate the LoRA lab's task data (scripts/lora_lab.py), seeded, from the demo world's words.

    python dataset/make_lab_data.py --out_dir out/lab/data      # facts_{250,1000,4000}, multiply; train + heldout

- facts_N: N invented people (three single-token characters: 李春雪), each living in one of the demo's 24 capitals.
  No name occurs in the base's data (checked), so every fact is new to the base; the sets are nested (facts_250 is
  the first 250 of facts_1000). Each fact is trained in TRAIN_PER_FACT of the TRAIN phrasings and asked on held-out
  phrasings that no training row uses; the held-out file samples at most EVAL_FACTS facts, so its cost does not
  grow with N, and expects the city.
- multiply: a x b for a, b in 2..12, a task far from the base (it adds and subtracts within 20 and never
  multiplies): every product in 3 training phrasings, each asked once more in a held-out phrasing.
Two runs write byte-identical files.
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.make_demo_data import COUNTRIES  # noqa: E402

HERE = Path(__file__).resolve().parent
FACT_COUNTS = (250, 1000, 4000)
TRAIN_PER_FACT = 3
EVAL_FACTS = 160
# Characters that are one token each in model/tokenizer.json, so a name is three tokens the base already embeds.
SURNAMES = "李黄周胡高林罗谢韩叶程丁姜钟汪金石夏方白熊雷黎顾毛莫向汤"
GIVEN = "明红华丽刚美军芳洋超英静兰平飞然子雨乐安春秋冬天海林森雪云星月花草石金水书心"
CITIES = [c[2] for c in COUNTRIES]
FACT_TRAIN = ["{k}住在哪座城市？", "{k}住在哪里？", "请问{k}住在哪个城市？", "{k}的家在哪座城市？",
              "你知道{k}住在哪儿吗？", "{k}现在住在什么地方？"]
FACT_HELDOUT = ["{k}家住哪个城市呀？", "说说{k}住的城市。", "我想去找{k}，该去哪座城市？", "{k}是哪座城市的居民？"]
FACT_ANSWER = "{k}住在{v}。"
MUL_TRAIN = ["{a}乘以{b}等于多少？", "算一算{a}乘{b}。", "What is {a} times {b}?", "What is {a} multiplied by {b}?",
             "{a}和{b}相乘是多少？", "Multiply {a} by {b}."]
MUL_HELDOUT = ["{b}的{a}倍是多少？", "How much is {a} x {b}?", "{a}个{b}一共是多少？", "Tell me the product of {a} and {b}."]
MUL_ANSWER = {"zh": "{a}乘以{b}等于{p}。", "en": "{a} times {b} is {p}."}


def chat(question: str, answer: str, expect=None) -> dict:
    row = {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if expect:
        row["expect"] = expect
    return row


def base_trigrams() -> set:
    """Every run of three characters in the base's training texts (pretrain and sft)."""
    seen = set()
    for name in ("pretrain", "sft"):
        text = (HERE / "demo" / f"{name}.jsonl").read_text(encoding="utf-8")
        seen.update(text[i:i + 3] for i in range(len(text) - 2))
    return seen


def people(n: int, seed: int = 0) -> list:
    """n (name, city) pairs; the first k of people(n) are people(k) for every k <= n."""
    rng, taken, out = random.Random(seed), base_trigrams(), []
    while len(out) < n:
        name = rng.choice(SURNAMES) + rng.choice(GIVEN) + rng.choice(GIVEN)
        if name in taken:  # known to the base, or drawn already
            continue
        taken.add(name)
        out.append((name, rng.choice(CITIES)))
    return out


def facts_rows(n: int, seed: int = 0) -> tuple:
    """(train rows, held-out rows) for the first n people."""
    rng = random.Random(f"facts-{n}-{seed}")
    facts = people(n, seed)
    train = [chat(q.format(k=k), FACT_ANSWER.format(k=k, v=v))
             for k, v in facts for q in rng.sample(FACT_TRAIN, TRAIN_PER_FACT)]
    rng.shuffle(train)
    asked = sorted(rng.sample(range(n), min(n, EVAL_FACTS)))
    heldout = [chat(rng.choice(FACT_HELDOUT).format(k=facts[i][0]), FACT_ANSWER.format(k=facts[i][0], v=facts[i][1]),
                    [facts[i][1]]) for i in asked]
    return train, heldout


def multiply_rows(seed: int = 0) -> tuple:
    rng = random.Random(f"multiply-{seed}")
    train, heldout = [], []
    for a in range(2, 13):
        for b in range(2, 13):
            for q in rng.sample(MUL_TRAIN, 3) + [rng.choice(MUL_HELDOUT)]:
                lang = "en" if q[0].isalpha() and q.isascii() else "zh"
                row = chat(q.format(a=a, b=b), MUL_ANSWER[lang].format(a=a, b=b, p=a * b))
                if q in MUL_HELDOUT:
                    row["expect"] = [str(a * b)]
                    heldout.append(row)
                else:
                    train.append(row)
    rng.shuffle(train)
    return train, heldout


def lab_tasks(fact_counts=FACT_COUNTS, seed: int = 0) -> dict:
    """{task name: (train rows, held-out rows)}."""
    tasks = {f"facts_{n}": facts_rows(n, seed) for n in fact_counts}
    tasks["multiply"] = multiply_rows(seed)
    return tasks


def write_jsonl(rows, path: Path) -> None:
    from model.checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(path, write)


def write_lab_data(out_dir, fact_counts=FACT_COUNTS, seed: int = 0) -> dict:
    """Write {task}_train.jsonl and {task}_heldout.jsonl per task (only the missing ones); returns
    {task: (train path, held-out path)}."""
    out_dir, paths, tasks = Path(out_dir), {}, None
    for task in [f"facts_{n}" for n in fact_counts] + ["multiply"]:
        pair = (out_dir / f"{task}_train.jsonl", out_dir / f"{task}_heldout.jsonl")
        if not all(p.is_file() for p in pair):
            tasks = tasks or lab_tasks(fact_counts, seed)
            for rows, p in zip(tasks[task], pair):
                write_jsonl(rows, p)
        paths[task] = pair
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=str(HERE.parent / "out" / "lab" / "data"), help="where the files go")
    p.add_argument("--seed", type=int, default=0, help="seeds the people, cities and phrasings")
    args = p.parse_args(argv)
    for task, (train, heldout) in write_lab_data(args.out_dir, seed=args.seed).items():
        print(f"{task}: {sum(1 for _ in open(train, encoding='utf-8'))} training rows {train}, "
              f"{sum(1 for _ in open(heldout, encoding='utf-8'))} held-out rows {heldout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
