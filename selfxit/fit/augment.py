"""Label-free augmentation of the train traffic: extra distillation rows that the backbone labels itself.

The recorder (:func:`selfxit.fit.record.record`) runs the frozen backbone on each augmented copy of a batch's
*train* rows and stores its softmax as the copy's target, so no label is ever needed. Only train rows are
augmented, and the rows mixed together are train rows of the same batch: *tune*, *val* and *test* stay clean
traffic (a val image never leaks into a training row), so calibration and the certification are unchanged.

:class:`AugmentConfig` says which copies each train row gets, in this order:

- ``copies`` flip/shift copies (random horizontal flip and a translation of up to 4 pixels; the default 2 are
  what ``augment_copies=2`` always recorded);
- ``mixup`` copies: a flip/shift view mixed with another train row's view, ``lam * a + (1 - lam) * b`` with
  ``lam ~ U(0, 1)`` (mixup with Beta(1, 1)); the target is the backbone's softmax on the mixed input, not a
  mix of the two softmaxes;
- ``cutmix`` copies: a flip/shift view with a box (area ``1 - lam``, ``lam ~ U(0, 1)``) pasted from another
  train row's view;
- ``jitter``: colour jitter of strength ``j`` applied to every copy above (brightness, contrast, saturation,
  each factor drawn in ``[1 - j, 1 + j]``), in the model's own (normalised) input space, since the recorder does
  not know the normalisation: brightness adds ``(f - 1)`` times the image's standard deviation, contrast scales
  around the image's mean, saturation around each pixel's mean over the channels.

A config maps 1:1 onto YAML (``{copies: 2, mixup: 1, cutmix: 0, jitter: 0.0}``); ``collect(augment_copies=...)``,
``selfxit enable --augment`` and ``RetrainConfig.augment_copies`` take an int (flip/shift copies only, as before)
or such a mapping. Every random number is drawn from the recorder's generator and depends only on the number of
train rows, never on their content (so the Ray recorder can replay the draws of earlier batches).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


class AugmentConfigError(ValueError):
    """An augmentation setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class AugmentConfig:
    """Which label-free copies each train row gets (see the module docstring)."""

    copies: int = 2
    mixup: int = 0
    cutmix: int = 0
    jitter: float = 0.0

    def __post_init__(self):
        for key in ("copies", "mixup", "cutmix"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
                raise AugmentConfigError(f"augment {key} must be an int in [0, 16] (copies per train row); "
                                         f"got {value!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise AugmentConfigError(f"augment jitter must be a number in [0, 1) (0: no colour jitter); "
                                     f"got {self.jitter!r}")

    @property
    def rows_per_train_sample(self) -> int:
        """Augmented rows recorded for each train sample (besides its clean row)."""
        return self.copies + self.mixup + self.cutmix

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, value: Any) -> "AugmentConfig":
        """An AugmentConfig from an int (flip/shift copies only), a mapping of its keys, or itself."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(copies=value)
        if isinstance(value, dict):
            allowed = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise AugmentConfigError(f"augment: unknown keys {unknown}; allowed: {allowed}")
            return cls(**value)
        raise AugmentConfigError(f"augment must be a number of flip/shift copies or a mapping of {{copies, mixup, "
                                 f"cutmix, jitter}}; got {value!r}")


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Label-free image augmentation for distillation data: random horizontal flip and translation."""
    if x.ndim != 4:
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect")
    h, w = x.shape[2:]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def augmented_copies(x: torch.Tensor, generator: torch.Generator, config: AugmentConfig
                     ) -> Iterator[tuple[torch.Tensor, bool]]:
    """Yield ``(copy, mixed)`` for each of ``config``'s copies of the train rows ``x``, in the documented order;
    ``mixed`` is True for mixup/cutmix copies (they have no single source label)."""
    if (config.cutmix or config.jitter) and x.ndim != 4:
        raise AugmentConfigError(f"augment cutmix and jitter need image batches (N, C, H, W); got inputs of shape "
                                 f"{tuple(x.shape)}: set them to 0")
    for _ in range(config.copies):
        yield _jitter(augment(x, generator), generator, config.jitter), False
    for _ in range(config.mixup):
        a = augment(x, generator)
        partner, lam = _partner(len(x), generator), torch.rand(len(x), generator=generator)
        lam = lam.view(-1, *([1] * (x.ndim - 1))).to(a.dtype)
        yield _jitter(lam * a + (1 - lam) * a[partner], generator, config.jitter), True
    for _ in range(config.cutmix):
        a = augment(x, generator)
        partner, draws = _partner(len(x), generator), torch.rand(len(x), 3, generator=generator)
        out = a.clone()
        h, w = a.shape[2:]
        for i, (lam, cy, cx) in enumerate(draws.tolist()):
            side = (1 - lam) ** 0.5  # the box covers 1 - lam of the image (before clipping at the border)
            bh, bw = round(h * side), round(w * side)
            y0, x0 = round(cy * (h - bh)), round(cx * (w - bw))
            out[i, :, y0:y0 + bh, x0:x0 + bw] = a[partner[i], :, y0:y0 + bh, x0:x0 + bw]
        yield _jitter(out, generator, config.jitter), True


def _partner(n: int, generator: torch.Generator) -> torch.Tensor:
    """Each row's mixing partner: a random cyclic derangement (another row whenever there are two or more)."""
    order = torch.randperm(n, generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    return partner


def _jitter(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation jitter in the model's input space (no draws when ``strength`` is 0)."""
    if not strength:
        return x
    f = (1 + strength * (2 * torch.rand(len(x), 3, generator=generator) - 1)).to(x.dtype)
    brightness, contrast, saturation = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = x + (brightness - 1) * x.std(dim=(1, 2, 3), keepdim=True)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + contrast * (x - mean)
    gray = x.mean(dim=1, keepdim=True)
    return gray + saturation * (x - gray)
