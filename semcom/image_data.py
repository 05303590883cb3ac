"""Image task data: real photographs shipped inside installed packages, cut into patches.

No download: every photo is a file inside the scikit-image or scikit-learn wheel.
The split is by source photo (a photo's patches all land in one split), so no test
patch shares a scene with a training patch. The two motorcycle photos are one stereo
pair of one scene: both are in train. Grey photos are used as RGB with three equal
channels (training only). Licences: docs/dependencies.md ("Image task photos").

Patches: float32 RGB in [0, 1], channels first, [N, 3, P, P]. Test and validation
patches are the non-overlapping P x P grid of each photo, row-major, in PHOTOS order;
training patches are random crops with random flips (`random_crops`).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semedge.core.errors import UserError

PATCH = 32
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Photo:
    name: str
    source: str  # "skimage" (skimage.data.<name>) or "sklearn" (load_sample_images file)
    split: str
    licence: str


PHOTOS = (
    Photo("astronaut", "skimage", "train", "public domain (NASA)"),
    Photo("hubble_deep_field", "skimage", "train", "public domain (NASA)"),
    Photo("motorcycle_left", "skimage", "train", "Middlebury 2014 stereo, free for research"),
    Photo("motorcycle_right", "skimage", "train", "Middlebury 2014 stereo, free for research"),
    Photo("retina", "skimage", "train", "CC0 (M. Haggstrom)"),
    Photo("china", "sklearn", "train", "CC BY 2.0 (danielbuechele, Flickr)"),
    Photo("camera", "skimage", "train", "CC0 (L. Varshney); grey"),
    Photo("coins", "skimage", "train", "no known copyright (Brooklyn Museum); grey"),
    Photo("brick", "skimage", "train", "CC0 (CC0Textures); grey"),
    Photo("grass", "skimage", "train", "CC0 (linolafett, DeviantArt); grey"),
    Photo("gravel", "skimage", "train", "CC0 (CC0Textures); grey"),
    Photo("rocket", "skimage", "val", "public domain (SpaceX)"),
    Photo("chelsea", "skimage", "test", "CC0 (S. van der Walt)"),
    Photo("coffee", "skimage", "test", "CC0 (R. Michetti)"),
    Photo("flower", "sklearn", "test", "CC BY 2.0 (vultilion, Flickr)"),
)


def photos(split: str) -> list[Photo]:
    if split not in SPLITS:
        raise UserError(f"image split {split!r} is unknown", f"use one of {', '.join(SPLITS)}")
    return [p for p in PHOTOS if p.split == split]


# The photo files inside the installed packages (read with Pillow: importing skimage.data or
# sklearn.datasets costs seconds; the pixels are the same as their loaders').
_FILES = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}
_SUFFIX = {"hubble_deep_field": ".jpg", "retina": ".jpg", "rocket": ".jpg"}


def photo_file(photo: Photo) -> Path:
    """Where `photo` lies in its installed package (found without importing the package)."""
    pkg, *sub = _FILES[photo.source]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        extra = "scikit-image" if pkg == "skimage" else "scikit-learn"
        raise UserError(f"{extra} is not installed: the image task's photos ship inside it", f"pip install {extra}")
    suffix = ".jpg" if photo.source == "sklearn" else _SUFFIX.get(photo.name, ".png")
    path = Path(spec.submodule_search_locations[0], *sub, photo.name + suffix)
    if not path.is_file():
        raise UserError(f"the photo {path} is missing from the installed {pkg}", f"reinstall it: pip install --force-reinstall {pkg}")
    return path


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """The photo as uint8 RGB [H, W, 3] (grey photos: three equal channels); read-only."""
    from PIL import Image

    by_name = {p.name: p for p in PHOTOS}
    if name not in by_name:
        raise UserError(f"photo {name!r} is not in the image task's set", f"use one of {', '.join(by_name)}")
    with Image.open(photo_file(by_name[name])) as im:
        img = np.asarray(im.convert("RGB"), dtype=np.uint8)
    img.setflags(write=False)
    return img


def to_chw(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0


def to_hwc_uint8(x: np.ndarray) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> uint8 [H, W, 3] (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(x).transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def grid_patches(img: np.ndarray, size: int = PATCH) -> np.ndarray:
    """The non-overlapping size x size grid of uint8 [H, W, 3], row-major -> float32 [N, 3, size, size]."""
    h, w = img.shape[0] // size, img.shape[1] // size
    cut = img[: h * size, : w * size].reshape(h, size, w, size, 3)  # [h, P, w, P, 3]
    return np.ascontiguousarray(cut.transpose(0, 2, 4, 1, 3).reshape(h * w, 3, size, size), dtype=np.float32) / 255.0


def spread(n_total: int, n: int | None) -> np.ndarray:
    """n indices spread evenly over range(n_total) (all when n is None or >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def split_patches(split: str, n: int | None = None, size: int = PATCH) -> tuple[np.ndarray, list[str]]:
    """(patches [N, 3, P, P], source photo of each) of a split's grids; n: spread evenly over each photo."""
    ps = photos(split)
    per = None if n is None else -(-n // len(ps))
    xs, names = [], []
    for p in ps:
        g = grid_patches(load_photo(p.name), size)
        g = g[spread(len(g), per)]
        xs.append(g)
        names += [p.name] * len(g)
    x = np.concatenate(xs)
    if n is not None:
        keep = spread(len(x), n)
        x, names = x[keep], [names[i] for i in keep]
    return x, names


def random_crops(rng: np.random.Generator, n: int, split: str = "train", size: int = PATCH) -> np.ndarray:
    """n random size x size crops [n, 3, P, P]: a photo drawn uniformly, a uniform position, random flips."""
    imgs = [load_photo(p.name) for p in photos(split)]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    which = rng.integers(0, len(imgs), size=n)
    for i, j in enumerate(which):
        img = imgs[j]
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        c = img[y : y + size, x : x + size]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < 0.5:
            c = c[::-1]
        out[i] = c
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
