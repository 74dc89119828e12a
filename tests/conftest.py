import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.model_lora import apply_lora, load_lora, save_lora  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402


def tiny_config(**kw) -> MiniMindConfig:
    base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    base.update(kw)
    return MiniMindConfig(**base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MiniMindForCausalLM(tiny_config()).eval()


def varied_model(seed, layers=2):
    """A tiny model over the project's tokenizer whose greedy replies are varied text (not one repeated token)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=Tokenizer().vocab_size, hidden_size=64, num_hidden_layers=layers,
                                               num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():  # at init a tied model just repeats its last token; larger layers give varied text
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(20)
    return model.eval()


def random_adapter(model, name, path, rank=4, **lora_kw):
    """Add adapter `name` with a random (nonzero) B, so it changes the output, and save it to `path`."""
    apply_lora(model, rank=rank, adapter_name=name, **lora_kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora.{name}.B" in n:
                p.normal_(std=0.5)
    save_lora(model, path, name)


def minimind_adapter(model, path, rank=4, b_factor=1.0, seed=0):
    """Write a MiniMind adapter file for `model`: fp16 A and B of every q_proj and o_proj under MiniMind's keys and no
    config, so its scale is 1. b_factor multiplies B (4.0 gives the update a scale of alpha 16 / rank 4 would)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.o_proj")):
            state[f"{name}.lora.A.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.3).half()
            state[f"{name}.lora.B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.3 * b_factor).half()
    torch.save(state, path)
    return path


def solo_reply(model, tok, prompt, max_tokens, adapter_path=None) -> str:
    """The reference for a served reply: `model` alone, the adapter loaded with load_lora, plain greedy generate."""
    if adapter_path is not None:
        load_lora(model, adapter_path)
    ids = torch.tensor([prompt])
    new = model.eval().generate(ids, max_tokens, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True)
