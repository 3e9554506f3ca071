"""Each contrastive loss against an independent, loop-based (numpy) reading of its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptmst_ray.models.losses import LOSS_NAMES, contrastive_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _log_softmax_rows(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    for i in range(m.shape[0]):
        mx = max(m[i])
        lse = mx + math.log(sum(math.exp(v - mx) for v in m[i]))
        for j in range(m.shape[1]):
            out[i, j] = m[i, j] - lse
    return out


def ref_infonce(L: np.ndarray, S: np.ndarray) -> float:
    def rows(L, S):
        ls = _log_softmax_rows(L)
        return -sum(sum(S[i, j] * ls[i, j] for j in range(L.shape[1])) for i in range(L.shape[0])) / L.shape[0]

    return 0.5 * (rows(L, S) + rows(L.T, S.T))


def ref_wbce(L: np.ndarray, S: np.ndarray) -> float:
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for i in range(L.shape[0]):
        for j in range(L.shape[1]):
            p = _sigmoid(L[i, j])
            e = -S[i, j] * math.log(p + 1e-6) - (1 - S[i, j]) * math.log(1 - p + 1e-6)
            if S[i, j] > 0.5:
                pos_sum += e
                n_pos += 1
            else:
                neg_sum += e
                n_neg += 1
    return 0.5 * (pos_sum / (n_pos + 1e-6) + neg_sum / (n_neg + 1e-6))


def ref_bce(L: np.ndarray, S: np.ndarray) -> float:
    tot = 0.0
    for i in range(L.shape[0]):
        for j in range(L.shape[1]):
            p = _sigmoid(L[i, j])
            tot += -S[i, j] * max(math.log(p), -100) - (1 - S[i, j]) * max(math.log(1 - p), -100)
    return tot / L.size


def ref_kl(L: np.ndarray, S: np.ndarray) -> float:
    def rows(L, S):
        lq = _log_softmax_rows(10 * S)
        lp = _log_softmax_rows(L)
        return sum(math.exp(lq[i, j]) * (lq[i, j] - lp[i, j]) for i in range(L.shape[0]) for j in range(L.shape[1])) / L.size

    return 0.5 * (rows(L, S) + rows(L.T, S.T))


def ref_mse(L: np.ndarray, S: np.ndarray) -> float:
    return sum((_sigmoid(L[i, j]) - S[i, j]) ** 2 for i in range(L.shape[0]) for j in range(L.shape[1])) / L.size


def ref_cwcl(L: np.ndarray, S: np.ndarray) -> float:
    def rows(L, S):
        ls = _log_softmax_rows(L)
        tot = 0.0
        for i in range(L.shape[0]):
            tot += sum(S[i, j] * ls[i, j] for j in range(L.shape[1])) / (sum(S[i]) + 1e-6)
        return -tot / L.shape[0]

    return 0.5 * (rows(L, S) + rows(L.T, S.T))


REFERENCES = {"InfoNCE": ref_infonce, "WBCE": ref_wbce, "BCE": ref_bce, "KL": ref_kl, "MSE": ref_mse, "CWCL": ref_cwcl}


def _inputs(b: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, b, generator=g, dtype=dtype) * 5
    target = torch.eye(b, dtype=dtype) * 0.7 + torch.rand(b, b, generator=g, dtype=dtype) * 0.4
    return logits, target


def test_every_configurable_loss_is_implemented():
    from ptmst_ray.models.losses import _LOSSES

    assert set(LOSS_NAMES) == set(_LOSSES)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("b,seed", [(1, 0), (2, 1), (7, 2), (12, 3)])
def test_loss_matches_reference(name, b, seed):
    logits, target = _inputs(b, seed)
    got = contrastive_loss(name, logits, target)
    assert got.dim() == 0
    want = REFERENCES[name](logits.numpy(), target.numpy())
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float32_close_to_float64(name):
    logits, target = _inputs(9, 5)
    a = contrastive_loss(name, logits.float(), target.float()).item()
    b = contrastive_loss(name, logits, target).item()
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_infonce_identity_is_clip_loss():
    logits, _ = _inputs(10, 4)
    labels = torch.arange(10)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = contrastive_loss("InfoNCE", logits, torch.eye(10, dtype=logits.dtype))
    torch.testing.assert_close(got, clip)


def test_wbce_without_negatives_is_finite():
    logits = torch.tensor([[3.0]], requires_grad=True)
    loss = contrastive_loss("WBCE", logits, torch.ones(1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(0.5 * -math.log(_sigmoid(3.0) + 1e-6), rel=1e-5)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="WBCE.*InfoNCE"):
        contrastive_loss("Hinge", torch.zeros(2, 2), torch.eye(2))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="matching"):
        contrastive_loss("WBCE", torch.zeros(2, 2), torch.eye(3))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_twice(name):
    # keep the WBCE positive/negative mask away from the 0.5 boundary (it is piecewise)
    logits, target = _inputs(4, 11)
    logits = (logits / 5).requires_grad_(True)
    target = target.clamp(0.05, 0.95)
    target = torch.where((target - 0.5).abs() < 0.05, target + 0.1, target).requires_grad_(True)
    fn = lambda L, S: contrastive_loss(name, L, S)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits, target))
    assert torch.autograd.gradgradcheck(fn, (logits, target))
