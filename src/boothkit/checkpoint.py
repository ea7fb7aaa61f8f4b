"""Resumable training state: trainable weights, optimizer, lr schedule, RNG states and step.

A checkpoint is a folder OUTPUT/checkpoints/step-NNNNNNN written under a temporary name and renamed
when complete, so a run killed mid-write never leaves a checkpoint that looks usable. Weights are
safetensors; optimizer and scheduler state go through torch.save and are read back with
weights_only=True (plain tensors and numbers, no code).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

PATTERN = re.compile(r"^step-(\d{7})$")


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


def save_checkpoint(output_dir: str | Path, step: int, weights: Mapping[str, torch.Tensor], optimizer,
                    lr_scheduler, keep: int, extra: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`."""
    from safetensors.torch import save_file

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, tmp / "optim.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder: weights, optimizer/scheduler state dicts, RNG states, step."""
    from safetensors.torch import load_file

    optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return {"weights": load_file(path / "weights.safetensors"), "optimizer": optim["optimizer"],
            "lr_scheduler": optim["lr_scheduler"], "rng": rng, "step": int(state["step"]), "state": state}


def clean_partial(output_dir: str | Path) -> None:
    """Remove temp folders left by a run killed while writing a checkpoint."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
