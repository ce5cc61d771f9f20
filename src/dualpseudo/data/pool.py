"""A user's own data: a folder tree of unlabeled images plus a file naming the labels of a few of them.

    data:
      name: pool
      root: photos/                 # every image under it (any names, nested or flat) is a training image
      labels_file: labels.csv       # `path,label` rows (paths relative to root), or JSON {path: label} / [{path, label}]
      test_root: photos-test/       # optional: class sub-folders of test images (their folder names are classes)
      image_size: 64                # 0: every image must already share one size
      channels: 0                   # 0: 1 when every image is grey, else 3
      skip_unreadable: false        # true: skip pool images that cannot be decoded, and say how many

Images of another size have their shorter side resized to `image_size` (bicubic) and the centre square cut
(`fit_square`); pixels are converted by the folder reader's rules (`datasets._read_image`). The training images
without a label get label -1: the true class of a pool image is unknown, and every metric that would need it
is reported as not available (`Dataset.train_labels_known`). The label names, sorted, are the classes.
The decoded pool is cached as a memory map keyed by every file's path, size and modification time.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .datasets import (DECODE_VERSION, IMAGE_SUFFIXES, DataError, DataMissingError, Dataset, _read_image,
                       folder_mode)

UNKNOWN = -1                                   # the label of a training image nobody labeled


def fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> (size, size, C): shorter side resized to `size` (bicubic), then the centre square."""
    from PIL import Image

    h, w, c = arr.shape
    if (h, w) == (size, size):
        return arr
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8).reshape(size, size, c)


def list_images(root: Path) -> list[Path]:
    """Every image file under `root` (recursively, sorted by relative path); broken links are errors."""
    if not root.is_dir():
        if not root.exists():
            raise DataMissingError(f"image folder {root} (data.root) does not exist")
        raise DataError(f"{root} (data.root) is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.is_symlink() and not p.exists():
                raise DataError(f"{p} is a symbolic link to {os.readlink(p)!r}, which does not exist; fix or "
                                f"delete the link")
            out.append(p)
    if not out:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def read_labels_file(path: Path, root: Path) -> dict[str, str]:
    """{path relative to root (posix): label name} from a CSV (`path,label`, an optional header row) or JSON
    ({path: label} or [{"path": ..., "label": ...}]) file. Paths must name files inside `root`."""
    if not path.is_file():
        raise DataError(f"data.labels_file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"data.labels_file {path} is not UTF-8 text") from None
    pairs: list[tuple[str, str, str]] = []                     # (path, label, where)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DataError(f"data.labels_file {path} is not valid JSON ({e})") from None
        if isinstance(obj, dict):
            items = [(k, v, f"key {k!r}") for k, v in obj.items()]
        elif isinstance(obj, list) and all(isinstance(r, dict) and {"path", "label"} <= set(r) for r in obj):
            items = [(r["path"], r["label"], f"entry {i}") for i, r in enumerate(obj)]
        else:
            raise DataError(f"data.labels_file {path}: write a JSON object {{path: label}} or a list of "
                            f"{{\"path\": ..., \"label\": ...}} objects")
        for p, y, where in items:
            if not isinstance(p, str) or isinstance(y, (bool, list, dict)) or y is None or str(y).strip() == "":
                raise DataError(f"data.labels_file {path}, {where}: a path must be a string and a label a "
                                f"non-empty string")
            pairs.append((p, str(y).strip(), where))
    else:
        rows = list(csv.reader(io.StringIO(text)))
        for i, row in enumerate(rows, start=1):
            if not row or all(not x.strip() for x in row):
                continue
            if i == 1 and [x.strip().lower() for x in row] == ["path", "label"]:
                continue                                       # the header
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"data.labels_file {path}, line {i}: expected `path,label`, got {row!r}")
            pairs.append((row[0].strip(), row[1].strip(), f"line {i}"))
    if not pairs:
        raise DataError(f"data.labels_file {path} names no labeled images")
    base = root.resolve()
    labels: dict[str, str] = {}
    for p, y, where in pairs:
        full = (root / p).resolve()
        if base not in full.parents:
            raise DataError(f"data.labels_file {path}, {where}: {p!r} is outside data.root {root}")
        if not full.is_file():
            raise DataError(f"data.labels_file {path}, {where}: {p!r} does not exist under data.root {root}")
        rel = full.relative_to(base).as_posix()
        if labels.get(rel, y) != y:
            raise DataError(f"data.labels_file {path}, {where}: {p!r} is labeled both {labels[rel]!r} and {y!r}")
        labels[rel] = y
    return labels


def _decode(files: list[Path], size: int, mode: str, channels: int, skip: bool, alloc) -> tuple[np.ndarray, list[int]]:
    """Decode `files` into alloc((N, size, size, channels)); returns (array, indices of skipped files)."""
    from tqdm.auto import tqdm

    out = alloc((len(files), size, size, channels))
    skipped = []
    for i, p in enumerate(tqdm(files, desc="decoding the image pool", unit="img", disable=len(files) < 5000,
                               dynamic_ncols=True)):
        try:
            arr, _ = _read_image(p, mode)
        except DataError:
            if not skip:
                raise
            skipped.append(i)
            continue
        if size and arr.shape[:2] != (size, size):
            arr = fit_square(arr, size)
        out[i] = arr
    return out, skipped


def _geometry(files: list[Path], image_size: int, channels: int) -> tuple[int, str, int]:
    """(size, PIL mode, channels): the configured ones, or those every image agrees on (header reads only)."""
    from PIL import Image

    if not image_size:
        sizes = set()
        for p in files:
            try:
                with Image.open(p) as im:
                    sizes.add(im.size)
            except Exception:
                continue                                   # decoding reports it (or skips it)
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            raise DataError(f"the pool's images have {len(sizes)} different sizes "
                            f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:4])}{', ...' if len(sizes) > 4 else ''}"
                            f"); set data.image_size to bring them to one square size")
        image_size = next(iter(sizes))[0]
    mode = ("L" if channels == 1 else "RGB") if channels else folder_mode(files)
    return image_size, mode, 1 if mode == "L" else 3


def load_pool(cfg, cache: Path | None = None) -> Dataset:
    """The `pool` data source (module docstring): unlabeled images + a labels file (+ optional test folders)."""
    root = Path(cfg.root).expanduser()
    if not cfg.labels_file:
        raise DataError("data.name=pool needs data.labels_file: a CSV (path,label) or JSON file of the labeled "
                        "images' paths relative to data.root")
    files = list_images(root)
    labels = read_labels_file(Path(cfg.labels_file).expanduser(), root)
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise DataError(f"data.labels_file {cfg.labels_file} names {len(classes)} class ({classes[0]!r}); "
                        f"a classifier needs labeled images of at least 2 classes")
    rel = [p.resolve().relative_to(root.resolve()).as_posix() for p in files]
    listed = set(rel)
    missing = sorted(set(labels) - listed)
    if missing:
        raise DataError(f"data.labels_file {cfg.labels_file}: {missing[0]!r} is not an image file of the pool "
                        f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    size, mode, channels = _geometry(files, cfg.image_size, cfg.channels)
    y = np.array([classes.index(labels[r]) if r in labels else UNKNOWN for r in rel], np.int64)

    def decode(alloc):
        return _decode(files, size, mode, channels, cfg.skip_unreadable, alloc)

    if cache is None:
        x, skipped = decode(lambda shape: np.zeros(shape, np.uint8))
    else:
        h = hashlib.sha256(f"pool|{root.resolve()}|{size}|{mode}|{cfg.skip_unreadable}|{DECODE_VERSION}".encode())
        for p, r in zip(files, rel):
            st = p.stat()
            h.update(f"{r}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        path = Path(cache) / f"pool-{h.hexdigest()[:20]}.npy"
        skip_path = path.with_suffix(".skipped.json")
        x = None
        if path.is_file() and skip_path.is_file():
            try:
                x, skipped = np.load(path, mmap_mode="r"), json.loads(skip_path.read_text())
                if x.shape != (len(files), size, size, channels):
                    x = None
            except (OSError, ValueError):
                x = None
        if x is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                arr, skipped = decode(lambda shape: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                                              shape=shape))
                arr.flush()
                del arr
                os.replace(tmp, path)
                skip_path.write_text(json.dumps(skipped))
            finally:
                tmp.unlink(missing_ok=True)
            x = np.load(path, mmap_mode="r")
    if skipped:
        bad_labeled = [rel[i] for i in skipped if y[i] != UNKNOWN]
        if bad_labeled:
            raise DataError(f"labeled image {root / bad_labeled[0]} cannot be read; replace it or remove its "
                            f"line from data.labels_file")
        keep = np.setdiff1d(np.arange(len(files)), skipped)
        x, y = np.asarray(x)[keep], y[keep]
        print(f"data: skipped {len(skipped)} unreadable image(s) of {len(files)} (data.skip_unreadable)")
    if cfg.test_root:
        tx, ty = _test_set(Path(cfg.test_root).expanduser(), classes, size, mode)
    else:
        tx, ty = np.zeros((0, size, size, channels), np.uint8), np.zeros(0, np.int64)
    return Dataset(f"pool:{root.name}", x, y, tx, ty, tuple(classes))


def _test_set(test_root: Path, classes: list[str], size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """`test_root/<class>/*` decoded to the pool's size and mode; every folder name must be a known class."""
    from .datasets import _list_folder_split

    if not test_root.is_dir():
        raise DataError(f"data.test_root {test_root} does not exist")
    folders = sorted(p.name for p in test_root.iterdir() if p.is_dir())
    extra = sorted(set(folders) - set(classes))
    if extra:
        raise DataError(f"data.test_root {test_root}: class folder {extra[0]!r} is not a label of "
                        f"data.labels_file (classes: {classes})")
    files, labels = _list_folder_split(test_root, folders)
    if not files:
        raise DataError(f"data.test_root {test_root} holds no images in class sub-folders")
    x = np.stack([fit_square(_read_image(p, mode)[0], size) for p in files])
    return x, np.array([classes.index(folders[c]) for c in labels], np.int64)
