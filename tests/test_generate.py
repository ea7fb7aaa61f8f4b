"""boothkit generate against plain diffusers: scales 1/1 == load_lora_weights, 0/0 == base model, and the rest."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit import cli
from boothkit.core import config as C
from boothkit.generate import generation as G
from boothkit import adapters as L
from boothkit.core.errors import BoothkitError, ConfigError
from boothkit.models.families import SD

PROMPT = "a photo of sks dog"
STEPS, GUIDANCE = 4, 7.5
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")



pytestmark = pytest.mark.usefixtures("one_thread")

def make_lora(tiny_path: Path, path: Path, seed: int) -> Path:
    """A boothkit LoRA for the tiny model with small random (nonzero) B matrices on UNet and text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_path, subfolder="text_encoder")
    L.add_lora(unet, UNET_TARGETS, rank=4, alpha=4)
    L.add_lora(te, TE_TARGETS, rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    for model in (unet, te):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.2
    return L.save_lora_file(
        path, {"unet": L.lora_state_dict(unet), "text_encoder": L.lora_state_dict(te)},
        {"unet": L.adapter_metadata(UNET_TARGETS, 4, 4), "text_encoder": L.adapter_metadata(TE_TARGETS, 4, 4)},
        {"base_model": str(tiny_path), "token": "sks", "class_noun": "dog"})


def plain_pipe(tiny_path: Path, *loras: Path):
    """Plain diffusers, nothing from boothkit: from_pretrained + load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for k, path in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"plain{k}")
    return pipe


def plain_images(pipe, seeds, prompt=PROMPT) -> list[np.ndarray]:
    return [np.asarray(pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            generator=torch.Generator("cpu").manual_seed(s)).images[0], dtype=np.int16)
            for s in seeds]


def ours(pipe, seed=0, n=2, **kw) -> list[np.ndarray]:
    imgs = G.generate_images(pipe, PROMPT, num_images=n, seed=seed, steps=STEPS, guidance=GUIDANCE, **kw)
    return [np.asarray(im, dtype=np.int16) for im in imgs]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def lora_a(tiny_path, tmp_path_factory) -> Path:
    return make_lora(tiny_path, tmp_path_factory.mktemp("lora_a") / L.LORA_FILE, seed=1)


@pytest.fixture(scope="module")
def lora_b(tiny_path, tmp_path_factory) -> Path:
    return make_lora(tiny_path, tmp_path_factory.mktemp("lora_b") / "b.safetensors", seed=2)


@pytest.fixture(scope="module")
def pipe(lora_a):
    """boothkit's pipeline with LoRA A; the base model comes from the file's metadata."""
    return G.load_generation_pipeline(None, [(str(lora_a.parent), 1.0)])


@pytest.fixture(scope="module")
def plain_a(tiny_path, lora_a):
    return plain_pipe(tiny_path, lora_a)


@pytest.fixture(scope="module")
def base_images(tiny_path) -> list[np.ndarray]:
    return plain_images(plain_pipe(tiny_path), [0, 1])


@pytest.mark.slow
def test_full_scales_equal_plain_diffusers(pipe, plain_a, base_images):
    G.set_lora_scales(pipe, 1.0, 1.0)
    plain_a.set_adapters(["plain0"], adapter_weights=[{"unet": 1.0, "text_encoder": 1.0}])
    mine = ours(pipe)
    assert max_diff(mine, plain_images(plain_a, [0, 1])) <= 1  # measured: 0 (bit-identical) on CPU
    assert max_diff(mine, base_images) > 2  # the LoRA does change the picture


@pytest.mark.slow
def test_zero_scales_equal_base_model(pipe, base_images):
    G.set_lora_scales(pipe, 0.0, 0.0)
    assert max_diff(ours(pipe), base_images) == 0


@pytest.mark.slow
def test_partial_scales_differ_and_match_diffusers_adapter_weights(pipe, plain_a, base_images):
    G.set_lora_scales(pipe, 1.0, 1.0)
    full = ours(pipe)
    G.set_lora_scales(pipe, 0.8, 0.8)
    partial = ours(pipe)
    assert max_diff(partial, full) > 2 and max_diff(partial, base_images) > 2
    plain_a.set_adapters(["plain0"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.8}])
    assert max_diff(partial, plain_images(plain_a, [0, 1])) <= 1
    # The two scales act separately: UNet-only and text-encoder-only LoRA give different pictures.
    G.set_lora_scales(pipe, 1.0, 0.0)
    unet_only = ours(pipe)
    G.set_lora_scales(pipe, 0.0, 1.0)
    te_only = ours(pipe)
    assert min(max_diff(unet_only, te_only), max_diff(unet_only, base_images), max_diff(te_only, base_images)) > 2


def test_batching_does_not_change_images(pipe):
    G.set_lora_scales(pipe, 1.0, 1.0)
    one = ours(pipe, seed=7, n=3, batch_size=1)
    assert max_diff(ours(pipe, seed=7, n=3, batch_size=2), one) <= 1
    assert max_diff(ours(pipe, seed=8, n=2), one[1:]) == 0  # image i depends on seed + i only


def test_lora_weight_multiplies_both_scales(lora_a, pipe):
    half = G.load_generation_pipeline(None, [(str(lora_a), 0.5)])
    G.set_lora_scales(half, 1.6, 1.6)  # 0.5 * 1.6 == 0.8 exactly in binary floating point
    G.set_lora_scales(pipe, 0.8, 0.8)
    assert max_diff(ours(half), ours(pipe)) == 0


@pytest.mark.slow
def test_two_loras_with_weights_match_diffusers(tiny_path, lora_a, lora_b, pipe):
    from diffusers import DPMSolverMultistepScheduler

    both = G.load_generation_pipeline(str(tiny_path), [(str(lora_a), 0.5), G.parse_lora_spec(f"{lora_b}:0.7")],
                                      scheduler="dpm++2m-karras")
    assert both.get_list_adapters() == {"unet": ["lora0", "lora1"], "text_encoder": ["lora0", "lora1"]}
    G.set_lora_scales(both, 1.0, 0.5)
    plain = plain_pipe(tiny_path, lora_a, lora_b)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, algorithm_type="dpmsolver++",
                                                              use_karras_sigmas=True)
    plain.set_adapters(["plain0", "plain1"], adapter_weights=[{"unet": 0.5, "text_encoder": 0.25},
                                                              {"unet": 0.7, "text_encoder": 0.35}])
    mine = ours(both)
    assert max_diff(mine, plain_images(plain, [0, 1])) <= 1
    G.set_lora_scales(pipe, 0.5, 0.25)
    assert max_diff(mine, ours(pipe)) > 2  # B's contribution (and the sampler) show


def test_negative_prompt_and_size_match_diffusers(pipe, plain_a):
    G.set_lora_scales(pipe, 1.0, 1.0)
    plain_a.set_adapters(["plain0"], adapter_weights=[{"unet": 1.0, "text_encoder": 1.0}])
    [img] = G.generate_images(pipe, PROMPT, num_images=1, seed=4, steps=STEPS, guidance=GUIDANCE,
                              negative_prompt="blurry", width=48, height=72)
    assert img.size == (48, 72)
    ref = plain_a(PROMPT, negative_prompt="blurry", width=48, height=72, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    without = ours(pipe, seed=4, n=1)[0]
    mine = np.asarray(img, dtype=np.int16)
    assert max_diff([mine], [np.asarray(ref, dtype=np.int16)]) <= 1
    square = G.generate_images(pipe, PROMPT, num_images=1, seed=4, steps=STEPS, guidance=GUIDANCE,
                               negative_prompt="blurry")[0]
    assert max_diff([np.asarray(square, dtype=np.int16)], [without]) > 2  # the negative prompt matters


def kohya_file(tiny_path: Path, path: Path) -> tuple[Path, dict]:
    """A LoRA in kohya-ss / A1111 layout (lora_unet_* / lora_te_* keys, lora_down/lora_up, .alpha)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    g = torch.Generator().manual_seed(3)
    sd, rank, alpha = {}, 4, 2.0
    modules = {"lora_unet_" + m.replace(".", "_"): unet.get_submodule(m) for m in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v")}
    # kohya writes every attention projection of a text-encoder layer; diffusers recognises the layout by out_proj
    modules.update({f"lora_te_text_model_encoder_layers_0_self_attn_{p}": torch.nn.Linear(64, 64) for p in TE_TARGETS})
    for key, lin in modules.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path, sd


def test_kohya_format_loads_with_its_alpha_and_changes_output(tiny_path, tmp_path, base_images):
    path, sd = kohya_file(tiny_path, tmp_path / "kohya.safetensors")
    with pytest.raises(BoothkitError, match="does not name its base model"):
        G.load_generation_pipeline(None, [(str(path), 1.0)])
    pipe = G.load_generation_pipeline(str(tiny_path), [(str(path), 1.0)])
    assert pipe.get_list_adapters() == {"unet": ["lora0"], "text_encoder": ["lora0"]}
    # The loaded update equals kohya's definition: up @ down * alpha / rank.
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    loaded = layer.lora_B["lora0"].weight @ layer.lora_A["lora0"].weight * layer.scaling["lora0"]
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    expected = sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] * (2.0 / 4)
    torch.testing.assert_close(loaded, expected)
    assert max_diff(ours(pipe), base_images) > 2
    G.set_lora_scales(pipe, 0.0, 1.0)  # its text-encoder part alone also shows
    assert max_diff(ours(pipe), base_images) > 2
    G.set_lora_scales(pipe, 0.0, 0.0)
    assert max_diff(ours(pipe), base_images) == 0


def test_every_scheduler_builds_from_the_model_config_and_samples(pipe):
    import diffusers

    G.set_lora_scales(pipe, 1.0, 1.0)
    own = pipe.scheduler
    assert G.scheduler_name(own) == "ddim"  # the tiny model ships DDIM
    results = {}
    try:
        for name in G.family_samplers(SD):
            pipe.scheduler = G.make_scheduler(name, own.config, SD)
            assert isinstance(pipe.scheduler, getattr(diffusers, G.SCHEDULER_SPECS[name][0]))
            assert G.scheduler_name(pipe.scheduler) == name
            assert pipe.scheduler.config.num_train_timesteps == own.config.num_train_timesteps
            assert pipe.scheduler.config.beta_schedule == own.config.beta_schedule
            [img] = G.generate_images(pipe, PROMPT, num_images=1, seed=0, steps=3, guidance=GUIDANCE)
            assert img.size == (64, 64)
            results[name] = np.asarray(img, dtype=np.int16)
    finally:
        pipe.scheduler = own
    assert int(np.abs(results["ddim"] - results["euler-a"]).max()) > 2
    assert int(np.abs(results["dpm++2m"] - results["dpm++2m-karras"]).max()) > 0
    assert G.sampler_label(G.make_scheduler("dpm++2m-karras", own.config)) == "DPM++ 2M Karras"
    assert set(C.SCHEDULERS) - set(G.family_samplers(SD)) == {"flow-euler"}
    with pytest.raises(ConfigError, match="^--scheduler flow-euler: SD 1.x/2.x models sample with ddim, "):
        G.make_scheduler("flow-euler", own.config, SD)


def test_parameters_round_trip_through_png(tmp_path):
    loras = [("out/my, lora", 0.8), ("C:/x/b.safetensors", 0.5)]
    text = G.parameters_text("an image of [ktn] girl, on the moon", "blurry, low quality", steps=30,
                             sampler="DPM++ 2M Karras", guidance=7.5, seed=12, width=64, height=48,
                             model="/models/sd 1.5", loras=loras, unet_scale=0.8, text_encoder_scale=0.6)
    lines = text.split("\n")
    assert lines[0] == "an image of [ktn] girl, on the moon"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 12, Size: 64x48, ")
    path = G.save_png(Image.new("RGB", (64, 48), "red"), tmp_path / "x.png", text)
    with Image.open(path) as im:
        stored = im.text["parameters"]
    assert stored == text
    got = G.parse_parameters(stored)
    assert got["prompt"] == "an image of [ktn] girl, on the moon"
    assert got["negative_prompt"] == "blurry, low quality"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"], got["Size"]) == \
           ("30", "DPM++ 2M Karras", "7.5", "12", "64x48")
    assert (got["Model"], got["UNet scale"], got["TE scale"]) == ("/models/sd 1.5", "0.8", "0.6")
    assert got["Lora"] == "out/my, lora:0.8, C:/x/b.safetensors:0.5"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_make_grid_places_images_row_by_row():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = G.make_grid([Image.new("RGB", (8, 6), c) for c in colors], cols=2)
    assert grid.size == (16, 12)
    assert grid.getpixel((1, 1)) == colors[0] and grid.getpixel((9, 1)) == colors[1]
    assert grid.getpixel((1, 7)) == colors[2] and grid.getpixel((9, 7)) == (255, 255, 255)


def test_lora_spec_parsing():
    assert G.parse_lora_spec("out/a:0.8") == ("out/a", 0.8)
    assert G.parse_lora_spec("out/a") == ("out/a", 1.0)
    assert G.parse_lora_spec(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert G.parse_lora_spec("a:b:-0.5") == ("a:b", -0.5)


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.slow
def test_cli_generate_writes_reproducible_pngs_grid_and_config(tiny_path, lora_a, plain_a, tmp_path, capsys):
    out = tmp_path / "gen"
    code, err = run_cli(["generate", "--lora", str(lora_a.parent), "--prompt", PROMPT, "-n", "3", "--seed", "5",
                         "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--batch-size", "2",
                         "--out", str(out)], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-a-photo-of-sks-dog-s5.png", "001-a-photo-of-sks-dog-s6.png",
                     "002-a-photo-of-sks-dog-s7.png", "generate_config.toml", "grid-00-a-photo-of-sks-dog.png"]
    # the CLI's default LoRA scales (config.LORA_SCALE) are what plain diffusers gets with the same weights
    plain_a.set_adapters(["plain0"], adapter_weights=[{"unet": C.LORA_SCALE, "text_encoder": C.LORA_SCALE}])
    mine = [np.asarray(Image.open(out / n).convert("RGB"), dtype=np.int16) for n in names[:3]]
    assert max_diff(mine, plain_images(plain_a, [5, 6, 7])) <= 1
    with Image.open(out / names[1]) as im:
        params = G.parse_parameters(im.text["parameters"])
    assert (params["prompt"], params["Seed"], params["Sampler"], params["Steps"]) == (PROMPT, "6", "DDIM", "4")
    assert params["Model"] == str(tiny_path)  # from the LoRA's metadata
    saved = tomllib.loads((out / "generate_config.toml").read_text())["generate"]
    assert saved["model"] == str(tiny_path)  # the implied base model is recorded, so the config repeats the run
    assert saved["lora"] == [str(lora_a.parent)] and saved["num_images"] == 3
    with Image.open(out / names[4]) as grid:
        assert grid.size == (128, 128)  # 3 images, 2 columns
        gp = G.parse_parameters(grid.text["parameters"])
    assert gp["Seeds"] == "5-7" and "Seed" not in gp  # a grid names all its seeds, not one image's
    assert G.seed_list([3]) == "3" and G.seed_list([0, 2, 5]) == "0 2 5"


@pytest.mark.slow
def test_bf16_picture_is_reproduced_by_plain_diffusers_from_its_parameters(lora_a, tmp_path, capsys):
    """A PNG's parameters chunk says everything its pixels depend on: plain diffusers, given only what it records
    (model, precision as torch_dtype, LoRA and scales, sampler, steps, guidance, size, seed on its device), draws
    the same picture. bf16 on a CPU without bf16 instructions is emulated: slower, the same numbers."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "gen"
    code, err = run_cli(["generate", "--lora", str(lora_a.parent), "--prompt", PROMPT, "--negative-prompt", "blurry",
                         "-n", "2", "--seed", "3", "--steps", str(STEPS), "--guidance", "5", "--unet-scale", "0.7",
                         "--text-encoder-scale", "0.6", "--mixed-precision", "bf16", "--out", str(out)], capsys)
    assert code == 0, err
    png = out / "001-a-photo-of-sks-dog-s4.png"
    with Image.open(png) as im:
        p = G.parse_parameters(im.text["parameters"])
        mine = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert (p["Precision"], p["Device"], p["Sampler"], p["Seed"]) == ("bfloat16", "cpu", "DDIM", "4") and "VAE" not in p
    saved = tomllib.loads((out / "generate_config.toml").read_text())["generate"]
    assert saved["mixed_precision"] == "bf16" and saved["seed"] == 3

    plain = StableDiffusionPipeline.from_pretrained(p["Model"], torch_dtype=getattr(torch, p["Precision"]),
                                                    safety_checker=None, requires_safety_checker=False)
    assert type(plain.scheduler).__name__ == "DDIMScheduler"  # the model's own sampler, as "DDIM" says
    lora, scale = G.parse_lora_spec(p["Lora"])
    plain.load_lora_weights(lora, adapter_name="a")
    plain.set_adapters(["a"], adapter_weights=[{"unet": float(p["UNet scale"]) * scale,
                                                "text_encoder": float(p["TE scale"]) * scale}])
    plain.set_progress_bar_config(disable=True)
    width, height = map(int, p["Size"].split("x"))
    theirs = plain(p["prompt"], negative_prompt=p["negative_prompt"], num_inference_steps=int(p["Steps"]),
                   guidance_scale=float(p["CFG scale"]), width=width, height=height,
                   generator=torch.Generator(p["Device"]).manual_seed(int(p["Seed"]))).images[0]
    assert max_diff([mine], [np.asarray(theirs, dtype=np.int16)]) <= 1
    code, err = run_cli(["generate", "--lora", str(lora_a.parent), "--prompt", PROMPT, "--negative-prompt", "blurry",
                         "-n", "2", "--seed", "3", "--steps", str(STEPS), "--guidance", "5", "--unet-scale", "0.7",
                         "--text-encoder-scale", "0.6", "--mixed-precision", "no", "--out", str(tmp_path / "fp32")],
                        capsys)
    assert code == 0, err
    with Image.open(tmp_path / "fp32" / png.name) as im:
        assert G.parse_parameters(im.text["parameters"])["Precision"] == "float32"
        assert max_diff([mine], [np.asarray(im.convert("RGB"), dtype=np.int16)]) > 1  # the precision matters


@pytest.mark.parametrize("argv, message", [
    (["--lora", "/nonexistent/out", "--prompt", "x"], "--lora /nonexistent/out: no LoRA file found"),
    (["--lora", "{pt}", "--prompt", "x"], "a pickle file, which can run code"),
    (["--lora", "{lora}", "--prompt", "x", "--scheduler", "heun"], "--scheduler"),
    (["--lora", "{lora}", "--prompt", "x", "--width", "60"], "--width 60: must be a multiple of 8"),
    (["--model", "tiny"], "--prompt"),
    (["--prompt", "x"], "--lora"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, lora_a, tmp_path, capsys):
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"not a safetensors file")
    argv = [a.format(pt=pt, lora=lora_a) for a in argv]
    code, err = run_cli(["generate", *argv, "-n", "1", "--steps", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # (libraries imported before main() may still draw loading bars above)
    assert last.startswith("error: ") and message in last, err


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        G.precision_dtype("fp16", "cpu")
    assert G.precision_dtype("bf16", "cpu") is torch.bfloat16
