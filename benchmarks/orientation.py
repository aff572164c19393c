"""Benchmark 3: orientation x contrast tuning, Poisson counts, 2-D continuous space, 3 models incl. the GP.

    python benchmarks/orientation.py --subjects 48 --cap-random 300 --jobs 2 --skip timing,regret,calibration,gp_update

Part 1 (`trials`): trials until P(true) >= 0.95 and 0.99 per simulated neuron (truth drawn from the
von Mises model's prior, seeded) for each of `--designs`: the mutual-information design, random, and
the oracle, a benchmark-only reference that knows the true neuron and greedily presents the stimulus
with the largest expected increase of log P(true) (`OracleGain`); same subjects and response seeds
for every design, sessions spread over `--jobs` worker processes; each design also counts the
sessions whose first model to reach .95 (.99) is not the truth, and each design's ratio to random
gets a bootstrap interval. `pref_oracle` is the MI design told the neuron's preferred orientation.
Other rules for the discriminating decision, benchmark code too, are named LABEL/key=value/...:
`posterior_sampling` (the oracle's rule for hypotheses drawn from the posterior; draws, until),
`joint` (I(M; y) + lam I(theta; y | M); lam, decay, until), `locate` (I(M; y) + lam I(pref bin;
y | M); lam, bins, until), `utility` (expected utility of the next model posterior; kind indexes
UtilityDesign.KINDS) and `rollout` (a planner over several trials; H, S, L, R, G, N, reward, D,
step), e.g. --designs "utility/kind=3,joint/lam=0.3". Part 1b (`oracle_gap`): that
expected increase at the states of MI sessions, at the MI design's choice, at the best stimulus of
a grid, and for a random stimulus (runs with `--gap-subjects N`). Part 1c (`evidence`): MI sessions
whose parametric evidence is recomputed with `--evidence-particles` particles, and the first
crossings of .95 with it and without the GP (runs with `--evidence-subjects N`). Part 2 (`timing`): decision
time (perf_counter and thread CPU time around `propose`) p50/p95 at trials 10, 100 and 500 of a long
session, from repeated proposals at that exact posterior state, for the protocol's design, for the
discriminating decision at the same state (the models with P >= 1e-6) and for the discriminating
decision with all three models in the mixture. Part 3 (`calibration`): MI sessions against
truths drawn from each model's prior (von Mises, Gaussian, and functions drawn from the GP prior),
for each GP hyperparameter treatment (`--hyper`): how often the first model to reach P >= .95 / .99
is not the truth. Part 4 (`regret`): the design regret (nats) and CPU time of design settings at the
3-model states of MI sessions, against the exact best over a dense stimulus grid. Part 5
(`gp_update`): CPU time of the GP candidate's own update (all its live hyperparameter points) at
trials 10 / 100 / 300 / 500 of a session with random stimuli.

`--baseline-tree DIR` runs the timing and gp_update parts a second time in a subprocess that imports
`orchestrator` from another checkout (e.g. the main branch), alternating with this tree part by
part, so both are measured under the same load; the output gains `baseline` and CPU ratios.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from botorch.utils.transforms import concatenate_pending_points, t_batch_mode_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention_common import censored_median, dump, environment, percentile  # noqa: E402

from orchestrator.design import information, make_design  # noqa: E402
from orchestrator.design.acquisition import ModelDiscriminationMI, ParameterInformation, View, _mix, _OutcomeMI  # noqa: E402
from orchestrator.design.information import NEGLIGIBLE, InformationDesign  # noqa: E402
from orchestrator.inference import ModelComparison, SMCPosterior, generator  # noqa: E402
from orchestrator.models import build_truth  # noqa: E402
from orchestrator.models.views import ParticleView  # noqa: E402
from orchestrator.protocol import parse_protocol_text  # noqa: E402

ORIENTATION_YAML = """
name: orientation-contrast-benchmark
version: "1.0"
stimulus:
  type: grating
  parameters:
    orientation: {kind: continuous, low: 0, high: 180, units: deg}
    contrast: {kind: continuous, low: 0.02, high: 1.0, units: fraction, log: true}
response: {kind: poisson}
models:
  - name: von_mises
    builtin: orientation_contrast
    inputs: {theta: orientation, c: contrast}
    priors:
      baseline: {dist: gamma, shape: 2, rate: 1}
      rmax: {dist: gamma, shape: 4, rate: 0.2}
      kappa: {dist: lognormal, mu: 0.5, sigma: 0.5}
      pref: {dist: uniform, low: 0, high: 180}
      c50: {dist: lognormal, mu: -1.6, sigma: 0.5}
      n: {dist: lognormal, mu: 0.7, sigma: 0.3}
  - name: gaussian
    formula: "b + g * max(c - c0, 0) * exp(-0.5 * (min(abs(theta - pref), 180 - abs(theta - pref)) / w)**2)"
    inputs: {theta: orientation, c: contrast}
    priors:
      b: {dist: gamma, shape: 2, rate: 1}
      g: {dist: gamma, shape: 4, rate: 0.2}
      w: {dist: lognormal, mu: 3.0, sigma: 0.4}
      pref: {dist: uniform, low: 0, high: 180}
      c0: {dist: uniform, low: 0.0, high: 0.3}
  - name: gp
    builtin: gaussian_process
    prior_probability: 0.2
    settings: {link: exp}
design:
  strategy: mutual_information
  characterize_threshold: 0.99
stopping: {max_trials: 500}
safety:
  contrast: {min: 0.02, max: 1.0}
"""


def truth_for(protocol, seed: int) -> str:
    """A von Mises x Naka-Rushton neuron drawn from the model's prior (seeded), responsive enough to
    be a neuron one would record (peak rate >= 5 spikes per trial)."""
    rng = np.random.default_rng([seed, 77])
    while True:
        th = {"baseline": rng.gamma(2, 1), "rmax": rng.gamma(4, 5), "kappa": rng.lognormal(0.5, 0.5),
              "pref": rng.uniform(0, 180), "c50": rng.lognormal(-1.6, 0.5), "n": rng.lognormal(0.7, 0.3)}
        if th["rmax"] >= 5:
            return "von_mises:" + ",".join(f"{k}={v:.6g}" for k, v in th.items())


def gaussian_truth_for(seed: int) -> str:
    """A Gaussian x linear-threshold neuron drawn from that model's prior (peak rate >= 5)."""
    rng = np.random.default_rng([seed, 78])
    while True:
        th = {"b": rng.gamma(2, 1), "g": rng.gamma(4, 5), "w": rng.lognormal(3.0, 0.4),
              "pref": rng.uniform(0, 180), "c0": rng.uniform(0, 0.3)}
        if th["g"] * (1 - th["c0"]) >= 5:
            return "gaussian:" + ",".join(f"{k}={v:.6g}" for k, v in th.items())


class GPTruth:
    """A neuron whose log rate is one function drawn from the GP candidate's prior: a hyperparameter
    point of its grid (uniform), mean log(8) spikes; values at new stimuli are drawn conditionally on
    the values already drawn, so the responses follow one exact sample path."""

    model_name = "gp"

    def __init__(self, comparison: ModelComparison, seed: int) -> None:
        rng = np.random.default_rng([seed, 79])
        gp = comparison.posterior("gp")
        self.fit = gp.fits[int(rng.integers(len(gp.fits)))]
        self.space = comparison.space
        self.m = math.log(8.0)
        self.U = torch.empty((0, self.space.d), dtype=torch.float64)
        self.f = torch.empty(0, dtype=torch.float64)

    def spec(self) -> str:
        return f"gp:lengthscale={self.fit.lengthscale:g},outputscale={self.fit.outputscale:g}"

    def sample(self, stimulus: dict, rng: np.random.Generator) -> float:
        u = self.space.raw_to_unit(self.space.stimulus_to_raw(stimulus).reshape(1, -1))
        kss = self.fit.outputscale
        if self.f.numel():
            K = self.fit.kernel(self.U, self.U) + 1e-8 * torch.eye(self.f.numel(), dtype=torch.float64)
            k = self.fit.kernel(self.U, u)[:, 0]
            sol = torch.linalg.solve(K, torch.stack([self.f - self.m, k], -1))
            mu, var = self.m + float(k @ sol[:, 0]), max(kss - float(k @ sol[:, 1]), 1e-10)
        else:
            mu, var = self.m, kss
        f = mu + math.sqrt(var) * rng.standard_normal()
        self.U = torch.cat([self.U, u])
        self.f = torch.cat([self.f, torch.tensor([f], dtype=torch.float64)])
        return float(rng.poisson(math.exp(min(f, 7.0))))


def calibration(text: str, hyper: str, sessions: int, seed0: int, cap: int) -> dict:
    """First crossings of .95 and .99 in MI sessions against truths from each model's prior."""
    text = text.replace("settings: {link: exp}", f"settings: {{link: exp, hyper: {hyper}}}")
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    out: dict = {}
    for kind in ("von_mises", "gaussian", "gp"):
        rows = []
        for s in range(sessions):
            seed = seed0 + 1000 * ("von_mises", "gaussian", "gp").index(kind) + s
            comparison = ModelComparison.from_protocol(protocol, seed)
            if kind == "gp":
                truth = GPTruth(comparison, seed)
            else:
                truth = build_truth(protocol, truth_for(protocol, seed) if kind == "von_mises" else gaussian_truth_for(seed))
            strategy = make_design(protocol, seed)
            first: dict[str, tuple[str, int] | None] = {"0.95": None, "0.99": None}
            for i in range(cap):
                d = strategy.propose(comparison, i)
                comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
                name, p = comparison.leader()
                for crit in first:
                    if first[crit] is None and p >= float(crit):
                        first[crit] = (name, i + 1)
                if first["0.99"] is not None:
                    break
            rows.append(first)
            print(f"# calibration {hyper} {kind} {s}: {first} ({truth.spec()})", file=sys.stderr, flush=True)
        res = {"sessions": sessions}
        for crit in ("0.95", "0.99"):
            stopped = [r[crit] for r in rows if r[crit] is not None]
            res[f"reached_{crit}"] = len(stopped)
            res[f"wrong_at_{crit}"] = sum(name != kind for name, _ in stopped)
            res[f"median_trials_{crit}"] = censored_median([n for _, n in stopped], cap) if stopped else None
        out[kind] = res
    kinds = list(out)
    for crit in ("0.95", "0.99"):
        stopped = sum(out[k][f"reached_{crit}"] for k in kinds)
        wrong = sum(out[k][f"wrong_at_{crit}"] for k in kinds)
        out[f"fraction_correct_at_{crit}"] = round(1 - wrong / stopped, 4) if stopped else None
    return out


def regret(text: str, configs: list[str], subjects: int, seed0: int) -> dict:
    """Design regret of design settings at the 3-model states of MI sessions (trials 0-9 while no
    model has P >= .99): exact-best MI over a 60 x 30 stimulus grid, every particle, minus that MI
    at the chosen stimulus, and the decision's CPU time."""
    def with_settings(c: str):
        t = text if not c else text.replace("  characterize_threshold: 0.99",
                                            f"  characterize_threshold: 0.99\n  settings: {c}")
        return parse_protocol_text(t, "<orientation benchmark>").protocol

    base = with_settings("")
    protocols = {c: with_settings(c) for c in configs}
    rows: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
    info: list[tuple[float, float]] = []
    u = torch.cartesian_prod(torch.linspace(0, 1, 60, dtype=torch.float64), torch.linspace(0, 1, 30, dtype=torch.float64))
    for s in range(subjects):
        seed = seed0 + s
        truth = build_truth(base, truth_for(base, seed))
        comparison = ModelComparison.from_protocol(base, seed)
        strategy = make_design(base, seed)
        for i in range(10):
            logp = comparison.log_probabilities()
            if float(logp.exp().max()) >= 0.99:
                break
            alive = [j for j in range(len(logp)) if float(logp[j].exp()) >= 1e-6]
            exact = ModelDiscriminationMI([comparison.posteriors[j].predictive(None) for j in alive], logp[alive],
                                          comparison.space, comparison.candidates[0].likelihood)
            exact.compute_dtype = torch.float32
            with torch.no_grad():
                grid_mi = torch.cat([exact(u[k:k + 48].unsqueeze(1)) for k in range(0, u.shape[0], 48)])
            best = float(grid_mi.max())
            info.append((best, float(grid_mi.mean())))  # a random stimulus gets the grid's mean MI
            for c in configs:
                design = make_design(protocols[c], seed)
                design.mode = "discriminate"
                c0 = time.thread_time()
                d = design.propose(comparison, i)
                ms = (time.thread_time() - c0) * 1000
                x = comparison.space.raw_to_unit(comparison.space.stimulus_to_raw(d.stimulus).reshape(1, -1))
                with torch.no_grad():
                    rows[c].append((best - float(exact(x.unsqueeze(1))[0]), ms))
            d = strategy.propose(comparison, i)
            comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
        print(f"# regret subject {s}: {len(rows[configs[0]])} states", file=sys.stderr, flush=True)
    ratios = [b / m for b, m in info if m > 0]
    out: dict = {"information_per_trial": {
        "states": len(info), "best_mi_mean": round(float(np.mean([b for b, _ in info])), 4),
        "random_stimulus_mi_mean": round(float(np.mean([m for _, m in info])), 4),
        "best_over_random_ratio_of_means": round(float(np.mean([b for b, _ in info]) / np.mean([m for _, m in info])), 2),
        "best_over_random_ratio_median": round(percentile(ratios, 50), 2)}}
    for c in configs:
        r = [a for a, _ in rows[c]]
        ms = [b for _, b in rows[c]]
        out[c or "(default)"] = {"states": len(r), "regret_nats_p50": round(percentile(r, 50), 5),
                                 "regret_nats_p95": round(percentile(r, 95), 5),
                                 "cpu_ms_p50": round(percentile(ms, 50), 1), "cpu_ms_p95": round(percentile(ms, 95), 1)}
    return out


class OracleGain:
    """E_{y ~ truth}[increase of log P(true model)] at candidate stimuli (b x 1 x d design coordinates).

    The increase is that of the real comparison after observing y at x: log p_T(y | data) -
    log sum_m P(m) p_m(y | data), with p_m each model's posterior predictive (its design view) and
    T the true model; y is drawn from the true neuron's own Poisson rate at x. Equivalently
    KL(truth || mixture) - KL(truth || p_T): evidence for the truth the trial is expected to add.
    """

    def __init__(self, views: list[Any], log_probs: torch.Tensor, true_index: int, truth_view: Any,
                 space: Any, likelihood: Any) -> None:
        self.views, self.truth_view, self.true_index = views, truth_view, true_index
        self.log_probs = log_probs - torch.logsumexp(log_probs, 0)
        self.space, self.likelihood = space, likelihood
        self.compute_dtype = torch.float64

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        b, q, d = X.shape
        raw = self.space.design_to_raw(X.reshape(b * q, d))
        comps = [v(raw) for v in self.views]
        truth_logw, truth_mean, _ = self.truth_view(raw)
        means = torch.cat([m.reshape(-1) for _, m, _ in comps] + [truth_mean.reshape(-1)])
        weights = torch.cat([(w - torch.logsumexp(w, 0) + self.log_probs[j]).exp().unsqueeze(-1).expand_as(m).reshape(-1)
                             for j, (w, m, _) in enumerate(comps)]
                            + [(truth_logw - torch.logsumexp(truth_logw, 0)).exp().unsqueeze(-1).expand_as(truth_mean).reshape(-1)])
        grid = self.likelihood.outcome_grid(means, weights)
        tiny = torch.finfo(torch.float64).tiny
        pm = torch.stack([(w - torch.logsumexp(w, 0)).exp() @ self.likelihood.outcome_probs(m, grid).reshape(m.shape[0], -1)
                          for w, m, _ in comps]).reshape(len(comps), b * q, -1)  # (M, S, K) p_m(y)
        # (S, K) the outcome probs y is drawn from: the neuron's own (one component) or a posterior mixture
        pt = ((truth_logw - torch.logsumexp(truth_logw, 0)).exp()
              @ self.likelihood.outcome_probs(truth_mean, grid).reshape(truth_mean.shape[0], -1)).reshape(b * q, -1)
        log_mix = torch.log(torch.einsum("m,msk->sk", self.log_probs.exp(), pm).clamp_min(tiny))
        log_true_model = torch.log(pm[self.true_index].clamp_min(tiny))
        return (pt * (log_true_model - log_mix)).sum(-1).reshape(b, q)[:, 0]


class OracleDesign(InformationDesign):
    """Benchmark reference, not a product design: knows the true neuron and, each trial, presents the
    stimulus with the largest expected increase of log P(true) (`OracleGain`), found by the same
    batched search as the mutual-information design. Greedy (one trial ahead), so its trial counts
    bound what a myopic design can reach, not every design."""

    name = "oracle"

    def __init__(self, protocol: Any, seed: int, truth: Any, components: int = 512, raw_samples: int = 256,
                 knows_parameters: bool = True) -> None:
        super().__init__(protocol, seed, {"raw_samples": raw_samples})
        self.truth = truth
        self.components = components
        self.knows_parameters = knows_parameters
        theta = {p: torch.tensor([v], dtype=torch.float64) for p, v in truth.params.items()}
        self.truth_view = ParticleView(truth.candidate, theta, torch.zeros(1, dtype=torch.float64))

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[OracleGain, str, str]:
        gen = generator(self.seed, trial_index, 0xACE)
        views = [post.predictive(self.components, gen) for post in comparison.posteriors]
        true_index = comparison.model_names.index(self.truth.model_name)
        # knowing only which model holds: y from that model's posterior predictive, not from the neuron
        truth_view = self.truth_view if self.knows_parameters else views[true_index]
        acq = OracleGain(views, comparison.log_probabilities(), true_index, truth_view, comparison.space,
                         comparison.candidates[0].likelihood)
        return acq, "oracle: max expected gain of log P(true)", self.name


class PrefOracleDesign(InformationDesign):
    """Benchmark reference, not a product design: the MI design told the neuron's preferred
    orientation. Its design views weigh every particle with a `pref` by a Gaussian kernel (SD
    `width` deg, circular) around the true value; inference and model probabilities are untouched.
    It bounds what finding the preferred orientation can buy a design that otherwise does as MI."""

    name = "pref_oracle"

    def __init__(self, protocol: Any, seed: int, truth: Any, width: float = 5.0) -> None:
        super().__init__(protocol, seed, dict(protocol.design.settings or {}))
        self.pref, self.width = float(truth.params["pref"]), float(width)

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        acq, why, strategy = super()._acquisition(comparison, trial_index)
        if not isinstance(acq, ModelDiscriminationMI):
            return acq, why, strategy
        views = []
        for view in acq.views:
            if isinstance(view, ParticleView) and "pref" in view.theta:
                off = torch.remainder(view.theta["pref"] - self.pref + 90.0, 180.0) - 90.0
                view = ParticleView(view.candidate, view.theta, view.logw - 0.5 * (off / self.width) ** 2)
            views.append(view)
        return (ModelDiscriminationMI(views, acq.log_probs, self.space, acq.likelihood),
                f"{why} (told pref = {self.pref:.1f} deg)", self.name)


class LookaheadDesign(InformationDesign):
    """Benchmark experiment, not a product design: two-step lookahead discrimination. For the best
    `first` of 128 Sobol points by I(M; y1), the value is I(M; y1) + E_{y1}[max over `second` Sobol
    points of I(M; y2 | y1)], the particles reweighted by each outcome y1 (the GP's quadrature
    nodes are marginal per stimulus and are not reweighted; its model probability is)."""

    name = "lookahead"

    def __init__(self, protocol: Any, seed: int, first: int = 12, second: int = 64) -> None:
        super().__init__(protocol, seed, dict(protocol.design.settings or {}))
        self.first, self.second = first, second

    def propose(self, comparison: Any, trial_index: int) -> Any:
        t0 = time.perf_counter()
        acq, _, _ = self._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation):
            return super().propose(comparison, trial_index)
        acq.compute_dtype = torch.float32
        rng = self.rng(trial_index)
        d, lik = self.space.d, acq.likelihood
        X = torch.quasirandom.SobolEngine(d, scramble=True, seed=int(rng.integers(2 ** 31))).draw(128, dtype=torch.float64)
        X2 = torch.quasirandom.SobolEngine(d, scramble=True, seed=int(rng.integers(2 ** 31))).draw(self.second,
                                                                                                dtype=torch.float64)
        best, best_x = -math.inf, X[:1]
        with torch.no_grad():
            now = acq(X.unsqueeze(1))
            for j in torch.argsort(now, descending=True)[: self.first].tolist():
                comps = [v(self.space.design_to_raw(X[j:j + 1])) for v in acq.views]
                grid = lik.outcome_grid(torch.cat([m.reshape(-1) for _, m, _ in comps]))
                tables = [lik.outcome_probs(m, grid)[:, 0, :] for _, m, _ in comps]  # (N, K) per model
                pm = torch.stack([(w - torch.logsumexp(w, 0)).exp() @ t for (w, _, _), t in zip(comps, tables)])
                py = acq.log_probs.exp() @ pm
                future = 0.0
                for k in torch.nonzero(py > 1e-3).reshape(-1).tolist():
                    views = [ParticleView(v.candidate, v.theta, v.logw + torch.log(t[:, k].clamp_min(1e-300)))
                             if isinstance(v, ParticleView) else v for v, t in zip(acq.views, tables)]
                    nxt = ModelDiscriminationMI(views, acq.log_probs + torch.log(pm[:, k].clamp_min(1e-300)),
                                                self.space, lik)
                    nxt.compute_dtype = torch.float32
                    future += float(py[k]) * float(nxt(X2.unsqueeze(1)).max())
                if float(now[j]) + future > best:
                    best, best_x = float(now[j]) + future, X[j:j + 1]
        return self.finish(best_x, f"two-step lookahead {best:.4f} nats", best, t0, strategy=self.name)


def _discrimination_mi(log_w: torch.Tensor, blocks: Sequence[tuple[int, int]], tables: torch.Tensor,
                       outcomes: int) -> torch.Tensor:
    """I(M; y) at every grid stimulus for each of B belief states: `log_w` (B, C) joint log weights
    (model probability included) of the C components, `blocks` each model's component range,
    `tables` (C, G * K) outcome probabilities. Returns (B, G)."""
    b = log_w.shape[0]
    mixes, log_pm = [], []
    for lo, hi in blocks:
        lz = torch.logsumexp(log_w[:, lo:hi], 1, keepdim=True)
        mixes.append(((log_w[:, lo:hi] - lz).exp() @ tables[lo:hi]).reshape(b, -1, outcomes))
        log_pm.append(lz)
    return _model_information(torch.softmax(torch.cat(log_pm, 1), 1), torch.stack(mixes, 1))


def _model_information(pi: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
    """I(M; y) = sum_m pi_m KL(p_m || sum_m' pi_m' p_m') from the model probabilities `pi` (..., M)
    and each model's outcome probabilities `pm` (..., M, G, K); returns (..., G)."""
    tiny = torch.finfo(pm.dtype).tiny
    log_total = torch.log((pi[..., None, None] * pm).sum(-3).clamp_min(tiny))
    kl = (pm * (torch.log(pm.clamp_min(tiny)) - log_total.unsqueeze(-3))).sum(-1)
    return (pi[..., None] * kl).sum(-2)


class RolloutDesign(InformationDesign):
    """Benchmark experiment, not a product design: non-myopic discrimination by rollout (one step of
    policy improvement over greedy MI). Each candidate first stimulus (the MI design's own choice,
    the best `L` - 1 of `G` Sobol points by I(M; y) and `R` random others) is scored over `S`
    simulated futures: a hypothesis (model, particle or GP node) drawn by posterior weight answers
    the candidate and then `H` - 1 more trials chosen by greedy MI over the grid, the beliefs
    updated by reweighting `N` components per model (common random numbers across candidates).
    The value is `reward` 0: E[log P(hypothesis' model)] after H trials; 1: P(it reached `level`
    within them); 2: 1 + 0.1 x 0. With a deadline `D` > 0 the horizon runs to trial D (then D +
    `step`, ...): the chance of deciding by a given trial, which is what a median counts."""

    name = "rollout"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.horizon, self.futures = int(s.pop("H", 3)), int(s.pop("S", 64))
        self.shortlist, self.randoms = int(s.pop("L", 16)), int(s.pop("R", 0))
        self.grid_points, self.components = int(s.pop("G", 64)), int(s.pop("N", 128))
        self.reward, self.level = int(s.pop("reward", 0)), float(s.pop("level", 0.95))
        self.deadline, self.step = int(s.pop("D", 0)), int(s.pop("step", 2))
        if self.horizon < 1 or self.futures < 1 or self.shortlist < 1 or self.reward not in (0, 1, 2):
            raise ValueError("rollout: H, S and L must be at least 1 and reward 0, 1 or 2")
        super().__init__(protocol, seed, s)

    def _horizon(self, trial_index: int) -> int:
        if self.deadline <= 0:
            return self.horizon
        due = self.deadline
        while due <= trial_index:
            due += self.step
        return due - trial_index

    def propose(self, comparison: Any, trial_index: int) -> Any:
        t0 = time.perf_counter()
        acq, _, _ = self._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation):
            return super().propose(comparison, trial_index)
        with torch.random.fork_rng():
            torch.manual_seed(trial_index)
            greedy, _ = self._optimize(acq, trial_index)
        names = comparison.model_names
        logp = comparison.log_probabilities()
        alive = [i for i in range(len(names)) if float(logp[i].exp()) >= NEGLIGIBLE]
        gen = generator(self.seed, trial_index, 0x7A1)
        views = [comparison.posteriors[i].predictive(self.components, gen) for i in alive]
        log_pi = logp[alive] - torch.logsumexp(logp[alive], 0)
        rng, d, lik = self.rng(trial_index), self.space.d, acq.likelihood
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=int(rng.integers(2 ** 31)))
        points = torch.cat([greedy.reshape(1, d), sobol.draw(self.grid_points, dtype=torch.float64)])
        comps = [v(self.space.design_to_raw(points)) for v in views]
        log_w = [w - torch.logsumexp(w, 0) + log_pi[j] for j, (w, _, _) in enumerate(comps)]
        grid = lik.outcome_grid(torch.cat([m.reshape(-1) for _, m, _ in comps]),
                                torch.cat([lw.exp().unsqueeze(-1).expand_as(m).reshape(-1)
                                           for lw, (_, m, _) in zip(log_w, comps)]))
        probs = torch.cat([lik.outcome_probs(m, grid) for _, m, _ in comps]).to(torch.float32)  # (C, G, K)
        sizes = [m.shape[0] for _, m, _ in comps]
        starts = np.cumsum([0] + sizes).tolist()
        blocks = list(zip(starts[:-1], starts[1:]))
        n_comp, n_points, n_out = probs.shape
        tables, cdf = probs.reshape(n_comp, -1), probs.cumsum(-1)
        log_probs = torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))
        prior = torch.cat(log_w).to(torch.float32)
        with torch.no_grad():
            now = _discrimination_mi(prior.unsqueeze(0), blocks, tables, n_out)[0]
        cand = [0] + [g for g in torch.argsort(now, descending=True).tolist() if g != 0][: self.shortlist - 1]
        rest = [g for g in range(n_points) if g not in cand]
        if self.randoms and rest:
            cand += [rest[int(j)] for j in rng.choice(len(rest), min(self.randoms, len(rest)), replace=False)]
        horizon = self._horizon(trial_index)
        tg = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        truth = torch.multinomial(torch.softmax(prior, 0), self.futures, replacement=True, generator=tg)
        uniforms = torch.rand(self.futures, horizon, generator=tg)
        model_of = torch.tensor([next(j for j, (lo, hi) in enumerate(blocks) if lo <= int(t) < hi) for t in truth])
        n_cand, rows = len(cand), len(cand) * self.futures
        truth, model_of = truth.repeat(n_cand), model_of.repeat(n_cand)
        belief = prior.unsqueeze(0).repeat(rows, 1)
        at = torch.tensor(cand).repeat_interleave(self.futures)
        reached = torch.zeros(rows, dtype=torch.bool)
        with torch.no_grad():
            for h in range(horizon):
                if h > 0:
                    at = _discrimination_mi(belief, blocks, tables, n_out).argmax(1)
                u = uniforms[:, h].repeat(n_cand).unsqueeze(1)
                y = torch.searchsorted(cdf[truth, at].contiguous(), u).clamp(max=n_out - 1).squeeze(1)
                belief = belief + log_probs[:, at, y].T
                lz = torch.stack([torch.logsumexp(belief[:, lo:hi], 1) for lo, hi in blocks], 1)
                log_true = (lz - torch.logsumexp(lz, 1, keepdim=True))[torch.arange(rows), model_of]
                reached |= log_true >= math.log(self.level)
        score = {0: log_true, 1: reached.float(), 2: reached.float() + 0.1 * log_true}[self.reward]
        value = score.reshape(n_cand, self.futures).mean(1)
        best = int(torch.argmax(value))
        return self.finish(points[cand[best]].reshape(1, d),
                           f"rollout over {horizon} trials: {float(value[best]):.4f}", float(value[best]), t0,
                           strategy=self.name)


class SampledTruthGain(_OutcomeMI):
    """Expected increase of log P(m_k) when the response comes from hypothesis h_k, averaged over
    the draws (nats). `views`/`log_probs`: the models' predictives and probabilities; `draws`:
    (index of the hypothesis' model in `views`, the hypothesis' own predictive view)."""

    def __init__(self, views: Sequence[View], log_probs: torch.Tensor, draws: Sequence[tuple[int, View]],
                 space: Any, likelihood: Any) -> None:
        if not draws:
            raise ValueError("SampledTruthGain needs at least one draw")
        normalised = log_probs - torch.logsumexp(log_probs, 0)
        # the draws join the outcome grid with the weight of their share, so their counts are covered
        share = torch.full((len(draws),), -torch.log(torch.tensor(float(len(draws)))).item(), dtype=normalised.dtype)
        super().__init__(list(views) + [v for _, v in draws], space, likelihood, torch.cat([normalised, share]))
        self.n_models = len(views)
        self.log_probs = normalised
        self.draw_models = [int(j) for j, _ in draws]

    @concatenate_pending_points
    @t_batch_mode_transform()
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self._summed_over_q(X, self._gain)

    def _gain(self, ws: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        mixes = [_mix(w, p) for w, p in zip(ws, ps)]  # (b, K) each
        tiny = torch.finfo(mixes[0].dtype).tiny
        pm = torch.stack(mixes[: self.n_models])
        pi = self.log_probs.exp().to(pm.dtype)
        log_total = torch.log(torch.einsum("m,mbk->bk", pi, pm).clamp_min(tiny))
        log_pm = torch.log(pm.clamp_min(tiny))
        gains = [(pt * (log_pm[j] - log_total)).sum(-1)
                 for j, pt in zip(self.draw_models, mixes[self.n_models:])]
        return torch.stack(gains).mean(0).to(torch.float64)


def draw_hypotheses(views: Sequence[View], log_probs: torch.Tensor, k: int,
                    gen: torch.Generator) -> list[tuple[int, View]]:
    """`k` hypotheses from the posterior: a model index by probability, then one particle by weight
    (a view without particles, the GP's, is kept whole). Deterministic given `gen`."""
    p = (log_probs - torch.logsumexp(log_probs, 0)).exp()
    out: list[tuple[int, View]] = []
    for j in torch.multinomial(p, k, replacement=True, generator=gen).tolist():
        view = views[j]
        if isinstance(view, ParticleView):
            w = (view.logw - torch.logsumexp(view.logw, 0)).exp()
            i = int(torch.multinomial(w, 1, generator=gen))
            theta = {name: v[i:i + 1] for name, v in view.theta.items()}
            view = ParticleView(view.candidate, theta, torch.zeros(1, dtype=view.logw.dtype))
        out.append((j, view))
    return out


class PosteriorSamplingDesign(InformationDesign):
    """Benchmark experiment, not a product design: posterior sampling over the truth. Each
    discriminating decision draws `draws` hypotheses (a model by P(m), then one of its particles by
    weight; a GP draw keeps the GP's predictive), seeded by (seed, trial), and presents the
    stimulus that maximises `SampledTruthGain`, the oracle's expected gain of log P(drawn model)
    averaged over the draws (one draw: the oracle's rule for a plausible neuron; many: I(M; y)).
    Plain MI once a model has P >= `until`; characterization as `mutual_information`."""

    name = "posterior_sampling"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None, mode: str = "auto") -> None:
        super().__init__(protocol, seed, settings, mode)
        self.draws = int(self.settings.get("draws", 1))
        if self.draws < 1:
            raise ValueError(f"design.settings.draws: must be at least 1, not {self.draws}")
        self.until = float(self.settings.get("until", 1.0))
        if not 0.0 < self.until <= 1.0:
            raise ValueError(f"design.settings.until: must be in (0, 1], not {self.until}")

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        acq, why, strategy = super()._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation):
            return acq, why, strategy
        logp = comparison.log_probabilities()
        if float(logp.exp().max()) >= self.until:
            return acq, why, strategy
        names = comparison.model_names
        alive = [i for i in range(len(names)) if float(logp[i].exp()) >= NEGLIGIBLE]
        draws = draw_hypotheses(acq.views, acq.log_probs, self.draws, generator(self.seed, trial_index, 0x75))
        gain = SampledTruthGain(acq.views, acq.log_probs, draws, self.space, acq.likelihood)
        drawn = ", ".join(names[alive[j]] for j, _ in draws)
        return (gain, f"posterior sampling ({why.split(':')[0]}; drawn: {drawn}): "
                      "max expected gain of log P(drawn model)", self.name)


class JointInformation(ModelDiscriminationMI):
    """I(M; y) + lam * I(theta; y | M): the discrimination MI plus `lam` times each model's parameter
    information weighted by its probability (lam = 1: the information about (model, parameters))."""

    def __init__(self, views: list[Any], log_probs: torch.Tensor, space: Any, likelihood: Any, lam: float) -> None:
        super().__init__(views, log_probs, space, likelihood)
        self.lam = float(lam)

    def _mi(self, ws: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        pi = self.log_probs.exp()
        info = sum(float(pi[m]) * ParameterInformation._info(w, p) for m, (w, p) in enumerate(zip(ws, ps)))
        return super()._mi(ws, ps) + self.lam * info


class JointDesign(InformationDesign):
    """Benchmark experiment, not a product design: discriminate by `JointInformation`, lam = `lam`
    x ((1 - max P(m)) / 0.6) ** `decay` while max P(m) < `until` (then plain MI)."""

    name = "joint"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.lam = float(s.pop("lam", 1.0))
        self.decay = float(s.pop("decay", 0.0))
        self.until = float(s.pop("until", 1.0))
        super().__init__(protocol, seed, s)

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        acq, why, strategy = super()._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation):
            return acq, why, strategy
        top = float(comparison.log_probabilities().exp().max())
        if top >= self.until:
            return acq, why, strategy
        lam = self.lam * ((1 - top) / 0.6) ** self.decay  # 0.6: 1 - the prior's largest P(m)
        return (JointInformation(acq.views, acq.log_probs, self.space, acq.likelihood, lam),
                f"joint information, lam {lam:.3f}", self.name)


class LocateInformation(ModelDiscriminationMI):
    """I(M; y) + lam * I(pref bin; y | M): the discrimination MI plus what the trial says about where
    the neuron responds. `views` are the models' particles split by preferred-orientation bin,
    `groups[i]` the model of view i; over the split views the MI is I((M, bin); y), and the chain
    rule gives I(pref bin; y | M) as its excess over I(M; y)."""

    def __init__(self, views: list[Any], log_probs: torch.Tensor, space: Any, likelihood: Any,
                 groups: Sequence[int], lam: float) -> None:
        super().__init__(views, log_probs, space, likelihood)
        self.groups, self.lam = list(groups), float(lam)

    def _mi(self, ws: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        joint = super()._mi(ws, ps)
        mixes = torch.stack([_mix(w, p) for w, p in zip(ws, ps)])  # (V, b, K)
        pi = self.log_probs.exp().to(mixes.dtype)
        mass, pm = [], []
        for m in sorted(set(self.groups)):
            idx = [i for i, g in enumerate(self.groups) if g == m]
            mass.append(pi[idx].sum())
            pm.append((pi[idx, None, None] * mixes[idx]).sum(0) / mass[-1])
        models = _model_information(torch.stack(mass), torch.stack(pm)).to(torch.float64)
        return models + self.lam * (joint - models)


class LocateDesign(InformationDesign):
    """Benchmark experiment, not a product design: discriminate by `LocateInformation` (`bins`
    preferred-orientation bins, weight `lam`) while max P(m) < `until`, else as `mutual_information`."""

    name = "locate"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.lam, self.bins = float(s.pop("lam", 1.0)), int(s.pop("bins", 12))
        self.until = float(s.pop("until", 1.0))
        super().__init__(protocol, seed, s)

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        acq, why, strategy = super()._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation) or float(acq.log_probs.exp().max()) >= self.until:
            return acq, why, strategy
        views: list[Any] = []
        log_probs: list[torch.Tensor] = []
        groups: list[int] = []
        for m, view in enumerate(acq.views):
            if not (isinstance(view, ParticleView) and "pref" in view.theta):
                views.append(view), log_probs.append(acq.log_probs[m]), groups.append(m)
                continue
            bin_of = torch.floor(torch.remainder(view.theta["pref"], 180.0) / (180.0 / self.bins)).long()
            logw = view.logw - torch.logsumexp(view.logw, 0)
            for k in torch.unique(bin_of).tolist():
                sel = bin_of == k
                views.append(ParticleView(view.candidate, {n: t[sel] for n, t in view.theta.items()}, logw[sel]))
                log_probs.append(acq.log_probs[m] + torch.logsumexp(logw[sel], 0))
                groups.append(m)
        return (LocateInformation(views, torch.stack(log_probs), self.space, acq.likelihood, groups, self.lam),
                f"{why} + {self.lam:g} I(pref bin; y | M)", self.name)


class DecisionUtility(ModelDiscriminationMI):
    """Expected value of a utility of the next model posterior instead of its entropy: "maxp"
    E_y[max_m P(m | y)] - max_m P(m), "brier" E_y[sum_m P(m | y)^2] - sum_m P(m)^2, "cross"
    P(max_m P(m | y) >= `level`), "logodds" E_y[max_m log-odds of P(m | y)] - that of now, "doubt"
    E_y[-log(1 - max_m P(m | y))] - that of now, "meanlogodds" E_y[sum_m P(m | y) log-odds P(m | y)],
    "cross_logodds" cross + 0.1 logodds (the log-odds break cross's ties far from the level)."""

    def __init__(self, views: list[Any], log_probs: torch.Tensor, space: Any, likelihood: Any, kind: str,
                 level: float = 0.95) -> None:
        super().__init__(views, log_probs, space, likelihood)
        self.kind, self.level = kind, level

    def _mi(self, ws: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        pm = torch.stack([_mix(w, p) for w, p in zip(ws, ps)]).to(torch.float64)  # (M, b, K)
        pi = self.log_probs.exp().to(pm.dtype)
        joint = pi[:, None, None] * pm  # P(m) p_m(y)
        py = joint.sum(0)  # (b, K)
        post = joint / py.clamp_min(1e-300)
        if self.kind == "maxp":
            return (py * post.max(0).values).sum(-1) - float(pi.max())
        if self.kind == "brier":
            return (py * (post ** 2).sum(0)).sum(-1) - float((pi ** 2).sum())
        if self.kind == "cross":
            return (py * (post.max(0).values >= self.level)).sum(-1)
        top = post.max(0).values.clamp(1e-12, 1 - 1e-12)
        now = float(pi.max())
        if self.kind == "doubt":
            return -(py * torch.log1p(-top)).sum(-1) + math.log1p(-now)
        if self.kind == "meanlogodds":
            q = post.clamp(1e-12, 1 - 1e-12)
            return (py * (post * torch.log(q / (1 - q))).sum(0)).sum(-1)
        logodds = (py * torch.log(top / (1 - top))).sum(-1) - math.log(now / (1 - now))
        if self.kind == "cross_logodds":
            return (py * (post.max(0).values >= self.level)).sum(-1) + 0.1 * logodds
        return logodds


class UtilityDesign(InformationDesign):
    """Benchmark experiment, not a product design: discriminate by `DecisionUtility` (`kind`: an index
    into KINDS), characterize as `mutual_information`."""

    name = "utility"
    KINDS = ("maxp", "brier", "cross", "logodds", "doubt", "cross_logodds", "meanlogodds")

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.kind = self.KINDS[int(s.pop("kind", 0))]
        self.level = float(s.pop("level", 0.95))
        super().__init__(protocol, seed, s)

    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        acq, why, strategy = super()._acquisition(comparison, trial_index)
        if isinstance(acq, ParameterInformation):
            return acq, why, strategy
        return (DecisionUtility(acq.views, acq.log_probs, self.space, acq.likelihood, self.kind, self.level),
                f"expected {self.kind}", self.name)


BENCHMARK_DESIGNS: dict[str, Any] = {"posterior_sampling": PosteriorSamplingDesign, "joint": JointDesign,
                                     "utility": UtilityDesign, "rollout": RolloutDesign,
                                     "locate": LocateDesign}


def design_for(protocol: Any, seed: int, truth: Any, design: str) -> Any:
    """A strategy by name, or one of the benchmark's references: "oracle" (knows the neuron),
    "model_oracle" (knows only which model is true: the oracle's gain with the response drawn from
    the true model's posterior predictive; the MI design is this averaged over the models),
    "pref_oracle" (MI told the preferred orientation, `PrefOracleDesign`) and "lookahead"
    (`LookaheadDesign`)."""
    if design == "oracle":
        return OracleDesign(protocol, seed, truth)
    if design == "model_oracle":
        return OracleDesign(protocol, seed, truth, knows_parameters=False)
    if design == "lookahead":
        return LookaheadDesign(protocol, seed)
    if design == "pref_oracle":
        return PrefOracleDesign(protocol, seed, truth)
    name, _, rest = design.partition("/")
    if name in BENCHMARK_DESIGNS:  # e.g. "posterior_sampling/draws=4/until=0.9"
        settings = dict(protocol.design.settings or {})
        for item in filter(None, rest.split("/")):
            key, _, value = item.partition("=")
            settings[key] = float(value) if "." in value else int(value)
        return BENCHMARK_DESIGNS[name](protocol, seed, settings)
    return make_design(protocol, seed, design)


def oracle_gap(text: str, subjects: int, seed0: int, max_states: int = 15) -> dict:
    """Per-trial evidence for the truth at the states of MI sessions (until P(true) >= .95, at most
    `max_states` trials): the expected increase of log P(true) (`OracleGain`, 512 components per
    model) at the stimulus the MI design chose, the best over a 40 x 20 grid (the oracle's choice)
    and the grid's mean (a random stimulus)."""
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    u = torch.cartesian_prod(torch.linspace(0, 1, 40, dtype=torch.float64), torch.linspace(0, 1, 20, dtype=torch.float64))
    rows: list[tuple[float, float, float]] = []
    first: list[tuple[float, float, float]] = []  # trial 1: the prior state
    for s in range(subjects):
        seed = seed0 + s
        truth = build_truth(protocol, truth_for(protocol, seed))
        comparison = ModelComparison.from_protocol(protocol, seed)
        strategy = make_design(protocol, seed)
        oracle = OracleDesign(protocol, seed, truth)
        for i in range(max_states):
            acq, _, _ = oracle._acquisition(comparison, i)
            with torch.no_grad():
                grid_gain = torch.cat([acq(u[k:k + 100].unsqueeze(1)) for k in range(0, u.shape[0], 100)])
                d = strategy.propose(comparison, i)
                x = comparison.space.raw_to_unit(comparison.space.stimulus_to_raw(d.stimulus).reshape(1, -1))
                chosen = float(acq(x.unsqueeze(1))[0])
            rows.append((float(grid_gain.max()), chosen, float(grid_gain.mean())))
            if i == 0:
                first.append(rows[-1])
            comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
            if comparison.probabilities()[truth.model_name] >= 0.95:
                break
        print(f"# oracle_gap subject {s}: {len(rows)} states", file=sys.stderr, flush=True)
    def stats(rs: list[tuple[float, float, float]]) -> dict:
        best, mi, rnd = (np.array(c) for c in zip(*rs))
        return {"states": len(rs),
                "gain_nats_mean": {"oracle_best": round(float(best.mean()), 4), "mi_choice": round(float(mi.mean()), 4),
                                   "random_stimulus": round(float(rnd.mean()), 4)},
                "gain_nats_median": {"oracle_best": round(float(np.median(best)), 4),
                                     "mi_choice": round(float(np.median(mi)), 4),
                                     "random_stimulus": round(float(np.median(rnd)), 4)},
                "mi_choice_over_random_ratio_of_means": round(float(mi.mean() / rnd.mean()), 2),
                "oracle_over_mi_choice_ratio_of_means": round(float(best.mean() / mi.mean()), 2)}

    return {"subjects": subjects, "all_states": stats(rows), "first_trial": stats(first)}


def evidence_check(text: str, subjects: int, seed0: int, particles: int = 64000, max_trials: int = 20) -> dict:
    """Whether the evidence estimates cost MI trials: MI sessions (until P(true) >= .99, at most
    `max_trials`), each parametric model's log evidence recomputed on the same trials by SMC with
    `particles` particles (another seed), and the first trials with P(true) >= .95 under the
    product's evidence, under the dense one, and with the GP left out of the comparison."""
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    diffs: dict[str, list[float]] = {}
    firsts: dict[str, list[int]] = {"product": [], "dense_smc": [], "without_gp": []}

    def first_crossing(evidence: np.ndarray, log_prior: np.ndarray, true_index: int) -> int:
        for t, ev in enumerate(evidence):
            lp = log_prior + ev
            if math.exp(lp[true_index] - np.logaddexp.reduce(lp)) >= 0.95:
                return t + 1
        return max_trials + 1

    for s in range(subjects):
        seed = seed0 + s
        truth = build_truth(protocol, truth_for(protocol, seed))
        comparison = ModelComparison.from_protocol(protocol, seed)
        strategy = make_design(protocol, seed)
        trace = []
        for i in range(max_trials):
            d = strategy.propose(comparison, i)
            comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
            trace.append([p.log_evidence for p in comparison.posteriors])
            if comparison.probabilities()[truth.model_name] >= 0.99:
                break
        product = np.array(trace)
        parametric = [j for j, c in enumerate(comparison.candidates) if not c.is_gp]
        dense_posts = [SMCPosterior(comparison.candidates[j], seed + 7, n_particles=particles) for j in parametric]
        dense = product.copy()
        for t, (x, y) in enumerate(comparison.history):
            for j, post in zip(parametric, dense_posts):
                post.update(x, y)
                dense[t, j] = post.log_evidence
        for j in parametric:
            diffs.setdefault(comparison.model_names[j], []).extend((product[:, j] - dense[:, j]).tolist())
        log_prior = comparison.log_prior.numpy()
        true_index = comparison.model_names.index(truth.model_name)
        firsts["product"].append(first_crossing(product, log_prior, true_index))
        firsts["dense_smc"].append(first_crossing(dense, log_prior, true_index))
        firsts["without_gp"].append(first_crossing(product[:, parametric], log_prior[parametric],
                                                   parametric.index(true_index)))
        print(f"# evidence subject {s}: {[v[-1] for v in firsts.values()]}", file=sys.stderr, flush=True)
    return {"subjects": subjects, "particles": particles, "max_trials": max_trials,
            "log_evidence_product_minus_dense_per_trial": {
                name: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v)), 4), "trials": len(v)}
                for name, v in diffs.items()},
            "median_first_trial_to_0.95": {k: float(np.median(v)) for k, v in firsts.items()},
            "subjects_whose_first_crossing_moved": {
                k: sum(a != b for a, b in zip(firsts["product"], v)) for k, v in firsts.items() if k != "product"},
            "first_trial_to_0.95": firsts}


CRITERIA = (0.95, 0.99)


def trials_to(protocol: Any, truth_spec: str, design: str, seed: int, cap: int) -> tuple[dict[str, int | None], list[float]]:
    """First trials at which P(true) reaches each of CRITERIA (None: not within `cap`), and the
    decision times (ms). `design` is a strategy name, "oracle" or "model_oracle" (`design_for`)."""
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    strategy = design_for(protocol, seed, truth, design)
    first: dict[str, int | None] = {str(c): None for c in CRITERIA}
    leader: dict[str, str | None] = {str(c): None for c in CRITERIA}  # the first model to cross c
    times = []
    for i in range(cap):
        t0 = time.perf_counter()
        d = strategy.propose(comparison, i)
        times.append((time.perf_counter() - t0) * 1000)
        comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
        probs = comparison.probabilities()
        p = probs[truth.model_name]
        name, top = max(probs.items(), key=lambda kv: kv[1])
        for c in CRITERIA:
            if first[str(c)] is None and p >= c:
                first[str(c)] = i + 1
            if leader[str(c)] is None and top >= c:
                leader[str(c)] = name
        if first[str(CRITERIA[-1])] is not None:
            break
    first.update({f"wrong_{c}": leader[str(c)] not in (None, truth.model_name) for c in CRITERIA})
    return first, times


def _trials_job(job: tuple[str, str, int, int, int]) -> tuple[str, int, dict[str, int | None], list[float], float, str]:
    """One (design, subject) session in a worker process: first crossings, decision ms, CPU s, truth."""
    text, label, seed, cap, threads = job
    torch.set_num_threads(threads)
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    spec = truth_for(protocol, seed)
    c0 = time.process_time()
    first, times = trials_to(protocol, spec, label, seed, cap)
    return label, seed, first, times, time.process_time() - c0, spec


def median_ratio_interval(baseline: Sequence[float], design: Sequence[float], resamples: int = 4000,
                          seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of median(baseline) / median(design), resampling subjects
    (paired: both designs met the same neurons). How far a ratio of medians over a few dozen
    subjects can be trusted: random's median moves by a third between two sets of 48."""
    r, d = np.asarray(baseline, dtype=float), np.asarray(design, dtype=float)
    idx = np.random.default_rng(seed).integers(0, r.size, size=(resamples, r.size))
    ratios = np.median(r[idx], axis=1) / np.median(d[idx], axis=1)
    return [round(float(v), 2) for v in np.percentile(ratios, [2.5, 97.5])]


def trials(protocol_text: str, designs: list[str], caps: dict[str, int], subjects: int, seed0: int,
           threads: int, jobs: int) -> dict:
    """Trials to P(true) >= .95 / .99 per design over the same subjects and response seeds, with
    medians (never reached = cap + 1), means, and paired per-subject ratios against random."""
    work = [(protocol_text, label, seed0 + s, caps[label], threads) for label in designs for s in range(subjects)]
    results: dict[tuple[str, int], tuple] = {}
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for r in pool.imap_unordered(_trials_job, work):
                results[(r[0], r[1])] = r
                print(f"# {r[0]} subject {r[1] - seed0}: {r[2]}  ({r[5]})", file=sys.stderr, flush=True)
    else:
        protocol = parse_protocol_text(protocol_text, "<orientation benchmark>").protocol
        for _, label, seed, cap, _ in work:
            spec = truth_for(protocol, seed)
            c0 = time.process_time()
            first, times = trials_to(protocol, spec, label, seed, cap)
            results[(label, seed)] = (label, seed, first, times, time.process_time() - c0, spec)
            print(f"# {label} subject {seed - seed0}: {first}  ({spec})", file=sys.stderr, flush=True)
    res: dict = {"subjects": subjects}
    for label in designs:
        rows = [results[(label, seed0 + s)] for s in range(subjects)]
        cap = caps[label]
        entry: dict = {"cap": cap}
        for c in map(str, CRITERIA):
            entry[f"wrong_first_crossing_{c}"] = sum(bool(r[2].get(f"wrong_{c}")) for r in rows)
            vals = [r[2][c] for r in rows]
            entry[f"median_trials_to_{c}"] = censored_median(vals, cap)
            entry[f"mean_trials_to_{c}"] = round(statistics.mean(v if v is not None else cap + 1 for v in vals), 2)
            entry[f"never_reached_{c}"] = sum(v is None for v in vals)
            entry[f"trials_{c}"] = vals
        entry["trials"] = entry["trials_0.95"]
        entry["never_reached"] = entry["never_reached_0.95"]
        dec = [t for r in rows for t in r[3]]
        entry.update({"decision_ms_p50": round(percentile(dec, 50), 2), "decision_ms_p95": round(percentile(dec, 95), 2),
                      "cpu_s": round(sum(r[4] for r in rows), 1)})
        res[label] = entry
    if "random" in designs:
        for label in (d for d in designs if d != "random"):
            tag = "mi" if label == "mutual_information" else label
            for c in map(str, CRITERIA):
                r_vals = [v if v is not None else caps["random"] + 1 for v in res["random"][f"trials_{c}"]]
                d_vals = [v if v is not None else caps[label] + 1 for v in res[label][f"trials_{c}"]]
                sfx = "" if c == "0.95" else f"_{c}"
                res[f"random_over_{tag}_median_ratio{sfx}"] = round(statistics.median(r_vals) / statistics.median(d_vals), 2)
                res[f"random_over_{tag}_paired_median_ratio{sfx}"] = round(statistics.median(
                    [r / d for r, d in zip(r_vals, d_vals)]), 2)
                res[f"random_over_{tag}_mean_ratio{sfx}"] = round(statistics.mean(r_vals) / statistics.mean(d_vals), 2)
                res[f"random_over_{tag}_median_ratio_ci95{sfx}"] = median_ratio_interval(r_vals, d_vals)
    return res


@contextlib.contextmanager
def all_models_in_mixture() -> Iterator[None]:
    """The discriminating design with every model in its mixture (its NEGLIGIBLE floor at 0): the
    cost of a 3-model decision at states where one model has all but won."""
    floor = information.NEGLIGIBLE
    information.NEGLIGIBLE = 0.0
    try:
        yield
    finally:
        information.NEGLIGIBLE = floor


def timing_session(protocol, truth_spec: str, seed: int, checkpoints: list[int], repeats: int) -> dict[str, dict]:
    """Run one long MI session; at each checkpoint time `repeats` proposals at that posterior state."""
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    strategy = make_design(protocol, seed)
    discriminate = make_design(protocol, seed)  # the protocol's settings, always discriminating
    discriminate.mode = "discriminate"
    out: dict[str, dict] = {}
    update_ms: list[float] = []
    for i in range(max(checkpoints)):
        d = strategy.propose(comparison, i)
        y = truth.sample(d.stimulus, np.random.default_rng([seed, i]))
        t1 = time.perf_counter()
        comparison.update(d.stimulus, y)
        update_ms.append((time.perf_counter() - t1) * 1000)
        n = i + 1
        if n in checkpoints:
            ts, cs = [], []
            for r in range(repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                dd = strategy.propose(comparison, n + r * 7919)
                ts.append((time.perf_counter() - t0) * 1000)
                cs.append((time.thread_time() - c0) * 1000)
            dts, dcs = [], []
            for r in range(repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                discriminate.propose(comparison, n + r * 7919)
                dts.append((time.perf_counter() - t0) * 1000)
                dcs.append((time.thread_time() - c0) * 1000)
            # every model in the mixture, however improbable (the design leaves out P < NEGLIGIBLE)
            ats, acs = [], []
            with all_models_in_mixture():
                for r in range(repeats):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    discriminate.propose(comparison, n + r * 7919)
                    ats.append((time.perf_counter() - t0) * 1000)
                    acs.append((time.thread_time() - c0) * 1000)
            probs = comparison.probabilities()
            out[str(n)] = {"decision_ms_p50": round(percentile(ts, 50), 2), "decision_ms_p95": round(percentile(ts, 95), 2),
                           "decision_cpu_ms_p50": round(percentile(cs, 50), 2),
                           "decision_cpu_ms_p95": round(percentile(cs, 95), 2),
                           "strategy": dd.strategy,
                           "discriminate_ms_p50": round(percentile(dts, 50), 2), "discriminate_ms_p95": round(percentile(dts, 95), 2),
                           "discriminate_cpu_ms_p50": round(percentile(dcs, 50), 2),
                           "discriminate_cpu_ms_p95": round(percentile(dcs, 95), 2),
                           "discriminate_models": [k for k, v in probs.items() if v >= information.NEGLIGIBLE],
                           "all_models_ms_p50": round(percentile(ats, 50), 2), "all_models_ms_p95": round(percentile(ats, 95), 2),
                           "all_models_cpu_ms_p50": round(percentile(acs, 50), 2),
                           "all_models_cpu_ms_p95": round(percentile(acs, 95), 2),
                           "update_ms_last10_p50": round(percentile(update_ms[-10:], 50), 2),
                           "probabilities": {k: float(f"{v:.4g}") for k, v in probs.items()}}
            print(f"# timing at {n}: {out[str(n)]}", file=sys.stderr, flush=True)
    return out


def gp_update_cost(protocol, truth_spec: str, seed: int, checkpoints: list[int], window: int = 10) -> dict[str, dict]:
    """CPU time (process) of the GP posterior's update alone, median of the `window` updates ending at
    each checkpoint, in a session with random stimuli (log-uniform contrast), with the live
    hyperparameter points and the GP's log evidence (it must not depend on the code version)."""
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    gp = comparison.posterior("gp")
    rng = np.random.default_rng([seed, 5])
    cpu: list[float] = []
    out: dict[str, dict] = {}
    for i in range(max(checkpoints)):
        stim = {"orientation": float(rng.uniform(0, 180)), "contrast": float(math.exp(rng.uniform(math.log(0.02), 0)))}
        y = truth.sample(stim, np.random.default_rng([seed, i]))
        x = comparison.space.stimulus_to_raw(stim)
        c0 = time.process_time()
        gp.update(x, y)
        cpu.append((time.process_time() - c0) * 1000)
        if i + 1 in checkpoints:
            out[str(i + 1)] = {"update_cpu_ms_p50": round(percentile(cpu[-window:], 50), 2),
                               "update_cpu_ms_max": round(max(cpu[-window:]), 2),
                               "live_points": gp.summary()["hyperparameter_points"],
                               "log_evidence": round(float(gp.log_evidence), 6)}
            print(f"# gp update at {i + 1}: {out[str(i + 1)]}", file=sys.stderr, flush=True)
    return out


def run_baseline(tree: str, part: str, args: argparse.Namespace) -> dict:
    """One part of this benchmark run with `orchestrator` imported from another checkout."""
    parts = {"timing", "gp_update", "trials", "regret", "oracle_gap", "evidence", "calibration"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--skip", ",".join(sorted(parts - {part})),
           "--timing-trials", str(args.timing_trials), "--repeats", str(args.repeats), "--seed", str(args.seed),
           "--threads", str(args.threads), "--gp-trials", str(args.gp_trials)]
    if args.design_settings:
        cmd += ["--design-settings", args.design_settings]
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    print(f"# baseline {part} from {tree}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout)


def cpu_ratios(new: dict, base: dict, keys: tuple[str, ...]) -> dict:
    """baseline / this tree, per checkpoint and CPU statistic (> 1: this tree is faster)."""
    return {n: {k: round(base[n][k] / new[n][k], 2) for k in keys if new[n].get(k) and base.get(n, {}).get(k)}
            for n in new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--cap-mi", type=int, default=100)
    ap.add_argument("--cap-random", type=int, default=300)
    ap.add_argument("--timing-trials", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--designs", default="mutual_information,random,oracle",
                    help="comma list of the trials part's designs (strategy names, or oracle: the benchmark's "
                         "reference that knows the truth)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the trials part (one session each)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: trials,timing,regret,oracle_gap,evidence,calibration,gp_update")
    ap.add_argument("--calibration-sessions", type=int, default=12, help="sessions per truth model and treatment")
    ap.add_argument("--calibration-cap", type=int, default=60)
    ap.add_argument("--hyper", default="marginal,type2", help="GP hyperparameter treatments to calibrate")
    ap.add_argument("--regret-subjects", type=int, default=8)
    ap.add_argument("--gap-subjects", type=int, default=0, help="MI sessions of the oracle_gap part (0: skip it)")
    ap.add_argument("--evidence-subjects", type=int, default=0,
                    help="MI sessions of the evidence part, their evidence recomputed densely (0: skip it)")
    ap.add_argument("--evidence-particles", type=int, default=64000, help="particles per model of the dense evidence")
    ap.add_argument("--regret-configs", default="|{refine_rounds: 3}|{optimizer: lbfgs, max_components: 512}",
                    help="'|'-separated design.settings flow mappings compared in the regret part (empty = defaults)")
    ap.add_argument("--design-settings", default="", help="YAML flow mapping merged into design.settings")
    ap.add_argument("--gp-trials", type=int, default=500, help="length of the gp_update part's session")
    ap.add_argument("--baseline-tree", default="", help="checkout whose orchestrator the timing and gp_update parts "
                                                        "are also run with, in the same run")
    args = ap.parse_args()
    load0 = os.getloadavg()
    torch.set_num_threads(args.threads)
    text = ORIENTATION_YAML
    if args.design_settings:
        text = text.replace("  characterize_threshold: 0.99", f"  characterize_threshold: 0.99\n  settings: {args.design_settings}")
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    print(f"# design settings: {protocol.design.settings}", file=sys.stderr)
    out: dict = {"benchmark": "orientation-contrast", "models": [m.name for m in protocol.models],
                 "design_settings": dict(protocol.design.settings),
                 "criterion": "first trial with P(true) >= 0.95; never reached counts as cap + 1"}
    skip = set(filter(None, args.skip.split(",")))
    if "trials" not in skip:
        designs = [d for d in args.designs.split(",") if d]
        caps = {d: args.cap_random if d == "random" else args.cap_mi for d in designs}
        t0 = time.time()
        out["trials_to_0.95"] = trials(text, designs, caps, args.subjects, args.seed, args.threads, args.jobs)
        out["trials_to_0.95"]["wall_s"] = round(time.time() - t0, 1)
        out["trials_to_0.95"]["loadavg_at_start"] = [round(x, 2) for x in load0]
    baseline: dict = {}
    if "timing" not in skip:
        cps = [c for c in (10, 100, 500) if c <= args.timing_trials]
        out["decision_time"] = timing_session(protocol, truth_for(protocol, args.seed), args.seed, cps, args.repeats)
        if args.baseline_tree:
            baseline["decision_time"] = run_baseline(args.baseline_tree, "timing", args)["decision_time"]
            out["decision_time_baseline_over_this"] = cpu_ratios(
                out["decision_time"], baseline["decision_time"],
                ("decision_cpu_ms_p50", "decision_cpu_ms_p95", "discriminate_cpu_ms_p50", "discriminate_cpu_ms_p95",
                 "all_models_cpu_ms_p50", "all_models_cpu_ms_p95"))
    if "gp_update" not in skip:
        cps = [c for c in (10, 100, 300, 500) if c <= args.gp_trials]
        out["gp_update"] = gp_update_cost(protocol, truth_for(protocol, args.seed), args.seed, cps)
        if args.baseline_tree:
            baseline["gp_update"] = run_baseline(args.baseline_tree, "gp_update", args)["gp_update"]
            out["gp_update_baseline_over_this"] = cpu_ratios(out["gp_update"], baseline["gp_update"],
                                                             ("update_cpu_ms_p50",))
    if baseline:
        out["baseline"] = {"tree": args.baseline_tree, **baseline}
    if "regret" not in skip:
        out["regret"] = regret(ORIENTATION_YAML, args.regret_configs.split("|"), args.regret_subjects, args.seed)
    if "oracle_gap" not in skip and args.gap_subjects > 0:
        out["oracle_gap"] = oracle_gap(text, args.gap_subjects, args.seed)
    if "evidence" not in skip and args.evidence_subjects > 0:
        out["evidence"] = evidence_check(text, args.evidence_subjects, args.seed, args.evidence_particles)
    if "calibration" not in skip:
        out["calibration"] = {h: calibration(text, h, args.calibration_sessions, args.seed, args.calibration_cap)
                              for h in filter(None, args.hyper.split(","))}
    out["environment"] = environment()
    print(dump(out))


if __name__ == "__main__":
    main()
