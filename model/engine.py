"""Continuous batching over one model, with its own adapter per request: the server's engine.

One thread owns the model. Requests wait in a queue, join the running batch between decode steps (each
prompt is prefilled alone, then its KV cache is copied into a free row of a RowKVCache) and leave as soon as
they finish or are cancelled. Each row names its adapter's slot in an AdapterBank, so one batch mixes
adapters and no request changes another's. `max_loras` adapters are resident; any number can be registered:
they are read from disk when a request needs them, evicting the least recently used one that no running
request uses. Events go out through each request's `emit` callback, from the engine thread.
"""
import collections
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from model.model_lora import AdapterBank, LoRAError
from model.model_minimind import KVCache, RowKVCache, StaticKVCache, decode_step, sample_next


class EngineError(ValueError):
    """A request or registration the engine refuses; the message is one line for the client."""


@dataclass(eq=False)  # identity: two requests with the same fields are still two requests
class Request:
    prompt: list                      # token ids, chat template applied
    adapter: Optional[str] = None     # a registered adapter's name, or None for the bare base
    max_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()                  # strings: the reply ends before the first one
    stop_token_ids: tuple = ()        # besides the tokenizer's eos
    emit: Callable = print            # emit(event dict), called from the engine thread
    tokens: list = field(default_factory=list)
    cancelled: bool = False
    slot: int = 0
    sent: int = 0                     # characters of the reply already emitted
    text: str = ""                    # the reply decoded so far: tokens[:decoded]
    decoded: int = 0
    window: int = 0                   # decoding starts here, a few tokens back, for the new tokens' context
    generator: Optional[torch.Generator] = None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_seq_len: int = 1024, max_loras: int = 8,
                 max_lora_rank: int = 16, compile: bool = False):
        self.model, self.tok = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = p.device
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.bank = AdapterBank(model, max_loras, max_lora_rank)
        # compile: a StaticKVCache and a compiled decode step; the batch is padded to a power of two, so at most
        # log2(max_batch) + 1 graphs exist, all compiled by warmup() before the first request.
        self.compiled = compile
        cache_type = StaticKVCache if compile else RowKVCache
        self.cache = cache_type(model.config, max_batch, max_seq_len, p.device, p.dtype)
        self.decode = decode_step(compiled=compile)
        self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.adapters: dict[str, Path] = {}                                # registered: name -> file
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> slot, LRU first
        self.free_slots = list(range(max_loras, 0, -1))
        self.orphans: set[int] = set()    # slots of unregistered adapters, freed once no row uses them
        self.in_use = collections.Counter()  # slot -> running requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []     # the running batch: rows[i] is row i of self.cache
        self.lens: list[int] = []         # tokens in each row's cache
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: Optional[threading.Thread] = None
        self.steps = 0
        self.peak_rows = 0  # the largest batch decoded so far

    # ---- registry and submission (any thread)

    def register(self, name: str, path) -> None:
        """Make an adapter file servable under `name`; it is read now (to refuse a bad file) and again when needed."""
        if not name or not isinstance(name, str):
            raise EngineError("an adapter needs a non-empty name")
        with self.cond:
            if name in self.adapters:
                raise EngineError(f"adapter {name!r} is already loaded ({self.adapters[name]})")
        self.bank.check(path)  # LoRAError: one line naming the file and what does not fit
        with self.cond:
            self.adapters[name] = Path(path)

    def unregister(self, name: str) -> None:
        """Stop serving `name`; requests already running with it finish, new ones are refused."""
        with self.cond:
            if name not in self.adapters:
                raise EngineError(f"no adapter named {name!r}")
            del self.adapters[name]
            slot = self.resident.pop(name, None)
            if slot is not None:
                self.orphans.add(slot)
                self._reclaim()

    def submit(self, req: Request) -> Request:
        if req.adapter is not None and req.adapter not in self.adapters:
            raise EngineError(f"no adapter named {req.adapter!r}")
        if not req.prompt:
            raise EngineError("the prompt is empty")
        if len(req.prompt) + req.max_tokens > self.max_seq_len:
            raise EngineError(f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) is more than "
                              f"the server's max_seq_len ({self.max_seq_len})")
        if req.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2 ** 62, ())))
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: its row is freed at the next step boundary."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def complete(self, req: Request, timeout: Optional[float] = None) -> dict:
        """Submit and wait: the final event ({"finish_reason", "text", ...} or {"error", "status"?})."""
        done, events = threading.Event(), []
        req.emit = lambda e: (events.append(e), ("delta" not in e) and done.set())
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError("the engine did not answer in time")
        return events[-1]

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "registered": len(self.adapters),
                    "resident": list(self.resident), "steps": self.steps, "peak_batch": self.peak_rows}

    # ---- the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.rows and not self._admissible():
                        self.cond.wait()
                    if self.stopping:
                        return
                    joining = self._admit()
                try:
                    for req in joining:
                        self._prefill(req)
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                    for req in dict.fromkeys(self.rows + joining):
                        if not req.cancelled:
                            req.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                            req.cancelled = True
                    with self.cond:  # a request whose prefill failed never got a row: release its slot here
                        for req in joining:
                            if req not in self.rows:
                                self.in_use[req.slot] -= 1
                self._leave()

    def _admissible(self) -> bool:
        return any(r.cancelled or r.adapter not in self.adapters or self._slot_for(r, dry=True) is not None
                   for r in self.waiting)

    def _admit(self) -> list:
        """Move waiting requests into the batch while rows and adapter slots allow (under the lock)."""
        joining = []
        for req in list(self.waiting):
            if len(self.rows) + len(joining) >= self.max_batch:
                break
            if req.cancelled:
                self.waiting.remove(req)
                continue
            if req.adapter is not None and req.adapter not in self.adapters:
                self.waiting.remove(req)
                req.emit({"error": f"adapter {req.adapter!r} was unloaded before the request started", "status": 404})
                continue
            try:
                slot = self._slot_for(req)
            except LoRAError as e:  # the file changed on disk since it was registered
                self.waiting.remove(req)
                req.emit({"error": str(e), "status": 400})
                continue
            if slot is None:
                continue  # every slot holds an adapter that running requests use: wait for one to finish
            self.waiting.remove(req)
            req.slot = slot
            self.in_use[slot] += 1
            joining.append(req)
        return joining

    def _slot_for(self, req: Request, dry: bool = False) -> Optional[int]:
        """The bank slot of the request's adapter (0: none), loading it into a free slot or the least recently
        used idle one; None when every slot is busy. dry: only say whether a slot is available."""
        name = req.adapter
        if name is None:
            return 0
        if name in self.resident:
            if not dry:
                self.resident.move_to_end(name)
            return self.resident[name]
        self._reclaim()
        idle = [n for n, s in self.resident.items() if self.in_use[s] == 0]
        if not self.free_slots and not idle:
            return None
        if dry:
            return -1
        slot = self.free_slots.pop() if self.free_slots else self.resident.pop(idle[0])
        try:
            self.bank.load(slot, self.adapters[name])
        except LoRAError:
            self.bank.clear(slot)
            self.free_slots.append(slot)
            raise
        self.resident[name] = slot
        return slot

    def _reclaim(self) -> None:
        """Free the slots of unregistered adapters that no running request uses."""
        for slot in [s for s in self.orphans if self.in_use[s] == 0]:
            self.orphans.discard(slot)
            self.bank.clear(slot)
            self.free_slots.append(slot)

    def _prefill(self, req: Request) -> None:
        """Run the prompt alone (so its result never depends on the batch), then give it a row."""
        self.bank.select([req.slot])
        kv = KVCache(self.model.config.num_hidden_layers)
        out = self.model(torch.tensor([req.prompt], device=self.device), past_key_values=kv, use_cache=True,
                         logits_to_keep=1)
        row = len(self.rows)
        self.cache.put_row(row, kv, len(req.prompt))
        self.rows.append(req)
        self.lens.append(len(req.prompt))
        logits = out.logits[:, -1].float()
        self._accept(req, logits, int(logits.argmax(-1)))

    def warmup(self) -> "Engine":
        """Compile the decode step for every batch bucket now, so that no request waits for the compiler."""
        if self.compiled:
            with torch.inference_mode():
                for size in self.buckets:
                    self._decode([0] * size, [0] * size, [1] * size)
        return self

    def _decode(self, slots: list, lens: list, tokens: list) -> torch.Tensor:
        """Next-token logits (B, vocab) for rows with these adapter slots, cache lengths and last tokens."""
        B = len(slots)
        if self.compiled:  # pad to the bucket with idle rows: no adapter, an empty cache, token 0
            pad = next(b for b in self.buckets if b >= B) - B
            slots, lens, tokens = slots + [0] * pad, lens + [0] * pad, tokens + [0] * pad
        self.bank.select(slots, always=self.compiled)  # compiled: one graph, adapters or not
        lengths = torch.tensor(lens, device=self.device)
        if self.compiled:
            self.cache.length[:len(lens)] = lengths
        else:
            self.cache.length = lengths
        ids = torch.tensor(tokens, device=self.device)[:, None]
        return self.decode(self.model, ids, self.cache)[:B].float()

    def _step(self) -> None:
        """One decode step for every running row: feed each row's last token, take one new token per row."""
        live = [i for i, r in enumerate(self.rows) if not r.cancelled]
        if not live:
            return
        logits = self._decode([r.slot for r in self.rows], self.lens, [r.tokens[-1] for r in self.rows])
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        for i in live:
            self.lens[i] += 1
            self._accept(self.rows[i], logits[i:i + 1], greedy[i])

    def _accept(self, req: Request, logits: torch.Tensor, greedy: int) -> None:
        """Take the row's next token and tell the client what changed; mark the request done when it is."""
        if req.temperature > 0:
            token = int(sample_next(logits, req.temperature, req.top_p, 0, req.generator))
        else:
            token = greedy
        req.tokens.append(token)
        if token == self.tok.eos_token_id or token in req.stop_token_ids:  # the stop token is not text
            return self._finish(req, "stop", self._text(req, len(req.tokens) - 1, flush=True))
        text = self._text(req, len(req.tokens), flush=len(req.tokens) >= req.max_tokens)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish(req, "stop", text[:cut])
        if len(req.tokens) >= req.max_tokens:
            return self._finish(req, "length", text)
        # Hold back a tail that may be the start of a stop string.
        hold = max((k for s in req.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        ready = text[:len(text) - hold]
        if len(ready) > req.sent:
            req.emit({"delta": ready[req.sent:]})
            req.sent = len(ready)

    def _text(self, req: Request, end: int, flush: bool = False) -> str:
        """The text of tokens[:end], decoding only the tokens since the last call (plus a short window before them
        for context) rather than the whole reply at every step. A character whose bytes are not all there yet
        waits for the next token, unless flush (the reply ends here)."""
        before = self.tok.decode(req.tokens[req.window:req.decoded], skip_special_tokens=True)
        after = self.tok.decode(req.tokens[req.window:end], skip_special_tokens=True)
        if after.startswith(before) and (flush or not after.endswith("\ufffd")):
            req.text += after[len(before):]
            req.window, req.decoded = req.decoded, end
        elif flush:  # the window's decoding changed what came before it: decode the whole reply once
            req.text, req.decoded = self.tok.decode(req.tokens[:end], skip_special_tokens=True), end
        return req.text

    def _finish(self, req: Request, reason: str, text: str) -> None:
        if len(text) > req.sent:
            req.emit({"delta": text[req.sent:]})
        req.sent = len(text)
        req.emit({"finish_reason": reason, "text": text, "prompt_tokens": len(req.prompt),
                  "completion_tokens": len(req.tokens)})
        req.cancelled = True  # done: leaves the batch at this step's end

    def _leave(self) -> None:
        """Drop finished and cancelled rows; the last row moves into each gap, so rows stay 0..B-1."""
        with self.cond:
            i = 0
            while i < len(self.rows):
                if not self.rows[i].cancelled:
                    i += 1
                    continue
                self.in_use[self.rows[i].slot] -= 1
                last = len(self.rows) - 1
                if i != last:
                    self.cache.move_row(last, i, self.lens[last])
                    self.rows[i], self.lens[i] = self.rows[last], self.lens[last]
                self.rows.pop()
                self.lens.pop()
            self._reclaim()
