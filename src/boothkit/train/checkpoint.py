"""Resumable training state: trainable weights, optimizer, lr schedule, RNG states and step.

A checkpoint is a folder OUTPUT/checkpoints/step-NNNNNNN written under a temporary name and swapped in
when complete (core.files.atomic_folder), so a run killed mid-write never leaves a checkpoint that looks usable. Weights are
safetensors; optimizer and scheduler state go through torch.save and are read back with
weights_only=True (plain tensors and numbers, no code).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..core.errors import BoothkitError
from ..core.files import DiskFull, alive, atomic_folder, check_free_space, file_sha256, remove_stale_temps

PATTERN = re.compile(r"^step-(\d{7})$")
FILES = ("weights.safetensors", "optim.pt", "rng.pt")  # besides state.json, which holds their checksums


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain tuples, so they load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what torch.save will write, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint(output_dir: str | Path, step: int, weights: Mapping[str, torch.Tensor], optimizer,
                    lr_scheduler, keep: int, extra: Mapping[str, Any] | None = None,
                    states: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep` up to it. `states`: more training state
    (e.g. the EMA's state dict) saved beside the optimizer's, as tensors and numbers only.

    state.json, written last, records the sha256 of every other file, so a checkpoint damaged later (a disk
    error, a copy cut short) is recognised on --resume instead of loading garbage.
    """
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    optim = {**(states or {}), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
    check_free_space(root, _nbytes(weights) + _nbytes(optim) + (1 << 20), f"checkpoint {final}")
    from safetensors import SafetensorError

    try:
        with atomic_folder(final) as tmp:  # a checkpoint of the same step (a resumed run's) is replaced whole
            _write_files(tmp, step, weights, optim, extra)
    except (OSError, SafetensorError, DiskFull) as exc:  # a full disk, a lost mount (safetensors wraps I/O errors)
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise BoothkitError(f"checkpoint {final}: could not be written ({why}); the earlier checkpoints are kept: "
                            f"free some space and run the same command with --resume") from exc
    # the newest `keep` up to this step: a later one is left by the run this one resumed past (it was damaged, or
    # --resume chose an earlier one); it is replaced when the run reaches its step, and never counts as kept
    for _, old in [c for c in list_checkpoints(output_dir) if c[0] <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, weights: Mapping[str, torch.Tensor], optim: dict,
                 extra: Mapping[str, Any] | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save(optim, tmp / "optim.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    files = {name: file_sha256(tmp / name) for name in FILES}
    (tmp / "state.json").write_text(json.dumps({"step": step, "files": files, **(extra or {})}, indent=2))


class CheckpointError(BoothkitError):
    """A checkpoint folder is damaged: a file is missing, unreadable or not what was written."""


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint, checked: a dict with an integer step."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: no step number in it")
    return state


def verify(path: Path, state: Mapping[str, Any]) -> None:
    """Every file matches the sha256 that state.json recorded (checkpoints from before checksums: presence only)."""
    sums = state.get("files")
    if sums is not None and (not isinstance(sums, dict) or set(sums) != set(FILES)):
        raise CheckpointError(f"{path / 'state.json'}: its file list is damaged")
    for name in FILES:
        try:
            digest = file_sha256(path / name)
        except OSError as exc:
            raise CheckpointError(f"{path / name}: unreadable ({exc.strerror or exc})") from exc
        if sums is not None and digest != sums[name]:
            raise CheckpointError(f"{path / name}: checksum mismatch (changed or cut short since it was written)")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder: weights, optimizer/scheduler state dicts, the extra states, RNG states, step.

    Raises CheckpointError (naming the file) for anything damaged; the caller may then try an older one.
    """
    from safetensors.torch import load_file

    state = read_state(path)
    verify(path, state)
    try:
        weights = load_file(path / "weights.safetensors")
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors share no base class; all mean "damaged"
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not (isinstance(optim, dict) and {"optimizer", "lr_scheduler"} <= set(optim)):
        raise CheckpointError(f"{path / 'optim.pt'}: no optimizer or lr_scheduler state in it")
    if not (isinstance(rng, dict) and {"torch", "python", "numpy"} <= set(rng)):
        raise CheckpointError(f"{path / 'rng.pt'}: no RNG states in it")
    states = {k: v for k, v in optim.items() if k not in ("optimizer", "lr_scheduler")}
    return {"weights": weights, "optimizer": optim["optimizer"], "lr_scheduler": optim["lr_scheduler"],
            "states": states, "rng": rng, "step": state["step"], "state": state}


def clean_partial(output_dir: str | Path) -> None:
    """Remove temp folders left by a run killed while writing a checkpoint (not those of a live writer)."""
    root = checkpoint_dir(output_dir)
    remove_stale_temps(root)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):  # the temp names of boothkit before atomic_folder
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
