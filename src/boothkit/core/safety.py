"""Pickle-based weight files (.ckpt, .bin, .pt, .pth) can run code when they are loaded, so boothkit refuses them
unless the user allows them (`--allow-pickle`, or BOOTHKIT_ALLOW_PICKLE=1); allowed, they are read with torch's
weights-only loader, which rebuilds tensors and plain containers and refuses every other object."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import BoothkitError, first_line
from .files import atomic_write_bytes, boothkit_home

PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
ALLOW_ENV = "BOOTHKIT_ALLOW_PICKLE"
_allowed = False
REFUSAL = ("a pickle file, which can run code when loaded; convert it to .safetensors, or pass --allow-pickle to "
           "load it with torch's weights-only loader")


def pickle_allowed() -> bool:
    return _allowed or os.environ.get(ALLOW_ENV, "") == "1"


@contextlib.contextmanager
def allowing_pickle(on: bool = True) -> Iterator[None]:
    """Allow (or not) pickled weights while the block runs: `--allow-pickle` wraps one command in it."""
    global _allowed
    saved, _allowed = _allowed, on
    try:
        yield
    finally:
        _allowed = saved


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(flag: str, path: str | os.PathLike, error: type[BoothkitError] = BoothkitError) -> None:
    """Raise `error` naming `path` when it is a pickle and pickles are not allowed."""
    if is_pickle(path) and not pickle_allowed():
        raise error(f"{flag} {path}: {REFUSAL}")


def pickled_only(folder: str | os.PathLike) -> list[Path]:
    """Weight files under a diffusers model folder that exist only as pickles (no .safetensors beside them)."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if is_pickle(path) and path.is_file() and not list(path.parent.glob("*.safetensors")):
            found.append(path)
    return found


def load_pickled_tensors(path: str | os.PathLike, flag: str) -> dict:
    """A pickled state dict read with torch's weights-only loader (after `refuse_pickle`); anything else in the
    file, or a damaged file, is a one-line error naming it."""
    import pickle

    import torch

    refuse_pickle(flag, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = first_line(exc)
        raise BoothkitError(f"{flag} {path}: not loadable by torch's weights-only loader ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style checkpoints keep the weights one level down
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BoothkitError(f"{flag} {path}: holds no plain dict of tensors")
    return state


def as_safetensors(path: str | os.PathLike, flag: str) -> Path:
    """`path` itself when it is not a pickle; else its tensors, read weights-only, in a .safetensors copy under
    BOOTHKIT_HOME/converted (kept per file, size and mtime), so every later reader sees only safetensors."""
    import hashlib

    from safetensors.torch import save

    path = Path(path)
    if not is_pickle(path):
        return path
    refuse_pickle(flag, path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    out = boothkit_home() / "converted" / f"{path.stem}-{key}.safetensors"
    if out.is_file():
        return out
    tensors, seen = {}, set()
    for name, t in load_pickled_tensors(path, flag).items():
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors stores no shared memory (tied weights)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    atomic_write_bytes(out, save(tensors, metadata={"format": "pt", "converted_from": path.name}))
    return out
