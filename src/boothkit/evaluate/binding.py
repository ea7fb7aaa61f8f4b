"""Does the identifier bind? DreamBooth's promise in three measures, each against the base model, same seeds.

- likeness: the identifier prompt ("an emoji of sks dog") drawn closer to the subject's photos;
- drift: the class prompt ("an emoji of a dog") kept where the base model drew it — the prior-preservation loss's
  job; without it every dog becomes the subject;
- scenes: the identifier in the seed experiment's scenes still follows the rest of the prompt.

The independent judge is real pretrained LPIPS (nothing boothkit trained): likeness = the mean over samples of the
distance to the nearest subject photo (lower: closer), as a person would ask "is this one of my pictures?".
mini's own DINO and CLIP towers give the paper's DINO / CLIP-I / CLIP-T beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..generate.generation import generate_images, make_grid
from ..models.families import family_of
from ..mini.subjects import SEED_SCENES
from .metrics import Evaluators, lpips_pairs, mean_pairwise_cosine, mean_pairwise_lpips, rowwise_cosine


@dataclass(frozen=True)
class BindingPrompts:
    identifier: str
    klass: str
    scenes: tuple[str, ...] = field(default=())

    def all(self) -> list[str]:
        return [self.identifier, self.klass, *self.scenes]


def binding_prompts(instance_prompt: str, class_prompt: str) -> BindingPrompts:
    """The identifier prompt, the class prompt and the identifier in the seed experiment's three scenes."""
    return BindingPrompts(instance_prompt, class_prompt,
                          tuple(f"{instance_prompt} next to a {prop}" for prop in SEED_SCENES.values()))


def draw(pipe, prompts: BindingPrompts, num_images: int, seed: int = 0, steps: int = 25,
         guidance: float | None = None) -> dict[str, list]:
    """prompt -> num_images PIL images (image i from seed + i), at `guidance` or the model's own (mini 7.5,
    mini-flow 5)."""
    if guidance is None:
        guidance = family_of(pipe).guidance_of(pipe)
    return {p: generate_images(pipe, p, num_images=num_images, seed=seed, steps=steps, guidance=guidance)
            for p in prompts.all()}


def nearest_lpips(ev: Evaluators, images: Sequence, photos: Sequence) -> float:
    """Mean over `images` of the LPIPS distance to the nearest of `photos` (lower: more like the subject)."""
    pool = list(images) + list(photos)
    pairs = [(i, len(images) + j) for i in range(len(images)) for j in range(len(photos))]
    d = lpips_pairs(ev.lpips, pool, pairs, ev.cfg.lpips_size, ev.cfg.eval_batch_size)
    return float(d.view(len(images), len(photos)).min(dim=1).values.mean())


def paired_lpips(ev: Evaluators, a: Sequence, b: Sequence) -> float:
    """Mean LPIPS between a[i] and b[i]: how far a model's pictures moved from the base model's, seed by seed."""
    pool = list(a) + list(b)
    pairs = [(i, len(a) + i) for i in range(len(a))]
    return float(lpips_pairs(ev.lpips, pool, pairs, ev.cfg.lpips_size, ev.cfg.eval_batch_size).mean())


def judge(ev: Evaluators, drawn: dict[str, list], base: dict[str, list], photos: Sequence,
          prompts: BindingPrompts) -> dict[str, Any]:
    """The three measures for one model's pictures, beside the base model's (same prompts and seeds)."""
    ident, klass = drawn[prompts.identifier], drawn[prompts.klass]
    dino_real, clip_real = ev.dino.image_embeds(photos), ev.clip.image_embeds(photos)
    m = {
        "likeness_lpips": nearest_lpips(ev, ident, photos),
        "likeness_lpips_base": nearest_lpips(ev, base[prompts.identifier], photos),
        "class_lpips": nearest_lpips(ev, klass, photos),
        "class_lpips_base": nearest_lpips(ev, base[prompts.klass], photos),
        "class_moved_lpips": paired_lpips(ev, klass, base[prompts.klass]),
        "DINO": mean_pairwise_cosine(ev.dino.image_embeds(ident), dino_real),
        "CLIP-I": mean_pairwise_cosine(ev.clip.image_embeds(ident), clip_real),
        "class_DINO": mean_pairwise_cosine(ev.dino.image_embeds(klass), dino_real),
        "DIV": mean_pairwise_lpips(ev.lpips, ident, ev.cfg.lpips_size, ev.cfg.eval_batch_size),
    }
    if prompts.scenes:  # CLIP-T of each scene picture to its own prompt, this model's and the base model's
        text = ev.clip.text_embeds(list(prompts.scenes)).repeat_interleave(len(drawn[prompts.scenes[0]]), dim=0)
        for key, pictures in (("scene_CLIP-T", drawn), ("scene_CLIP-T_base", base)):
            flat = [img for p in prompts.scenes for img in pictures[p]]
            m[key] = float(rowwise_cosine(ev.clip.image_embeds(flat), text).mean())
        m["scene_lpips"] = nearest_lpips(ev, [img for p in prompts.scenes for img in drawn[p]], photos)
    return m


def sheet(photos: Sequence, drawn: dict[str, list], base: dict[str, list], prompts: BindingPrompts):
    """One picture to look at: the subject's photos; the identifier prompt by the base model and by this one; the
    class prompt likewise; then the scenes by this one. A column per seed."""
    from PIL import Image

    cols = len(drawn[prompts.identifier])
    size = drawn[prompts.identifier][0].size
    blank = Image.new("RGB", size, "white")
    shown = [im.convert("RGB").resize(size) for im in photos[:cols]]
    rows = [shown + [blank] * (cols - len(shown)), base[prompts.identifier], drawn[prompts.identifier],
            base[prompts.klass], drawn[prompts.klass], *(drawn[p] for p in prompts.scenes)]
    return make_grid([im for row in rows for im in row], cols)


def summary(m: dict[str, Any]) -> dict[str, float]:
    """What moved: the identifier's likeness gain and the class prompt's (both in LPIPS, positive: closer)."""
    return {"identifier_gain": m["likeness_lpips_base"] - m["likeness_lpips"],
            "class_gain": m["class_lpips_base"] - m["class_lpips"]}


def binds(m: dict[str, Any], min_gain: float = 0.08, max_class_share: float = 0.25) -> bool:
    """Issue 30's bar: the identifier's LPIPS to the subject falls by >= min_gain, the class prompt's by at most
    max_class_share of that."""
    s = summary(m)
    return s["identifier_gain"] >= min_gain and s["class_gain"] <= max_class_share * s["identifier_gain"]
