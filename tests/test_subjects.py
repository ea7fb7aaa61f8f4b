"""Several subjects in one run (--subject FOLDER TOKEN CLASS, [[data.subjects]]): config, draws, class folders,
the saved config and LoRA metadata, on the tiny model."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.mini.subjects import PHOTOS, SUBJECTS
from boothkit.train import prior
from boothkit.train.batches import LatentBank, draw_batch
from boothkit.cli import main
from boothkit.core.errors import ConfigError
from boothkit.adapters.lora import LORA_FILE
from boothkit.train.loop import run_training

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_folders(tmp_path, demo_subject):
    """A 'dog' folder of three demo photos and a 'cat' folder of two plain pictures."""
    dog, cat = tmp_path / "dog", tmp_path / "cat"
    dog.mkdir()
    cat.mkdir()
    for p in sorted(demo_subject.glob("*.jpg"))[:3]:
        shutil.copy(p, dog / p.name)
    for i in range(2):
        Image.new("RGB", (96, 96), (200, 40 * i, 90)).save(cat / f"{i}.png")
    return dog, cat


def resolve(values, file_values=None):
    return C.resolve(C.TRAIN_SECTIONS, file_values or {}, values)


def base(out, **over):
    return {"output_dir": str(out), "max_steps": 4, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
            "num_class_images": 2, "class_steps": 1, "class_batch_size": 2, **over}


def test_subjects_from_flags_and_from_toml_tables(two_folders, tmp_path):
    dog, cat = two_folders
    flags = resolve({**base(tmp_path / "o"), "instance_dir": str(dog), "token": "sks", "class_noun": "dog",
                     "subjects": [[str(cat), "zwx", "cat"]]})
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\ninstance_dir = "{dog}"\ntoken = "sks"\nclass_noun = "dog"\n'
                    f'[[data.subjects]]\ninstance_dir = "{cat}"\ntoken = "zwx"\nclass_noun = "cat"\n')
    from_file = C.resolve(C.TRAIN_SECTIONS, C.load_toml(toml), base(tmp_path / "o"))
    assert flags == from_file
    subjects = C.run_subjects(flags.data, flags.prior)
    assert [(s.token, s.instance_prompt, s.class_prompt) for s in subjects] == [
        ("sks", "a photo of sks dog", "a photo of dog"), ("zwx", "a photo of zwx cat", "a photo of cat")]
    # the templates apply to every subject; a table's own prompt wins
    cfg = resolve({**base(tmp_path / "o"), "instance_prompt": "an emoji of {token} {class_noun}",
                   "class_prompt": "an emoji of a {class_noun}",
                   "subjects": [{"instance_dir": str(dog), "token": "sks", "class_noun": "dog"},
                                {"instance_dir": str(cat), "token": "zwx", "class_noun": "cat",
                                 "instance_prompt": "zwx, a cat"}]})
    assert [(s.instance_prompt, s.class_prompt) for s in C.run_subjects(cfg.data, cfg.prior)] == [
        ("an emoji of sks dog", "an emoji of a dog"), ("zwx, a cat", "an emoji of a cat")]


@pytest.mark.parametrize("values, message", [
    ({"subjects": [{"instance_dir": "d", "tokn": "x", "class_noun": "cat"}]}, "unknown config key 'data.subjects[0].tokn'"),
    ({"subjects": [{"instance_dir": "d", "class_noun": "cat"}]}, "data.subjects[0].token is required"),
    ({"subjects": [{"instance_dir": "d", "token": "zwx"}]}, "data.subjects[0].class_noun is required"),
    ({"subjects": ["d zwx cat"]}, "data.subjects[0]: expected a table"),
    ({"subjects": [{"instance_dir": "d", "token": "zwx", "class_noun": "cat", "class_dir": 3}]},
     "data.subjects[0].class_dir: expected a string"),
])
def test_a_bad_subject_table_is_named(tmp_path, values, message):
    with pytest.raises(ConfigError) as exc:
        resolve({**base(tmp_path / "o"), **values})
    assert message in str(exc.value)


def test_subjects_must_differ_and_ti_takes_one(two_folders, tmp_path):
    from boothkit.core.config import validate_train

    dog, cat = two_folders
    one = {**base(tmp_path / "o"), "instance_dir": str(dog), "token": "sks", "class_noun": "dog"}
    with pytest.raises(ConfigError, match=r"data.subjects\[0\]: identifier 'SKS' is already data.token's"):
        validate_train(resolve({**one, "subjects": [[str(cat), "SKS", "cat"]]}))
    with pytest.raises(ConfigError, match=r"data.subjects\[1\]: folder .* is already data.subjects\[0\]'s"):
        validate_train(resolve({**one, "subjects": [[str(cat), "zwx", "cat"], [str(cat) + "/", "qwe", "cat"]]}))
    with pytest.raises(ConfigError, match="lora.method ti learns one identifier's embeddings per run"):
        validate_train(resolve({**one, "method": "ti", "subjects": [[str(cat), "zwx", "cat"]]}))
    with pytest.raises(ConfigError, match=r"data.instance_dir is required \(--instance-dir, or --subject"):
        validate_train(resolve({**base(tmp_path / "o"), "class_noun": "dog"}))


def test_each_subject_is_drawn_as_often_and_meets_its_own_class():
    class Vae:
        config = type("Cfg", (), {"scaling_factor": 1.0, "shift_factor": None})()
        dtype = torch.float32

    def bank(n_per_group, prompt):
        images = [Image.new("RGB", (64, 64), (10 * i, 0, 0)) for i in range(sum(n_per_group))]
        groups = [k for k, n in enumerate(n_per_group) for _ in range(n)]
        b = LatentBank(images, 64, Vae(), prompts=[prompt.format(k) for k in groups], cache=False, flip=False,
                       random_crop=False, device="cpu", groups=groups)
        b._encode = lambda pixels: (torch.zeros(len(pixels), 4, 8, 8), torch.ones(len(pixels), 4, 8, 8))
        return b

    instance = bank([1, 5, 2], "subject {}")  # three subjects with 1, 5 and 2 photos
    classes = bank([3, 4], "class {}")  # subjects 0 and 2 share class group 0, subject 1 has class group 1
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(200):
        batch = draw_batch(g, instance, 4, classes, class_of=[0, 1, 0])
        subj, cls = batch.prompts[:4], batch.prompts[4:]
        for s, c in zip(subj, cls):
            assert c == f"class {[0, 1, 0][int(s[-1])]}"  # each subject example's class example is of its class
            counts[int(s[-1])] += 1
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.03)  # not 1:5:2


@pytest.mark.slow
def test_two_subjects_train_with_a_class_folder_each(two_folders, tmp_path, monkeypatch):
    import boothkit.train.batches as B

    dog, cat = two_folders
    asked, real_call = set(), B.PromptEncoder.__call__
    monkeypatch.setattr(B.PromptEncoder, "__call__", lambda self, p: asked.update(p) or real_call(self, p))
    out = tmp_path / "o"
    cfg = resolve({**base(out, max_steps=8, batch_size=2), "instance_dir": str(dog), "token": "sks",
                   "class_noun": "dog", "subjects": [[str(cat), "zwx", "cat"]]})
    run_training(cfg, progress=False)
    assert asked == {"a photo of sks dog", "a photo of zwx cat", "a photo of dog", "a photo of cat"}
    for noun in ("dog", "cat"):
        manifest = json.loads((out / "class_images" / noun / prior.MANIFEST).read_text())
        assert manifest["prompt"] == f"a photo of {noun}" and len(manifest["images"]) == 2
    with safe_open(str(out / LORA_FILE), "pt") as fh:
        meta = fh.metadata()
    assert meta["boothkit.token"] == "sks"
    assert [s["token"] for s in json.loads(meta["boothkit.subjects"])] == ["sks", "zwx"]

    # the saved config repeats the run: same class folders, same weights
    saved = C.resolve(C.TRAIN_SECTIONS, C.load_toml(out / "config.toml"), {"output_dir": str(tmp_path / "again")})
    assert saved.data.subjects[0].class_dir == str(out / "class_images" / "cat")
    again = run_training(saved, progress=False)
    a, b = load_file(out / LORA_FILE), load_file(again / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_subject_by_flag_is_the_plain_run(two_folders, tmp_path):
    """--subject DIR TOKEN CLASS alone trains exactly what --instance-dir --token --class-noun does."""
    dog, _ = two_folders
    plain = run_training(resolve({**base(tmp_path / "a"), "instance_dir": str(dog), "token": "sks",
                                  "class_noun": "dog"}), progress=False)
    flagged = run_training(resolve({**base(tmp_path / "b"), "subjects": [[str(dog), "sks", "dog"]]}),
                           progress=False)
    a, b = load_file(plain / LORA_FILE), load_file(flagged / LORA_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (flagged / "class_images" / prior.MANIFEST).is_file()  # one class: the folder itself, as before


@pytest.mark.slow
def test_cli_takes_repeated_subject_flags(two_folders, tmp_path, capsys):
    dog, cat = two_folders
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "tiny", "--subject", str(dog), "sks", "dog", "--subject", str(cat), "zwx", "cat",
              "--no-prior", "--max-steps", "2", "--rank", "4", "--output-dir", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "subjects: 'a photo of sks dog'; 'a photo of zwx cat'" in printed
    assert "--prompt 'a photo of sks dog on the moon'" in printed
    with pytest.raises(SystemExit) as exc:
        main(["class-images", "--model", "tiny", "--subject", str(dog), "sks", "dog", "--subject", str(cat), "zwx",
              "cat", "--class-dir", str(tmp_path / "classes"), "--num-class-images", "1", "--class-steps", "1"])
    assert exc.value.code == 0
    assert {p.name for p in (tmp_path / "classes").iterdir()} == {"dog", "cat"}


def test_class_folders_rule(tmp_path):
    s = lambda token, noun, prompt=None, folder=None: C.Subject("x", token, noun, None, prompt or f"a {noun}",  # noqa: E731
                                                                folder)
    root = tmp_path / "c"
    assert prior.class_folders([s("a", "dog"), s("b", "dog")], str(root), "out") == [root, root]
    assert prior.class_folders([s("a", "dog"), s("b", "cat")], None, "out") == [Path("out/class_images/dog"),
                                                                               Path("out/class_images/cat")]
    # one noun, two class prompts: two folders; a subject's own folder wins
    assert prior.class_folders([s("a", "dog"), s("b", "dog", "a dog, photo"), s("c", "cat", folder="mine")],
                               str(root), "out") == [root / "dog", root / "dog-2", Path("mine")]
    with pytest.raises(ConfigError, match="share one class folder"):
        prior.class_folders([s("a", "dog", folder="x"), s("b", "dog", folder="y")], None, "out")


def test_the_shipped_openmoji_subjects_are_a_dreambooth_dataset():
    """The second held-out style: 6 OpenMoji subjects x 5 pictures of 64 px, the Fluent set's prompts, attributed."""
    from boothkit.evaluate.bench import parse_dataset
    from boothkit.mini.subjects import OPENMOJI_SUBJECTS, dataset_dir, openmoji_dataset_dir

    ds = parse_dataset(openmoji_dataset_dir())
    assert ds.classes == {"dog": "dog", "cat": "cat", "teddy_bear": "teddy bear", "backpack": "backpack",
                          "car": "car", "cup": "cup"} == {k: noun for k, (_, noun) in OPENMOJI_SUBJECTS.items()}
    fluent = parse_dataset(dataset_dir())
    assert (ds.object_prompts, ds.live_prompts) == (fluent.object_prompts, fluent.live_prompts)
    assert sorted(p.name for p in ds.root.iterdir() if p.is_dir()) == sorted(ds.classes)
    for subject in ds.classes:
        pictures = sorted((ds.root / subject).iterdir())
        assert [p.name for p in pictures] == [f"{i:02d}.png" for i in range(5)]
        for p in pictures:
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
        # the same scenes as the Fluent subject of that name, another style: never the same picture
        assert (ds.root / subject / "00.png").read_bytes() != (fluent.root / subject / "00.png").read_bytes()
    source = (ds.root / "SOURCE.md").read_text(encoding="utf-8")
    assert "All emojis designed by [OpenMoji](https://openmoji.org/)" in source and "CC BY-SA 4.0" in source


def test_openmoji_names_are_its_unicode_emoji(tmp_path):
    """openmoji.json's first entry of a name wins, skin-tone variants and OpenMoji's own extras left out."""
    import io
    import tarfile

    from boothkit.mini.emoji import openmoji_entries

    entries = [{"annotation": "Dog", "hexcode": "E000", "group": "extras-openmoji", "skintone": ""},
               {"annotation": "dog", "hexcode": "1F415-1F3FB", "group": "animals-nature", "skintone": 1},
               {"annotation": "dog", "hexcode": "1F415", "group": "animals-nature", "skintone": ""},
               {"annotation": "dog", "hexcode": "1F415-FE0F", "group": "animals-nature", "skintone": ""}]
    data = json.dumps(entries).encode()
    tgz = tmp_path / "openmoji-17.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("package/data/openmoji.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert {k: e["hexcode"] for k, e in openmoji_entries(["cat", "dog"], tgz).items()} == {"dog": "1F415"}


# build_dataset with the reference emoji that ship with mini standing in for the npm pack (no npm in the suite)
STAND_IN = """
import dataclasses
from pathlib import Path
from boothkit.mini import subjects as S
from boothkit.mini.emoji import load_emoji
from boothkit.models.mini import mini_dir

refs = load_emoji(mini_dir() / "reference.npz")
S.load_fluent = lambda names: [dataclasses.replace(refs[i], name=n, style="fluent") for i, n in enumerate(names)]
S.build_dataset(Path(sys.argv[1]), seed=int(sys.argv[2]))
"""


@pytest.mark.parametrize("at, replaced", [("boothkit.core.files:fsync_tree:1", False),
                                          ("boothkit.core.files:_exchange:1", True)])
def test_a_dataset_rebuild_killed_midway_leaves_the_earlier_one_whole(tmp_path, at, replaced):
    """build_dataset writes the whole subject set beside the old one and swaps it in (core.files.atomic_folder)."""
    import os
    import subprocess
    import sys

    from boothkit.evaluate.bench import parse_dataset
    from processes import kill_at, paused_python

    out = tmp_path / "subjects"

    def digest():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    subprocess.run([sys.executable, "-c", "import sys\n" + STAND_IN, str(out), "1"], check=True)
    ds = parse_dataset(out)
    assert sorted(ds.classes) == sorted(SUBJECTS) and len(list((out / "dog").iterdir())) == PHOTOS
    old, marker = digest(), tmp_path / "held"
    cmd, extra = paused_python(STAND_IN, [out, 2], at, marker)  # another seed: other pictures
    kill_at(cmd, marker, {**os.environ, **extra})
    now = digest()
    assert now.keys() == old.keys() and (now != old) == replaced  # the earlier set or the new one, each whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] != []  # its temp: a stale one to clear
