"""Placeholder for the Gaussian-process candidate (filled in below the priority-1 core)."""
from __future__ import annotations

GP_HYPERPARAMETERS = ("lengthscale", "outputscale", "mean")
