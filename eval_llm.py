"""Chat with a trained model, swap its LoRA adapters live on one base, and score held-out data.

python eval_llm.py --weight full_sft --lora_weight lora_identity,lora_medical    # chat; /adapter NAME swaps
python eval_llm.py --lora_weight lora_identity --prompt "你是谁？" --all_settings   # answer and exit
python eval_llm.py --lora_weight lora_identity,lora_medical --eval dataset/demo/eval_identity.jsonl --json

The base is loaded once and every adapter once; a swap only changes which adapter the LoRA layers run.
--eval gives one row per file and setting (none = adapters off, then each adapter): the match rate of
greedy replies against each sample's `expect` strings, the rate of replies that name what the prompt is
about (a sample's `mention` strings, e.g. its symptom), and the perplexity of the reference answers, so an
adapter's effect and what it keeps of the base read side by side. `--weight full_sft,pretrain` scores
further bases too (adapters belong to the first). A {"text", "expect"} row is a completion: its
first sentence must contain an expect string.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # runs from any directory
    sys.path.insert(0, str(REPO_ROOT))

from dataset.lm_dataset import PadCollator, PretrainDataset, SFTDataset  # noqa: E402
from model.checkpoint import atomic_json_save, load_model  # noqa: E402
from model.model_lora import (LoRAError, active_adapter, default_adapter_name, find_adapter,  # noqa: E402
                              list_adapters, load_lora, merge_lora, set_adapter, unmerge_lora)
from model.quantize import KINDS, dequantize_base, describe_quantization, quantize_base  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.trainer_utils import (MAKES, HelpFormatter, evaluate_loss, first_sentence, nonnegative_int,  # noqa: E402
                                   positive_int, run_main, weight_path)

ADAPTER_SUFFIXES = (".pth", ".safetensors")
CHAT_HELP = "commands: /adapter NAME (or none), /adapters, /clear (history), /exit"


class EvalError(ValueError):
    """Bad input; main() prints it as one line on stderr and exits with code 2."""


def add_base_args(a) -> None:
    """Flags that find and place the base model (`a` is a parser's add_argument); the server takes them too."""
    a("--save_dir", default=str(REPO_ROOT / "out"), help="where the trainers wrote weights (adapters in lora/)")
    a("--hidden_size", type=int, default=160, help="picks {weight}_{hidden_size}.pth")
    a("--num_hidden_layers", type=int, default=None, help="only for checkpoints without a .json config (MiniMind's)")
    a("--num_attention_heads", type=int, default=None, help="only for checkpoints without a .json config")
    a("--num_key_value_heads", type=int, default=None, help="only for checkpoints without a .json config")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="on CUDA; the CPU uses float32")
    a("--quantize_base", default="none", choices=["none", *KINDS],
      help="keep the base's projections in 4-bit NF4 or int8 (as QLoRA trains them), dequantised on the fly")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    add_base_args(a)
    a("--weight", default="full_sft", help="base weights: a name ({save_dir}/{weight}_{hidden_size}.pth) or a path; "
                                            "--eval takes several, comma-separated (adapters go on the first)")
    a("--lora_weight", default="", help="comma-separated adapters, names ({save_dir}/lora/{name}_{h}.pth, then "
                                        "{save_dir}/{name}_{h}.pth) or paths; all load once, the first is active")
    a("--merge", action="store_true", help="fold the active adapter into the base weights (base speed); "
                                           "a swap unmerges it and merges the next one")
    a("--prompt", action="append", default=[], help="answer this and exit (repeatable)")
    a("--all_settings", action="store_true", help="--prompt: answer with adapters off, then under each adapter")
    a("--system", default=None, help="system prompt")
    a("--history_turns", type=int, default=0, help="chat: earlier exchanges kept as context (0: each turn alone)")
    a("--temperature", type=float, default=0.85, help="0: greedy")
    a("--top_p", type=float, default=0.85, help="sample from the smallest set of tokens with this much probability")
    a("--top_k", type=int, default=0, help="0: off")
    a("--repetition_penalty", type=float, default=1.0, help="above 1: tokens already in the text are less likely")
    a("--max_new_tokens", type=int, default=None, help="default 512 in chat and --prompt, 48 for --eval")
    a("--seed", type=int, default=42, help="seeds sampling")
    a("--show_speed", action="store_true", help="print decode tokens/s after each answer")
    a("--compile", action="store_true", help="decode with a static KV cache and a torch.compile'd step (first "
      "answer of each shape compiles; the compiled code is cached in {save_dir}/compile_cache between runs)")
    a("--eval", action="append", default=[], help="jsonl file(s) to score, comma-separated or repeated")
    a("--eval_limit", type=nonnegative_int, default=0, help="score the first N samples of each file (0: all)")
    a("--show_misses", type=nonnegative_int, default=0, metavar="N",
      help="--eval: print the first N wrong replies of each file and setting, with prompt and expected answer")
    a("--skip_bad_lines", action="store_true", help="--eval: skip and count malformed lines instead of stopping")
    a("--batch_size", type=positive_int, default=48,
      help="--eval batch size (48 against 16: the demo's eval in 65 s against 98 s, the same replies)")
    a("--max_seq_len", type=positive_int, default=512, help="--eval: samples are truncated to this many tokens")
    a("--json", action="store_true", help="--eval: print only the rows as a JSON list")
    a("--json_out", default=None, help="--eval: also write the rows as JSON to this file")
    args = p.parse_args(argv)
    if args.json and not args.eval:
        p.error("--json needs --eval")
    if args.json and args.prompt:
        p.error("--json prints only the eval rows; run --prompt separately")
    if len(split_list(args.weight)) > 1 and not args.eval:
        p.error("several --weight values are for --eval; chat and --prompt take one")
    return args


def keep_compile_cache(save_dir) -> None:
    """torch.compile's code goes to {save_dir}/compile_cache, so the next run starts warm (inductor reads the
    variable when it first compiles; a user's own TORCHINDUCTOR_CACHE_DIR wins)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(save_dir) / "compile_cache"))


def split_list(values) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c']."""
    values = [values] if isinstance(values, str) else values
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout stays for answers, the table or the JSON


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---- loading

def base_path(args, weight: str) -> Path:
    given = Path(weight)
    if given.suffix == ".pth" or given.is_file():
        if not given.is_file():
            raise EvalError(f"--weight {weight}: no such file")
        return given
    path = weight_path(args.save_dir, weight, args.hidden_size)
    if not path.is_file():
        make = MAKES.get(weight, f"python trainer/train_full_sft.py --save_weight {weight}")
        others = sorted(p.name for p in Path(args.save_dir).glob(f"{weight}_*.pth"))
        hint = f"; there is {', '.join(others)}: pick it with --hidden_size" if others else ""
        raise EvalError(f"--weight {weight}: {path} does not exist; make it with `{make}` "
                        f"(same --hidden_size {args.hidden_size}){hint}")
    return path


def adapters_on_disk(save_dir, hidden_size: int) -> list[str]:
    """Adapter names for this hidden size in {save_dir}/lora and {save_dir} (files without a base's .json)."""
    names = []
    for folder in (Path(save_dir) / "lora", Path(save_dir)):
        for p in sorted(folder.glob(f"*_{hidden_size}.*")):
            if p.suffix in ADAPTER_SUFFIXES and not p.with_suffix(".json").is_file():
                names.append(p.name[: -len(f"_{hidden_size}{p.suffix}")])
    return list(dict.fromkeys(names))


def load_adapter(model, spec: str, args) -> str:
    """Load one adapter, a name looked up as train_lora.py saves it or a path, under its default name."""
    h = model.config.hidden_size
    if Path(spec).suffix in ADAPTER_SUFFIXES and not Path(spec).is_file():
        raise EvalError(f"--lora_weight {spec}: no such file")
    try:
        path = find_adapter(spec, h, args.save_dir)
    except LoRAError:
        found = adapters_on_disk(args.save_dir, h)
        raise EvalError(f"unknown adapter {spec!r}: no {Path(args.save_dir) / 'lora' / f'{spec}_{h}.pth'} "
                        f"(nor .safetensors, nor in {args.save_dir}); adapters there for hidden_size {h}: "
                        f"{', '.join(found) or 'none'}; train it with `python trainer/train_lora.py "
                        f"--lora_name {spec}`") from None
    name = default_adapter_name(path, model)
    if name in list_adapters(model):
        raise EvalError(f"adapter {name!r} is already loaded ({path})")
    load_lora(model, path, name)  # a file for another base raises LoRAError naming the file and the mismatch
    log(f"adapter {name}: {path}")
    return name


def load_base(args, tok, weight: str):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else None
    path = base_path(args, weight)
    model = load_model(path, device, dtype, num_hidden_layers=args.num_hidden_layers,  # shapes decide the rest
                       num_attention_heads=args.num_attention_heads,
                       num_key_value_heads=args.num_key_value_heads).eval()
    if model.config.vocab_size != tok.vocab_size:
        raise EvalError(f"{path}: vocab size {model.config.vocab_size} differs from the tokenizer's {tok.vocab_size}")
    log(f"base: {path} ({model.num_parameters() / 1e6:.2f}M parameters, device {device})")
    if getattr(args, "quantize_base", "none") != "none":
        if getattr(args, "compile", False):
            raise EvalError("--compile with --quantize_base is not supported (the compiled step is built for float "
                            "weights); drop one of them")
        quantize_base(model, args.quantize_base)
        log(describe_quantization(model))
    model.weight_name = path.stem  # names the base in eval rows
    return model


def load(args):
    """Tokenizer, the (first) base model, loaded once, and every --lora_weight adapter (once each); the first
    adapter is active."""
    tok = Tokenizer()
    model = load_base(args, tok, split_list(args.weight)[0])
    adapters = [load_adapter(model, spec, args) for spec in split_list(args.lora_weight)]
    if args.merge and not adapters:
        raise EvalError("--merge needs an adapter (--lora_weight NAME)")
    if args.merge and dequantize_base(model):
        log(f"--merge on a {args.quantize_base} base: its projections are dequantised to full precision and the "
            f"adapter merged there (the {args.quantize_base} storage is given up)")
    switch(model, adapters[0] if adapters else None, args.merge)
    return model, tok, adapters


def switch(model, name, merge: bool = False) -> None:
    """Run adapter `name` (None: the bare base); with merge, fold it into the base weights instead."""
    if merge:
        unmerge_lora(model)
    set_adapter(model, name)
    if merge and name is not None:
        merge_lora(model, name)


# ---- answering

def stream_reply(tok, tokens, write) -> str:
    """Write a reply as its tokens arrive. A character whose UTF-8 bytes span several tokens decodes to
    U+FFFD until its last byte arrives, so the text is shown only when it does not end in one."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            write(text[len(shown):])
            shown = text
    text = tok.decode(ids, skip_special_tokens=True)
    if text.startswith(shown):
        write(text[len(shown):])
    return text


def conversation(args, history: list, user: str) -> list:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + history + [{"role": "user", "content": user}]


def answer(model, tok, messages, args) -> str:
    """Stream one reply to stdout (sampled, or greedy at temperature 0); returns its text."""
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)],
                       device=model_device(model))
    times = []

    def tokens():
        for t in model.stream_generate(ids, args.max_new_tokens or 512, temperature=args.temperature,
                                       top_p=args.top_p, top_k=args.top_k, eos_token_id=tok.eos_token_id,
                                       repetition_penalty=args.repetition_penalty, compile=args.compile):
            t = int(t[0])
            if t == tok.eos_token_id:
                return
            times.append(time.perf_counter())
            yield t

    reply = stream_reply(tok, tokens(), lambda s: print(s, end="", flush=True))
    print()
    if args.show_speed and times:
        # Decode speed: tokens after the first over the time since it (the prompt's prefill excluded).
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
        print(f"[{len(times)} tokens, {rate:.1f} tokens/s]")
    return reply


def answer_prompts(model, tok, adapters, args) -> None:
    """--prompt: each prompt under the active adapter, or with --all_settings under none and each adapter."""
    first = active_adapter(model)
    settings = [None] + adapters if args.all_settings else [first]
    for prompt in args.prompt:
        print(f"> {prompt}")
        for setting in settings:
            switch(model, setting, args.merge)
            if adapters:
                print(f"[{setting or 'none'}] ", end="")
            answer(model, tok, conversation(args, [], prompt), args)
    switch(model, first, args.merge)


def adapters_line(model, args) -> str:
    active = active_adapter(model)
    names = ["none"] + list_adapters(model)
    marked = [f"*{n}" if n == (active or "none") else n for n in names]
    idle = [n for n in adapters_on_disk(args.save_dir, model.config.hidden_size) if n not in names]
    merged = " (merged)" if args.merge and active else ""
    return f"adapters: {', '.join(marked)}{merged}" + (f"; on disk, not loaded: {', '.join(idle)}" if idle else "")


def use_adapter(model, spec: str, args) -> None:
    """/adapter NAME: switch to a loaded adapter, or load it first (the base stays as it is)."""
    name = None if spec.lower() == "none" else spec
    if name is not None and Path(name).suffix in ADAPTER_SUFFIXES and \
            default_adapter_name(name, model) in list_adapters(model):
        name = default_adapter_name(name, model)  # a path to an adapter loaded already
    current = active_adapter(model)
    if name is not None and name not in list_adapters(model):
        unmerge_lora(model)  # loading refuses a merged model
        try:
            name = load_adapter(model, name, args)
        except Exception:
            switch(model, current, args.merge)
            raise
    switch(model, name, args.merge)


def chat(model, tok, args) -> None:
    """Read stdin line by line (so it can be scripted): a message, or a command; EOF or /exit quits."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{adapters_line(model, args)}\n{CHAT_HELP}")
    history = []
    while True:
        try:
            line = input(f"[{active_adapter(model) or 'none'}] > " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command, _, arg = line.partition(" ")
        if not line:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/clear":
            history.clear()
            print("[history cleared]")
        elif command == "/adapters":
            print(adapters_line(model, args))
        elif command == "/adapter" and arg.strip():
            try:
                use_adapter(model, arg.strip(), args)
                print(f"[adapter {active_adapter(model) or 'none'}]")
            except (EvalError, LoRAError) as e:
                print(f"error: {e}", file=sys.stderr)
        elif command.startswith("/"):
            print(CHAT_HELP)
        else:
            reply = answer(model, tok, conversation(args, history, line), args)
            if args.history_turns > 0:
                history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
                del history[: -2 * args.history_turns]


# ---- evaluation

class ExpectCheck:
    """Optional "expect" (a reply must contain one of them) and "mention" (what the prompt is about)."""

    def check(self, record):
        for key in ("expect", "mention"):
            value = record.get(key)
            if value is not None and (not isinstance(value, list)
                                      or not all(isinstance(e, str) and e for e in value)):
                return f'"{key}" must be a list of non-empty strings'
        return super().check(record)


class EvalConversations(ExpectCheck, SFTDataset):
    pass


class EvalTexts(ExpectCheck, PretrainDataset):
    pass


@dataclass
class EvalFile:
    path: str                # as given
    dataset: Subset          # (input_ids, labels) samples, teacher-forced for the loss
    prompts: list            # token ids before the reply: the conversation up to its last answer, or the text
    expects: list            # the expect strings of the same samples
    mentions: list           # their mention strings (None where a sample has none)
    completion: bool         # {"text"} rows: judge the first sentence of the continuation
    questions: list = None   # the prompt's last user message (or the text), for --show_misses


def contains(reply: str, want: str) -> bool:
    """Case-insensitive; a want made of ASCII letters or digits must stand as a whole word ("4" is not in "14")."""
    reply, want = reply.casefold(), want.casefold()
    word = r"[a-z0-9]"
    pattern = (r"(?<!" + word + ")" if re.match(word, want) else "") + re.escape(want) + \
        (r"(?!" + word + ")" if re.search(word + "$", want) else "")
    return re.search(pattern, reply) is not None


def read_eval_file(path: str, tok, args) -> EvalFile:
    """A conversation file or a {"text"} file (told by its first line): loss on every row, generation for the
    rows with "expect"."""
    first = None
    if Path(path).is_file():
        with open(path, "rb") as f:
            first = next((line for line in f if line.strip()), None)
    try:
        record = json.loads(first) if first is not None else None
    except ValueError:
        record = None  # the conversation reader names the line and what is wrong with it
    is_text = isinstance(record, dict) and "text" in record and "conversations" not in record
    dataset = (EvalTexts if is_text else EvalConversations)(path, tok, args.max_seq_len,
                                                           skip_bad_lines=getattr(args, "skip_bad_lines", False))
    if dataset.n_skipped:
        log(f"{path}: skipped {dataset.n_skipped} malformed lines")
    dataset.check_targets()  # a --max_seq_len that cuts every answer would score a ppl of 1.00 on nothing
    n = min(len(dataset), args.eval_limit) if args.eval_limit > 0 else len(dataset)
    prompts, expects, mentions, questions = [], [], [], []
    for i in range(n):
        record = dataset.record(i)
        if not record.get("expect"):
            continue
        if is_text:  # as pretraining saw it: <|im_start|> then the text
            prompts.append([tok.bos_token_id] + tok.encode(record["text"]))
            questions.append(record["text"])
        else:
            messages = record["conversations"]
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(tok.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True))
            questions.append(messages[last - 1]["content"] if last else "")
        expects.append(record["expect"])
        mentions.append(record.get("mention"))
    # The loss batches go in length order: little padding (half the time on eval_pretrain's 300 texts).
    lengths = dataset.token_lengths()
    by_length = sorted(range(n), key=lambda i: lengths[i])
    return EvalFile(path, Subset(dataset, by_length), prompts, expects, mentions, is_text, questions)


def greedy_replies(model, tok, prompts, max_new_tokens: int, batch_size: int, repetition_penalty=1.0,
                   compile: bool = False) -> list:
    """Greedy replies in batches of similar length, left-padded (the attention mask hides the pads)."""
    device, eos = model_device(model), tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b: b + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        mask = None if bool(mask.all()) else mask.to(device)
        steps = list(model.stream_generate(ids.to(device), max_new_tokens, temperature=0, eos_token_id=eos,
                                           attention_mask=mask, repetition_penalty=repetition_penalty,
                                           compile=compile))
        out = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
        for r, i in enumerate(rows):
            tokens = out[r][: out[r].index(eos)] if eos in out[r] else out[r]
            replies[i] = tok.decode(tokens, skip_special_tokens=True)
    return replies


@torch.inference_mode()
def score(model, tok, ef: EvalFile, args) -> dict:
    """n, match rate (None without expect strings), mention rate (None without mention strings) and
    perplexity of the reference answers."""
    loss = evaluate_loss(model, ef.dataset, PadCollator(tok.pad_token_id), args.batch_size, model_device(model))
    match_rate = mention_rate = None
    if ef.prompts:
        replies = greedy_replies(model, tok, ef.prompts, args.max_new_tokens or 48, args.batch_size,
                                 args.repetition_penalty, args.compile)
        if ef.completion:
            replies = [first_sentence(r) for r in replies]
        hits = [any(contains(r, e) for e in expect) for r, expect in zip(replies, ef.expects)]
        match_rate = sum(hits) / len(replies)
        misses = [i for i, hit in enumerate(hits) if not hit][: getattr(args, "show_misses", 0)]
        for i in misses:
            log(f"  miss: {ef.questions[i]!r} -> {replies[i]!r} (expected: {' | '.join(ef.expects[i])})")
        named = [any(contains(r, m) for m in mention) for r, mention in zip(replies, ef.mentions) if mention]
        mention_rate = sum(named) / len(named) if named else None
    return {"n": len(ef.dataset), "match_rate": match_rate, "mention_rate": mention_rate,
            "ppl": math.exp(min(loss, 700.0))}


def evaluate(model, tok, adapters, args, files=None) -> list:
    """One row per file and setting: none (adapters off), then each adapter."""
    files = files or [read_eval_file(path, tok, args) for path in split_list(args.eval)]
    first = active_adapter(model)
    rows = []
    for ef in files:
        for setting in [None] + adapters:
            switch(model, setting, args.merge)
            if getattr(args, "show_misses", 0) and ef.prompts:
                log(f"{Path(ef.path).name} under {setting or 'no adapter'}: the first {args.show_misses} misses")
            t0 = time.time()
            row = {"weight": model.weight_name, "setting": setting or "none", "file": ef.path,
                   **score(model, tok, ef, args)}
            log(" ".join(format_row(row)) + f" ({time.time() - t0:.1f}s)")
            rows.append(row)
    switch(model, first, args.merge)
    return rows


def evaluate_all(model, tok, adapters, args) -> list:
    """The first base with its adapters, then each further --weight base alone."""
    files = [read_eval_file(path, tok, args) for path in split_list(args.eval)]  # all checked before scoring
    rows = evaluate(model, tok, adapters, args, files)
    for weight in split_list(args.weight)[1:]:
        rows += evaluate(load_base(args, tok, weight), tok, [], args, files)
    return rows


def percent(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def format_row(row) -> tuple:
    return (row.get("weight", ""), Path(row["file"]).name, row["setting"], str(row["n"]), percent(row["match_rate"]),
            percent(row.get("mention_rate")), f"{row['ppl']:.2f}")


def print_table(rows) -> None:
    lines = [("weight", "file", "setting", "n", "match", "mention", "ppl")] + [format_row(r) for r in rows]
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths))))


def run(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.compile:
        keep_compile_cache(args.save_dir)
    model, tok, adapters = load(args)
    if args.eval:
        rows = evaluate_all(model, tok, adapters, args)
        if args.json_out:
            atomic_json_save(rows, args.json_out)
            log(f"wrote {args.json_out}")
        if args.json:
            print(json.dumps(rows, ensure_ascii=False))
        else:
            print_table(rows)
    if args.prompt:
        answer_prompts(model, tok, adapters, args)
    if not args.eval and not args.prompt:
        chat(model, tok, args)


def main(argv=None) -> int:
    """Exit code 0, or 2 after one `error: ...` line on stderr for bad input."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
