"""Shift transforms: deterministic for a seed, they change the image, bad names and strengths are refused."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from selfxit.ops.shift import DEFAULT_STRENGTH, SHIFTS, apply_shift


def image(seed: int = 0, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 220, size=(*size[::-1], 3), dtype=np.uint8))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("kind", SHIFTS)
def test_deterministic_and_changes_the_image(kind):
    img = image()
    a, b = apply_shift(img, kind, seed=3), apply_shift(img, kind, seed=3)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(img)).mean() > 2
    assert a.size == img.size and a.mode == "RGB"


def test_seed_drives_the_noise_and_strength_the_size_of_the_shift():
    img = image()
    assert not np.array_equal(pixels(apply_shift(img, "noise", 1)), pixels(apply_shift(img, "noise", 2)))
    for kind in SHIFTS:
        weak = np.abs(pixels(apply_shift(img, kind, 0, DEFAULT_STRENGTH[kind] / 4)) - pixels(img)).mean()
        strong = np.abs(pixels(apply_shift(img, kind, 0)) - pixels(img)).mean()
        assert weak < strong, kind
    assert np.array_equal(pixels(apply_shift(img, "blur", 0, 0.0)), pixels(img))
    darker = apply_shift(img, "brightness", 0, -0.5)
    assert pixels(darker).mean() < pixels(img).mean() < pixels(apply_shift(img, "brightness", 0)).mean()


def test_bad_names_and_strengths_are_refused():
    with pytest.raises(ValueError, match="blur, noise, brightness"):
        apply_shift(image(), "fog", 0)
    with pytest.raises(ValueError, match="brightness strength must be > -1"):
        apply_shift(image(), "brightness", 0, -1.0)
    with pytest.raises(ValueError, match="noise strength must be >= 0"):
        apply_shift(image(), "noise", 0, -0.1)
    with pytest.raises(TypeError, match="PIL image"):
        apply_shift(np.zeros((4, 4, 3)), "blur", 0)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(SHIFTS), seed=st.integers(0, 2**32 - 1), w=st.integers(1, 40), h=st.integers(1, 40),
       mode=st.sampled_from(["RGB", "L", "RGBA"]))
def test_any_image_keeps_its_size_and_becomes_rgb(kind, seed, w, h, mode):
    img = image(seed % 1000, (w, h)).convert(mode)
    out = apply_shift(img, kind, seed)
    assert out.size == (w, h) and out.mode == "RGB"
    assert np.array_equal(pixels(out), pixels(apply_shift(img, kind, seed)))


def test_collect_offers_exactly_these_shifts():
    """``selfxit collect --transform`` spells the names out (its parser imports nothing heavy); they must agree."""
    from selfxit.cli.collect import SHIFT_NAMES
    assert SHIFT_NAMES == SHIFTS
