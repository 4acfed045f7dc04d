"""The server's options (``medusa-llama serve`` derives its flags from them). Importing this needs no web stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

SERVE_ACCEPTANCE = ("auto", "typical")


@dataclass
class ServeConfig:
    """How the server answers: where it listens, under which name, and the defaults of a request."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; the server has no authentication)."""
    port: int = 8000
    """TCP port to listen on."""
    served_model_name: str | None = None
    """The model id clients send and /v1/models lists (default: the model's name)."""
    max_tokens: int = 256
    """Token budget of a request that gives none (cut to what fits in the context)."""
    temperature: float = 0.0
    """Temperature of a request that gives none (0: greedy)."""
    acceptance: str = "auto"
    """Acceptance rule of sampled requests: auto (lossless rejection sampling) or typical (Medusa's typical
    acceptance, faster but NOT lossless). Greedy requests always use greedy acceptance, which is lossless."""
    stream_interval: float = 0.02
    """Least seconds between two streamed chunks: text accepted meanwhile goes out together (0: a chunk per decode
    step). Each chunk costs the decoding thread a few hundred microseconds on the CPU."""
    max_waiting: int = 64
    """Requests allowed to wait for the model; more are answered 429."""
    batch_size: int = 1
    """Sequences decoded together, one verify forward for all (continuous batching: a finished sequence's row is
    refilled between steps). 1: one sequence at a time. Greedy output is the same at every batch size (fp32)."""
    tree_table: str | None = None
    """Trees per batch size, used when --tree is not given: a JSON file written by benchmarks/batch_throughput.py
    --write-serve-trees (default: serve_trees.json beside the heads). The entry of the largest batch size <=
    --batch-size for this device type is served; an empty tree there means vanilla decoding."""

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.served_model_name == "":
            raise ValueError("--served-model-name must not be empty")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.acceptance not in SERVE_ACCEPTANCE:
            raise ValueError(f"--acceptance must be one of {SERVE_ACCEPTANCE}, got {self.acceptance!r}")
        if not (math.isfinite(self.stream_interval) and self.stream_interval >= 0):
            raise ValueError(f"--stream-interval must be a finite number >= 0, got {self.stream_interval}")
        if self.max_waiting < 1:
            raise ValueError(f"--max-waiting must be >= 1, got {self.max_waiting}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tree_table == "":
            raise ValueError("--tree-table must name a JSON file")
