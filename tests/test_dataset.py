import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dataset.lm_dataset import (DEMO_DIR, IGNORE_INDEX, DataError, LengthGroupedBatchSampler, PackedDataset,
                                PadCollator, PretrainDataset, SFTDataset, pad_fraction)
from model.tokenizer import Tokenizer
from tests.test_tokenizer import train_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

MULTI_TURN = [
    {"role": "system", "content": "你是 MiniMind，一个小助手。"},
    {"role": "user", "content": "你好！"},
    {"role": "assistant", "content": "你好，我是 MiniMind 🤖。"},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "Low-rank adapters:\n\tW0 + B A."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def test_sft_loss_mask_exact_positions(tok, tmp_path):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURN}]), tok, max_length=1024)
    input_ids, labels = ds[0]
    assert input_ids.tolist() == tok.apply_chat_template(MULTI_TURN, tokenize=True)

    # Expected labeled positions, from prefix lengths: the header is masked, content + <|im_end|> is labeled.
    expected = torch.full_like(input_ids, IGNORE_INDEX)
    for k, message in enumerate(MULTI_TURN):
        if message["role"] == "assistant":
            start = len(tok.encode(tok.apply_chat_template(MULTI_TURN[:k], add_generation_prompt=True)))
            end = start + len(tok.encode(message["content"])) + 1
            expected[start:end] = input_ids[start:end]
            assert tok.decode(input_ids[start:end]) == message["content"] + "<|im_end|>"
            assert tok.decode(input_ids[end:end + 1]) == "\n"
    assert torch.equal(labels, expected)
    labeled_text = tok.decode(input_ids[labels != IGNORE_INDEX])
    assert labeled_text == "你好，我是 MiniMind 🤖。<|im_end|>Low-rank adapters:\n\tW0 + B A.<|im_end|>"


def test_sft_truncation(tok, tmp_path):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURN}]), tok, max_length=20)
    input_ids, labels = ds[0]
    full_ids, full_labels = SFTDataset(ds.path, tok, max_length=4096)[0]
    assert len(input_ids) == len(labels) == 20 < len(full_ids)
    assert torch.equal(input_ids, full_ids[:20]) and torch.equal(labels, full_labels[:20])


def test_pretrain_item_and_truncation(tok, tmp_path):
    long_text = "MiniMind 训练 " * 200
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": "hello world"}, {"text": long_text}]),
                         tok, max_length=64)
    input_ids, labels = ds[0]
    assert input_ids.tolist() == [1] + tok.encode("hello world") + [2]
    assert torch.equal(input_ids, labels) and input_ids.dtype == torch.long
    input_ids, _ = ds[1]
    assert len(input_ids) == 64 and input_ids[0] == 1 and input_ids[-1] != 2
    assert input_ids[1:].tolist() == tok.encode(long_text)[:63]


def test_packed_rows_are_the_shuffled_documents_end_to_end(tok, tmp_path):
    texts = [f"doc {i} " + "MiniMind 训练 " * (i % 7) for i in range(40)] + ["long " * 300]
    docs = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tok, max_length=1 << 30)
    packed = PackedDataset(docs, max_length=32, seed=5)
    whole = [[1] + tok.encode(t) + [2] for t in texts]
    total = sum(map(len, whole))
    assert len(whole[-1]) > 32 and len(packed) == total // 32
    streams = []
    for epoch in (0, 1):
        packed.set_epoch(epoch)
        rows = [packed[k] for k in range(len(packed))]
        assert all(len(ids) == 32 and torch.equal(ids, labels) for ids, labels in rows)
        stream = torch.cat([ids for ids, _ in rows]).tolist()
        assert stream == [t for i in packed.order for t in whole[i]][: len(stream)]  # the long text stays whole
        assert sorted(packed.order.tolist()) == list(range(len(texts)))
        streams.append(stream)
    assert streams[0] != streams[1]  # each epoch its own order
    packed.set_epoch(0)
    assert torch.cat([packed[k][0] for k in range(len(packed))]).tolist() == streams[0]  # and the same again
    with pytest.raises(DataError, match=r"fewer than one packed row of --max_seq_len 100000; lower --max_seq_len"):
        PackedDataset(docs, max_length=100_000)


def test_pad_collator(tok):
    batch = [(torch.tensor([1, 5, 6, 2]), torch.tensor([-100, 5, 6, 2])), (torch.tensor([1, 7]), torch.tensor([1, 7]))]
    out = PadCollator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6, 2], [1, 7, -100, -100]]
    fixed = PadCollator(pad_id=0, max_length=6)(batch)
    assert fixed["input_ids"].shape == fixed["labels"].shape == (2, 6)
    assert fixed["labels"][0, 4:].tolist() == [-100, -100]


@pytest.mark.parametrize("line, problem", [
    ('{"conversations": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"conversation": []}', 'missing "conversations" list'),
    ('{"conversations": [{"role": "user"}]}', 'message 1 has no "content" string'),
    ('{"conversations": [{"role": "bot", "content": "hi"}]}', "message 1 has role 'bot'"),
    ('{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('["not", "an", "object"]', "not a JSON object"),
])
def test_bad_sft_line_names_file_and_line(tok, tmp_path, line, problem):
    good = {"conversations": MULTI_TURN}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, "", line, good])  # the blank line still counts as line 2
    with pytest.raises(DataError) as info:
        SFTDataset(path, tok)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "--skip_bad_lines" in message
    assert "\n" not in message
    ds = SFTDataset(path, tok, skip_bad_lines=True)
    assert (len(ds), ds.n_skipped) == (2, 1)
    assert torch.equal(ds[1][0], ds[0][0])


def test_bad_pretrain_line_and_empty_files(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": 3}, {"content": "x"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing \"text\" string field"):
        PretrainDataset(path, tok)
    assert PretrainDataset(path, tok, skip_bad_lines=True).n_skipped == 2
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", ""])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows \(1 bad lines skipped\)"):
        PretrainDataset(only_bad, tok, skip_bad_lines=True)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file$"):
        PretrainDataset(tmp_path / "missing.jsonl", tok)
    with pytest.raises(DataError, match=r"python dataset/make_demo_data\.py"):
        SFTDataset(DEMO_DIR / "no_such_demo_file.jsonl", tok)


def test_dataloader_workers_read_their_own_file_handle(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"line {i} " * (i % 7 + 1)} for i in range(64)])
    ds = PretrainDataset(path, tok)
    expected = PadCollator(tok.pad_token_id)([ds[i] for i in range(64)])
    loader = DataLoader(ds, batch_size=64, num_workers=2, collate_fn=PadCollator(tok.pad_token_id))
    _ = ds[5]  # the parent's handle exists before the workers start
    assert torch.equal(next(iter(loader))["input_ids"], expected["input_ids"])


def test_length_grouped_sampler_and_pad_fraction(tok, tmp_path):
    records = [{"text": "词" * (1 + (i * 37) % 200)} for i in range(300)]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", records), tok, max_length=512)
    sampler = LengthGroupedBatchSampler(ds, batch_size=8, seed=3, group_size=8)
    batches = list(sampler)
    assert batches == list(LengthGroupedBatchSampler(ds, batch_size=8, seed=3, group_size=8))
    assert sorted(i for b in batches for i in b) == list(range(300)) and len(batches) == len(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    shards = [list(LengthGroupedBatchSampler(ds, 8, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [12, 12, 12]  # 38 batches, 36 usable by 3 ranks
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))

    plain = pad_fraction(ds, batch_size=8)
    grouped = pad_fraction(ds, batch_size=8, batch_sampler=batches)
    assert 0 < grouped["longest"] < plain["longest"] / 3 and plain["longest"] < plain["max_length"]
    real = sum(len(ds[i][0]) for i in range(300))
    assert plain["max_length"] == pytest.approx(1 - real / (300 * 512))


def test_token_lengths_match_the_samples_and_group_mixed_languages_better_than_bytes(tok, tmp_path):
    # Here "你好" is 6 bytes and 2 tokens, "word " 5 bytes and 5 tokens: by line bytes the Chinese lines sort
    # among English lines of a third their tokens. Grouping by token count must not pad them together.
    texts = [("你好" * (5 + i % 40)) if i % 2 else ("word " * (5 + i % 40)) for i in range(160)]
    pre = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tok, max_length=30)
    assert pre.token_lengths().tolist() == [len(pre[i][0]) for i in range(len(pre))]
    assert pre.token_lengths().max() == 30  # capped at max_length, as the samples are
    sft = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"role": "user", "content": t}, {"role": "assistant", "content": t[:7]}]} for t in texts]), tok, max_length=512)
    assert sft.token_lengths().tolist() == [len(sft[i][0]) for i in range(len(sft))]
    by_tokens = list(LengthGroupedBatchSampler(sft, batch_size=8, seed=0, group_size=20, lengths=sft.token_lengths()))
    by_bytes = list(LengthGroupedBatchSampler(sft, batch_size=8, seed=0, group_size=20))  # the default
    grouped, bytewise = (pad_fraction(sft, 8, batch_sampler=b)["longest"] for b in (by_tokens, by_bytes))
    assert grouped < 0.05 and bytewise > 0.15, (grouped, bytewise)  # measured: 2.3% and 22%


# VmHWM is this process image's peak RSS; ru_maxrss would inherit pytest's own peak across fork + exec.
MEMORY_PROBE = textwrap.dedent("""
    import random, re, sys
    sys.path.insert(0, sys.argv[1])
    from dataset.lm_dataset import PretrainDataset
    from model.tokenizer import Tokenizer

    def peak_rss_mib():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024

    tok = Tokenizer(sys.argv[2])
    tok.encode("warm up")
    before = peak_rss_mib()
    ds = PretrainDataset(sys.argv[3], tok, max_length=256)
    rng = random.Random(0)
    for i in sorted(rng.randrange(len(ds)) for _ in range(3000)):
        ds[i]
    print(len(ds), peak_rss_mib() - before)
""")


@pytest.mark.slow
def test_memory_flat_when_streaming_300mb(tok, tmp_path):
    """Peak RSS while indexing and reading a ~300 MB file stays near that of a 1 MB file."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc (Linux)")
    lines = [json.dumps({"text": f"{i} 第{i}行：MiniMind streams its data. " * (8 + i % 24)}, ensure_ascii=False)
             for i in range(1000)]
    chunk = ("\n".join(lines) + "\n").encode()
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_bytes(chunk[: 1 << 20].rsplit(b"\n", 1)[0] + b"\n")
    with open(big, "wb") as f:
        for _ in range((300 << 20) // len(chunk) + 1):
            f.write(chunk)

    def growth(path):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO), str(tok.path), str(path)],
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), float(out[1])

    (n_small, small_mib), (n_big, big_mib) = growth(small), growth(big)
    print(f"peak RSS growth: {small_mib:.1f} MiB for {n_small} lines, {big_mib:.1f} MiB for {n_big} lines "
          f"({big.stat().st_size / 2**20:.0f} MiB)")
    assert n_big > 100 * n_small
    assert big_mib < small_mib + 64


def test_file_rewritten_after_indexing(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a" * 10}, {"text": "b" * 10}])
    ds = PretrainDataset(path, tok)
    write_jsonl(path, [{"text": "a longer first line"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl changed after it was indexed"):
        ds[1]


def test_show_mask_marks_exactly_the_assistant_replies(tmp_path):
    """The printout a user reads to see which tokens train: bracketed tokens are the targets the loss uses."""
    first_demo = next(line for line in open(DEMO_DIR / "sft.jsonl", encoding="utf-8") if line.strip())
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": MULTI_TURN}, first_demo])
    out = subprocess.run([sys.executable, str(REPO / "dataset" / "lm_dataset.py"), "--show_mask", str(path),
                          "--rows", "2"], capture_output=True, text=True, check=True).stdout
    tok = Tokenizer()
    ds = SFTDataset(path, tok, max_length=256)
    blocks = out.split("--- chat.jsonl row ")[1:]
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        head, body = block.split("\n", 1)
        input_ids, labels = ds[i]
        trained = int((labels != IGNORE_INDEX).sum())
        assert head == f"{i + 1}: {trained} of {len(input_ids)} tokens trained"
        marked = "".join(re.findall(r"\[(.*?)\]", body, flags=re.S)).replace("\\n", "\n")
        replies = [m["content"] for m in ds.record(i)["conversations"] if m["role"] == "assistant"]
        assert marked == "".join(r + "<|im_end|>" for r in replies)
        assert marked == tok.decode(input_ids[labels != IGNORE_INDEX])
        # Everything else is shown unmarked: the printout is the whole chat text.
        assert re.sub(r"\[(.*?)\]", r"\1", body, flags=re.S).replace("\n", "").replace("\\n", "\n") == \
            tok.apply_chat_template(ds.record(i)["conversations"])
    assert "<|im_start|>system\\n\n你是 MiniMind，一个小助手。<|im_end|>\\n\n<|im_start|>user\\n\n你好！<|im_end|>" in out


def test_show_mask_pretraining_rows_and_the_cut(tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "The capital of Japan is Tokyo."}])
    out = subprocess.run([sys.executable, str(REPO / "dataset" / "lm_dataset.py"), "--show_mask", str(path),
                          "--max_seq_len", "4"], capture_output=True, text=True, check=True).stdout
    n = len(Tokenizer().encode("The capital of Japan is Tokyo.", add_special_tokens=True))
    assert out.splitlines()[0] == f"--- pre.jsonl row 1: 3 of 4 tokens trained, {n - 4} more cut by --max_seq_len 4"
    assert out.splitlines()[1].startswith("<|im_start|>[")  # <bos> is never a target
