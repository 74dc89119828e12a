"""scripts/bench.py --quick as a smoke test: it runs, and the Markdown it writes has every CPU section."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_SECTIONS = ("order", "lora_vs_full", "inference", "batching", "ecosystem", "variants", "qlora", "serve")


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *CPU_SECTIONS, "--quick",
                           "--write", str(out)], capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks") and "torch " in text and "--quick" in text
    sections = text.split("\n## ")[1:]
    assert [s.split()[0] for s in sections] == list(CPU_SECTIONS)
    for s in sections:
        assert s.split()[1] == "(cpu):"
        if s.startswith(("ecosystem", "variants", "qlora")) and "skipped:" in s:
            continue  # transformers/peft not installed
        assert "- ratio " in s, s


def test_bench_fsdp_quick_writes_its_section(tmp_path):
    """Its own run: two torchrun processes, kept out of the time budget of the one above."""
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "fsdp", "--quick", "--write", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = out.read_text(encoding="utf-8").split("\n## ")[1:]
    assert [s.split()[:2] for s in sections] == [["fsdp", "(cpu):"]]
    assert "| DDP " in sections[0] and "| FSDP2 " in sections[0]
    assert "- ratio FSDP2/DDP bytes per rank" in sections[0] and "(target <= 0.55: met)" in sections[0], sections[0]


def test_write_keeps_sections_of_other_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    out = tmp_path / "BENCHMARKS.md"
    run = {"date": "d", "where": "w", "command": "c"}
    bench.write_markdown(out, {"gpu": "## gpu (cuda): GPU\n\nold gpu numbers\n"}, run)
    bench.write_markdown(out, {"order": "## order (cpu): order\n\nnew\n"}, run)
    text = out.read_text()
    assert text.index("## order (cpu)") < text.index("## gpu (cuda)") and "old gpu numbers" in text
    bench.write_markdown(out, {"order": "## order (cpu): order\n\nnewer\n"}, run)
    assert "newer" in out.read_text() and "\nnew\n" not in out.read_text()
