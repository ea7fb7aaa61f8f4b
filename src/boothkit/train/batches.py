"""What one training step draws: subject and class pictures as VAE latents, and the prompts' conditioning.

Every draw comes from the generator it is given (seeded per step and global micro-batch by `step_seed`), so
cached and uncached latents see the same draws and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import Interrupted
from ..models.families import Conditioning, Family, micro_conditioning
from .data import crop_box, nearest_bucket, resize_cover, to_tensor


def step_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """A well-mixed 63-bit seed for global micro-batch `micro` of optimizer step `step` (one seed per `stream`)."""
    return int(np.random.SeedSequence([seed, step, micro, stream]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------ data

class LatentBank:
    """Images of one kind (subject or class) as VAE latents, sampled per step.

    With caching, the VAE's posterior mean and std of every image (and its mirror image when flipping is on)
    are computed once; without it, images are encoded every step. Both draw the posterior sample from the
    step's generator, so they produce the same latents. Each sample also gets SDXL's micro-conditioning
    (the picture's original size, the crop's top-left in the resized picture, the target size). `masks` (one
    grey image or None per picture, --masked-loss) follow their pictures through resize, crop and flip.
    With `buckets` ((width, height) pairs, --buckets) each picture is resized to cover the bucket nearest its
    aspect and centre-cropped to it, instead of to a size x size square. `prompts`: each picture's prompt;
    `groups`: each picture's subject (or class) in a several-subject run, None for one.
    """

    def __init__(self, images, size: int, vae, *, prompts: list[str], cache: bool, flip: bool, random_crop: bool,
                 device, masks=None, buckets: list[tuple[int, int]] | None = None, groups: list[int] | None = None,
                 stop: threading.Event | None = None):
        self.size, self.vae, self.flip, self.random_crop, self.device = size, vae, flip, random_crop, device
        self.stop = stop  # the UI's Cancel, seen between pictures while caching (Ctrl-C needs no checking)
        self.prompts, self.groups = list(prompts), None if groups is None else list(groups)
        self.original = [(img.height, img.width) for img in images]
        self.bucketed = buckets is not None
        self.targets = [nearest_bucket(img.size, buckets) if buckets else (size, size) for img in images]
        self.images = [resize_cover(img, *t) for img, t in zip(images, self.targets)]
        self.masks = None if masks is None else [
            None if m is None else m.resize(img.size, Image.Resampling.BILINEAR) for m, img in zip(masks, self.images)]
        self.cache = cache and not random_crop  # a random crop differs every step: nothing to cache
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        if self.cache:  # per picture: pictures of different buckets differ in shape
            pixels = [to_tensor(img.crop(self._box(i, None)))[None] for i, img in enumerate(self.images)]
            self.moments = [self._encode_each(pixels)] + ([self._encode_each([p.flip(-1) for p in pixels])]
                                                          if flip else [])

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(torch.device(self.device).type, enabled=False):  # the VAE always runs in fp32
            return self._encode_fp32(pixels)

    def _encode_each(self, pixels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        moments = []
        for i, p in enumerate(pixels):
            if self.stop is not None and self.stop.is_set():
                raise Interrupted(f"interrupted while caching latents ({i} of {len(pixels)} pictures encoded); "
                                  f"nothing is lost: run it again")
            moments.append(self._encode(p))
        return [m[0] for m, _ in moments], [s[0] for _, s in moments]

    def _box(self, i: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
        if self.random_crop:
            return crop_box(self.images[i], self.size, True, g)
        return _center(self.images[i], *self.targets[i])

    def pick(self, n: int, g: torch.Generator) -> torch.Tensor:
        """`n` pictures drawn from `g`; with buckets all from one bucket, drawn by its share of the pictures
        (the bucket of a picture drawn uniformly), so that the batch's latents share a shape. With groups every
        group is drawn as often as any other, however many pictures it has."""
        if self.groups is not None:
            return self._pick_balanced(n, g)
        if not self.bucketed:
            return torch.randint(len(self), (n,), generator=g)
        bucket = self.targets[int(torch.randint(len(self), (1,), generator=g))]
        members = torch.tensor([i for i, t in enumerate(self.targets) if t == bucket])
        return members[torch.randint(len(members), (n,), generator=g)]

    def _pick_balanced(self, n: int, g: torch.Generator) -> torch.Tensor:
        members = list(range(len(self)))
        if self.bucketed:
            first = int(torch.multinomial(self._balance(members), 1, generator=g))
            members = [i for i in members if self.targets[i] == self.targets[first]]
        return torch.tensor(members)[torch.multinomial(self._balance(members), n, replacement=True, generator=g)]

    def _balance(self, members: list[int]) -> torch.Tensor:
        """Weights over `members` that give each group present the same share."""
        counts: dict[int, int] = {}
        for i in members:
            counts[self.groups[i]] = counts.get(self.groups[i], 0) + 1
        return torch.tensor([1.0 / counts[self.groups[i]] for i in members], dtype=torch.float64)

    def pick_in(self, groups: list[int], g: torch.Generator) -> torch.Tensor:
        """One picture of each group in `groups`, drawn uniformly among that group's pictures."""
        chosen = []
        for k in groups:
            members = [i for i, grp in enumerate(self.groups) if grp == k]
            chosen.append(members[int(torch.randint(len(members), (1,), generator=g))])
        return torch.tensor(chosen)

    def _encode_fp32(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        # one picture at a time: cached and per-step encodings then run the same kernels and agree bit for bit
        # (batched convolutions round differently), and the VAE at 512 px holds ~0.7 GB of activations per picture
        for chunk in pixels.split(1):
            dist = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def sample(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, micro-conditioning time ids) of the pictures `idx`."""
        return self.draw(idx, g)[:2]

    def draw(self, idx: torch.Tensor, g: torch.Generator):
        """(latents, micro-conditioning time ids, loss masks on the latent grid or None) of the pictures `idx`."""
        flips = (torch.rand(len(idx), generator=g) < 0.5) if self.flip else torch.zeros(len(idx), dtype=torch.bool)
        if self.cache:
            mean = torch.stack([self.moments[int(f)][0][i] for i, f in zip(idx.tolist(), flips.tolist())])
            std = torch.stack([self.moments[int(f)][1][i] for i, f in zip(idx.tolist(), flips.tolist())])
            boxes = [self._box(i, None) for i in idx.tolist()]
        else:
            boxes = [self._box(i, g) for i in idx.tolist()]
            pixels = torch.stack([to_tensor(self.images[i].crop(b)) for i, b in zip(idx.tolist(), boxes)])
            pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
            mean, std = self._encode(pixels)
        eps = torch.randn(mean.shape, generator=g).to(mean.device)
        time_ids = []
        for i, box, flipped in zip(idx.tolist(), boxes, flips.tolist()):
            left = self.images[i].width - box[2] if flipped else box[0]  # the crop, seen in the mirrored picture
            time_ids.append(micro_conditioning(self.original[i], (box[1], left), self.targets[i][::-1]))
        latents = (mean + std * eps - self.shift) * self.scale
        return latents, torch.stack(time_ids), self._masks(idx, boxes, flips, tuple(latents.shape[-2:]))

    def _masks(self, idx: torch.Tensor, boxes: list, flips: torch.Tensor, grid: tuple[int, int]):
        """Each picture's mask, cropped and flipped as the picture was, averaged down to the latent grid."""
        if self.masks is None:
            return None
        out = []
        for i, box, flipped in zip(idx.tolist(), boxes, flips.tolist()):
            m = self.masks[i]
            m = torch.ones(1, 1, *grid) if m is None else F.adaptive_avg_pool2d(
                torch.from_numpy(np.asarray(m.crop(box), dtype=np.float32) / 255.0)[None, None], grid)
            out.append(m.flip(-1) if flipped else m)
        return torch.cat(out)


def _center(img, width: int, height: int) -> tuple[int, int, int, int]:
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return left, top, left + width, top + height


class PromptEncoder:
    """Prompt -> what the denoiser is conditioned on (the family's text encoders); cached when they are frozen."""

    def __init__(self, family: Family, tokenizers, text_encoders, prompts: list[str], cache: bool, device,
                 rewrite: Callable[[str], str] = str):
        """`rewrite`: the text the tokenizers see for a prompt (Textual Inversion spells out extra vectors)."""
        self.family, self.text_encoders, self.device = family, list(text_encoders), device
        self.ids = {p: family.tokenize(tokenizers, rewrite(p)) for p in prompts}
        self.cached = None
        if cache:
            with torch.no_grad():
                self.cached = {p: self._run(ids) for p, ids in self.ids.items()}

    def _run(self, ids: list[torch.Tensor]) -> Conditioning:
        return self.family.encode(self.text_encoders, [i.to(self.device) for i in ids])

    def __call__(self, prompts: list[str]) -> Conditioning:
        if self.cached is not None:
            parts = [self.cached[p] for p in prompts]
            pooled = [c.pooled for c in parts]
            return Conditioning(torch.cat([c.hidden for c in parts]),
                                None if pooled[0] is None else torch.cat(pooled))
        return self._run([torch.cat(ids) for ids in zip(*(self.ids[p] for p in prompts))])


@dataclass
class Batch:
    # [subject; class] examples, or (subject, class) apart when a bucket's shape differs from the square class
    # images': then they take separate UNet passes and `masks` holds the subject examples' only
    latents: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    prompts: list[str]
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning, one row per example
    masks: torch.Tensor | None = None  # --masked-loss: (B, 1, h, w) loss weights on the latent grid


def draw_batch(g: torch.Generator, instance: LatentBank, batch_size: int, classes: LatentBank | None,
               caption_dropout: float = 0.0, class_of: list[int] | None = None) -> Batch:
    """Subject examples, then as many class examples when prior preservation is on, each with its picture's prompt.

    With `caption_dropout` a subject example's prompt becomes "" with that chance. Several subjects: `class_of[s]`
    is subject s's group in `classes`, and each subject example gets a class example of its own class. Class
    examples get all-ones loss masks (they are not masked).
    """
    idx = instance.pick(batch_size, g)
    latents, time_ids, masks = instance.draw(idx, g)
    prompts = [instance.prompts[i] for i in idx.tolist()]
    if caption_dropout > 0:  # no draw when off: a run without it keeps the draws it always had
        dropped = (torch.rand(batch_size, generator=g) < caption_dropout).tolist()
        prompts = ["" if drop else p for p, drop in zip(prompts, dropped)]
    drawn = [(latents, time_ids)]
    if classes is not None:
        if class_of is None:
            cidx = torch.randint(len(classes), (batch_size,), generator=g)
        else:
            cidx = classes.pick_in([class_of[instance.groups[i]] for i in idx.tolist()], g)
        drawn.append(classes.sample(cidx, g))
        prompts += [classes.prompts[i] for i in cidx.tolist()]
        if drawn[1][0].shape != latents.shape:  # a non-square bucket: the halves cannot share one tensor
            return Batch((latents, drawn[1][0]), prompts, torch.cat([time_ids, drawn[1][1]]), masks)
        masks = None if masks is None else torch.cat([masks, torch.ones_like(masks)])
    return Batch(torch.cat([d[0] for d in drawn]), prompts, torch.cat([d[1] for d in drawn]), masks)
