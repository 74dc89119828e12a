"""A user's own adapter on a tiny base: the plan line, replay, no silent overwrite, and errors whose fix runs."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import eval_llm
from dataset.lm_dataset import ReplayMix, SFTDataset
from model.checkpoint import config_path, load_model, safe_torch_load, save_model
from model.model_lora import CONFIG_KEY, apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from model.model_minimind import MiniMindForCausalLM
from model.tokenizer import Tokenizer
from scripts import convert_model
from tests.conftest import tiny_config
from tests.test_trainer import TINY, head, run
from trainer import train_full_sft, train_lora
from trainer.trainer_utils import base_replies, first_sentence, replay_pool, evenly_spaced

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dataset" / "demo"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture
def base(tmp_path, capsys):
    """out/full_sft_64.pth trained 2 steps from scratch on 96 demo SFT rows (its .json records them), a
    32-conversation persona file, and a general chat file to replay."""
    sft = head(DEMO / "sft.jsonl", tmp_path / "sft.jsonl", 96)
    persona = head(DEMO / "lora_identity.jsonl", tmp_path / "my_persona.jsonl", 32)
    out = tmp_path / "out"
    code, log, _ = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(sft),
                                                "--from_weight", "none", "--max_steps", "2"], capsys)
    assert code == 0, log
    return {"out": out, "sft": sft, "persona": persona}


def lora(base, *extra, capsys):
    return run(train_lora.main, TINY + ["--save_dir", str(base["out"]), "--data_path", str(base["persona"]),
                                        *extra], capsys)


def plan_line(log):
    return next(line for line in log.splitlines() if line.startswith("plan: "))


def test_defaults_plan_replay_and_every_step_on_the_curve(base, capsys):
    code, log, _ = lora(base, capsys=capsys)
    assert code == 0, log
    plan = plan_line(log)
    # 32 persona rows + 64 replay rows drawn from the base's own SFT data = 24 batches of 4; epochs for >= 300 steps.
    assert f"32 samples of my_persona.jsonl + 64 replay samples per epoch from {base['sft'].resolve()} (0 of its 96 " \
           f"left out: they repeat a base reply this data replaces)" in plan
    assert "13 epochs x 24 steps = 312 optimizer steps (batch 4 x 1 accumulation x 1 processes)" in plan
    assert "r=16 alpha=32 (alpha/r) on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in plan
    assert "warning" not in log
    adapter = base["out"] / "lora" / "my_persona_64.pth"  # named after the data file
    assert json.loads(safe_torch_load(adapter)[CONFIG_KEY])["rank"] == 16
    history = safe_torch_load(base["out"] / "checkpoints" / "my_persona_64_resume.pth")["history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(2, 313, 2))  # log_interval 2 of TINY


def test_a_short_run_warns_and_logs_every_step(base, capsys):
    code, log, _ = lora(base, "--epochs", "1", "--replay_data", "none", capsys=capsys)
    assert code == 0, log
    assert "32 samples of my_persona.jsonl (no replay)" in plan_line(log)
    assert "warning: 8 optimizer steps are too few to learn much (fewer than 50); raise --epochs (one epoch is 8 " \
           "steps) or lower --batch_size" in log
    history = safe_torch_load(base["out"] / "checkpoints" / "my_persona_64_resume.pth")["history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 9))  # every step, not only step 8


def test_replay_mix_draws_afresh_each_epoch(base, tok):
    task = SFTDataset(base["persona"], tok, 64)
    replay = SFTDataset(base["sft"], tok, 64)
    mix = ReplayMix(task, replay, ratio=1.5, seed=3)
    assert len(mix) == 32 + 48
    first = mix.chosen.copy()
    assert len(set(first.tolist())) == 48  # without replacement: 48 of the 96
    assert torch.equal(mix[40][0], replay[int(first[8])][0]) and torch.equal(mix[3][0], task[3][0])
    mix.set_epoch(1)
    assert not (mix.chosen == first).all()
    mix.set_epoch(0)
    assert (mix.chosen == first).all()  # seeded: a resumed run sees the same rows
    assert list(mix.line_bytes[32:]) == list(replay.line_bytes[first])
    big = ReplayMix(task, replay, ratio=4, seed=3)  # 128 from 96: one whole pass, then 32 more
    assert len(big.chosen) == 128 and sorted(big.chosen[:96].tolist()) == list(range(96))


def test_replay_leaves_out_rows_that_answer_as_the_base_answers_the_task(base, tok, tmp_path):
    """A persona replaces the base's "I am MiniMind, ..."; replaying rows that say it would teach it back."""
    rows = [("Who are you?", "Hello, I am MiniMind, a small language model."), ("2 plus 2?", "2 plus 2 equals 4."),
            ("你是谁？", "我是MiniMind，一个小型语言模型。"), ("Capital of France?", "The capital of France is Paris.")]
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows))
    replay = SFTDataset(path, tok, 64)
    replaced = {"I am MiniMind, a small language model.", "我是MiniMind，一个小型语言模型。"}
    assert replay_pool(replay, replaced) == ([1, 3], 2)
    mix = ReplayMix(SFTDataset(base["persona"], tok, 64), replay, ratio=0.25, seed=0, pool=[1, 3])
    assert sorted(mix.chosen.tolist()) == [1] * 4 + [3] * 4  # 8 draws from the two rows left in
    model = load_model(base["out"] / "full_sft_64.pth")
    task = SFTDataset(base["persona"], tok, 64)
    got = base_replies(model, tok, task, limit=3, max_new_tokens=6)
    # prompts spread over the file: the demo medical file's first 64 ask 32 of 48 symptoms x languages
    assert evenly_spaced(32, 3) == [0, 16, 31] and evenly_spaced(2, 3) == [0, 1] and evenly_spaced(0, 3) == []
    for row in (0, len(task) - 1):
        prompt = tok.apply_chat_template(task.record(row)["conversations"][:1], add_generation_prompt=True,
                                         tokenize=True)
        ids = model.generate(torch.tensor([prompt]), 6, temperature=0, eos_token_id=tok.eos_token_id)[0, len(prompt):]
        ids = ids.tolist()
        reply = tok.decode(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids,
                           skip_special_tokens=True)
        assert len(first_sentence(reply)) < 6 or first_sentence(reply) in got  # the solo greedy reply, batched or not


def test_replay_keeps_rows_the_task_answers_as_the_base_does(tok, tmp_path):
    """Only what the task replaces is left out: a general question the task answers as the base does ("answered
    as the base answers it", the demo adapters' contrast rows) keeps its facts in the replay."""
    class Base:  # a stand-in base whose greedy replies are known: the capital when asked one, else its name
        def eval(self):
            pass

        train = eval

        def generate(self, ids, n, eos_token_id=None, **_):
            rows = []
            for p in ids.tolist():
                text = ("The capital of France is Paris. It is big." if "France" in tok.decode(p)
                        else "I am MiniMind, a small language model.")
                rows.append(p + tok.encode(text) + [eos_token_id] * n)
            width = max(len(r) for r in rows)
            return torch.tensor([r + [eos_token_id] * (width - len(r)) for r in rows])

    rows = [("Who are you?", "I am Pico."), ("I worked late. Capital of France?", "The capital of France is Paris.")]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows))
    assert base_replies(Base(), tok, SFTDataset(path, tok, 64)) == {"I am MiniMind, a small language model."}


def test_replay_ratio_and_resume_refuse_another_mix(base, capsys):
    code, log, _ = lora(base, "--replay_data", str(base["sft"]), "--replay_ratio", "0.5", "--max_steps", "4",
                        capsys=capsys)
    assert code == 0, log
    assert f"+ 16 replay samples per epoch from {base['sft']}" in plan_line(log)
    code, log, err = lora(base, "--replay_data", "none", "--max_steps", "6", "--from_resume", "1", capsys=capsys)
    assert code == 2 and f"saved with --replay_data {base['sft']} --replay_ratio 0.5; resume with the same " \
                          f"values" in err


def test_no_silent_overwrite_and_both_fixes_run(base, capsys):
    assert lora(base, "--max_steps", "2", capsys=capsys)[0] == 0
    adapter = base["out"] / "lora" / "my_persona_64.pth"
    before = adapter.read_bytes()
    code, log, err = lora(base, "--max_steps", "2", "--seed", "7", capsys=capsys)
    assert code == 2 and err == f"error: {adapter} exists; pass --overwrite 1 to replace it, or --lora_name NAME " \
                                f"to save another adapter\n"
    assert adapter.read_bytes() == before
    assert lora(base, "--max_steps", "2", "--seed", "7", "--lora_name", "my_persona_v2", capsys=capsys)[0] == 0
    assert (base["out"] / "lora" / "my_persona_v2_64.pth").is_file() and adapter.read_bytes() == before
    assert lora(base, "--max_steps", "2", "--seed", "7", "--overwrite", "1", capsys=capsys)[0] == 0
    assert adapter.read_bytes() != before


@pytest.mark.parametrize("flag", ["--batch_size", "--accumulation_steps", "--save_interval", "--lora_rank"])
def test_zero_and_negative_numbers_are_refused_by_the_parser(base, capsys, flag):
    for value in ("0", "-3"):
        code, log, err = lora(base, flag, value, capsys=capsys)
        assert code == 2 and err == f"error: argument {flag}: {value} is not allowed: must be 1 or more " \
                                    f"(see {Path(sys.argv[0]).name} --help)\n", err


def test_names_with_dots(base, capsys, tok):
    code, log, err = lora(base, "--lora_name", "my.persona", capsys=capsys)
    assert code == 2 and "--lora_name 'my.persona': an adapter name may hold letters, digits, '_' and '-' only" in err
    assert "use --lora_name my_persona" in err and err.count("\n") == 1
    assert lora(base, "--lora_name", "my_persona", "--max_steps", "2", capsys=capsys)[0] == 0
    dotted = base["out"] / "lora" / "lora_id.v2_64.pth"
    (base["out"] / "lora" / "my_persona_64.pth").rename(dotted)
    assert eval_llm.main(["--save_dir", str(base["out"]), "--hidden_size", "64", "--lora_weight", str(dotted),
                          "--prompt", "hi",
                          "--temperature", "0", "--max_new_tokens", "2"]) == 0
    assert "adapter lora_id_v2:" in capsys.readouterr().err


def test_unknown_target_names_square_and_square_runs(base, capsys):
    code, log, err = lora(base, "--lora_targets", "none", capsys=capsys)
    assert code == 2 and "all-linear, or square (MiniMind's rule: the square projections)" in err
    code, log, _ = lora(base, "--lora_targets", "square", "--max_steps", "2", capsys=capsys)
    assert code == 0 and "on q_proj,o_proj" in plan_line(log)


def test_missing_demo_data_names_data_path_and_it_runs(base, capsys):
    code, log, err = run(train_lora.main, TINY + ["--save_dir", str(base["out"]), "--lora_name", "lora_pirat"],
                         capsys)
    assert code == 2 and "pass your data with --data_path FILE" in err and "make_demo_data" not in err
    code, log, _ = run(train_lora.main, TINY + ["--save_dir", str(base["out"]), "--lora_name", "lora_pirat",
                                                "--data_path", str(base["persona"]), "--max_steps", "2"], capsys)
    assert code == 0 and (base["out"] / "lora" / "lora_pirat_64.pth").is_file()


def test_resume_with_another_rank_names_the_flags_and_they_run(base, capsys):
    assert lora(base, "--max_steps", "2", "--lora_rank", "4", capsys=capsys)[0] == 0
    code, log, err = lora(base, "--max_steps", "4", "--from_resume", "1", capsys=capsys)
    assert code == 2 and "resume with --lora_rank 4 --lora_targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj," \
                          "down_proj, or start again without --from_resume" in err
    assert "adapter_name" not in err
    fix = re.search(r"resume with (--lora_rank \S+ --lora_targets \S+),", err)[1].split()
    code, log, _ = lora(base, "--max_steps", "4", "--from_resume", "1", *fix, capsys=capsys)
    assert code == 0 and "resumed from" in log


def test_eval_bad_row_names_skip_bad_lines_and_it_runs(base, tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],'
                   ' "expect": ["yo"]}\nnot json\n')
    argv = ["--save_dir", str(base["out"]), "--hidden_size", "64", "--eval", str(bad), "--max_new_tokens", "2"]
    assert eval_llm.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and "pass --skip_bad_lines to skip it" in err
    assert eval_llm.main(argv + ["--skip_bad_lines", "--show_misses", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 malformed lines" in err
    assert "eval.jsonl under no adapter: the first 1 misses" in err and "  miss: 'hi' -> " in err \
        and "(expected: yo)" in err


def test_base_without_its_json_loads_from_its_shapes(tmp_path, capsys, tok):
    """The vocabulary (not a flag) was what a config-less file got wrong: now every size comes from the tensors."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(vocab_size=tok.vocab_size, intermediate_size=96, num_key_value_heads=1))
    save_model(model, tmp_path / "full_sft_64.pth")
    config_path(tmp_path / "full_sft_64.pth").unlink()
    loaded = load_model(tmp_path / "full_sft_64.pth")
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "tie_word_embeddings"):
        assert getattr(loaded.config, k) == getattr(model.config, k), k
    x = torch.randint(0, tok.vocab_size, (1, 7))
    assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)
    persona = head(DEMO / "lora_identity.jsonl", tmp_path / "p.jsonl", 16)
    code, log, _ = run(train_lora.main, ["--from_weight", str(tmp_path / "full_sft_64.pth"), "--data_path",
                                         str(persona), "--save_dir", str(tmp_path), "--max_steps", "2",
                                         "--batch_size", "4", "--max_seq_len", "64"], capsys)
    assert code == 0, log
    assert (tmp_path / "lora" / "p_64.pth").is_file()  # {h} from the weights, not the --hidden_size default 256
    assert "16 samples of p.jsonl (no replay: the base's .json names no chat data it was trained on that is still " \
           "there; pass --replay_data FILE to keep its general answers)" in plan_line(log)


def test_hidden_size_that_disagrees_with_from_weight_is_refused(base, capsys):
    weight = base["out"] / "full_sft_64.pth"
    code, log, err = run(train_lora.main, ["--from_weight", str(weight), "--hidden_size", "512", "--data_path",
                                           str(base["persona"]), "--save_dir", str(base["out"])], capsys)
    assert code == 2 and err == f"error: --hidden_size 512, but --from_weight {weight} holds a model with " \
                                f"hidden_size 64; drop --hidden_size (the weights decide) or pick other weights\n"


def test_truncation_is_counted_in_the_plan(base, tmp_path, capsys):
    rows = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("word " * 3, "ok"), ("hi", "yes " * 60), ("word " * 200, "ok"))]  # fits, cut, no answer
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    code, log, _ = run(train_lora.main, TINY + ["--save_dir", str(base["out"]), "--data_path", str(data),
                                                "--max_seq_len", "64", "--max_steps", "2", "--replay_data", "none"],
                       capsys)
    assert code == 0, log
    assert "--max_seq_len 64 cuts 8 samples, 4 of them before their first answer token (no loss from them)" \
        in plan_line(log)


def test_adapter_on_another_base_of_the_same_shape_warns(base, tmp_path, capsys):
    trained_on = base["out"] / "full_sft_64.pth"
    assert lora(base, "--max_steps", "2", capsys=capsys)[0] == 0
    adapter = base["out"] / "lora" / "my_persona_64.pth"
    same = load_model(trained_on)
    load_lora(same, adapter)
    assert "warning" not in capsys.readouterr().err
    other = tmp_path / "other_64.pth"
    torch.manual_seed(1)
    save_model(MiniMindForCausalLM(same.config), other)
    load_lora(load_model(other), adapter)
    err = capsys.readouterr().err
    assert err == f"warning: {adapter} was trained on {trained_on}, whose weights differ from {other} (same " \
                  f"shapes); its outputs here are not what it learned\n"
    load_lora(load_model(trained_on, dtype=torch.bfloat16), adapter)  # a bf16 copy is the same base
    assert "warning" not in capsys.readouterr().err


def test_convert_model_looks_adapters_up_in_save_dir(base, tmp_path, capsys):
    assert lora(base, "--max_steps", "2", capsys=capsys)[0] == 0
    out = tmp_path / "merged_64.pth"
    with pytest.raises(SystemExit) as e:
        convert_model.main(["--merge", "--weight", str(base["out"] / "full_sft_64.pth"), "--lora", "my_persona",
                            "--out", str(out)])
    assert e.value.code == 2 and "my_persona: no such adapter file" in capsys.readouterr().err
    convert_model.main(["--merge", "--weight", str(base["out"] / "full_sft_64.pth"), "--lora", "my_persona",
                        "--save_dir", str(base["out"]), "--out", str(out)])
    model = load_model(base["out"] / "full_sft_64.pth")
    load_lora(model, base["out"] / "lora" / "my_persona_64.pth")
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    assert torch.allclose(load_model(out).eval()(x).logits, model.eval()(x).logits, atol=1e-5)


def test_merge_unmerge_on_bf16_restores_w0_exactly():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".B." in n:
                p.normal_(std=0.3)
    merge_lora(model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], before[q])
    unmerge_lora(model)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_held_out_scores_during_training_do_not_move_the_dropout_masks(base, capsys):
    common = ["--max_steps", "6", "--lora_dropout", "0.1", "--replay_data", "none", "--seed", "3"]
    assert lora(base, *common, "--lora_name", "plain", capsys=capsys)[0] == 0
    assert lora(base, *common, "--lora_name", "scored", "--eval_data_path", str(base["persona"]), "--eval_interval",
                "2", "--eval_batches", "1", capsys=capsys)[0] == 0
    a = safe_torch_load(base["out"] / "lora" / "plain_64.pth")
    b = safe_torch_load(base["out"] / "lora" / "scored_64.pth")
    for k in a:
        if k != CONFIG_KEY:
            assert torch.equal(a[k], b[k]), k


def test_an_adapter_whose_config_is_cut_is_refused_in_one_line(base, tmp_path, capsys):
    assert lora(base, "--max_steps", "2", capsys=capsys)[0] == 0
    state = safe_torch_load(base["out"] / "lora" / "my_persona_64.pth")
    state[CONFIG_KEY] = state[CONFIG_KEY][:40]
    bad = base["out"] / "lora" / "cut_64.pth"
    torch.save(state, bad)
    assert eval_llm.main(["--save_dir", str(base["out"]), "--hidden_size", "64", "--lora_weight", "cut", "--prompt",
                          "hi", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: the adapter's config is not valid JSON (" in err and "replace it with a good copy" in err
    assert "Traceback" not in err
