"""Dask clusters described by workflow specs (``workflows/*.toml``).

A spec names the kind of cluster and its size:

* ``local``: process workers on this machine, sized to it by default; ``gpu_workers`` of them
  declare a ``GPU`` resource, so classification tasks go there while CPU workers read and detect;
* ``slurm``: a ``dask_jobqueue.SLURMCluster`` built from the spec's ``[slurm]`` table, passed as
  its exact keyword arguments, scaled to ``jobs`` jobs (``pip install wsi-pipeline[slurm]``).

``--scheduler tcp://HOST:PORT`` joins an existing cluster instead.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import data_path

DEFAULT_WORKFLOW = "local-cpu"
#: Seconds to wait for the scheduler of ``--scheduler``: one on the network answers in well under.
CONNECT_TIMEOUT_S = 5
#: Environment variables a local cluster's nannies set before they start a worker process.
PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"


@dataclass(frozen=True)
class Workflow:
    """A cluster spec.

    Attributes
    ----------
    name : str
    description : str
    kind : {"local", "slurm"}
    workers : int or None
        CPU process workers of a local cluster; None sizes it to the machine (one per core).
    threads_per_worker : int
    gpu_workers : int
        Local workers that declare ``resources={"GPU": 1}`` (one per GPU).
    memory_limit : str
        Per worker, as Dask reads it (``"auto"`` divides the machine's memory).
    device : str
        Where classification runs on workers: ``auto``, ``cpu`` or ``cuda``.
    slurm : dict
        Keyword arguments of ``dask_jobqueue.SLURMCluster``.
    jobs : int
        SLURM jobs to start.
    """

    name: str
    description: str = ""
    kind: str = "local"
    workers: int | None = None
    threads_per_worker: int = 1
    gpu_workers: int = 0
    memory_limit: str = "auto"
    device: str = "auto"
    slurm: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1


def load_workflow(name_or_path: str | os.PathLike[str]) -> Workflow:
    """Read a workflow spec by name (``workflows/<name>.toml``) or path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = data_path("workflows") / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in data_path("workflows").glob("*.toml")))
        raise InputError(path, f"no such workflow spec; shipped specs: {known}")
    try:
        spec = tomllib.loads(path.read_text())
        cluster = spec.get("cluster", {})
        workflow = Workflow(
            name=spec.get("name", path.stem),
            description=spec.get("description", ""),
            slurm=spec.get("slurm", {}),
            **cluster,
        )
    except (tomllib.TOMLDecodeError, TypeError) as error:
        raise InputError(path, f"not a valid workflow spec: {error}") from error
    if workflow.kind not in ("local", "slurm"):
        raise InputError(path, f"cluster kind must be 'local' or 'slurm', got {workflow.kind!r}")
    return workflow


def _local_cluster(workflow: Workflow, verbose: bool = False):
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    cpu_workers = workflow.workers or max(1, (os.cpu_count() or 1) // workflow.threads_per_worker)
    options = {"nthreads": workflow.threads_per_worker, "memory_limit": workflow.memory_limit}
    workers = {f"cpu-{i}": {"cls": Nanny, "options": options} for i in range(cpu_workers)}
    for i in range(workflow.gpu_workers):
        gpu_options = {**options, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}
        workers[f"gpu-{i}"] = {"cls": Nanny, "options": gpu_options}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    # Workers set up their logging when they import distributed, before any option reaches
    # them: only their environment at spawn can quiet their start-up and shut-down messages.
    # Here, nannies warn when they kill a worker slow to stop at the end: routine, so errors only.
    workers_level, own_level = ("INFO", "INFO") if verbose else ("WARNING", "ERROR")
    with dask.config.set({f"{PRE_SPAWN_ENVIRON}.DASK_LOGGING__DISTRIBUTED": workers_level}):
        return SpecCluster(
            workers=workers, scheduler=scheduler, silence_logs=own_level, name=workflow.name
        )


def _slurm_cluster(workflow: Workflow):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as error:
        raise InputError(
            workflow.name, "SLURM needs dask-jobqueue: pip install 'wsi-pipeline[slurm]'"
        ) from error
    cluster = SLURMCluster(**workflow.slurm)
    cluster.scale(jobs=workflow.jobs)
    return cluster


@contextmanager
def dask_client(
    workflow: Workflow, scheduler: str | None = None, verbose: bool = False
) -> Iterator[Any]:
    """A ``distributed.Client`` on the workflow's cluster, or on ``scheduler`` when given.

    The cluster's informational log messages are shown only when ``verbose``.

    Raises
    ------
    InputError
        When ``scheduler`` is not an address or does not answer within
        :data:`CONNECT_TIMEOUT_S` seconds.
    """
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, ValueError) as error:  # a timeout is an OSError
            raise InputError(scheduler, f"cannot reach the Dask scheduler: {error}") from error
        with client:
            yield client
        return
    if workflow.kind == "slurm":
        cluster = _slurm_cluster(workflow)
    else:
        cluster = _local_cluster(workflow, verbose)
    client = Client(cluster)
    try:
        yield client
    finally:
        # On a loaded machine a nanny can time out waiting for its worker to stop, after all
        # the work is published: that must not fail the run. Leftover workers die with us.
        with suppress(TimeoutError):
            client.close()
            cluster.close()


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker of the cluster declares a ``GPU`` resource."""
    workers = client.scheduler_info()["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)
