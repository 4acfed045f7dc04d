"""medusa-llama: lossless Medusa speculative decoding with tree attention.

Layout (one responsibility per module):
  loading.py     backbone loading (HF id, local dir, or the embedded SmolLM2 GGUF, converted once)
  model.py       a compact fast Llama-family decoder with a static KV cache and tree attention
  backbone.py    the decoding-backbone interface: the fast model or the HF fallback
  heads.py       Medusa heads (parallel "medusa" and "sequential"), safetensors save/load
  tree.py        medusa_choices trees: validation, built-in trees, buffers
  acceptance.py  greedy (lossless), typical (lossy) and speculative-sampling (lossless) acceptance
  decoding.py    the vanilla and Medusa decoders
  data.py, train.py        data preparation and Medusa-1 / Medusa-2 (QLoRA) training
  bench.py, tree_opt.py    evaluation and the hardware-aware tree optimizer
  cli.py         the `medusa-llama` command
"""

from medusa_llama.errors import MedusaError

__all__ = ["MedusaError"]
__version__ = "0.1.0"
