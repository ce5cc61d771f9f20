"""The Python API: run a config, load a run's classifier and generator, predict, sample.

    import dualpseudo
    dualpseudo.run("configs/fashion_mnist.yaml", "runs/demo")           # what `dualpseudo run` does
    clf = dualpseudo.load_classifier("runs/demo")                    # stage 3's classifier (stage=1: stage 1's)
    probs = clf.predict_proba(images)                                # uint8 (N, H, W, C) -> (N, C)
    labels = clf.predict(["photos/", "x.png"])                       # or image files and folders
    gen = dualpseudo.load_generator("runs/demo")
    x = gen.sample("sneaker", 16, seed=0)                            # uint8 (16, H, W, C), the same every call

Both loaders take a run directory or a folder written by `dualpseudo export` (the same layout, fewer files).
Images given as files go through `load_images`: the run's channel count and size (below).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .artifacts import ArtifactError, load_weights, weights_meta
from .config import ConfigError
from .data.datasets import IMAGE_SUFFIXES, DataError
from .rundir import RunDir
from .stages.files import CLASSIFIER, DIFFUSION, ENCODER


# ---------------------------------------------------------------------------------------------- images
def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by `paths`: files as given, folders searched recursively (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p} does not exist")
    return out


def load_images(paths: Sequence[str | Path], image_size: int, channels: int) -> tuple[np.ndarray, list[Path]]:
    """Read image files into uint8 (N, image_size, image_size, channels), and the files in that order.

    Pixels are converted as the folder dataset converts them (`data.datasets._read_image`: one channel is the
    luminance, 16-bit grey scaled to 8 bits, transparency composited onto black; three channels RGB). An image
    of another size has its shorter side resized to `image_size` (bicubic), then the centre square cut."""
    from .data.datasets import _read_image
    from .data.pool import fit_square

    files = image_files(paths)
    out = np.empty((len(files), image_size, image_size, channels), np.uint8)
    for i, p in enumerate(files):
        out[i] = fit_square(_read_image(p, "L" if channels == 1 else "RGB")[0], image_size)
    return out, files


# ---------------------------------------------------------------------------------------------- classifier
def _meta_key(path: Path) -> str:
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; finish that stage first (`dualpseudo run ...`)", path)
    keys = weights_meta(path)
    for key in ("dualpseudo_graph", "dualpseudo_classifier"):
        if key in keys:
            return key
    raise ArtifactError(f"{path} is not a dualpseudo classifier (no metadata)", path)


@dataclass
class Classifier:
    """A trained classifier: `predict_proba(images) -> (N, C)` and `predict(images) -> (N,)` class indices.

    `images`: uint8 (N, H, W, C) at the run's size, or image files and folders (read with `load_images`)."""

    kind: str                                   # a network name, "linear-probe" or "label-propagation"
    class_names: tuple[str, ...]
    image_size: int
    in_channels: int
    meta: dict
    _proba: Callable[[np.ndarray], np.ndarray]

    def _images(self, images) -> np.ndarray:
        if isinstance(images, (str, Path)) or (isinstance(images, (list, tuple)) and images
                                               and isinstance(images[0], (str, Path))):
            images = load_images([images] if isinstance(images, (str, Path)) else images, self.image_size,
                                 self.in_channels)[0]
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        want = (self.image_size, self.image_size, self.in_channels)
        if images.dtype != np.uint8 or images.shape[1:] != want:
            raise ConfigError(f"images must be uint8 (N, {want[0]}, {want[1]}, {want[2]}); got {images.dtype} "
                             f"{images.shape} (image files are converted for you)")
        return images

    def predict_proba(self, images) -> np.ndarray:
        return self._proba(self._images(images))

    def predict(self, images) -> np.ndarray:
        return self.predict_proba(images).argmax(1)


def _stage_dir(root: Path, stage: int) -> Path:
    if stage not in (1, 3):
        raise ConfigError(f"stage must be 1 or 3, not {stage!r}")
    return RunDir(root).stage(f"stage{stage}")


def _encoder_features(root: Path, meta: dict, precision: str):
    """The feature module a classifier file's `meta` was fitted on (mirror-averaged where it says so)."""
    from .classify.linear import MirrorAveraged, build_encoder
    if meta.get("encoder") == "ssl":
        from .classify.contrastive import EncoderFeatures
        encoder = EncoderFeatures(RunDir(root).encoder / ENCODER, precision)
    else:
        encoder = build_encoder(meta["encoder"], meta.get("encoder_path"), precision)
    return MirrorAveraged(encoder) if meta.get("mirror") else encoder


def _run_precision(root: Path, device: torch.device) -> str:
    """The run's `runtime.precision` (its stages computed with it; `auto` resolved for `device`), fp32 without a
    config."""
    from .config import load_config
    from .runtime import resolve_precision

    config = RunDir(root).config
    return resolve_precision(load_config(config).runtime.precision, device) if config.is_file() else "fp32"


def load_classifier(run_dir: str | Path, stage: int = 3, device: str | torch.device = "cpu",
                    batch_size: int = 512) -> Classifier:
    """Stage `stage`'s classifier (3: the final one) of a run directory or an exported folder."""
    from .classify.linear import load_probe, probe_predict
    from .classify.train import load_classifier as load_network, predict
    from .evaluate.features import extract_features

    root = Path(run_dir)
    path = _stage_dir(root, stage) / CLASSIFIER
    key = _meta_key(path)
    device = torch.device(device)
    precision = _run_precision(root, device)

    def feats(encoder, images: np.ndarray) -> np.ndarray:
        return extract_features(encoder, images, batch_size=batch_size, device=device, progress=False)

    if key == "dualpseudo_graph":
        from .classify import graph
        tensors, meta = load_weights(path, key, "dualpseudo graph classifier")
        if "features" not in tensors:
            raise ArtifactError(f"{path} holds no node features (written by an older version); rerun that stage "
                                f"with `dualpseudo stage{stage} CONFIG --run-dir {root} --force`")
        encoder = _encoder_features(root, meta, precision)
        nodes, scores = tensors["features"].float().numpy(), tensors["scores"].double()

        def proba(images: np.ndarray) -> np.ndarray:
            f = feats(encoder, images)
            if "whiten_projection" in tensors:
                f = graph.whiten(f, tensors["whiten_mean"].float(), tensors["whiten_projection"].float())
            return graph.probabilities(graph.predict_new(nodes, scores, f, int(meta["k"])))
        kind = "label-propagation"
    else:
        _, meta = load_weights(path, key, "dualpseudo classifier")
        if meta["network"] == "linear-probe":
            probe, meta = load_probe(path)
            encoder = _encoder_features(root, meta, precision)

            def proba(images: np.ndarray) -> np.ndarray:
                return probe_predict(probe, feats(encoder, images))
        else:
            model, meta = load_network(path, device)

            def proba(images: np.ndarray) -> np.ndarray:
                return predict(model, images, batch_size=batch_size, device=device, precision=precision)
        kind = meta["network"]
    names = tuple(meta.get("class_names") or [str(i) for i in range(int(meta["num_classes"]))])
    return Classifier(kind, names, int(meta["image_size"]), int(meta["in_channels"]), meta, proba)


# ---------------------------------------------------------------------------------------------- generator
@dataclass
class Generator:
    """A run's class-conditional diffusion model: `sample(classes, n, seed=...)` -> uint8 (n, H, W, C)."""

    net: torch.nn.Module
    meta: dict
    class_names: tuple[str, ...]
    defaults: dict                               # sampler, steps, guidance_scale, batch_size of the run
    device: torch.device
    decode: Callable | None = None

    def class_index(self, c: int | str) -> int:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if 0 <= int(c) < len(self.class_names):
                return int(c)
        elif isinstance(c, str) and c in self.class_names:
            return self.class_names.index(c)
        raise ConfigError(f"unknown class {c!r}; the classes are {list(self.class_names)} "
                         f"(or their indices 0-{len(self.class_names) - 1})")

    def sample(self, classes: int | str | Sequence[int | str], n: int | None = None, *, seed: int = 0,
               guidance_scale: float | None = None, steps: int | None = None,
               sampler: str | None = None) -> np.ndarray:
        """`n` images of one class (`classes` a name or index), or one image per entry of a list of classes.

        Image i is drawn from the noise of seed `seed + i`, so the same call gives the same images."""
        from .diffuse.generate import generate

        if isinstance(classes, (str, int, np.integer)):
            if n is None or n <= 0:
                raise ConfigError(f"n must be a positive number of images, not {n!r}")
            labels = np.full(n, self.class_index(classes), np.int64)
        else:
            labels = np.array([self.class_index(c) for c in classes], np.int64)
        d = self.defaults
        return generate(self.net, labels, seed + np.arange(len(labels)), sampler=sampler or d["sampler"],
                        steps=steps or d["steps"],
                        guidance_scale=d["guidance_scale"] if guidance_scale is None else guidance_scale,
                        batch_size=d["batch_size"], device=self.device, precision=d["precision"],
                        decode=self.decode)


def load_generator(run_dir: str | Path, round: int = 1, device: str | torch.device = "cpu") -> Generator:
    """The diffusion model of a run directory (round `round`) or an exported folder."""
    from .config import load_config
    from .diffuse.train import load_diffusion

    root = Path(run_dir)
    stage = RunDir(root).stage("stage2", round)
    path = stage / DIFFUSION
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run `dualpseudo stage2` for {root} first", path)
    device = torch.device(device)
    net, meta = load_diffusion(path, device)
    config = RunDir(root).config
    s2 = load_config(config).stage2 if config.is_file() else None
    defaults = {"sampler": s2.sampler if s2 else "dpmpp_2m", "steps": s2.steps if s2 else 20,
                "guidance_scale": s2.guidance_scale if s2 else 1.0,
                "batch_size": s2.sample_batch_size if s2 else 250, "precision": _run_precision(root, device)}
    decode = None
    if "latent" in meta:
        from .diffuse.latent import load_latent_decoder
        decode = load_latent_decoder(meta, stage, device)
    names = tuple(meta.get("class_names") or [str(i) for i in range(int(meta["num_classes"]))])
    return Generator(net, meta, names, defaults, device, decode)


# ---------------------------------------------------------------------------------------------- running
def run(config: str | Path, run_dir: str | Path, overrides: Sequence[str] = (), *, stages: Sequence[str] | None = None,
        force: bool = False) -> int:
    """Run a config into `run_dir` as `dualpseudo run` does (resumes; `overrides` like ["stage1.lr=0.01"]);
    returns the exit code (0: done)."""
    from .stages import pipeline

    return pipeline.main(str(config), list(overrides), Path(run_dir),
                         stages=tuple(stages) if stages else pipeline.ALL_STAGES, force=force)


def metrics(run_dir: str | Path) -> dict:
    """Each stage's metrics.json of a run directory, by stage name (absent stages left out)."""
    from .stages.files import run_metrics

    return run_metrics(Path(run_dir))


# ---------------------------------------------------------------------------------------------- commands
def predict_files(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path, *, stage: int = 3,
                  top_k: int = 3, batch_size: int = 512, progress: bool = True) -> Path:
    """`dualpseudo predict`: a CSV with one row per image file: path, class, confidence, the top-k classes
    with their probabilities. Files are read and classified `batch_size` at a time."""
    import csv
    import io

    from tqdm.auto import tqdm

    from .artifacts import write_text

    if top_k <= 0:
        raise ConfigError(f"--top-k must be >= 1, not {top_k}")
    clf = load_classifier(run_dir, stage)
    files = image_files(paths)
    k = min(top_k, len(clf.class_names))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "confidence"] + [f"top{i + 1}{s}" for i in range(k) for s in ("", "_prob")])
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(files), batch_size):
            batch = files[i:i + batch_size]
            probs = clf.predict_proba(load_images(batch, clf.image_size, clf.in_channels)[0])
            for p, row in zip(batch, probs):
                order = np.argsort(-row, kind="stable")[:k]
                w.writerow([str(p), clf.class_names[order[0]], f"{row[order[0]]:.6f}"]
                           + [x for c in order for x in (clf.class_names[c], f"{row[c]:.6f}")])
            bar.update(len(batch))
    return write_text(out, buf.getvalue())


def sample_files(run_dir: str | Path, out_dir: str | Path, *, classes: Sequence[str] = (), num: int,
                 seed: int = 0, guidance_scale: float | None = None, steps: int | None = None,
                 sampler: str | None = None, formats: Sequence[str] = ("png",), round: int = 1) -> list[Path]:
    """`dualpseudo sample --out-dir`: `num` images of each class in `classes` (all when empty) as
    `<out_dir>/<class>/<seed>.png` and/or one `samples.npz` (images, labels, seeds), plus `grid.png`.

    Class c's image j comes from seed `seed + j`, so the files are the same on every call."""
    from .artifacts import atomic_write, save_npz
    from .figures import save_grid

    bad = sorted(set(formats) - {"png", "npz"})
    if bad or not formats:
        raise ConfigError(f"--format: cannot write {bad or 'nothing'}; choose png and/or npz")
    if num <= 0:
        raise ConfigError(f"--num must be a positive number of images per class, not {num}")
    gen = load_generator(run_dir, round)
    idx = [gen.class_index(c if not str(c).isdigit() or c in gen.class_names else int(c)) for c in classes] \
        or list(range(len(gen.class_names)))
    out_dir = Path(out_dir)
    folders = [_safe_name(n) for n in gen.class_names]
    if len(set(folders)) < len(folders):                  # two names alike once cleaned: prefix the index
        folders = [f"{i}_{f}" for i, f in enumerate(folders)]
    written, all_images, all_labels = [], [], []
    for c in idx:
        images = gen.sample(c, num, seed=seed, guidance_scale=guidance_scale, steps=steps, sampler=sampler)
        all_images.append(images)
        all_labels.append(np.full(num, c, np.int64))
        if "png" in formats:
            from PIL import Image
            folder = out_dir / folders[c]
            folder.mkdir(parents=True, exist_ok=True)
            for j, im in enumerate(images):
                path = folder / f"{seed + j:06d}.png"
                pic = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
                data = _png_bytes(pic)
                atomic_write(path, lambda f, b=data: f.write(b))
                written.append(path)
    images, labels = np.concatenate(all_images), np.concatenate(all_labels)
    if "npz" in formats:
        written.append(save_npz(out_dir / "samples.npz", images=images, labels=labels,
                                seeds=np.tile(seed + np.arange(num), len(idx))))
    written.append(save_grid(out_dir / "grid.png", images, rows=len(idx),
                             row_names=[gen.class_names[c] for c in idx]))
    return written


def _png_bytes(pic) -> bytes:
    import io

    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def _safe_name(name: str) -> str:
    """A class name as a folder name: path separators and other odd characters become '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"
