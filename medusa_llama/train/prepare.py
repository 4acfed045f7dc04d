"""Data preparation for Medusa training: records -> token blocks in numpy memmaps + ``meta.json``.

Layout of a prepared directory (``prepare``), which training streams (``TokenBlocks``):

    meta.json                 tokenizer/model name and fingerprint, block size, counts per split; the marker
                              ``"writer": "medusa-llama prepare"`` by which prepare knows its own datasets
    train.tokens.u32 / .mask.u8   (N, block) token ids (uint32) and loss mask (uint8, 1 = learn this token)
    val.tokens.u32 / .mask.u8     the held-out split (``prompts.is_heldout``: a hash of the conversation id)
    prompts_val.jsonl         {"prompt": ...}: the first user turn of each held-out chat, for benchmarks

Chats are rendered with the backbone's chat template; the loss mask is 1 on assistant tokens only (the
answer text and its end-of-turn token, not the role header). A chat longer than a block is truncated to
it. Chats are packed whole, first come first served: a chat that does not fit the rest of the current
block starts a new one and the rest is padded (mask 0). Packed chats attend to earlier chats in the block,
the usual packing trade-off, chosen because ShareGPT chats are short compared to a block and padding
each would waste most of the compute. Raw text is one token stream (EOS between documents) cut into
blocks, mask all 1.

``--self-distill N`` replaces the answers of up to N chats by the backbone's own greedy answer to their
first user turn (Medusa, Sec. 2.3.2: heads must learn the model's outputs, not ShareGPT's).

Nothing the user has is deleted: ``--out`` is checked before any tokenizing, a non-empty directory is refused
unless it is a dataset prepare wrote (holding only its files) and ``--overwrite`` is given, and the dataset is
written into a hidden sibling that is renamed into place at the end or removed on any failure (``outputs``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_llama.errors import MedusaError
from medusa_llama.train.outputs import check_output_dir, replace_dir, staging_dir
from medusa_llama.train.sources import SOURCES, Record, SkipCounter, iter_source

log = logging.getLogger(__name__)

META_NAME = "meta.json"
PROMPTS_NAME = "prompts_val.jsonl"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
WRITER = "medusa-llama prepare"
"""``meta.json``'s ``writer``: marks a directory as a dataset prepare wrote (and may replace with ``--overwrite``)."""
OWN_FILES = frozenset({META_NAME, PROMPTS_NAME} | {f"{s}.{x}" for s in SPLITS for x in ("tokens.u32", "mask.u8")})


@dataclass
class PrepareConfig:
    dataset: str = "sharegpt"
    """``sharegpt`` (packaged, default), ``wikitext`` / ``wikitext2`` (hub), or a local .txt / .jsonl file."""
    model: str | None = None
    """Backbone whose tokenizer and chat template are used (None: the embedded SmolLM2-135M-Instruct)."""
    out: str | None = None
    """Output directory, written atomically when done (None: ``data/<dataset name>``); must be new, empty, or
    (with ``--overwrite``) a dataset prepare wrote."""
    overwrite: bool = False
    """Replace the dataset an earlier prepare wrote at ``--out`` (any other non-empty directory is refused)."""
    block_size: int = 512
    """Tokens per training sequence."""
    val_fraction: float = 0.02
    """Fraction of records held out for validation, chosen by a hash of the record id (ShareGPT: at least 0.02)."""
    limit: int | None = None
    """Read at most this many records from the source (None: all)."""
    self_distill: int = 0
    """Replace the answers of up to this many chats by the backbone's own greedy answer."""
    max_new_tokens: int = 256
    """Longest self-distilled answer, in tokens."""
    distill_batch_size: int = 64
    """Prompts generated at once (left padded) during self-distillation."""
    device: str | None = None
    """Device for self-distillation (None: cuda when available)."""

    def __post_init__(self):
        if self.out is None:
            self.out = str(Path("data") / Path(self.dataset).stem)
        if self.block_size < 16:
            raise ValueError(f"--block-size must be >= 16, got {self.block_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.self_distill < 0:
            raise ValueError(f"--self-distill must be >= 0, got {self.self_distill}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.distill_batch_size < 1:
            raise ValueError(f"--distill-batch-size must be >= 1, got {self.distill_batch_size}")


@dataclass
class SplitStats:
    records: int = 0
    blocks: int = 0
    tokens: int = 0
    """Non-padding tokens."""
    loss_tokens: int = 0
    """Tokens with mask 1."""


@dataclass
class PrepareSummary:
    out: str
    records: int
    skipped: int
    skipped_reasons: dict
    self_distilled: int
    splits: dict = field(default_factory=dict)

    def line(self) -> str:
        t, v = self.splits["train"], self.splits["val"]
        return (
            f"{self.records} records ({t['records']} train, {v['records']} val, {self.self_distilled} self-distilled)"
            f" -> {t['blocks']} train + {v['blocks']} val blocks, {t['tokens'] + v['tokens']} tokens"
            f" ({t['loss_tokens'] + v['loss_tokens']} in the loss); skipped {self.skipped} in {self.out}"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary: datasets made with another tokenizer are refused at training time."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def validation_fraction(config: PrepareConfig) -> float:
    """The held-out share. For ShareGPT it is at least ``prompts.HELDOUT_FRACTION``, so the built-in benchmark
    prompts (``prompts.heldout_prompts``, same hash rule) are never trained on whatever ``--val-fraction`` says."""
    from medusa_llama.eval.prompts import HELDOUT_FRACTION

    return max(config.val_fraction, HELDOUT_FRACTION) if config.dataset == "sharegpt" else config.val_fraction


class ChatEncoder:
    """Chat -> (token ids, loss mask) with the tokenizer's chat template; mask 1 on assistant answers only.

    The chat is rendered prefix by prefix: the text a message adds is the difference between the renders
    with and without it, and an assistant message's header is what ``add_generation_prompt`` adds. This needs
    a template whose renders extend each other (true for ChatML, Llama-2/3 templates); others are skipped.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise MedusaError("the tokenizer has no chat template: use a raw-text dataset or an instruct model")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], list[int]] | None:
        """Token ids and loss mask of a chat; stops after ``max_tokens`` (what follows would be truncated)."""
        ids: list[int] = []
        mask: list[int] = []
        previous = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self._render(messages[:i], generation_prompt=True)
                if not header.startswith(previous):
                    return None
                piece = self._ids(header[len(previous) :])
                ids += piece
                mask += [0] * len(piece)
                previous = header
            text = self._render(messages[: i + 1], generation_prompt=False)
            if not text.startswith(previous):
                return None
            piece = self._ids(text[len(previous) :])
            ids += piece
            mask += [int(message["role"] == "assistant")] * len(piece)
            previous = text
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        return ids, mask


class SplitWriter:
    """Appends (block,) rows to the raw uint32 token / uint8 mask files of one split, packing sequences."""

    def __init__(self, directory: Path, name: str, block_size: int, pad_id: int, eos_id: int):
        self.block_size, self.pad_id, self.eos_id = block_size, pad_id, eos_id
        self.tokens_fh = open(directory / f"{name}.tokens.u32", "wb")
        self.mask_fh = open(directory / f"{name}.mask.u8", "wb")
        self.stats = SplitStats()
        self.chat_ids: list[int] = []
        self.chat_mask: list[int] = []
        self.text_ids: list[int] = []

    def _write(self, ids: list[int], mask: list[int]) -> None:
        n = len(ids)
        pad = self.block_size - n
        tokens = np.asarray(ids + [self.pad_id] * pad, dtype=np.uint32)  # (block,)
        loss = np.asarray(mask + [0] * pad, dtype=np.uint8)  # (block,)
        self.tokens_fh.write(tokens.tobytes())
        self.mask_fh.write(loss.tobytes())
        self.stats.blocks += 1
        self.stats.tokens += n
        self.stats.loss_tokens += int(loss.sum())

    def add_chat(self, ids: list[int], mask: list[int]) -> bool:
        """Pack one encoded chat (truncated to a block); False if no answer token survives truncation."""
        ids, mask = ids[: self.block_size], mask[: self.block_size]
        if not any(mask):
            return False
        if len(self.chat_ids) + len(ids) > self.block_size:
            self._write(self.chat_ids, self.chat_mask)
            self.chat_ids, self.chat_mask = [], []
        self.chat_ids += ids
        self.chat_mask += mask
        self.stats.records += 1
        return True

    def add_text(self, ids: list[int]) -> None:
        """Append a document to the raw-text stream (EOS-separated) and write every full block."""
        self.text_ids += ids + [self.eos_id]
        self.stats.records += 1
        while len(self.text_ids) >= self.block_size:
            block, self.text_ids = self.text_ids[: self.block_size], self.text_ids[self.block_size :]
            self._write(block, [1] * self.block_size)

    def close(self) -> SplitStats:
        if self.chat_ids:
            self._write(self.chat_ids, self.chat_mask)
        if len(self.text_ids) > 1:  # the padded tail of the raw-text stream
            self._write(self.text_ids, [1] * len(self.text_ids))
        self.tokens_fh.close()
        self.mask_fh.close()
        return self.stats


def self_distill_records(
    records: Iterator[Record], tokenizer, config: PrepareConfig, counter: list[int]
) -> Iterator[Record]:
    """Yield ``records`` in order, the first ``config.self_distill`` chats answered by the backbone itself.

    Prompts are generated in batches (left padded, greedy, HF ``generate``). A prompt too long to leave room
    for an answer in a block keeps its original answer. ``counter[0]`` counts the replaced chats.
    """
    from medusa_llama.loading import default_device, load_model

    device = config.device or default_device()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = load_model(config.model, dtype=dtype, device=device)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_prompt = max(config.block_size - config.max_new_tokens, config.block_size // 2)
    bar = tqdm(total=config.self_distill, desc="self-distill", unit="answer", leave=False)

    def run(pending: list[Record], batch: list[tuple[int, list[int]]]) -> Iterator[Record]:
        if batch:
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for _, ids in batch])  # (B, width)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch])  # (B, width)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=config.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            answers = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)  # (B,) strings
            for (index, _), answer in zip(batch, answers, strict=True):
                record = pending[index]
                if answer.strip():
                    system = [m for m in record.messages[:1] if m["role"] == "system"]
                    prompt = {"role": "user", "content": record.first_prompt()}
                    pending[index] = Record(
                        record.id, messages=system + [prompt, {"role": "assistant", "content": answer}]
                    )
                    counter[0] += 1
            bar.update(len(batch))
        yield from pending

    pending: list[Record] = []
    batch: list[tuple[int, list[int]]] = []
    queued = 0
    for record in records:
        pending.append(record)
        if record.is_chat and queued < config.self_distill:
            system = [m for m in record.messages[:1] if m["role"] == "system"]
            prompt = system + [{"role": "user", "content": record.first_prompt()}]
            ids = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
            if len(ids) <= max_prompt:
                batch.append((len(pending) - 1, ids))
                queued += 1
        if (batch and (len(batch) >= config.distill_batch_size or queued >= config.self_distill)) or (
            not batch and queued >= config.self_distill
        ):
            yield from run(pending, batch)
            pending, batch = [], []
    yield from run(pending, batch)
    bar.close()


def is_prepared_dataset(directory: Path) -> bool:
    """True if ``directory`` holds only files prepare writes, with its ``meta.json`` (marker, or the keys of one
    written before the marker existed)."""
    try:
        names = {p.name for p in directory.iterdir()}
        meta = json.loads((directory / META_NAME).read_text())
    except (OSError, ValueError):
        return False
    legacy = isinstance(meta, dict) and {"format", "tokenizer_fingerprint", "splits", "config"} <= meta.keys()
    return names <= OWN_FILES and isinstance(meta, dict) and (meta.get("writer") == WRITER or legacy)


def check_out(config: PrepareConfig) -> Path:
    """The absolute ``--out``, or ``MedusaError`` if writing there could lose anything or cannot work."""
    out = check_output_dir(config.out, "--out", beside=True)
    if out.is_symlink():
        raise MedusaError(f"--out {out} is a symbolic link: pass the directory it points to")
    if out.is_dir() and any(out.iterdir()):
        if not is_prepared_dataset(out):
            raise MedusaError(f"--out {out} is a non-empty directory prepare did not write: choose another --out")
        if not config.overwrite:
            raise MedusaError(f"--out {out} already holds a prepared dataset: pass --overwrite to replace it")
    return out


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Tokenize a source into train/val memmaps + meta.json + held-out prompts in ``config.out``."""
    from medusa_llama.loading import load_tokenizer

    out = check_out(config)  # before any long work
    tokenizer = load_tokenizer(config.model)
    if tokenizer.eos_token_id is None:
        raise MedusaError(f"the tokenizer of {config.model!r} has no EOS token")
    if len(tokenizer) >= 2**32:
        raise MedusaError("vocabulary too large for uint32 token storage")
    with staging_dir(out) as tmp:
        meta = write_dataset(tmp, tokenizer, config)
        check_out(config)  # again: the directory may have changed during the work
        replace_dir(tmp, out, out.with_name(tmp.name.removesuffix(".tmp") + ".old"))
    skipped = SkipCounter(meta["skipped"])
    log.info("skipped: %s", skipped.describe())
    return PrepareSummary(
        str(out), meta["records"], skipped.total_skipped(), dict(skipped), meta["self_distilled"], meta["splits"]
    )


def write_dataset(directory: Path, tokenizer, config: PrepareConfig) -> dict:
    """Write the splits, held-out prompts and ``meta.json`` of ``config`` into ``directory``; return the meta."""
    from medusa_llama.eval.prompts import is_heldout
    from medusa_llama.loading import model_name

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    skipped = SkipCounter()
    distilled = [0]
    val_fraction = validation_fraction(config)
    writers = {s: SplitWriter(directory, s, config.block_size, pad_id, eos_id) for s in SPLITS}
    encoder: ChatEncoder | None = None
    records = iter_source(config.dataset, skipped)
    if config.limit is not None:
        records = itertools.islice(records, config.limit)
    if config.self_distill:
        records = self_distill_records(records, tokenizer, config, distilled)
    used = 0
    try:
        with open(directory / PROMPTS_NAME, "w", encoding="utf-8") as prompts:
            bar = tqdm(records, total=config.limit, desc=f"prepare {Path(config.dataset).name}", unit="rec")
            for record in bar:
                split = "val" if is_heldout(record.id, val_fraction) else "train"
                if record.is_chat:
                    encoder = encoder or ChatEncoder(tokenizer)
                    try:
                        encoded = encoder.encode(record.messages, config.block_size)
                    except Exception:  # jinja errors from strict templates: a record problem, not ours
                        encoded = None
                    if encoded is None:
                        skipped["chat template rejected"] += 1
                        continue
                    if not writers[split].add_chat(*encoded):
                        skipped["no answer within block size"] += 1
                        continue
                    if split == "val":
                        prompts.write(json.dumps({"id": record.id, "prompt": record.first_prompt()}) + "\n")
                else:
                    writers[split].add_text(tokenizer(record.text, add_special_tokens=False)["input_ids"])
                used += 1
                if used % 200 == 0:
                    bar.set_postfix(train_blocks=writers["train"].stats.blocks, skipped=skipped.total_skipped())
            bar.close()
    finally:
        stats = {s: asdict(w.close()) for s, w in writers.items()}
    if used == 0 or stats["train"]["blocks"] == 0:
        raise MedusaError(f"no usable training records in {config.dataset!r} (skipped: {skipped.describe()})")
    meta = {
        "format": FORMAT_VERSION,
        "writer": WRITER,
        "model": model_name(config.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "block_size": config.block_size,
        "pad_id": pad_id,
        "dataset": config.dataset,
        "records": used,
        "skipped": dict(skipped),
        "self_distilled": distilled[0],
        "splits": stats,
        "config": asdict(config),
    }
    (directory / META_NAME).write_text(json.dumps(meta, indent=2))
    return meta


# -- reading -------------------------------------------------------------------------------------------------------
def load_meta(data_dir: str | Path) -> dict:
    """``meta.json`` of a prepared directory; ``MedusaError`` naming the fix when absent or foreign."""
    path = Path(data_dir).expanduser() / META_NAME
    if not path.is_file():
        raise MedusaError(f"{data_dir} is not a prepared dataset (no {META_NAME}): run `medusa-llama prepare` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedusaError(f"corrupt {path}: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise MedusaError(f"{path} has format {meta.get('format')}, expected {FORMAT_VERSION}: re-run prepare")
    return meta


class TokenBlocks:
    """Read-only memmap view of one split: ``blocks[idx] -> (tokens int64 (n, T), mask float32 (n, T))``."""

    def __init__(self, data_dir: str | Path, split: str, meta: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        directory = Path(data_dir).expanduser()
        meta = meta or load_meta(directory)
        self.block_size = meta["block_size"]
        n = meta["splits"][split]["blocks"]
        shape = (n, self.block_size)
        if n == 0:
            self.tokens = np.zeros(shape, dtype=np.uint32)
            self.mask = np.zeros(shape, dtype=np.uint8)
            return
        for suffix, itemsize in (("tokens.u32", 4), ("mask.u8", 1)):
            path = directory / f"{split}.{suffix}"
            if not path.is_file() or path.stat().st_size != n * self.block_size * itemsize:
                raise MedusaError(f"{path} is missing or truncated: re-run `medusa-llama prepare`")
        self.tokens = np.memmap(directory / f"{split}.tokens.u32", dtype=np.uint32, mode="r", shape=shape)
        self.mask = np.memmap(directory / f"{split}.mask.u8", dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(np.asarray(idx))  # sorted reads are sequential on disk; order within a batch is irrelevant
        tokens = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (n, T)
        mask = torch.from_numpy(self.mask[idx].astype(np.float32))  # (n, T)
        return tokens, mask


def write_blocks(directory: str | Path, split: str, tokens: np.ndarray, mask: np.ndarray) -> None:
    """Write ready-made (N, T) blocks of one split (tests and tools); ``meta.json`` is the caller's job."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(tokens, dtype=np.uint32).tofile(directory / f"{split}.tokens.u32")
    np.ascontiguousarray(mask, dtype=np.uint8).tofile(directory / f"{split}.mask.u8")


__all__ = ["SOURCES", "PrepareConfig", "PrepareSummary", "TokenBlocks", "load_meta", "prepare", "write_blocks"]
