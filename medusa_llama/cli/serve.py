"""``medusa-llama serve``: an OpenAI-compatible HTTP server (chat and text completions, streamed or whole)."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import replace

from medusa_llama.cli.generate import add_decoder_args
from medusa_llama.cli.options import add_config_args, config_from_args
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, Pipeline, load_pipeline, resolve_heads_dir
from medusa_llama.serve.config import SERVE_ACCEPTANCE, ServeConfig
from medusa_llama.serve.trees import serve_tree, table_path

SERVE_INSTALL = "pip install fastapi uvicorn"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("server")
    add_config_args(group, ServeConfig, choices={"acceptance": SERVE_ACCEPTANCE})


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API, streamed or not) "
        "with Medusa tree decoding. Requests share the model: they wait in a queue and run one at a time, or "
        "--batch-size at a time with one verify forward for all.",
    )
    add_decoder_args(p)
    add_serve_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    cfg = config_from_args(ServeConfig, args)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MedusaError(f"medusa-llama serve needs fastapi and uvicorn: run `{SERVE_INSTALL}`")
    from medusa_llama.serve.app import create_app
    from medusa_llama.serve.server import run_server

    options = config_from_args(DecoderOptions, args)
    pipe = load_pipeline(options)
    if cfg.tree_table is None and pipe.heads is not None:  # default: the table saved beside the heads, if any
        found = table_path(resolve_heads_dir(pipe.options.heads, pipe.options.model))
        cfg = replace(cfg, tree_table=str(found) if found else None)
    run_server(create_app(make_engine(pipe, cfg), cfg), cfg.host, cfg.port)
    return 0


def make_engine(pipe: Pipeline, cfg: ServeConfig):
    """The engine the scheduler drives: the pipeline's decoder one sequence at a time, or a batched decoder of
    ``cfg.batch_size`` rows over the same backbone and heads. The tree is ``--tree`` when given, else the entry of
    ``cfg.tree_table`` for this batch size and device type (an empty one: vanilla decoding), else the pipeline's."""
    from medusa_llama.decode.backbone import FastBackbone
    from medusa_llama.decode.batch import BatchedDecoder
    from medusa_llama.decode.tree import Tree
    from medusa_llama.serve.engine import BatchedEngine, DecoderEngine

    heads, tree = serve_tree(pipe, cfg)
    if cfg.batch_size == 1:
        if heads is pipe.heads and tree is pipe.tree:
            decoder = pipe.decoder
        else:
            decoder = pipe.vanilla() if heads is None else pipe.with_tree(tree).decoder
        return DecoderEngine(decoder, cfg.served_model_name)
    if tree is not None and not isinstance(tree, Tree):
        raise MedusaError("--batch-size > 1 takes a static tree (dynamic trees decode one sequence at a time)")
    if not isinstance(pipe.backbone, FastBackbone):
        raise MedusaError("--batch-size > 1 needs the fast backbone (--backend fast)")
    decoder = BatchedDecoder(pipe.backbone, cfg.batch_size, heads, tree, draft_vocab=pipe.options.draft_vocab)
    return BatchedEngine(decoder, cfg.served_model_name)
