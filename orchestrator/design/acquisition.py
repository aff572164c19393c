"""BoTorch acquisition functions over the particle mixture: model discrimination and parameter information.

Both are exact mutual informations for discrete responses, computed by summing over the response
outcomes (Poisson truncated with the tail folded in; Gaussian responses discretised on a fine grid):

- discrimination  I(M; Y_x) = sum_m pi_m KL(p_m(y|x) || p(y|x)),  p_m = sum_i w_mi p(y | theta_mi, x)
- characterization  I(theta; Y_x | m) = sum_i w_i KL(p(y|theta_i,x) || p_m(y|x))

For q > 1 (several stimuli per block) the joint outcome of the q responses is enumerated when
K^q is small (exact joint MI); otherwise the per-point MIs are summed (an upper bound that ignores
redundancy, used with sequential greedy selection so X_pending still discourages duplicates).

`forward` takes `b x q x d` design coordinates, is differentiable in continuous dimensions and
is optimised with `optimize_acqf`, `optimize_acqf_mixed` or `optimize_acqf_discrete`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.models.model import Model
from botorch.utils.transforms import concatenate_pending_points, t_batch_mode_transform

from orchestrator.models.likelihoods import Likelihood
from orchestrator.models.space import StimulusEncoding

View = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
MAX_JOINT_OUTCOMES = 4096


class ParticleMixtureModel(Model):
    """Placeholder BoTorch `Model` for acquisitions over particle mixtures (no Gaussian posterior).

    BoTorch's AcquisitionFunction requires a model; ours are the per-model posterior views held
    by the acquisition itself, so `posterior` is deliberately not available.
    """

    def __init__(self, views: Sequence[View]) -> None:
        super().__init__()
        self._views = list(views)

    @property
    def num_outputs(self) -> int:
        return 1

    def posterior(self, X: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("the particle mixture has no Gaussian posterior; use the acquisition")


def _log_outcome_probs(views: Sequence[View], X_raw: torch.Tensor, lik: Likelihood,
                       compute_dtype: torch.dtype = torch.float64,
                       model_log_probs: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per model: log weights (N,) and log P(outcome k | component i, x_j) (N, S, K) on a shared grid."""
    comps = [v(X_raw) for v in views]
    lpm = model_log_probs if model_log_probs is not None else torch.zeros(len(comps), dtype=torch.float64)
    means = torch.cat([m.reshape(-1) for _, m, _ in comps])
    weights = torch.cat([(w - torch.logsumexp(w, 0) + lpm[j]).exp().unsqueeze(-1).expand_as(m).reshape(-1)
                         for j, (w, m, _) in enumerate(comps)])
    noise_all = None
    if lik.kind == "gaussian":
        noise_all = torch.cat([n.unsqueeze(-1).expand_as(m).reshape(-1) for _, m, n in comps])  # type: ignore[union-attr]
    grid = lik.outcome_grid(means, weights, noise_all)
    out_w, out_lp = [], []
    for logw, m, n in comps:
        nn = None if n is None else n.unsqueeze(-1).expand_as(m)
        out_lp.append(lik.outcome_log_probs(m, grid, nn, compute_dtype))
        out_w.append(logw.to(compute_dtype))
    return out_w, out_lp


def _joint(lp: torch.Tensor, q: int) -> torch.Tensor:
    """(N, b, q, K) per-point outcome log probs -> (N, b, K^q) joint outcome log probs."""
    N, b, _, K = lp.shape
    joint = lp[:, :, 0, :]
    for j in range(1, q):
        joint = (joint.unsqueeze(-1) + lp[:, :, j, :].unsqueeze(-2)).reshape(N, b, -1)
    return joint


def _kl(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_k p_k (log p_k - log q_k) over the last dim, with 0 log 0 = 0."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _mixture(logw: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Component probs p_i(y) (N, b, K) and the weighted mixture log p(y) (b, K) via one matmul."""
    p = lp.exp()
    mix = (logw.exp() @ p.reshape(p.shape[0], -1)).reshape(p.shape[1:])
    return p, torch.log(mix.clamp_min(torch.finfo(p.dtype).tiny))


class _OutcomeMI(AcquisitionFunction):
    def __init__(self, views: Sequence[View], space: StimulusEncoding, likelihood: Likelihood) -> None:
        super().__init__(model=ParticleMixtureModel(views))
        self.views = list(views)
        self.space = space
        self.likelihood = likelihood
        self.X_pending: torch.Tensor | None = None
        #: float32 for exhaustive scoring of discrete candidates (no gradients needed), else float64
        self.compute_dtype = torch.float64

    model_log_probs: torch.Tensor | None = None

    def _per_point(self, X: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
        """Outcome log-probs per model reshaped to (N, b, q, K)."""
        b, q, d = X.shape
        raw = self.space.design_to_raw(X.reshape(b * q, d))
        ws, lps = _log_outcome_probs(self.views, raw, self.likelihood, self.compute_dtype, self.model_log_probs)
        return ws, [lp.reshape(lp.shape[0], b, q, lp.shape[-1]) for lp in lps], b, q

    def _stack_q(self, lps: list[torch.Tensor], q: int) -> tuple[list[torch.Tensor], bool]:
        K = lps[0].shape[-1]
        if q == 1:
            return [lp[:, :, 0, :] for lp in lps], True
        if K ** q <= MAX_JOINT_OUTCOMES:
            return [_joint(lp, q) for lp in lps], True
        return lps, False


class ModelDiscriminationMI(_OutcomeMI):
    """I(model identity; next response(s)) under current model probabilities (nats)."""

    def __init__(self, views: Sequence[View], log_probs: torch.Tensor, space: StimulusEncoding,
                 likelihood: Likelihood) -> None:
        super().__init__(views, space, likelihood)
        self.log_probs = log_probs - torch.logsumexp(log_probs, 0)
        self.model_log_probs = self.log_probs

    @concatenate_pending_points
    @t_batch_mode_transform()
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        ws, lps, b, q = self._per_point(X)
        stacked, exact = self._stack_q(lps, q)
        if exact:
            return self._mi(ws, stacked)
        return sum(self._mi(ws, [lp[:, :, j, :] for lp in stacked]) for j in range(q))  # type: ignore[return-value]

    def _mi(self, ws: list[torch.Tensor], lps: list[torch.Tensor]) -> torch.Tensor:
        stack = torch.stack([_mixture(w, lp)[1] for w, lp in zip(ws, lps)])  # (M, b, K) log p_m(y)
        pm = stack.exp()
        pi = self.log_probs.exp().to(pm.dtype)
        log_total = torch.log(torch.einsum("m,mbk->bk", pi, pm).clamp_min(torch.finfo(pm.dtype).tiny))
        kl = _kl(pm, stack, log_total.unsqueeze(0))  # (M, b)
        return (pi.unsqueeze(-1) * kl).sum(0).clamp_min(0.0).to(torch.float64)


class ParameterInformation(_OutcomeMI):
    """I(parameters of one model; next response(s)) - "characterize" once a model has won (nats)."""

    def __init__(self, view: View, space: StimulusEncoding, likelihood: Likelihood) -> None:
        super().__init__([view], space, likelihood)

    @concatenate_pending_points
    @t_batch_mode_transform()
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        ws, lps, b, q = self._per_point(X)
        stacked, exact = self._stack_q(lps, q)
        if exact:
            return self._info(ws[0], stacked[0])
        return sum(self._info(ws[0], stacked[0][:, :, j, :]) for j in range(q))  # type: ignore[return-value]

    @staticmethod
    def _info(logw: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        p, log_mix = _mixture(logw, lp)
        kl = _kl(p, lp, log_mix.unsqueeze(0))  # (N, b)
        return (logw.exp().unsqueeze(-1) * kl).sum(0).clamp_min(0.0).to(torch.float64)


__all__ = ["ModelDiscriminationMI", "ParameterInformation", "ParticleMixtureModel", "MAX_JOINT_OUTCOMES"]
