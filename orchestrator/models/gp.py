"""The nonparametric candidate ("none of the above"): a Gaussian-process encoding model.

A latent function f over the stimulus space (inputs scaled to [0, 1], log scale where the protocol
says so) has a squared-exponential (RBF) kernel prior, outputscale * exp(-|u - u'|^2 / 2 lengthscale^2),
with a constant mean; the response mean is link(f) (exp for Poisson, logistic for bernoulli/binomial,
identity for Gaussian). The posterior over f at the observed stimuli is a Laplace approximation
(Newton iterations, warm-started), and the evidence is prequential: log Z_T = sum_t log p(y_t | y_<t),
each term integrating the likelihood over the Gaussian predictive of f(x_t) by Gauss-Hermite
quadrature. That is the same quantity the SMC posteriors estimate, so the model probabilities are
comparable.

Hyperparameters are learnt online by marginalising them over a small grid (`hyper: marginal`, the
default): lengthscale x outputscale points (a given prior's equal-mass quantiles, else a fixed
log-spaced grid), each with its own Laplace posterior and prequential evidence log Z_h. The
candidate's evidence is log sum_h prior_h Z_h: by the chain rule that is the prequential score of
the hyperparameter-averaged predictive, so it stays a calibrated Bayesian evidence (a type-II
maximum-likelihood plug-in, max_h log Z_h, is over-confident for the GP; `hyper: type2` computes it
for comparison). A point whose posterior weight falls below PRUNE stops being updated and leaves
the sum (the work then follows the few points the data support). `hyper: fixed`, or a number
under `settings.lengthscale` / `settings.outputscale`, holds that hyperparameter at one value
(its prior median without a number). The constant mean defaults to the link of the running mean
of past responses (past data only, so the prequential evidence stays a valid sequential score).

Absorbing a trial refits every live point's Laplace posterior, warm-started at its previous mode
(`GPPosterior._factor`). From DENSE_BELOW (256) observations on, that costs one n x n Cholesky per
point, typically, and O(n^2) work besides: a first Newton step whose factor is the previous one
bordered by the new row, conjugate-gradient steps preconditioned with it while the steps are
large, then one exact step with a fresh factor at the new mode to confirm convergence (below 256
every Newton step factors its own, cheap, matrix). The evidence is that of cold-started dense fits
(to < 1e-9 nats over 50 trials in tests/test_models.py).

For the design, the predictive at any stimuli is a mixture over quadrature nodes of the best-
supported hyperparameter points, i.e. the same "weighted components" interface the particle
posteriors expose; it is differentiable in x.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

GP_HYPERPARAMETERS = ("lengthscale", "outputscale", "mean")
DTYPE = torch.float64
LINKS = {"exp", "logit", "identity"}
HYPER_MODES = ("marginal", "type2", "fixed")
#: the hyperparameter grid without priors: lengthscales on the unit-scaled inputs, outputscales
#: (latent variance) for the exp/logit links and for the identity link
LENGTHSCALES = (0.1, 0.2, 0.4, 0.8)
OUTPUTSCALES = {"link": (0.5, 2.0, 8.0), "identity": (0.25, 1.0, 4.0)}
#: equal-prior-mass points per hyperparameter that has a prior
PRIOR_POINTS = {"lengthscale": 4, "outputscale": 3}
#: a hyperparameter point whose posterior weight falls below this is no longer updated
PRUNE = 1e-6
#: the design's predictive mixes at most this many hyperparameter points, each of weight >= DESIGN_MIN_WEIGHT
DESIGN_POINTS = 3
DESIGN_MIN_WEIGHT = 0.01
#: kernel jitter on the diagonal
JITTER = 1e-8
#: a Newton step below this (max |change of f|) switches to exact steps with a fresh factor
SWITCH_TOL = 1e-4
#: the mode is converged when an exact Newton step moves no f by more than this
FACTOR_TOL = 1e-8
#: relative error at which the preconditioned conjugate-gradient solve of a Newton step stops
CG_TOL = 1e-9
#: below this many observations every Newton step factors its own B (cheaper than CG's Python loop)
DENSE_BELOW = 256


def _default_link(kind: str) -> str:
    return {"poisson": "exp", "bernoulli": "logit", "binomial": "logit"}.get(kind, "identity")


def _cho_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 r by two triangular solves (torch.cholesky_solve copies L on every call)."""
    v = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, v, upper=True).squeeze(-1)


def _b_matrix(K: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """B = I + S K S, S = diag(sw): the well-conditioned matrix of the Laplace step (R&W 3.1)."""
    B = torch.outer(sw, sw).mul_(K)
    B.diagonal().add_(1.0)
    return B


class GPView:
    """Quadrature-node components of the GP predictive (weights fixed, means depend on X): nodes of
    each of the best-supported hyperparameter points, weighted by their posterior weights."""

    def __init__(self, post: "GPPosterior", nodes: int) -> None:
        self.post = post
        t, w = np.polynomial.hermite.hermgauss(nodes)
        self.t = torch.tensor(t * math.sqrt(2.0), dtype=DTYPE)
        gh_logw = torch.tensor(np.log(w / math.sqrt(math.pi)), dtype=DTYPE)
        self.fits = post.design_fits()
        self.logw = torch.cat([lw + gh_logw for _, lw in self.fits])
        self.noise = None
        if post.candidate.likelihood.kind == "gaussian":
            self.noise = torch.full((self.logw.shape[0],), post.noise_sd, dtype=DTYPE)

    def __call__(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        U = self.post.space.raw_to_unit(X)
        fs = []
        for fit, _ in self.fits:
            mu, var = self.post.fit_predictive(fit, U)
            fs.append(mu.unsqueeze(0) + var.clamp_min(1e-12).sqrt().unsqueeze(0) * self.t.unsqueeze(-1))
        return self.logw, self.post.link(torch.cat(fs)), self.noise


class LaplaceFit:
    """One hyperparameter point: its kernel, Laplace posterior over f and prequential log evidence.

    The kernel matrix (with its jitter) lives in a buffer that grows by doubling, so absorbing a
    trial writes one row instead of copying the n x n matrix."""

    def __init__(self, lengthscale: float, outputscale: float, log_prior: float) -> None:
        self.lengthscale = float(lengthscale)
        self.outputscale = float(outputscale)
        self.log_prior = float(log_prior)
        self.log_evidence = 0.0
        self.alive = True
        self._K = torch.empty((0, 0), dtype=DTYPE)
        self.n = 0
        self.f_hat = torch.empty(0, dtype=DTYPE)
        self.L: torch.Tensor | None = None
        self.sw = self.grad = torch.empty(0, dtype=DTYPE)

    @property
    def K(self) -> torch.Tensor:
        """Kernel matrix of the absorbed inputs, jitter JITTER on the diagonal (a view, n x n)."""
        return self._K[:self.n, :self.n]

    def extend(self, k: torch.Tensor) -> None:
        """Append one input whose kernel values against the previous inputs are k (n,)."""
        n = self.n
        if n + 1 > self._K.shape[0]:
            grown = torch.empty((max(16, 2 * (n + 1)),) * 2, dtype=DTYPE)
            grown[:n, :n] = self.K
            self._K = grown
        self._K[n, :n] = k
        self._K[:n, n] = k
        self._K[n, n] = self.outputscale + JITTER
        self.n = n + 1

    def kernel(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """outputscale * exp(-|a - b|^2 / (2 lengthscale^2)), (n, m); differentiable in A."""
        d2 = ((A.unsqueeze(-2) - B.unsqueeze(-3)) ** 2).sum(-1)
        return self.outputscale * torch.exp(-0.5 * d2 / self.lengthscale ** 2)


class GPPosterior:
    """Laplace-approximate GP posterior with prequential evidence, hyperparameters marginalised on a grid."""

    def __init__(self, candidate: Any, space: Any, seed: int) -> None:
        self.candidate = candidate
        self.space = space
        self.seed = seed
        s = candidate.settings
        kind = candidate.likelihood.kind
        self.link_name = str(s.get("link", _default_link(kind)))
        if self.link_name not in LINKS:
            raise ValueError(f"models.{candidate.index}.settings.link: must be one of {sorted(LINKS)}")
        self.hyper = str(s.get("hyper", "marginal"))
        if self.hyper not in HYPER_MODES:
            raise ValueError(f"models.{candidate.index}.settings.hyper: must be one of {', '.join(HYPER_MODES)}")
        self.fixed_mean = float(s["mean"]) if "mean" in s else (
            candidate.priors["mean"].median() if "mean" in candidate.priors else None)
        self.noise_sd = float(s.get("noise_sd", candidate.fixed.get("noise_sd", 1.0)))
        if "noise_sd" in candidate.priors:
            self.noise_sd = candidate.priors["noise_sd"].median()
        self.quadrature = int(s.get("quadrature", 32))
        self.design_nodes = int(s.get("design_nodes", 12))
        identity = self.link_name == "identity"
        ls_pts = self._points("lengthscale", 0.25, LENGTHSCALES)
        os_pts = self._points("outputscale", 1.0 if identity else 2.0,
                              OUTPUTSCALES["identity" if identity else "link"])
        log_prior = -math.log(len(ls_pts) * len(os_pts))
        self.fits = [LaplaceFit(ls, os, log_prior) for ls in ls_pts for os in os_pts]
        self.U = torch.empty((0, space.d), dtype=DTYPE)  # unit-scaled inputs
        self.y = torch.empty(0, dtype=DTYPE)
        self.m = self._mean_value()
        gh_t, gh_w = np.polynomial.hermite.hermgauss(self.quadrature)
        self._gh_t = torch.tensor(gh_t * math.sqrt(2.0), dtype=DTYPE)
        self._gh_logw = torch.tensor(np.log(gh_w / math.sqrt(math.pi)), dtype=DTYPE)

    def _points(self, name: str, default: float, grid: tuple[float, ...]) -> list[float]:
        """The values hyperparameter `name` takes: a settings number, else its prior's equal-mass
        quantiles (its median with `hyper: fixed`), else the default grid (the default value when fixed)."""
        s, priors = self.candidate.settings, self.candidate.priors
        if name in s:
            return [float(s[name])]
        if name in priors:
            if self.hyper == "fixed":
                return [priors[name].median()]
            n = PRIOR_POINTS[name]
            u = (torch.arange(n, dtype=DTYPE) + 0.5) / n
            return [float(v) for v in priors[name].icdf(u)]
        return [default] if self.hyper == "fixed" else list(grid)

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

    # -- hyperparameter posterior -------------------------------------------------------------
    def _live(self) -> list[LaplaceFit]:
        return [f for f in self.fits if f.alive]

    def hyper_log_weights(self) -> list[tuple[LaplaceFit, float]]:
        """Normalised log posterior weights of the live hyperparameter points."""
        live = self._live()
        lw = torch.tensor([f.log_prior + f.log_evidence for f in live], dtype=DTYPE)
        lw = lw - torch.logsumexp(lw, 0)
        return list(zip(live, [float(v) for v in lw]))

    @property
    def log_evidence(self) -> float:
        """log sum_h prior_h Z_h over the live points (`hyper: type2`: max_h log Z_h)."""
        live = self._live()
        if self.hyper == "type2":
            return max(f.log_evidence for f in live)
        return float(torch.logsumexp(torch.tensor([f.log_prior + f.log_evidence for f in live], dtype=DTYPE), 0))

    def design_fits(self) -> list[tuple[LaplaceFit, float]]:
        """The hyperparameter points the design's predictive mixes, with renormalised log weights."""
        ranked = sorted(self.hyper_log_weights(), key=lambda t: -t[1])
        keep = [t for t in ranked[:DESIGN_POINTS] if t[1] >= math.log(DESIGN_MIN_WEIGHT)] or ranked[:1]
        total = math.log(sum(math.exp(lw) for _, lw in keep))
        return [(f, lw - total) for f, lw in keep]

    def _prune(self) -> None:
        for fit, lw in self.hyper_log_weights():
            if lw < math.log(PRUNE):
                fit.alive = False

    # -- posterior ---------------------------------------------------------------------------
    def _factor(self, fit: LaplaceFit, f0: torch.Tensor) -> None:
        """Laplace mode f_hat from f0 and the Cholesky factor L of B = I + W^1/2 K W^1/2 there
        (R&W alg. 3.1: Newton steps f <- K a + m, a = b - W^1/2 B^-1 W^1/2 K b, b = W (f - m) + grad).

        Absorbing one trial, f0 is the previous mode with the new input's predictive mean appended.
        From DENSE_BELOW observations on, the first step uses the previous factor's W for the
        previous inputs, so its B is the previous B bordered by one row and its factor costs
        O(n^2). While the steps are large, the next ones solve with the current B by conjugate
        gradients preconditioned with that factor (W has moved little: a few O(n^2) iterations).
        Once a step is below SWITCH_TOL the mode is within ~1e-8 of converged: one Cholesky at the
        current f gives the factor the predictive keeps, and a last exact step with it must move f
        by less than FACTOR_TOL (else it repeats), so L is the factor at the mode to within that.
        Below DENSE_BELOW every step factors its own B. A test compares the evidence with
        cold-started dense fits."""
        K, n, m = fit.K, fit.n, self.m
        g, W = self._grad_hess(f0)
        if fit.L is None or n < DENSE_BELOW:  # small: a Cholesky costs less than bordering one in Python
            sw_P = W.sqrt()
            P = torch.linalg.cholesky(_b_matrix(K, sw_P))
        else:
            sw_P = torch.cat([fit.sw, W[-1:].sqrt()])
            P = self._bordered_factor(fit, sw_P)
        b = sw_P ** 2 * (f0 - m) + g
        a = b - sw_P * _cho_solve(P, sw_P * (K @ b))  # f = K a + m from here on
        f = K @ a + m
        size = float((f - f0).abs().max())
        for _ in range(50):
            g, W = self._grad_hess(f)
            sw = W.sqrt()
            r = g - a  # the same Newton step as an increment: small near the mode, so solve errors stay small
            if size < SWITCH_TOL or n < DENSE_BELOW:
                P = P if torch.equal(sw, sw_P) else torch.linalg.cholesky(_b_matrix(K, sw))
                sw_P = sw
                c = r - sw * _cho_solve(P, sw * (K @ r))
                exact = True
            else:
                c = r - sw * self._pcg(K, sw, P, sw * (K @ r))
                exact = False
            step = K @ c
            f, a = f + step, a + c
            size = float(step.abs().max())
            if exact and size < FACTOR_TOL:
                break
        fit.L, fit.sw = P, sw_P
        fit.grad, fit.f_hat = self._grad_hess(f)[0], f

    @staticmethod
    def _bordered_factor(fit: LaplaceFit, sw: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of I + S K S (S = diag sw) reusing fit.L, the factor of its leading block
        when the previous inputs' sw are unchanged (one new row: a triangular solve); else from scratch."""
        K, n = fit.K, fit.n
        L_old = fit.L
        if L_old is None or L_old.shape[0] != n - 1 or not torch.equal(fit.sw, sw[:-1]):
            return torch.linalg.cholesky(_b_matrix(K, sw))
        c = sw[:-1] * K[:-1, -1] * sw[-1]
        row = torch.linalg.solve_triangular(L_old, c.unsqueeze(-1), upper=False).squeeze(-1)
        d = (1.0 + sw[-1] ** 2 * K[-1, -1] - row @ row).clamp_min(1e-12).sqrt()
        L = torch.empty((n, n), dtype=DTYPE)
        L[:-1, :-1] = L_old
        L[:-1, -1] = 0.0
        L[-1, :-1] = row
        L[-1, -1] = d
        return L

    @staticmethod
    def _pcg(K: torch.Tensor, sw: torch.Tensor, P: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Solve (I + S K S) z = r (S = diag sw) by conjugate gradients preconditioned with the
        Cholesky factor P of a nearby matrix of the same form."""
        def apply(v: torch.Tensor) -> torch.Tensor:
            return v + sw * (K @ (sw * v))

        z = _cho_solve(P, r)
        res = r - apply(z)
        q = _cho_solve(P, res)  # ~ the error of z, as P ~ B
        p, rq = q, float(res @ q)
        for _ in range(r.shape[0]):
            if float(q.abs().max()) <= CG_TOL * float(z.abs().max()):
                break
            Ap = apply(p)
            alpha = rq / float(p @ Ap)
            z = z + alpha * p
            res = res - alpha * Ap
            q = _cho_solve(P, res)
            rq_new = float(res @ q)
            p, rq = q + (rq_new / rq) * p, rq_new
        return z

    def fit_predictive(self, fit: LaplaceFit, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of f at unit-scaled inputs U (S, d) under one hyperparameter point."""
        kss = torch.full((U.shape[0],), fit.outputscale, dtype=DTYPE)
        if fit.L is None:
            return torch.full((U.shape[0],), self.m, dtype=DTYPE) + 0 * U.sum(-1), kss
        ks = fit.kernel(U, self.U)  # (S, T)
        mu = self.m + ks @ fit.grad
        v = torch.linalg.solve_triangular(fit.L, (fit.sw.unsqueeze(-1) * ks.T), upper=False)
        return mu, (kss - (v * v).sum(0)).clamp_min(1e-10)

    def latent_predictive(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of f at raw stimuli X (S, d), moments of the hyperparameter mixture;
        differentiable in X."""
        U = self.space.raw_to_unit(X)
        parts = [(self.fit_predictive(f, U), math.exp(lw)) for f, lw in self.hyper_log_weights()]
        mu = sum(w * m for (m, _), w in parts)
        second = sum(w * (v + m * m) for (m, v), w in parts)
        return mu, (second - mu * mu).clamp_min(1e-10)  # type: ignore[operator]

    def update(self, x: torch.Tensor, y: float) -> None:
        """Prequential evidence term for y at x under every live point, then absorb (x, y)."""
        X = x.reshape(1, -1).to(DTYPE)
        u = self.space.raw_to_unit(X)
        yy = torch.tensor([float(y)], dtype=DTYPE)
        live = self._live()
        mus = []
        for fit in live:
            mu, var = self.fit_predictive(fit, u)
            f = mu + var.sqrt() * self._gh_t  # (G,)
            fit.log_evidence += float(torch.logsumexp(self._gh_logw + self._loglik(yy.expand_as(f), f), 0))
            mus.append(mu.detach().reshape(1))
        self.y = torch.cat([self.y, yy])
        self.m = self._mean_value()
        for fit, mu in zip(live, mus):
            fit.extend(fit.kernel(u, self.U)[0])
            self._factor(fit, torch.cat([fit.f_hat, mu]))
        self.U = torch.cat([self.U, u], 0)
        self._prune()

    def predictive(self, max_components: int | None = None, gen: torch.Generator | None = None) -> GPView:
        return GPView(self, self.design_nodes)

    def hyper_moments(self) -> dict[str, dict[str, float]]:
        """Posterior mean and SD of each hyperparameter over the grid (the mean is a plug-in: SD 0)."""
        w = self.hyper_log_weights()
        out = {}
        for name in ("lengthscale", "outputscale"):
            vals = torch.tensor([getattr(f, name) for f, _ in w], dtype=DTYPE)
            p = torch.tensor([math.exp(lw) for _, lw in w], dtype=DTYPE)
            m = float((p * vals).sum())
            out[name] = {"mean": m, "sd": float((p * (vals - m) ** 2).sum().clamp_min(0).sqrt())}
        out["mean"] = {"mean": self.m, "sd": 0.0}
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "gaussian_process",
            "log_evidence": float(self.log_evidence),
            "ess": None,
            "observations": int(self.y.shape[0]),
            "hyperparameter_points": len(self._live()),
            "params": self.hyper_moments(),
        }
