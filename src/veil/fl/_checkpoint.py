"""Saving and restoring federated training state, with veil's wire format (never pickle)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from veil._errors import SerializationError
from veil.serde import decode, encode

_MAGIC = "veil-checkpoint-1"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint whole."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = encode({"magic": _MAGIC, "state": state})
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        SerializationError: the file is not a veil checkpoint.
    """
    content = decode(Path(path).read_bytes())
    if not isinstance(content, dict) or content.get("magic") != _MAGIC:
        raise SerializationError(f"{path} is not a veil checkpoint")
    state = content.get("state")
    if not isinstance(state, dict):
        raise SerializationError(f"{path} holds no training state")
    return state
