"""``medusa-llama serve``: an OpenAI-compatible HTTP server (chat and text completions, streamed or whole)."""

from __future__ import annotations

import argparse
import importlib.util

from medusa_llama.cli.generate import add_decoder_args
from medusa_llama.cli.options import add_config_args, config_from_args
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, load_pipeline
from medusa_llama.serve.config import SERVE_ACCEPTANCE, ServeConfig

SERVE_INSTALL = "pip install fastapi uvicorn"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("server")
    add_config_args(group, ServeConfig, choices={"acceptance": SERVE_ACCEPTANCE})


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API, streamed or not) "
        "with Medusa tree decoding. Requests share the model: they wait in a queue and run one at a time.",
    )
    add_decoder_args(p)
    add_serve_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    cfg = config_from_args(ServeConfig, args)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MedusaError(f"medusa-llama serve needs fastapi and uvicorn: run `{SERVE_INSTALL}`")
    from medusa_llama.serve.app import create_app
    from medusa_llama.serve.engine import DecoderEngine
    from medusa_llama.serve.server import run_server

    pipe = load_pipeline(config_from_args(DecoderOptions, args))
    engine = DecoderEngine(pipe.decoder, cfg.served_model_name)
    run_server(create_app(engine, cfg), cfg.host, cfg.port)
    return 0
