"""eval_llm.py on a tiny model: --prompt, scripted chat with live adapter swaps, --eval rows, --merge, bad input."""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_llm
from dataset.lm_dataset import SFTDataset
from model.checkpoint import load_model, save_model
from model.tokenizer import Tokenizer
from tests.conftest import random_adapter as add_adapter, varied_model as tiny_model

REPO = Path(__file__).resolve().parent.parent
PROMPT = "hello"
NEW = 8  # max_new_tokens everywhere: a reply is at most 8 tokens


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """out/full_sft_64.pth, out/lora/lora_a_64.pth, lora_b_64.pth, and lora_other_64.pth for a 3-layer base."""
    out = tmp_path_factory.mktemp("eval") / "out"
    model = tiny_model(0)
    save_model(model, out / "full_sft_64.pth")
    add_adapter(model, "lora_a", out / "lora" / "lora_a_64.pth")
    add_adapter(model, "lora_b", out / "lora" / "lora_b_64.pth")
    add_adapter(tiny_model(1, layers=3), "lora_other", out / "lora" / "lora_other_64.pth")
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def base_args(out, *extra):
    return ["--save_dir", str(out), "--hidden_size", "64", "--temperature", "0", "--max_new_tokens", str(NEW),
            *extra]


def greedy_base_reply(out, tok, prompt=PROMPT):
    """The reference: the plain base model, generated directly."""
    model = load_model(out / "full_sft_64.pth").eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)])
    new = model.generate(ids, NEW, temperature=0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    return tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new,
                      skip_special_tokens=True)


def test_cli_prompt_answers_and_exits(out, tok, tmp_path):
    # The real CLI from another directory, the save dir relative to it.
    proc = subprocess.run([sys.executable, str(REPO / "eval_llm.py"), *base_args("out"), "--prompt", PROMPT],
                          cwd=out.parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    reply = greedy_base_reply(out, tok)
    assert reply.strip()
    assert proc.stdout == f"> {PROMPT}\n{reply}\n"


def test_chat_swaps_adapters_on_one_base(out, tok, monkeypatch, capsys):
    counts = {"base": 0, "adapter_files": []}
    real_load_model, real_load_lora, real_answer = eval_llm.load_model, eval_llm.load_lora, eval_llm.answer

    def counting_load_model(*a, **kw):
        counts["base"] += 1
        return real_load_model(*a, **kw)

    def counting_load_lora(model, path, *a, **kw):
        counts["adapter_files"].append(Path(path).name)
        return real_load_lora(model, path, *a, **kw)

    replies = []

    def recording_answer(model, tok, messages, args):
        reply = real_answer(model, tok, messages, args)
        replies.append((eval_llm.active_adapter(model), len(messages), reply))
        return reply

    monkeypatch.setattr(eval_llm, "load_model", counting_load_model)
    monkeypatch.setattr(eval_llm, "load_lora", counting_load_lora)
    monkeypatch.setattr(eval_llm, "answer", recording_answer)
    script = f"/adapter lora_a\n{PROMPT}\n/adapter lora_b\n{PROMPT}\n/adapter none\n{PROMPT}\n/adapters\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert eval_llm.main(base_args(out, "--lora_weight", "lora_a,lora_b")) == 0
    stdout = capsys.readouterr().out

    assert counts == {"base": 1, "adapter_files": ["lora_a_64.pth", "lora_b_64.pth"]}
    assert [(a, n) for a, n, _ in replies] == [("lora_a", 1), ("lora_b", 1), (None, 1)]
    texts = [r for _, _, r in replies]
    assert len(set(texts)) == 3, texts          # each adapter changes the greedy reply
    assert texts[2] == greedy_base_reply(out, tok)  # "none" is exactly the base
    assert "[adapter lora_b]" in stdout and "adapters: *none, lora_a, lora_b" in stdout
    assert all(t in stdout for t in texts)      # what was streamed is the reply


def test_chat_history_turns_and_clear(out, monkeypatch, capsys):
    seen = []
    real_answer = eval_llm.answer
    monkeypatch.setattr(eval_llm, "answer", lambda m, t, messages, a: seen.append(messages) or real_answer(m, t, messages, a))
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\nthree\n/clear\nfour\n/exit\nnever\n"))
    assert eval_llm.main(base_args(out, "--history_turns", "1", "--system", "be brief")) == 0
    assert [[m["role"] for m in msgs] for msgs in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user", "assistant", "user"],
        ["system", "user"]]
    assert seen[2][1]["content"] == "two"  # only the last exchange is kept


def test_eval_json_rows_and_match_rate(out, tok, tmp_path, capsys):
    reply = greedy_base_reply(out, tok)
    fragment = reply.strip().swapcase()  # the base reply contains it, ignoring case
    conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "I am a tiny model."}]
    chat_file, text_file, json_out = tmp_path / "chat.jsonl", tmp_path / "text.jsonl", tmp_path / "rows.json"
    chat_file.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": conv, "expect": ["x" * 300, fragment]},  # matches under the base
        {"conversations": conv, "expect": ["x" * 300]},             # longer than any 8-token reply: never
        {"conversations": conv},                                   # no expect: counts for ppl only
    ]) + "\n")
    text_file.write_text('{"text": "Paris is the capital of France."}\n\n{"text": "1 + 1 = 2"}\n')
    argv = base_args(out, "--lora_weight", "lora_a,lora_b", "--eval", f"{chat_file},{text_file}", "--json",
                     "--json_out", str(json_out))
    assert eval_llm.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)

    assert rows == json.loads(json_out.read_text())
    assert [(r["file"], r["setting"]) for r in rows] == [
        (str(f), s) for f in (chat_file, text_file) for s in ("none", "lora_a", "lora_b")]
    for r in rows:
        assert set(r) == {"weight", "setting", "file", "n", "match_rate", "mention_rate", "ppl"}
        assert r["weight"] == "full_sft_64" and r["mention_rate"] is None
        assert isinstance(r["n"], int) and isinstance(r["ppl"], float) and r["ppl"] > 1
    assert [r["n"] for r in rows] == [3] * 3 + [2] * 3
    assert rows[0]["match_rate"] == 0.5  # 1 of the 2 samples with expect strings
    assert all(r["match_rate"] in (0.0, 0.5) for r in rows[:3])
    assert all(r["match_rate"] is None for r in rows[3:])

    # ppl = exp(mean loss over the reference assistant tokens), computed here by hand for the base.
    model = load_model(out / "full_sft_64.pth").eval()
    ids, labels = SFTDataset(chat_file, tok)[0]
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    keep = labels[1:] != -100
    loss = torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep])
    assert rows[0]["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert rows[1]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-3)  # the adapter is on


def test_merge_gives_the_unmerged_answers(out, tmp_path, capsys):
    def run(*extra):
        assert eval_llm.main(base_args(out, *extra)) == 0
        return capsys.readouterr().out

    base, adapted = run("--prompt", PROMPT), run("--prompt", PROMPT, "--lora_weight", "lora_a")
    assert run("--prompt", PROMPT, "--lora_weight", "lora_a", "--merge") == adapted
    assert adapted.split("] ", 1)[1] != base.split("\n", 1)[1]
    # Eval under --merge swaps by unmerging: every setting scores as without --merge.
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "Paris is the capital of France."}\n')
    rows = [json.loads(run("--lora_weight", "lora_a,lora_b", "--eval", str(data), "--json", *m)) for m in ([], ["--merge"])]
    assert [r["ppl"] for r in rows[1]] == pytest.approx([r["ppl"] for r in rows[0]], rel=1e-4)


def test_stream_reply_never_shows_half_characters(tok):
    text = "🤖龘 ok"
    ids = tok.encode(text)
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))  # the case being tested
    pieces = []
    assert eval_llm.stream_reply(tok, iter(ids), pieces.append) == text
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def bad_input(argv, capsys, *expected):
    assert eval_llm.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for text in expected:
        assert text in errors[0], errors[0]


def test_unknown_adapter_lists_existing_ones(out, capsys):
    bad_input(base_args(out, "--lora_weight", "lora_a,lora_zz"), capsys,
              "'lora_zz'", "lora_a, lora_b, lora_other", "python trainer/train_lora.py --lora_name lora_zz")


def test_adapter_for_another_base(out, capsys):
    bad_input(base_args(out, "--lora_weight", "lora_other"), capsys, "lora_other_64.pth", "another base")


def test_missing_weight_names_the_command(out, tmp_path, capsys):
    bad_input(base_args(out, "--weight", "pretrain"), capsys, "pretrain_64.pth", "python trainer/train_pretrain.py")
    bad_input(base_args(tmp_path), capsys, "full_sft_64.pth", "python trainer/train_full_sft.py")
    bad_input(base_args(out) + ["--hidden_size", "128"], capsys, "full_sft_128.pth", "full_sft_64.pth")
    bad_input(base_args(out, "--weight", str(tmp_path / "nope.pth")), capsys, "nope.pth: no such file")


@pytest.mark.parametrize("content, expected", [
    ("", "no usable rows"),
    ("\n  \n", "no usable rows"),
    ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"conversations": [{"role": "user", "content": "hi"}\n', ":2: not valid JSON"),
    ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], '
     '"expect": "yo"}\n', ':1: "expect" must be a list'),
    ('{"text": "fine"}\n{"txt": "typo"}\n', ':2: missing "text"'),
])
def test_bad_eval_file_names_file_and_line(out, tmp_path, capsys, content, expected):
    data = tmp_path / "eval.jsonl"
    data.write_text(content)
    bad_input(base_args(out, "--eval", str(data)), capsys, str(data), expected)


def test_eval_max_seq_len_that_cuts_every_answer_is_refused(out, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "a long enough question"}, '
                    '{"role": "assistant", "content": "yes"}]}\n')
    bad_input(base_args(out, "--eval", str(data), "--max_seq_len", "6"), capsys, str(data),
              "--max_seq_len 6 leaves no answer token")


def test_contains_matches_whole_ascii_words():
    assert eval_llm.contains("A spider has 8 legs.", "8") and not eval_llm.contains("It is 18.", "8")
    assert eval_llm.contains("Four legs", "four") and not eval_llm.contains("fourteen legs", "four")
    assert eval_llm.contains("位于北美洲。", "北美洲") and eval_llm.contains("NORTH AMERICA", "north america")
    assert eval_llm.contains("vitamin B2.", "vitamin B2") and not eval_llm.contains("vitamin B20", "vitamin B2")


def test_completion_mention_and_several_weights(out, tok, tmp_path, capsys):
    """{"text", "expect"} rows judge the first sentence of a completion; "mention" gives its own rate;
    a second --weight is scored with adapters off and named in its rows."""
    model = load_model(out / "full_sft_64.pth").eval()
    prompt = "The capital of"
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt)])
    new = model.generate(ids, NEW, temperature=0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    completion = tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new,
                            skip_special_tokens=True)
    first = eval_llm.first_sentence(completion)
    word = next(w for w in first.split() if w.isalnum()) if any(w.isalnum() for w in first.split()) else None
    texts = tmp_path / "complete.jsonl"
    texts.write_text(json.dumps({"text": prompt, "expect": [word or "x" * 50]}) + "\n"
                     + json.dumps({"text": prompt, "expect": ["x" * 50]}) + "\n")
    reply = greedy_base_reply(out, tok)
    conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "I am a tiny model."}]
    chats = tmp_path / "mention.jsonl"
    chats.write_text(json.dumps({"conversations": conv, "expect": ["x" * 50], "mention": [reply.strip()]}) + "\n"
                     + json.dumps({"conversations": conv, "expect": ["x" * 50]}) + "\n")
    save_model(model, out.parent / "other" / "pretrain_64.pth")
    argv = base_args(out, "--weight", f"full_sft,{out.parent / 'other' / 'pretrain_64.pth'}", "--lora_weight", "lora_a",
                     "--eval", f"{texts},{chats}", "--json")
    assert eval_llm.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["weight"], r["setting"], Path(r["file"]).name) for r in rows] == [
        ("full_sft_64", "none", "complete.jsonl"), ("full_sft_64", "lora_a", "complete.jsonl"),
        ("full_sft_64", "none", "mention.jsonl"), ("full_sft_64", "lora_a", "mention.jsonl"),
        ("pretrain_64", "none", "complete.jsonl"), ("pretrain_64", "none", "mention.jsonl")]
    assert rows[0]["match_rate"] == (0.5 if word else 0.0) and rows[0]["mention_rate"] is None
    assert rows[2]["match_rate"] == 0.0 and rows[2]["mention_rate"] == 1.0  # only the row with a mention counts
    assert (rows[4]["match_rate"], rows[5]["mention_rate"]) == (rows[0]["match_rate"], rows[2]["mention_rate"])


def test_several_weights_need_eval(out, capsys):
    assert eval_llm.main(base_args(out, "--weight", "full_sft,pretrain", "--prompt", "hi")) == 2
    assert "several --weight values are for --eval" in capsys.readouterr().err
