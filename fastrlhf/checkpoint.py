"""Trainer checkpoints that are verified on load and never half-written.

The file holds ``{"format", "sha256", "payload"}``; ``payload`` is the ``torch.save`` bytes of the
trainer's state. Saving writes a temporary file in the same directory and renames it over the target
(atomic on POSIX), so a failed save leaves any previous checkpoint as it was. Loading checks the format,
the checksum and the kind of trainer before anything is restored.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

import torch

FORMAT = "fastrlhf-checkpoint-v1"


class CheckpointError(ValueError):
    """The file is not a readable fastrlhf checkpoint, or it belongs to a different run."""


def save(path: str | os.PathLike, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    record = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str | os.PathLike, kind: str) -> dict:
    """The state saved at ``path``; raises ``CheckpointError`` unless it is an intact ``kind`` checkpoint."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected a {FORMAT} file, got something else")
    if hashlib.sha256(record["payload"]).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    state = torch.load(io.BytesIO(record["payload"]), map_location="cpu", weights_only=True)
    if state.get("kind") != kind:
        raise CheckpointError(f"{path}: expected a {kind} checkpoint, got a {state.get('kind')} checkpoint")
    return state


def mismatches(saved: dict, current: dict) -> list[str]:
    """``"name: saved X, now Y"`` for every setting that differs between two config dicts."""
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_module(module: torch.nn.Module, state_dict: dict, name: str, path) -> None:
    """Raises ``CheckpointError`` unless ``state_dict`` has exactly ``module``'s keys and shapes."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    problems += [f"{k}: saved shape {tuple(state_dict[k].shape)}, model has {tuple(v.shape)}"
                 for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{path}: {name} does not match the checkpoint: " + "; ".join(problems[:5]))
