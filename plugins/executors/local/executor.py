"""Steps on this machine: in this process (``workers: 0``) or in a pool of worker processes.

Workers are started with ``spawn`` (a fork of a process that has started torch's thread pools can deadlock)
and live for the whole bench, so torch and transformers are imported once per worker, not once per step. Each
worker's torch uses ``threads`` threads (default: the CPUs divided among the workers), so concurrent steps do
not fight over cores. A worker that dies (out of memory, a crash in native code) fails only the steps it held;
the pool is started again for the rest.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from mergeplug.bench import Executor, failed_record, run_step


def _worker_setup(threads: int) -> None:
    os.environ["MERGEPLUG_THREADS"] = str(threads)


class LocalExecutor(Executor):
    def __init__(self, workers: int = 1, threads: int | None = None):
        super().__init__(workers=workers, threads=threads)
        self.workers = workers
        self.slots = max(1, workers)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.slots)
        self.pool: ProcessPoolExecutor | None = None
        self.payloads: dict = {}
        self.done: list = []

    def start(self) -> None:
        if self.workers:
            self._new_pool()

    def _new_pool(self) -> None:
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_setup, initargs=(self.threads,))

    def submit(self, payload: dict, resources: dict):
        if self.pool is None:
            handle = object()
            previous = os.environ.get("MERGEPLUG_THREADS")
            if self.parameters.get("threads"):
                os.environ["MERGEPLUG_THREADS"] = str(self.threads)
            try:
                self.done.append((handle, run_step(payload)))
            finally:
                if previous is None:
                    os.environ.pop("MERGEPLUG_THREADS", None)
                else:
                    os.environ["MERGEPLUG_THREADS"] = previous
            return handle
        try:
            future = self.pool.submit(run_step, payload)
        except BrokenProcessPool:
            self._new_pool()
            future = self.pool.submit(run_step, payload)
        self.payloads[future] = payload
        return future

    def wait(self, handles: list) -> list:
        if self.pool is None:
            finished, self.done = self.done, []
            return finished
        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for future in finished:
            payload = self.payloads.pop(future)
            try:
                out.append((future, future.result()))
            except BrokenProcessPool:
                broken = True
                out.append((future, failed_record(payload, "the worker process died (out of memory, or a crash "
                                                           "in native code); see the system log")))
            except Exception as exc:  # noqa: BLE001 - e.g. a payload that could not be sent to the worker
                out.append((future, failed_record(payload, f"{type(exc).__name__}: {exc}")))
        if broken:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._new_pool()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
