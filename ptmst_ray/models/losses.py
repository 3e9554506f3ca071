"""Soft-target contrastive losses between student logits and a (learned) similarity matrix.

Why this file exists: experts, distillation and evaluation all score a b x b logit matrix
L (image i vs text j) against a target similarity S (b x b; the identity for real pairs,
a learned matrix for distilled ones). Distillation differentiates through these losses twice
(meta-gradient wrt images, text embeddings and S), so every loss here is written with plain,
twice-differentiable tensor operations and no in-place updates.

Definitions (docs/method.md#losses; BCE, KL, MSE, CWCL and the exact WBCE constants follow the
LoRS code, silicx/LoRS ``MultilabelContrastiveLoss``, Xu et al. 2024):

* ``InfoNCE`` (soft, symmetric):
  0.5 * ( -mean_i sum_j S_ij log softmax_j(L_i.) - mean_j sum_i S_ij log softmax_i(L_.j) ).
  With S = I this is the ordinary CLIP loss.
* ``WBCE``: p = sigmoid(L), e_ij = -S_ij log(p_ij + 1e-6) - (1 - S_ij) log(1 - p_ij + 1e-6);
  positives are S_ij > 0.5, negatives the rest; loss = 0.5 * (sum_pos e / (n_pos + 1e-6) +
  sum_neg e / (n_neg + 1e-6)). The ``+ 1e-6`` in the denominators (as in LoRS) makes an empty
  group (e.g. b = 1: no negatives) contribute 0 instead of NaN.
* ``BCE``: mean over all entries of -S log p - (1 - S) log(1 - p), p = sigmoid(L), with each log
  clamped at -100 as ``torch.nn.BCELoss`` does (computed through logsigmoid for stability).
* ``KL``: 0.5 * (KL_rows + KL_cols); KL_rows = mean over all b*b entries of
  q_ij (log q_ij - log softmax_j(L_i.)), q = row softmax of 10 * S (LoRS sharpens the target
  by 10 and uses ``KLDivLoss(reduction="mean")``, i.e. divides by b*b, not b); KL_cols is the
  same on the transposes.
* ``MSE``: mean over all entries of (sigmoid(L) - S)^2.
* ``CWCL`` (continuously weighted contrastive loss, Srinivasa et al. 2023, LoRS variant):
  0.5 * (rows + cols), rows = -mean_i [ sum_j S_ij log softmax_j(L_i.) / (sum_j S_ij + 1e-6) ].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ptmst_ray.vocab import LOSS_NAMES

_EPS = 1e-6
_KL_TARGET_SHARPNESS = 10.0
_BCE_LOG_CLAMP = -100.0


def _soft_infonce_rows(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def infonce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Symmetric soft-target InfoNCE; the CLIP loss when ``target`` is the identity."""
    return 0.5 * (_soft_infonce_rows(logits, target) + _soft_infonce_rows(logits.T, target.T))


def wbce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Balanced BCE: the mean loss over positives (S > 0.5) and over negatives, averaged."""
    p = torch.sigmoid(logits)
    e = -target * torch.log(p + _EPS) - (1.0 - target) * torch.log(1.0 - p + _EPS)
    pos = (target > 0.5).detach()
    neg = ~pos
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    loss_pos = torch.where(pos, e, zero).sum() / (pos.sum().to(e.dtype) + _EPS)
    loss_neg = torch.where(neg, e, zero).sum() / (neg.sum().to(e.dtype) + _EPS)
    return 0.5 * (loss_pos + loss_neg)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross entropy of sigmoid(logits) against the soft target."""
    log_p = F.logsigmoid(logits).clamp(min=_BCE_LOG_CLAMP)
    log_1mp = F.logsigmoid(-logits).clamp(min=_BCE_LOG_CLAMP)
    return -(target * log_p + (1.0 - target) * log_1mp).mean()


def _kl_rows(logits: Tensor, target: Tensor) -> Tensor:
    log_q = torch.log_softmax(_KL_TARGET_SHARPNESS * target, dim=1)
    return (log_q.exp() * (log_q - torch.log_softmax(logits, dim=1))).mean()


def kl_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Symmetric KL(softmax(10 S) || softmax(L)) over rows and columns, averaged over entries."""
    return 0.5 * (_kl_rows(logits, target) + _kl_rows(logits.T, target.T))


def mse_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between sigmoid(logits) and the target."""
    return ((torch.sigmoid(logits) - target) ** 2).mean()


def _cwcl_rows(logits: Tensor, target: Tensor) -> Tensor:
    weighted = (target * torch.log_softmax(logits, dim=1)).sum(dim=1) / (target.sum(dim=1) + _EPS)
    return -weighted.mean()


def cwcl_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Symmetric InfoNCE with each row's (column's) target weights normalised to sum to 1."""
    return 0.5 * (_cwcl_rows(logits, target) + _cwcl_rows(logits.T, target.T))


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "WBCE": wbce_loss,
    "InfoNCE": infonce_loss,
    "BCE": bce_loss,
    "KL": kl_loss,
    "MSE": mse_loss,
    "CWCL": cwcl_loss,
}


def contrastive_loss(name: str, logits: Tensor, target: Tensor) -> Tensor:
    """Scalar loss ``name`` between ``logits`` (b x b, image i vs text j) and ``target`` (b x b).

    ``target`` may require grad (learned similarity); all losses are differentiable twice.
    """
    fn = _LOSSES.get(name)
    if fn is None:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    if logits.dim() != 2 or logits.shape != target.shape:
        raise ValueError(
            f"logits and target must be matching 2-D matrices, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return fn(logits, target.to(dtype=logits.dtype, device=logits.device))
