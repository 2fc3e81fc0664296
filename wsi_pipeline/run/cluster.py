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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import data_path

DEFAULT_WORKFLOW = "local-cpu"


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


def _local_cluster(workflow: Workflow):
    from distributed import Nanny, Scheduler, SpecCluster

    cpu_workers = workflow.workers or max(1, (os.cpu_count() or 1) // workflow.threads_per_worker)
    options = {"nthreads": workflow.threads_per_worker, "memory_limit": workflow.memory_limit}
    workers = {f"cpu-{i}": {"cls": Nanny, "options": options} for i in range(cpu_workers)}
    for i in range(workflow.gpu_workers):
        gpu_options = {**options, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}
        workers[f"gpu-{i}"] = {"cls": Nanny, "options": gpu_options}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40, name=workflow.name)


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
def dask_client(workflow: Workflow, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` on the workflow's cluster, or on ``scheduler`` when given."""
    from distributed import Client

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    build = _slurm_cluster if workflow.kind == "slurm" else _local_cluster
    with build(workflow) as cluster, Client(cluster) as client:
        yield client


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker of the cluster declares a ``GPU`` resource."""
    workers = client.scheduler_info()["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)
