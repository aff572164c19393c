"""Register cloop sessions as a Prefect deployment, so a lab starts sessions on worker machines.

A deployment is the lab's standing order: "sessions of this protocol run on work pool P from code at
S". A Prefect worker on the rig-room PC (`prefect worker start --pool P`) picks up each run, starts
the flow from the source checkout, opens the rig socket there and writes to the lab's database.
Only process work pools are created here; a lab with Docker/Kubernetes creates its own pool and
passes its name.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from orchestrator import REPO_ROOT  # noqa: E402

ENTRYPOINT = "orchestrator/flows.py:lab_session_flow"


class DeployError(RuntimeError):
    """The deployment could not be registered (no Prefect server configured or reachable, bad pool)."""


def flow_name() -> str:
    """The Prefect flow name deployments belong to (`prefect deployment run FLOW/NAME`)."""
    from orchestrator.flows import LAB_FLOW_NAME

    return LAB_FLOW_NAME


def api_url() -> str:
    """The Prefect server this process talks to; refuse the ephemeral in-process server for deployments."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("PREFECT_API_URL is not set: point it at your Prefect server, e.g. "
                          "`export PREFECT_API_URL=http://prefect-host:4200/api` (see the README section 'Running a lab')")
    return str(url)


def ensure_pool(pool: str, pool_type: str = "process") -> bool:
    """Create the work pool if it does not exist; return True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
            return True


def deploy(name: str, pool: str, parameters: dict[str, Any], source: str | None = None) -> UUID:
    """Create or update deployment `cloop-lab-session/NAME` on `pool`; return its id.

    `source` is where workers load the code: a directory that exists on the worker machines
    (default: this checkout) or a git URL. `parameters` are the flow's defaults; `None` values are
    dropped so the flow's own defaults (e.g. $CLOOP_DB on the worker) apply.
    """
    if not name or "/" in name:
        raise DeployError(f"--name must be a non-empty name without '/', got {name!r}")
    url = api_url()
    try:
        ensure_pool(pool)
    except Exception as exc:  # noqa: BLE001 - network/HTTP errors become one clear line
        raise DeployError(f"cannot reach the Prefect server at {url} to check work pool {pool!r}: {exc}") from None
    from prefect import flow

    try:
        loaded = flow.from_source(source=source or str(REPO_ROOT), entrypoint=ENTRYPOINT)
        return loaded.deploy(
            name=name,
            work_pool_name=pool,
            parameters={k: v for k, v in parameters.items() if v is not None},
            build=False,
            push=False,
            description="cloop closed-loop experiment session (resume with -p resume=SESSION)",
            tags=["cloop"],
            print_next_steps=False,
            ignore_warnings=True,
        )
    except Exception as exc:  # noqa: BLE001
        raise DeployError(f"cannot register deployment {name!r} on {url}: {type(exc).__name__}: {exc}") from None
