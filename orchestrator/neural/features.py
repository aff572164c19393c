"""Feature models: a protocol's model entry -> a torch module mapping images to features.

Three sources, as the protocol says: ``module: pkg.mod:Factory`` (the lab's own network; called as
``Factory(**settings)``, its weights loaded from ``weights:`` with the file's sha256 recorded), a
built-in (``builtin: gabor_energy``), or a ``cloop.models`` entry point named by ``builtin``.
The network is used as given (no layer is rewritten): images (B, C, H, W) in 0..1 in, any tensor
(B, ...) out, flattened to (B, features). Features are standardised with the pool's mean and SD so
one readout prior means the same thing for every model, and a constant feature (the bias) is added.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from orchestrator.neural.gabor import GaborEnergy

BUILTINS: dict[str, Callable[..., nn.Module]] = {"gabor_energy": GaborEnergy}
ENTRY_POINT_GROUP = "cloop.models"
MAX_FEATURES = 65_536


class FeatureSpecError(ValueError):
    """A model entry cannot be built: (field path, message) pairs, one line each."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _factory(spec: Any, path: str) -> Callable[..., nn.Module]:
    if spec.module is not None:
        mod_name, _, attr = spec.module.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the entry's fault
            raise FeatureSpecError([(f"{path}.module", f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}")])
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise FeatureSpecError([(f"{path}.module", f"{mod_name!r} has no callable {attr!r}")])
        return factory
    name = spec.builtin
    if name in BUILTINS:
        return BUILTINS[name]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # noqa: BLE001
                raise FeatureSpecError([(f"{path}.builtin", f"entry point {name!r} does not load: {exc}")])
    known = sorted(BUILTINS) + sorted(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    raise FeatureSpecError([(f"{path}.builtin", f"unknown feature model {name!r}; known: {', '.join(known)}")])


def build_network(spec: Any, path: str, channels: int) -> tuple[nn.Module, str | None]:
    """Instantiate the entry's network (with its weights); return it and the weights' sha256."""
    factory = _factory(spec, path)
    settings = {k: v for k, v in (spec.settings or {}).items()}
    if factory is GaborEnergy:
        settings.setdefault("channels", channels)
    try:
        net = factory(**settings)
    except Exception as exc:  # noqa: BLE001
        raise FeatureSpecError([(f"{path}.settings", f"{type(exc).__name__}: {exc}")])
    if not isinstance(net, nn.Module):
        raise FeatureSpecError([(f"{path}.{'module' if spec.module else 'builtin'}",
                                 f"the factory returned a {type(net).__name__}, not a torch.nn.Module")])
    sha = None
    if spec.weights is not None:
        wpath = Path(spec.weights)
        if not wpath.is_file():
            raise FeatureSpecError([(f"{path}.weights", f"{wpath}: no such file")])
        sha = file_sha256(wpath)
        try:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FeatureSpecError([(f"{path}.weights", f"{wpath} does not load into the network: {first}")])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, sha


@dataclass
class FeatureModel:
    """A network plus the standardisation fitted on the pool; `__call__` gives (B, d + 1) with bias."""

    name: str
    network: nn.Module
    center: torch.Tensor
    scale: torch.Tensor
    weights_sha256: str | None
    energy_range: tuple[float, float]  # per-image feature energy seen over the pool (min, max)
    pool_features: torch.Tensor | None = None  # standardised features of the pool (n, d), with bias

    @property
    def d(self) -> int:
        return int(self.center.shape[0]) + 1

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        out = self.network(images)
        return out.reshape(out.shape[0], -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        z = (self.raw(images).to(torch.float64) - self.center) / self.scale
        return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """Mean squared raw feature per image, relative to the pool's mean: the trust-region measure."""
        return (self.raw(images).to(torch.float64) ** 2).mean(dim=1) / self._energy_norm

    def __post_init__(self) -> None:
        self._energy_norm = float((self.center ** 2 + self.scale ** 2).mean())


def _probe(net: nn.Module, images: torch.Tensor, path: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = net(images)
    except Exception as exc:  # noqa: BLE001
        raise FeatureSpecError([(path, f"the network fails on a batch of images {list(images.shape)}: "
                                       f"{type(exc).__name__}: {exc}")])
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != images.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FeatureSpecError([(path, f"output {shape} is not (batch, features) for a batch of {images.shape[0]}")])
    flat = out.reshape(out.shape[0], -1)
    if flat.shape[1] > MAX_FEATURES:
        raise FeatureSpecError([(path, f"{flat.shape[1]} features; at most {MAX_FEATURES} are supported")])
    if not torch.isfinite(flat).all():
        raise FeatureSpecError([(path, "the network outputs non-finite features on pool images")])
    return flat


def fit_feature_model(spec: Any, path: str, pool_tensor: torch.Tensor, channels: int,
                      batch: int = 256) -> FeatureModel:
    """Build the entry's network and standardise its features on the pool (B, C, H, W)."""
    net, sha = build_network(spec, path, channels)
    where = f"{path}.{'module' if spec.module else 'builtin'}"
    _probe(net, pool_tensor[:2], where)
    with torch.no_grad():
        feats = torch.cat([_probe(net, pool_tensor[i:i + batch], where) for i in range(0, len(pool_tensor), batch)])
    feats = feats.to(torch.float64)
    center = feats.mean(0)
    scale = feats.std(0).clamp_min(1e-6 * float(feats.std(0).max().clamp_min(1e-12)))
    model = FeatureModel(spec.name, net, center, scale, sha, (0.0, 0.0))
    energy = (feats ** 2).mean(1) / model._energy_norm
    model.energy_range = (float(energy.min()), float(energy.max()))
    z = (feats - center) / scale
    model.pool_features = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    return model


def pool_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W[, C]) floats -> float32 (n, C, H, W), the networks' input."""
    arr = images[:, None] if images.ndim == 3 else np.moveaxis(images, -1, 1)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
