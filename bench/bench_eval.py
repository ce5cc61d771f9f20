"""Cost of evaluation on this machine: Inception throughput (fp32 vs bf16 autocast, with the bf16 feature error),
Fréchet distance on 2048-d statistics, and precision/recall distances; extrapolated to FID on 10k images with a
cached reference. Short by design (about a minute on 2 CPU cores).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python bench/bench_eval.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dualpseudo.evaluate.features import extract_features
from dualpseudo.evaluate.fid import feature_stats, frechet_distance
from dualpseudo.evaluate.inception import inception_feature_fn
from dualpseudo.evaluate.prdc import precision_recall


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="images per Inception batch")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--n-eval", type=int, default=10000, help="images the FID extrapolation is for")
    ap.add_argument("--pr-n", type=int, default=2000, help="points per set in the measured precision/recall")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, reps {args.reps}")

    images = np.random.default_rng(0).integers(0, 256, size=(args.batch, 28, 28), dtype=np.uint8)
    rows, feats, ips = [], {}, {}
    for precision in ("fp32", "bf16"):
        fn = inception_feature_fn(precision=precision)
        run = lambda: extract_features(fn, images, batch_size=args.batch, device="cpu", progress=False)  # noqa: E731
        feats[precision] = run()                                                    # warm-up (TorchScript profiling)
        sec = _median_time(run, args.reps)
        ips[precision] = args.batch / sec
        rows.append((f"inception {precision} 28px grey -> 299", f"{args.batch / sec:8.1f} img/s",
                     f"{sec / args.batch * 1e3:7.1f} ms/img"))
    f32, bf = feats["fp32"].astype(np.float64), feats["bf16"].astype(np.float64)
    rel = np.linalg.norm(bf - f32, axis=1) / np.linalg.norm(f32, axis=1)
    shift = float(((bf - f32).mean(axis=0) ** 2).sum())
    cos = (bf * f32).sum(1) / np.linalg.norm(bf, axis=1) / np.linalg.norm(f32, axis=1)

    stats_feats = np.random.default_rng(1).normal(size=(args.n_eval, 2048)).astype(np.float32)
    t_stats = _median_time(lambda: feature_stats(stats_feats), 1)
    mu, sigma = feature_stats(stats_feats)
    mu2, sigma2 = feature_stats(stats_feats[: args.n_eval // 2])
    t_fd = _median_time(lambda: frechet_distance(mu, sigma, mu2, sigma2, method="eigh"), 2)

    pr_feats = np.random.default_rng(2).normal(size=(2 * args.pr_n, 2048)).astype(np.float32)
    real, gen = pr_feats[: args.pr_n], pr_feats[args.pr_n:]
    t_pr = _median_time(lambda: precision_recall(real, gen, dtype=torch.float32), 1)
    t_pr_10k = t_pr * (args.n_eval / args.pr_n) ** 2

    rows += [
        ("bf16 vs fp32 features", f"rel L2 err median {np.median(rel):.2e} max {rel.max():.2e}",
         f"cosine min {cos.min():.6f}"),
        ("bf16 - fp32 mean shift ||E[diff]||^2", f"{shift:.3g}", "~ FID offset if ref/gen precisions were mixed"),
        (f"feature_stats ({args.n_eval}x2048, float64)", f"{t_stats:8.2f} s", ""),
        ("frechet_distance eigh (2048-d)", f"{t_fd:8.2f} s", ""),
        (f"precision/recall {args.pr_n}x{args.pr_n} fp32", f"{t_pr:8.2f} s",
         f"-> {args.n_eval // 1000}k x {args.n_eval // 1000}k ~ {t_pr_10k:.0f} s (x{(args.n_eval / args.pr_n) ** 2:.0f})"),
    ]
    for p in ("fp32", "bf16"):
        total = args.n_eval / ips[p] + t_stats + t_fd
        rows.append((f"FID {args.n_eval} images, cached ref, {p}", f"~{total / 60:7.1f} min",
                     f"extraction {args.n_eval / ips[p]:.0f} s + stats {t_stats + t_fd:.1f} s"))
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:<40} {b}")


if __name__ == "__main__":
    main()
