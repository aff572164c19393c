"""Which image best tells the candidate models apart: a bound on I(model; population response).

For an image with features x_m under model m, every unit's predictive is the readout's Student-t,
here moment-matched to a Gaussian N(mu_mu, v_mu) (v = scale^2 df / (df - 2)); units are independent
given the model. Between two models the Bhattacharyya distance of these diagonal Gaussians is

    D_ij = sum_u (mu_iu - mu_ju)^2 / (4 (v_iu + v_ju)) + 1/2 log((v_iu + v_ju) / 2) - 1/4 log(v_iu v_ju)

and, with P(model) = p, the mutual information between the model and the response is bounded below
by (Kolchinsky & Tracey 2017, "Estimating mixture entropy with pairwise distances")

    I(M; Y) >= - sum_i p_i log sum_j p_j exp(-D_ij)

which is 0 when every model predicts the same and log(#models) (the most one trial can tell) when
they are far apart. It is smooth in the image, so gradient synthesis can climb it; the same function
scores a pool. ``PopulationDiscrimination`` is a BoTorch AcquisitionFunction over flattened pixels
(batch x q=1 x C*H*W), so it plugs into BoTorch's optimizers as well as plain torch ones.

A pipelined design plans trial t from the readouts before trial t - 1, whose image is known but
whose response is not yet (orchestrator.neural.designs). That pending trial is not ignored: with
``ReadoutSnapshot.with_pending`` each model's predictive is the joint Gaussian of the pending
response and the new one (per unit, covariance sigma^2 [[1 + x_p' S x_p, x_p' S x], [x_p' S x,
1 + x' S x]]), the distances are those of these bivariate Gaussians, and the bound is on
I(model; both responses): maximising it over the new image maximises what it adds to the pending
one (BoTorch's ``X_pending``, here for a fixed image), so the design does not spend a trial on
what the pending trial will already tell.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from botorch.acquisition import AcquisitionFunction
from torch import nn

from orchestrator.neural.features import FeatureModel
from orchestrator.neural.readout import ReadoutState


@dataclass(frozen=True)
class PendingTrial:
    """A trial shown (or about to be) whose response the snapshot has not absorbed."""

    SX: torch.Tensor  # (d,) S x_p
    q: torch.Tensor  # () x_p' S x_p
    mean: torch.Tensor  # (N,) the units' predictive means at x_p


@dataclass(frozen=True)
class ReadoutSnapshot:
    """One model's readout as tensors, frozen for a design computation (private units use their means)."""

    S: torch.Tensor
    means: torch.Tensor
    noise_scale: torch.Tensor  # b / a (N,)
    inflation: torch.Tensor  # df / (df - 2) (N,): Student-t variance over scale^2
    log_prob: float
    pending: PendingTrial | None = None

    @classmethod
    def of(cls, state: ReadoutState, log_prob: float) -> "ReadoutSnapshot":
        means = state.means.copy()
        for u, p in state.private.items():
            means[u] = p.mean
        df = 2 * state.a
        return cls(torch.from_numpy(state.S.copy()), torch.from_numpy(means), torch.from_numpy(state.b / state.a),
                   torch.from_numpy(df / (df - 2).clip(min=1e-3)).clamp(max=3.0), float(log_prob))

    def with_pending(self, features: np.ndarray | torch.Tensor) -> "ReadoutSnapshot":
        """The same readout with a pending trial at standardised `features` (d,) (module docstring)."""
        x = torch.as_tensor(np.asarray(features), dtype=self.S.dtype)
        SX = self.S @ x
        return replace(self, pending=PendingTrial(SX, SX @ x, self.means @ x))


def predictive_moments(features: torch.Tensor, snap: ReadoutSnapshot) -> tuple[torch.Tensor, ...]:
    """Gaussian moments of every unit's predictive at images with `features` (B, d): (mean, var),
    each (B, N); with a pending trial also its covariance with the pending response (B, N) and the
    pending response's mean and variance (N,) each.

    Everything runs in the features' precision (single for pool scoring, double for synthesis)."""
    dtype = features.dtype
    q = ((features @ snap.S.to(dtype)) * features).sum(-1)
    mean = features @ snap.means.to(dtype).T
    unit = (snap.noise_scale * snap.inflation).to(dtype)[None, :]
    var = (1.0 + q)[:, None] * unit
    if snap.pending is None:
        return mean, var
    p = snap.pending
    cov = (features @ p.SX.to(dtype))[:, None] * unit
    return mean, var, cov, p.mean.to(dtype), (1.0 + p.q.to(dtype)) * unit[0]


def _pairwise_distances(moments: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Bhattacharyya distances (P, B) summed over units for the model pairs i < j (triu order):
    of the diagonal Gaussians (mean, var), or, when the moments carry a pending trial, of the
    units' bivariate Gaussians of (pending response, new response)."""
    M = len(moments)
    i, j = torch.triu_indices(M, M, offset=1)
    mu = torch.stack([m[0] for m in moments])
    var = torch.stack([m[1] for m in moments])
    if len(moments[0]) == 2:
        log_var = torch.log(var)
        s = var[i] + var[j]
        return ((mu[i] - mu[j]) ** 2 / (4 * s) + 0.5 * torch.log(s / 2)).sum(-1) \
            - 0.25 * (log_var[i] + log_var[j]).sum(-1)
    f64 = torch.float64  # a determinant of correlated responses: single precision cancels
    mu, var = mu.to(f64), var.to(f64)
    cov = torch.stack([m[2] for m in moments]).to(f64)  # (M, B, N)
    p_mu = torch.stack([m[3] for m in moments]).to(f64)[:, None, :]  # (M, 1, N)
    p_var = torch.stack([m[4] for m in moments]).to(f64)[:, None, :]
    log_det = torch.log(p_var * var - cov ** 2)
    a, b, c = (p_var[i] + p_var[j]) / 2, (cov[i] + cov[j]) / 2, (var[i] + var[j]) / 2
    det = a * c - b ** 2
    d_p, d_y = p_mu[i] - p_mu[j], mu[i] - mu[j]
    quad = (c * d_p ** 2 - 2 * b * d_p * d_y + a * d_y ** 2) / det
    return (quad / 8 + 0.5 * torch.log(det) - 0.25 * (log_det[i] + log_det[j])).sum(-1)


def bhattacharyya_bound(moments: Sequence[tuple[torch.Tensor, ...]], log_probs: torch.Tensor) -> torch.Tensor:
    """The pairwise-distance lower bound on I(model; response) per image (B,), in nats.

    All pairs at once: moments stacked (M, B, N), the pairs i < j gathered (P, B, N)."""
    M = len(moments)
    B = moments[0][0].shape[0]
    i, j = torch.triu_indices(M, M, offset=1)
    dij = _pairwise_distances(moments)
    D = torch.zeros(B, M, M, dtype=torch.float64)
    D[:, i, j] = dij.T.to(torch.float64)
    D[:, j, i] = dij.T.to(torch.float64)
    lp = log_probs.to(D.dtype)
    inner = torch.logsumexp(lp[None, None, :] - D, dim=-1)  # (B, M)
    return -(lp.exp()[None, :] * inner).sum(-1)


def discrimination_from_features(features: Sequence[torch.Tensor], snaps: Sequence[ReadoutSnapshot]) -> torch.Tensor:
    """The bound at images given every model's standardised features (each (B, d_m))."""
    log_probs = torch.tensor([s.log_prob for s in snaps], dtype=torch.float64)
    log_probs = log_probs - torch.logsumexp(log_probs, 0)
    return bhattacharyya_bound([predictive_moments(f, s) for f, s in zip(features, snaps)], log_probs)


class PopulationDiscrimination(AcquisitionFunction):
    """I(model; response) bound at images X (batch x 1 x C*H*W pixels in 0..1) -> (batch,)."""

    def __init__(self, feature_models: Sequence[FeatureModel], snapshots: Sequence[ReadoutSnapshot],
                 image_shape: tuple[int, int, int]) -> None:
        nn.Module.__init__(self)
        self.model = None  # the candidates are feature models with readouts, not one BoTorch Model
        self.feature_models = list(feature_models)
        self.snapshots = list(snapshots)
        self.image_shape = tuple(image_shape)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        images = X.reshape(-1, *self.image_shape).to(torch.float32)
        return discrimination_from_features([fm(images) for fm in self.feature_models], self.snapshots)
