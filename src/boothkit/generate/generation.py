"""Generation with one or more LoRAs at separate UNet / text-encoder scales, reproducible by plain diffusers.

Everything here is diffusers' own machinery: LoRA files go through ``pipe.load_lora_weights`` (which also
converts kohya/A1111 files), scales through ``pipe.set_adapters``, samplers are diffusers schedulers built
``from_config`` of the model folder's scheduler. Image i is drawn with
``torch.Generator("cpu").manual_seed(seed + i)``, one generator per image, so batching never changes a
picture and ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed + i))`` repeats it.
Each PNG carries every setting in an AUTOMATIC1111-style ``parameters`` text chunk.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .. import __version__
from ..adapters import lora as L
from ..adapters.apply import apply_lora
from ..adapters.embeddings import embedding_info, load_embeddings, run_parts
from ..core import config as C
from ..core.errors import BoothkitError, ConfigError, Interrupted
from ..core.files import atomic_write_bytes, slug
from ..core.precision import DTYPES, default_device, mixed_precision_name, resolve
from ..core.progress import progress_bar
from ..models import families
from ..models import loading as models
from ..models.families import family_of

log = logging.getLogger("boothkit")

# boothkit name -> (diffusers scheduler class, overrides of the model's scheduler config, A1111 sampler label)
SCHEDULER_SPECS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpm++2m": ("DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                       "DPM++ 2M Karras"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    # A1111's PLMS is PNDM without the Runge-Kutta warm-up steps, as Stable Diffusion ships it.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    # the flow-matching families' (SD3, FLUX.1) Euler sampler; their model folders ship it
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler (flow)"),
}
assert tuple(SCHEDULER_SPECS) == C.SCHEDULERS



# ------------------------------------------------------------------------------------------- helpers

def precision_dtype(mixed_precision: str, on: str) -> torch.dtype:
    """The pipeline dtype for --mixed-precision (auto resolved for this hardware); fp16 on a CPU is refused."""
    if mixed_precision == "fp16" and on == "cpu":
        raise ConfigError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
    return DTYPES[resolve(mixed_precision, on)]


def warn_long_prompts(pipe, prompts: dict[str, Sequence[str]]) -> None:
    """Warn, naming the flag, about each prompt longer than the text encoder reads: CLIP silently drops every
    token past its limit (77 with the start and end tokens), so the end of such a prompt has no effect. A family with
    a T5 reads more (FLUX.1 512 tokens, SD3 256): its longest reader decides."""
    family = family_of(pipe)
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    k = max(range(len(tokenizers)), key=lambda i: family.token_length(tokenizers[i], i))
    tokenizer, limit = tokenizers[k], family.token_length(tokenizers[k], k)
    for flag, texts in prompts.items():
        for text in dict.fromkeys(t for t in texts if t):
            n = len(tokenizer(text, truncation=False).input_ids)
            if n > limit:
                log.warning("%s %r: %d tokens; the text encoder reads only the first %d, the rest is ignored",
                            flag, text[:40] + "...", n, limit)


# --------------------------------------------------------------------------------------------- schedulers

def family_samplers(family) -> tuple[str, ...]:
    """The sampler names a family draws with: the flow families their own, the UNet families every other."""
    return family.samplers or tuple(n for n, spec in SCHEDULER_SPECS.items() if not spec[0].startswith("FlowMatch"))


def make_scheduler(name: str, scheduler_config, family=None, flag: str = "--scheduler"):
    """A diffusers scheduler by boothkit name, built from the model's own scheduler config; with `family`, a
    sampler that family does not draw with is refused by name."""
    import diffusers

    if name not in SCHEDULER_SPECS:
        raise ConfigError(f"{flag} {name!r} is not one of {', '.join(SCHEDULER_SPECS)}")
    if family is not None and name not in family_samplers(family):
        raise ConfigError(f"{flag} {name}: {family.label} models sample with {', '.join(family_samplers(family))}")
    cls_name, overrides, _ = SCHEDULER_SPECS[name]
    return getattr(diffusers, cls_name).from_config(scheduler_config, **overrides)


def scheduler_name(scheduler) -> str | None:
    """The boothkit name of a scheduler instance, if it is one of ours."""
    cls = type(scheduler).__name__
    for name, (cls_name, overrides, _) in SCHEDULER_SPECS.items():
        if cls_name == cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return None


def sampler_label(scheduler) -> str:
    """A1111-style sampler name of a scheduler (its class name when A1111 has none)."""
    name = scheduler_name(scheduler)
    return SCHEDULER_SPECS[name][2] if name else type(scheduler).__name__


# ----------------------------------------------------------------------------------------------- LoRAs

def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'PATH[:WEIGHT]' -> (path, weight); a suffix that is not a number stays part of the path."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def base_model_of(lora_path: str | Path) -> str:
    """The base model a boothkit LoRA was trained on (its boothkit.base_model metadata)."""
    model = L.read_lora_info(lora_path).get("base_model")
    if not model:
        raise BoothkitError(f"--lora {lora_path}: the file does not name its base model "
                            f"(not made by boothkit?); pass --model")
    return model


def load_generation_pipeline(model: str | None, loras: list[tuple[str, float]], *, model_config: str | None = None,
                             scheduler: str | None = None, dtype: torch.dtype = torch.float32,
                             vae: str | None = None):
    """Base pipeline with every LoRA loaded as its own adapter, on the GPU when there is one.

    model None takes the base model from the first LoRA's metadata; vae None its training VAE, if it had one.
    The pipeline remembers its LoRAs (``pipe.boothkit_loras``: adapter name, path, weight) for set_lora_scales,
    and starts at scales 1/1.
    """
    parts = [(run_parts(path), path, float(weight)) for path, weight in loras]
    # fail before the slow load
    files = [(L.lora_header(lora)[0], path, weight) for (lora, _), path, weight in parts if lora is not None]
    embeddings = [(emb, embedding_info(emb)) for (_, emb), _, _ in parts if emb is not None]
    if model is None:
        if not files and not embeddings:
            raise ConfigError(f"generate: give --lora (its metadata names the base model) or --model: {C.MODEL_CHOICES}")
        model = base_model_of(files[0][0]) if files else embeddings[0][1].get("base_model")
        if not model:
            raise BoothkitError(f"--lora {embeddings[0][0]}: the embedding does not name its base model; pass --model")
    if vae is None and files:
        vae = L.read_lora_info(files[0][0]).get("vae") or None
    if scheduler is not None and scheduler not in SCHEDULER_SPECS:
        raise ConfigError(f"--scheduler {scheduler!r} is not one of {', '.join(SCHEDULER_SPECS)}")
    pipe = models.load_pipeline(model, model_config=model_config, dtype=dtype, vae=vae)
    pipe.set_progress_bar_config(disable=True)  # boothkit shows one bar over all images instead
    family = families.family_of(pipe)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, family)
    for emb, info in embeddings:  # the identifier's learned tokens (Textual Inversion / pivotal runs)
        load_embeddings(pipe, family, emb, info.get("token") or emb.stem)
    adapters = []
    for i, (file, given, weight) in enumerate(files):
        apply_lora(pipe, file, given, f"lora{i}", model)
        adapters.append((f"lora{i}", str(given), weight))
    pipe.boothkit_model = model
    pipe.boothkit_vae = vae
    pipe.boothkit_loras = adapters
    set_lora_scales(pipe, 1.0, 1.0)
    return pipe.to(default_device())


def set_lora_scales(pipe, unet_scale: float, text_encoder_scale: float,
                    text_encoder_2_scale: float | None = None) -> None:
    """Scale every loaded LoRA (times its own weight) on the UNet and the text encoder(s); no reload.
    SDXL's second text encoder takes `text_encoder_2_scale`, or the text-encoder scale when it is None.

    Only the components an adapter actually has get a weight (diffusers warns otherwise). Scale 0 adds
    exactly zero in peft's LoRA layers, so 0/0 reproduces the base model bit for bit.
    """
    adapters = getattr(pipe, "boothkit_loras", [])
    if not adapters:
        return

    family = family_of(pipe)
    present, encoders = pipe.get_list_adapters(), family.trainable_encoders
    names, weights = [], []
    for name, _, weight in adapters:
        w = {}
        if name in present.get(family.denoiser, []):
            w[family.denoiser] = unet_scale * weight
        for k, component in enumerate(encoders):  # the first, or every one unless the second has its own
            scale = text_encoder_2_scale if k and text_encoder_2_scale is not None else text_encoder_scale
            if name in present.get(component, []):
                w[component] = scale * weight
        names.append(name)
        weights.append(w)
    pipe.set_adapters(names, adapter_weights=weights)


# -------------------------------------------------------------------------------------------- sampling

def image_size(pipe, width: int = 0, height: int = 0) -> tuple[int, int]:
    """(width, height) with 0 meaning the model's native size; both must be multiples of the VAE factor."""
    family = family_of(pipe)
    native = family.native_resolution(pipe)
    width, height = width or native, height or native
    for flag, value in (("--width", width), ("--height", height)):
        family.check_size(flag, value, pipe)
    return width, height


def iter_batches(pipe, prompt: str, seeds: Sequence[int], *, steps: int, guidance: float,
                 negative_prompt: str = "", width: int = 0, height: int = 0,
                 batch_size: int = 1) -> Iterator[list]:
    """Yield PIL images batch by batch; image k is drawn from torch.Generator('cpu').manual_seed(seeds[k])."""
    width, height = image_size(pipe, width, height)
    family = family_of(pipe)
    more = family.sample_kwargs(pipe)
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        # One generator per image: the initial noise (and an ancestral sampler's noise) of image k then
        # depends only on its own seed, whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
        with torch.inference_mode():
            out = pipe(prompt=[prompt] * len(chunk), num_inference_steps=steps, width=width, height=height,
                       generator=generators, output_type="pil", **more,
                       **family.guidance_kwargs(pipe, guidance, negative_prompt, len(chunk)))
        yield list(out.images)


def generate_images(pipe, prompt: str, *, num_images: int, seed: int, steps: int, guidance: float,
                    negative_prompt: str = "", width: int = 0, height: int = 0, batch_size: int = 1) -> list:
    """num_images PIL images of one prompt; image i uses seed + i."""
    seeds = [seed + i for i in range(num_images)]
    return [img for batch in iter_batches(pipe, prompt, seeds, steps=steps, guidance=guidance,
                                          negative_prompt=negative_prompt, width=width, height=height,
                                          batch_size=batch_size) for img in batch]


# --------------------------------------------------------------------------------------- PNG metadata

def _quote(value: str) -> str:
    # A1111 quotes a value (as JSON) when it would break the "Key: value, Key: value" line.
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def seed_list(seeds: Sequence[int]) -> str:
    """'4' for one seed, '0-3' for a run of them, '0 2 5' otherwise."""
    seeds = list(seeds)
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return " ".join(str(s) for s in seeds)


def parameters_text(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance: float,
                    seed: int | Sequence[int], width: int, height: int, model: str, loras: Sequence[tuple[str, float]],
                    unet_scale: float = 1.0, text_encoder_scale: float = 1.0,
                    text_encoder_2_scale: float | None = None, precision: str = "", vae: str = "", device: str = "",
                    extra: Mapping[str, str] | None = None) -> str:
    """AUTOMATIC1111-style generation parameters: prompt, negative prompt, then one 'Key: value' line.

    precision, vae, device (pipeline_fields gives them with the model): what else the pixels depend on; the
    precision is the torch dtype's name, as plain diffusers takes it (torch_dtype=torch.bfloat16). `seed`: one
    image's, or a grid's seeds in order ('Seeds'). The LoRA scales are written only where there are LoRAs."""
    one = isinstance(seed, int)
    fields = {
        "Steps": str(steps), "Sampler": sampler, "CFG scale": f"{guidance:g}",
        "Seed": str(seed) if one else "", "Seeds": "" if one else seed_list(seed),
        "Size": f"{width}x{height}", "Model": model, "VAE": vae, "Precision": precision, "Device": device,
        "Lora": ", ".join(f"{path}:{weight:g}" for path, weight in loras),
    }
    if loras:
        fields.update({"UNet scale": f"{unet_scale:g}", "TE scale": f"{text_encoder_scale:g}",
                       "TE2 scale": "" if text_encoder_2_scale is None else f"{text_encoder_2_scale:g}"})
    fields.update(extra or {})
    fields["Version"] = f"boothkit {__version__}"
    return render_parameters({"prompt": prompt, "negative_prompt": negative_prompt, **fields})


def render_parameters(params: Mapping[str, str]) -> str:
    """parse_parameters' dict back to text: the prompt, the negative prompt, then the non-empty fields in order,
    "Version" last (where AUTOMATIC1111 puts it, whatever order the dict was built in)."""
    fields = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt", "Version") and v != ""}
    if params.get("Version"):
        fields["Version"] = params["Version"]
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
    return f"{params['prompt']}\nNegative prompt: {params['negative_prompt']}\n{line}"


def pipeline_fields(pipe) -> dict[str, str]:
    """The model, VAE, precision and device a boothkit pipeline draws with, for parameters_text."""
    return {"model": str(getattr(pipe, "boothkit_model", "") or ""),
            "vae": str(getattr(pipe, "boothkit_vae", "") or ""),
            "precision": str(getattr(pipe, family_of(pipe).denoiser).dtype).removeprefix("torch."),
            "device": pipe.device.type}


_FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Inverse of parameters_text: {'prompt', 'negative_prompt', 'Steps', 'Sampler', ...} as strings."""
    lines = text.split("\n")
    *head, last = lines
    out: dict[str, str] = {}
    for m in _FIELD.finditer(last):
        key, value = m.group(1).strip(), m.group(2).strip()
        out[key] = json.loads(value) if value.startswith('"') else value
    neg = [i for i, s in enumerate(head) if s.startswith("Negative prompt:")]
    cut = neg[0] if neg else len(head)
    out["prompt"] = "\n".join(head[:cut])
    out["negative_prompt"] = "\n".join(head[cut:])[len("Negative prompt:"):].strip() if neg else ""
    return out


def save_png(img, path: str | Path, parameters: str) -> Path:
    """Write a PNG with a 'parameters' text chunk (iTXt when the text is not Latin-1), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def make_grid(images: Sequence, cols: int):
    """Paste images (all the size of the first) into a grid with `cols` columns, row by row."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)) if img.size != (w, h) else img.convert("RGB"),
                   ((k % cols) * w, (k // cols) * h))
    return grid


# ------------------------------------------------------------------------------------------------ command

def run_generate(cfg: C.RunConfig, stop: threading.Event | None = None) -> list[Path]:
    """`boothkit generate`: PNGs with their parameters, a grid per prompt and the resolved config."""
    g = cfg.generate
    C.check_output(g.out, "--out")

    loras = [parse_lora_spec(s) for s in g.lora]
    for path, _ in loras:  # a wrong path or damaged file fails now, not after loading the model
        lora, emb = run_parts(path)
        if lora is not None:
            L.lora_header(lora)
        if emb is not None:
            embedding_info(emb)
    dtype = precision_dtype(g.mixed_precision, default_device())
    cfg = cfg.replace("generate", mixed_precision=mixed_precision_name(dtype))
    out = Path(g.out)
    pipe = load_generation_pipeline(g.model, loras, model_config=g.model_config, scheduler=g.scheduler, dtype=dtype,
                                    vae=g.vae)
    set_lora_scales(pipe, g.unet_scale, g.text_encoder_scale, g.text_encoder_2_scale)
    warn_long_prompts(pipe, {"--prompt": g.prompt, "--negative-prompt": [g.negative_prompt]})
    width, height = image_size(pipe, g.width, g.height)
    family = family_of(pipe)
    guidance = family.guidance_of(pipe) if g.guidance is None else g.guidance
    if g.negative_prompt and not family.reads_negative_prompts(pipe):
        log.warning("--negative-prompt: this %s model ignores negative prompts (its guidance is distilled); it has "
                    "no effect", family.label)
    # Record the base model actually used, so the saved config repeats the run even if --model was implied.
    resolved = cfg.replace("generate", model=g.model or pipe.boothkit_model, vae=g.vae or pipe.boothkit_vae,
                           guidance=guidance)
    out.mkdir(parents=True, exist_ok=True)
    C.save_toml(out / "generate_config.toml", resolved.to_dict())
    params = functools.partial(parameters_text, negative_prompt=g.negative_prompt, steps=g.steps,
                               sampler=sampler_label(pipe.scheduler), guidance=guidance, width=width,
                               height=height, **pipeline_fields(pipe), loras=loras, unet_scale=g.unet_scale,
                               text_encoder_scale=g.text_encoder_scale,
                               text_encoder_2_scale=g.text_encoder_2_scale)
    written: list[Path] = []
    with progress_bar("generating", len(g.prompt) * g.num_images) as advance:
        for p, prompt in enumerate(g.prompt):
            seeds = [g.seed + i for i in range(g.num_images)]
            images: list = []
            for batch in iter_batches(pipe, prompt, seeds, steps=g.steps, guidance=guidance,
                                      negative_prompt=g.negative_prompt, width=width, height=height,
                                      batch_size=g.batch_size):
                for img in batch:
                    index, s = p * g.num_images + len(images), seeds[len(images)]
                    path = out / f"{index:03d}-{slug(prompt)}-s{s}.png"
                    written.append(save_png(img, path, params(prompt, seed=s)))
                    images.append(img)
                advance(len(batch))
                if stop is not None and stop.is_set() and len(written) < len(g.prompt) * g.num_images:
                    raise Interrupted(f"interrupted after {len(written)} pictures; they are kept in {out}")
            grid = make_grid(images, math.ceil(math.sqrt(len(images))))
            save_png(grid, out / f"grid-{p:02d}-{slug(prompt)}.png", params(prompt, seed=seeds))
    return written
