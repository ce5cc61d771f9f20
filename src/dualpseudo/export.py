"""`dualpseudo export`: a finished run's classifier and generator as a self-contained folder.

The folder keeps the run directory's layout for the files it holds, so `dualpseudo.load_classifier(folder)` and
`dualpseudo.load_generator(folder)` read it as they read the run:

    config.yaml                      the run's resolved config (sampler defaults, provenance)
    stage3/classifier.safetensors    the final classifier (stage 1's when the run has no stage 3)
    encoder/encoder.safetensors      the self-supervised encoder, when the classifier works on its features
    stage2/diffusion.safetensors     the class-conditional diffusion model (EMA weights, config in the header)
    class_names.json, metrics.json   the class names; the measured metrics of every stage
    MODEL_CARD.md                    data, labels per class, metrics, how it was trained, how to load each model
    classifier.torchscript.pt        with --torchscript, for network classifiers: uint8 -> probabilities
"""
from __future__ import annotations

from pathlib import Path

from .artifacts import ArtifactError, atomic_write, write_json, write_text
from .config import load_config
from .rundir import RunDir
from .stages.files import CLASSIFIER, DIFFUSION, ENCODER, METRICS, Metrics

CLASS_NAMES = "class_names.json"
MODEL_CARD = "MODEL_CARD.md"
TORCHSCRIPT = "classifier.torchscript.pt"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda f: f.write(src.read_bytes()))


def _pct(x) -> str:
    return f"{100 * x:.2f} %" if isinstance(x, (int, float)) and not isinstance(x, bool) else "not measured"


def export_run(run_dir: str | Path, out: str | Path, torchscript: bool = False) -> Path:
    """Write the export folder `out` (created; an existing non-empty folder is refused) from `run_dir`."""
    from .api import load_classifier, metrics

    run, dest = RunDir(run_dir), RunDir(out)
    root, out = run.root, dest.root
    if not run.config.is_file():
        raise ArtifactError(f"{root} is not a run directory (no config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not empty; choose a new folder for the export")
    stage = 3 if (run.stage("stage3") / CLASSIFIER).is_file() else 1
    clf_stage = f"stage{stage}"
    if not (run.stage(clf_stage) / CLASSIFIER).is_file():
        raise ArtifactError(f"{root} has no trained classifier yet; finish `dualpseudo run` first")
    gen = run.stage("stage2") / DIFFUSION
    if not gen.is_file():
        raise ArtifactError(f"{gen} does not exist; finish stage 2 (`dualpseudo run`) first")
    clf = load_classifier(root, stage)                  # refuses files it could not load again
    cfg = load_config(run.config)
    out.mkdir(parents=True, exist_ok=True)
    _copy(run.config, dest.config)
    _copy(run.stage(clf_stage) / CLASSIFIER, dest.stage(clf_stage) / CLASSIFIER)
    if clf.meta.get("encoder") == "ssl":
        _copy(run.encoder / ENCODER, dest.encoder / ENCODER)
    elif clf.meta.get("encoder") == "torchscript":
        raise ArtifactError(f"the classifier reads features of the TorchScript encoder "
                            f"{clf.meta.get('encoder_path')}, which the export cannot carry; share that file "
                            f"beside the run directory instead")
    _copy(gen, dest.stage("stage2") / DIFFUSION)
    from .diffuse.latent import AUTOENCODER
    if (run.stage("stage2") / AUTOENCODER).is_file():
        _copy(run.stage("stage2") / AUTOENCODER, dest.stage("stage2") / AUTOENCODER)
    m = metrics(root)
    write_json(out / CLASS_NAMES, list(clf.class_names))
    write_json(out / METRICS, m)
    if torchscript:
        _torchscript(root, stage, clf, out / TORCHSCRIPT)
    write_text(out / MODEL_CARD, model_card(cfg, clf, m, stage, torchscript))
    return out


def _torchscript(root: Path, stage: int, clf, path: Path) -> None:
    import torch

    from .classify.train import load_classifier as load_network

    if clf.kind in ("linear-probe", "label-propagation"):
        raise ArtifactError(f"--torchscript: the {clf.kind} classifier is not a single network; export without "
                            f"--torchscript and load it with dualpseudo.load_classifier")
    model, _ = load_network(RunDir(root).stage(f"stage{stage}") / CLASSIFIER)

    class Wrapped(torch.nn.Module):
        """uint8 (N, H, W, C) -> class probabilities (N, num_classes), float32."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            return torch.softmax(self.net(x).float(), dim=-1)

    example = torch.zeros(2, clf.image_size, clf.image_size, clf.in_channels, dtype=torch.uint8)
    traced = torch.jit.trace(Wrapped(model.float().eval().requires_grad_(False)), example)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.jit.save(traced, f))


def model_card(cfg, clf, m: dict, stage: int, torchscript: bool) -> str:
    """MODEL_CARD.md from the config, the classifier and the run's metrics `m` (`api.metrics`)."""
    s1, s3, ev = (Metrics(m.get(name, {})) for name in ("stage1", f"stage{stage}", "evaluation"))
    d = cfg.data
    labels = (f"the labeled indices in {d.labeled_indices}" if d.labeled_indices
              else f"{d.labels_per_class} per class (split seed {d.split_seed})")
    fid = ev.fid["fid"]
    cons = ev.class_consistency_accuracy
    pl = s1.pseudo_label_accuracy
    lines = [
        "# Model card",
        "",
        "A classifier and a class-conditional image generator trained together by Dual Pseudo Training "
        "(You et al., NeurIPS 2023) with dualpseudo.",
        "",
        "## Data",
        f"- dataset: `{d.name}` ({d.root}); {len(clf.class_names)} classes: {', '.join(clf.class_names)}",
        f"- labeled images: {labels}; every other training image was used without its label",
        f"- images: {clf.image_size}x{clf.image_size}, {clf.in_channels} channel(s)",
        "",
        "## How it was trained",
        f"- stage 1 (pseudo-labels): `{cfg.stage1.learner}`"
        + (f" on a self-supervised `{cfg.encoder.network}` encoder" if clf.meta.get("encoder") == "ssl" else "")
        + (" (each image's features averaged with its mirror image's)" if clf.meta.get("mirror") else ""),
        f"- stage 2 (pseudo-images): `{cfg.stage2.network}` EDM diffusion with classifier-free guidance, "
        f"{cfg.stage2.duration_kimg} kimg, {cfg.stage2.images_per_class} images per class",
        f"- stage 3 (final classifier): `{cfg.stage3.mode}` on real data plus the pseudo-images" if stage == 3
        else "- no stage 3: the classifier is stage 1's",
        "",
        "## Measured (test split; never used to choose a model)",
        f"- stage-1 test top-1: {_pct(s1.test_top1)}; pseudo-label accuracy on the unlabeled pool: {_pct(pl)}",
        f"- final classifier test top-1: {_pct(s3.test_top1)}",
        f"- generator: FID {fid:.2f}" if isinstance(fid, (int, float)) else "- generator: FID not measured",
        f"- class consistency of the pseudo-images (an oracle classifier agrees with the conditioning class): "
        f"{_pct(cons)}",
        "",
        "## Use",
        "```python",
        "import dualpseudo",
        "clf = dualpseudo.load_classifier(\"THIS_FOLDER\")",
        "labels = clf.predict([\"image.png\", \"folder/\"])         # or uint8 (N, H, W, C) arrays; predict_proba too",
        "gen = dualpseudo.load_generator(\"THIS_FOLDER\")",
        f"images = gen.sample({clf.class_names[0]!r}, 8, seed=0)     # uint8 (8, H, W, C), reproducible",
        "```",
        "From the shell: `dualpseudo predict --run-dir THIS_FOLDER IMAGES... --out predictions.csv` and "
        "`dualpseudo sample --run-dir THIS_FOLDER --class NAME --num 8 --out-dir samples/`.",
    ]
    if torchscript:
        lines += ["", "`classifier.torchscript.pt` needs only torch: "
                  "`torch.jit.load(path)(uint8 images (N, H, W, C))` gives class probabilities."]
    return "\n".join(lines) + "\n"
