"""MiniMind: a Qwen3-style decoder, readable top to bottom.

Notable choices:
- Parameter names are exactly Hugging Face Qwen3's, so a state dict moves to `Qwen3ForCausalLM` unchanged.
- Pre-norm RMSNorm, RoPE (theta 1e6, rotate-half layout), grouped-query attention with a per-head
  RMSNorm on q and k (Qwen3), SwiGLU MLP, tied input/output embeddings.
- Attention is `F.scaled_dot_product_attention`; the KV cache is preallocated so decoding never
  re-copies the past (`KVCache`).
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MiniMindConfig:
    vocab_size: int = 6400
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None           # None: hidden_size // num_attention_heads
    intermediate_size: Optional[int] = None  # None: ceil(hidden_size * pi / 64) * 64, MiniMind-3's rule
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniMindConfig":
        # Foreign configs (MiniMind's, Hugging Face's) carry extra keys; keep only ours.
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CausalLMOutput:
    """loss, logits and the KV cache. A forward with labels computes the loss without building the
    (B, T, vocab) logits; reading `.logits` then computes them (once) from the final hidden states."""

    def __init__(self, logits=None, loss=None, past_key_values=None, hidden=None, lm_head=None):
        self._logits, self.loss, self.past_key_values = logits, loss, past_key_values
        self._hidden, self._lm_head = hidden, lm_head

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None and self._hidden is not None:
            self._logits = self._lm_head(self._hidden)
        return self._logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 sums of squares lose digits), then cast back as Qwen3 does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed sin for the given positions, shape (T, head_dim), in the rotate-half layout: the sin's
    first half is negated, so that apply_rope needs only a roll."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype)


def apply_rope(x, cos, signed_sin):
    # rotate_half(x) * sin == roll(x, half) * signed_sin: [x1, x2] -> [-x2, x1], element for element.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class KVCache:
    """Per-layer key/value buffers, preallocated and grown by doubling, so a decode step writes one slot."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.length = 0  # tokens already stored (same for every layer once a forward completes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v of shape (B, kv_heads, T, head_dim) at position self.length; return the full past."""
        start, end = self.length, self.length + k.shape[2]
        buf_k = self.keys[layer]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(new_k.shape)
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.values[layer][:, :, :start]
            self.keys[layer], self.values[layer] = new_k, new_v
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class RowKVCache:
    """Continuous batching (the server's engine): row b holds one request with its own `length[b]` tokens, so
    requests of any length decode together and join or leave between steps. Buffers are preallocated for
    max_batch rows of max_len tokens; keys past a row's length are masked out (see _attention_bias)."""

    def __init__(self, config: MiniMindConfig, max_batch: int, max_len: int, device=None, dtype=None):
        shape = (max_batch, config.num_key_value_heads, max_len, config.head_dim)
        # Zeros, not empty: masked keys are skipped by softmax, but a NaN in V would still poison the sum.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = torch.zeros(0, dtype=torch.long, device=device)  # (B,): set by the caller for each step

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k, v (B, kv_heads, T, head_dim) of row b at positions length[b]..; return those positions (B, T)."""
        B, T = k.shape[0], k.shape[2]
        pos = self.length[:B, None] + torch.arange(T, device=k.device)
        rows = torch.arange(B, device=k.device)[:, None]
        self.keys[layer][rows, :, pos] = k.transpose(1, 2)
        self.values[layer][rows, :, pos] = v.transpose(1, 2)
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """write(), then return rows 0..B-1 up to the longest row."""
        end = int(self.write(layer, k, v).max()) + 1
        return self.keys[layer][:k.shape[0], :, :end], self.values[layer][:k.shape[0], :, :end]

    def put_row(self, row: int, src: KVCache, length: int) -> None:
        """Copy a request's prefilled cache (batch of one) into `row`."""
        for layer in range(len(self.keys)):
            self.keys[layer][row, :, :length] = src.keys[layer][0, :, :length]
            self.values[layer][row, :, :length] = src.values[layer][0, :, :length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Move row src's first `length` positions to row dst (a leaving request's row is refilled by the last)."""
        for layer in range(len(self.keys)):
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]


class StaticKVCache(RowKVCache):
    """gpt-fast's cache for compiled decoding: a RowKVCache whose attention always spans the whole max_len buffer,
    the unwritten part masked, with positions and masks computed from tensors only. Every decode step of a batch
    size then has the same shapes, so one compiled step serves every prompt length and request that fits.
    Row b holds length[b] slots; start[b] is its first real one (left padding in generate; 0 in the engine)."""

    def __init__(self, config: MiniMindConfig, max_batch: int, max_len: int, device=None, dtype=None, start=None):
        super().__init__(config, max_batch, max_len, device, dtype)
        self.length = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.start = torch.zeros(max_batch, dtype=torch.long, device=device) if start is None else start.to(device)
        self.slots = torch.arange(max_len, device=device)
        self.cos, self.sin = rope_cos_sin(self.slots, config.head_dim, config.rope_theta, dtype or torch.float32)

    def prepare(self, B: int, T: int):
        """RoPE (B, 1, T, head_dim) and the boolean mask (B, 1, T, max_len) of rows 0..B-1's next T tokens."""
        slot = self.length[:B, None] + torch.arange(T, device=self.slots.device)  # (B, T): where they are written
        start = self.start[:B, None]
        pos = (slot - start).clamp(min=0)  # a row's positions count from its first real token
        keep = (self.slots <= slot[..., None]) & (self.slots >= start[..., None])  # (B, T, max_len)
        keep = keep | ~keep.any(-1, keepdim=True)  # a pad query sees nothing, and softmax of nothing is NaN
        return self.cos[pos][:, None], self.sin[pos][:, None], keep[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """write(), then return rows 0..B-1 whole: the fixed shape is what lets one compiled step serve every length."""
        self.write(layer, k, v)
        return self.keys[layer][:k.shape[0]], self.values[layer][:k.shape[0]]


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # Qwen3: per-head norm keeps logits bounded
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # A query block that covers every key is plain causal; a single new query sees everything.
        is_causal = False
        if mask is None and T > 1:  # an `if`, not a value: a traced T (torch.compile, dynamic) gives a SymBool
            is_causal = True
        # enable_gqa: each K/V head serves n_heads / n_kv_heads query heads without being copied.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# Hugging Face generate() arguments that this generate() takes only at their default values.
HF_DEFAULT_ONLY = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False}


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_table = None  # (cos, signed sin) for positions 0.., built on first use; see _rope
        self.apply(self._init_weights)
        # GPT-2's trick: shrink the projections that write into the residual stream by depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, input_ids, labels=None, attention_mask=None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, logits_to_keep: int = 0,
                position_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """attention_mask (B, T_past + T), 1 = real token, is only needed for left-padded batches.
        logits_to_keep > 0 computes logits for the last positions only (generation needs one).
        position_ids (B, T): each token's RoPE position (default: past .. past + T - 1 for every row).
        With labels the loss is computed without the (B, T, vocab) logits; `.logits` builds them if read."""
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else (
            KVCache(self.config.num_hidden_layers) if use_cache else None)
        past = cache.length if cache is not None else 0  # a (B,) tensor in a RowKVCache: one position per row
        x = self.model.embed_tokens(input_ids)
        if isinstance(cache, StaticKVCache):  # compiled decoding: fixed shapes, positions and padding in the cache
            cos, sin, mask = cache.prepare(B, T)
        else:
            if position_ids is None and isinstance(past, torch.Tensor):  # each row continues from its own length
                position_ids = past[:, None] + torch.arange(T, device=x.device)
            if position_ids is None:
                cos, sin = self._rope(past, T, x.device, x.dtype)
            else:
                cos, sin = self._rope_at(position_ids, x.dtype)
            mask = self._attention_bias(attention_mask, T, past, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        if isinstance(cache, StaticKVCache):
            cache.length[:B] += T
        elif cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if labels is not None:
            # Position t predicts token t+1; IGNORE (-100) marks positions without a target (prompt, padding).
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
            h = x.reshape(-1, x.size(-1))
            if torch.compiler.is_compiling():
                # Compiled: every row is scored (dropping rows gives a data-dependent count, and the chunk loop would
                # pin the graph to one batch length), and inductor fuses the softmax around the logits.
                loss = F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=IGNORE, reduction="sum")
                loss = loss / (targets != IGNORE).sum().clamp(min=1)  # 0, not NaN, when no row has a target
            else:  # eager: rows without a target never reach lm_head, and the logits are made a chunk at a time
                keep = targets != IGNORE
                loss = lm_head_loss(h[keep], self.lm_head.weight, targets[keep])
            return CausalLMOutput(loss=loss, past_key_values=cache if use_cache else None, hidden=x,
                                  lm_head=self.lm_head)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return CausalLMOutput(logits=logits, past_key_values=cache if use_cache else None)

    def _rope(self, past: int, T: int, device, dtype):
        """cos and signed sin of positions past .. past + T - 1, sliced from a table that grows by doubling
        (a decode step would otherwise spend a dozen small ops rebuilding them)."""
        table = self._rope_table
        if table is None or table[0].shape[0] < past + T or table[0].device != device or table[0].dtype != dtype:
            n = max(past + T, 2 * table[0].shape[0] if table is not None else 0, 256)
            with torch.inference_mode(False):  # a table built while generating must still serve training
                table = rope_cos_sin(torch.arange(n, device=device), self.config.head_dim, self.config.rope_theta,
                                     dtype)
            self._rope_table = table
        return table[0][past:past + T], table[1][past:past + T]

    def _rope_at(self, position_ids, dtype):
        """cos and signed sin at explicit positions (B, T), shaped (B, 1, T, head_dim) to broadcast over heads."""
        cos, sin = self._rope(0, int(position_ids.max()) + 1, position_ids.device, dtype)
        return cos[position_ids][:, None], sin[position_ids][:, None]

    @staticmethod
    def _attention_bias(attention_mask, T, past, device):
        """None when plain causal attention is right (the fast path); else a boolean (B, 1, T, past+T) mask."""
        if isinstance(past, torch.Tensor):  # RowKVCache: row b's query t sees keys 0 .. past[b] + t
            pos = past[:, None] + torch.arange(T, device=device)
            return (torch.arange(int(pos.max()) + 1, device=device) <= pos[..., None])[:, None]
        if attention_mask is None and (past == 0 or T == 1):
            return None
        total = past + T
        causal = torch.ones(T, total, dtype=torch.bool, device=device).tril(diagonal=past)
        if attention_mask is None:
            return causal
        keep = causal[None, None] & attention_mask[:, None, None, :total].bool()
        # A query on a pad position may see nothing, and softmax over nothing is NaN: let it see all (ignored).
        return keep | ~keep.any(-1, keepdim=True)

    @torch.inference_mode()
    def stream_generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, eos_token_id=None, attention_mask=None, repetition_penalty: float = 1.0,
                        pad_token_id: Optional[int] = None, compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield the next tokens, shape (B,), one step at a time, reusing the KV cache; stop once every row is done.
        temperature 0 is greedy. eos_token_id: an int or a list of ints (default: the config's; -1 never stops).
        A row that has produced eos yields pad_token_id from then on (its first eos when pad_token_id is None).
        attention_mask (B, T), 0 on left padding: a row's positions start at 0 at its first real token, as in
        Hugging Face's generate, so a padded row decodes as its prompt alone would.
        compile: decode with a StaticKVCache and a torch.compile'd step (see decode_step); the first call per
        (batch, bucket of prompt + max_new_tokens, adapter setting) compiles, later ones reuse it."""
        device = input_ids.device
        eos = torch.tensor(self.config.eos_token_id if eos_token_id is None else eos_token_id, device=device).flatten()
        fill = eos[0] if pad_token_id is None else torch.tensor(pad_token_id, device=device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        seen = input_ids
        positions = None
        if compile:
            pad = (attention_mask == 0).sum(-1) if attention_mask is not None else None
            cache = StaticKVCache(self.config, input_ids.shape[0], static_len(input_ids.shape[1] + max_new_tokens,
                                                                              self.config), device,
                                  self.model.embed_tokens.weight.dtype, start=pad)
            attention_mask = None  # the cache knows the padding
        else:
            cache = KVCache(self.config.num_hidden_layers)
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        logits = self(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                      logits_to_keep=1, position_ids=positions).logits[:, -1]
        step_fn = decode_step(compiled=compile)
        for step in range(max_new_tokens):
            logits = logits.float()
            if repetition_penalty != 1.0:
                prev = logits.gather(1, seen)
                logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
            token = sample_next(logits, temperature, top_p, top_k)
            token = torch.where(done, fill, token)
            done |= torch.isin(token, eos)
            yield token
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            seen = torch.cat([seen, token[:, None]], dim=1) if repetition_penalty != 1.0 else seen
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
                positions = positions[:, -1:] + 1
            logits = step_fn(self, token[:, None], cache, attention_mask, positions)

    def generate(self, input_ids=None, max_new_tokens: Optional[int] = None, *, attention_mask=None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id: Optional[int] = None,
                 max_length: Optional[int] = None, streamer=None, inputs=None, compile: bool = False,
                 **hf_kwargs) -> torch.Tensor:
        """Prompt followed by the generated tokens, (B, T + new), taking Hugging Face's keyword arguments with their
        meaning, so code written for transformers' (or MiniMind's) `model.generate` runs unchanged:
        - greedy unless do_sample=True, whatever the temperature (as in HF); temperature 0 is greedy as well.
        - sampling applies temperature, then top_k (HF's default 50; 0 turns it off), then top_p.
        - repetition_penalty as HF's: a seen token's logit (prompt included) is divided by it if positive, else
          multiplied.
        - eos_token_id: an int or a list (default: the config's). A finished row is padded with pad_token_id (with
          its eos when pad_token_id is None); generation stops when every row has finished.
        - attention_mask marks left padding; each row's positions count from its first real token, as HF's.
        - max_new_tokens (default 256), or max_length counting the prompt; `inputs=` is another name for input_ids;
          streamer: an HF streamer (put(prompt), put(tokens) each step, end()).
        - compile=True (ours, not HF's): a static KV cache and a compiled decode step (see stream_generate).
        - use_cache is accepted and ignored (the KV cache only saves time); num_beams, num_return_sequences,
          return_dict_in_generate and output_scores only at their defaults (ValueError otherwise). Any other
          keyword is a TypeError rather than silently ignored."""
        if inputs is not None:
            if input_ids is not None:
                raise TypeError("generate() got both input_ids and inputs; pass one")
            input_ids = inputs
        hf_kwargs.pop("use_cache", None)
        for name, value in hf_kwargs.items():
            if name not in HF_DEFAULT_ONLY:
                raise TypeError(f"generate() got an unexpected keyword argument '{name}'")
            if value != HF_DEFAULT_ONLY[name]:
                raise ValueError(f"generate() supports only {name}={HF_DEFAULT_ONLY[name]!r}, got {value!r}")
        if max_new_tokens is None:
            max_new_tokens = 256 if max_length is None else max(max_length - input_ids.shape[1], 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new = []
        for token in self.stream_generate(input_ids, max_new_tokens, temperature=temperature if do_sample else 0.0,
                                          top_p=top_p, top_k=top_k, eos_token_id=eos_token_id,
                                          attention_mask=attention_mask, repetition_penalty=repetition_penalty,
                                          pad_token_id=pad_token_id, compile=compile):
            new.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids] + new, dim=1)


STATIC_BUCKET = 256  # StaticKVCache lengths are multiples of this: one compiled step serves many lengths


def static_len(tokens: int, config: MiniMindConfig) -> int:
    """The StaticKVCache length for prompt + new tokens: rounded up to the bucket, so lengths share a compile."""
    return min(-(-tokens // STATIC_BUCKET) * STATIC_BUCKET, max(config.max_position_embeddings, tokens))


def _decode_logits(model, token, cache, attention_mask=None, position_ids=None):
    """One decode step: the next-token logits (B, vocab) after `token` (B, 1)."""
    return model(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                 position_ids=position_ids).logits[:, -1]


_COMPILED_STEP = None


def _gemv_backend(gm, example_inputs):
    """Inductor, with one change for decoding on the CPU: a matmul of a single row (x @ W.T at batch 1) becomes a
    fused multiply-and-sum, which inductor spreads over every thread; MKL's GEMV used one thread and half the memory
    bandwidth (25 vs 46 GB/s on a 256 MB matrix on the 2-core benchmark machine). C++ wrapper: less Python per step."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    mm = table.get(torch.ops.aten.mm.default)

    def gemv(a, b, out_dtype=None):
        if a.device.type == "cpu" and a.shape[0] == 1 and out_dtype is None:
            return (a.t() * b).sum(0, keepdim=True)
        return mm(a, b, out_dtype) if mm is not None else NotImplemented

    table[torch.ops.aten.mm.default] = gemv
    return compile_fx(gm, example_inputs, decompositions=table, config_patches={"cpp_wrapper": True})


def decode_step(compiled: bool = False):
    """_decode_logits, or its torch.compile'd version (built once per process; dynamo then compiles it once per
    shape bucket and adapter setting and keeps each). fullgraph: a graph break would silently cost the speed."""
    global _COMPILED_STEP
    if not compiled:
        return _decode_logits
    if _COMPILED_STEP is None:
        # One graph per (batch size, bucket, adapter setting) is kept; past dynamo's default of 8 it would fall back
        # to eager without a word.
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED_STEP = torch.compile(_decode_logits, fullgraph=True, dynamic=False, backend=_gemv_backend)
    return _COMPILED_STEP


IGNORE = -100  # a label with no loss (prompt, padding), as PyTorch's and Hugging Face's ignore_index
LOSS_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB fp32): big enough for fast matmuls, small enough to reuse


def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T (h: (N, hidden), targets: (N,)), a chunk of rows at a time,
    so the (N, vocab) logits and their gradient are never held whole. The same value as
    F.cross_entropy(F.linear(h, weight), targets); 0 when N is 0."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLMHeadLoss.apply(h, weight, targets)
    return _chunked_loss_and_grads(h, weight, targets, False, False)[0] / max(h.shape[0], 1)


def _chunked_loss_and_grads(h, weight, targets, need_h: bool, need_w: bool):
    """Summed loss and, if asked, its gradients with respect to h and weight, one chunk of logits at a time."""
    rows = max(16, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    acc = torch.promote_types(h.dtype, torch.float32)  # softmax and sums in fp32 at least
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
    total = torch.zeros((), dtype=acc, device=h.device)
    for s in range(0, h.shape[0], rows):
        hc, tc = h[s:s + rows], targets[s:s + rows, None]
        logits = F.linear(hc, weight).to(acc)
        target_logit = logits.gather(1, tc)
        # One exp pass gives both the log-sum-exp (the loss) and the softmax (the gradient).
        peak = logits.amax(-1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        z = probs.sum(-1, keepdim=True)
        total += (z.log() + peak - target_logit).sum()
        if not (need_h or need_w):
            continue
        probs.div_(z).scatter_add_(1, tc, torch.full_like(target_logit, -1.0))  # d(loss sum)/d(logits)
        g = probs.to(weight.dtype)
        if need_h:
            grad_h[s:s + rows] = g @ weight
        if need_w:
            grad_w += g.t() @ hc
    return total, grad_h, grad_w


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Forward computes the loss and, while each chunk's logits are at hand, its gradients (softmax - onehot);
    backward only scales those. No (N, vocab) tensor is stored for backward."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        total, grad_h, grad_w = _chunked_loss_and_grads(h, weight, targets, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = max(h.shape[0], 1), weight.dtype
        return total / ctx.n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None, None)


MIN_TEMPERATURE = 1e-5  # below it, logits / temperature leave float32's range: treated as greedy


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0 (or below MIN_TEMPERATURE), else a draw after temperature, top-k
    and top-p (from `generator`, so a seeded request draws the same tokens whoever else is in the batch). Finite
    logits never give NaN: the division is done in float32 after moving each row's largest logit to 0."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0 everywhere: exp cannot overflow
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), num_samples=1, generator=generator).squeeze(1)
