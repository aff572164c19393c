"""BoTorch acquisition functions over the particle mixture: model discrimination and parameter information.

Both are exact mutual informations for discrete responses, computed by summing over the response
outcomes (Poisson truncated with the tail folded in; Gaussian responses discretised on a fine grid):

- discrimination  I(M; Y_x) = sum_m pi_m KL(p_m(y|x) || p(y|x)),  p_m = sum_i w_mi p(y | theta_mi, x)
- characterization  I(theta; Y_x | m) = sum_i w_i KL(p(y|theta_i,x) || p_m(y|x))

The tables are outcome probabilities (`Likelihood.outcome_probs`, one exp per entry). The
acquisitions read the model's `posterior(X)`, a ParticleMixturePosterior (BoTorch Posterior)
holding each model's weighted particle means at X.

For q > 1 (several stimuli per block) the joint outcome of the q responses is enumerated when
K^q is small (exact joint MI); otherwise the per-point MIs are summed (an upper bound that ignores
redundancy, used with sequential greedy selection so X_pending still discourages duplicates).

`forward` takes `b x q x d` design coordinates, is differentiable in continuous dimensions and
is optimised with `optimize_acqf`, `optimize_acqf_mixed` or `optimize_acqf_discrete`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.models.model import Model
from botorch.posteriors import Posterior
from botorch.utils.transforms import concatenate_pending_points, t_batch_mode_transform

from orchestrator.models.likelihoods import Likelihood
from orchestrator.models.space import StimulusEncoding

View = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
MAX_JOINT_OUTCOMES = 4096


class ParticleMixturePosterior(Posterior):
    """The predictive of weighted particle mixtures at raw stimuli X (one mixture per model).

    `components[m]` = (log weights (N,), response means (N, S), noise SD (N,) or None) of model m;
    `model_log_probs` weighs the models. The acquisitions read the components to sum over outcomes;
    `rsample` draws response means (model, then particle) for Monte-Carlo use.
    """

    def __init__(self, components: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 model_log_probs: torch.Tensor) -> None:
        self.components = components
        self.model_log_probs = model_log_probs

    @property
    def device(self) -> torch.device:
        return self.components[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.components[0][1].dtype

    @property
    def mean(self) -> torch.Tensor:
        """Model-averaged response mean at each stimulus, (S, 1)."""
        pi = self.model_log_probs.exp().to(self.dtype)
        per = torch.stack([(w - torch.logsumexp(w, 0)).exp() @ m for w, m, _ in self.components])
        return (pi @ per).unsqueeze(-1)

    def rsample(self, sample_shape: torch.Size | None = None, base_samples: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws of the response mean, sample_shape x S x 1 (model by probability, then particle)."""
        shape = torch.Size(sample_shape or torch.Size([1]))
        n = int(torch.Size(shape).numel())
        models = torch.multinomial(self.model_log_probs.exp(), n, replacement=True, generator=generator)
        out = []
        for j in models.tolist():
            w, m, _ = self.components[j]
            i = int(torch.multinomial((w - torch.logsumexp(w, 0)).exp(), 1, generator=generator))
            out.append(m[i])
        return torch.stack(out).reshape(*shape, -1, 1)


class ParticleMixtureModel(Model):
    """BoTorch `Model` over particle mixtures: `posterior(X)` at raw stimuli X (S, d) is a
    ParticleMixturePosterior that the outcome-MI acquisitions below read."""

    def __init__(self, views: Sequence[View], model_log_probs: torch.Tensor | None = None) -> None:
        super().__init__()
        self._views = list(views)
        self.model_log_probs = (model_log_probs if model_log_probs is not None
                                else torch.full((len(self._views),), -math.log(len(self._views)), dtype=torch.float64))

    @property
    def num_outputs(self) -> int:
        return 1

    def posterior(self, X: torch.Tensor, *args: Any, **kwargs: Any) -> ParticleMixturePosterior:
        return ParticleMixturePosterior([v(X) for v in self._views], self.model_log_probs)


def _outcome_tables(posterior: ParticleMixturePosterior, lik: Likelihood,
                    compute_dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per model: normalised weights (N,) and P(outcome k | component i, x_j) (N, S, K) on a shared grid."""
    comps = posterior.components
    lpm = posterior.model_log_probs
    means = torch.cat([m.reshape(-1) for _, m, _ in comps])
    weights = torch.cat([(w - torch.logsumexp(w, 0) + lpm[j]).exp().unsqueeze(-1).expand_as(m).reshape(-1)
                         for j, (w, m, _) in enumerate(comps)])
    noise_all = None
    if lik.kind == "gaussian":
        noise_all = torch.cat([n.unsqueeze(-1).expand_as(m).reshape(-1) for _, m, n in comps])  # type: ignore[union-attr]
    grid = lik.outcome_grid(means, weights, noise_all)
    out_w, out_p = [], []
    for logw, m, n in comps:
        nn = None if n is None else n.unsqueeze(-1).expand_as(m)
        out_p.append(lik.outcome_probs(m, grid, nn, compute_dtype))
        out_w.append((logw - torch.logsumexp(logw, 0)).exp().to(compute_dtype))
    return out_w, out_p


def _joint(p: torch.Tensor, q: int) -> torch.Tensor:
    """(N, b, q, K) per-point outcome probs -> (N, b, K^q) joint outcome probs (independent given i)."""
    N, b, _, K = p.shape
    joint = p[:, :, 0, :]
    for j in range(1, q):
        joint = (joint.unsqueeze(-1) * p[:, :, j, :].unsqueeze(-2)).reshape(N, b, -1)
    return joint


def _kl(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_k p_k (log p_k - log q_k) over the last dim, with 0 log 0 = 0."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """p log p with 0 log 0 = 0 and a finite gradient at p = 0 (an empty Poisson tail)."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def _mix(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The weighted mixture sum_i w_i p_i(y) (b, K) of component probs (N, b, K): one matmul."""
    return (w @ p.reshape(p.shape[0], -1)).reshape(p.shape[1:])


class _OutcomeMI(AcquisitionFunction):
    """Outcome-summed MI read from the model's ParticleMixturePosterior at the candidate stimuli."""

    model: ParticleMixtureModel

    def __init__(self, views: Sequence[View], space: StimulusEncoding, likelihood: Likelihood,
                 model_log_probs: torch.Tensor | None = None) -> None:
        lpm = model_log_probs if model_log_probs is not None else torch.zeros(len(views), dtype=torch.float64)
        super().__init__(model=ParticleMixtureModel(views, lpm))
        self.views = list(views)
        self.space = space
        self.likelihood = likelihood
        self.X_pending: torch.Tensor | None = None
        #: float32 for exhaustive scoring of discrete candidates (no gradients needed), else float64
        self.compute_dtype = torch.float64

    def _per_point(self, X: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
        """Normalised weights and outcome probabilities per model, the latter reshaped to (N, b, q, K)."""
        b, q, d = X.shape
        raw = self.space.design_to_raw(X.reshape(b * q, d))
        ws, ps = _outcome_tables(self.model.posterior(raw), self.likelihood, self.compute_dtype)
        return ws, [p.reshape(p.shape[0], b, q, p.shape[-1]) for p in ps], b, q

    def _stack_q(self, ps: list[torch.Tensor], q: int) -> tuple[list[torch.Tensor], bool]:
        K = ps[0].shape[-1]
        if q == 1:
            return [p[:, :, 0, :] for p in ps], True
        if K ** q <= MAX_JOINT_OUTCOMES:
            return [_joint(p, q) for p in ps], True
        return ps, False

    def _summed_over_q(self, X: torch.Tensor,
                       value: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """`value(weights, outcome tables)` of the q points of each batch at X (b, q, d): of their joint
        outcome when it is small enough to enumerate (MAX_JOINT_OUTCOMES), else summed over the
        points one at a time."""
        ws, ps, _, q = self._per_point(X)
        stacked, exact = self._stack_q(ps, q)
        if exact:
            return value(ws, stacked)
        return sum(value(ws, [p[:, :, j, :] for p in stacked]) for j in range(q))  # type: ignore[return-value]


class ModelDiscriminationMI(_OutcomeMI):
    """I(model identity; next response(s)) under current model probabilities (nats)."""

    def __init__(self, views: Sequence[View], log_probs: torch.Tensor, space: StimulusEncoding,
                 likelihood: Likelihood) -> None:
        normalised = log_probs - torch.logsumexp(log_probs, 0)
        super().__init__(views, space, likelihood, normalised)
        self.log_probs = normalised

    @concatenate_pending_points
    @t_batch_mode_transform()
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self._summed_over_q(X, self._mi)

    def _mi(self, ws: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        pm = torch.stack([_mix(w, p) for w, p in zip(ws, ps)])  # (M, b, K) p_m(y)
        stack = torch.log(pm.clamp_min(torch.finfo(pm.dtype).tiny))
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
        return self._summed_over_q(X, lambda ws, ps: self._info(ws[0], ps[0]))

    @staticmethod
    def _info(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """H(mixture) - sum_i w_i H(p_i), the same sum as sum_i w_i KL(p_i || mixture)."""
        neg_h = _plogp(p).sum(-1)  # (N, b)
        mix = _mix(w, p)
        return (w @ neg_h - _plogp(mix).sum(-1)).clamp_min(0.0).to(torch.float64)


__all__ = ["ModelDiscriminationMI", "ParameterInformation", "ParticleMixtureModel", "ParticleMixturePosterior",
           "MAX_JOINT_OUTCOMES"]
