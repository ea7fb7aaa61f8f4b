"""The Hugging Face hub ids boothkit names, and what a failed hub load means, in one place: the UI's presets, the demo page's commands, help texts
and metric defaults take them from here; README, docs and examples/*.toml name the same ids
(tests/test_hub_ids.py holds them to this table).

REMOVED maps ids taken off the hub to the maintained copy of the same weights: loading one fails with one line
that names the copy (boothkit.models.loading), and no file of the repo may name a removed id except this table.
Add an id to REMOVED only once the hub answers "Repository Not Found" for it.
"""
from __future__ import annotations

import os

from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Stable Diffusion 1.5, as runwayml published it
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16 = "madebyollin/sdxl-vae-fp16-fix"  # SDXL's VAE, fine-tuned to run in fp16
CLIP = "openai/clip-vit-base-patch32"  # CLIP-I / CLIP-T evaluator (boothkit.evaluate.metrics)
DINO = "facebook/dino-vits16"  # DINO / PRES evaluator (boothkit.evaluate.metrics)
CLIP_L = "openai/clip-vit-large-patch14"  # the CLIP-L text encoder of SD3 and FLUX.1 (models.published)

FLUX1_DEV = "black-forest-labs/FLUX.1-dev"  # gated: accept its licence on the hub first
FLUX1_SCHNELL = "black-forest-labs/FLUX.1-schnell"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"  # gated, as SD3.5-large
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"

KNOWN: dict[str, str] = {"sd15": SD15, "sdxl": SDXL, "sdxl-vae-fp16": SDXL_VAE_FP16, "clip": CLIP, "dino": DINO,
                         "clip-l": CLIP_L, "flux1-dev": FLUX1_DEV, "flux1-schnell": FLUX1_SCHNELL, "sd35-medium": SD35_MEDIUM,
                         "sd35-large": SD35_LARGE}

# removed id -> maintained copy. runwayml deleted its hub repositories at the end of August 2024.
REMOVED: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": SD15,
}


OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # huggingface_hub's and transformers' names for it


def apply_offline(flag: bool = False) -> bool:
    """Offline mode (`--offline`, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the environment says *now*) for every
    hub call of this process. huggingface_hub reads the variable once, when it is imported, and diffusers and
    transformers ask it at each call; setting its flag here honours a variable set after import (a notebook, a test,
    the UI's process) and makes a model that is not cached fail at once, naming it, instead of waiting on the
    network. Returns whether the process is offline."""
    on = flag or any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_ENV)
    if on:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts (torchrun, accelerate)
    hub_constants.HF_HUB_OFFLINE = on
    return on


def maintained_copy(model_id: str) -> str | None:
    """The maintained copy of a removed hub id (hub ids ignore case), or None when `model_id` is not removed."""
    wanted = model_id.strip().lower()
    return next((copy for removed, copy in REMOVED.items() if removed.lower() == wanted), None)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it was raised from or during (diffusers re-raises the hub's error as an OSError
    `from` it, while the failed cache lookup is its context)."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
    return found


LOCAL_OR_BUILT_IN = "pass a local diffusers folder or .safetensors file, or a built-in model (--model mini, mini-flow, tiny)"


def hub_error(flag: str, spec: str, exc: BaseException, remedy: str = "pass a local folder") -> str | None:
    """One line for a hub id that failed to load because the hub has no such repository (a removed id names its
    maintained copy), keeps it gated, or cannot be asked (offline) and has no cached copy; None for other failures.
    `remedy`: what to do instead, offline."""
    causes = _causes(exc)
    gated = any(isinstance(e, GatedRepoError) for e in causes)
    missing = any(isinstance(e, RepositoryNotFoundError) or isinstance(e, OSError)
                  and "is not a valid model identifier" in str(e) for e in causes)
    offline = any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in causes)
    copy = maintained_copy(spec)
    if copy and (gated or missing or offline):
        return f"{flag} {spec}: removed from the hub; use {copy}"
    if gated:
        return (f"{flag} {spec}: a gated repository on the hub; accept its terms at https://huggingface.co/{spec} "
                "and log in (hf auth login)")
    if missing:
        return f"{flag} {spec}: no such repository on the hub (check the id; a private one needs hf auth login)"
    if offline:
        return f"{flag} {spec}: not in the local hub cache, and the hub cannot be reached (offline); {remedy}"
    return None
