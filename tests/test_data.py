"""The data pipeline: list files and folder layouts, the official augmentation (each property checked on its own),
mask normalisation, preprocessing, bad pairs, DataLoader workers and the cache."""

from __future__ import annotations

import logging
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from reference import pad_to_square

from pfanet.data import (
    Augment,
    DataError,
    SaliencyDataset,
    collate,
    mask_target,
    random_crop_flip,
    random_rotate,
    read_list_file,
    read_pairs,
    training_sample,
)
from pfanet.transforms import (
    OFFICIAL_INPUT,
    InputSpec,
    normalise,
    postprocess,
    preprocess,
    square_nearest,
    square_offsets,
)

PLAIN = InputSpec("RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32)  # no mean/std: values stay pixel values


def write_image(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- sources --------------------------------------------------------------------------------------------------------


def test_list_file_paths_relative_to_it_tabs_for_spaces(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    absolute = tmp_path / "elsewhere" / "x.jpg"
    (root / "pairs.txt").write_text(
        "# a comment, then a blank line\n\n"
        "img/1.jpg gt/1.png\n"
        "sub dir/a b.jpg\tsub dir/a b.png\n"
        f"{absolute} gt/x.png\r\n"
    )
    assert read_list_file(root / "pairs.txt") == [
        (root / "img/1.jpg", root / "gt/1.png"),
        (root / "sub dir/a b.jpg", root / "sub dir/a b.png"),
        (absolute, root / "gt/x.png"),
    ]
    (root / "bad.txt").write_text("img/1.jpg gt/1.png\nsub dir/a b.jpg sub dir/a b.png\n")
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        read_list_file(root / "bad.txt")


@pytest.mark.parametrize("image_dir,mask_dir", [("DUTS-TR-Image", "DUTS-TR-Mask"), ("images", "masks"),
                                                ("Imgs", "GT")])
def test_folder_layouts_paired_by_stem(tmp_path, caplog, image_dir, mask_dir):
    root = tmp_path / "set"
    for stem in ("b", "a", "c"):
        write_image(root / image_dir / f"{stem}.jpg", rgb(8, 8))
    for stem in ("a", "b", "z"):
        write_image(root / mask_dir / f"{stem}.png", np.zeros((8, 8), np.uint8))
    with caplog.at_level(logging.WARNING):
        pairs = read_pairs(root)
    assert pairs == [(root / image_dir / "a.jpg", root / mask_dir / "a.png"),
                     (root / image_dir / "b.jpg", root / mask_dir / "b.png")]
    assert "1 images have no mask" in caplog.text


def test_unusable_sources_are_errors(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="no image/mask folders"):
        read_pairs(tmp_path)
    with pytest.raises(DataError, match="no such list file or folder"):
        read_pairs(tmp_path / "missing.txt")


def test_ecssd_list_files(ecssd):
    train, val = read_pairs(ecssd / "train.txt"), read_pairs(ecssd / "val.txt")
    assert (len(train), len(val)) == (700, 100)
    assert all(i.is_file() and m.is_file() and i.stem == m.stem for i, m in train[:20] + val[:20])
    assert not {i.stem for i, _ in train} & {i.stem for i, _ in val}


# ---- augmentation ---------------------------------------------------------------------------------------------------


def test_crop_flip_bounds_and_the_same_pixels_in_image_and_mask():
    h, w = 80, 64  # h/8 = 10, w/8 = 8: fewer than 10 rows and 8 columns may go
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.stack([cols * 3, rows * 3, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    mask = (rows * w + cols).astype(np.float32)  # each pixel its own value
    removed_rows, removed_cols, flips = set(), set(), 0
    for seed in range(300):
        out_img, out_mask = random_crop_flip(img, mask, np.random.default_rng(seed))
        dh, dw = h - out_mask.shape[0], w - out_mask.shape[1]
        assert 0 <= dh < h / 8 and 0 <= dw < w / 8
        removed_rows.add(dh)
        removed_cols.add(dw)
        top = int(out_mask[0].min()) // w
        flipped = out_mask[0, 0] > out_mask[0, -1]
        flips += flipped
        left = int(out_mask[0].min()) % w
        assert top <= max(0, dh - 1) and left <= max(0, dw - 1)  # the official offset: randint(removed)
        window = mask[top : top + h - dh, left : left + w - dw]
        np.testing.assert_array_equal(out_mask, window[:, ::-1] if flipped else window)
        # The image went through exactly the same crop and flip.
        np.testing.assert_array_equal(out_img[..., 0] // 3, out_mask.astype(int) % w)
        np.testing.assert_array_equal(out_img[..., 1] // 3, out_mask.astype(int) // w)
    assert removed_rows == set(range(10)) and removed_cols == set(range(8))
    assert 100 < flips < 200  # p = 0.5 over 300 draws


def test_rotation_integer_angle_about_the_centre_black_border_same_for_mask():
    n, c, r = 101, 50, 35  # a blob 35 px right of the centre pixel
    mask = np.zeros((n, n), np.float32)
    mask[c - 2 : c + 3, c + r - 2 : c + r + 3] = 1.0
    img = np.zeros((n, n, 3), np.uint8)
    img[..., 0] = 255  # a white channel shows the black border
    img[..., 1] = (mask * 255).astype(np.uint8)  # the blob in the image too
    angles = set()
    ys, xs = np.mgrid[0:n, 0:n]
    for seed in range(800):
        out_img, out_mask = random_rotate(img, mask, np.random.default_rng(seed), 25)
        cy, cx = (out_mask * ys).sum() / out_mask.sum(), (out_mask * xs).sum() / out_mask.sum()
        assert math.hypot(cx - c, cy - c) == pytest.approx(r, abs=0.3)  # about the centre
        angle = math.degrees(math.atan2(c - cy, cx - c))  # counter-clockwise on screen (y points down)
        assert abs(angle - round(angle)) < 0.3
        angles.add(round(angle))
        assert np.abs(out_img[..., 1].astype(float) - out_mask * 255).max() <= 1.0  # same motion as the mask
        if abs(angle) >= 5:
            assert out_img[[0, 0, -1, -1], [0, -1, 0, -1], 0].max() < 128  # corners came from outside: black
        assert out_img[c, c, 0] == 255
    assert angles == set(range(-25, 25))


def test_contrast_and_brightness_ranges_and_clipping():
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # every pixel value once
    mask = np.zeros((1, 256), np.float32)
    shifts, factors = set(), []
    for seed in range(600):
        rng = np.random.default_rng(seed)
        out, _ = Augment(crop_flip=False, rotate=0, contrast=(1.0, 1.0))(ramp, mask, rng)
        b = int(out[0, 128, 0]) - 128  # brightness alone: v + b, clipped
        shifts.add(b)
        expected = np.clip(np.arange(256) + b, 0, 255)
        np.testing.assert_array_equal(out[0, :, 0], expected)
        out, _ = Augment(crop_flip=False, rotate=0, brightness=0)(ramp, mask, np.random.default_rng(seed))
        c = out[0, 100, 0] / 100  # contrast alone: v * c, clipped (truncated to uint8)
        factors.append(c)
        assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # monotone: nothing wraps around
        if c > 1.03:
            assert out[0, 255, 0] == 255
    assert shifts == set(range(-20, 20))
    assert 0.5 <= min(factors) < 0.55 and 1.45 < max(factors) < 1.5


def test_saturation_option():
    img = np.array([[[200, 100, 50], [128, 128, 128]]], np.uint8)
    mask = np.zeros((1, 2), np.float32)
    plain = Augment(crop_flip=False, rotate=0, contrast=(1.0, 1.0), brightness=0)
    np.testing.assert_array_equal(plain(img, mask, np.random.default_rng(0))[0], img)
    jitter = Augment(crop_flip=False, rotate=0, contrast=(1.0, 1.0), brightness=0, saturation=(0.5, 1.5))
    grey = 124  # PIL's luma of (200, 100, 50): (200*299 + 100*587 + 50*114) / 1000 = 124.2
    factors = []
    for seed in range(100):
        out = jitter(img, mask, np.random.default_rng(seed))[0].astype(float)
        f_red, f_blue = (out[0, 0, 0] - grey) / (200 - grey), (out[0, 0, 2] - grey) / (50 - grey)
        assert f_red == pytest.approx(f_blue, abs=0.04)  # one factor, scaling away from the grey level
        factors.append(f_red)
        np.testing.assert_array_equal(out[0, 1], [128, 128, 128])  # grey has no saturation to change
    assert 0.5 - 0.02 < min(factors) < 0.6 and 1.4 < max(factors) < 1.5 + 0.02


def test_samples_are_a_function_of_seed_epoch_and_index(ecssd_pairs):
    pair = ecssd_pairs(1)[0]
    spec = InputSpec(size=64)

    def sample(i=0, epoch=0, seed=0):
        ds = SaliencyDataset([pair, pair], spec, Augment(), seed=seed)
        ds.set_epoch(epoch)
        return ds[i][0]

    first = sample()
    assert torch.equal(first, sample())  # a new dataset, the same sample
    for other in (sample(i=1), sample(epoch=1), sample(seed=1)):
        assert not torch.equal(first, other)


# ---- masks and preprocessing ----------------------------------------------------------------------------------------


def test_mask_normalisation_by_max_and_all_zero_masks(tmp_path):
    np.testing.assert_array_equal(mask_target(np.array([[0, 100], [200, 50]], np.uint8)), [[0, 0.5], [1, 0.25]])
    zero = mask_target(np.zeros((3, 3), np.uint8))
    assert zero.dtype == np.float32 and not zero.any()
    img = write_image(tmp_path / "i.png", rgb(40, 30))
    empty = write_image(tmp_path / "m.png", np.zeros((40, 30), np.uint8))
    x, y, err = SaliencyDataset([(img, empty)], PLAIN, Augment())[0]
    assert err is None and torch.isfinite(x).all() and y.shape == (1, 32, 32) and not y.any()


def test_training_sample_pads_to_a_centred_square_bilinear_image_nearest_mask():
    # the official resampling (target_resize "nearest", the default)
    img = rgb(64, 32)  # h 64, w 32: padded to 64 x 64 with 16 columns each side, then halved to 32
    mask = np.random.default_rng(1).random((64, 32)).astype(np.float32)
    x, y = training_sample(img, mask, PLAIN)
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
    # Halving with half-pixel centres and no antialiasing = the mean of each 2 x 2 block.
    blocks = img.astype(np.float64).reshape(32, 2, 16, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    np.testing.assert_allclose(x[:, :, 8:24].numpy(), blocks, atol=1e-4)
    assert not x[:, :, :8].any() and not x[:, :, 24:].any()
    np.testing.assert_array_equal(y[0, :, 8:24].numpy(), mask[::2, ::2])  # nearest: the top-left of each block
    assert not y[0, :, :8].any() and not y[0, :, 24:].any()
    # The official input convention: RGB order with the Caffe BGR means subtracted from channels 0, 1, 2; padding
    # is zero after the subtraction (the mean colour).
    flat = np.full((32, 16, 3), (10, 20, 30), np.uint8)
    x, _ = training_sample(flat, np.zeros((32, 16), np.float32), InputSpec(**{**OFFICIAL_INPUT.to_dict(), "size": 32}))
    np.testing.assert_allclose(x[:, 0, 8:24].numpy().T, np.tile([10 - 103.939, 20 - 116.779, 30 - 123.68], (16, 1)),
                               atol=1e-4)
    assert not x[:, :, :8].any()


def test_target_rules_agree_with_the_evaluation_threshold():
    import py_sod_metrics.utils as sod_utils

    m = np.arange(256, dtype=np.uint8)[None]
    _, gt = sod_utils.prepare_data(np.zeros_like(m), m)  # what pysodmetrics counts as salient
    np.testing.assert_array_equal(mask_target(m, "binary"), gt.astype(np.float32))
    soft = mask_target(m, "soft")
    np.testing.assert_allclose(soft, m / 255)
    # A soft target is above one half exactly where evaluation says salient, but for the single grey level 128.
    disagree = np.flatnonzero((soft[0] > 0.5) != gt[0])
    assert disagree.tolist() == [128]
    # The official rule rescales a mask whose brightest pixel is not 255; soft does not.
    dim = np.array([[0, 100, 200]], np.uint8)
    assert mask_target(dim, "official").max() == 1 and mask_target(dim, "soft").max() == pytest.approx(200 / 255)


def test_bilinear_targets_sit_on_the_image_grid_nearest_ones_do_not():
    # A mask equal to the image's first channel / 255: on one grid, target x 255 == the network input's channel 0.
    rng = np.random.default_rng(3)
    img = np.repeat(rng.integers(0, 256, (80, 50, 1), dtype=np.uint8), 3, axis=2)
    mask = img[:, :, 0].astype(np.float32) / 255
    x, y = training_sample(img, mask, PLAIN, "bilinear")
    np.testing.assert_allclose(y[0].numpy() * 255, x[0].numpy(), atol=1e-3)
    # The official nearest-floor target: a sharp edge lands about half an output pixel early.
    step = np.zeros((80, 80, 3), np.uint8)
    step[:, 41:] = 255  # the edge between source columns 40 and 41 (of 80 -> 32: 2.5 source pixels an output pixel)
    x, y_near = training_sample(step, step[:, :, 0] / 255, PLAIN, "nearest")
    _, y_bil = training_sample(step, step[:, :, 0] / 255, PLAIN, "bilinear")

    def edge_position(a: torch.Tensor) -> float:  # the rise's centre of mass along the first row, in output pixels
        profile = a[0, 0].numpy().astype(np.float64)
        return float(np.average(np.arange(len(profile) - 1) + 0.5, weights=np.diff(profile)))

    image_edge, near_edge, bil_edge = (edge_position(a) for a in (x, y_near, y_bil))
    assert bil_edge == pytest.approx(image_edge, abs=1e-3)
    assert abs(near_edge - image_edge) >= 0.25  # (side / size - 1) / 2 source pixels = 0.3 output pixels here


def test_dataset_applies_the_target_rule_and_its_epoch_size(tmp_path):
    img = write_image(tmp_path / "i.png", rgb(64, 64))
    mask = write_image(tmp_path / "m.png", np.full((64, 64), 100, np.uint8))
    official = SaliencyDataset([(img, mask)], PLAIN)[0][1]
    soft = SaliencyDataset([(img, mask)], PLAIN, targets="soft", target_resize="bilinear")
    assert official.max() == 1 and soft[0][1].max() == pytest.approx(100 / 255)
    soft.set_epoch(3, 64)
    x, y, _ = soft[0]
    assert x.shape == (3, 64, 64) and y.shape == (1, 64, 64)


def test_masks_follow_exif_orientation_as_photos_do(tmp_path):
    from pfanet.io import load_image, load_mask

    photo, mask = rgb(20, 40), np.zeros((20, 40), np.uint8)
    mask[:, :10] = 255  # the left quarter of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(photo).save(tmp_path / "p.jpg", exif=exif, quality=95)
    Image.fromarray(mask).save(tmp_path / "m.png", exif=exif)
    shown_photo, shown_mask = load_image(tmp_path / "p.jpg"), load_mask(tmp_path / "m.png")
    assert shown_photo.shape[:2] == shown_mask.shape == (40, 20)
    # Rotated clockwise, the stored left columns become the top rows.
    assert shown_mask[:10].min() == 255 and shown_mask[10:].max() == 0


@pytest.mark.parametrize("h, w", [(1, 1), (3, 2), (17, 600), (300, 400), (255, 256), (200, 10)])
def test_pre_and_post_processing_equal_the_padded_square_composition(h, w):
    """preprocess/postprocess/square_nearest read only the pixels the resize uses; they must equal the plain
    composition: zero-pad to the centred square, then F.interpolate (bilinear, half-pixel; nearest for masks)."""
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    spec = InputSpec("BGR", (104.0, 117.0, 123.0), (1.0, 2.0, 3.0), 64)
    square = torch.from_numpy(pad_to_square(normalise(image, spec)))[None]
    want = torch.nn.functional.interpolate(square, size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(preprocess(image, spec), want, rtol=0, atol=2e-3)  # float32 summation order
    logits = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    side, top, left = square_offsets(h, w)
    m = torch.floor(torch.sigmoid(logits)[None] * 255)
    m = torch.nn.functional.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
    want = m[0, 0, top : top + h, left : left + w].round().numpy()
    got = postprocess(logits, h, w)
    assert got.shape == (h, w) and np.abs(got.astype(int) - want).max() <= 1  # a tie may round the other way
    assert (got == want).mean() > 0.999
    mask = rng.random((h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(pad_to_square(mask[None]))[None], size=(64, 64))[0, 0]
    np.testing.assert_array_equal(square_nearest(mask, 64), want.numpy())


def test_extreme_aspect_ratios_do_not_build_the_padded_square():
    """A 20000 x 10 strip pads to a 20000^2 square: 4.8 GB as float32 RGB. Peak memory must stay far below that."""
    code = (
        "import resource, numpy as np, torch\n"
        "from pfanet.transforms import InputSpec, preprocess, postprocess, square_nearest\n"
        "spec = InputSpec(size=64); preprocess(np.zeros((8, 8, 3), np.uint8), spec)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for h, w in ((20000, 10), (10, 20000)):\n"
        "    x = preprocess(np.full((h, w, 3), 200, np.uint8), spec)\n"
        "    m = postprocess(torch.zeros(1, 64, 64), h, w)\n"
        "    y = square_nearest(np.ones((h, w), np.float32), 64)\n"
        "    assert x.shape == (3, 64, 64) and m.shape == (h, w) and y.shape == (64, 64)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 200, f"peak memory grew by {out.stdout.strip()} MB"


# ---- bad pairs ------------------------------------------------------------------------------------------------------


def make_bad_pairs(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """Pairs that cannot be used, by the problem each has, and the path its error must name."""
    good_img = write_image(root / "good.png", rgb(12, 10))
    good_mask = write_image(root / "good_mask.png", np.full((12, 10), 255, np.uint8))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    small_mask = write_image(root / "small_mask.png", np.zeros((10, 10), np.uint8))
    return {
        "missing image": ((root / "nope.jpg", good_mask), root / "nope.jpg"),
        "missing mask": ((good_img, root / "nope.png"), root / "nope.png"),
        "corrupt image": ((root / "corrupt.jpg", good_mask), root / "corrupt.jpg"),
        "truncated image": ((root / "truncated.png", good_mask), root / "truncated.png"),
        "size mismatch": ((good_img, small_mask), small_mask),
    }


def test_bad_pairs_are_reported_with_their_path_and_dropped_from_the_batch(tmp_path):
    bad = make_bad_pairs(tmp_path)
    good = (tmp_path / "good.png", tmp_path / "good_mask.png")
    ds = SaliencyDataset([good] + [pair for pair, _ in bad.values()], PLAIN, Augment())
    items = [ds[i] for i in range(len(ds))]
    assert items[0][2] is None
    for (problem, (_, path)), (_, _, err) in zip(bad.items(), items[1:], strict=True):
        assert err is not None and str(path) in err, problem
    assert "no such file" in items[1][2] and "10x10" in items[5][2]
    x, y, errors = collate(items[:3])
    assert x.shape == (1, 3, 32, 32) and y.shape == (1, 1, 32, 32) and len(errors) == 2
    assert collate(items[1:3]) == (None, None, [items[1][2], items[2][2]])


# ---- loading in parallel and from the cache -------------------------------------------------------------------------


def test_workers_and_cache_give_the_same_samples(tmp_path, ecssd_pairs):
    pairs = []
    for img, mask in ecssd_pairs(4):  # copies, so that the cache can be shown to stand in for the files
        pairs.append((pathlib.Path(shutil.copy(img, tmp_path)), pathlib.Path(shutil.copy(mask, tmp_path))))
    spec = InputSpec(size=64)

    def batches(ds, workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=workers)
        return [b[:2] for b in loader]

    reference = batches(SaliencyDataset(pairs, spec, Augment(), seed=3), 0)
    cached = SaliencyDataset(pairs, spec, Augment(), seed=3, cache=True)
    cached.preload(threads=2, progress=False)
    for img, mask in pairs:
        img.unlink()
        mask.unlink()
    assert len(reference) == 2  # 4 pairs in batches of 2: a loader that yields nothing would compare nothing
    for got in (batches(cached, 2), batches(cached, 0)):
        assert all(torch.equal(a, b) for ref, new in zip(reference, got, strict=True)
                   for a, b in zip(ref, new, strict=True))
    assert "no such file" in SaliencyDataset(pairs, spec)[0][2]  # the files really are gone
