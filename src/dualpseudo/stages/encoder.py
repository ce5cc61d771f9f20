"""The self-supervised encoder step: trained once per dataset and encoder config, shared by every run.

The encoder sees the training images without labels, so it does not depend on the labeled split: it is trained
in `evaluation.cache_dir/encoders/<key>/` (resumable there: `state.pt`, `stats.jsonl`), keyed by the encoder
settings (with their own seed), the dataset's fingerprint, flips and precision, and every run directory of that
dataset copies the finished weights into its own `encoder/` folder. Stage 1 and stage 3 read that copy, and its hash is one of
their inputs, so a retrained encoder re-runs them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import atomic_write
from ..classify.contrastive import save_encoder, train_encoder, trunk
from ..config import ConfigError, ExperimentConfig
from ..data.datasets import Dataset
from ..distributed import World
from .declare import ENCODER_DECL, needs_encoder
from .files import ENCODER, STATS

def check_feature_settings(cfg: ExperimentConfig, ds: Dataset) -> None:
    """Fail before any training when the encoder or the graph cannot work on this dataset (ConfigError)."""
    n = len(ds.train_images)
    if needs_encoder(cfg):
        e = cfg.encoder
        h, _, c = ds.image_shape
        try:                                  # the network's own constructor knows the images it can take
            trunk(e.network, c, h)
        except ValueError as err:
            raise ConfigError(f"encoder.network: {err}; for such data use linear_probe.encoder=pixels (or a "
                              f"torchscript encoder) instead") from None
        if cfg.stage1.init == "encoder" and cfg.stage1.network != e.network:
            raise ConfigError(f"stage1.init: 'encoder' starts stage1.network={cfg.stage1.network!r} from the trunk "
                              f"of encoder.network={e.network!r}; set both to the same network")
        if e.batch_size > n:
            raise ConfigError(f"encoder.batch_size: {e.batch_size} is larger than the {n} training images")
    if cfg.stage3.pseudo_weight != 1.0 and cfg.stage3.mode != "label-propagation":
        raise ConfigError(f"stage3.pseudo_weight: only stage3.mode=label-propagation weighs the pseudo-images; "
                          f"with stage3.mode={cfg.stage3.mode!r} leave it at 1")
    if "label-propagation" in (cfg.stage1.learner, cfg.stage3.mode) and cfg.graph.k >= n:
        raise ConfigError(f"graph.k: {cfg.graph.k} neighbours per image, but the graph has only {n} training "
                          f"images; choose graph.k < {n}")
    if "label-propagation" in (cfg.stage1.learner, cfg.stage3.mode) and cfg.graph.whiten:
        _check_whiten(cfg, ds)


def _check_whiten(cfg: ExperimentConfig, ds: Dataset) -> None:
    """graph.whiten can keep at most as many dimensions as the features have (and the images can span)."""
    h, w, c = ds.image_shape
    encoder, most = cfg.linear_probe.encoder, len(ds.train_images) - 1
    # a TorchScript encoder's width is known only when it runs (graph.whitening checks it then)
    dim = trunk(cfg.encoder.network, c, h)[1] if encoder == "ssl" else h * w * c if encoder == "pixels" else None
    most = most if dim is None else min(dim, most)
    if cfg.graph.whiten > most:
        raise ConfigError(f"graph.whiten: {cfg.graph.whiten} dimensions asked for, but the features have only "
                          f"{dim} dimensions over {len(ds.train_images)} images; choose graph.whiten <= {most} "
                          f"(0: off)")


def encoder_key(cfg: ExperimentConfig, ds: Dataset, legacy: bool = False) -> str:
    """The encoder's cache key: what it reads (declare.ENCODER_DECL) and the dataset it trains on (`legacy`: the
    key run-directory schema 1 gave it, whose cached encoder is reused)."""
    return (ENCODER_DECL.legacy_hash if legacy else ENCODER_DECL.config_hash)(cfg, dataset=ds.fingerprint)


def ensure_encoder(cfg: ExperimentConfig, ds: Dataset, out: Path, device: torch.device, *, world: World,
                   progress: bool = True) -> dict:
    """Train (or reuse, or resume) the shared encoder and copy it into `out`; a summary for the manifest.

    With several processes (`world`) all train; rank 0 writes."""
    key = encoder_key(cfg, ds)
    shared = Path(cfg.evaluation.cache_dir).expanduser() / "encoders" / key
    if world.is_main:
        shared.mkdir(parents=True, exist_ok=True)
        legacy = shared.parent / encoder_key(cfg, ds, legacy=True)
        if not (shared / ENCODER).is_file() and (legacy / ENCODER).is_file():
            _copy_files(legacy, shared)                # trained under run-directory schema 1's key: the same
    world.barrier()
    trained = shared / ENCODER
    reused = trained.is_file()
    if not reused:
        model = train_encoder(cfg.encoder, ds.train_images, shared, hflip=cfg.data.hflip, device=device,
                              precision=cfg.runtime.precision, seed=cfg.encoder.seed, progress=progress,
                              world=world)
        if world.is_main:
            save_encoder(trained, model, {"network": cfg.encoder.network, "in_channels": ds.image_shape[2],
                                          "image_size": ds.image_shape[0], "objective": cfg.encoder.objective,
                                          "steps": cfg.encoder.steps, "dataset": ds.fingerprint})
        world.barrier()
    if world.is_main:
        _copy_files(shared, out)
    return {"key": key, "shared_dir": str(shared), "reused_shared": reused}


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the encoder's weights and stats log from `src` into `dst` (atomically, each)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ENCODER, STATS):
        if (src / name).is_file():
            data = (src / name).read_bytes()
            atomic_write(dst / name, lambda f, data=data: f.write(data))
