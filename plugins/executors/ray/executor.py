"""Bench steps as Ray tasks (https://docs.ray.io): a cluster runs one recipe across many GPUs and nodes.

Each step is one task reserving ``cpus_per_step`` CPUs and, for finetune/merge/evaluate steps,
``gpus_per_step`` GPUs; Ray places it where those are free and sets CUDA_VISIBLE_DEVICES to its own GPUs.
Steps read and write the bench folder, so on several nodes that folder must be on a file system every node
mounts at the same path (NFS, Lustre...). With no ``address`` a local instance is started for the run (no
dashboard) and stopped at the end. Ray is an optional dependency: ``pip install 'mergeplug[ray]'``.
"""
from __future__ import annotations

import math
import os

from mergeplug import MergeplugError
from mergeplug.bench import Executor, failed_record, run_step


def _step(payload: dict, threads: int) -> dict:
    os.environ["MERGEPLUG_THREADS"] = str(threads)
    return run_step(payload)


class RayExecutor(Executor):
    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_step: float = 1,
                 gpus_per_step: float = 0, max_concurrent: int | None = None):
        super().__init__(address=address, num_cpus=num_cpus, cpus_per_step=cpus_per_step,
                         gpus_per_step=gpus_per_step, max_concurrent=max_concurrent)
        self.slots = max_concurrent or 1 << 30
        self.started_here = False
        self.payloads: dict = {}

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise MergeplugError("executor ray: Ray is not installed; pip install 'mergeplug[ray]' "
                                 "(or use executor: local)") from None
        self.ray = ray
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.parameters["address"]:
                ray.init(address=self.parameters["address"], **options)
            else:
                ray.init(num_cpus=self.parameters["num_cpus"], **options)
                self.started_here = True
        self.remote = ray.remote(_step)

    def submit(self, payload: dict, resources: dict):
        gpus = self.parameters["gpus_per_step"] if payload["kind"] != "base" else 0
        cpus = self.parameters["cpus_per_step"]
        ref = self.remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0).remote(payload, max(1, math.ceil(cpus)))
        self.payloads[ref] = payload
        return ref

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        # Collect every other step that is already done too, without blocking.
        more, _ = self.ray.wait([h for h in handles if h not in ready], num_returns=len(handles) - len(ready),
                                timeout=0) if len(handles) > len(ready) else ([], [])
        out = []
        for ref in [*ready, *more]:
            payload = self.payloads.pop(ref)
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a lost worker or node: that step fails, the bench goes on
                out.append((ref, failed_record(payload, f"ray: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")))
        return out

    def close(self) -> None:
        if self.started_here and getattr(self, "ray", None) is not None:
            self.ray.shutdown()
