"""Every script's --help shows each flag with a line of help and its default."""
import argparse
import importlib

import pytest

SCRIPTS = ["trainer.train_pretrain", "trainer.train_full_sft", "trainer.train_lora", "trainer.train_tokenizer",
           "eval_llm", "dataset.lm_dataset", "dataset.make_demo_data", "scripts.convert_model", "scripts.lora_stats",
           "scripts.serve_openai_api", "scripts.bench"]


class Captured(Exception):
    pass


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_has_a_line_and_the_default_for_every_flag(module, monkeypatch):
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main = importlib.import_module(module).main
    with pytest.raises(Captured):
        main([])
    parser = seen[0]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), module
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        assert action.help, f"{module}: {action.option_strings[0]} has no help"
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in action.help:
            # argparse wraps long paths at hyphens ("/tmp/wt-" + "x/..."): compare with all whitespace removed
            want = "".join(f"(default: {action.default})".split())
            assert want in "".join(text.split()), f"{module}: {action.option_strings[0]}"
