"""`slimlm serve` as users run it: a subprocess that prints the memory report and serves until Ctrl-C."""

from __future__ import annotations

import os
import socket

import httpx

from slimlm.cli import main
from slimlm.commands.serve import served_model_name
from tests.serve_process import start_serve, stop_serve


def test_served_model_name_defaults():
    assert served_model_name(None) == "smollm2-135m"
    assert served_model_name("SmolLM2") == "smollm2-135m"
    assert served_model_name("/models/Qwen2-0.5B.Q4_K_M.gguf") == "Qwen2-0.5B.Q4_K_M"
    assert served_model_name("/models/llama-3-8b/") == "llama-3-8b"


def test_bad_flags_fail_before_loading_the_model(capsys):
    assert main(["serve", "--max-concurrent-requests", "0"]) == 2
    assert "--max-concurrent-requests" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err


def test_serve_command_prints_memory_report_and_enforces_env_api_key():
    env = {**os.environ, "SLIMLM_API_KEY": "key-from-env"}
    args = ["--kv-cache-tokens", "256", "--dtype", "float32", "--threads", "1", "--log-level", "warning"]
    proc, url, lines = start_serve(args, env=env)
    try:
        assert url, f"the server did not start: {''.join(lines)}"
        assert any("KV pool" in line and "weights" in line for line in lines)  # the engine's memory report
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer key-from-env"}, timeout=10)
        assert models.json()["data"][0]["id"] == "smollm2-135m"
    finally:
        stop_serve(proc)
    assert proc.returncode == 0, "the server did not stop cleanly on SIGINT"
