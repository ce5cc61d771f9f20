"""Device check: the smoke pipeline end to end on a device, the rates that decide the CIFAR-10 recipe's wall time
(configs/cifar10.yaml), and the recipe's projected wall time stage by stage. One JSON.

  (a) `dualpseudo run configs/smoke.yaml` with runtime.device=DEVICE in bf16, every artifact checked;
  (b) stage-2 training img/s of the recipe's network at its batch size (the real loop, `train_diffusion`), its
      FLOP rate (torch.utils.flop_counter) as a fraction of a bf16 matmul measured in the same run (fp32 on a CPU
      without bf16), and on CUDA the same loop through torch.compile;
  (c) stage-1 SSL steps/s of the recipe's learner and network (64 labeled + 448 unlabeled, `train_classifier`),
      guided sampling img/s (EDM Heun 18 steps, DPM-Solver++(2M) 20 steps) and at the recipe's own sampler
      setting, Inception feature img/s (skipped, with the reason, when the network is not installed);
  (d) the recipe's wall time per stage = its work (iterations, images) / the rate measured for it.

    python bench/device_check.py --device cuda --out device_check.json     # one GPU, at most 8 minutes
    python bench/device_check.py --device cpu --tiny                       # tiny sizes: seconds, checks the check

Rates are medians over logged windows after a dropped warm-up window. `--tiny` swaps in tiny networks and batches,
so its rates say nothing about the recipe; its projection is the same arithmetic on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dualpseudo.classify.train import train_classifier
from dualpseudo.config import ConfigError, load_config
from dualpseudo.distributed import LOCAL
from dualpseudo.diffuse.edm import EDMLoss
from dualpseudo.diffuse.generate import generate
from dualpseudo.diffuse.train import build_model, train_diffusion
from dualpseudo.runtime import autocast, resolve_device

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "cifar10.yaml"
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_ARTIFACTS = (
    "config.yaml", "env.json", "report.html", "report.md",
    "stage1/split.json", "stage1/classifier.safetensors", "stage1/pseudo_labels.npz", "stage1/metrics.json",
    "stage1/state.pt", "stage1/stats.jsonl", "stage1/manifest.json",
    "stage2/diffusion.safetensors", "stage2/state.pt", "stage2/pseudo_images.npz", "stage2/grid.png",
    "stage2/stats.jsonl", "stage2/manifest.json",
    "stage3/classifier.safetensors", "stage3/metrics.json", "stage3/manifest.json",
    "evaluation/metrics.json", "evaluation/manifest.json")
# --tiny: the smoke run shortened further (each stage a few steps)
TINY_SMOKE = ("stage1.iterations=6", "stage1.checkpoint_every=3", "stage1.log_every=3", "stage2.duration_kimg=0.096",
              "stage2.checkpoint_every_kimg=0.064", "stage2.log_every_kimg=0.032", "stage3.iterations=6",
              "evaluation.oracle_iterations=6")
IMAGE = (32, 32, 3)                 # CIFAR-10
NUM_CLASSES = 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `reps` calls after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def matmul_rate(device: torch.device, n: int, reps: int) -> dict:
    """FLOP/s of an n x n x n matmul in bf16 (fp32 where bf16 is unsupported): the device's practical peak."""
    dtype = torch.bfloat16 if bf16_supported(device) else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec = median_seconds(lambda: a @ b, device, reps)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": sec, "flop_per_s": 2 * n ** 3 / sec}


# ---------------------------------------------------------------------------------------------- (a) smoke run
def smoke_run(device: torch.device, tiny: bool, work: Path) -> dict:
    """The smoke config end to end in a subprocess on `device` in bf16; which artifacts exist."""
    run = work / "smoke"
    cmd = [sys.executable, "-m", "dualpseudo", "run", str(SMOKE), "--run-dir", str(run),
           "--set", f"runtime.device={device}", "--set", "runtime.precision=bf16",
           "--set", f"evaluation.cache_dir={work / 'cache'}"]
    for item in TINY_SMOKE if tiny else ():
        cmd += ["--set", item]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    missing = [f for f in SMOKE_ARTIFACTS if not (run / f).is_file()]
    for manifest in sorted(run.rglob("manifest.json")):          # every output a stage recorded
        outputs = json.loads(manifest.read_text()).get("outputs", {})
        missing += [str((manifest.parent / name).relative_to(run)) for name in outputs
                    if not (manifest.parent / name).is_file()]
    env_device = json.loads((run / "env.json").read_text()).get("device") if (run / "env.json").is_file() else None
    ok = proc.returncode == 0 and not missing and env_device is not None and env_device.startswith(device.type)
    return {"ok": ok, "returncode": proc.returncode, "seconds": seconds, "artifacts_checked": len(SMOKE_ARTIFACTS),
            "missing": missing, "env_device": env_device,
            "output_tail": (proc.stdout + proc.stderr)[-1500:] if not ok else ""}


# ---------------------------------------------------------------------------------------------- (b) stage 2 training
def stage2_training(cfg, device: torch.device, steps: int, window: int, peak: float, work: Path,
                    compile: bool = False) -> dict:
    """img/s of `train_diffusion` (median over windows after the first) and its FLOP rate against `peak`."""
    s2 = cfg.stage2
    kimg_window = s2.batch_size * window / 1000
    run_cfg = dataclasses.replace(s2, duration_kimg=s2.batch_size * steps / 1000, log_every_kimg=kimg_window,
                                  checkpoint_every_kimg=10 ** 9)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(1024, s2.batch_size), *IMAGE), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, len(images))
    out = work / f"stage2{'_compiled' if compile else ''}"
    t = time.perf_counter()
    train_diffusion(run_cfg, images=images, labels=labels, num_classes=NUM_CLASSES, out_dir=out, device=device,
                    precision="bf16", hflip=True, progress=False, compile=compile, world=LOCAL)
    wall = time.perf_counter() - t
    windows = [line["img_per_s"] for line in _stats(out)][1:]
    img_per_s = statistics.median(windows)
    net = build_model(s2.network, IMAGE[2], IMAGE[0], NUM_CLASSES, s2.sigma_data).to(device).train()
    x = (torch.rand(s2.batch_size, IMAGE[2], *IMAGE[:2], device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (s2.batch_size,), device=device)
    loss_fn = EDMLoss(s2.P_mean, s2.P_std, s2.sigma_data, s2.p_uncond)
    with FlopCounterMode(display=False) as fc:
        with autocast(device, "bf16"):
            loss = loss_fn(net, x, y).mean()
        loss.backward()
    flop_per_step = fc.get_total_flops()
    flop_per_s = flop_per_step * img_per_s / s2.batch_size
    return {"network": s2.network, "parameters": sum(p.numel() for p in net.parameters()),
            "batch_size": s2.batch_size, "steps": steps, "window_steps": window, "compile": compile,
            "wall_s": wall, "window_img_per_s": windows, "img_per_s": img_per_s,
            "flop_per_step": flop_per_step, "flop_per_s": flop_per_s, "fraction_of_matmul": flop_per_s / peak}


def _stats(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------- (c) stage 1, sampling, Inception
def stage1_ssl(cfg, device: torch.device, steps: int, window: int, work: Path) -> dict:
    """steps/s of `train_classifier` with the recipe's learner (median over windows after the first)."""
    s1 = dataclasses.replace(cfg.stage1, iterations=steps, log_every=window, checkpoint_every=10 ** 9)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4096, *IMAGE), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, len(x))
    out = work / "stage1"
    t = time.perf_counter()
    train_classifier(s1, x_lb=x[:40], y_lb=y[:40], x_ulb=x, num_classes=NUM_CLASSES, hflip=True, out_dir=out,
                     device=device, precision="bf16", seed=0, progress=False, world=LOCAL)
    wall = time.perf_counter() - t
    windows = [line["steps_per_s"] for line in _stats(out)][1:]
    return {"learner": s1.learner, "network": s1.network, "labeled_batch": s1.batch_size,
            "unlabeled_batch": s1.batch_size * s1.uratio, "steps": steps, "window_steps": window, "wall_s": wall,
            "window_steps_per_s": windows, "steps_per_s": statistics.median(windows)}


def sampling(cfg, device: torch.device, n_images: int, reps: int) -> dict:
    """img/s of `generate` with guidance (Heun 18, DPM-Solver++ 20) and at the recipe's own sampler setting."""
    s2 = cfg.stage2
    net = build_model(s2.network, IMAGE[2], IMAGE[0], NUM_CLASSES, s2.sigma_data).to(device).eval()
    labels, seeds = np.arange(n_images) % NUM_CLASSES, np.arange(n_images)
    settings = {"heun_18_guided": ("heun", 18, 1.0), "dpmpp_2m_20_guided": ("dpmpp_2m", 20, 1.0),
                "recipe": (s2.sampler, s2.steps, s2.guidance_scale)}
    out = {}
    for name, (sampler, steps, scale) in settings.items():
        sec = median_seconds(lambda: generate(net, labels, seeds, sampler=sampler, steps=steps, guidance_scale=scale,
                                              batch_size=n_images, device=device, precision="bf16"), device, reps)
        out[name] = {"sampler": sampler, "steps": steps, "guidance_scale": scale, "images": n_images,
                     "seconds": sec, "img_per_s": n_images / sec}
    return out


def inception_rate(cfg, device: torch.device, n_images: int, reps: int) -> dict:
    """img/s of the FID feature extraction on 32x32 RGB images; skipped with the reason when not installed."""
    from dualpseudo.evaluate.features import extract_features
    from dualpseudo.evaluate.inception import inception_feature_fn
    try:
        fn = inception_feature_fn(cfg.evaluation.inception_path, precision=cfg.evaluation.inception_precision)
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    images = np.random.default_rng(0).integers(0, 256, (n_images, *IMAGE), dtype=np.uint8)
    batch = min(cfg.evaluation.batch_size, n_images)
    sec = median_seconds(lambda: extract_features(fn, images, batch_size=batch, device=device, progress=False),
                         device, reps)
    return {"images": n_images, "batch_size": batch, "precision": cfg.evaluation.inception_precision,
            "seconds": sec, "img_per_s": n_images / sec}


# ---------------------------------------------------------------------------------------------- (d) projection
def recipe_work(cfg) -> dict:
    """What the recipe asks of each stage, in the units of the measured rates."""
    generated = cfg.stage2.images_per_class * NUM_CLASSES
    return {"stage1_iterations": cfg.stage1.iterations,
            "stage2_images_seen": int(round(cfg.stage2.duration_kimg * 1000)),
            "stage2_generated_images": generated,
            "stage3_iterations": cfg.stage3.iterations or cfg.stage1.iterations,
            "fid_images": cfg.evaluation.fid_reference_images + generated,
            "oracle_iterations": cfg.evaluation.oracle_iterations, "oracle_batch": 128}


def project(work: dict, rates: dict) -> dict:
    """Seconds per stage = work / rate. The oracle (supervised, 128 images a step) is costed at the SSL step's
    images per second (64 + 2 x 448 images a step); the evaluation is None when Inception was not measured."""
    ssl_images = rates["ssl_images_per_step"] * rates["stage1_steps_per_s"]
    out = {"stage1_s": work["stage1_iterations"] / rates["stage1_steps_per_s"],
           "stage2_train_s": work["stage2_images_seen"] / rates["stage2_train_img_per_s"],
           "stage2_sample_s": work["stage2_generated_images"] / rates["recipe_sample_img_per_s"],
           "stage3_s": work["stage3_iterations"] / rates["stage1_steps_per_s"],
           "oracle_s": work["oracle_iterations"] * work["oracle_batch"] / ssl_images,
           "fid_features_s": (work["fid_images"] / rates["inception_img_per_s"]
                              if rates.get("inception_img_per_s") else None)}
    out["total_s"] = sum(v for v in out.values() if v is not None)
    out["total_h"] = out["total_s"] / 3600
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny networks, batches and timings (seconds on a CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement on CUDA")
    ap.add_argument("--out", default="device_check.json", help="the JSON to write")
    args = ap.parse_args()
    t_start = time.perf_counter()
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    # --tiny: the recipe's learner, sampler and schedules, with networks and batches a CPU does in seconds
    cfg = load_config(RECIPE, ["stage1.network=cnn_small", "stage1.batch_size=4", "stage1.uratio=2",
                               "stage2.network=unet_tiny", "stage2.batch_size=8", "evaluation.batch_size=4"]
                      if args.tiny else [])
    sizes = (dict(matmul=512, s2_steps=6, s2_window=2, s1_steps=6, s1_window=2, sample=2, inception=4, reps=1)
             if args.tiny else
             dict(matmul=8192 if device.type == "cuda" else 2048, s2_steps=50, s2_window=10, s1_steps=250,
                  s1_window=50, sample=cfg.stage2.sample_batch_size, inception=2 * cfg.evaluation.batch_size, reps=1))
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "tiny": args.tiny, "precision": "bf16", "sizes": sizes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["smoke"] = smoke_run(device, args.tiny, work)
        result["matmul"] = matmul_rate(device, sizes["matmul"], reps=5)
        peak = result["matmul"]["flop_per_s"]
        result["stage2_train"] = stage2_training(cfg, device, sizes["s2_steps"], sizes["s2_window"], peak, work)
        result["stage1_ssl"] = stage1_ssl(cfg, device, sizes["s1_steps"], sizes["s1_window"], work)
        result["sampling"] = sampling(cfg, device, sizes["sample"], sizes["reps"])
        result["inception"] = inception_rate(cfg, device, sizes["inception"], sizes["reps"])
        if device.type != "cuda":
            result["stage2_train_compiled"] = {"skipped": "torch.compile is measured on CUDA only"}
        elif args.no_compile:
            result["stage2_train_compiled"] = {"skipped": "--no-compile"}
        else:
            result["stage2_train_compiled"] = stage2_training(cfg, device, sizes["s2_steps"], sizes["s2_window"],
                                                              peak, work, compile=True)
    s1 = result["stage1_ssl"]
    rates = {"stage1_steps_per_s": s1["steps_per_s"],
             "ssl_images_per_step": s1["labeled_batch"] + 2 * s1["unlabeled_batch"],
             "stage2_train_img_per_s": result["stage2_train"]["img_per_s"],
             "recipe_sample_img_per_s": result["sampling"]["recipe"]["img_per_s"],
             "inception_img_per_s": result["inception"].get("img_per_s")}
    result["recipe"] = {"config": str(RECIPE.relative_to(ROOT)), **recipe_work(cfg)}
    result["rates"] = rates
    result["projection"] = project(result["recipe"], rates)
    result["wall_s"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    p = result["projection"]
    print(f"{result['device_name']} ({device}), torch {torch.__version__}{', TINY sizes' if args.tiny else ''}")
    print(f"smoke pipeline: {'ok' if result['smoke']['ok'] else 'FAILED'} in {result['smoke']['seconds']:.0f} s"
          + (f"; missing {result['smoke']['missing']}" if result["smoke"]["missing"] else ""))
    st2 = result["stage2_train"]
    print(f"matmul {result['matmul']['dtype']}: {peak / 1e12:.2f} TFLOP/s; stage-2 {st2['network']} batch "
          f"{st2['batch_size']}: {st2['img_per_s']:.1f} img/s, {st2['fraction_of_matmul']:.1%} of matmul")
    print(f"stage-1 {s1['network']}: {s1['steps_per_s']:.2f} steps/s; sampling (recipe): "
          f"{rates['recipe_sample_img_per_s']:.1f} img/s; Inception: "
          + (f"{rates['inception_img_per_s']:.1f} img/s" if rates["inception_img_per_s"] else "skipped"))
    print("projection (h): " + ", ".join(f"{k[:-2]} {v / 3600:.2f}" for k, v in p.items()
                                         if k.endswith("_s") and v is not None))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    if not result["smoke"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
