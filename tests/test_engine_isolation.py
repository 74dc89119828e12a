"""The engine keeps one client's trouble to that client: bad adapter files, failing requests, parameters at the edges
of float32, huge stop strings, slow disks, busy adapters, timeouts, and its own thread dying. Replies of the others
are compared with the plain model's greedy reply (load_lora + generate)."""
import random
import re
import threading
import time

import pytest
import torch

import model.engine as engine_module
from model.checkpoint import atomic_torch_save
from model.engine import Engine, EngineError, Request
from model.model_lora import LoRAError, load_lora
from model.model_minimind import sample_next
from model.tokenizer import Tokenizer
from tests.bad_adapters import config_of, lm_head_adapter, mixed_rank_adapter, truncate_config, with_config
from tests.conftest import random_adapter, varied_model

TOK = Tokenizer()
QUESTIONS = ["hi", "你是谁？", "What is the capital of Japan?", "请计算3加5。"]
PROMPTS = [TOK.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
           for q in QUESTIONS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("isolation")
    model = varied_model(0)
    random_adapter(model, "a", d / "a.pth")
    random_adapter(model, "b", d / "b.pth", rank=8, target_modules="all-linear")
    return d


_references = {}


def reference(files, adapter, prompt, n) -> str:
    """The plain model's greedy reply, the adapter loaded the usual way (not through a bank)."""
    key = (adapter, tuple(prompt), n)
    if key not in _references:
        model = varied_model(0)
        if adapter:
            load_lora(model, files / f"{adapter}.pth", adapter)
        ids = torch.tensor([prompt])
        new = model.generate(ids, n, eos_token_id=TOK.eos_token_id)[0, ids.shape[1]:].tolist()
        new = new[:new.index(TOK.eos_token_id)] if TOK.eos_token_id in new else new
        _references[key] = TOK.decode(new, skip_special_tokens=True)
    return _references[key]


def make_engine(files, **kw) -> Engine:
    kw = {"max_batch": 8, "max_seq_len": 128, "max_loras": 2, **kw}
    engine = Engine(varied_model(0), TOK, **kw)
    engine.register("a", files / "a.pth")
    engine.register("b", files / "b.pth")
    return engine.start()


def run(engine, *reqs, timeout=30):
    """Submit all at once; each request's events once every one has sent its final event."""
    done = [threading.Event() for _ in reqs]
    events = [[] for _ in reqs]
    for r, ev, d in zip(reqs, events, done):
        r.emit = lambda e, ev=ev, d=d: (ev.append(e), "delta" not in e and d.set())
        engine.submit(r)
    assert all(d.wait(timeout) for d in done), "a request got no final event"
    return events


def drained(engine, timeout=10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if not s["running"] and not s["waiting"] and not any(engine.in_use.values()):
            return True
        time.sleep(0.01)
    return False


def test_registration_refuses_every_file_that_would_break_the_bank(files, tmp_path):
    good = files / "a.pth"
    config = config_of(good)
    nan = torch.load(good, weights_only=True)
    next(v for k, v in nan.items() if k.endswith("B.weight"))[0, 0] = float("nan")
    atomic_torch_save(nan, tmp_path / "nan.pth")
    cases = [
        (lm_head_adapter(tmp_path / "head.pth", 64, TOK.vocab_size), "lm_head is not a layer the bank serves"),
        (mixed_rank_adapter(good, tmp_path / "mixed.pth"),
         "rank 32 is above the bank's maximum 16; start the server with --max_lora_rank 32"),
        (with_config(good, tmp_path / "alpha.pth", {**config, "alpha": "16"}), "wrong 'alpha'; expected a finite number"),
        (with_config(good, tmp_path / "rank.pth", {**config, "rank": 4.0}), "wrong 'rank'; expected an integer"),
        (with_config(good, tmp_path / "base.pth", {**config, "base": [64]}), "wrong 'base'; expected an object"),
        (with_config(good, tmp_path / "list.pth", [config]), "the adapter's config is a JSON list, not an object"),
        (with_config(good, tmp_path / "cut.pth", '{"rank": 4, "al'), "the adapter's config is not valid JSON"),
        (tmp_path / "nan.pth", "holds values that are not finite floats"),
    ]
    engine = make_engine(files)
    try:
        for path, message in cases:
            with pytest.raises(LoRAError, match=re.escape(message)):
                engine.register("bad", path)
        assert list(engine.adapters) == ["a", "b"] and not engine.registering
        events = run(engine, Request(PROMPTS[0], "a", max_tokens=8), Request(PROMPTS[1], None, max_tokens=8))
        assert [e[-1]["text"] for e in events] == [reference(files, "a", PROMPTS[0], 8),
                                                   reference(files, None, PROMPTS[1], 8)]
    finally:
        engine.stop()


def test_a_file_broken_on_disk_after_registration_fails_only_its_requests(files, tmp_path):
    changed = tmp_path / "t.pth"
    changed.write_bytes((files / "b.pth").read_bytes())
    engine = make_engine(files)
    try:
        engine.register("t", changed)
        truncate_config(changed)  # registered, not yet read into the bank: the first request reads it again
        reqs = [Request(PROMPTS[0], None, max_tokens=10), Request(PROMPTS[1], "t", max_tokens=10),
                Request(PROMPTS[2], "a", max_tokens=10), Request(PROMPTS[3], "t", max_tokens=10)]
        events = run(engine, *reqs)
        for i in (1, 3):
            assert events[i] == [{"error": f"{changed}: the adapter's config is not valid JSON; replace it with a good "
                                           f"copy (rerun the step that wrote it, or download it again)", "status": 400}]
        assert events[0][-1]["text"] == reference(files, None, PROMPTS[0], 10)
        assert events[2][-1]["text"] == reference(files, "a", PROMPTS[2], 10)
        assert engine.alive() and drained(engine) and engine.stats()["resident"] == ["a"]
        changed.write_bytes((files / "b.pth").read_bytes())  # mended: read again at the next request
        assert run(engine, Request(PROMPTS[1], "t", max_tokens=10))[0][-1]["text"] == reference(files, "b", PROMPTS[1], 10)
    finally:
        engine.stop()


def test_a_failure_in_one_requests_prefill_sampling_or_callback_is_its_own(files, monkeypatch):
    engine = make_engine(files)
    model = engine.model
    try:
        poison = TOK.apply_chat_template([{"role": "user", "content": "poison " * 7}], add_generation_prompt=True,
                                         tokenize=True)
        assert len(poison) not in map(len, PROMPTS)
        real_forward, real_sample = model.forward, engine_module.sample_next

        def forward(input_ids, *args, **kw):  # the poisoned prompt's prefill fails, as a bug or out of memory would
            if input_ids.shape[1] == len(poison):
                raise RuntimeError("injected prefill fault")
            return real_forward(input_ids, *args, **kw)

        def sample(logits, temperature, top_p, top_k, generator=None):
            if temperature == 1.5:
                raise RuntimeError("injected sampling fault")
            return real_sample(logits, temperature, top_p, top_k, generator)

        model.forward = forward
        monkeypatch.setattr(engine_module, "sample_next", sample)
        broken_events = []

        def broken_emit(event):  # a client whose callback breaks after its first event (its loop has closed)
            if broken_events:
                raise RuntimeError("callback fault")
            broken_events.append(event)

        broken = Request(PROMPTS[3], "b", max_tokens=40, emit=broken_emit)
        engine.submit(broken)
        good = [Request(PROMPTS[0], None, max_tokens=12), Request(PROMPTS[1], "a", max_tokens=12),
                Request(PROMPTS[2], "b", max_tokens=12)]
        bad = [Request(poison, "a", max_tokens=12), Request(PROMPTS[0], "b", max_tokens=12, temperature=1.5)]
        events = run(engine, *good, *bad)
        assert [e[-1]["text"] for e in events[:3]] == [reference(files, None, PROMPTS[0], 12),
                                                       reference(files, "a", PROMPTS[1], 12),
                                                       reference(files, "b", PROMPTS[2], 12)]
        assert events[3] == [{"error": "generation failed: RuntimeError: injected prefill fault"}]
        assert events[4] == [{"error": "generation failed: RuntimeError: injected sampling fault"}]
        assert drained(engine) and len(broken_events) == 1 and broken.cancelled  # its row was let go
        assert engine.alive()
    finally:
        model.forward = real_forward
        engine.stop()


def test_parameters_at_the_edges_of_float32_decode_beside_greedy_ones(files):
    engine = make_engine(files)
    try:
        reqs = [Request(PROMPTS[0], "a", max_tokens=16), Request(PROMPTS[1], None, max_tokens=16, temperature=1e-40),
                Request(PROMPTS[2], "b", max_tokens=16, temperature=1.0, top_p=1e-30)]
        events = run(engine, *reqs)
        assert [e[-1]["text"] for e in events] == [reference(files, "a", PROMPTS[0], 16),
                                                   reference(files, None, PROMPTS[1], 16),
                                                   reference(files, "b", PROMPTS[2], 16)]
        assert reqs[2].generator.device == engine.device  # drawn on the logits' device
        with pytest.raises(EngineError, match=re.escape("top_p must be in (0, 1], got 0")):
            engine.submit(Request(PROMPTS[0], None, max_tokens=4, temperature=1.0, top_p=0))
    finally:
        engine.stop()
    generator = torch.Generator().manual_seed(0)
    for logits in (torch.tensor([[3e38, -3e38, 0.0, 1.0]]), torch.tensor([[6e4, -6e4, 0.0]], dtype=torch.float16)):
        for temperature in (1e-40, 1e-5, 1e-4, 0.7, 2.0):
            for top_p in (1e-9, 0.5, 1.0):
                assert int(sample_next(logits, temperature, top_p, 0, generator)) == 0


def stop_reference(text, stops):
    """The plain, quadratic search: earliest start of a stop string, and the longest tail that may begin one."""
    cut = min((text.find(s) for s in stops if s in text), default=None)
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return cut, hold


def test_stop_matcher_equals_the_plain_search_whatever_the_pieces():
    from model.engine import StopMatcher
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("aabc") for _ in range(rng.randint(1, 40)))
        matcher, fed = StopMatcher(stops), 0
        while fed < len(text):
            fed = min(len(text), fed + rng.randint(1, 4))
            cut, hold = stop_reference(text[:fed], stops)
            assert matcher.feed(text[:fed]) == cut, (stops, text[:fed])
            if cut is not None:
                break
            assert matcher.held() == hold, (stops, text[:fed])


def test_huge_stop_strings_cost_their_own_request_only(files):
    engine = make_engine(files, max_seq_len=256)
    try:
        want = [reference(files, None, PROMPTS[0], 48), reference(files, "a", PROMPTS[1], 48)]
        # Each begins like the reply, so its tail is held back for a while; none ever matches.
        huge = tuple(want[0][:3] + chr(0x4E00 + i) * 100_000 for i in range(4))
        finished = {}
        events = [[], []]
        done = [threading.Event(), threading.Event()]
        reqs = [Request(PROMPTS[0], None, max_tokens=48, stop=huge), Request(PROMPTS[1], "a", max_tokens=48)]
        for i, r in enumerate(reqs):
            def emit(e, i=i):
                events[i].append(e)
                if "delta" not in e:
                    finished[i] = time.perf_counter()
                    done[i].set()
            r.emit = emit
        engine.submit(reqs[0])
        start = time.perf_counter()
        engine.submit(reqs[1])
        assert done[0].wait(60) and done[1].wait(60)
        assert [e[-1]["text"] for e in events] == want
        assert "".join(e.get("delta", "") for e in events[0]) == want[0]
        assert finished[1] - start < 3.0, f"the neighbour took {finished[1] - start:.1f} s"
    finally:
        engine.stop()


def test_two_registrations_of_one_name_at_once_one_is_refused(files):
    engine = Engine(varied_model(0), TOK, max_loras=1)
    real_check = engine.bank.check
    engine.bank.check = lambda path: (time.sleep(0.3), real_check(path))[1]  # a slow disk widens the window
    outcomes = {}

    def register(path):
        try:
            engine.register("x", path)
            outcomes[path.stem] = "ok"
        except EngineError as e:
            outcomes[path.stem] = str(e)

    threads = [threading.Thread(target=register, args=(files / f"{n}.pth",)) for n in "ab"]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert outcomes == {"a": "ok", "b": "adapter 'x' is being loaded by another request"}
    assert engine.adapters == {"x": files / "a.pth"} and not engine.registering


def test_reading_an_adapter_file_holds_up_no_other_thread(files):
    engine = make_engine(files, max_loras=1)
    real_load, reading = engine.bank.load, threading.Event()

    def slow_load(slot, path):
        reading.set()
        time.sleep(1.0)
        real_load(slot, path)

    engine.bank.load = slow_load
    try:
        events = []
        req = Request(PROMPTS[0], "a", max_tokens=4, emit=events.append)
        engine.submit(req)
        assert reading.wait(10)
        start = time.perf_counter()
        engine.stats()  # what /health calls
        engine.submit(Request(PROMPTS[1], None, max_tokens=4, emit=lambda e: None))
        assert time.perf_counter() - start < 0.3
        assert drained(engine) and events[-1]["text"] == reference(files, "a", PROMPTS[0], 4)
    finally:
        engine.stop()


def test_a_busy_adapter_cannot_starve_another(files):
    engine = make_engine(files, max_batch=4, max_loras=1)
    stop, replies, done_b, events_b = threading.Event(), [], threading.Event(), []
    try:
        def feed():  # a client that asks again for "a" the moment its reply ends, on the engine thread
            engine.submit(Request(PROMPTS[0], "a", max_tokens=8, emit=on_event))

        def on_event(event):
            if "delta" not in event:
                replies.append(event.get("text", str(event)))
                if not stop.is_set():
                    feed()

        def after_steps(n):
            deadline, target = time.time() + 10, engine.steps + n
            while engine.steps < target and time.time() < deadline:
                time.sleep(0.001)

        feed()
        after_steps(4)
        feed()  # a second stream, half a reply later: at every step one "a" request is running
        after_steps(4)
        engine.submit(Request(PROMPTS[1], "b", max_tokens=8,
                              emit=lambda e: (events_b.append(e), "delta" not in e and done_b.set())))
        served = done_b.wait(15)
        stop.set()
        assert served, "the request for 'b' waited while 'a' was busy"
        assert drained(engine)
        assert events_b[-1]["text"] == reference(files, "b", PROMPTS[1], 8)
        assert len(replies) >= 2 and set(replies) == {reference(files, "a", PROMPTS[0], 8)}
    finally:
        stop.set()
        engine.stop()


def test_a_request_past_its_timeout_is_ended_and_frees_its_row(files):
    engine = make_engine(files, max_batch=1, max_seq_len=1024, request_timeout=60)
    try:
        long = Request(PROMPTS[0], "a", max_tokens=1000, timeout=0.4)
        queued = Request(PROMPTS[1], None, max_tokens=8, timeout=0.2)  # behind `long` in the only row
        events = run(engine, long, queued)
        assert events[0][-1] == {"error": "the request did not finish within its timeout (0.4 s)", "status": 408}
        assert events[1] == [{"error": "the request did not finish within its timeout (0.2 s)", "status": 408}]
        assert drained(engine)
        assert run(engine, Request(PROMPTS[1], None, max_tokens=8))[0][-1]["text"] == reference(files, None, PROMPTS[1], 8)
    finally:
        engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_when_the_engine_thread_dies_every_request_is_answered_and_new_ones_refused(files):
    engine = make_engine(files)
    real_admit = engine._admit

    def admit(dry=False):  # a bug in the bookkeeping, outside any one request
        if any(r.max_tokens == 7 for r in engine.waiting):
            raise RuntimeError("injected bookkeeping fault")
        return real_admit(dry)

    engine._admit = admit
    try:
        running = Request(PROMPTS[0], "a", max_tokens=100)
        events = [[]]
        running.emit = events[0].append
        engine.submit(running)
        deadline = time.time() + 10
        while not events[0] and time.time() < deadline:
            time.sleep(0.01)
        trigger = run(engine, Request(PROMPTS[1], None, max_tokens=7))[0]
        dead = {"error": "the engine stopped: RuntimeError: injected bookkeeping fault", "status": 503}
        assert trigger == [dead] and events[0][-1] == dead
        assert engine.done.wait(10) and not engine.alive()
        assert engine.failure == "RuntimeError: injected bookkeeping fault"
        with pytest.raises(EngineError, match=re.escape("the engine has stopped (RuntimeError: injected")) as e:
            engine.submit(Request(PROMPTS[2], None, max_tokens=4))
        assert e.value.status == 503
    finally:
        engine.stop()
