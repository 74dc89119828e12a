import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402


def tiny_config(**kw) -> MiniMindConfig:
    base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    base.update(kw)
    return MiniMindConfig(**base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MiniMindForCausalLM(tiny_config()).eval()
