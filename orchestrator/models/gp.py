"""The nonparametric candidate ("none of the above"): a Gaussian-process encoding model.

A latent function f over the stimulus space (inputs scaled to [0, 1], log scale where the protocol
says so) has a GPyTorch ScaleKernel(RBF) prior with a constant mean; the response mean is link(f)
(exp for Poisson, logistic for bernoulli/binomial, identity for Gaussian). The posterior over f at
the observed stimuli is a Laplace approximation (Newton iterations, warm-started), and the
evidence is prequential: log Z_T = sum_t log p(y_t | y_<t), each term integrating the likelihood
over the Gaussian predictive of f(x_t) by Gauss-Hermite quadrature. That is the same quantity
the SMC posteriors estimate, so the model probabilities are comparable.

For the design, the predictive at any stimuli is a mixture over quadrature nodes, i.e. the same
"weighted components" interface the particle posteriors expose; it is differentiable in x.

Hyperparameters (priors `lengthscale`, `outputscale`, `mean` optional) sit at their prior medians or at
settings values; the constant mean defaults to the link of the running mean of past responses
(past data only, so the prequential evidence stays a valid sequential predictive score).
"""
from __future__ import annotations

import math
from typing import Any

import gpytorch
import numpy as np
import torch

GP_HYPERPARAMETERS = ("lengthscale", "outputscale", "mean")
DTYPE = torch.float64
LINKS = {"exp", "logit", "identity"}


def _default_link(kind: str) -> str:
    return {"poisson": "exp", "bernoulli": "logit", "binomial": "logit"}.get(kind, "identity")


class GPView:
    """Quadrature-node components of the GP predictive (weights fixed, means depend on X)."""

    def __init__(self, post: "GPPosterior", nodes: int) -> None:
        self.post = post
        t, w = np.polynomial.hermite.hermgauss(nodes)
        self.t = torch.tensor(t * math.sqrt(2.0), dtype=DTYPE)
        self.logw = torch.tensor(np.log(w / math.sqrt(math.pi)), dtype=DTYPE)
        self.noise = None
        if post.candidate.likelihood.kind == "gaussian":
            self.noise = torch.full((nodes,), post.noise_sd, dtype=DTYPE)

    def __call__(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mu, var = self.post.latent_predictive(X)
        f = mu.unsqueeze(0) + var.clamp_min(1e-12).sqrt().unsqueeze(0) * self.t.unsqueeze(-1)
        return self.logw, self.post.link(f), self.noise


class GPPosterior:
    """Laplace-approximate GP posterior with prequential evidence."""

    def __init__(self, candidate: Any, space: Any, seed: int) -> None:
        self.candidate = candidate
        self.space = space
        self.seed = seed
        s = candidate.settings
        kind = candidate.likelihood.kind
        self.link_name = str(s.get("link", _default_link(kind)))
        if self.link_name not in LINKS:
            raise ValueError(f"models.{candidate.index}.settings.link: must be one of {sorted(LINKS)}")

        def hyper(name: str, default: float) -> float:
            if name in s:
                return float(s[name])
            if name in candidate.priors:
                return candidate.priors[name].median()
            return default

        self.lengthscale = hyper("lengthscale", 0.25)
        self.outputscale = hyper("outputscale", 2.0 if self.link_name != "identity" else 1.0)
        self.fixed_mean = float(s["mean"]) if "mean" in s else (
            candidate.priors["mean"].median() if "mean" in candidate.priors else None)
        self.noise_sd = float(s.get("noise_sd", candidate.fixed.get("noise_sd", 1.0)))
        if "noise_sd" in candidate.priors:
            self.noise_sd = candidate.priors["noise_sd"].median()
        self.quadrature = int(s.get("quadrature", 32))
        self.design_nodes = int(s.get("design_nodes", 12))
        self.kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DTYPE)
        self.kernel.base_kernel.lengthscale = torch.tensor(self.lengthscale, dtype=DTYPE)
        self.kernel.outputscale = torch.tensor(self.outputscale, dtype=DTYPE)
        self.kernel.requires_grad_(False)
        self.U = torch.empty((0, space.d), dtype=DTYPE)  # unit-scaled inputs
        self.y = torch.empty(0, dtype=DTYPE)
        self.f_hat = torch.empty(0, dtype=DTYPE)
        self.log_evidence = 0.0
        self.m = self._mean_value()
        self._factor()
        gh_t, gh_w = np.polynomial.hermite.hermgauss(self.quadrature)
        self._gh_t = torch.tensor(gh_t * math.sqrt(2.0), dtype=DTYPE)
        self._gh_logw = torch.tensor(np.log(gh_w / math.sqrt(math.pi)), dtype=DTYPE)

    # -- link and likelihood -----------------------------------------------------------------
    def link(self, f: torch.Tensor) -> torch.Tensor:
        if self.link_name == "exp":
            return torch.exp(f.clamp(max=30.0))
        if self.link_name == "logit":
            return torch.sigmoid(f)
        return f

    def _loglik(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        lik = self.candidate.likelihood
        noise = None if lik.kind != "gaussian" else torch.tensor(self.noise_sd, dtype=DTYPE)
        return lik.log_prob(y, self.link(f), noise)

    def _grad_hess(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d/df log p(y|f) and W = -d2/df2 (diagonal), for the canonical links (Gaussian: identity)."""
        lik = self.candidate.likelihood
        if lik.kind == "poisson" and self.link_name == "exp":
            lam = torch.exp(f.clamp(max=30.0))
            return self.y - lam, lam
        if lik.kind in ("bernoulli", "binomial") and self.link_name == "logit":
            p = torch.sigmoid(f)
            return self.y - lik.n * p, (lik.n * p * (1 - p)).clamp_min(1e-10)
        if lik.kind == "gaussian" and self.link_name == "identity":
            s2 = self.noise_sd ** 2
            return (self.y - f) / s2, torch.full_like(f, 1.0 / s2)
        # generic: autograd (non-canonical link), W clipped positive for a stable Newton step
        fv = f.detach().clone().requires_grad_(True)
        ll = self._loglik(self.y, fv).sum()
        (g,) = torch.autograd.grad(ll, fv, create_graph=True)
        h = torch.stack([torch.autograd.grad(g[i], fv, retain_graph=True)[0][i] for i in range(len(f))])
        return g.detach(), (-h.detach()).clamp_min(1e-8)

    def _mean_value(self) -> float:
        if self.fixed_mean is not None:
            return self.fixed_mean
        kind = self.candidate.likelihood.kind
        n = self.y.shape[0]
        if kind == "poisson":
            return math.log((float(self.y.sum()) + 1.0) / (n + 1.0))
        if kind in ("bernoulli", "binomial"):
            k = self.candidate.likelihood.n
            p = (float(self.y.sum()) + 0.5) / (n * k + 1.0)
            return math.log(p / (1 - p))
        return float(self.y.mean()) if n else 0.0

    # -- posterior ---------------------------------------------------------------------------
    def _factor(self) -> None:
        """Laplace mode f_hat and the Cholesky factor of B = I + W^1/2 K W^1/2 (R&W alg. 3.1)."""
        T = self.y.shape[0]
        if T == 0:
            self.L = None
            return
        K = self.kernel(self.U).to_dense() + 1e-8 * torch.eye(T, dtype=DTYPE)
        f = self.f_hat if self.f_hat.shape[0] == T else torch.full((T,), self.m, dtype=DTYPE)
        eye = torch.eye(T, dtype=DTYPE)
        for _ in range(50):
            g, W = self._grad_hess(f)
            sw = W.sqrt()
            B = eye + sw.unsqueeze(1) * K * sw.unsqueeze(0)
            L = torch.linalg.cholesky(B)
            b = W * (f - self.m) + g
            v = torch.cholesky_solve((sw * (K @ b)).unsqueeze(-1), L).squeeze(-1)
            a = b - sw * v
            f_new = K @ a + self.m
            if float((f_new - f).abs().max()) < 1e-6:
                f = f_new
                break
            f = f_new
        g, W = self._grad_hess(f)
        sw = W.sqrt()
        self.L = torch.linalg.cholesky(eye + sw.unsqueeze(1) * K * sw.unsqueeze(0))
        self.sw, self.grad, self.f_hat = sw, g, f

    def latent_predictive(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of f at raw stimuli X (S, d); differentiable in X."""
        U = self.space.raw_to_unit(X)
        kss = self.kernel.outputscale.expand(U.shape[0])
        if self.L is None:
            return torch.full((U.shape[0],), self.m, dtype=DTYPE) + 0 * U.sum(-1), kss.clone()
        ks = self.kernel(U, self.U).to_dense()  # (S, T)
        mu = self.m + ks @ self.grad
        v = torch.linalg.solve_triangular(self.L, (self.sw.unsqueeze(-1) * ks.T), upper=False)
        var = kss - (v * v).sum(0)
        return mu, var.clamp_min(1e-10)

    def update(self, x: torch.Tensor, y: float) -> None:
        """Prequential evidence term for y at x, then absorb (x, y) and refit the Laplace mode."""
        X = x.reshape(1, -1).to(DTYPE)
        mu, var = self.latent_predictive(X)
        f = mu + var.sqrt() * self._gh_t  # (G,)
        yy = torch.tensor([float(y)], dtype=DTYPE)
        lp = self._loglik(yy.expand_as(f), f)
        self.log_evidence += float(torch.logsumexp(self._gh_logw + lp, 0))
        self.U = torch.cat([self.U, self.space.raw_to_unit(X)], 0)
        self.y = torch.cat([self.y, yy])
        old_m = self.m
        self.m = self._mean_value()
        self.f_hat = torch.cat([self.f_hat + (self.m - old_m), mu.detach().reshape(1) + (self.m - old_m)])
        self._factor()

    def predictive(self, max_components: int | None = None, gen: torch.Generator | None = None) -> GPView:
        return GPView(self, self.design_nodes)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "gaussian_process",
            "log_evidence": float(self.log_evidence),
            "ess": None,
            "observations": int(self.y.shape[0]),
            "params": {"lengthscale": {"mean": self.lengthscale, "sd": 0.0},
                       "outputscale": {"mean": self.outputscale, "sd": 0.0},
                       "mean": {"mean": self.m, "sd": 0.0}},
        }
