"""A deterministic, seeded scene generator: emoji composed into captioned 64 px training pictures.

A scene is a main emoji (size, position) on a named background, optionally next to a second emoji, with a
caption written from what was drawn: "an emoji of a girl next to a soft ice cream on a light blue background,
google style". Every object drawn is named in the caption; the background and style are named only sometimes,
so short captions ("an emoji of a dog face") are common. A quarter of the captions use the seed experiment's
words, "an image of a <plain noun>", so prompts like "an image of a girl" are in the model's world too.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .emoji import BOOSTED, SCENE_PROPS, SIZE, Emoji

BACKGROUNDS = {  # name -> (colour, second colour for textures or None, texture)
    "white": ((255, 255, 255), None, "plain"),
    "light blue": ((173, 216, 240), None, "plain"),
    "pink": ((255, 192, 203), None, "plain"),
    "yellow": ((255, 236, 120), None, "plain"),
    "light green": ((170, 230, 160), None, "plain"),
    "gray": ((150, 150, 150), None, "plain"),
    "dark blue": ((20, 30, 90), None, "plain"),
    "black": ((0, 0, 0), None, "plain"),
    "striped": ((255, 255, 255), (190, 200, 255), "stripes"),
    "dotted": ((255, 250, 230), (240, 150, 150), "dots"),
    "checkered": ((255, 255, 255), (200, 200, 200), "checks"),
}
BACKGROUND_WEIGHTS = {"white": 6.0}  # others 1


@dataclass(frozen=True)
class Scene:
    caption: str
    main: str                   # emoji name of the main object
    style: str
    background: str
    second: Optional[str]       # emoji name of the object beside it, if any
    boxes: tuple                # (x, y, size) of the main object, then of the second
    image: np.ndarray           # SIZE x SIZE x 3 uint8


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def background(name: str, rng: random.Random, size: int = SIZE) -> np.ndarray:
    colour, second, texture = BACKGROUNDS[name]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = colour
    if texture == "plain":
        return img
    yy, xx = np.mgrid[0:size, 0:size]
    period, phase = rng.choice((8, 10, 12)), rng.randrange(12)
    if texture == "stripes":
        mask = ((xx + yy + phase) // (period // 2)) % 2 == 0
    elif texture == "dots":
        c = period // 2
        mask = ((xx + phase) % period - c) ** 2 + ((yy + phase) % period - c) ** 2 <= (period // 4) ** 2
    else:
        mask = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    img[mask] = second
    return img


def paste(canvas: np.ndarray, rgba: np.ndarray, x: int, y: int, size: int, angle: float = 0.0) -> None:
    """Alpha-composite `rgba` resized to `size` (and rotated by `angle` degrees) at (x, y), clipped to the canvas."""
    from PIL import Image

    img = Image.fromarray(rgba).resize((size, size), Image.LANCZOS)
    if angle:
        img = img.rotate(angle, resample=Image.BICUBIC)
    src = np.asarray(img, np.float32)
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
    if x0 >= x1 or y0 >= y1:
        return
    part = src[y0 - y:y1 - y, x0 - x:x1 - x]
    alpha = part[..., 3:] / 255.0
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = np.round(part[..., :3] * alpha + region * (1 - alpha)).astype(np.uint8)


class SceneGenerator:
    """Scene i of a seed is the same on every machine: each draws from its own random.Random((seed, i))."""

    def __init__(self, emoji: Sequence[Emoji], seed: int | str = 0, *, p_second: float = 0.35,
                 p_image_words: float = 0.25, boost: float = 8.0):
        self.emoji, self.seed = list(emoji), seed
        self.p_second, self.p_image_words = p_second, p_image_words
        self.by_name: dict[str, list[Emoji]] = {}
        for e in self.emoji:
            self.by_name.setdefault(e.name, []).append(e)
        self.names = sorted(self.by_name)
        self.weights = [boost if n in BOOSTED else 1.0 for n in self.names]
        self.props = [n for n in SCENE_PROPS if n in self.by_name]
        self.bg_names = list(BACKGROUNDS)
        self.bg_weights = [BACKGROUND_WEIGHTS.get(b, 1.0) for b in self.bg_names]

    def __len__(self) -> int:  # scenes are unbounded; this is the number of distinct main objects
        return len(self.names)

    def scene(self, i: int, main: Optional[str] = None, second: Optional[str] = None, *,
              style: Optional[str] = None, p_second: Optional[float] = None) -> Scene:
        """Scene i; `main`, `second` and `style` pin what is drawn, `p_second` the chance of a second object."""
        rng = random.Random(f"{self.seed}:{i}")
        main = main or rng.choices(self.names, self.weights)[0]
        main_emoji = self._same_style(main, style, rng) if style else rng.choice(self.by_name[main])
        style = main_emoji.style
        if second is None and rng.random() < (self.p_second if p_second is None else p_second):
            pool = self.props if self.props and rng.random() < 0.4 else self.names
            second = rng.choice([n for n in pool if n != main] or [main])
        bg = rng.choices(self.bg_names, self.bg_weights)[0]
        img = background(bg, rng)
        if second is None:
            size = rng.randint(34, 60)
            boxes = ((rng.randint(-2, SIZE - size + 2), rng.randint(-2, SIZE - size + 2), size),)
        else:
            size, size2 = rng.randint(28, 36), rng.randint(22, 30)
            left_main = rng.random() < 0.5
            xa, xb = rng.randint(0, 4), SIZE - rng.randint(0, 4)
            xm, xs = (xa, xb - size2) if left_main else (xb - size, xa)
            boxes = ((xm, rng.randint(8, SIZE - size - 4), size), (xs, rng.randint(8, SIZE - size2 - 4), size2))
        emoji = [main_emoji] + ([self._same_style(second, style, rng)] if second else [])
        for e, (x, y, s) in zip(emoji, boxes):
            paste(img, e.image, x, y, s, angle=rng.uniform(-10, 10) if rng.random() < 0.3 else 0.0)
        caption = self.caption(rng, main_emoji, second, bg, style)
        return Scene(caption, main, style, bg, second, boxes, img)

    def _same_style(self, name: str, style: str, rng: random.Random) -> Emoji:
        same = [e for e in self.by_name[name] if e.style == style]
        return rng.choice(same or self.by_name[name])

    def caption(self, rng: random.Random, main: Emoji, second: Optional[str], bg: str, style: str) -> str:
        if rng.random() < self.p_image_words:
            text = f"an image of {with_article(main.noun)}"
        else:
            text = f"an emoji of {with_article(main.name)}"
        if second:
            text += f" next to {with_article(second)}"
        if rng.random() < (0.25 if bg == "white" else 0.6):
            text += f" on {with_article(bg)} background"
        if rng.random() < 0.3:
            text += f", {style} style"
        return text

    def batch(self, start: int, n: int) -> list[Scene]:
        return [self.scene(i) for i in range(start, start + n)]
