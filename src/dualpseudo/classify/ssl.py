"""Semi-supervised losses in USB's vocabulary (x_lb, y_lb, x_ulb_w, x_ulb_s, p_cutoff, lambda_u).

- FixMatch (Sohn et al., NeurIPS 2020): the weak view's prediction becomes a hard pseudo-label for the strong
  view where its confidence reaches the fixed threshold `p_cutoff`.
- FreeMatch (Wang et al., ICLR 2023): the threshold is self-adaptive. A global tau_t (EMA of the mean max
  confidence, Eq. 6) is modulated per class by the local p~_t (EMA of the mean class probability, Eq. 7):
  mask = max q >= MaxNorm(p~_t)[argmax q] * tau_t (Eq. 8-9). The self-adaptive fairness loss (Eq. 10-11) is
  L_f = -H(SumNorm(p~_t / h~_t), SumNorm(p_bar / h_bar)), with p_bar, h_bar the mean strong-view probability
  and the histogram of strong-view predictions over masked samples, and h~_t the EMA histogram of
  pseudo-labels. The threshold state is the explicit `FreeMatchThreshold`, saved with the training state.
- Distribution alignment (Berthelot et al., ReMixMatch, ICLR 2020), optional for both: the weak view's
  probabilities are multiplied by p_target / p_model and renormalised before they give pseudo-labels and masks,
  p_model an EMA of their batch mean and p_target the labeled images' class distribution (uniform for a
  `labels_per_class` split). It counters a classifier that predicts a few classes for most unlabeled images.
  Its state is the explicit `DistAlign`.

`ssl_step` is one training step's loss of any of them, from the logits of the labeled, weak and strong views; it
takes the threshold and alignment states and returns their updated copies (the states are never changed in place
by a mask or a loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def supervised_loss(logits_x_lb: torch.Tensor, y_lb: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of labeled logits (B, C) against labels (B,)."""
    return F.cross_entropy(logits_x_lb, y_lb)


def consistency_loss(logits_x_ulb_s: torch.Tensor, logits_x_ulb_w: torch.Tensor, mask: torch.Tensor,
                     hard_label: bool = True, T: float = 1.0) -> torch.Tensor:
    """Masked CE of strong logits (U, C) against the weak view's pseudo-labels; mean over all U samples."""
    probs_w = torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)
    if hard_label:
        ce = F.cross_entropy(logits_x_ulb_s, probs_w.argmax(-1), reduction="none")       # (U,)
    else:
        target = torch.softmax(logits_x_ulb_w.detach().float() / T, dim=-1)              # (U, C) sharpened
        ce = -(target * F.log_softmax(logits_x_ulb_s, dim=-1)).sum(-1)
    return (ce * mask).mean()


def fixmatch_mask(logits_x_ulb_w: torch.Tensor, p_cutoff: float) -> torch.Tensor:
    """1.0 where max softmax of the weak logits (U, C) is >= p_cutoff, else 0.0; shape (U,)."""
    probs = torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)
    return (probs.amax(-1) >= p_cutoff).float()


@dataclass
class FreeMatchThreshold:
    """FreeMatch's self-adaptive threshold state: global tau (time_p), local p_model, label histogram."""

    time_p: torch.Tensor        # () tau_t, EMA of the mean max confidence
    p_model: torch.Tensor       # (C,) p~_t, EMA of the mean class probability
    label_hist: torch.Tensor    # (C,) h~_t, EMA of the normalised pseudo-label histogram
    momentum: float = 0.999     # lambda of Eq. 6-7

    @classmethod
    def init(cls, num_classes: int, momentum: float = 0.999, device: torch.device | str = "cpu"):
        """All three estimates start uniform: tau_0 = 1/C, p~_0 = h~_0 = 1/C."""
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return cls(uniform.mean(), uniform.clone(), uniform.clone(), momentum)

    @torch.no_grad()
    def updated(self, probs_x_ulb_w: torch.Tensor) -> "FreeMatchThreshold":
        """A new state: tau, p~ and h~ EMA-updated with the weak-view probabilities (U, C) of one batch."""
        m = self.momentum
        max_probs, max_idx = probs_x_ulb_w.max(dim=-1)
        hist = torch.bincount(max_idx, minlength=self.p_model.shape[0]).to(self.p_model.dtype)
        return FreeMatchThreshold(time_p=self.time_p * m + (1 - m) * max_probs.mean(),
                                  p_model=self.p_model * m + (1 - m) * probs_x_ulb_w.mean(dim=0),
                                  label_hist=self.label_hist * m + (1 - m) * hist / hist.sum(), momentum=m)

    def update(self, probs_x_ulb_w: torch.Tensor) -> None:
        """In place: this state becomes `self.updated(probs_x_ulb_w)`."""
        new = self.updated(probs_x_ulb_w)
        self.time_p, self.p_model, self.label_hist = new.time_p, new.p_model, new.label_hist

    def thresholds(self) -> torch.Tensor:
        """Class-wise thresholds tau_t(c) = MaxNorm(p~_t)(c) * tau_t; shape (C,)."""
        return self.p_model / self.p_model.max() * self.time_p

    @torch.no_grad()
    def mask(self, logits_x_ulb_w: torch.Tensor, update: bool = False) -> torch.Tensor:
        """1.0 where max q >= tau_t(argmax q), else 0.0; shape (U,). `update=True` first updates this state in place
        with the batch (USB's order; `ssl_step` updates a copy instead)."""
        probs = torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)                  # (U, C)
        if update:
            self.update(probs)
        max_probs, max_idx = probs.max(dim=-1)
        return (max_probs >= self.thresholds()[max_idx]).float()

    def state_dict(self) -> dict:
        return {"time_p": self.time_p.clone(), "p_model": self.p_model.clone(),
                "label_hist": self.label_hist.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        device = self.p_model.device
        self.time_p = state["time_p"].to(device)
        self.p_model = state["p_model"].to(device)
        self.label_hist = state["label_hist"].to(device)
        self.momentum = float(state["momentum"])


@dataclass
class DistAlign:
    """Distribution alignment state: p_model, the EMA of the mean weak-view class probability, and p_target."""

    p_model: torch.Tensor       # (C,) starts uniform
    p_target: torch.Tensor      # (C,) the class distribution of the labeled images
    momentum: float = 0.999

    @classmethod
    def init(cls, num_classes: int, momentum: float = 0.999, device: torch.device | str = "cpu",
             y_lb: torch.Tensor | None = None):
        """p_model starts uniform; p_target is the label distribution of `y_lb` (uniform when None)."""
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        if y_lb is None:
            return cls(uniform.clone(), uniform.clone(), momentum)
        counts = torch.bincount(y_lb.to(device), minlength=num_classes).float()
        return cls(uniform.clone(), counts / counts.sum(), momentum)

    @torch.no_grad()
    def updated(self, probs_x_ulb_w: torch.Tensor) -> "DistAlign":
        """A new state: p_model EMA-updated with the weak-view probabilities (U, C) of one batch (before alignment)."""
        p_model = self.p_model * self.momentum + (1 - self.momentum) * probs_x_ulb_w.mean(dim=0)
        return DistAlign(p_model=p_model, p_target=self.p_target, momentum=self.momentum)

    def update(self, probs_x_ulb_w: torch.Tensor) -> None:
        """In place: this state becomes `self.updated(probs_x_ulb_w)`."""
        self.p_model = self.updated(probs_x_ulb_w).p_model

    @torch.no_grad()
    def align(self, probs_x_ulb_w: torch.Tensor) -> torch.Tensor:
        """probs * p_target / p_model, renormalised per row; (U, C) -> (U, C)."""
        aligned = probs_x_ulb_w * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    @torch.no_grad()
    def aligned_logits(self, logits_x_ulb_w: torch.Tensor, update: bool = False) -> torch.Tensor:
        """Log of the aligned weak-view probabilities: logits whose softmax is the aligned distribution, so the
        masks and losses that take logits use the aligned pseudo-labels unchanged. `update=True` first updates this
        state in place with the batch (`ssl_step` updates a copy instead)."""
        probs = torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)
        if update:
            self.update(probs)
        return torch.log(self.align(probs).clamp_min(1e-30))

    def state_dict(self) -> dict:
        return {"p_model": self.p_model.clone(), "p_target": self.p_target.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        device = self.p_model.device
        self.p_model = state["p_model"].to(device)
        self.p_target = state["p_target"].to(device)
        self.momentum = float(state["momentum"])


def fairness_loss(logits_x_ulb_s: torch.Tensor, mask: torch.Tensor, state: FreeMatchThreshold) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness loss (Eq. 10-11), a scalar; 0 when no sample passes the mask."""
    keep = mask.bool()
    if not bool(keep.any()):
        return logits_x_ulb_s.sum() * 0.0
    probs_s = torch.softmax(logits_x_ulb_s[keep].float(), dim=-1)                          # (M, C)
    num_classes = probs_s.shape[1]
    hist_s = torch.bincount(probs_s.argmax(-1), minlength=num_classes).to(probs_s.dtype)   # h_bar
    hist_s = hist_s / hist_s.sum()
    inv_hist_s = torch.nan_to_num(1 / hist_s, nan=0.0, posinf=0.0, neginf=0.0)
    p_bar = probs_s.mean(dim=0) * inv_hist_s                                               # p_bar / h_bar
    p_bar = p_bar / p_bar.sum()
    inv_label_hist = torch.nan_to_num(1 / state.label_hist, nan=0.0, posinf=0.0, neginf=0.0)
    p_tilde = state.p_model * inv_label_hist                                               # p~ / h~
    p_tilde = (p_tilde / p_tilde.sum()).detach()
    return (p_tilde * torch.log(p_bar + 1e-12)).sum()                                      # -H(p~, p_bar)


class SSLStep(NamedTuple):
    """What one `ssl_step` returns: the loss to minimise, its parts (detached scalars for the log) and new states."""

    loss: torch.Tensor                          # () loss_x + lambda_u * loss_u + lambda_f * loss_f
    loss_x: torch.Tensor                        # () supervised cross-entropy
    loss_u: torch.Tensor                        # () consistency loss (0 without unlabeled views)
    loss_f: torch.Tensor                        # () FreeMatch fairness loss (0 unless FreeMatch and lambda_f > 0)
    mask: torch.Tensor                          # () fraction of unlabeled samples that passed the threshold
    threshold: FreeMatchThreshold | None        # the updated FreeMatch state (None: FixMatch's fixed p_cutoff)
    align: DistAlign | None                     # the updated alignment state (None: no alignment)


def _local(probs: torch.Tensor) -> torch.Tensor:
    return probs


def ssl_step(logits_x_lb: torch.Tensor, y_lb: torch.Tensor, logits_x_ulb_w: torch.Tensor | None,
             logits_x_ulb_s: torch.Tensor | None, threshold: FreeMatchThreshold | None, align: DistAlign | None, *,
             p_cutoff: float, lambda_u: float, lambda_f: float = 0.0, hard_label: bool = True, T: float = 1.0,
             gather: Callable[[torch.Tensor], torch.Tensor] = _local) -> SSLStep:
    """The loss of one FixMatch / FreeMatch step (supervised only when the unlabeled logits are None).

    Logits (B, C) of the labeled images with labels y_lb (B,); (U, C) of the weak and strong views of the unlabeled
    images. Pseudo-labels come from the weak view, aligned by `align` when given; the mask is FreeMatch's
    self-adaptive one when `threshold` is given, else max prob >= p_cutoff. The states are updated, in new objects,
    with `gather(probs)`: the weak-view probabilities of the whole global batch (`World.all_gather`), so that with
    several processes they follow the global batch; the mask and losses use this process's share.
    """
    loss_x = supervised_loss(logits_x_lb, y_lb)
    zero = torch.zeros((), device=loss_x.device)
    loss_u = loss_f = mask = zero
    if logits_x_ulb_w is not None:
        probs_w = torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)                   # (U, C)
        if align is not None:                           # pseudo-labels from the aligned distribution
            align = align.updated(gather(probs_w))
            logits_x_ulb_w = torch.log(align.align(probs_w).clamp_min(1e-30))
        if threshold is None:
            mask = fixmatch_mask(logits_x_ulb_w, p_cutoff)
        else:
            threshold = threshold.updated(gather(torch.softmax(logits_x_ulb_w.detach().float(), dim=-1)))
            mask = threshold.mask(logits_x_ulb_w)
            if lambda_f > 0:
                loss_f = fairness_loss(logits_x_ulb_s, mask, threshold)
        loss_u = consistency_loss(logits_x_ulb_s, logits_x_ulb_w, mask, hard_label, T)
        mask = mask.mean()
    loss = loss_x + lambda_u * loss_u + lambda_f * loss_f
    return SSLStep(loss, loss_x.detach(), loss_u.detach(), loss_f.detach(), mask, threshold, align)
