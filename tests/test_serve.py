"""scripts/serve_openai_api.py with the official openai client on a loopback port: the wire format, mixed-adapter
batches equal to solo replies, runtime loading, many adapters, bad input, queueing and disconnects."""
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from model.checkpoint import load_model
from model.tokenizer import Tokenizer
from tests.conftest import minimind_adapter, random_adapter, solo_reply, varied_model
from tests.serving import BASE, free_port, make_out, running_server

REPO = Path(__file__).resolve().parent.parent
NEW = 10
MESSAGES = [{"role": "user", "content": "你好，请介绍一下你自己。"}]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return make_out(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(out):
    with running_server(out, "--lora_weight", "lora_a,lora_b,lora_c", "--max_batch", "8", "--max_loras", "3",
                        "--allow_runtime_lora") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, model, messages=MESSAGES, **kw):
    kw = {"max_tokens": NEW, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, messages=messages, **kw)


def ask_stream(client, model, messages=MESSAGES, **kw):
    """(text, finish_reason, chunks) of a streamed reply."""
    kw = {"max_tokens": NEW, "temperature": 0, **kw}
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def reference_reply(out, adapter=None, messages=MESSAGES, n=NEW) -> str:
    """Greedy reply of the plain model, the adapter (a name in out/lora/, or a path) loaded with load_lora rather
    than read into the server's bank."""
    if isinstance(adapter, str):
        adapter = next((out / "lora").glob(f"{adapter}_64.*"))
    tok = Tokenizer()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return solo_reply(load_model(out / f"{BASE}.pth"), tok, prompt, n, adapter)


def test_models_lists_base_then_adapters_with_parent(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "lora_a", "lora_b", "lora_c"]
    parents = [m.model_dump().get("parent") for m in models]
    assert parents == [None, BASE, BASE, BASE]


def test_non_streaming_reply_matches_the_model_with_its_adapter(client, out):
    for model, adapter in ((BASE, None), ("lora_a", "lora_a"), ("lora_b", "lora_b"), ("lora_c", "lora_c")):
        r = ask(client, model)
        assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == NEW and r.usage.total_tokens == r.usage.prompt_tokens + NEW
        # lora_c is rank 8 with rsLoRA, zero-padded to the bank's rank 16: still the same reply.
        assert r.choices[0].message.content == reference_reply(out, adapter)
    replies = {ask(client, m).choices[0].message.content for m in (BASE, "lora_a", "lora_b", "lora_c")}
    assert len(replies) == 4  # each adapter changes the reply


def test_stream_wire_format(server, client, out):
    text, finish, chunks = ask_stream(client, "lora_b", stream_options={"include_usage": True})
    assert text == ask(client, "lora_b").choices[0].message.content == reference_reply(out, "lora_b")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.delta.role is None for ch in chunks[1:] for c in ch.choices)
    assert finish == ["length"] and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == "lora_b" and c.created > 0 for c in chunks)
    # The raw stream: every event is a `data:` line, the last one `data: [DONE]`.
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 3, "stream": True, "temperature": 0}
    raw = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all({"id", "object", "created", "model", "choices"} <= set(json.loads(e[6:])) for e in events[:-1])


def test_stop_strings_and_max_tokens_on_both_paths(client, out):
    full = ask(client, "lora_a", max_tokens=NEW).choices[0].message.content
    assert full == reference_reply(out, "lora_a") and len(full) >= 6
    stop = full[3:5]
    cut = full[:full.find(stop)]
    r = ask(client, "lora_a", stop=[stop, "never-there"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    text, finish, _ = ask_stream(client, "lora_a", stop=stop)
    assert (text, finish) == (cut, ["stop"])
    short = ask(client, "lora_a", max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.startswith(short.choices[0].message.content)
    text, finish, _ = ask_stream(client, "lora_a", max_tokens=3)
    assert (text, finish) == (short.choices[0].message.content, ["length"])


def test_seeded_sampling_repeats_and_top_p_narrows(client, out):
    kw = dict(temperature=2.0, max_tokens=12)
    a = ask(client, BASE, seed=7, **kw).choices[0].message.content
    assert ask(client, BASE, seed=7, **kw).choices[0].message.content == a
    assert ask_stream(client, BASE, seed=7, **kw)[0] == a
    others = {ask(client, BASE, seed=s, **kw).choices[0].message.content for s in range(8)}
    assert len(others) > 1  # the seed matters at temperature 2
    # top_p that keeps only the most likely token is greedy, whatever the seed.
    greedy = ask(client, BASE, max_tokens=12).choices[0].message.content
    assert greedy == reference_reply(out, None, n=12)
    assert ask(client, BASE, seed=3, top_p=1e-6, **kw).choices[0].message.content == greedy


def test_twelve_concurrent_streams_over_three_models_equal_their_solo_replies(client, server, out):
    prompts = [[{"role": "user", "content": p}] for p in ("hello", "你是谁？", "What is the capital of France?",
                                                           "最近老是头痛，有什么建议吗？")]
    jobs = [(model, prompts[i % 4]) for i, model in enumerate([BASE, "lora_a", "lora_b"] * 4)]
    solo = {(m, p[0]["content"]): ask(client, m, p, max_tokens=16).choices[0].message.content for m, p in jobs}
    assert solo == {(m, p[0]["content"]): reference_reply(out, None if m == BASE else m, p, 16) for m, p in jobs}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda job: ask_stream(client, job[0], job[1], max_tokens=16)[0], jobs))
    assert got == [solo[(m, p[0]["content"])] for m, p in jobs]
    assert server[1].stats()["peak_batch"] >= 4  # they were decoded together, not one after another


def test_more_requests_than_max_batch_queue_and_all_finish(out):
    with running_server(out, "--lora_weight", "lora_a", "--max_batch", "2") as (url, engine):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        solo = ask(c, "lora_a").choices[0].message.content
        assert solo == reference_reply(out, "lora_a")
        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            got = list(pool.map(lambda _: ask(c, "lora_a").choices[0].message.content, range(7)))
        assert got == [solo] * 7
        deadline = time.time() + 10  # the last row leaves the batch just after its final event
        while engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_runtime_load_and_unload_during_traffic(client, server, out, tmp_path):
    url = server[0]
    path = out / "lora" / "lora_new_64.pth"  # runtime loading reads only under --lora_root (default: out/lora)
    random_adapter(varied_model(0), "lora_new", path, rank=2)
    expected = reference_reply(out, None)  # base replies keep flowing meanwhile

    def traffic():
        return [ask(client, BASE).choices[0].message.content for _ in range(6)]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        background = pool.submit(traffic)
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "lora_new", "lora_path": str(path)})
        assert r.status_code == 200, r.text
        assert "lora_new" in [m.id for m in client.models.list().data]
        new_reply = ask(client, "lora_new").choices[0].message.content
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "lora_new"})
        assert r.status_code == 200, r.text
        assert background.result() == [expected] * 6
    assert new_reply == reference_reply(out, path) != expected
    with pytest.raises(openai.NotFoundError, match="lora_new"):
        ask(client, "lora_new")
    assert "lora_new" not in [m.id for m in client.models.list().data]
    # Loading the same name again works after the unload; a second load of a live name does not.
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "lora_new", "lora_path": str(path)}).status_code == 200
    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "lora_new", "lora_path": str(path)})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert ask(client, "lora_new").choices[0].message.content == new_reply
    httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "lora_new"})


def test_bad_adapters_are_refused_with_the_loaders_message(server, client, out, tmp_path):
    url = server[0]
    other = httpx.post(url + "/v1/load_lora_adapter",
                       json={"lora_name": "x", "lora_path": str(out / "lora" / "lora_other_64.pth")})
    assert other.status_code == 400
    assert "trained on another base" in other.json()["error"]["message"] or "num_hidden_layers" in other.text
    (out / "lora" / "broken.pth").write_bytes(b"not a checkpoint")
    broken = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(out / "lora" / "broken.pth")})
    assert broken.status_code == 400 and "broken.pth" in broken.json()["error"]["message"]
    missing = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": str(out / "lora" / "no.pth")})
    assert missing.status_code == 400 and "no such file" in missing.json()["error"]["message"]
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "never"})
    assert gone.status_code == 404
    assert [m.id for m in client.models.list().data] == [BASE, "lora_a", "lora_b", "lora_c"]
    assert ask(client, "lora_a").choices[0].message.content == reference_reply(out, "lora_a")  # still serving


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server[0] + "/v1/chat/completions"
    good = {"model": "lora_a", "messages": MESSAGES, "max_tokens": 4}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({**good, "model": "nope"}, 404, "lora_a"),                       # the message lists the known names
        ({**good, "messages": "hi"}, 400, "messages"),
        ({**good, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 5000}, 400, "max_seq_len is 1024"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "top_p": 1.5}, 400, "top_p"),
        ({**good, "stop": [1, 2]}, 400, "stop"),
        ({**good, "n": 3}, 400, "n=1"),
        ({**good, "messages": [{"role": "user", "content": "天" * 1100}]}, 400, "1024"),
    ]
    for body, status, text in cases:
        data = body if isinstance(body, bytes) else json.dumps(body)
        r = httpx.post(url, content=data, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert text in err["message"] and err["type"]
    long = httpx.post(url, json={**good, "messages": [{"role": "user", "content": "天" * 1100}]}).json()
    assert "1115 tokens" in long["error"]["message"] or "tokens, but" in long["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        ask(client, "lora_a", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        ask(client, "missing-model", stream=True)  # an error before streaming is an HTTP error
    assert ask(client, "lora_a").choices[0].finish_reason == "length"


def test_a_client_that_disconnects_frees_its_row(server, client, out):
    engine = server[1]
    stream = client.chat.completions.create(model="lora_a", messages=MESSAGES, max_tokens=900, temperature=0,
                                            stream=True)
    next(iter(stream))
    deadline = time.time() + 10
    while engine.stats()["running"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    stream.close()
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0
    assert ask(client, BASE).choices[0].message.content == reference_reply(out)


def test_a_minimind_file_without_config_serves_its_solo_reply(server, client, out, tmp_path):
    """No config in the file: MiniMind's adapter, served at scale 1 as load_lora reads it."""
    path = minimind_adapter(varied_model(0), out / "lora" / "lora_mm_64.pth")  # inside the server's --lora_root
    r = httpx.post(server[0] + "/v1/load_lora_adapter", json={"lora_name": "lora_mm", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    try:
        assert ask(client, "lora_mm").choices[0].message.content == reference_reply(out, path) != reference_reply(out)
    finally:
        httpx.post(server[0] + "/v1/unload_lora_adapter", json={"lora_name": "lora_mm"})


def test_a_hundred_registered_adapters_with_three_resident(tmp_path, out):
    model = varied_model(0)
    paths = []
    for i in range(100):
        torch.manual_seed(100 + i)
        paths.append(tmp_path / f"lora_{i:03d}_64.pth")
        random_adapter(model, f"a{i}", paths[-1], rank=2)
    with running_server(out, "--max_loras", "3", "--allow_runtime_lora", "--lora_root", str(tmp_path)) as (url, engine):
        for i, p in enumerate(paths):
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": f"lora_{i:03d}", "lora_path": str(p)})
            assert r.status_code == 200, r.text
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert len(c.models.list().data) == 101
        picks = [0, 1, 2, 3, 57, 99]
        first = {i: ask(c, f"lora_{i:03d}", max_tokens=6).choices[0].message.content for i in picks}
        assert first == {i: reference_reply(out, paths[i], n=6) for i in picks}
        assert len(set(first.values())) == len(picks)
        assert len(engine.stats()["resident"]) == 3
        # Evicted and read back from disk: the same replies, concurrently too.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            again = dict(zip(picks, pool.map(lambda i: ask(c, f"lora_{i:03d}", max_tokens=6).choices[0].message.content,
                                             picks)))
        assert again == first


def test_api_key_and_runtime_loading_switch_on_the_real_cli(out, tmp_path):
    port = free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--save_dir", str(out), "--hidden_size", "64",
           "--lora_weight", "lora_a", "--port", str(port), "--api_key", "sekret", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in right.models.list().data] == [BASE, "lora_a"]
        reply = ask(right, "lora_a").choices[0]
        assert (reply.message.content, reply.finish_reason) == (reference_reply(out, "lora_a"), "length")
        r = httpx.post(url + "/v1/load_lora_adapter", headers={"Authorization": "Bearer sekret"},
                       json={"lora_name": "b", "lora_path": str(out / "lora" / "lora_b_64.pth")})
        assert r.status_code == 403 and "--allow_runtime_lora" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_bad_weight_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--save_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --weight full_sft:") and proc.stderr.count("\n") == 1
