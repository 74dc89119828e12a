"""Helpers for the server's tests: a tiny base with adapters on disk, and the real app on a free loopback port."""
import contextlib
import socket
import threading
import time
from pathlib import Path

import uvicorn

from model.checkpoint import save_model
from scripts.serve_openai_api import build_engine, create_app, parse_args
from tests.conftest import random_adapter, varied_model

BASE = "full_sft_64"


def make_out(root: Path) -> Path:
    """{root}/out/full_sft_64.pth with adapters lora_a, lora_b (rank 4) and lora_c (rank 8, rsLoRA) in out/lora/,
    and lora_other_64.pth, made for a 3-layer base."""
    out = Path(root) / "out"
    save_model(varied_model(0), out / f"{BASE}.pth")
    model = varied_model(0)
    random_adapter(model, "lora_a", out / "lora" / "lora_a_64.pth")
    random_adapter(model, "lora_b", out / "lora" / "lora_b_64.pth", target_modules="all-linear")
    random_adapter(model, "lora_c", out / "lora" / "lora_c_64.safetensors", rank=8, use_rslora=True)
    random_adapter(varied_model(1, layers=3), "lora_other", out / "lora" / "lora_other_64.pth")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(out: Path, *flags: str):
    """Start scripts/serve_openai_api.py's app in this process (uvicorn in a thread) with these flags;
    yields (base_url, engine). The base is full_sft_64 in `out`."""
    args = parse_args(["--save_dir", str(out), "--hidden_size", "64", "--device", "cpu", *flags])
    engine, base_name = build_engine(args)
    app = create_app(engine.start(), base_name, args.api_key, args.allow_runtime_lora, args.lora_root,
                     args.max_request_bytes)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
