"""Continuous batching over one model, with its own adapter per request: the server's engine.

One thread owns the model. Requests wait in a queue, join the running batch between decode steps (each
prompt is prefilled alone, then its KV cache is copied into a free row of a RowKVCache) and leave as soon as
they finish or are cancelled. Each row names its adapter's slot in an AdapterBank, so one batch mixes
adapters and no request changes another's. `max_loras` adapters are resident; any number can be registered:
they are read from disk when a request needs them, evicting the least recently used one that no running
request uses; files are read on the engine thread but outside its lock, so no HTTP handler waits on a disk.
Events go out through each request's `emit` callback, from the engine thread.

One request's failure is its own: an error in its prefill, its sampling, its adapter's file or its callback fails
that request alone; only a failing batched decode step fails the rows in it. Anything else that goes wrong on the
engine thread stops the engine: every request gets an error, `failure` says why and `alive()` turns false.
"""
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from model.model_lora import AdapterBank, LoRAError
from model.model_minimind import MIN_TEMPERATURE, KVCache, RowKVCache, StaticKVCache, decode_step, sample_next


class EngineError(ValueError):
    """A request or registration the engine refuses; the message is one line for the client, `status` its HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class StopMatcher:
    """The first occurrence of any stop string in a reply fed a piece at a time, in time linear in the reply (KMP):
    per string, the state is the length of its longest prefix that ends the text fed so far."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fail = [self._failure(s) for s in self.stops]
        self.reset()

    def reset(self) -> None:
        self.state, self.fed, self.found = [0] * len(self.stops), 0, None

    @staticmethod
    def _failure(s: str) -> list:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            k += s[i] == s[k]
            fail[i] = k
        return fail

    def feed(self, text: str) -> Optional[int]:
        """Read text[self.fed:] (text grows by appending); the start of the earliest stop string in it, or None."""
        for j, s in enumerate(self.stops):
            k, fail = self.state[j], self.fail[j]
            for i in range(self.fed, len(text)):
                while k and text[i] != s[k]:
                    k = fail[k - 1]
                k += text[i] == s[k]
                if k == len(s):
                    start = i - k + 1
                    self.found = start if self.found is None else min(self.found, start)
                    k = fail[k - 1]
                    break  # the reply ends at a match: later ones of this string cannot come first
            self.state[j] = k
        self.fed = len(text)
        return self.found

    def held(self) -> int:
        """How many final characters may still be the start of a stop string."""
        return max(self.state, default=0)


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
    timeout: Optional[float] = None   # seconds from submission to the last token; None: the engine's default
    deadline: Optional[float] = None  # time.monotonic() by which it must finish
    stopper: Optional[StopMatcher] = None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_seq_len: int = 1024, max_loras: int = 8,
                 max_lora_rank: int = 16, compile: bool = False, request_timeout: Optional[float] = None):
        self.model, self.tok = model.eval(), tokenizer
        self.request_timeout = request_timeout  # None: requests may run as long as their max_tokens takes
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
        self.registering: set[str] = set()  # names whose file is being checked: a second registration is refused
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> slot, LRU first
        self.free_slots = list(range(max_loras, 0, -1))
        self.orphans: set[int] = set()    # slots of unregistered adapters, freed once no row uses them
        self.in_use = collections.Counter()  # slot -> running requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []     # the running batch: rows[i] is row i of self.cache
        self.lens: list[int] = []         # tokens in each row's cache
        self.joining: list[Request] = []  # admitted, not yet prefilled
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: Optional[threading.Thread] = None
        self.failure: Optional[str] = None  # why the engine thread stopped on its own
        self.done = threading.Event()       # set when the engine thread has ended, for whatever reason
        self.steps = 0
        self.peak_rows = 0  # the largest batch decoded so far

    # ---- registry and submission (any thread)

    def register(self, name: str, path) -> None:
        """Make an adapter file servable under `name`; it is read now (to refuse a bad file) and again when needed.
        The name is reserved while the file is read, so of two concurrent registrations of a name one is refused."""
        if not name or not isinstance(name, str):
            raise EngineError("an adapter needs a non-empty name")
        with self.cond:
            if name in self.adapters:
                raise EngineError(f"adapter {name!r} is already loaded ({self.adapters[name]})")
            if name in self.registering:
                raise EngineError(f"adapter {name!r} is being loaded by another request")
            self.registering.add(name)
        try:
            self.bank.check(path)  # LoRAError: one line naming the file and what does not fit
            with self.cond:
                self.adapters[name] = Path(path)
        finally:
            with self.cond:
                self.registering.discard(name)

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
        if self.failure is not None:
            raise EngineError(f"the engine has stopped ({self.failure})", 503)
        if req.adapter is not None and req.adapter not in self.adapters:
            raise EngineError(f"no adapter named {req.adapter!r}", 404)
        if not req.prompt:
            raise EngineError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in req.prompt):
            raise EngineError(f"the prompt holds token ids outside 0..{vocab - 1}")
        if len(req.prompt) + req.max_tokens > self.max_seq_len:
            raise EngineError(f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) is more than "
                              f"the server's max_seq_len ({self.max_seq_len})")
        if not 0 < req.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {req.top_p}")
        req.stop_token_ids = frozenset(req.stop_token_ids)
        req.stopper = StopMatcher(req.stop)  # built here, on the caller's thread, not on the engine's
        if req.temperature >= MIN_TEMPERATURE:
            req.generator = torch.Generator(device=self.device)  # on the logits' device: multinomial needs that
            req.generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2 ** 62, ())))
        timeout = req.timeout if req.timeout is not None else self.request_timeout
        req.deadline = time.monotonic() + timeout if timeout is not None else None
        with self.cond:  # checked again under the lock, which the ending thread takes to fail the queue
            if self.failure is not None:
                raise EngineError(f"the engine has stopped ({self.failure})", 503)
            if self.stopping:
                raise EngineError("the server is shutting down", 503)
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
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()
        return self

    def alive(self) -> bool:
        """Started, and the engine thread has not ended."""
        return self.thread is not None and self.thread.is_alive() and self.failure is None

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

    def _run(self) -> None:
        """Serve until stop(). Whatever escapes the loop stops the engine: every request it holds gets an error
        (none is left waiting), submit refuses new ones, alive() turns false and the server can exit."""
        message, status = "the server is shutting down", 503
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as e:
            message = f"the engine stopped: {type(e).__name__}: {e}"
            with self.cond:  # under the lock: a submit either sees the failure or is failed below
                self.failure = f"{type(e).__name__}: {e}"
            raise
        finally:
            with self.cond:
                pending = list(dict.fromkeys(self.rows + self.joining + list(self.waiting)))
                self.waiting.clear()
            for req in pending:
                self._fail(req, message, status)
            self.done.set()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.rows and not self._admit(dry=True):
                    self.cond.wait(self._until_deadline())
                if self.stopping:
                    return
                self.joining, loads = self._admit()
            self._load(loads)
            for req in self.joining:
                if req.cancelled:  # gone since admission, or its adapter's file failed: it never gets a row
                    with self.cond:
                        self.in_use[req.slot] -= 1
                else:
                    self._prefill(req)
            self.joining = []
            self._expire()
            self._leave()  # rows that ended in prefill or timed out have no token to feed
            if self.rows:
                self._step()
            self._leave()

    def _fail(self, req: Request, message: str, status: Optional[int] = None) -> None:
        """End one request with an error event (no status: an internal error); its row leaves at the step's end."""
        if not req.cancelled:
            self._emit(req, {"error": message, **({"status": status} if status else {})})
            req.cancelled = True

    def _emit(self, req: Request, event: dict) -> None:
        try:
            req.emit(event)
        except Exception:  # the client's callback is broken (e.g. its event loop closed): treat it as gone
            req.cancelled = True

    def _late(self, req: Request, now: float) -> bool:
        return req.deadline is not None and now > req.deadline

    def _timeout_message(self, req: Request) -> str:
        timeout = req.timeout if req.timeout is not None else self.request_timeout
        return f"the request did not finish within its timeout ({timeout:g} s)"

    def _until_deadline(self) -> Optional[float]:
        """Seconds until the first waiting request times out (None: no deadline), to wake up for it."""
        deadlines = [r.deadline for r in self.waiting if r.deadline is not None]
        return max(min(deadlines) - time.monotonic(), 0.0) + 1e-3 if deadlines else None

    def _expire(self) -> None:
        now = time.monotonic()
        for req in self.rows:
            if self._late(req, now):
                self._fail(req, self._timeout_message(req), 408)

    def _admit(self, dry: bool = False):
        """Move waiting requests into the batch while rows and adapter slots allow (under the lock), in arrival
        order: once a request waits for an adapter slot, no later adapter request is admitted before it, so a busy
        adapter cannot starve another (base requests need no slot and go on). Returns (joining, {slot: (name, path)}
        of the files to read); dry: only whether there is anything to do."""
        joining, loads, blocked, now = [], {}, False, time.monotonic()
        for req in list(self.waiting):
            unloaded = req.adapter is not None and req.adapter not in self.adapters
            if req.cancelled or unloaded or self._late(req, now):
                if dry:
                    return True
                self.waiting.remove(req)
                if req.cancelled:
                    continue
                if unloaded:
                    self._fail(req, f"adapter {req.adapter!r} was unloaded before the request started", 404)
                else:
                    self._fail(req, self._timeout_message(req), 408)
                continue
            if len(self.rows) + len(joining) >= self.max_batch:
                break
            if blocked and req.adapter is not None:
                continue
            slot = self._slot_for(req, None if dry else loads)
            if slot is None:
                blocked = True  # every slot holds an adapter that running requests use: wait for one to finish
                continue
            if dry:
                return True
            self.waiting.remove(req)
            req.slot = slot
            self.in_use[slot] += 1
            joining.append(req)
        return False if dry else (joining, loads)

    def _slot_for(self, req: Request, loads: Optional[dict]) -> Optional[int]:
        """The bank slot of the request's adapter (0: none): resident, or a free slot or the least recently used
        idle one, recorded in `loads` to be read; None when every slot is busy. loads None: only say (-1)."""
        name = req.adapter
        if name is None:
            return 0
        if name in self.resident:
            if loads is not None:
                self.resident.move_to_end(name)
            return self.resident[name]
        self._reclaim()
        idle = [n for n, s in self.resident.items() if self.in_use[s] == 0]
        if not self.free_slots and not idle:
            return None
        if loads is None:
            return -1
        slot = self.free_slots.pop() if self.free_slots else self.resident.pop(idle[0])
        self.resident[name] = slot
        loads[slot] = (name, self.adapters[name])
        return slot

    def _load(self, loads: dict) -> None:
        """Read the files admission put into slots; outside the lock, so a slow disk holds up this thread alone.
        A file that fails (changed on disk since it was registered) fails the requests that needed it."""
        for slot, (name, path) in loads.items():
            try:
                self.bank.load(slot, path)
                continue
            except Exception as e:  # check() makes everything a LoRAError; anything else is named by type
                message = str(e) if isinstance(e, LoRAError) else f"adapter {name!r}: {type(e).__name__}"
            with self.cond:
                if self.resident.get(name) == slot:
                    del self.resident[name]
                self.orphans.add(slot)  # cleared and freed once the failed requests have let go of it
            for req in self.joining:
                if req.slot == slot:
                    self._fail(req, message, 400)

    def _reclaim(self) -> None:
        """Free the slots of unregistered adapters that no running request uses."""
        for slot in [s for s in self.orphans if self.in_use[s] == 0]:
            self.orphans.discard(slot)
            self.bank.clear(slot)
            self.free_slots.append(slot)

    def _prefill(self, req: Request) -> None:
        """Run the prompt alone (so its result never depends on the batch), then give it a row."""
        try:
            self.bank.select([req.slot])
            kv = KVCache(self.model.config.num_hidden_layers)
            out = self.model(torch.tensor([req.prompt], device=self.device), past_key_values=kv, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[:, -1].float()
            greedy = int(logits.argmax(-1))
            self.cache.put_row(len(self.rows), kv, len(req.prompt))
        except Exception as e:  # this request's alone: it never got a row
            self._fail(req, f"generation failed: {type(e).__name__}: {e}")
            with self.cond:
                self.in_use[req.slot] -= 1
            return
        self.rows.append(req)
        self.lens.append(len(req.prompt))
        self._accept(req, logits, greedy)

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
        try:
            logits = self._decode([r.slot for r in self.rows], self.lens, [r.tokens[-1] for r in self.rows])
            greedy = logits.argmax(-1).tolist()
        except Exception as e:  # the batched forward (a bug, out of memory) cannot say whose it was: all its rows
            for i in live:
                self._fail(self.rows[i], f"generation failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        for i in live:
            self.lens[i] += 1
            self._accept(self.rows[i], logits[i:i + 1], greedy[i])

    def _accept(self, req: Request, logits: torch.Tensor, greedy: int) -> None:
        """Take the row's next token; an error here (sampling, decoding, stop strings) fails this request alone."""
        try:
            self._take(req, logits, greedy)
        except Exception as e:
            self._fail(req, f"generation failed: {type(e).__name__}: {e}")

    def _take(self, req: Request, logits: torch.Tensor, greedy: int) -> None:
        """Take the row's next token and tell the client what changed; mark the request done when it is."""
        if req.temperature >= MIN_TEMPERATURE:
            token = int(sample_next(logits, req.temperature, req.top_p, 0, req.generator))
        else:
            token = greedy
        req.tokens.append(token)
        if token == self.tok.eos_token_id or token in req.stop_token_ids:  # the stop token is not text
            return self._finish(req, "stop", self._text(req, len(req.tokens) - 1, flush=True))
        text = self._text(req, len(req.tokens), flush=len(req.tokens) >= req.max_tokens)
        cut = req.stopper.feed(text)
        if cut is not None:
            return self._finish(req, "stop", text[:cut])
        if len(req.tokens) >= req.max_tokens:
            return self._finish(req, "length", text)
        ready = text[:len(text) - req.stopper.held()]  # hold back a tail that may be the start of a stop string
        if len(ready) > req.sent:
            self._emit(req, {"delta": ready[req.sent:]})
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
            req.stopper.reset()  # the text was rewritten, not extended: match it from its start
        return req.text

    def _finish(self, req: Request, reason: str, text: str) -> None:
        if len(text) > req.sent:
            self._emit(req, {"delta": text[req.sent:]})
        req.sent = len(text)
        self._emit(req, {"finish_reason": reason, "text": text, "prompt_tokens": len(req.prompt),
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
