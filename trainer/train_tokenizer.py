"""Train the byte-level BPE tokenizer (MiniMind's recipe) and write model/tokenizer.json + tokenizer_config.json.

    python trainer/train_tokenizer.py                       # dataset/demo/pretrain.jsonl + sft.jsonl (the base corpus)
    python trainer/train_tokenizer.py --data_path a.jsonl b.jsonl --vocab_size 6400 --out_dir model
"""
import argparse
import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
CJK_CHAR = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (pad/unk), 1 (bos), 2 (eos)
# Same output as model.tokenizer.Tokenizer.apply_chat_template, for tools that evaluate jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_data_paths():
    demo = REPO / "dataset" / "demo"
    # The base corpus only: the tokenizer belongs to the base, and adapters train later on text it never saw.
    return [demo / "pretrain.jsonl", demo / "sft.jsonl"]


def iter_texts(paths):
    """Yield every "text" and every conversation message content, file by file, line by line."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record.get("text"), str):
                    yield record["text"]
                for message in record.get("conversations") or []:
                    if isinstance(message.get("content"), str):
                        yield message["content"]


def train_tokenizer(paths, vocab_size=6400):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # Each Chinese character is its own piece: with no spaces to stop them, merges on a templated corpus
        # fuse whole phrases ("日本的首都是东京" was one token), and a fact inside one token cannot be recalled
        # from "日本的首都是". It also keeps "我是Lumina" from gluing Chinese to a Latin word.
        pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"),
        # Digits apart from the space before them: "7" is the same token in "7加8" and "7 plus 8", so sums
        # learned in one language serve the other.
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(paths), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"{token} got id {tokenizer.token_to_id(token)}, expected {i}"
    return tokenizer


def tokenizer_config(model_max_length=32768):
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def main(argv=None):
    formatter = type("Formatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data_path", nargs="+", default=None,
                        help="jsonl files (default: dataset/demo/pretrain.jsonl and sft.jsonl)")
    parser.add_argument("--vocab_size", type=int, default=6400, help="the most tokens the BPE may have")
    parser.add_argument("--out_dir", default=str(REPO / "model"), help="where tokenizer.json goes")
    args = parser.parse_args(argv)

    paths = [Path(p) for p in args.data_path] if args.data_path else default_data_paths()
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        sys.exit(f"no training data ({', '.join(missing) or 'dataset/demo/*.jsonl'}); "
                 f"make the demo data with: python dataset/make_demo_data.py")
    print(f"training a {args.vocab_size}-token BPE on {', '.join(str(p) for p in paths)}")
    tokenizer = train_tokenizer(paths, args.vocab_size)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"wrote {out_dir / 'tokenizer.json'} ({tokenizer.get_vocab_size()} tokens) and tokenizer_config.json")


if __name__ == "__main__":
    main()
