"""Is this process one of several (so `jax.distributed.initialize()` must run first)?

Only real values count: a variable that is merely set, or set to text, is not a cluster. With
`jax[tpu]` installed on a machine without TPUs, libtpu leaves its warning text in
`TPU_WORKER_HOSTNAMES` (a sentence, commas included); a batch job on one Slurm task still has
`SLURM_JOB_ID`. Neither may start a multi-host initialisation that then fails noisily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# A host name or IPv4 address (RFC 1123 labels), or a bracket-free IPv6 address.
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$|^[0-9A-Fa-f:]+:[0-9A-Fa-f:]*$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")  # host[:port], no spaces


def _count(value: str | None) -> int:
    try:
        return int(value.strip()) if value is not None else 0
    except ValueError:
        return 0


def tpu_hosts(value: str | None) -> list[str] | None:
    """The host list of `TPU_WORKER_HOSTNAMES`, or None when it is not a list of hosts."""
    if not value:
        return None
    hosts = [h.strip() for h in value.split(",")]
    if all(_HOST.match(h) for h in hosts):
        return hosts
    return None


def multihost_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Which variable shows that several processes take part, or None for a single process."""
    env = os.environ if environ is None else environ
    hosts = tpu_hosts(env.get("TPU_WORKER_HOSTNAMES"))
    if hosts is not None and len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
    if _ADDRESS.match(env.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip()):
        return "MEGASCALE_COORDINATOR_ADDRESS is set"
    for key in ("SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE"):
        if _count(env.get(key)) > 1:
            return f"{key}={env[key].strip()}"
    return None
