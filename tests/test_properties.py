"""Property-based tests (hypothesis) of image decoding and the pre/post-processing around the network.

For images of any size from 1 to 300 pixels a side (so aspect ratios up to 300:1) in the modes people's folders hold,
encoded in every common format (PNG, JPEG, WebP, BMP, TIFF, PPM, GIF): `pfanet.io.load_image` gives (H, W, 3) uint8
at the file's size, with the pixels a lossless file stores; `preprocess` gives a finite (3, S, S) float32 input inside
the range the normalisation allows; `postprocess` gives an (H, W) uint8 map; `edge_map` keeps the shape. Arbitrary
bytes, and valid files with bytes changed or cut off, never raise anything but `ImageError`.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pfanet.io import ImageError, load_image
from pfanet.transforms import HED_INPUT, IMAGENET_INPUT, OFFICIAL_INPUT, InputSpec, edge_map, postprocess, preprocess

# Modes each format can store (as Pillow writes them).
MODES = {
    "PNG": ("L", "RGB", "RGBA", "P", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("L", "RGB", "RGBA"),
    "BMP": ("L", "RGB", "P"),
    "TIFF": ("L", "RGB", "RGBA", "P", "I;16", "CMYK"),
    "PPM": ("L", "RGB"),
    "GIF": ("L", "P"),
}
LOSSY = {"JPEG"}  # WebP is written lossless below
SPECS = (OFFICIAL_INPUT, HED_INPUT, IMAGENET_INPUT)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(1, 300)
seeds = st.integers(0, 2**32 - 1)


def make_image(mode: str, h: int, w: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A random image in `mode`, and the (H, W, 3) uint8 RGB a decoder must give for it (alpha over black, 16-bit
    scaled to 8, palette and CMYK as Pillow converts them)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2)
    if mode == "I;16":  # 8-bit value v stored as v * 257 spans the 16-bit range; scaled back it is v again
        return Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), np.repeat(rgb[:, :, :1], 3, axis=2)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha])), (rgb.astype(np.uint16) * alpha // 255).astype(np.uint8)
    image = Image.fromarray(rgb).convert(mode) if mode != "RGB" else Image.fromarray(rgb)
    return image, np.asarray(image.convert("RGB"))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@st.composite
def encoded_images(draw, max_side: int = 300) -> tuple[bytes, str, str, np.ndarray]:
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    image, expected = make_image(mode, h, w, draw(seeds))
    return encode(image, fmt), fmt, mode, expected


@SETTINGS
@given(encoded_images())
def test_decoding_gives_rgb_uint8_at_the_files_size(sample):
    data, fmt, mode, expected = sample
    rgb = load_image(data)
    assert rgb.dtype == np.uint8 and rgb.shape == expected.shape, (fmt, mode)
    if fmt not in LOSSY:
        np.testing.assert_array_equal(rgb, expected, err_msg=f"{fmt} {mode}")


@SETTINGS
@given(sides, sides, seeds, st.sampled_from(SPECS), st.sampled_from([32, 64]))
def test_preprocess_gives_a_finite_square_input_within_the_normalised_range(h, w, seed, spec, size):
    spec = InputSpec(**{**spec.to_dict(), "size": size})
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = preprocess(rgb, spec)
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Bilinear resizing mixes pixels and the zero padding (the mean colour), all inside [(0 - mean) / std,
    # (255 - mean) / std] per channel: the output cannot leave that range.
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    assert (x >= (0 - mean) / std - 1e-4).all() and (x <= (255 - mean) / std + 1e-4).all()


@SETTINGS
@given(st.integers(1, 300), st.tuples(*[st.integers(0, 255)] * 3), st.sampled_from(SPECS))
def test_preprocess_of_a_flat_square_is_its_normalised_colour(side, colour, spec):
    rgb = np.full((side, side, 3), colour, np.uint8)  # square: no padding, and resizing a constant keeps it
    x = preprocess(rgb, InputSpec(**{**spec.to_dict(), "size": 32}))
    ordered = colour if spec.channel_order == "RGB" else colour[::-1]
    expected = [(c - m) / s for c, m, s in zip(ordered, spec.mean, spec.std, strict=True)]
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(np.float32(expected)[:, None, None], x.shape), atol=1e-4)


@SETTINGS
@given(sides, sides, seeds, st.sampled_from([32, 64]), st.floats(0.01, 100))
def test_postprocess_gives_a_uint8_map_at_the_images_size(h, w, seed, size, scale):
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (1, size, size)).astype(np.float32))
    m = postprocess(logits, h, w)
    assert m.shape == (h, w) and m.dtype == np.uint8


@SETTINGS
@given(sides, sides, st.floats(-30, 30))
def test_postprocess_of_flat_logits_is_flat(h, w, z):
    m = postprocess(torch.full((1, 32, 32), z), h, w)
    expected = math.floor(255 / (1 + math.exp(-z)))  # the demo: sigmoid x 255 truncated to uint8
    assert m.shape == (h, w) and (m == m.flat[0]).all() and abs(int(m.flat[0]) - expected) <= 1


@SETTINGS
@given(sides, sides, seeds, st.booleans())
def test_edge_map_keeps_the_shape_and_a_flat_map_has_no_edges(h, w, seed, flat):
    rng = np.random.default_rng(seed)
    saliency = np.full((h, w), rng.integers(0, 256), np.uint8) if flat else rng.integers(0, 256, (h, w), np.uint8)
    edges = edge_map(saliency)
    assert edges.shape == (h, w) and edges.dtype == np.uint8
    if flat:
        assert not edges.any()


def decodes_or_image_error(data: bytes) -> None:
    try:
        rgb = load_image(data)
    except ImageError as e:
        assert str(e).startswith("<bytes>: ")
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.size > 0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_image_error(data):
    decodes_or_image_error(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags it skips
@SETTINGS
@given(encoded_images(max_side=40), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                             max_size=8),
       st.floats(0, 1))
def test_damaged_files_raise_only_image_error(sample, changes, keep):
    data = bytearray(sample[0])
    for where, value in changes:  # cubed: most changes hit the first bytes, the headers where parsers break
        data[int(where**3 * len(data))] = value
    decodes_or_image_error(bytes(data[: max(0, round(keep * len(data)))]))


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"P6\n1 1\n255\n", b"BM", b"II*\x00"])
def test_bare_headers_raise_image_error(data):
    with pytest.raises(ImageError, match="^<bytes>: "):
        load_image(data)
