"""Serve a base model and its LoRA adapters over OpenAI's chat-completions API, with vLLM's LoRA conventions.

python scripts/serve_openai_api.py --lora_weight lora_identity,lora_medical      # http://127.0.0.1:8998
curl http://127.0.0.1:8998/v1/chat/completions -H 'Content-Type: application/json' \\
     -d '{"model": "lora_identity", "messages": [{"role": "user", "content": "你是谁？"}]}'

The request's `model` names the base (`GET /v1/models` lists it first) or an adapter; one engine batches all
requests continuously, each row with its own adapter (model/engine.py). `GET /` is a chat page. Runtime
adapter loading (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`) reads files named by the client,
so it is off unless --allow_runtime_lora, and then reads only under --lora_root; --api_key makes every /v1
endpoint ask for `Authorization: Bearer`.

No client can break the server for others: bodies are capped (--max_request_bytes), sampling parameters that
cannot work are refused (top_p must be above 0; a temperature below 1e-5 is greedy), stop strings are bounded,
each request has a timeout (--request_timeout), and a request whose generation fails gets its own error while the
batch goes on. If the engine thread ever dies, /health answers 503 and the process exits with code 1.
"""
import argparse
import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runs from any directory
    sys.path.insert(0, str(REPO_ROOT))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402

import eval_llm  # noqa: E402
from model.engine import Engine, EngineError  # noqa: E402
from model.engine import Request as GenRequest  # noqa: E402
from model.model_lora import LoRAError, default_adapter_name, find_adapter  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.trainer_utils import HelpFormatter  # noqa: E402

PAGE = Path(__file__).resolve().parent / "chat_page.html"
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI allows up to 4 stop strings
MAX_STOP_CHARS = 1024  # per stop string: longer ones only cost time, a reply rarely holds one
MAX_REQUEST_BYTES = 1 << 20  # a prompt fits max_seq_len tokens, far below this
ADAPTER_SUFFIXES = (".pth", ".safetensors")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    eval_llm.add_base_args(a)  # --save_dir --hidden_size --device --dtype and the architecture flags, as eval_llm.py
    a("--weight", default="full_sft", help="base weights: a name ({save_dir}/{weight}_{hidden_size}.pth) or a path")
    a("--lora_weight", default="", help="comma-separated adapters to serve: names ({save_dir}/lora/{name}_{h}.pth) "
                                        "or paths; each is served under its name (file name minus _{h})")
    a("--served_model_name", default=None, help="the base's model name in the API (default: the weight file's stem)")
    a("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (then set --api_key)")
    a("--port", type=int, default=8998, help="the port to listen on")
    a("--max_batch", type=int, default=16, help="requests decoded together; more wait in a queue")
    a("--max_seq_len", type=int, default=1024, help="prompt plus reply, in tokens")
    a("--max_loras", type=int, default=8, help="adapters resident at once; more can be registered")
    a("--max_lora_rank", type=int, default=16, help="the largest adapter rank the server accepts")
    a("--allow_runtime_lora", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    a("--lora_root", default=None, help="runtime loading reads adapters only inside this folder, symlinks resolved; "
                                        "a relative lora_path is taken from it (default: {save_dir}/lora)")
    a("--max_request_bytes", type=int, default=MAX_REQUEST_BYTES, help="larger request bodies are refused (413)")
    a("--request_timeout", type=float, default=600.0, help="seconds a request may wait and generate before it is "
                                                            "ended with an error (408) and its row freed; 0: no limit")
    a("--api_key", default=None, help="require `Authorization: Bearer KEY` on every /v1 endpoint")
    a("--compile", action="store_true", help="decode with a static KV cache and a torch.compile'd step, compiled "
      "for every batch bucket before serving (cached in {save_dir}/compile_cache for the next start)")
    args = p.parse_args(argv)
    for flag in ("max_batch", "max_seq_len", "max_loras", "max_lora_rank", "max_request_bytes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if not args.request_timeout >= 0:
        p.error("--request_timeout must be 0 (no limit) or more seconds")
    args.lora_root = args.lora_root or str(Path(args.save_dir) / "lora")
    return args


class APIError(Exception):
    """Answered as OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 500: "server_error",
             503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                                       "param": self.param, "code": self.code}}, status_code=self.status)


def build_engine(args) -> tuple:
    """(engine, base model name): the base loaded as eval_llm.py loads it, every --lora_weight registered."""
    tok = Tokenizer()
    model = eval_llm.load_base(args, tok, args.weight)
    engine = Engine(model, tok, args.max_batch, args.max_seq_len, args.max_loras, args.max_lora_rank, args.compile,
                    request_timeout=args.request_timeout or None)
    for spec in eval_llm.split_list(args.lora_weight):
        path = find_adapter(spec, model.config.hidden_size, args.save_dir)
        engine.register(default_adapter_name(path, model), path)
    if args.compile:
        eval_llm.keep_compile_cache(args.save_dir)
        start = time.perf_counter()
        engine.warmup()
        eval_llm.log(f"compiled the decode step for batch sizes {engine.buckets} in {time.perf_counter() - start:.1f} s")
    return engine, args.served_model_name or model.weight_name


# ---- request parsing: one clear message per bad field

def _number(body, key, lo, hi, default, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {what} from {lo} to {hi}, got {json.dumps(value)}", key)
    return value


def _content(message, i) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(t, str) for t in parts):
            return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body, names, tok, max_seq_len) -> dict:
    """Check a chat-completions body; returns the fields the engine needs."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the base's name or an adapter's (GET /v1/models lists them)", "model")
    if model not in names:
        raise APIError(404, f"the model {model!r} does not exist; this server has: {', '.join(names)}", "model",
                       "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role out of {', '.join(ROLES)}", "messages")
        chat.append({"role": m["role"], "content": _content(m, i)})
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    stream = body.get("stream") or False  # null is "not set", as in OpenAI's API
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise APIError(400, f"each 'stop' string may have at most {MAX_STOP_CHARS} characters; one has {longest}",
                       "stop")
    stop_ids = body.get("stop_token_ids") or []  # vLLM's extra parameter: token ids that end the reply too
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    if len(prompt) >= max_seq_len:
        raise APIError(400, f"the prompt is {len(prompt)} tokens, but this server's max_seq_len is {max_seq_len} "
                            f"(prompt and reply together); shorten the messages", "messages", "context_length_exceeded")
    room = max_seq_len - len(prompt)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, 2 ** 31, room, integer=True)
    if max_tokens > room:
        raise APIError(400, f"'{key}' is {max_tokens}, but the prompt has {len(prompt)} tokens and max_seq_len is "
                            f"{max_seq_len}: at most {room} are left for the reply", key, "context_length_exceeded")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise APIError(400, f"'top_p' must be a number above 0 and at most 1 (0 would keep no token; temperature 0 is "
                            f"greedy), got {json.dumps(top_p)}", "top_p")
    return {"model": model, "stream": stream, "include_usage": bool(options.get("include_usage")),
            "prompt": prompt, "max_tokens": max_tokens, "stop": tuple(stop), "stop_token_ids": tuple(stop_ids),
            "temperature": _number(body, "temperature", 0, 2, 1.0), "top_p": 1.0 if top_p is None else top_p,
            "seed": _number(body, "seed", -2 ** 63, 2 ** 63 - 1, None, integer=True)}


def runtime_adapter_path(lora_path: str, root) -> Path:
    """The adapter file or PEFT folder a runtime load names, resolved (symlinks too) inside `root`; APIError(400)
    otherwise. Refusals say nothing of what lies outside the root, nor of any file's contents."""
    shown = repr(lora_path if len(lora_path) <= 200 else lora_path[:200] + "...")
    outside = APIError(400, f"lora_path {shown} is not inside the server's adapter folder; runtime loading reads only "
                            f"files under --lora_root (a relative lora_path is taken from there)", "lora_path")
    try:
        root = Path(root).resolve()
        path = (root / lora_path).resolve()  # an absolute lora_path replaces root, then must lie under it
        if not path.is_relative_to(root):
            raise outside
        if path.is_dir():  # a PEFT folder: the files in it must not lead out of the root either
            inner = [path / name for name in PEFT_FILES]
            if any((f.is_symlink() or f.exists()) and not f.resolve().is_relative_to(root) for f in inner):
                raise outside
            return path
        if not path.is_file():
            raise APIError(400, f"lora_path {shown}: no such file under --lora_root", "lora_path")
        if path.suffix not in ADAPTER_SUFFIXES:
            raise APIError(400, f"lora_path {shown}: an adapter is a {' or '.join(ADAPTER_SUFFIXES)} file or a PEFT "
                                f"adapter folder", "lora_path")
        with open(path, "rb") as f:
            head = f.read(9)
    except (OSError, ValueError, RuntimeError) as e:  # unreadable, a NUL in the path, a symlink loop
        raise APIError(400, f"lora_path {shown}: cannot be read ({type(e).__name__})", "lora_path") from None
    # torch.save writes a zip archive (or, before 1.6, a pickle with torch's magic number); safetensors begins
    # with the length of its JSON header. Checked here so that no loader's message ever quotes a foreign file.
    if path.suffix == ".pth":
        fits = head.startswith((b"PK\x03\x04", b"\x80\x02\x8a\x0a"))
    else:
        fits = len(head) == 9 and head[8:9] == b"{"
    if not fits:
        raise APIError(400, f"lora_path {shown}: not a {path.suffix} adapter file (wrong format)", "lora_path")
    return path


def create_app(engine: Engine, base_name: str, api_key=None, allow_runtime_lora: bool = False,
               lora_root=REPO_ROOT / "out" / "lora", max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="MiniMind LoRA server", docs_url=None, redoc_url=None)
    app.state.engine, app.state.base_name = engine, base_name
    created = int(time.time())
    page_html = PAGE.read_text(encoding="utf-8")  # read once: a missing page fails at start, not per request

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
                return APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`").response()
        return await call_next(request)

    def names() -> list:
        return [base_name] + list(engine.adapters)

    async def read_json(request: Request):
        too_large = APIError(413, f"the request body is larger than this server's limit of {max_request_bytes} bytes "
                                  f"(--max_request_bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no length to check
            body += chunk
            if len(body) > max_request_bytes:
                raise too_large
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})")
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON (nested too deeply)")

    @app.get("/health")
    async def health():
        if not engine.alive():  # a dead engine answers no request: say so, so that a supervisor restarts us
            return JSONResponse({"status": "error", "error": f"the engine is not running ({engine.failure})"},
                                status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.get("/v1/models")
    async def models():
        def card(name, parent, root):
            return {"id": name, "object": "model", "created": created, "owned_by": "minimind", "root": root,
                    "parent": parent}
        data = [card(base_name, None, base_name)]
        data += [card(n, base_name, str(p)) for n, p in list(engine.adapters.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        if not allow_runtime_lora:
            raise APIError(403, "runtime adapter loading is off; start the server with --allow_runtime_lora")
        body = await read_json(request)
        name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise APIError(400, "send {\"lora_name\": ..., \"lora_path\": ...}")
        if name == base_name:
            raise APIError(400, f"{name!r} is the base model's name; pick another lora_name", "lora_name")
        if len(name) > 256 or not name.isprintable():
            raise APIError(400, "lora_name must be at most 256 printable characters", "lora_name")
        try:
            await asyncio.to_thread(engine.register, name, runtime_adapter_path(path, lora_root))
        except (EngineError, LoRAError) as e:
            raise APIError(400, str(e), "lora_path")
        except APIError:
            raise
        except Exception as e:  # never a 500 for a file: the loaders' own errors are LoRAError, this is a backstop
            raise APIError(400, f"{name!r} could not be loaded ({type(e).__name__})", "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        if not allow_runtime_lora:
            raise APIError(403, "runtime adapter loading is off; start the server with --allow_runtime_lora")
        body = await read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "send {\"lora_name\": ...}")
        try:
            engine.unregister(name)
        except EngineError as e:
            raise APIError(404, f"{e}; loaded: {', '.join(engine.adapters) or 'none'}", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        spec = parse_chat(await read_json(request), names(), engine.tok, engine.max_seq_len)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = GenRequest(spec["prompt"], None if spec["model"] == base_name else spec["model"], spec["max_tokens"],
                         spec["temperature"], spec["top_p"], spec["seed"], spec["stop"], spec["stop_token_ids"],
                         emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            engine.submit(req)
        except EngineError as e:  # e.g. the adapter was unloaded a moment ago, or the engine has stopped
            raise APIError(e.status, str(e))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": spec["model"]}
        first = await next_event(request, req, events)
        if "error" in first:  # nothing sent yet: a plain HTTP error
            raise APIError(first.get("status", 500), first["error"])
        if spec["stream"]:
            return StreamingResponse(stream(request, req, events, first, head, spec["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, event = [], first
        while "delta" in event:
            text.append(event["delta"])
            event = await next_event(request, req, events)
        if "error" in event:
            raise APIError(event.get("status", 500), event["error"])
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": event["finish_reason"]}],
                "usage": usage(event)}

    async def next_event(request: Request, req, events: asyncio.Queue) -> dict:
        """The engine's next event for this request; cancels it if the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if not engine.alive() and events.empty():  # it ended without a word for this request
                    return {"error": f"the engine is not running ({engine.failure})", "status": 503}
                if await request.is_disconnected():
                    engine.cancel(req)
                    raise asyncio.CancelledError

    async def stream(request, req, events, event, head, include_usage):
        def chunk(delta, finish=None, **extra):
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            if include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while "delta" in event:
                yield chunk({"content": event["delta"]})
                event = await next_event(request, req, events)
            if "error" in event:  # after the first chunk an error can only travel in the stream
                status = event.get("status", 500)
                error = {"message": event["error"], "type": APIError.TYPES.get(status, "error"), "code": status}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                yield chunk({}, event["finish_reason"])
                if include_usage:
                    yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage(event)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(req)  # a no-op when finished; frees the row when the client went away mid-stream

    return app


def usage(event: dict) -> dict:
    return {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
            "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}


class EngineDied(RuntimeError):
    """The engine thread ended on its own; the process exits with code 1 so that a supervisor restarts it."""


def run(argv=None) -> None:
    args = parse_args(argv)
    engine, base_name = build_engine(args)
    import uvicorn
    app = create_app(engine.start(), base_name, args.api_key, args.allow_runtime_lora, args.lora_root,
                     args.max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    def stop_when_the_engine_ends():  # no request could be answered any more: stop serving, as vLLM does
        engine.done.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_the_engine_ends, name="engine-watch", daemon=True).start()
    eval_llm.log(f"serving {base_name} and {len(engine.adapters)} adapter(s) on http://{args.host}:{args.port} "
                 f"(max_batch {args.max_batch}, max_loras {args.max_loras}, max_seq_len {args.max_seq_len})")
    try:
        server.run()
    finally:
        engine.stop()
    if engine.failure is not None:
        raise EngineDied(f"the engine thread stopped ({engine.failure}); the server has exited")


def main(argv=None) -> int:
    """Exit code 0; 2 after one `error: ...` line for bad flags or files; 1 if the engine thread died."""
    try:
        return eval_llm.run_main(run, argv)
    except EngineDied as e:
        eval_llm.log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
