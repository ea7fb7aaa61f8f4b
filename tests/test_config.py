"""Config validation: unknown keys and wrong types name the key; precedence; saved configs round-trip."""
from pathlib import Path

import pytest

from boothkit.core import config as C
from boothkit.core import hub_ids, presets
from boothkit.core.errors import ConfigError
from boothkit.core.files import atomic_write_bytes

BASE = {"data": {"instance_dir": "photos", "class_noun": "dog"}, "train": {"output_dir": "out"}}


def resolve(file_values=None, overrides=None):
    return C.resolve(C.TRAIN_SECTIONS, file_values or BASE, overrides)


def test_defaults_and_derived_prompts():
    cfg = resolve()
    assert cfg.lora.rank == 8 and cfg.prior.prior is True and cfg.prior.prior_weight == 1.0
    assert cfg.data.prompt == "a photo of sks dog"
    assert cfg.prior.prompt_for("dog") == "a photo of dog"
    assert resolve(overrides={"instance_prompt": "an image of [ktn] girl"}).data.prompt == "an image of [ktn] girl"


@pytest.mark.parametrize("values, match", [
    ({**BASE, "lora": {"rnak": 4}}, "lora.rnak"),
    ({**BASE, "lora": {"rank": "8"}}, "lora.rank: expected an integer"),
    ({**BASE, "lora": {"rank": 0}}, "lora.rank: 0 is below the minimum"),
    ({**BASE, "lora": {"rank": True}}, "lora.rank"),
    ({**BASE, "train": {"output_dir": "o", "mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({**BASE, "prior": {"prior": "yes"}}, "prior.prior: expected true or false"),
    ({**BASE, "optim": {}}, "unknown section 'optim'"),
    ({"data": {"instance_dir": "p"}, "train": {"output_dir": "o"}}, "data.class_noun is required"),
])
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        resolve(values)


def test_train_needs_instance_dir_but_class_images_does_not():
    values = {"data": {"class_noun": "dog"}, "train": {"output_dir": "o"}}
    with pytest.raises(ConfigError, match="data.instance_dir is required"):
        C.validate_train(resolve(values))
    assert C.resolve(C.CLASS_IMAGES_SECTIONS, {"data": {"class_noun": "dog"}}).data.instance_dir == ""


def test_cli_overrides_file_and_unknown_override():
    cfg = resolve({**BASE, "lora": {"rank": 4, "alpha": 2}}, {"rank": 16})
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 2.0
    assert isinstance(cfg.lora.alpha, float)
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        resolve(overrides={"bogus": 1})


def test_saved_config_round_trips(tmp_path):
    cfg = resolve({**BASE, "lora": {"unet_targets": ["to_q", "to_v"]}})
    C.save_toml(tmp_path / "config.toml", cfg.to_dict())
    again = C.resolve(C.TRAIN_SECTIONS, C.load_toml(tmp_path / "config.toml"))
    assert again == cfg
    assert again.lora.unet_targets == ("to_q", "to_v")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 1")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        C.load_toml(bad)


def test_configs_are_frozen():
    cfg = resolve()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 3


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_has_normal_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.toml", b"x = 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "out.toml").stat().st_mode & 0o777 == 0o644


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_configs_are_valid(name):
    """Every shipped example stays in step with the config schema (a renamed key would break it)."""
    path = EXAMPLES / name
    assert C.load_toml(path)["model"]["model"]  # every example names its model: there is no default
    cfg = C.resolve(C.TRAIN_SECTIONS, C.load_toml(path), {"instance_dir": "p", "class_noun": "dog", "output_dir": "o"})
    if name.startswith("mini"):
        token = C.load_toml(path)["data"]["token"]
        assert cfg.data.prompt == f"an emoji of {token} dog" and cfg.prior.prompt_for("dog") == "an emoji of a dog"
    if name.startswith(("mini-default", "mini-flow-default")):  # the model's own recipe: its preset, nothing else
        preset = C.model_preset(cfg.model.model)
        assert (cfg.lora.rank, cfg.train.text_encoder_lr, cfg.prior.prior_target) == \
               (preset["lora"]["rank"], preset["train"]["text_encoder_lr"], preset["prior"]["prior_target"])
    elif not name.startswith("mini"):
        assert cfg.data.prompt == "a photo of sks dog"


@pytest.mark.parametrize("sections, values, match", [
    (C.GENERATE_SECTIONS, {"generate": {"out": "o", "model": "tiny"}}, r"generate.prompt is required \(--prompt\)"),
    (C.GENERATE_SECTIONS, {"generate": {"prompt": ["p"], "model": "tiny"}}, r"generate.out is required \(--out\)"),
    (C.TRAIN_SECTIONS, {"data": {"class_noun": "dog"}}, r"train.output_dir is required \(--output-dir\)"),
])
def test_required_fields_name_key_and_flag(sections, values, match):
    with pytest.raises(ConfigError, match=match):
        C.resolve(sections, values)


def test_model_is_required_and_the_error_says_what_to_give(no_default_model):
    """No default model: a config without one is refused in one line naming the choices (the random-weight tiny
    model trains only when asked for)."""
    assert C.ModelConfig().model == ""
    with pytest.raises(ConfigError) as exc:
        resolve()
    said = str(exc.value)
    assert said == f"model.model is required (--model): {C.MODEL_CHOICES}" and "\n" not in said
    assert f"a hub id ({hub_ids.SD15})" in said and "mini (pretrained on emoji" in said and "tiny (random weights" in said
    for values in ({**BASE, "model": {"model": ""}}, {**BASE, "model": {}}):  # an empty model is no model
        with pytest.raises(ConfigError, match=r"^model\.model is required \(--model\): a hub id"):
            resolve(values)
    with pytest.raises(ConfigError, match=r"^model\.model is required"):
        C.resolve(C.CLASS_IMAGES_SECTIONS, {"data": {"class_noun": "dog"}})
    with pytest.raises(ConfigError, match="lora.rnak"):  # a typo is still reported before a missing value
        resolve({**BASE, "lora": {"rnak": 4}})
    with pytest.raises(ConfigError, match="model.model: expected a string"):
        resolve({**BASE, "model": {"model": 3}})
    assert resolve({**BASE, "model": {"model": "tiny"}}).model.model == "tiny"


def test_default_model_from_the_environment_is_a_default(monkeypatch):
    """BOOTHKIT_DEFAULT_MODEL (the test suite's tiny) fills only a model nobody named, and its preset applies."""
    monkeypatch.setenv(C.DEFAULT_MODEL_ENV, "mini")
    cfg = resolve()
    assert cfg.model.model == "mini" and cfg.train.max_steps == C.model_preset("mini")["train"]["max_steps"]
    assert resolve({**BASE, "model": {"model": "tiny"}}).model.model == "tiny"
    assert resolve(BASE, {"model": "tiny"}).model.model == "tiny"
    with pytest.raises(ConfigError, match="model.model is required"):  # an empty model given is still refused
        resolve({**BASE, "model": {"model": ""}})


def test_prompt_templates_fill_only_their_placeholders():
    cfg = C.resolve(C.TRAIN_SECTIONS, {"data": {"instance_prompt": "{token} {class_noun} {style} {}"},
                                       "prior": {"class_prompt": "an image of a {class_noun}"}},
                    {"instance_dir": "p", "class_noun": "girl", "token": "[ktn]", "output_dir": "o"})
    assert cfg.data.prompt == "[ktn] girl {style} {}"
    assert cfg.prior.prompt_for("girl") == "an image of a girl"


def test_readme_flags_table_names_real_train_flags():
    """Every flag in the README's train flags table is one `boothkit train` takes (a renamed flag would leave the
    README pointing at nothing)."""
    import re

    from boothkit.cli import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| what | flags")[1].split("\n\n")[0]
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", table))
    train = cli.commands["train"]
    flags = {o for p in train.params for o in (*p.opts, *p.secondary_opts)}
    assert len(named) > 40 and named <= flags, sorted(named - flags)


@pytest.mark.parametrize("preset", sorted(p.stem for p in C.MODEL_PRESETS.glob("*.toml")))
def test_every_model_preset_is_a_valid_train_config(preset):
    """Like litgpt's configs: each built-in model's preset resolves as a config of every command that reads it."""
    values = C.model_preset(preset)
    assert values, preset
    cfg = C.resolve(C.TRAIN_SECTIONS, {**BASE, "model": {"model": preset}})
    for name, table in values.items():
        assert {k: getattr(getattr(cfg, name), k) for k in table} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    C.resolve(C.CLASS_IMAGES_SECTIONS, {"model": {"model": preset}, "data": {"class_noun": "dog"}})


def test_a_model_preset_sits_between_the_defaults_and_the_config():
    mini = C.model_preset("mini")
    cfg = resolve({**BASE, "model": {"model": "mini"}})
    assert cfg.train.text_encoder_lr == mini["train"]["text_encoder_lr"] != C.TrainConfig().text_encoder_lr
    assert cfg.data.prompt == "an emoji of sks dog"
    assert cfg.train.seed == C.TrainConfig().seed  # what the preset leaves out keeps the default
    in_file = resolve({**BASE, "model": {"model": "mini"}, "lora": {"rank": 4}}, {"text_encoder_lr": 2e-5})
    assert in_file.lora.rank == 4 and in_file.train.text_encoder_lr == 2e-5  # file and flags win
    assert in_file.lora.train_text_encoder is True
    flag = resolve(BASE, {"model": "mini", "max_steps": 7})
    assert flag.train.max_steps == 7 and flag.train.learning_rate == mini["train"]["learning_rate"]
    other = resolve({**BASE, "model": {"model": "tiny"}})  # no preset: the dataclass defaults
    assert other.train.text_encoder_lr == C.TrainConfig().text_encoder_lr and other.data.prompt == "a photo of sks dog"
    assert C.model_preset("../mini") == {} and C.model_preset("some/hub-id") == {}


@pytest.mark.parametrize("name", list(presets.recipe_titles()))
def test_every_training_recipe_is_a_valid_config_the_cli_and_the_ui_offer(name):
    """Like litgpt's configs: each recipe (presets/recipes/) resolves, every key it sets reaches the config, on top
    of its model's own recipe; the UI offers it under its title with the same values."""
    from boothkit import ui

    values = presets.recipe(name)
    assert values and (presets.RECIPES / f"{name}.toml").is_file()
    cfg = C.resolve(C.TRAIN_SECTIONS, {k: {**values.get(k, {}), **BASE.get(k, {})} for k in {*values, *BASE}})
    for section, table in values.items():
        assert {k: getattr(getattr(cfg, section), k) for k in table} == table, section
    for section, table in C.model_preset(cfg.model.model).items():  # the model's recipe fills what it leaves
        assert all(getattr(getattr(cfg, section), k) == v for k, v in table.items()
                   if k not in values.get(section, {})), section
    form = ui.PRESETS[presets.recipe_titles()[name]]
    assert {k: v for k, v in form.items() if k in presets.flat(values)} == presets.flat(values)


def test_recipes_are_the_ones_listed_and_the_examples_link_to_them():
    assert sorted(p.stem for p in presets.RECIPES.glob("*.toml")) == sorted(presets.recipe_titles())
    assert next(iter(presets.recipe_titles())) == "mini"  # what the UI opens on
    example = Path(__file__).resolve().parents[1] / "examples" / "sd15-lora.toml"
    assert example.resolve() == presets.RECIPES / "sd15-lora.toml"


def test_preset_sits_under_the_config_file_and_the_flags(tmp_path, monkeypatch):
    from boothkit import cli

    seen = []
    monkeypatch.setattr("boothkit.train.loop.run_training", lambda cfg: seen.append(cfg) or tmp_path)
    monkeypatch.setattr(cli.C, "validate_train", lambda cfg: cfg)
    config = tmp_path / "c.toml"
    config.write_text('[lora]\nrank = 4\n')
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--preset", "sd15-lora", "--config", str(config), "--max-steps", "7", "--instance-dir",
                  "photos", "--class-noun", "dog", "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 0
    cfg, sd15 = seen[0], presets.recipe("sd15-lora")
    assert cfg.model.model == hub_ids.SD15 and cfg.lora.alpha == sd15["lora"]["alpha"]  # from the preset
    assert cfg.lora.rank == 4 and cfg.train.max_steps == 7  # the file and the flag win
    assert cfg.train.checkpoint_every == sd15["train"]["checkpoint_every"]
