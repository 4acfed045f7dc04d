"""The two Medusa-head formats other engines read, mapped to and from our ``medusa`` kind with own LM heads.

Both hold the paper's heads (Cai et al., 2024, Sec. 2.1.1): head k is ``L`` residual blocks ``x + SiLU(W x + b)``
on h_t, then its own vocab projection. Our ``medusa`` ``ResBlock`` computes exactly that, so the mapping is a
renaming of tensors. Neither format can hold ``sequential`` heads (they also read the previous path token) nor
heads with prefix attention, with or without its token input (those engines have no prefix layer).

FasterDecoding/Medusa (the reference code; TensorRT-LLM's ``convert_checkpoint.py --medusa_model_dir`` and
``load_medusa_hf`` read it), checked against ``medusa/model/medusa_model.py`` and ``medusa/train/train_legacy.py``:
  ``config.json``: ``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path`` (``hidden_size`` and
  ``vocab_size`` only in some files: otherwise read from the tensors).
  ``medusa_lm_head.safetensors`` (or ``medusa_lm_head.pt``): the state dict of
  ``ModuleList(Sequential(ResBlock x L, Linear(D, V, bias=False)) x K)``:
  ``{h}.{l}.linear.weight`` (D, D), ``{h}.{l}.linear.bias`` (D,) for l < L, and ``{h}.{L}.weight`` (V, D).
  The reference builds the L blocks as ``[ResBlock(h)] * L`` (one module repeated), so its files hold L equal
  copies; we load them into L separate blocks, which computes the same.

vLLM (``vllm/model_executor/models/medusa.py``, ``vllm/transformers_utils/configs/medusa.py``):
  ``config.json``: ``model_type: "medusa"``, ``num_heads``, ``num_hidden_layers``, ``hidden_size``,
  ``vocab_size``, ``truncated_vocab_size`` (null or = vocab), ``medusa_fc_bias`` (without ``true`` vLLM builds
  the blocks without biases and silently drops the ones in the file). Its ``from_pretrained`` renames every key
  holding "num" and "heads" to ``num_heads`` (and "num" + "layers" to ``num_hidden_layers``): no other such key.
  ``*.safetensors``: ``blocks.{h}.layers.{l}.weight`` (D, D), ``blocks.{h}.layers.{l}.bias`` (D,),
  ``lm_heads.{h}.weight`` (V, D); optional ``original_lm_head: true`` shares ``lm_heads.0.weight`` by all heads.
"""

from __future__ import annotations

import re

import torch

from medusa_llama.decode.heads import HeadsConfig
from medusa_llama.errors import MedusaError

OURS = "medusa-llama"
FASTER_DECODING = "medusa"  # the CLI's name: the reference Medusa repository's format
VLLM = "vllm"
EXPORT_FORMATS = (VLLM, FASTER_DECODING)

FD_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")  # the reference reads .pt, its trainer writes both
VLLM_WEIGHTS = "model.safetensors"

_FD_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")
_VLLM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")

State = dict[str, torch.Tensor]


def detect_format(raw: dict) -> str:
    """Which format a heads ``config.json`` belongs to."""
    if "medusa_num_heads" in raw:
        return FASTER_DECODING
    if raw.get("model_type") == "medusa" and "num_heads" in raw:
        return VLLM
    return OURS


# -- import --------------------------------------------------------------------------------------------------------
def from_faster_decoding(raw: dict, state: State) -> tuple[HeadsConfig, State]:
    """FasterDecoding config + tensors -> our config + state dict (``medusa`` kind, own LM heads)."""
    num_layers = int(raw.get("medusa_num_layers", 1))  # the reference's default
    lm0 = state.get(f"0.{num_layers}.weight")
    if lm0 is None or lm0.dim() != 2:
        raise MedusaError(
            f"FasterDecoding heads hold no LM head '0.{num_layers}.weight' (medusa_num_layers={num_layers})"
        )
    config = HeadsConfig(
        num_heads=int(raw["medusa_num_heads"]),
        num_layers=num_layers,
        hidden_size=int(raw.get("hidden_size") or lm0.shape[1]),
        vocab_size=int(raw.get("vocab_size") or lm0.shape[0]),
        kind="medusa",
        lm_head="own",
        base_model=raw.get("base_model_name_or_path") or "",
    )
    ours = {}
    for key, tensor in state.items():
        m = _FD_KEY.fullmatch(key)
        if m is None:
            ours[key] = tensor  # reported as unexpected by the caller's load_state_dict
        elif m[3] == "weight" and int(m[2]) == num_layers:
            ours[f"lm_heads.{m[1]}.weight"] = tensor
        else:
            ours[f"blocks.{m[1]}.{m[2]}.{m[3]}"] = tensor
    return config, ours


def from_vllm(raw: dict, state: State) -> tuple[HeadsConfig, State]:
    """vLLM config + tensors -> our config + state dict, computing what vLLM computes from the same directory."""
    state = {k.removeprefix("medusa_heads."): v for k, v in state.items()}  # vLLM strips this prefix too
    lm0 = state.get("lm_heads.0.weight")
    if lm0 is None or lm0.dim() != 2:
        raise MedusaError("vLLM heads hold no LM head 'lm_heads.0.weight'")
    vocab, hidden = int(raw.get("vocab_size") or lm0.shape[0]), int(raw.get("hidden_size") or lm0.shape[1])
    if raw.get("truncated_vocab_size") not in (None, vocab) or "token_map" in state:
        raise MedusaError("vLLM heads with a truncated vocabulary (token_map) cannot be loaded here")
    num_heads, num_layers = int(raw["num_heads"]), int(raw.get("num_hidden_layers", 1))
    config = HeadsConfig(
        num_heads=num_heads,
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        kind="medusa",
        lm_head="own",
        base_model=raw.get("base_model_name_or_path") or "",
    )
    with_bias = bool(raw.get("medusa_fc_bias", False))
    ours = {}
    for key, tensor in state.items():
        m = _VLLM_BLOCK_KEY.fullmatch(key)
        if m is None:
            ours[key] = tensor
        elif m[3] == "weight" or with_bias:  # vLLM drops the biases unless medusa_fc_bias is true
            ours[f"blocks.{m[1]}.{m[2]}.linear.{m[3]}"] = tensor
    for h in range(num_heads):
        if raw.get("original_lm_head", False):  # one LM head for all: vLLM loads lm_heads.0 only
            ours[f"lm_heads.{h}.weight"] = lm0
        for layer in range(num_layers):
            ours.setdefault(f"blocks.{h}.{layer}.linear.bias", lm0.new_zeros(hidden))  # no bias == zero bias
    return config, ours


# -- export --------------------------------------------------------------------------------------------------------
def check_exportable(config: HeadsConfig, fmt: str) -> None:
    """Raise ``MedusaError`` if heads of this config cannot be written in ``fmt``."""
    if fmt not in EXPORT_FORMATS:
        raise MedusaError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if config.kind != "medusa":
        raise MedusaError(
            f"{config.kind} heads cannot be exported to the {fmt} format: its heads read only the hidden state, "
            "while sequential heads also read the embedding of the previous token on the path (ours only)"
        )
    if config.prefix_token_input:
        raise MedusaError(
            f"heads with the prefix token input (EAGLE-style) cannot be exported to the {fmt} format: it has no prefix "
            "layer (ours only)"
        )
    if config.prefix_attention:
        raise MedusaError(
            f"heads with prefix attention cannot be exported to the {fmt} format: it has no prefix layer (ours only)"
        )


def lm_head_weights(heads, base_lm_weight: torch.Tensor | None) -> list[torch.Tensor]:
    """K (V, D) vocab projections: the heads' own, or copies of the base model's for a shared LM head."""
    c = heads.config
    if heads.lm_heads is not None:
        return [lin.weight.detach() for lin in heads.lm_heads]
    if base_lm_weight is None:
        raise MedusaError("these heads share the base model's LM head: the base model (--model) is needed to export")
    if tuple(base_lm_weight.shape) != (c.vocab_size, c.hidden_size):
        raise MedusaError(
            f"the base LM head is {tuple(base_lm_weight.shape)}, the heads need ({c.vocab_size}, {c.hidden_size})"
        )
    return [base_lm_weight.detach() for _ in range(c.num_heads)]


def _tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous().clone()  # own storage: safetensors refuses shared tensors


def _export_state(heads, base_lm_weight: torch.Tensor | None, block: str, lm_head: str) -> State:
    """Our ``medusa`` heads' tensors under a format's names: ``block`` (with ``{h}`` and ``{layer}``) prefixes each
    ResBlock's ``weight`` / ``bias``, ``lm_head`` (with ``{h}``) names each head's vocabulary projection."""
    dtype = next(heads.parameters()).dtype
    state = {}
    for h, lm in enumerate(lm_head_weights(heads, base_lm_weight)):
        for layer, res_block in enumerate(heads.blocks[h]):
            prefix = block.format(h=h, layer=layer)
            state[prefix + "weight"] = _tensor(res_block.linear.weight, dtype)
            state[prefix + "bias"] = _tensor(res_block.linear.bias, dtype)
        state[lm_head.format(h=h)] = _tensor(lm, dtype)
    return state


def to_faster_decoding(heads, base_lm_weight: torch.Tensor | None = None) -> tuple[dict, State]:
    """Our ``medusa`` heads -> FasterDecoding ``config.json`` dict + ``medusa_lm_head`` tensors."""
    c = heads.config
    check_exportable(c, FASTER_DECODING)
    state = _export_state(heads, base_lm_weight, "{h}.{layer}.linear.", f"{{h}}.{c.num_layers}.weight")
    raw = {
        "medusa_num_heads": c.num_heads,
        "medusa_num_layers": c.num_layers,
        "base_model_name_or_path": c.base_model,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
    }
    return raw, state


def to_vllm(heads, base_lm_weight: torch.Tensor | None = None) -> tuple[dict, State]:
    """Our ``medusa`` heads -> vLLM ``config.json`` dict + tensors."""
    c = heads.config
    check_exportable(c, VLLM)
    state = _export_state(heads, base_lm_weight, "blocks.{h}.layers.{layer}.", "lm_heads.{h}.weight")
    raw = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "truncated_vocab_size": c.vocab_size,
        "medusa_fc_bias": True,
        "base_model_name_or_path": c.base_model,
    }
    return raw, state
