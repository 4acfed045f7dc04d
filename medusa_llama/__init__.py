"""medusa-llama: lossless Medusa speculative decoding with tree attention.

Layout (each folder a layer; ``decode`` imports from none of the others):
  decode/    model.py (fast Llama-family forward, static KV cache, tree attention), backbone.py (one interface over
             the fast model and the HF fallback), heads.py (Medusa heads), tree.py (medusa_choices trees),
             acceptance.py (greedy / typical / rejection sampling), decoder.py (vanilla and Medusa decoders)
  train/     sources.py, prepare.py (datasets), objective.py (losses), loop.py (training), checkpoint.py
  eval/      prompts.py, bench.py, report.py, head_accuracy.py, tree_opt.py
  cli/       the ``medusa-llama`` command, one module per group of subcommands
  loading.py model and tokenizer loading (HF id, local dir, or the embedded SmolLM2 GGUF, converted once)
  pipeline.py  the one assembly path from user options to a decoder
"""

from medusa_llama.errors import MedusaError

__all__ = ["MedusaError"]
__version__ = "0.1.0"
