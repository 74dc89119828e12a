"""A thin wrapper over a Hugging Face `tokenizers` tokenizer.json with MiniMind's special tokens and ChatML.

The chat template is plain Python; tokenizer_config.json carries an equivalent jinja copy for other tools.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer as _BackendTokenizer

MODEL_DIR = Path(__file__).resolve().parent
TRAIN_COMMAND = "python trainer/train_tokenizer.py"
DEFAULT_SPECIAL = {"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def _token_content(value):
    # HF configs store a special token either as a string or as {"content": ..., ...}.
    return value["content"] if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, path=None):
        path = Path(path) if path is not None else MODEL_DIR
        file = path / "tokenizer.json" if path.is_dir() or path.suffix != ".json" else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}; make it with: {TRAIN_COMMAND}")
        try:
            self.backend = _BackendTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"cannot read tokenizer file {file} ({e}); remake it with: {TRAIN_COMMAND}") from None
        self.path = file

        special = dict(DEFAULT_SPECIAL)
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            special.update({k: _token_content(config[k]) for k in special if config.get(k)})
        for name, token in special.items():
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{file}: special token {token!r} ({name}) is not in the vocabulary")
            setattr(self, name, token)
            setattr(self, f"{name}_id", token_id)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    def encode(self, text, add_special_tokens=False):
        """Special-token strings inside `text` map to their ids; add_special_tokens wraps in bos ... eos."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def count_tokens(self, texts):
        """Token count of each text (as encode(text) would give), encoded as one batch across the CPU's cores."""
        return [len(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text):
        """(ids, [(start, end) character span of each token in text])."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids, skip_special_tokens=False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; no default system message."""
        text = "".join(f"{self.bos_token}{m['role']}\n{m['content']}{self.eos_token}\n" for m in messages)
        if add_generation_prompt:
            text += f"{self.bos_token}assistant\n"
        return self.encode(text) if tokenize else text
