"""Deterministic distribution shifts for simulating drifted traffic, applied to PIL images before normalisation."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

SHIFTS = ("blur", "noise", "brightness")
DEFAULT_STRENGTH = {
    "blur": 1.0,  # Gaussian blur radius in pixels
    "noise": 0.1,  # standard deviation of additive Gaussian noise, as a fraction of the 0..255 range
    "brightness": 0.5,  # brightness factor 1 + strength (negative darkens; must stay above -1)
}


def check_shift(kind: str, strength: float | None = None) -> float:
    """Validate a shift name and strength; returns the strength to use (the default when None)."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; allowed: {', '.join(SHIFTS)}")
    if strength is None:
        return DEFAULT_STRENGTH[kind]
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not np.isfinite(strength):
        raise ValueError(f"shift strength must be a finite number; got {strength!r}")
    if kind == "brightness" and strength <= -1:
        raise ValueError(f"brightness strength must be > -1 (factor 1 + strength); got {strength}")
    if kind != "brightness" and strength < 0:
        raise ValueError(f"{kind} strength must be >= 0; got {strength}")
    return float(strength)


def apply_shift(image: Image.Image, kind: str, seed: int = 0, strength: float | None = None) -> Image.Image:
    """``image`` (converted to RGB) under shift ``kind``; the same seed always gives the same pixels.

    blur: Gaussian blur of radius ``strength`` px; noise: additive Gaussian pixel noise of std
    ``strength * 255`` drawn from ``seed``; brightness: brightness scaled by ``1 + strength``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"apply_shift needs a PIL image; got {type(image).__name__}")
    strength = check_shift(kind, strength)
    rgb = image.convert("RGB")
    if kind == "blur":
        return rgb.filter(ImageFilter.GaussianBlur(radius=strength))
    if kind == "brightness":
        return ImageEnhance.Brightness(rgb).enhance(1.0 + strength)
    pixels = np.asarray(rgb, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, strength * 255.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))
