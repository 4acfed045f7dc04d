"""Output directories that never lose the user's files: checked before any work, written beside, swapped in.

``check_output_dir`` runs before the long work (tokenizing, self-distillation, loading a model) and turns every
path that cannot work (a file, a path under a file, a directory without write permission) into one
``MedusaError``. The work is then written into ``staging_dir``, a uniquely named hidden sibling that is removed
on any exit, ``KeyboardInterrupt`` included, and ``replace_dir`` renames it into place: a reader sees the old
directory or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from medusa_llama.errors import MedusaError


def check_output_dir(path: str | Path, flag: str, *, beside: bool = False) -> Path:
    """The absolute ``path`` once it is known that a directory can be written there, else ``MedusaError``.

    ``beside``: the directory will be written as a sibling and renamed into place, so it is its parent that
    must be writable (otherwise ``path`` itself when it exists). Symbolic links are not resolved.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if os.path.lexists(path) and not path.is_dir():
        raise MedusaError(f"{flag} {path} is a file, not a directory")
    anchor = next(p for p in path.parents if os.path.lexists(p))  # the root always exists
    if not anchor.is_dir():
        raise MedusaError(f"{flag} {path} lies under {anchor}, which is a file")
    where = path if path.is_dir() and not beside else anchor
    if not os.access(where, os.W_OK | os.X_OK):
        raise MedusaError(f"{flag} {path}: no permission to write in {where}")
    return path


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A new empty hidden sibling of ``final``, removed with its contents however the block exits.

    Parents of ``final`` that had to be created are removed again when they are still empty, so a failed or
    interrupted run leaves nothing. The name is created inside the ``try``: no interrupt can orphan it.
    """
    created = [p for p in final.parents if not p.exists()]  # innermost first
    tmp = final.parent / f".{final.name}-{secrets.token_hex(8)}.tmp"
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise MedusaError(f"cannot create {tmp}: {exc.strerror or exc}") from exc
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty


def replace_dir(tmp: Path, final: Path, old: Path) -> None:
    """Rename ``tmp`` to ``final``. A previous ``final`` waits at ``old`` (deleted first if there) until the new
    one is in place, then is deleted; interrupted between the two renames, it is put back."""
    shutil.rmtree(old, ignore_errors=True)
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)
