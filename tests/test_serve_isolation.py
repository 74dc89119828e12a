"""A server that one client cannot break: bad adapter files, poisonous parameters, huge stop strings and bodies,
paths out of the adapter folder, racing registrations, busy adapters and a dying engine thread, over HTTP on a
loopback port. Every valid reply is compared with the plain model's greedy reply (load_lora + generate)."""
import collections
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from model.checkpoint import load_model
from model.model_lora import load_lora, set_adapter
from model.tokenizer import Tokenizer
from tests.bad_adapters import config_of, lm_head_adapter, mixed_rank_adapter, truncate_config, with_config
from tests.serving import BASE, free_port, make_out, running_server

REPO = Path(__file__).resolve().parent.parent
SECRET = "OPENAI_API_KEY=sk-live-9f8e7d6c5b4a3210"
QUESTIONS = ["你好，请介绍一下你自己。", "What is the capital of France?", "最近老是头痛，有什么建议吗？"]
ADAPTERS = ("lora_a", "lora_b", "lora_c")
LIMIT = 65536  # the module server's --max_request_bytes


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    out = make_out(root)
    lora = out / "lora"
    good = lora / "lora_a_64.pth"
    lm_head_adapter(lora / "lora_head_64.pth", 64, Tokenizer().vocab_size)
    mixed_rank_adapter(good, lora / "lora_mixed_64.pth")
    with_config(good, lora / "lora_cut_64.pth", '{"rank": 4, "al')
    with_config(good, lora / "lora_alpha_64.pth", {**config_of(good), "alpha": "x"})
    (lora / "secret.pth").write_text(SECRET + "\n")
    private = root / "private"
    private.mkdir()
    (private / ".env").write_text(SECRET + "\n")
    (lora / "env_link.pth").symlink_to(private / ".env")
    return out


@pytest.fixture(scope="module")
def server(out):
    with running_server(out, "--lora_weight", ",".join(ADAPTERS), "--max_batch", "8", "--max_loras", "2",
                        "--allow_runtime_lora", "--max_request_bytes", str(LIMIT)) as s:
        yield s


class Solo:
    """Greedy replies of the plain model, each adapter loaded the usual way and switched with set_adapter."""

    def __init__(self, out):
        self.tok = Tokenizer()
        self.model = load_model(out / f"{BASE}.pth").eval()
        for name in ADAPTERS:
            load_lora(self.model, next((out / "lora").glob(f"{name}_64.*")), name)
        self.cache = {}

    def reply(self, model, question, n) -> str:
        key = (model, question, n)
        if key not in self.cache:
            set_adapter(self.model, None if model == BASE else model)
            ids = torch.tensor([self.tok.apply_chat_template([{"role": "user", "content": question}],
                                                             add_generation_prompt=True, tokenize=True)])
            new = self.model.generate(ids, n, eos_token_id=self.tok.eos_token_id)[0, ids.shape[1]:].tolist()
            new = new[:new.index(self.tok.eos_token_id)] if self.tok.eos_token_id in new else new
            self.cache[key] = self.tok.decode(new, skip_special_tokens=True)
        return self.cache[key]


@pytest.fixture(scope="module")
def solo(out):
    return Solo(out)


def body(model, question=QUESTIONS[0], n=8, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": n, "temperature": 0,
            **kw}


def chat(client: httpx.Client, request: dict) -> tuple:
    """(status, reply text or error message); a stream's error event counts with its code."""
    if not request.get("stream"):
        r = client.post("/v1/chat/completions", json=request)
        data = r.json()
        return (200, data["choices"][0]["message"]["content"]) if r.status_code == 200 else \
            (r.status_code, data["error"]["message"])
    with client.stream("POST", "/v1/chat/completions", json=request) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]["message"]
        text = []
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return event["error"].get("code", 500), event["error"]["message"]
            text += [c["delta"].get("content") or "" for c in event["choices"]]
        return 200, "".join(text)


def load(url, name, path) -> httpx.Response:
    return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=30)


def unload(url, name) -> None:
    httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


def drained(engine, timeout=15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if not s["running"] and not s["waiting"]:
            return True
        time.sleep(0.02)
    return False


def test_adapter_files_that_broke_the_engine_are_refused_and_serving_goes_on(server, out, solo):
    url, engine = server
    lora = out / "lora"
    for file, message in (("lora_head_64.pth", "lm_head is not a layer the bank serves"),
                          ("lora_mixed_64.pth", "rank 32 is above the bank's maximum 16")):
        r = load(url, "bad", lora / file)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    late = lora / "lora_late_64.pth"
    shutil.copy(lora / "lora_b_64.pth", late)
    assert load(url, "lora_late", late).status_code == 200
    truncate_config(late)  # broken on disk after it was accepted: read again at its first request
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            status, message = chat(c, body("lora_late"))
            assert status == 400 and f"{late}: the adapter's config is not valid JSON" in message
            assert chat(c, body(BASE)) == (200, solo.reply(BASE, QUESTIONS[0], 8))
            assert chat(c, body("lora_a", stream=True)) == (200, solo.reply("lora_a", QUESTIONS[0], 8))
            assert c.get("/health").status_code == 200
    finally:
        unload(url, "lora_late")


def test_top_p_zero_is_refused_and_a_tiny_temperature_is_greedy_beside_a_greedy_stream(server, solo):
    url, engine = server
    with httpx.Client(base_url=url, timeout=60) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, c, body("lora_a", QUESTIONS[1], 120, stream=True))
        deadline = time.time() + 10
        while not engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.005)
        status, message = chat(c, body("lora_b", QUESTIONS[2], 12, temperature=1.0, top_p=0))
        assert status == 400 and "'top_p' must be a number above 0 and at most 1" in message
        assert chat(c, body(BASE, QUESTIONS[2], 12, temperature=1e-40)) == (200, solo.reply(BASE, QUESTIONS[2], 12))
        assert chat(c, body("lora_b", QUESTIONS[0], 12, temperature=1.0, top_p=1e-9)) == \
            (200, solo.reply("lora_b", QUESTIONS[0], 12))
        assert long.result() == (200, solo.reply("lora_a", QUESTIONS[1], 120))


def test_runtime_loading_reads_only_under_the_lora_root_and_quotes_no_file(server, out):
    url, _ = server
    lora, private = out / "lora", out.parent / "private"
    outside = "is not inside the server's adapter folder; runtime loading reads only files under --lora_root"
    cases = [
        (private / ".env", outside),
        ("/etc/passwd", outside),
        (private / "missing.pth", outside),  # whether a file outside exists is not told
        ("../../private/.env", outside),     # relative paths are taken from the root, and may not climb out
        ("env_link.pth", outside),           # nor may a symlink in the root lead out
        ("secret.pth", "lora_path 'secret.pth': not a .pth adapter file (wrong format)"),
        (lora / "lora_cut_64.pth", "the adapter's config is not valid JSON"),
        (lora / "lora_alpha_64.pth", "the adapter's config has a wrong 'alpha'; expected a finite number"),
        ("missing_64.pth", "lora_path 'missing_64.pth': no such file under --lora_root"),
    ]
    messages = {}
    for path, expected in cases:
        r = load(url, "probe", path)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and expected in message and "\n" not in message, (path, r.text)
        assert "sk-live" not in r.text and "OPENAI" not in r.text and "root:" not in r.text, (path, r.text)
        messages[str(path)] = message.replace(repr(str(path)), "PATH")
    assert messages[str(private / ".env")] == messages[str(private / "missing.pth")] == messages["/etc/passwd"]
    assert "probe" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def test_two_registrations_of_one_name_at_once_one_is_refused(server, out):
    url, engine = server
    real_check = engine.bank.check
    engine.bank.check = lambda path: (time.sleep(0.5), real_check(path))[1]  # a slow disk widens the window
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(load, url, "lora_twice", out / "lora" / f) for f in ("lora_a_64.pth", "lora_b_64.pth")]
            replies = sorted((f.result() for f in futures), key=lambda r: r.status_code)
        assert [r.status_code for r in replies] == [200, 400]
        assert "adapter 'lora_twice' is being loaded by another request" in replies[1].json()["error"]["message"]
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids.count("lora_twice") == 1
    finally:
        engine.bank.check = real_check
        unload(url, "lora_twice")


def test_stop_strings_are_bounded_in_count_and_length(server, solo):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        status, message = chat(c, body(BASE, stop=["x" * 1025]))
        assert (status, message) == (400, "each 'stop' string may have at most 1024 characters; one has 1025")
        status, message = chat(c, body(BASE, stop=list("abcde")))
        assert status == 400 and "up to 4 non-empty strings" in message
        assert chat(c, body("lora_c", stop=["\u4e00" * 1024] * 4)) == (200, solo.reply("lora_c", QUESTIONS[0], 8))


def test_request_bodies_are_capped(server):
    url, _ = server
    too_large = f"the request body is larger than this server's limit of {LIMIT} bytes (--max_request_bytes)"
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=body(BASE, "x" * (LIMIT + 10)))
        assert r.status_code == 413 and r.json()["error"]["message"] == too_large
        chunks = (b" " * 8192 for _ in range(LIMIT // 8192 + 2))  # no Content-Length: counted as it arrives
        r = c.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"] == too_large
        r = c.post("/v1/chat/completions", content=b"[" * 50_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


@pytest.fixture(scope="module")
def one_slot(out):
    with running_server(out, "--lora_weight", "lora_a,lora_b", "--max_loras", "1", "--max_batch", "4",
                        "--max_seq_len", "4096", "--request_timeout", "1.5") as s:
        yield s


def test_with_one_slot_two_busy_adapters_every_request_finishes(one_slot, solo):
    url, engine = one_slot
    jobs = [(name, QUESTIONS[i % 3], n) for i, name in enumerate(["lora_a", "lora_b"] * 3) for n in (5, 7, 9)]

    def client(job_list):
        with httpx.Client(base_url=url, timeout=30) as c:
            return [chat(c, body(m, q, n)) for m, q, n in job_list]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(client, [jobs[i::6] for i in range(6)]))
    want = [[(200, solo.reply(m, q, n)) for m, q, n in jobs[i::6]] for i in range(6)]
    assert got == want
    assert drained(engine) and engine.stats()["resident"] in (["lora_a"], ["lora_b"])


def test_a_request_past_the_timeout_gets_408_and_frees_its_row(one_slot, solo):
    url, engine = one_slot
    with httpx.Client(base_url=url, timeout=30) as c:
        start = time.perf_counter()
        status, message = chat(c, body("lora_a", n=4000))
        assert (status, message) == (408, "the request did not finish within its timeout (1.5 s)")
        assert time.perf_counter() - start < 5
        assert drained(engine)
        assert chat(c, body("lora_b", n=6)) == (200, solo.reply("lora_b", QUESTIONS[0], 6))


def test_stress_valid_replies_equal_solo_while_hostile_clients_push(server, out, solo):
    url, engine = server
    lora, private = out / "lora", out.parent / "private"
    late = lora / "lora_late2_64.pth"
    shutil.copy(lora / "lora_a_64.pth", late)
    shutil.copy(lora / "lora_a_64.pth", lora / "lora_extra_64.pth")
    assert load(url, "lora_late2", late).status_code == 200
    truncate_config(late)
    jobs = []  # (kind, request, expected status); "valid" ones must equal the solo reply of request["model"]
    for model in (BASE, *ADAPTERS):
        for q in QUESTIONS:
            for n in (8, 14):
                jobs += [("valid", body(model, q, n), 200), ("valid", body(model, q, n, stream=True), 200)]
        jobs.append(("valid", body(model, QUESTIONS[1], temperature=1e-40), 200))
    jobs += [("valid", body("lora_b", QUESTIONS[2], stop=["never-there-" * 3]), 200)] * 2
    jobs += [("runtime adapter", body(f"lora_extra{i}", QUESTIONS[i % 3]), 200) for i in range(3)]
    jobs += [("top_p 0", body("lora_a", temperature=0.8, top_p=0), 400)] * 4
    jobs += [("huge stop", body(BASE, stop=["z" * 2000] * 4), 400)] * 3
    jobs += [("5 stops", body("lora_c", stop=list("vwxyz")), 400)] * 2
    jobs += [("oversized body", body("lora_b", "x" * (LIMIT + 1)), 413)] * 3
    jobs += [("oversized chunked body", None, 413)] * 2
    jobs += [("unknown model", body("lora_nope"), 404)] * 2
    jobs += [("adapter broken on disk", body("lora_late2", stream=True), 400)] * 4
    jobs += [("disconnect mid-stream", body("lora_c", QUESTIONS[1], 200, stream=True), 200)] * 4
    for path in (lora / "lora_head_64.pth", lora / "lora_mixed_64.pth", "secret.pth", private / ".env",
                 "../../private/.env", lora / "lora_cut_64.pth", "env_link.pth"):
        jobs.append(("bad adapter file", {"lora_name": "lora_hostile", "lora_path": str(path)}, 400))
    random.Random(0).shuffle(jobs)

    def run(job):
        kind, request, _ = job
        with httpx.Client(base_url=url, timeout=60) as c:
            if kind == "bad adapter file":
                r = c.post("/v1/load_lora_adapter", json=request)
                return r.status_code, r.json()["error"]["message"] if r.status_code != 200 else r.text
            if kind == "runtime adapter":  # loaded, used and unloaded while the others run
                r = c.post("/v1/load_lora_adapter", json={"lora_name": request["model"], "lora_path": "lora_extra_64.pth"})
                got = chat(c, request) if r.status_code == 200 else (r.status_code, r.text)
                c.post("/v1/unload_lora_adapter", json={"lora_name": request["model"]})
                return got
            if kind == "oversized chunked body":
                r = c.post("/v1/chat/completions", content=(b" " * 4096 for _ in range(LIMIT // 4096 + 2)))
                return r.status_code, r.json()["error"]["message"]
            if kind == "disconnect mid-stream":
                with c.stream("POST", "/v1/chat/completions", json=request) as r:
                    first = next(line for line in r.iter_lines() if line.startswith("data: "))
                    return r.status_code, first  # closing here leaves the server mid-stream
            return chat(c, request)

    health, finished = [], threading.Event()

    def poll_health():
        with httpx.Client(base_url=url, timeout=10) as c:
            while not finished.is_set():
                start = time.perf_counter()
                health.append((c.get("/health").status_code, time.perf_counter() - start))
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    start = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(run, jobs))
    finally:
        finished.set()
        poller.join(15)
        unload(url, "lora_late2")
    elapsed = time.perf_counter() - start

    def want(request):
        model = "lora_a" if request["model"].startswith("lora_extra") else request["model"]
        return 200, solo.reply(model, request["messages"][0]["content"], request["max_tokens"])

    valid = [(job, got) for job, got in zip(jobs, results) if job[0] in ("valid", "runtime adapter")]
    equal = sum(got == want(job[1]) for job, got in valid)
    others = collections.Counter(f"{job[0]}: {got[0]}" for job, got in zip(jobs, results)
                                 if job[0] not in ("valid", "runtime adapter"))
    print(f"\nstress: {len(jobs)} requests from 12 clients in {elapsed:.1f} s; {len(valid)} valid, {equal} equal to "
          f"their solo reply; the others by kind and status: {dict(sorted(others.items()))}; {len(health)} /health "
          f"polls, statuses {sorted({s for s, _ in health})}, slowest {1000 * max(t for _, t in health):.0f} ms")
    assert equal == len(valid)
    for job, got in zip(jobs, results):
        assert got[0] == job[2], (job[0], got)
    assert health and all(s == 200 for s, _ in health) and max(t for _, t in health) < 2.0
    assert drained(engine) and engine.alive() and len(engine.stats()["resident"]) <= 2
    assert set(engine.adapters) == set(ADAPTERS)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_answers_503_once_the_engine_thread_has_died(out):
    with running_server(out) as (url, engine):
        with httpx.Client(base_url=url, timeout=15) as c:
            assert c.get("/health").status_code == 200
            engine._admit = lambda dry=False: (_ for _ in ()).throw(RuntimeError("injected engine fault"))
            assert chat(c, body(BASE)) == (503, "the engine stopped: RuntimeError: injected engine fault")
            r = c.get("/health")
            assert r.status_code == 503
            assert r.json() == {"status": "error", "error": "the engine is not running (RuntimeError: injected engine fault)"}
            assert chat(c, body(BASE)) == (503, "the engine has stopped (RuntimeError: injected engine fault)")


def test_the_server_process_exits_with_code_1_when_its_engine_dies(out, tmp_path):
    # The real CLI, with a fault planted in the engine thread before main() runs.
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from model.engine import Engine; "
            "Engine._prefill = lambda self, req: (_ for _ in ()).throw(RuntimeError('injected engine fault')); "
            "from scripts.serve_openai_api import main; sys.exit(main(sys.argv[1:]))")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), "--save_dir", str(out), "--hidden_size", "64",
                             "--device", "cpu", "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ""})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        try:
            with httpx.Client(base_url=url, timeout=15) as c:
                assert chat(c, body(BASE)) == (503, "the engine stopped: RuntimeError: injected engine fault")
        except httpx.TransportError:
            pass  # the process may already be closing its socket
        assert proc.wait(30) == 1
        log = proc.stdout.read()
        assert "error: the engine thread stopped (RuntimeError: injected engine fault); the server has exited" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
