"""The serving pieces under the server: RowKVCache (rows at their own positions), AdapterBank (an adapter per row)
and the Engine's scheduling, without HTTP."""
import threading
import time

import pytest
import torch

from model.engine import Engine, EngineError, Request
from model.model_lora import AdapterBank, LoRAError, load_lora, set_adapter
from model.model_minimind import KVCache, MiniMindForCausalLM, RowKVCache
from model.tokenizer import Tokenizer
from tests.conftest import minimind_adapter, random_adapter, solo_reply, tiny_config, varied_model


def test_row_cache_decodes_rows_of_different_lengths_like_each_alone():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).eval()
    prompts = [torch.randint(0, 512, (1, n)) for n in (3, 9, 5)]
    nxt = torch.randint(0, 512, (3, 2))
    want = []
    for i, p in enumerate(prompts):  # each row alone: prompt, then two more tokens, plain KVCache
        cache = KVCache(model.config.num_hidden_layers)
        model(p, past_key_values=cache, use_cache=True)
        steps = [model(nxt[i:i + 1, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1] for t in range(2)]
        want.append(torch.stack(steps))
    rows = RowKVCache(model.config, max_batch=4, max_len=32)
    for i, p in enumerate(prompts):
        kv = KVCache(model.config.num_hidden_layers)
        model(p, past_key_values=kv, use_cache=True)
        rows.put_row(i, kv, p.shape[1])
    lens = [p.shape[1] for p in prompts]
    got = []
    for t in range(2):
        rows.length = torch.tensor(lens)
        got.append(model(nxt[:, t:t + 1], past_key_values=rows, use_cache=True).logits[:, -1])
        lens = [n + 1 for n in lens]
    got = torch.stack(got, 1)
    for i in range(3):
        assert torch.allclose(got[i], want[i], atol=1e-5)
    # Moving the last row into row 0 keeps its cache: it decodes on as before.
    rows.move_row(2, 0, lens[2])
    rows.length = torch.tensor([lens[2]])
    probe = torch.tensor([[7]])
    alone = KVCache(model.config.num_hidden_layers)
    model(torch.cat([prompts[2], nxt[2:3]], 1), past_key_values=alone, use_cache=True)
    assert torch.allclose(model(probe, past_key_values=rows, use_cache=True).logits,
                          model(probe, past_key_values=alone, use_cache=True).logits, atol=1e-5)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    model = varied_model(0)
    random_adapter(model, "a", d / "a.pth")
    random_adapter(model, "b", d / "b.safetensors", rank=8, use_rslora=True, target_modules="all-linear")
    random_adapter(varied_model(1, layers=3), "other", d / "other.pth")
    return d


def test_bank_rows_equal_each_adapter_set_the_usual_way(adapters):
    ref = varied_model(0)
    load_lora(ref, adapters / "a.pth", "a")
    load_lora(ref, adapters / "b.safetensors", "b")
    x = torch.randint(0, 3000, (4, 6))
    want = []
    for row, name in enumerate(["a", None, "b", "a"]):
        set_adapter(ref, name)
        want.append(ref(x[row:row + 1]).logits[0])
    model = varied_model(0)
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, adapters / "a.pth")
    bank.load(2, adapters / "b.safetensors")
    bank.select([1, 0, 2, 1])
    got = model(x).logits
    for row in range(4):
        assert torch.allclose(got[row], want[row], atol=1e-4), row
    assert not torch.allclose(want[0], want[1], atol=1e-2)  # the adapters do change the logits
    bank.select([0, 0, 0, 0])
    assert bank.rows is None  # no adapter in the batch: the branch is skipped
    bank.clear(1)
    bank.select([1])
    set_adapter(ref, None)
    assert torch.allclose(model(x[:1]).logits[0], ref(x[:1]).logits[0], atol=1e-5)  # a cleared slot is the base


def test_bank_refuses_what_does_not_fit(adapters):
    bank = AdapterBank(varied_model(0), slots=1, max_rank=4)
    with pytest.raises(LoRAError, match="num_hidden_layers|another base"):
        bank.check(adapters / "other.pth")
    with pytest.raises(LoRAError, match="rank 8 is above the bank's maximum 4; start the server with --max_lora_rank 8"):
        bank.check(adapters / "b.safetensors")


def run(engine, *reqs, timeout=60):
    """Submit all at once; each request's events once every one has finished."""
    done = [threading.Event() for _ in reqs]
    events = [[] for _ in reqs]
    for r, ev, d in zip(reqs, events, done):
        r.emit = lambda e, ev=ev, d=d: (ev.append(e), "delta" not in e and d.set())
        engine.submit(r)
    assert all(d.wait(timeout) for d in done)
    return events


def test_engine_stop_tokens_lru_and_refusals(adapters):
    tok = Tokenizer()
    engine = Engine(varied_model(0), tok, max_batch=3, max_seq_len=64, max_loras=1).start()
    try:
        engine.register("a", adapters / "a.pth")
        engine.register("b", adapters / "b.safetensors")
        with pytest.raises(EngineError, match="already loaded"):
            engine.register("a", adapters / "a.pth")
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
        full = engine.complete(Request(prompt, "a", max_tokens=6))
        assert full["finish_reason"] == "length" and full["completion_tokens"] == 6
        assert full["text"] == solo_reply(varied_model(0), tok, prompt, 6, adapters / "a.pth")
        # A later greedy token (the first after the opening one that is new) as a stop token: the reply is
        # what came before it, finished by "stop".
        probe = Request(prompt, "a", max_tokens=6)
        engine.complete(probe)
        k = next(i for i in range(1, 6) if probe.tokens[i] not in probe.tokens[:i])
        stopped = engine.complete(Request(prompt, "a", max_tokens=6, stop_token_ids=(probe.tokens[k],)))
        assert stopped["finish_reason"] == "stop"
        assert stopped["text"] == tok.decode(probe.tokens[:k], skip_special_tokens=True)
        # One resident slot, two adapters in flight: b waits for a's rows, then evicts it.
        ea, eb = run(engine, Request(prompt, "a", max_tokens=6), Request(prompt, "b", max_tokens=6))
        assert ea[-1]["text"] == full["text"]
        assert eb[-1]["text"] == solo_reply(varied_model(0), tok, prompt, 6, adapters / "b.safetensors") != full["text"]
        assert engine.stats()["resident"] == ["b"]
        with pytest.raises(EngineError, match="plus max_tokens"):
            engine.submit(Request(prompt, None, max_tokens=64))
        with pytest.raises(EngineError, match="no adapter named 'zzz'"):
            engine.submit(Request(prompt, "zzz"))
        engine.unregister("b")
        assert engine.stats()["resident"] == []
        deadline = time.time() + 10  # the slot is freed once b's finished row has left the batch
        while engine.free_slots != [1] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.free_slots == [1]
    finally:
        engine.stop()


def test_a_failing_forward_fails_its_requests_and_the_engine_keeps_serving(adapters):
    tok = Tokenizer()
    model = varied_model(0)
    engine = Engine(model, tok, max_batch=2, max_seq_len=64, max_loras=1).start()
    try:
        engine.register("a", adapters / "a.pth")
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
        good = engine.complete(Request(prompt, "a", max_tokens=4), timeout=30)
        assert good["text"] == solo_reply(varied_model(0), tok, prompt, 4, adapters / "a.pth")
        real_forward = model.forward
        model.forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("out of memory"))
        failed = engine.complete(Request(prompt, "a", max_tokens=4), timeout=30)
        assert failed == {"error": "generation failed: RuntimeError: out of memory"}
        model.forward = real_forward
        assert engine.complete(Request(prompt, "a", max_tokens=4), timeout=30) == good
        deadline = time.time() + 10
        while engine.in_use[1] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.in_use[1] == 0  # the failed request's slot was released
    finally:
        engine.stop()


def test_compiled_engine_replies_equal_the_eager_engine_and_never_compile_after_warmup(adapters):
    import torch._dynamo
    tok = Tokenizer()
    questions = ["hi", "你是谁？", "What is the capital of Japan?", "请计算3加5。", "Tell me a story."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    names = [None, "a", "b", "a", None]
    replies = {}
    for compile in (False, True):
        # max_loras 1: "b" is read into the slot after warmup, so the compiled step must read the bank, not a copy.
        engine = Engine(varied_model(0), tok, max_batch=4, max_seq_len=64, max_loras=1, compile=compile)
        engine.register("a", adapters / "a.pth")
        engine.register("b", adapters / "b.safetensors")
        engine.warmup().start()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            events = run(engine, *[Request(p, n, max_tokens=8) for p, n in zip(prompts, names)], timeout=120)
        finally:
            engine.stop()
        replies[compile] = [e[-1]["text"] for e in events]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert engine.buckets == [1, 2, 4]
    files = {None: None, "a": adapters / "a.pth", "b": adapters / "b.safetensors"}
    assert replies[False] == [solo_reply(varied_model(0), tok, p, 8, files[n]) for p, n in zip(prompts, names)]
    assert len(set(replies[False])) >= 4  # varied replies: the adapters and prompts matter
    assert replies[True] == replies[False]


def test_a_minimind_file_without_config_is_served_at_scale_1(tmp_path):
    tok = Tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=True)
    path = minimind_adapter(varied_model(0), tmp_path / "lora_medical_64.pth")
    want = solo_reply(varied_model(0), tok, prompt, 10, path)
    assert want != solo_reply(varied_model(0), tok, prompt, 10)  # the adapter changes the reply
    # Served at alpha 16 / rank 4 instead of 1, the reply would be this one's: a wrong scale shows.
    assert want != solo_reply(varied_model(0), tok, prompt, 10, minimind_adapter(varied_model(0), tmp_path / "x4.pth",
                                                                                 b_factor=4.0))
    bank = AdapterBank(varied_model(0), slots=1)
    assert bank.check(path)[1] == 1.0
    engine = Engine(varied_model(0), tok, max_batch=2, max_seq_len=64, max_loras=1).start()
    try:
        engine.register("medical", path)
        assert engine.complete(Request(prompt, "medical", max_tokens=10), timeout=30)["text"] == want
    finally:
        engine.stop()
