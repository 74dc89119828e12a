import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from model.tokenizer import Tokenizer
from trainer.train_tokenizer import main as train_tokenizer_main

REPO = Path(__file__).resolve().parent.parent

SAMPLES = [
    "你好，世界！我们来训练一个小型语言模型。",
    "The quick brown fox jumps over the lazy dog.",
    "emoji 🤖🚀👩‍👩‍👧 and flags 🇨🇳🇺🇸",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\r\n\n\n    return None\n",
    "  leading and trailing spaces  ",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am MiniMind 🤖."},
]
CHATML = ("<|im_start|>system\n你是一个助手。<|im_end|>\n"
          "<|im_start|>user\nWho are you?<|im_end|>\n"
          "<|im_start|>assistant\nI am MiniMind 🤖.<|im_end|>\n")


def train_tiny_tokenizer(out_dir, vocab_size=400):
    """A tokenizer trained from scratch on a few lines; returns its directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"{SAMPLES[i % 5]} line {i} 训练数据"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"conversations": CONVERSATION}, ensure_ascii=False) + "\n")
    train_tokenizer_main(["--data_path", str(corpus), "--vocab_size", str(vocab_size), "--out_dir", str(out_dir)])
    return out_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module", params=["repo", "tiny"])
def tok(request, tiny_dir):
    if request.param == "repo":
        if not (REPO / "model" / "tokenizer.json").is_file():
            pytest.skip("model/tokenizer.json not trained yet")
        return Tokenizer()
    return Tokenizer(tiny_dir)


def random_unicode(rng, n):
    # Any code point except surrogates, which UTF-8 cannot encode; bias towards the BMP.
    chars = []
    while len(chars) < n:
        cp = rng.randrange(0x110000) if rng.random() < 0.3 else rng.randrange(0x10000)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


def test_round_trip(tok):
    rng = random.Random(0)
    for text in SAMPLES + [random_unicode(rng, rng.randrange(1, 60)) for _ in range(200)]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    ids = tok.encode("hi", add_special_tokens=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("hi")
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert len(tok) == tok.vocab_size


def test_chat_template_exact(tok):
    assert tok.apply_chat_template(CONVERSATION) == CHATML
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == CHATML + "<|im_start|>assistant\n"
    for prompt in (False, True):
        ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt, tokenize=True)
        text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
        assert ids == tok.encode(text)
        assert ids[0] == 1 and ids.count(1) == 3 + prompt and ids.count(2) == 3
        assert tok.decode(ids) == text


def test_repo_tokenizer_vocab():
    if not (REPO / "model" / "tokenizer.json").is_file():
        pytest.skip("model/tokenizer.json not trained yet")
    tok = Tokenizer()
    assert 1000 < tok.vocab_size <= 6400  # 6400 is the cap; merges inside Latin words run out below it
    # One token per Chinese character: no merge fuses a phrase, so a fact never hides inside one token.
    assert len(tok.encode("日本的首都是东京")) == 8 and tok.decode(tok.encode("日本的首都是东京")) == "日本的首都是东京"
    # A number is the same token in both languages: the space before it is a token of its own.
    assert tok.encode("17加8")[0] == tok.encode("9 plus 17")[-1] and tok.decode(tok.encode("9 plus 17")) == "9 plus 17"
    config = json.loads((REPO / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_tiny_tokenizer_from_scratch(tiny_dir):
    tok = Tokenizer(tiny_dir / "tokenizer.json")  # a file path works as well as a directory
    assert tok.vocab_size == 400
    # Trained merges compress seen text below one token per byte.
    assert len(tok.encode(SAMPLES[1])) < len(SAMPLES[1].encode()) / 2


def test_training_is_deterministic(tiny_dir, tmp_path):
    again = train_tiny_tokenizer(tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_script_runs_from_any_cwd(tiny_dir, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "trainer" / "train_tokenizer.py"), "--data_path",
                    str(tiny_dir / "corpus.jsonl"), "--vocab_size", "300", "--out_dir", str(out)],
                   cwd=tmp_path, check=True, capture_output=True)
    assert Tokenizer(out).vocab_size == 300


def test_missing_or_broken_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python trainer/train_tokenizer\.py"):
        Tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json.*python trainer/train_tokenizer\.py"):
        Tokenizer(tmp_path)


def test_matches_transformers(tok):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.path))
    rng = random.Random(1)
    for text in SAMPLES + [CHATML] + [random_unicode(rng, 30) for _ in range(50)]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    # The jinja chat_template in tokenizer_config.json renders the same string as our Python template.
    auto = transformers.AutoTokenizer.from_pretrained(str(tok.path.parent))
    for prompt in (False, True):
        assert auto.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt) == \
            tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)
