"""How far can stage 1's label propagation go on the encoder's features? Variants of the graph learner, and the
features' ceiling with every training label, on finished stage-1 run directories.

    dualpseudo stage1 configs/fashion_mnist.yaml --run-dir runs/bench/dev-l4-s7 --set data.split_seed=7 --set runtime.seed=7 \
        --set encoder.crop_min=0.3 --set encoder.cutout=0.25   # BENCHMARKS.md's table: the former views
    python bench/bench_graph.py --runs runs/bench/dev-l4-s7 --ceiling

For each run directory (its labeled split, its self-supervised encoder and its `graph` settings) every training
image is embedded once and labeled by each variant below; the table gives the accuracy on the unlabeled images
(pool accuracy, %), the measure the held-out rules judge. Variants:

- `demo`: the run's own settings (reproduces its stage-1 pool accuracy);
- `k=K`: the same graph with K neighbours per image;
- `views=flip`, `views=shift`: each image's features averaged over views (with its mirror image; with its four
  one-pixel shifts) before the graph is built (test-time augmentation of the nodes);
- `feats=2x2`, `feats=l3+l4`: other readings of the trunk: its last map pooled to 2x2, or the third layer's
  pooled map beside the fourth's (whitened like the demo's features);
- `labeled views=V`: V weakly augmented copies of each labeled image join the graph as labeled nodes;
- `within-class whitened, shrink=S`: the whitened features mapped so that the pooled within-class covariance of
  each class's most confident half (under the demo graph's labels) becomes (1 - S) Sw + S I -> identity, then the
  graph again (one round of metric learning on the graph's own labels);
- `mbo mu=M`: Poisson-MBO (Calder, Cook, Thorpe & Slepcev, ICML 2020, Algorithm 2): Poisson learning, then 20
  rounds of 40 explicit heat steps (time step 1 / max degree) with the Poisson source weighed by M, each
  followed by the volume-constrained projection onto one-hot labels (the class-size offsets of `graph.py`);
- `self-train`: the encoder fine-tuned for `--self-train-steps` AdamW steps (batches of 256, weak augmentation)
  with a linear head on the graph's labels (Iscen et al., CVPR 2019: each image weighed by 1 - its normalised
  entropy, each class by the inverse of its size), then the graph again on the fine-tuned features;
- `fine-tuned on generated pseudo-images` (with `--pseudo-train-steps N`, on run directories with stage 2 done):
  the encoder fine-tuned for N steps as in `self-train`, on the labeled images and the run's pseudo-images with
  the labels they were generated for, then the graph (real labels only) on the fine-tuned features: the generator
  reaching stage 1 through the metric of the graph rather than as nodes of it. `fine-tuned on real pseudo-images`
  is its baseline at equal compute: the same with as many of stage 1's most confident real images per class;
- `power=P` (with `--power P`): each feature raised to the power P before the whitening (Tukey's ladder, the "PT"
  of PT-MAP, Hu, Gripon & Pateux, ICANN 2021: the trunk's features are non-negative after its last ReLU);
- `+ probe, lambda=L` (with `--probe-ensemble L`): the graph's scores (as softmax probabilities) ensembled with a
  logistic regression fitted on the labeled images alone: argmax of log p_graph + L log p_probe;
- `balanced centres, lambda=L` (with `--em L`): PT-MAP's balanced mixture of class centres (Hu, Gripon & Pateux,
  ICANN 2021) fitted to every image's node features from the graph's labels (30 rounds, centres moving 0.2 of the
  way each, Sinkhorn to the labeled images' class shares, labeled images clamped); `x graph` keeps the graph's
  softmax probabilities as a factor of each posterior;
- `redrawn labeled images, sigma=S` (with `--redraw S`, on run directories with stage 2 done): `--redraw-per`
  copies of each labeled image, noised to sigma S and denoised by the run's generator conditioned on the image's
  true class (SDEdit, Meng et al., ICLR 2022), join the graph as labeled nodes of weight `stage3.pseudo_weight`
  (as stage 3's pseudo-images do); `weak copies of labeled images` is its baseline without the generator: as
  many weakly augmented copies at the same weight;
- `+ encoder E` (with `--ensemble FILE...`): the features of another saved encoder (an `encoder.safetensors`,
  read as the run reads its own) beside the run's: each whitened on its own as the run does, concatenated, then the
  graph (an ensemble of encoders through the metric); `+ all encoders` with every file given, when more than one;
- `ceiling: ...` (with `--ceiling`): the same features with **every** training label, test top-1 of a logistic
  regression and of a 10-nearest-neighbour vote on the whitened features. A diagnostic of what the features
  separate, not a learner; the test split chooses nothing here.

Every variant reads the trunk as the run's stage 1 does: with `linear_probe.mirror: true` each image's features are
averaged with its mirror image's (so `views=flip` adds nothing there).

Use held-out splits (not the ones a reported table uses): the pool accuracies here judge graph settings. One
process (no other training beside it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dualpseudo.classify import augment, graph  # noqa: E402
from dualpseudo.classify.contrastive import EncoderFeatures  # noqa: E402
from dualpseudo.classify.linear import fit_probe, probe_predict  # noqa: E402
from dualpseudo.config import load_config  # noqa: E402
from dualpseudo.data.datasets import load_dataset  # noqa: E402
from dualpseudo.runtime import autocast  # noqa: E402
from dualpseudo.stages.files import Split  # noqa: E402
from dualpseudo.training import to_float  # noqa: E402


@torch.inference_mode()
def embed(net: nn.Module, images: np.ndarray, view=None, precision: str = "fp32", pool=None,
          batch_size: int = 1024, mirror: bool = False) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, D) float32 features of `net`, each batch through `view` first.

    `pool` (net, x) -> features replaces `net(x)` (the trunk's globally pooled features); `mirror` averages each
    (viewed) image's features with its mirror image's, as `linear_probe.mirror` does in the pipeline."""
    net.eval()
    read = (lambda x: pool(net, x)) if pool else net
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2))
        x = (view(x) if view else x).contiguous(memory_format=torch.channels_last)
        with autocast(x.device, precision):
            f = read(x).float()
            if mirror:
                f = 0.5 * (f + read(x.flip(3)).float())
        out.append(f)
    return torch.cat(out).numpy()


def _layers34(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h3 = net.features[:9](x)                                    # after the third conv-BN-ReLU
    h4 = net.features[9:](h3)
    return torch.cat([F.adaptive_avg_pool2d(h3, 1).flatten(1), F.adaptive_avg_pool2d(h4, 1).flatten(1)], 1)


# Other readings of the trunk (`CNNSmall.features`: four conv-BN-ReLU layers of three modules each).
POOLS = {
    # the last map (4x4 for 28x28 images) averaged to 2x2 instead of 1x1: where on the garment a feature is
    "2x2": lambda net, x: F.adaptive_avg_pool2d(net.features(x), 2).flatten(1),
    # the third layer's globally pooled map beside the fourth's: finer, less invariant features
    "l3+l4": _layers34,
}


class Problem:
    """One run directory's split and graph settings: `scores(feats)` runs its graph learner on (N, D) features."""

    def __init__(self, run: Path):
        self.cfg = load_config(run / "config.yaml")
        self.ds = load_dataset(self.cfg.data)
        split = Split.read(run / "stage1")
        if split is None:
            raise SystemExit(f"error: {run}/stage1/split.json is missing: run `dualpseudo stage1` there first")
        self.labeled = np.array(sorted(i for v in split.per_class.values() for i in v))
        self.y, self.C = self.ds.train_labels, self.ds.num_classes
        self.pool = np.setdiff1d(np.arange(len(self.y)), self.labeled)
        self.encoder_file = run / "encoder" / "encoder.safetensors"

    def nodes(self, feats: np.ndarray, also: np.ndarray | None = None) -> np.ndarray:
        """The graph's nodes: `feats` (N, D), then `also` (M, D), whitened as the run does (fitted on `feats`)."""
        g = self.cfg.graph
        both = feats if also is None else np.concatenate([feats, also])
        if not g.whiten:
            return both
        mean, projection = graph.whitening(feats, g.whiten)
        return graph.whiten(both, mean, projection)

    def scores(self, feats: np.ndarray, k: int | None = None, extra: tuple[np.ndarray, np.ndarray] | None = None,
               extra_weight: float = 1.0) -> torch.Tensor:
        """Scores (N, C); `extra` = (features (M, D), labels (M,)) of more labeled nodes, appended to the graph,
        each a source of weight `extra_weight` (a real label weighs 1); the whitening is fitted on `feats`."""
        if extra is None:
            return self.propagate(self.nodes(feats), k)
        labeled = np.concatenate([self.labeled, len(feats) + np.arange(len(extra[0]))])
        labels = np.concatenate([self.y[self.labeled], extra[1]])
        strength = np.concatenate([np.ones(len(self.labeled)), np.full(len(extra[0]), extra_weight)])
        return self.propagate(self.nodes(feats, also=extra[0]), k, labeled, labels, strength)

    def propagate(self, nodes: np.ndarray, k: int | None = None, labeled: np.ndarray | None = None,
                  labels: np.ndarray | None = None, strength: np.ndarray | None = None) -> torch.Tensor:
        """Scores (N, C) of the training images from the run's graph learner on ready node features (N [+ M], D):
        the split's labeled images as sources unless `labeled`/`labels`/`strength` say otherwise."""
        g = self.cfg.graph
        labeled = self.labeled if labeled is None else labeled
        labels = self.y[self.labeled] if labels is None else labels
        return graph.propagate(nodes, labeled, labels, self.C, k=k or g.k, max_iter=g.max_iter, balanced=g.balanced,
                               score_of=self.pool, strength=strength)["scores"][:len(self.y)]

    def accuracy(self, scores: torch.Tensor) -> float:
        return float((scores.argmax(1).numpy()[self.pool] == self.y[self.pool]).mean() * 100)

    def trunk(self) -> nn.Module:
        """A fresh copy of the run's encoder trunk (its loader's checks and messages)."""
        return EncoderFeatures(self.encoder_file).net

    def features(self, net: nn.Module, images: np.ndarray, view=None, pool=None) -> np.ndarray:
        """`embed` in the run's precision, averaged with the mirror images' when the run's stage 1 does that."""
        return embed(net, images, view, self.cfg.runtime.precision, pool, mirror=self.cfg.linear_probe.mirror)


def poisson_mbo(p: Problem, feats: np.ndarray, mu: float, outer: int = 20, inner: int = 40) -> torch.Tensor:
    """Poisson-MBO labels (N, C) one-hot float64 on the run's graph (see the module docstring)."""
    x = F.normalize(torch.as_tensor(p.nodes(feats), dtype=torch.float32), dim=1)
    W = graph.knn_graph(x, p.cfg.graph.k)
    n = W.shape[0]
    u, _ = graph.poisson(W, p.labeled, p.y[p.labeled], p.C, p.cfg.graph.max_iter)
    deg = torch.sparse.mm(W, torch.ones(n, 1, dtype=torch.float64)).squeeze(1)
    onehot = F.one_hot(torch.as_tensor(p.y[p.labeled]), p.C).double()
    source = torch.zeros(n, p.C, dtype=torch.float64)
    source[torch.as_tensor(p.labeled)] = onehot - onehot.mean(0, keepdim=True)
    target = torch.as_tensor(np.bincount(p.y[p.labeled], minlength=p.C) / len(p.labeled))
    pool = torch.as_tensor(p.pool)
    dt = 1.0 / float(deg.max())
    u = u / u.std()
    for _ in range(outer):
        for _ in range(inner):
            u = u - dt * (deg[:, None] * u - torch.sparse.mm(W, u) - mu * source)
        u = F.one_hot((u + graph.balance_offsets(u[pool], target)).argmax(1), p.C).double()
    return u


def within_class_whitened(p: Problem, feats: np.ndarray, scores: torch.Tensor, shrink: float,
                          keep: float = 0.5) -> np.ndarray:
    """The graph's features (whitened) mapped by (1 - shrink) Sw + shrink I to the power -1/2, where Sw is the pooled
    within-class covariance of each class's `keep` most confident images under the graph's labels (and the labeled
    images under theirs): directions along which a class varies shrink, those that separate classes grow."""
    x = torch.as_tensor(p.nodes(feats), dtype=torch.float64)
    prob = torch.softmax(scores.double(), 1)
    label, conf = prob.argmax(1).numpy(), prob.max(1).values.numpy()
    label[p.labeled], conf[p.labeled] = p.y[p.labeled], 2.0
    rows = []
    for c in range(p.C):
        idx = np.flatnonzero(label == c)
        rows.append(idx[np.argsort(-conf[idx])[:max(2, int(keep * len(idx)))]])
    centred = torch.cat([x[r] - x[r].mean(0) for r in rows])
    sw = centred.T @ centred / len(centred)
    sw = (1 - shrink) * sw + shrink * float(torch.diagonal(sw).mean()) * torch.eye(len(sw), dtype=sw.dtype)
    eigval, eigvec = torch.linalg.eigh(sw)
    return (x @ (eigvec * eigval.clamp_min(1e-12).rsqrt()) @ eigvec.T).float().numpy()


def self_train(p: Problem, scores: torch.Tensor, steps: int, seed: int = 0) -> np.ndarray:
    """Fine-tune the encoder with a linear head on the graph's labels; return its new features (N, D)."""
    prob = torch.softmax(scores.double(), 1).float()
    label = prob.argmax(1).numpy()
    label[p.labeled] = p.y[p.labeled]
    certainty = 1 - (-(prob * prob.clamp_min(1e-12).log()).sum(1) / np.log(p.C)).numpy()
    certainty[p.labeled] = 1.0
    class_w = len(label) / (p.C * np.bincount(label, minlength=p.C).clip(min=1))
    weight = torch.as_tensor(certainty * class_w[label], dtype=torch.float32)
    return fine_tune(p, p.ds.train_images, label, steps, seed, weight=weight)


def fine_tune(p: Problem, images: np.ndarray, labels: np.ndarray, steps: int, seed: int = 0,
              weight: torch.Tensor | None = None) -> np.ndarray:
    """Fine-tune the encoder with a linear head on labeled `images` (uint8 (M, H, W, C)) for `steps` AdamW steps
    (batches of 256, weak augmentation, one cycle), each image weighed alike or by `weight` (M,); return its new
    features of the training images."""
    encoder = EncoderFeatures(p.encoder_file)
    net = encoder.net
    with torch.random.fork_rng(devices=[]):             # the head's initialisation: `seed` alone, not the variants
        torch.manual_seed(seed)                         # that ran before this one
        head = nn.Linear(int(encoder.meta["feature_dim"]), p.C)
    model = nn.Sequential(net, head).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 5e-4},
                             {"params": model[1].parameters(), "lr": 5e-3}], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[5e-4, 5e-3], total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.as_tensor(labels, dtype=torch.int64)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x_all), (256,), generator=gen)
        x = augment.weak(to_float(x_all[i].permute(0, 3, 1, 2)), gen, p.cfg.data.hflip)
        with autocast(x.device, p.cfg.runtime.precision):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss = (F.cross_entropy(logits, y_all[i]) if weight is None else
                (F.cross_entropy(logits, y_all[i], reduction="none") * weight[i]).sum() / weight[i].sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return p.features(net, p.ds.train_images)


def probe_ensemble(p: Problem, feats: np.ndarray, scores: torch.Tensor, lams: list[float]) -> dict[float, np.ndarray]:
    """For each lam, labels (N,) of log p_graph + lam log p_probe, the probe a logistic regression on the labeled
    images alone (fitted once)."""
    probe = fit_probe(feats[p.labeled], p.y[p.labeled], feats, p.C, p.cfg.linear_probe.l2_strength,
                      max_iter=p.cfg.linear_probe.max_iter, device=torch.device("cpu"))
    log_graph = np.log(graph.probabilities(scores) + 1e-12)
    log_probe = np.log(probe_predict(probe, feats) + 1e-12)
    return {lam: (log_graph + lam * log_probe).argmax(1) for lam in lams}


def balanced_em(p: Problem, feats: np.ndarray, scores: torch.Tensor, lam: float = 10.0, alpha: float = 0.2,
                rounds: int = 30, graph_prior: bool = False) -> np.ndarray:
    """Labels (N,) of a balanced mixture of class centres fitted to the whole pool, started from the graph's labels.

    The E and M steps of PT-MAP (Hu, Gripon & Pateux, ICANN 2021) on the graph's node features (whitened, unit
    length): each image's class posterior is proportional to exp(-lam ||x - centre_c||^2) (times the graph's
    softmax probabilities with `graph_prior`), rescaled by Sinkhorn iterations so that every class takes its prior
    share of the images (the labeled images' class shares) and every image sums to one; then the labeled images
    get their labels back, and each centre moves `alpha` of the way to its posterior-weighted mean. A parametric
    reading of the same features beside the graph's non-parametric one."""
    x = F.normalize(torch.as_tensor(p.nodes(feats), dtype=torch.float64), dim=1)
    labeled = torch.as_tensor(p.labeled)
    clamp = F.one_hot(torch.as_tensor(p.y[p.labeled]), p.C).double()
    log_graph = torch.log_softmax(scores.double(), 1) if graph_prior else 0.0
    column_sums = len(x) * torch.as_tensor(np.bincount(p.y[p.labeled], minlength=p.C) / len(p.labeled))
    q = F.one_hot(scores.argmax(1), p.C).double()       # round 0: the graph's labels
    q[labeled] = clamp
    centres = (q.T @ x) / q.sum(0)[:, None]
    for _ in range(rounds):
        q = torch.softmax(-lam * torch.cdist(x, centres).square() + log_graph, 1)
        for _ in range(50):                              # Sinkhorn: columns to the class shares, rows to one
            q = q * (column_sums / q.sum(0).clamp_min(1e-300))[None, :]
            q = q / q.sum(1, keepdim=True)
        q[labeled] = clamp
        centres = centres + alpha * ((q.T @ x) / q.sum(0)[:, None] - centres)
    return q.argmax(1).numpy()


def weak_copies(p: Problem, net: nn.Module, per: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of `per` weakly augmented copies of each labeled image (augmentation seed 0)."""
    gen = torch.Generator().manual_seed(0)
    images = np.repeat(p.ds.train_images[p.labeled], per, 0)
    return (p.features(net, images, lambda x: augment.weak(x, gen, p.cfg.data.hflip)),
            np.repeat(p.y[p.labeled], per))


@torch.no_grad()
def redraw_labeled(p: Problem, gen, sigma: float, per: int, steps: int = 10, seed: int = 12345
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`per` copies of each labeled image noised to `sigma` and denoised by a run's generator (`api.Generator`;
    DPM-Solver++(2M), `steps` steps from `sigma`, the run's guidance scale) conditioned on the image's true class:
    uint8 images, labels."""
    from dualpseudo.diffuse.generate import conditional_denoiser, initial_noise, to_uint8
    from dualpseudo.diffuse.samplers import SAMPLERS, edm_sigmas
    source = np.repeat(p.labeled, per)
    labels = p.y[source]
    x0 = to_float(torch.from_numpy(p.ds.train_images[source]).permute(0, 3, 1, 2))
    sigmas = edm_sigmas(steps, 0.002, sigma)
    out = []
    for start in range(0, len(source), 500):
        sl = slice(start, start + 500)
        noise = initial_noise(np.arange(len(source))[sl] + seed, tuple(x0.shape[1:]))
        denoiser = conditional_denoiser(gen.net, torch.as_tensor(labels[sl]), gen.defaults["guidance_scale"],
                                        gen.device, gen.defaults["precision"])
        out.append(to_uint8(SAMPLERS["dpmpp_2m"](denoiser, x0[sl] + sigma * noise, sigmas)))
    return np.concatenate(out), labels


def pseudo_train_sets(p: Problem, run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The labeled images plus, for `generated`, the run's stage-2 pseudo-images (their conditioning labels), or
    for `real`, as many of stage 1's most confident pseudo-labeled real images per class (self-training)."""
    from dualpseudo.stages.files import PseudoImages, PseudoLabels
    from dualpseudo.stages.retrain import most_confident_real
    gen = PseudoImages.load(run / "stage2")
    per_class = int(np.bincount(gen.labels, minlength=p.C).max())
    stage1 = PseudoLabels.load(run / "stage1")
    pick = most_confident_real(stage1, per_class, p.C)
    x_lb, y_lb = p.ds.train_images[p.labeled], p.y[p.labeled]
    return {"generated": (np.concatenate([x_lb, gen.images]), np.concatenate([y_lb, gen.labels])),
            "real": (np.concatenate([x_lb, p.ds.train_images[pick]]), np.concatenate([y_lb, stage1.label[pick]]))}


def ensembled(p: Problem, blocks: list[np.ndarray]) -> torch.Tensor:
    """Graph scores on several encoders' features (each (N, D_i)), each whitened on its own, concatenated."""
    return p.propagate(np.concatenate([p.nodes(b) for b in blocks], 1))


def ceiling(p: Problem, feats: np.ndarray, net: nn.Module) -> dict[str, float]:
    """Test top-1 (%) with every training label: logistic regression, and a 10-NN vote on whitened features."""
    test = p.features(net, p.ds.test_images)
    probe = fit_probe(feats, p.y, feats, p.C, p.cfg.linear_probe.l2_strength, max_iter=500,
                      device=torch.device("cpu"))
    out = {"ceiling: logistic regression, every label (test top-1)":
           float((probe_predict(probe, test).argmax(1) == p.ds.test_labels).mean() * 100)}
    mean, projection = graph.whitening(feats, p.cfg.graph.whiten or feats.shape[1])
    base = F.normalize(torch.as_tensor(graph.whiten(feats, mean, projection)), dim=1)
    idx, _ = graph.knn(base, 10, F.normalize(torch.as_tensor(graph.whiten(test, mean, projection)), dim=1))
    votes = F.one_hot(torch.as_tensor(p.y)[idx], p.C).sum(1).argmax(1).numpy()
    out["ceiling: 10-NN vote, every label (test top-1)"] = float((votes == p.ds.test_labels).mean() * 100)
    return out


def bench_run(run: Path, args) -> dict[str, float]:
    p = Problem(run)
    net = p.trunk()
    t = time.time()
    feats = p.features(net, p.ds.train_images)
    acc: dict[str, float] = {}
    base = p.scores(feats)
    acc["demo"] = p.accuracy(base)
    for k in args.k:
        acc[f"k={k}"] = p.accuracy(p.scores(feats, k))
    views = {"flip": [lambda x: x.flip(3)],
             "shift": [lambda x, s=s: torch.roll(x, s, (2, 3)) for s in ((1, 0), (-1, 0), (0, 1), (0, -1))]}
    for name in args.views:
        stack = [feats] + [p.features(net, p.ds.train_images, v) for v in views[name]]
        acc[f"views={name}"] = p.accuracy(p.scores(np.mean(stack, 0)))
    for name in args.feats:
        acc[f"feats={name}"] = p.accuracy(p.scores(p.features(net, p.ds.train_images, pool=POOLS[name])))
    if args.labeled_views:
        acc[f"labeled views={args.labeled_views}"] = p.accuracy(
            p.scores(feats, extra=weak_copies(p, net, args.labeled_views)))
    for shrink in args.wccn:
        x = within_class_whitened(p, feats, base, shrink)
        acc[f"within-class whitened, shrink={shrink:g}"] = p.accuracy(p.propagate(x))
    for mu in args.mbo:
        acc[f"mbo mu={mu:g}"] = p.accuracy(poisson_mbo(p, feats, mu))
    if args.power:
        acc[f"power={args.power:g}"] = p.accuracy(p.scores(np.power(feats.astype(np.float64), args.power)
                                                           .astype(np.float32)))
    if args.probe_ensemble:
        for lam, label in probe_ensemble(p, feats, base, args.probe_ensemble).items():
            acc[f"+ probe, lambda={lam:g}"] = float((label[p.pool] == p.y[p.pool]).mean() * 100)
    for lam in args.em:
        for prior in (False, True):
            label = balanced_em(p, feats, base, lam, graph_prior=prior)
            acc[f"balanced centres{' x graph' if prior else ''}, lambda={lam:g}"] = float(
                (label[p.pool] == p.y[p.pool]).mean() * 100)
    if args.redraw:
        from dualpseudo.api import load_generator
        w = p.cfg.stage3.pseudo_weight
        acc["weak copies of labeled images"] = p.accuracy(
            p.scores(feats, extra=weak_copies(p, net, args.redraw_per), extra_weight=w))
        generator = load_generator(run)
        for sigma in args.redraw:
            images, labels = redraw_labeled(p, generator, sigma, args.redraw_per)
            acc[f"redrawn labeled images, sigma={sigma:g}"] = p.accuracy(
                p.scores(feats, extra=(p.features(net, images), labels), extra_weight=w))
    if args.ensemble:
        others = {Path(f).parent.name: p.features(EncoderFeatures(f).net, p.ds.train_images) for f in args.ensemble}
        for name, other in others.items():
            acc[f"+ encoder {name}"] = p.accuracy(ensembled(p, [feats, other]))
        if len(others) > 1:
            acc["+ all encoders"] = p.accuracy(ensembled(p, [feats, *others.values()]))
    if args.self_train_steps:
        acc["self-train"] = p.accuracy(p.scores(self_train(p, base, args.self_train_steps)))
    if args.pseudo_train_steps:
        for source, (x, y) in pseudo_train_sets(p, run).items():
            acc[f"fine-tuned on {source} pseudo-images"] = p.accuracy(
                p.scores(fine_tune(p, x, y, args.pseudo_train_steps)))
    if args.ceiling:
        acc |= ceiling(p, feats, net)
    print(f"{run.name}: {time.time() - t:.0f} s", file=sys.stderr)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with stage 1 done (label propagation)")
    p.add_argument("--k", type=int, nargs="*", default=[5, 15, 20, 30])
    p.add_argument("--views", nargs="*", default=["flip", "shift"], choices=["flip", "shift"])
    p.add_argument("--feats", nargs="*", default=["2x2", "l3+l4"], choices=list(POOLS))
    p.add_argument("--labeled-views", type=int, default=16,
                   help="add this many weakly augmented copies of each labeled image as labeled nodes (0: off)")
    p.add_argument("--wccn", type=float, nargs="*", default=[0.1, 0.5],
                   help="within-class whitening on the graph's confident labels, these shrinkage weights")
    p.add_argument("--mbo", type=float, nargs="*", default=[1.0, 100.0], help="Poisson-MBO source weights")
    p.add_argument("--self-train-steps", type=int, default=1000, help="0: leave the self-training variant out")
    p.add_argument("--pseudo-train-steps", type=int, default=0,
                   help="fine-tune the encoder this many steps on the labeled images plus the run's pseudo-images "
                        "(and, as the baseline, as many confident real ones per class); needs stage 2 (0: off)")
    p.add_argument("--power", type=float, default=0.0, help="features to this power before the graph (0: off)")
    p.add_argument("--probe-ensemble", type=float, nargs="*", default=[],
                   help="ensemble the graph with a labeled-only logistic regression at these weights")
    p.add_argument("--em", type=float, nargs="*", default=[],
                   help="balanced class centres fitted to the pool from the graph's labels, at these lambdas")
    p.add_argument("--redraw", type=float, nargs="*", default=[],
                   help="labeled images redrawn by the run's generator from these noise levels; needs stage 2")
    p.add_argument("--redraw-per", type=int, default=50, help="copies of each labeled image for --redraw")
    p.add_argument("--ensemble", nargs="*", default=[],
                   help="other encoder.safetensors files whose features join the run's (each whitened on its own)")
    p.add_argument("--ceiling", action="store_true", help="add the every-label test top-1 rows")
    args = p.parse_args()
    torch.manual_seed(0)
    results = [bench_run(Path(r), args) for r in args.runs]
    names = list(results[0])
    print(f"\n| variant | pool accuracy (%) {' / '.join(Path(r).name for r in args.runs)} | mean |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {' / '.join(f'{r[n]:.2f}' for r in results)} | {np.mean([r[n] for r in results]):.2f} |")


if __name__ == "__main__":
    main()
