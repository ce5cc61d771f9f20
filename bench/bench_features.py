"""Which features should label propagation use? Poisson learning's pool accuracy on finished run directories.

    python bench/bench_features.py --runs runs/bench/e2e-l4-s3-lp runs/bench/e2e-l4-s4-lp --subset 15000

For each run directory (its labeled split, its self-supervised encoder, its stage-2 diffusion network) the
training images (the labeled ones plus `--subset` others drawn with a fixed seed; 0 = all) are embedded by
every candidate below, Poisson learning (`classify/graph.py`, the run's `graph` settings) labels them from the
split's labeled images, and the table gives the accuracy on the unlabeled ones. Candidates:

- `ssl`: the run's SimCLR encoder (`encoder/encoder.safetensors`), the features stages 1 and 3 use;
- `pixels`: the raw pixels;
- `diffusion s=<sigma> <layer> <pool>`: the stage-2 UNet's activations (EMA weights) at one block, for the image
  noised to `sigma` (EDM units, one fixed noise draw per image) with the null class (so the pseudo-labels the
  network was conditioned on never enter), pooled globally (`gap`, C values) or to 2x2 (`2x2`, 4C values);
- `ssl+diffusion`: the normalised `ssl` and best diffusion features side by side.

Use held-out splits (not the ones a reported table uses): the numbers here choose features. Rank 0 / one process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dualpseudo.classify import graph  # noqa: E402
from dualpseudo.classify.contrastive import EncoderFeatures  # noqa: E402
from dualpseudo.config import load_config  # noqa: E402
from dualpseudo.data.datasets import load_dataset  # noqa: E402
from dualpseudo.diffuse.train import load_diffusion  # noqa: E402
from dualpseudo.evaluate.features import extract_features  # noqa: E402
from dualpseudo.stages.files import Split  # noqa: E402
from dualpseudo.training import to_float  # noqa: E402


@torch.inference_mode()
def diffusion_features(path: Path, images: np.ndarray, sigma: float, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every encoder/middle/decoder block's activations of the UNet in `path` for uint8 (N, H, W, C) images:
    {block name: (N, 5C) float32}, the first C global-average-pooled, the other 4C pooled to 2x2."""
    net = load_diffusion(path, torch.device("cpu"))[0].net
    blocks = {f"enc{i}": m for i, m in enumerate(net.enc)} | {f"mid{i}": m for i, m in enumerate(net.mid)} \
        | {f"dec{i}": m for i, m in enumerate(net.dec)}
    out: dict[str, list[np.ndarray]] = {k: [] for k in blocks}
    for start in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(start))
        s = torch.full((len(x),), sigma)
        c_in = (1 / (0.25 + s ** 2).sqrt()).view(-1, 1, 1, 1)          # EDM's c_in, sigma_data = 0.5
        null = torch.full((len(x),), net.num_classes, dtype=torch.long)
        acts: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.float()))
                 for k, m in blocks.items()]
        with torch.autocast("cpu", torch.bfloat16):
            net((x + sigma * noise) * c_in, s.log() / 4, null)
        for h in hooks:
            h.remove()
        for k, a in acts.items():                                        # a: (B, C, h, w)
            out[k].append(torch.cat([a.mean((2, 3)), F.adaptive_avg_pool2d(a, 2).flatten(1)], 1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def pool_accuracy(feats: np.ndarray, labeled: np.ndarray, y: np.ndarray, num_classes: int, g) -> float:
    """Poisson learning's accuracy (%) on the rows of `feats` (N, D) that are not `labeled`."""
    pool = np.setdiff1d(np.arange(len(feats)), labeled)
    r = graph.propagate(feats, labeled, y[labeled], num_classes, k=g.k, max_iter=g.max_iter, balanced=g.balanced,
                        score_of=pool)
    return float((r["scores"].argmax(1).numpy()[pool] == y[pool]).mean() * 100)


def normalised(f: np.ndarray) -> np.ndarray:
    return F.normalize(torch.as_tensor(f), dim=1).numpy()


def bench_run(run: Path, subset: int, sigmas: list[float]) -> dict[str, float]:
    cfg = load_config(run / "config.yaml")
    ds = load_dataset(cfg.data)
    split = Split.read(run / "stage1")
    labeled_all = np.array(sorted(i for v in split.per_class.values() for i in v))
    rows = np.arange(len(ds.train_images))
    if subset:
        rows = np.union1d(labeled_all, np.random.default_rng(0).choice(len(rows), subset, replace=False))
    labeled = np.searchsorted(rows, labeled_all)
    images = ds.train_images[rows]
    images = images[..., None] if images.ndim == 3 else images
    y, C, g = ds.train_labels[rows], ds.num_classes, cfg.graph
    acc: dict[str, float] = {}
    ssl = extract_features(EncoderFeatures(run / "encoder" / "encoder.safetensors", cfg.runtime.precision), images,
                           batch_size=1000, device="cpu", progress=False)
    acc["ssl"] = pool_accuracy(ssl, labeled, y, C, g)
    acc["pixels"] = pool_accuracy(images.reshape(len(images), -1).astype(np.float32), labeled, y, C, g)
    best, best_acc = None, -1.0
    for sigma in sigmas:
        t = time.time()
        feats = diffusion_features(run / "stage2" / "diffusion.safetensors", images, sigma)
        print(f"{run.name}: diffusion features at sigma={sigma} in {time.time() - t:.0f} s", file=sys.stderr)
        for block, f in feats.items():
            c = f.shape[1] // 5
            for pool_name, part in (("gap", f[:, :c]), ("2x2", f[:, c:])):
                name = f"diffusion s={sigma} {block} {pool_name}"
                acc[name] = pool_accuracy(part, labeled, y, C, g)
                if acc[name] > best_acc:
                    best, best_acc = part, acc[name]
    if best is not None:
        acc["ssl+diffusion (best diffusion row)"] = pool_accuracy(
            np.concatenate([normalised(ssl), normalised(best)], 1), labeled, y, C, g)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with stages 1 and 2 done")
    p.add_argument("--subset", type=int, default=15000, help="unlabeled training images to embed (0 = all)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.3])
    p.add_argument("--top", type=int, default=6, help="diffusion rows to print (by mean accuracy)")
    args = p.parse_args()
    torch.manual_seed(0)
    results = [bench_run(Path(r), args.subset, args.sigmas) for r in args.runs]
    names = list(results[0])
    mean = {n: float(np.mean([r[n] for r in results])) for n in names}
    diff = sorted((n for n in names if n.startswith("diffusion")), key=lambda n: -mean[n])[:args.top]
    shown = [n for n in names if not n.startswith("diffusion")] + diff
    print(f"\n| features | pool accuracy (%) {' / '.join(Path(r).name for r in args.runs)} | mean |")
    print("|---|---|---|")
    for n in sorted(shown, key=lambda n: -mean[n]):
        print(f"| {n} | {' / '.join(f'{r[n]:.2f}' for r in results)} | {mean[n]:.2f} |")


if __name__ == "__main__":
    main()
