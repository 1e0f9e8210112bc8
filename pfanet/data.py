"""Training and evaluation data: list files and benchmark folders, the official augmentation, a fault-tolerant
Dataset whose bad pairs are reported and skipped."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageEnhance
from tqdm import tqdm

from .io import ImageError, list_images, load_image, load_mask
from .transforms import InputSpec, preprocess, square_bilinear, square_nearest

log = logging.getLogger(__name__)

# (image folder, mask folder) name pairs of the common benchmark layouts, matched case-insensitively.
FOLDER_LAYOUTS = (("images", "masks"), ("image", "mask"), ("imgs", "gt"), ("img", "gt"), ("im", "gt"),
                  ("images", "gt"), ("image", "gt"), ("images", "labels"))


class DataError(ValueError):
    """A data source that cannot be used at all (a bad pair is skipped instead)."""


Pair = tuple[pathlib.Path, pathlib.Path]


def read_list_file(path: str | os.PathLike) -> list[Pair]:
    """Official format: one "image_path mask_path" per line, relative paths taken from the list file's folder.

    Paths containing spaces are written separated by a tab instead; blank lines and lines starting with # are
    skipped. A pair whose files are missing is kept here and reported when it is loaded.
    """
    path = pathlib.Path(path)
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Paths with spaces: "a b.jpg a b.png" is ambiguous, so a tab separates them when present.
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'image mask', got {line!r}")
        pairs.append(tuple(path.parent / p for p in parts))
    return pairs


def find_folder_pairs(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path] | None:
    """The (images, masks) folders of a benchmark folder: DUTS-style *-Image/*-Mask or a known name pair."""
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    for name, d in subdirs.items():
        if name.endswith("-image"):
            m = subdirs.get(name[: -len("-image")] + "-mask")
            if m:
                return d, m
    for img, mask in FOLDER_LAYOUTS:
        if img in subdirs and mask in subdirs:
            return subdirs[img], subdirs[mask]
    return None


def pair_by_stem(images: list[pathlib.Path], masks: list[pathlib.Path], source: str) -> list[Pair]:
    """Pair each image with the mask of the same file stem (0001.jpg with 0001.png); unmatched images are counted."""
    by_stem = {m.stem: m for m in masks}
    pairs = [(i, by_stem[i.stem]) for i in images if i.stem in by_stem]
    unmatched = len(images) - len(pairs)
    if unmatched:
        log.warning("%s: %d images have no mask of the same name and are left out", source, unmatched)
    return pairs


def read_pairs(source: str | os.PathLike) -> list[Pair]:
    """Pairs from a list file, or a benchmark folder (images and masks paired by file stem)."""
    source = pathlib.Path(source)
    if source.is_file():
        pairs = read_list_file(source)
    elif source.is_dir():
        found = find_folder_pairs(source)
        if found is None:
            raise DataError(f"{source}: no image/mask folders found (expected e.g. DUTS-TE-Image + DUTS-TE-Mask, "
                            "images + masks, Imgs + GT)")
        pairs = pair_by_stem(list_images(found[0]), list_images(found[1]), str(source))
    else:
        raise DataError(f"{source}: no such list file or folder")
    if not pairs:
        raise DataError(f"{source}: no image/mask pairs")
    return pairs


def dataset_name(source: str | os.PathLike) -> str:
    """A short name for reports: the folder name, or for ecssd/val.txt "ecssd-val"."""
    p = pathlib.Path(source)
    return f"{p.parent.name}-{p.stem}" if p.is_file() else p.name


@dataclasses.dataclass(frozen=True)
class Augment:
    """The official augmentation, in its order: random crop + horizontal flip, rotation, then contrast and brightness.

    `saturation` adds the paper's colour jitter (absent from the official code), between rotation and contrast.
    All randomness comes from the generator passed in, so a sample is a function of (seed, epoch, index).

    Attributes:
        crop_flip: remove fewer than h/8 rows and w/8 columns at a random offset, and flip with p = 0.5.
        rotate: rotate by a random integer angle in [-rotate, rotate) degrees about the centre; 0 disables.
        contrast: pixels are multiplied by a factor drawn from U[contrast[0], contrast[1]).
        brightness: then a random integer in [-brightness, brightness) is added and the result clipped to [0, 255].
        saturation: a factor drawn from U[saturation[0], saturation[1]) for PIL's colour enhancement, or None.
    """

    crop_flip: bool = True
    rotate: int = 25
    contrast: tuple[float, float] = (0.5, 1.5)
    brightness: int = 20
    saturation: tuple[float, float] | None = None

    def __call__(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) float mask -> the augmented pair (image uint8, mask float32)."""
        if self.crop_flip:
            img, mask = random_crop_flip(img, mask, rng)
        if self.rotate:
            img, mask = random_rotate(img, mask, rng, self.rotate)
        img = img.astype(np.float32)
        if self.saturation:
            pil = Image.fromarray(img.astype(np.uint8))
            img = np.asarray(ImageEnhance.Color(pil).enhance(rng.uniform(*self.saturation)), np.float32)
        img = img * rng.uniform(*self.contrast)
        if self.brightness:
            img = img + rng.integers(-self.brightness, self.brightness)
        return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.float32)


def random_crop_flip(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Remove fewer than h/8 rows and w/8 columns in total (at a random offset), then flip with p = 0.5.

    As the official random_crop: dh = randint(h/8) rows go, top = randint(dh) of them above; the same for columns.
    """
    h, w = mask.shape
    dh, dw = rng.integers(max(1, h // 8)), rng.integers(max(1, w // 8))
    top = rng.integers(dh) if dh else 0
    left = rng.integers(dw) if dw else 0
    img, mask = img[top : top + h - dh, left : left + w - dw], mask[top : top + h - dh, left : left + w - dw]
    if rng.integers(10) >= 5:  # the official coin
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def random_rotate(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, max_angle: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rotate both by the same random integer angle in [-max_angle, max_angle) degrees, counter-clockwise about the
    centre, bilinear, black outside (the official cv2.warpAffine); the mask stays float so its edges stay soft."""
    angle = float(rng.integers(-max_angle, max_angle))
    if angle == 0:
        return img, mask
    img = np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BILINEAR))
    mask = Image.fromarray(mask.astype(np.float32))  # mode F: the rotated mask keeps fractional edges
    mask = np.asarray(mask.rotate(angle, resample=Image.BILINEAR))
    return img, mask


def training_sample(img: np.ndarray, mask: np.ndarray, spec: InputSpec, target_resize: str = "nearest"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 + (H, W) target in [0, 1] -> network input (3, S, S) and target (1, S, S) at S = spec.size.

    Both are zero-padded to a centred square first (the image after normalisation, so its padding is the mean
    colour, as the official code); the image is resized bilinearly (transforms.preprocess); the target with
    nearest neighbours as the official code ("nearest", half an output pixel off the image's grid), or with the
    image's own bilinear taps ("bilinear", aligned). See recipes.TARGET_RESIZES.
    """
    x = preprocess(img, spec)
    resize = square_bilinear if target_resize == "bilinear" else square_nearest
    y = torch.from_numpy(resize(mask.astype(np.float32), spec.size, spec.pad))[None]  # the image's padded box
    return x, y


def mask_target(mask: np.ndarray, rule: str = "official") -> np.ndarray:
    """(H, W) uint8 mask -> float32 target in [0, 1] by one of recipes.TARGETS:

    "official": mask / mask.max() (an all-zero mask stays zero; the official code divides by zero);
    "soft": mask / 255; "binary": mask > 128, the threshold pysodmetrics applies to ground truth in evaluation.
    """
    mask = mask.astype(np.float32)
    if rule == "soft":
        return mask / 255
    if rule == "binary":
        return (mask > 128).astype(np.float32)
    top = mask.max()
    return mask / top if top > 0 else mask


def load_pair(img_path: pathlib.Path, mask_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a pair: (H, W, 3) uint8 RGB and (H, W) uint8 mask. Raises ImageError naming the file and the problem
    (missing, unreadable, corrupt, or image and mask of different sizes)."""
    img, mask = load_image(img_path), load_mask(mask_path)
    if img.shape[:2] != mask.shape:
        raise ImageError(f"{img_path}: image is {img.shape[1]}x{img.shape[0]} but its mask {mask_path} is "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    return img, mask


class SaliencyDataset(torch.utils.data.Dataset):
    """Image/mask pairs -> (input, target, error). A pair that cannot be used yields error = "path: problem" and
    empty tensors; `collate` drops it, so a long run reports it and goes on.

    Augmentation randomness comes from (seed, epoch, index), so a sample does not depend on which DataLoader
    worker makes it, and a resumed run sees the same samples as an uninterrupted one.

    Args:
        pairs: (image, mask) paths.
        spec: the input convention and size of the network.
        augment: the augmentation, or None for the plain preprocessing.
        seed: the run's seed.
        cache: keep decoded pairs in memory. Call `preload` before the DataLoader starts its workers so that they
            share one copy; otherwise each process fills its own as it goes.
    """

    def __init__(self, pairs: list[Pair], spec: InputSpec, augment: Augment | None = None, seed: int = 0,
                 cache: bool = False, targets: str = "official", target_resize: str = "nearest"):
        self.pairs, self.spec, self.augment, self.seed = pairs, spec, augment, seed
        self.targets, self.target_resize = targets, target_resize
        self.epoch = 0
        # index -> decoded pair, or the error message of a pair that cannot be used
        self.cache: dict[int, tuple[np.ndarray, np.ndarray] | str] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int, size: int | None = None) -> None:
        """The epoch (augmentation seeds) and, with an input-size schedule, its input size."""
        self.epoch = epoch
        if size is not None:
            self.spec = dataclasses.replace(self.spec, size=size)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray] | str:
        """The decoded pair i, or its error message."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        try:
            item = load_pair(*self.pairs[i])
        except (ImageError, OSError) as e:
            item = str(e)
        if self.cache is not None:
            self.cache[i] = item
        return item

    def preload(self, threads: int = 4, progress: bool = True) -> None:
        """Decode every pair into the cache now (PIL decodes without the GIL, so threads help)."""
        if self.cache is None:
            self.cache = {}
        todo = [i for i in range(len(self)) if i not in self.cache]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for _ in tqdm(pool.map(self.load, todo), total=len(todo), disable=not progress, desc="decoding",
                          dynamic_ncols=True):
                pass

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        item = self.load(i)
        if isinstance(item, str):
            return torch.empty(0), torch.empty(0), item
        img, mask = item
        mask = mask_target(mask, self.targets)
        if self.augment is not None:
            img, mask = self.augment(img, mask, np.random.default_rng([self.seed, self.epoch, i]))
        x, y = training_sample(img, mask, self.spec, self.target_resize)
        return x, y, None


def collate(batch):
    """Stack the good samples; return the errors of the bad ones beside them: (x or None, y or None, errors)."""
    good = [(x, y) for x, y, err in batch if err is None]
    errors = [err for _, _, err in batch if err is not None]
    if not good:
        return None, None, errors
    xs, ys = zip(*good)
    return torch.stack(xs), torch.stack(ys), errors
