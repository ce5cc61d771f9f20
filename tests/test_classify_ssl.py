"""SSL losses against hand-computed cases: FixMatch mask, FreeMatch thresholds and fairness loss,
distribution alignment."""
import math

import torch

from dualpseudo.classify.ssl import (DistAlign, FreeMatchThreshold, consistency_loss, fairness_loss,
                                     fixmatch_mask, supervised_loss)


def _logits(probs):
    return torch.tensor(probs).log()


def test_fixmatch_mask_and_consistency():
    logits_w = _logits([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]])
    mask = fixmatch_mask(logits_w, 0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    logits_s = _logits([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    loss = consistency_loss(logits_s, logits_w, mask)
    expected = (-math.log(0.5) - math.log(0.8)) / 3          # masked sum over all 3 samples
    assert abs(loss.item() - expected) < 1e-5


def test_supervised_loss():
    assert abs(supervised_loss(_logits([[0.25, 0.75]]), torch.tensor([1])).item() + math.log(0.75)) < 1e-6


def test_freematch_init_and_update():
    st = FreeMatchThreshold.init(4, momentum=0.9)
    assert abs(st.time_p.item() - 0.25) < 1e-7 and torch.allclose(st.p_model, torch.full((4,), 0.25))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    st.update(probs)
    # tau = 0.9 * 0.25 + 0.1 * mean(0.7, 0.5)
    assert abs(st.time_p.item() - (0.225 + 0.06)) < 1e-6
    # p~ = 0.9 * 0.25 + 0.1 * column means
    assert torch.allclose(st.p_model, 0.225 + 0.1 * torch.tensor([0.4, 0.3, 0.15, 0.15]))
    # h~: pseudo-labels {0, 1} -> histogram (0.5, 0.5, 0, 0)
    assert torch.allclose(st.label_hist, 0.225 + 0.1 * torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_freematch_local_thresholds_mask():
    st = FreeMatchThreshold(time_p=torch.tensor(0.8), p_model=torch.tensor([0.5, 0.25, 0.25]),
                            label_hist=torch.full((3,), 1 / 3), momentum=0.999)
    # class-wise thresholds: MaxNorm(p~) * tau = (1, 0.5, 0.5) * 0.8
    assert torch.allclose(st.thresholds(), torch.tensor([0.8, 0.4, 0.4]))
    logits_w = _logits([[0.7, 0.2, 0.1], [0.1, 0.45, 0.45 - 1e-3], [0.3, 0.3 + 1e-3, 0.4 - 1e-3],
                        [0.85, 0.1, 0.05]])
    mask = st.mask(logits_w, update=False)
    # 0.7 < 0.8 (class 0); 0.45 >= 0.4 (class 1); 0.399 < 0.4 (class 2); 0.85 >= 0.8 (class 0)
    assert mask.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_freematch_state_dict_round_trip():
    st = FreeMatchThreshold.init(3, 0.99)
    st.update(torch.tensor([[0.8, 0.1, 0.1]]))
    other = FreeMatchThreshold.init(3)
    other.load_state_dict(st.state_dict())
    assert torch.equal(other.p_model, st.p_model) and other.momentum == 0.99
    assert torch.equal(other.time_p, st.time_p) and torch.equal(other.label_hist, st.label_hist)


def test_fairness_loss_hand_computed():
    st = FreeMatchThreshold(time_p=torch.tensor(0.5), p_model=torch.tensor([0.6, 0.4]),
                            label_hist=torch.tensor([0.75, 0.25]), momentum=0.999)
    logits_s = _logits([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # masked strong probs: mean (0.5667, 0.4333); argmax hist (2/3, 1/3) -> p_bar/h_bar = (0.85, 1.3) -> SumNorm
    p_bar = torch.tensor([1.7 / 3 / (2 / 3), 1.3 / 3 / (1 / 3)])
    p_bar = p_bar / p_bar.sum()
    p_tilde = torch.tensor([0.6 / 0.75, 0.4 / 0.25])
    p_tilde = p_tilde / p_tilde.sum()
    expected = (p_tilde * p_bar.log()).sum()
    assert abs(fairness_loss(logits_s, mask, st).item() - expected.item()) < 1e-5
    # no masked samples: zero, but still differentiable
    z = fairness_loss(logits_s.requires_grad_(), torch.zeros(4), st)
    assert z.item() == 0.0 and z.requires_grad


def test_dist_align_hand_computed():
    da = DistAlign(p_model=torch.tensor([0.5, 0.25, 0.25]), p_target=torch.full((3,), 1 / 3), momentum=0.9)
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]])
    # probs * (1/3) / p_model, renormalised: row 0 -> uniform; row 1 -> [0.4, 1.6, 1.6] / 3.6
    aligned = da.align(probs)
    torch.testing.assert_close(aligned, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.4 / 3.6, 1.6 / 3.6, 1.6 / 3.6]]),
                               atol=1e-5, rtol=0)
    # aligned_logits updates p_model first, then returns the log of the aligned probabilities
    lg = da.aligned_logits(probs.log(), update=True)
    torch.testing.assert_close(da.p_model, 0.9 * torch.tensor([0.5, 0.25, 0.25]) + 0.1 * probs.mean(0))
    expected = da.align(probs)                                  # with the updated p_model
    torch.testing.assert_close(torch.softmax(lg, -1), expected, atol=1e-6, rtol=0)
    other = DistAlign.init(3)
    assert torch.allclose(other.p_model, torch.full((3,), 1 / 3))
    skewed = DistAlign.init(3, y_lb=torch.tensor([0, 0, 1, 2]))          # p_target: the labeled distribution
    torch.testing.assert_close(skewed.p_target, torch.tensor([0.5, 0.25, 0.25]))
    other.load_state_dict(da.state_dict())
    assert torch.equal(other.p_model, da.p_model) and other.momentum == 0.9


def test_dist_align_turns_a_fixmatch_mask():
    """A confident prediction of an over-predicted class falls below the cutoff after alignment."""
    da = DistAlign(p_model=torch.tensor([0.8, 0.1, 0.1]), p_target=torch.full((3,), 1 / 3))
    logits_w = _logits([[0.96, 0.02, 0.02], [0.02, 0.96, 0.02]])
    assert fixmatch_mask(logits_w, 0.95).tolist() == [1.0, 1.0]
    aligned = da.aligned_logits(logits_w, update=False)
    assert fixmatch_mask(aligned, 0.95).tolist() == [0.0, 1.0]
