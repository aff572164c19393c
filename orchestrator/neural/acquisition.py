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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from botorch.acquisition import AcquisitionFunction
from torch import nn

from orchestrator.neural.features import FeatureModel
from orchestrator.neural.readout import ReadoutState


@dataclass
class ReadoutSnapshot:
    """One model's readout as tensors, frozen for a design computation (private units use their means)."""

    S: torch.Tensor
    means: torch.Tensor
    noise_scale: torch.Tensor  # b / a (N,)
    inflation: torch.Tensor  # df / (df - 2) (N,): Student-t variance over scale^2
    log_prob: float

    @classmethod
    def of(cls, state: ReadoutState, log_prob: float) -> "ReadoutSnapshot":
        means = state.means.copy()
        for u, p in state.private.items():
            means[u] = p.mean
        df = 2 * state.a
        return cls(torch.from_numpy(state.S.copy()), torch.from_numpy(means), torch.from_numpy(state.b / state.a),
                   torch.from_numpy(df / (df - 2).clip(min=1e-3)).clamp(max=3.0), float(log_prob))


def predictive_moments(features: torch.Tensor, snap: ReadoutSnapshot) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian moments (B, N) of every unit's predictive at images with `features` (B, d).

    Everything runs in the features' precision (single for pool scoring, double for synthesis)."""
    dtype = features.dtype
    q = ((features @ snap.S.to(dtype)) * features).sum(-1)
    mean = features @ snap.means.to(dtype).T
    var = (1.0 + q)[:, None] * (snap.noise_scale * snap.inflation).to(dtype)[None, :]
    return mean, var


def bhattacharyya_bound(moments: Sequence[tuple[torch.Tensor, torch.Tensor]], log_probs: torch.Tensor) -> torch.Tensor:
    """The pairwise-distance lower bound on I(model; response) per image (B,), in nats.

    All pairs at once: means and variances stacked (M, B, N), the pairs i < j gathered (P, B, N)."""
    M = len(moments)
    B = moments[0][0].shape[0]
    mu = torch.stack([m for m, _ in moments])
    var = torch.stack([v for _, v in moments])
    i, j = torch.triu_indices(M, M, offset=1)
    log_var = torch.log(var)
    s = var[i] + var[j]
    dij = ((mu[i] - mu[j]) ** 2 / (4 * s) + 0.5 * torch.log(s / 2)).sum(-1) \
        - 0.25 * (log_var[i] + log_var[j]).sum(-1)  # (P, B)
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
