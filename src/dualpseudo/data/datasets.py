"""Image datasets as plain arrays: uint8 images (N, H, W, C) and int64 labels.

Readers for Fashion-MNIST / MNIST (IDX files, gzipped or not), CIFAR-10 (python pickle batches, read with a
restricted unpickler that cannot run code), a folder of class sub-folders of images, and a synthetic dataset
for tests. Every problem with the files raises `DataError` with a one-line message naming the file.

An image folder is decoded once into a memory-mapped uint8 array in a cache directory (keyed by every file's
path, size and modification time), so ImageNet-sized folders need disk, not RAM, and later runs skip decoding.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..config import DataConfig


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file and what to do."""


class DataMissingError(DataError):
    """The dataset's files are not on this machine (yet): `--dry-run` lists it instead of failing."""


FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DECODE_VERSION = 2          # of `_read_image`'s conversion rules: part of a decoded folder's cache key
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    train_images: np.ndarray   # (N, H, W, C) uint8
    train_labels: np.ndarray   # (N,) int64 in 0..C-1
    test_images: np.ndarray    # (M, H, W, C) uint8, M may be 0
    test_labels: np.ndarray    # (M,) int64
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_labels_known(self) -> bool:
        """False for a pool of unlabeled images (`data/pool.py`): unknown training labels are -1."""
        return bool(len(self.train_labels) == 0 or self.train_labels.min() >= 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of every image and label, train and test (read in blocks: memory-mapped
        arrays are never loaded whole)."""
        h = hashlib.sha256(self.name.encode())
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(str(a.shape).encode())
            step = max(1, (64 << 20) // max(1, a[:1].nbytes))
            for i in range(0, len(a), step):
                h.update(np.ascontiguousarray(a[i:i + step]).tobytes())
        return h.hexdigest()[:16]


def load_dataset(cfg: DataConfig, cache_dir: str | Path | None = None) -> Dataset:
    """Read the dataset named by `cfg`, check it, and apply `train_limit`/`test_limit`.

    `cache_dir`: where an image folder's decoded, memory-mapped copy lives (`<cache_dir>/data/`); None decodes
    the folder into memory on every call.
    """
    if cfg.name in ("fashion_mnist", "mnist"):
        names = FASHION_MNIST_CLASSES if cfg.name == "fashion_mnist" else [str(i) for i in range(10)]
        ds = _load_idx_dataset(cfg.name, Path(cfg.root), names)
    elif cfg.name == "pool":
        from .pool import load_pool
        ds = load_pool(cfg, Path(cache_dir).expanduser() / "data" if cache_dir else None)
    elif cfg.name == "cifar10":
        ds = _load_cifar10(Path(cfg.root))
    elif cfg.name == "folder":
        ds = _load_folder(Path(cfg.root), Path(cache_dir).expanduser() / "data" if cache_dir else None)
    else:
        ds = make_synthetic(cfg.synthetic_classes, cfg.synthetic_train_per_class, cfg.synthetic_test_per_class,
                            cfg.synthetic_size, cfg.synthetic_channels, seed=cfg.split_seed)
    if cfg.train_limit:
        ds = Dataset(ds.name, ds.train_images[:cfg.train_limit], ds.train_labels[:cfg.train_limit],
                     ds.test_images, ds.test_labels, ds.class_names)
    if cfg.test_limit:
        ds = Dataset(ds.name, ds.train_images, ds.train_labels,
                     ds.test_images[:cfg.test_limit], ds.test_labels[:cfg.test_limit], ds.class_names)
    validate(ds)
    return ds


def validate(ds: Dataset) -> None:
    """Check shapes, dtypes and label ranges of a dataset."""
    for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        if x.ndim != 4 or x.dtype != np.uint8:
            raise DataError(f"{ds.name} {split} images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise DataError(f"{ds.name} {split}: {len(x)} images but {len(y)} labels")
        low = -1 if split == "train" and ds.name.startswith("pool:") else 0   # -1: a pool image's unknown class
        if len(y) and (y.min() < low or y.max() >= ds.num_classes):
            bad = int(y[(y < low) | (y >= ds.num_classes)][0])
            raise DataError(f"{ds.name} {split}: label {bad} is outside 0..{ds.num_classes - 1}")
    if len(ds.train_images) == 0:
        raise DataError(f"{ds.name}: the training set is empty")
    if len(ds.test_images) and ds.test_images.shape[1:] != ds.train_images.shape[1:]:
        raise DataError(f"{ds.name}: test images {ds.test_images.shape[1:]} differ from train {ds.train_images.shape[1:]}")


# ---------------------------------------------------------------------------------------------- IDX (MNIST family)
def _find(root: Path, stem: str, how_to_get: str) -> Path:
    for p in (root / stem, root / f"{stem}.gz"):
        if p.is_file():
            return p
    raise DataMissingError(f"missing {root / stem}(.gz); {how_to_get}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) of unsigned bytes into an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}); re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_dataset(name: str, root: Path, class_names: list[str]) -> Dataset:
    how = ("install it with `apt-get install dataset-fashion-mnist` or run `make data`" if name == "fashion_mnist"
           else "download the four MNIST IDX files into that folder")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", how))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", how))
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{root}: {prefix} files have shapes {x.shape} and {y.shape}, expected (N,H,W) and (N,)")
        if len(x) != len(y):
            raise DataError(f"{root}: {len(x)} {prefix} images but {len(y)} {prefix} labels")
        arrays[split] = (x[..., None].copy(), y.astype(np.int64))
    return Dataset(name, *arrays["train"], *arrays["test"], tuple(class_names))


# ---------------------------------------------------------------------------------------------- CIFAR-10
class _SafeUnpickler(pickle.Unpickler):
    """Allows only the numpy reconstruction helpers found in CIFAR batches; anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataMissingError(f"missing {path}; extract cifar-10-python.tar.gz so that {path.parent} holds the "
                               f"batches")
    try:
        d = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # (N, 32, 32, 3)
    except Exception as e:
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _load_cifar10(root: Path) -> Dataset:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(root / "test_batch")
    return Dataset("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_x, test_y, tuple(CIFAR10_CLASSES))


# ---------------------------------------------------------------------------------------------- image folders
def _list_folder_split(root: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Image files of `root/<class>/` (classes in the given order, files sorted) and their labels.

    A symbolic link that leads nowhere (dangling, or a loop) is an error naming it, never a silently skipped
    image or class."""
    files, labels = [], []
    for c, cls in enumerate(classes):
        folder = root / cls
        _check_link(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                _check_link(p)
                files.append(p)
                labels.append(c)
    return files, np.asarray(labels, np.int64)


def _check_link(p: Path) -> None:
    """DataError when `p` cannot be followed (a dangling symbolic link or a link loop)."""
    try:
        p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise DataError(f"{p} is a symbolic link to {os.readlink(p)!r}, which does not exist; fix or delete "
                            f"the link") from None
        raise DataError(f"{p} disappeared while the folder was read") from None
    except OSError as e:
        raise DataError(f"cannot follow {p} ({e.strerror or e}; a symbolic link loop?); fix or delete it") from None


# Pillow modes: grey ones stay one channel; 16/32-bit integer grey is scaled from 0..65535 to 0..255.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def _read_image(p: Path, mode: str | None) -> tuple[np.ndarray, str]:
    """(uint8 (H, W, C), mode): grey images stay one channel ("L"), everything else becomes RGB.

    Conversion rules: 16-bit (and 32-bit integer) grey is scaled from 0..65535 to 0..255 (an "I" image with
    values outside 0..65535 is refused); palette images take their palette's colours; transparency (LA, RGBA,
    a palette's transparent entry) is composited onto black; floating-point images are refused. Pillow's
    decompression-bomb limit applies: an image of more pixels than that is refused, not decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                mode = mode or ("L" if im.mode in _GREY_MODES else "RGB")
                arr = _to_uint8(im, p, mode)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {p} is too large to decode safely ({e}); shrink it or remove it") from None
    except MemoryError:
        raise DataError(f"image {p} does not fit in memory; shrink it or remove it") from None
    except Exception as e:                  # Pillow's errors for a broken file: OSError, SyntaxError, ValueError...
        raise DataError(f"cannot read image {p} ({type(e).__name__}: {e}); replace or remove it") from None
    return arr, mode


def _to_uint8(im, p: Path, mode: str) -> np.ndarray:
    """An open Pillow image as uint8 (H, W, 1) for mode "L" or (H, W, 3) for "RGB", by `_read_image`'s rules."""
    from PIL import Image

    if im.mode in ("F", "I;32F") or im.mode.startswith("F;"):
        raise DataError(f"image {p} has floating-point pixels (Pillow mode {im.mode}); save it as 8- or 16-bit")
    if im.mode.startswith("I"):                               # 16-bit grey (I;16*) or 32-bit integer grey (I)
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DataError(f"image {p} has integer pixels outside 0..65535 (Pillow mode {im.mode}); save it as "
                            f"8- or 16-bit")
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        im = Image.fromarray(grey)                            # mode L
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")                               # a tRNS colour key
    if "A" in im.getbands() or im.mode in ("La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255    # alpha composited onto black
        im = Image.fromarray(rgb.astype(np.uint8))            # mode RGB
    arr = np.asarray(im.convert(mode), dtype=np.uint8)
    return arr.reshape(*arr.shape[:2], -1)


def folder_mode(files: list[Path]) -> str:
    """"L" when every image is grey, else "RGB": read from the file headers, nothing decoded (a folder mixing
    grey and colour images becomes RGB as a whole, never grey)."""
    from PIL import Image

    for p in files:
        try:
            with Image.open(p) as im:
                if im.mode not in _GREY_MODES:
                    return "RGB"
        except Exception:                       # decoding names the broken file
            continue
    return "L"


def _decode_into(files: list[Path], alloc, desc: str, mode: str | None = None) -> np.ndarray:
    """Decode `files` into `alloc(shape)`, a uint8 (N, H, W, C) array (in memory or a memory map) made once the
    first image gives H, W and C; `mode` ("L"/"RGB") defaults to `folder_mode(files)`."""
    from tqdm.auto import tqdm

    first, mode = _read_image(files[0], mode or folder_mode(files))
    out = alloc((len(files), *first.shape))
    for i, p in enumerate(tqdm(files, desc=desc, unit="img", disable=len(files) < 5000, dynamic_ncols=True)):
        arr = first if i == 0 else _read_image(p, mode)[0]
        if arr.shape != first.shape:
            raise DataError(f"image {p} is {arr.shape[1]}x{arr.shape[0]}, others are "
                            f"{first.shape[1]}x{first.shape[0]}")
        out[i] = arr
    return out


def _read_folder_split(root: Path, classes: list[str], cache: Path | None = None,
                       mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    files, labels = _list_folder_split(root, classes)
    if not files:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    mode = mode or folder_mode(files)
    if cache is None:
        return _decode_into(files, lambda shape: np.empty(shape, np.uint8), f"decoding {root}", mode), labels
    # The memory-mapped copy: keyed by every file's path, size and mtime, written whole before it is renamed.
    h = hashlib.sha256(f"{root.resolve()}|{DECODE_VERSION}|{mode}".encode())
    for p, y in zip(files, labels):
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{y}\n".encode())
    path = cache / f"folder-{h.hexdigest()[:20]}.npy"
    if path.is_file():
        try:
            images = np.load(path, mmap_mode="r")
            if len(images) == len(files) and images.dtype == np.uint8 and images.ndim == 4:
                return images, labels
        except (OSError, ValueError):
            pass                                            # unreadable: decode again
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        out = _decode_into(files, lambda shape: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                                          shape=shape),
                           f"decoding {root} into {path}", mode)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), labels


def _load_folder(root: Path, cache: Path | None = None) -> Dataset:
    """`root/train/<class>/*.png` (+ optional `root/test/<class>/`), or `root/<class>/*.png` with no test set.

    With `cache`, the decoded images are a read-only memory map of `cache/folder-<key>.npy`."""
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist")
    train_root = root / "train" if (root / "train").is_dir() else root
    entries = sorted(train_root.iterdir())
    for p in entries:                                       # a class folder behind a broken link is an error
        _check_link(p)
    classes = sorted(p.name for p in entries if p.is_dir() and p.name != "test")
    if len(classes) < 2:
        raise DataError(f"{train_root} must hold one sub-folder of images per class (found {len(classes)})")
    has_test = (root / "test").is_dir() and train_root != root
    files = _list_folder_split(train_root, classes)[0]
    mode = folder_mode(files + (_list_folder_split(root / "test", classes)[0] if has_test else []))
    x, y = _read_folder_split(train_root, classes, cache, mode)
    if len(x) == 0:
        raise DataError(f"no images found under {train_root}")
    if has_test:
        tx, ty = _read_folder_split(root / "test", classes, cache, mode)
    else:
        tx, ty = np.zeros((0, *x.shape[1:]), np.uint8), np.zeros(0, np.int64)
    return Dataset(f"folder:{root.name}", x, y, tx, ty, tuple(classes))


# ---------------------------------------------------------------------------------------------- synthetic
def make_synthetic(num_classes: int = 4, train_per_class: int = 64, test_per_class: int = 16, size: int = 16,
                   channels: int = 1, seed: int = 0) -> Dataset:
    """Class c is a bright bar at angle c*pi/C through the centre, with jittered position, width and noise."""
    rng = np.random.default_rng(seed + 12345)

    def draw(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
        labels = np.repeat(np.arange(num_classes), n_per_class)
        n = len(labels)
        angle = labels * np.pi / num_classes + rng.normal(0, 0.08, n)
        shift = rng.normal(0, size * 0.06, (n, 2))
        width = rng.uniform(size * 0.08, size * 0.14, n)
        dist = np.abs((xx[None] - shift[:, 0, None, None]) * np.sin(angle)[:, None, None]
                      - (yy[None] - shift[:, 1, None, None]) * np.cos(angle)[:, None, None])
        img = np.exp(-(dist / width[:, None, None]) ** 2) + rng.normal(0, 0.05, (n, size, size))
        img = np.clip(img * 255, 0, 255).astype(np.uint8)[..., None].repeat(channels, axis=-1)
        return img, labels.astype(np.int64)

    x, y = draw(train_per_class)
    tx, ty = draw(test_per_class)
    perm = rng.permutation(len(x))
    return Dataset("synthetic", x[perm], y[perm], tx, ty, tuple(f"class{c}" for c in range(num_classes)))
