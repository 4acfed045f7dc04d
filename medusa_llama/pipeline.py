"""The one assembly path from user options to a decoder: ``DecoderOptions`` -> ``load_pipeline`` -> ``Pipeline``.

Every decoding command (``generate``, ``bench``, ``heads-accuracy``, ``tree``, ``decode_tree.py``) takes the options
of ``DecoderOptions`` and calls ``load_pipeline``. Files are read and checked before the model loads: the heads
(safetensors, or a ``.pt`` state dict read with ``weights_only=True``: never unpickled), then the tree, fitted to
the heads by ``fit_tree``, and the adapter is resolved (``--adapter``: a shipped name or a directory; else one beside
the heads, if any). Then the backbone loads, that LoRA adapter merged in, and the decoder checks that the heads were
made for it.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from medusa_llama.decode.backbone import BACKENDS, Backbone, make_backbone
from medusa_llama.decode.decoder import MedusaDecoder, VanillaDecoder
from medusa_llama.decode.dynamic_tree import DynamicTree, StepTree, parse_dynamic
from medusa_llama.decode.heads import WEIGHTS_NAME, MedusaHeads
from medusa_llama.decode.heads_io import load_heads
from medusa_llama.decode.tree import DEFAULT_TREE, Tree, build_tree, load_choices
from medusa_llama.errors import MedusaError
from medusa_llama.loading import check_model_spec, is_embedded, load_model, load_tokenizer, model_name

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED_HEADS = ASSETS / "heads" / "smollm2-135m-instruct"
SHIPPED_ADAPTERS = {"medusa2": ASSETS / "adapters" / "smollm2-135m-instruct-medusa2"}
"""LoRA adapters shipped for the embedded model, by the name ``--adapter`` takes. An adapter changes the model:
decoding is then lossless to the adapted model, not to the original (the default uses none)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda")


@dataclass
class DecoderOptions:
    """Which model, heads and tree to decode with, where, and how: the options every decoding command shares."""

    model: str | None = None
    """HF hub id or local model directory (default: the embedded SmolLM2-135M-Instruct)."""
    heads: str | None = None
    """Medusa heads: a directory or its medusa_heads.safetensors (default: the heads shipped for the embedded model);
    an adapter/ folder beside them (Medusa-2) is merged into the model."""
    tree: str | None = None
    """A built-in tree (chain, tree16, tree32, tree64, tree128) or a JSON file of medusa_choices paths (default: the
    tree chosen for this device kind and saved beside the heads, tree_cpu.json / tree_cuda.json, else tree64). A
    built-in tree deeper than the heads is cut to fit them. ``dynamic<N>`` (e.g. dynamic64): a tree of N nodes shaped
    each step from the heads' confidences (EAGLE-2 style; ``dynamic<N>k<k>`` sets the top-k, default 8)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto: cuda when available, else cpu."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto: float32 on the CPU, bfloat16 on a GPU."""
    backend: str = "auto"
    """fast: our static-cache Llama-family forward (CUDA graphs on a GPU); hf: the HF forward; auto: fast where it
    covers the architecture."""
    max_seq_len: int = 2048
    """KV cache size in tokens (prompt + new tokens + one tree)."""
    compile: bool = False
    """torch.compile the decode step (experimental: checked on the CPU only; the first call compiles)."""
    vanilla: bool = False
    """Decode without heads (one token per step), to compare."""
    adapter: str | None = None
    """A LoRA adapter merged into the model: a shipped one by name (medusa2: Medusa-2, trained with the shipped heads;
    3.06 vs 2.96 tokens/step on an H200) or a directory. It CHANGES THE MODEL: decoding is then lossless to the
    adapted model, not to the original (medusa2 agrees with the original's greedy tokens 98.6% of the time). Default:
    none (the original model, exactly), unless an adapter/ folder sits beside the heads."""
    draft_vocab: int | None = None
    """Propose from the N most frequent tokens only (FR-Spec; verification keeps the full vocabulary: lossless):
    default the heads' draft_vocab.safetensors when they have one; N: its first N tokens; 0: the full vocabulary."""

    def __post_init__(self):
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                dev = None
            if dev is None or dev.type not in DEVICE_TYPES:
                raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: no CUDA device is available on this machine")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {('auto', *DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_seq_len < 16:
            raise ValueError(f"--max-seq-len must be >= 16, got {self.max_seq_len}")
        if self.tree == "":
            raise ValueError("--tree must name a built-in tree or a JSON file")
        if self.draft_vocab is not None and self.draft_vocab < 0:
            raise ValueError(f"--draft-vocab must be >= 0 (0: off), got {self.draft_vocab}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(resolve_device(self.device))


@dataclass
class Pipeline:
    """What a decoding command runs on: the backbone, its heads and tree (None when decoding without heads), and
    the decoder built from them."""

    backbone: Backbone
    heads: MedusaHeads | None
    tree: Tree | StepTree | None
    decoder: MedusaDecoder | VanillaDecoder
    options: DecoderOptions
    tree_spec: str | None = None
    """The tree it was built from: a built-in name or a file (None without heads)."""
    adapter: Path | None = None
    """The LoRA adapter merged into the model (None: the original model)."""

    def with_tree(self, tree: Tree) -> Pipeline:
        """The same backbone and heads with another tree (e.g. one the optimizer chose on this device)."""
        if self.heads is None:
            raise MedusaError("a tree needs Medusa heads: pass --heads DIR")
        decoder = MedusaDecoder(
            self.backbone, self.heads, tree, compile=self.options.compile, draft_vocab=self.options.draft_vocab
        )
        return replace(self, tree=tree, decoder=decoder, tree_spec=None)

    def vanilla(self) -> VanillaDecoder:
        """A decoder without heads on the same backbone (the baseline)."""
        return VanillaDecoder(self.backbone, compile=self.options.compile)


def load_pipeline(opts: DecoderOptions, need_heads: bool = False) -> Pipeline:
    """Heads and tree read and checked, then the backbone loaded and the decoder built: the one assembly path.

    Without heads (``opts.vanilla``, or none given and none installed) the decoder is a ``VanillaDecoder``, unless
    ``need_heads``, which makes missing heads an error.
    """
    check_model_spec(opts.model)  # a missing model directory is the error, not the heads note it would cause
    heads_dir = None if opts.vanilla and not need_heads else resolve_heads_dir(opts.heads, opts.model, need_heads)
    adapter = resolve_adapter(opts.adapter, heads_dir, opts.model)
    heads = tree = spec = None
    if heads_dir is not None:
        heads = load_heads(heads_dir)  # on the CPU; the decoder moves them to the model's device and dtype
        spec = opts.tree if opts.tree not in (None, "default") else default_tree_spec(heads_dir, str(opts.torch_device))
        tree = load_tree(spec, heads.num_heads)
    backbone = load_pipeline_backbone(
        opts.model, opts.device, opts.dtype, opts.max_seq_len, opts.backend, adapter=adapter
    )
    if heads is None:
        return Pipeline(backbone, None, None, VanillaDecoder(backbone, compile=opts.compile), opts, adapter=adapter)
    # checks the heads against the model
    decoder = MedusaDecoder(backbone, heads, tree, compile=opts.compile, draft_vocab=opts.draft_vocab)
    draft = decoder.draft.size if decoder.draft is not None else "off"
    log.debug(
        "model %s, heads %s (%d), tree %s (%d tokens), draft vocab %s",
        backbone.name, heads_dir, heads.num_heads, spec, tree.size, draft,
    )  # fmt: skip
    return Pipeline(backbone, decoder.heads, decoder.tree, decoder, opts, spec, adapter)


# -- the pieces, in the order load_pipeline uses them ----------------------------------------------------------------


def default_heads_dir(model: str | None = None) -> Path | None:
    """The project's shipped heads for the embedded model, if installed; None otherwise."""
    if is_embedded(model) and (SHIPPED_HEADS / WEIGHTS_NAME).is_file():
        return SHIPPED_HEADS
    return None


def resolve_heads_dir(spec: str | None, model: str | None = None, required: bool = False) -> Path | None:
    """``--heads`` or, when omitted, the heads shipped for the model; None (or an error if ``required``) if none."""
    if spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise MedusaError(f"--heads {spec}: no such file or directory")
        return path
    found = default_heads_dir(model)
    if found is None:
        if required:
            raise MedusaError("no Medusa heads given and none are installed: pass --heads DIR (made by `train`)")
        log.warning(
            "note: no trained Medusa heads are installed for this model (pass --heads DIR): decoding without heads, "
            "one token per step"
        )
    return found


def default_tree_spec(heads_dir: Path | None, device: str) -> str:
    """The tree to use when ``--tree`` is not given: the one ``medusa-llama tree`` chose for this kind of device and
    saved beside the heads (``tree_cpu.json`` / ``tree_cuda.json``), else the built-in default."""
    if heads_dir is not None:
        saved = (heads_dir if heads_dir.is_dir() else heads_dir.parent) / f"tree_{torch.device(device).type}.json"
        if saved.is_file():
            return str(saved)
    return DEFAULT_TREE


def fit_tree(choices: list[list[int]], num_heads: int, spec: str = "") -> list[list[int]]:
    """A tree's paths fitted to K heads: a built-in tree deeper than the heads is cut to its first K levels (it is
    grown best-first, so the cut is a valid tree); a tree from a file (``spec`` an existing path) must fit as is."""
    depth = max((len(p) for p in choices), default=0)  # 0: the root alone (vanilla decoding)
    if depth <= num_heads:
        return choices
    if not spec or Path(spec).is_file():
        raise MedusaError(f"--tree {spec or '(given)'} is {depth} deep but the heads predict only {num_heads} tokens")
    return [p for p in choices if len(p) <= num_heads]


def load_tree(spec: str | None, num_heads: int) -> Tree | DynamicTree:
    """``--tree`` (None: the built-in default) read, fitted to the heads and built; ``dynamic<N>`` over all heads."""
    spec = spec or DEFAULT_TREE
    dynamic = parse_dynamic(spec, num_heads)
    if dynamic is not None:
        return dynamic
    return build_tree(fit_tree(load_choices(spec), num_heads, spec), num_heads)


def adapter_dir_of(heads_dir: Path | None) -> Path | None:
    """A LoRA adapter saved beside heads (``adapter/`` inside the heads directory, or the directory itself)."""
    if heads_dir is None:
        return None
    heads_dir = heads_dir if heads_dir.is_dir() else heads_dir.parent
    for cand in (heads_dir / "adapter", heads_dir):
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def resolve_adapter(spec: str | None, heads_dir: Path | None = None, model: str | None = None) -> Path | None:
    """``--adapter``: a shipped adapter's name (``SHIPPED_ADAPTERS``) or a directory; when omitted, the adapter saved
    beside the heads, if any (the shipped heads have none: the default model is the original, unchanged)."""
    if not spec:
        return adapter_dir_of(heads_dir)
    if spec in SHIPPED_ADAPTERS:
        if not is_embedded(model):
            raise MedusaError(f"--adapter {spec} is made for the embedded SmolLM2-135M-Instruct, not --model {model}")
        path = SHIPPED_ADAPTERS[spec]
        if not (path / "adapter_config.json").is_file():
            raise MedusaError(f"--adapter {spec}: the shipped adapter is missing from the installed package ({path})")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(SHIPPED_ADAPTERS)
        raise MedusaError(f"--adapter {spec}: neither a shipped adapter ({names}) nor an existing directory")
    return path


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedusaError(f"--device {device}: no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {('auto', *DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_pipeline_backbone(
    model: str | None,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_len: int = DecoderOptions.max_seq_len,
    backend: str = "auto",
    adapter: str | Path | None = None,
) -> Backbone:
    """Load the backbone; a LoRA adapter (Medusa-2) is merged into it first, so decoding runs at full speed."""
    device = resolve_device(device)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise MedusaError(f"--adapter {adapter} holds no LoRA adapter (adapter_config.json missing)")
    tokenizer = load_tokenizer(model)
    hf = load_model(model, dtype=resolve_dtype(dtype, device), device=device)
    if adapter is not None:
        from peft import PeftModel

        log.info("merging LoRA adapter %s (the model changes: decoding is lossless to the adapted model)", adapter)
        hf = PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload().eval()
    return make_backbone(hf, tokenizer, model_name(model), max_seq_len, backend)


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model and core count: recorded in every report."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under a file, a
    directory without write permission. Returns the path."""
    given, path = str(path), Path(path).expanduser()
    if given.endswith(("/", os.sep)) or path.is_dir():
        raise MedusaError(f"{flag} {path} is a directory: give a file path such as {path / 'report.json'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MedusaError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise MedusaError(f"{flag} {path}: the directory {parent} is not writable")
            break
    return path
