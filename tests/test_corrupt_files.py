"""Damaged and wrong files, wherever a file is read: one `error:` line naming the file and what to do, exit code 2,
no traceback, nothing written. Most cases call the CLIs' main(argv) in-process; three run the real scripts."""
import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import eval_llm
from model.checkpoint import save_model
from tests.conftest import random_adapter, varied_model
from trainer import train_full_sft, train_lora
from trainer.trainer_utils import RESUME_KEYS, run_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "1"]
REPLACE = "replace it with a good copy"
START_OVER = "delete it and start again without --from_resume"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 1843200\n"


def resume_checkpoint(layers=2) -> bytes:
    """A resume checkpoint of full_sft_64 (as train() writes it) whose model has `layers` layers."""
    ckpt = {k: 0 for k in RESUME_KEYS}
    ckpt.update(model=varied_model(0, layers=layers).state_dict(), optimizer={}, scaler=None, history=[],
                world_size=1, batch_size=4, accumulation_steps=1, rng={})
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Sound files to damage or misplace: a base with its sidecar, an adapter as .pth and .safetensors,
    a resume checkpoint, and 16 lines of SFT data."""
    root = tmp_path_factory.mktemp("good")
    model = varied_model(0)
    save_model(model, root / "full_sft_64.pth")
    random_adapter(model, "lora_a", root / "lora" / "lora_a_64.pth")
    random_adapter(model, "lora_s", root / "lora" / "lora_s_64.safetensors")
    (root / "full_sft_64_resume.pth").write_bytes(resume_checkpoint())
    with open(REPO / "dataset" / "demo" / "sft.jsonl", encoding="utf-8") as f:
        (root / "sft.jsonl").write_text("".join(next(f) for _ in range(16)), encoding="utf-8")
    return root


def foreign_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "a zip, but not torch.save's")
    return buf.getvalue()


# kind of damage: (the damaged bytes from the good ones, what the message says the file is)
DAMAGE = {
    "empty": (lambda good: b"", "is empty"),
    "truncated": (lambda good: good[: len(good) // 2], "truncated"),
    "random bytes": (lambda good: random.Random(0).randbytes(4096), "not a PyTorch checkpoint"),
    "text": (lambda good: b"these are not the weights\n", "a text file"),
    "foreign zip": (lambda good: foreign_zip(), "zip archive that torch.load cannot read"),
}
# reader: (the good file it reads, where the damaged copy goes)
READERS = {
    "--weight": ("full_sft_64.pth", "bad_64.pth"),
    "--lora_weight": ("lora/lora_a_64.pth", "lora/lora_bad_64.pth"),
    "--lora_weight safetensors": ("lora/lora_s_64.safetensors", "lora/lora_bad_64.safetensors"),
    "--from_weight": ("full_sft_64.pth", "bad_64.pth"),
    "--from_resume": ("full_sft_64_resume.pth", "checkpoints/full_sft_64_resume.pth"),
}
PROGRESS = ("base: ",)  # eval_llm.py logs the base it loaded before it reads the adapters


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def one_error_line(code, err, name, *expected) -> str:
    """Exit code 2 and, but for progress lines before it, stderr is one `error:` line naming the file."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith(lines[0] + "\n"), err
    for text in (name, *expected):
        assert text in lines[0], (text, lines[0])
    return lines[0]


def eval_args(save_dir, *extra):
    return ["--save_dir", str(save_dir), "--hidden_size", "64", "--prompt", "hi", "--max_new_tokens", "2", *extra]


def put(tmp_path, good, reader, path, content: bytes) -> None:
    """Write the file to read at `path`; the adapter readers get a good base beside it."""
    if reader.startswith("--lora_weight"):
        for name in ("full_sft_64.pth", "full_sft_64.json"):
            shutil.copy(good / name, tmp_path / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def run_reader(reader, path, tmp_path, good, capsys) -> tuple[int, str]:
    """Run the CLI that reads `path` the way `reader` says, in-process; (exit code, stderr)."""
    data = ["--save_dir", str(tmp_path), "--data_path", str(good / "sft.jsonl")]
    if reader == "--weight":
        code = eval_llm.main(eval_args(tmp_path, "--weight", str(path)))
    elif reader.startswith("--lora_weight"):
        code = eval_llm.main(eval_args(tmp_path, "--lora_weight", str(path)))
    elif reader == "--from_weight":
        code = run_main(train_lora.main, TINY + data + ["--from_weight", str(path)])
    else:
        code = run_main(train_full_sft.main, TINY + data + ["--from_weight", "none", "--from_resume", "1"])
    return code, capsys.readouterr().err


def check_one_line_nothing_written(reader, path, tmp_path, good, capsys, *expected) -> None:
    before = snapshot(tmp_path)
    code, err = run_reader(reader, path, tmp_path, good, capsys)
    print(one_error_line(code, err, path.name, *expected))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("reader, kind", [(r, k) for r in READERS for k in DAMAGE
                                          if not (r.endswith("safetensors") and k == "foreign zip")])
def test_damaged_file_is_one_line(reader, kind, good, tmp_path, capsys):
    source, target = READERS[reader]
    damage, what = DAMAGE[kind]
    path = tmp_path / target
    put(tmp_path, good, reader, path, damage((good / source).read_bytes()))
    if reader.endswith("safetensors"):
        expected = ["not a readable safetensors file"]  # model_lora.read_lora_file's message
    else:
        expected = [what, START_OVER if reader == "--from_resume" else REPLACE]
    check_one_line_nothing_written(reader, path, tmp_path, good, capsys, *expected)


def read(name):
    return lambda good: (good / name).read_bytes()


@pytest.mark.parametrize("reader, suffix, make, expected", [
    ("--lora_weight", ".pth", read("full_sft_64.pth"), "is this a base checkpoint"),
    ("--lora_weight", ".pth", read("lora/lora_s_64.safetensors"),
     "a safetensors file under another name; rename it to .safetensors"),
    ("--weight", ".pth", read("lora/lora_a_64.pth"), "is a LoRA adapter, not base weights"),
    ("--weight", ".safetensors", read("lora/lora_s_64.safetensors"), "is a LoRA adapter, not base weights"),
    ("--weight", ".pth", read("full_sft_64_resume.pth"), "is a trainer's resume checkpoint, not base weights"),
    ("--weight", ".pth", lambda good: LFS_POINTER, "a Git LFS pointer, not the weights; fetch them with `git lfs pull"),
    ("--from_weight", ".pth", read("lora/lora_a_64.pth"), "is a LoRA adapter, not base weights"),
    ("--from_resume", ".pth", read("full_sft_64.pth"), "not a resume checkpoint (no 'model' entry); " + START_OVER),
    ("--from_resume", ".pth", lambda good: resume_checkpoint(layers=3),
     "does not fit this run (its weights: unexpected key model.layers.2."),
])
def test_wrong_kind_of_file_is_one_line(reader, suffix, make, expected, good, tmp_path, capsys):
    path = (tmp_path / READERS[reader][1]).with_suffix(suffix)
    put(tmp_path, good, reader, path, make(good))
    check_one_line_nothing_written(reader, path, tmp_path, good, capsys, expected)


SIDECARS = [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[64, 2]", "is a JSON list, not an object of config fields"),
    ('{"hidden_size": "abc"}', '"hidden_size" is "abc", expected int'),
    ('{"hidden_size": 64.5}', '"hidden_size" is 64.5, expected int'),
    ('{"num_attention_heads": 0}', '"num_attention_heads" is 0, expected at least 1'),
    ('{"num_attention_heads": 4, "num_key_value_heads": 3}', "must be a multiple of num_key_value_heads"),
]


@pytest.mark.parametrize("reader, content, expected", [("--weight", *case) for case in SIDECARS]
                         + [("--from_weight", *case) for case in SIDECARS[::3]])  # the same load_config
def test_broken_sidecar_names_the_json(reader, content, expected, good, tmp_path, capsys):
    path = tmp_path / "bad_64.pth"
    shutil.copy(good / "full_sft_64.pth", path)
    (tmp_path / "bad_64.json").write_text(content)
    before = snapshot(tmp_path)
    code, err = run_reader(reader, path, tmp_path, good, capsys)
    print(one_error_line(code, err, "bad_64.json", expected, "fix it, or delete it"))
    assert snapshot(tmp_path) == before


def test_max_seq_len_below_every_prompt_stops_before_training(good, tmp_path, capsys):
    data = good / "sft.jsonl"
    code = run_main(train_full_sft.main, TINY + ["--max_seq_len", "8", "--save_dir", str(tmp_path),
                                                 "--data_path", str(data), "--from_weight", "none"])
    print(one_error_line(code, capsys.readouterr().err, str(data),
                         f"--max_seq_len 8 leaves no answer token in any of the 16 samples of {data} "
                         f"(the shortest prompt is", "raise --max_seq_len"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["truncated adapter", "sidecar with a wrong type", "truncated resume"])
def test_real_cli(case, good, tmp_path):
    for name in ("full_sft_64.pth", "full_sft_64.json"):
        shutil.copy(good / name, tmp_path / name)
    if case == "truncated adapter":  # before the fix: a traceback ending in OSError: [Errno 22] Invalid argument
        bad = tmp_path / "lora" / "lora_a_64.pth"
        bad.parent.mkdir()
        bad.write_bytes((good / "lora" / "lora_a_64.pth").read_bytes()[:-100])
        script, args, expected = "eval_llm.py", eval_args(".", "--lora_weight", "lora_a"), ["truncated", REPLACE]
    elif case == "sidecar with a wrong type":
        bad = tmp_path / "full_sft_64.json"
        bad.write_text(json.dumps({**json.loads(bad.read_text()), "hidden_size": "abc"}))
        script, args, expected = "eval_llm.py", eval_args("."), ['"hidden_size" is "abc", expected int']
    else:
        bad = tmp_path / "checkpoints" / "full_sft_64_resume.pth"
        bad.parent.mkdir()
        bad.write_bytes((good / "full_sft_64_resume.pth").read_bytes()[:1000])
        script = "trainer/train_full_sft.py"
        args = TINY + ["--save_dir", ".", "--data_path", str(good / "sft.jsonl"), "--from_weight", "full_sft",
                       "--from_resume", "1"]
        expected = ["truncated", START_OVER]
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    print(one_error_line(proc.returncode, proc.stderr, bad.name, *expected))
    assert snapshot(tmp_path) == before
