"""Where the trials of ``vpipe tune`` run: this process (``--jobs 1``), a pool of ``--jobs N``
processes on this machine, or Ray tasks (``--engine ray``, one trial per task).

A runner takes a :class:`~.trial.TrialJob` (``submit``) and gives back the outcomes of the
trials that ended (``finished``, waiting at most ``timeout`` seconds for one). Each trial
reports its epochs to the study's storage itself, so the driver's table reads them there.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pipeline.engine import end_with_parent
from pipeline.errors import UsageError
from pipeline.train.tune.trial import FAILED, TrialJob, run_trial


class InProcess:
    """One trial at a time, in the driver (its epochs shown as they end)."""

    jobs = 1

    def __init__(self) -> None:
        self.todo: list[tuple[TrialJob, Callable | None]] = []

    def start(self, out: Path, inputs: list[Path]) -> None:
        pass

    def submit(self, job: TrialJob, hook: Callable[[dict], None] | None) -> None:
        self.todo.append((job, hook))

    def finished(self, timeout: float) -> list[dict]:
        job, hook = self.todo.pop(0)
        return [run_trial(job, hook)]

    def close(self) -> None:
        pass


class Pool:
    """``jobs`` trials at a time, each in a process of its own (started fresh: torch's threads
    do not survive a fork), its torch threads the driver's share of the cores."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: ProcessPoolExecutor | None = None
        self.running: dict[Any, TrialJob] = {}

    def start(self, out: Path, inputs: list[Path]) -> None:
        self.pool = ProcessPoolExecutor(max_workers=self.jobs, initializer=end_with_parent,
                                        mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: TrialJob, hook: Callable | None) -> None:
        self.running[self.pool.submit(run_trial, job)] = job

    def finished(self, timeout: float) -> list[dict]:
        done, _ = wait(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            self.running.pop(f)
            out.append(f.result())
        return out

    def close(self) -> None:
        if self.pool is not None:  # trials cut here are redone by the same command
            self.pool.shutdown(wait=False, cancel_futures=True)


class RayTrials:
    """One Ray task per trial, ``jobs`` in flight; each declares its CPUs (its torch threads)
    and a GPU where the cluster has them and the trial may use one. The trials' run folders
    and the study's SQLite file are in ``OUT``, which every node must see."""

    def __init__(self, jobs: int, address: str | None, quiet: bool) -> None:
        from pipeline.engine import RayEngine, ray_module

        ray_module()  # a missing install: one line, before anything is written
        self.jobs = jobs
        self.engine = RayEngine(address, quiet=quiet, stage="tune")
        self.running: dict[Any, TrialJob] = {}

    def start(self, out: Path, inputs: list[Path]) -> None:
        self.engine.start(out, inputs)

    def submit(self, job: TrialJob, hook: Callable | None) -> None:
        ray = self.engine.ray
        gpus = 1 if self.engine.cluster.get("gpus") and job.config["device"] != "cpu" else 0
        task = ray.remote(run_trial).options(num_cpus=max(1, job.config["threads"]),
                                             num_gpus=gpus, max_retries=0)
        self.running[task.remote(job)] = job

    def finished(self, timeout: float) -> list[dict]:
        # (No ray.cancel of trials in flight, ever: see pipeline.engine.)
        ray = self.engine.ray
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                raise cause from None
            except ray.exceptions.RayError as e:  # its worker or node died, out of memory
                why = str(e).strip().splitlines()[0] if str(e).strip() else ""
                out.append({"number": job.number, "trial_id": job.trial_id, "state": FAILED,
                            "value": None, "epochs": None, "seconds": None,
                            "reason": f"its Ray worker died ({type(e).__name__}: {why})"})
        return out

    def close(self) -> None:
        pass  # trials in flight end with the driver's job (pipeline.engine)


def make_runner(engine: str, jobs: int, ray_address: str | None, quiet: bool):
    """The runner ``--engine`` and ``--jobs`` name."""
    if engine == "ray":
        return RayTrials(jobs, ray_address, quiet)
    if engine != "local":
        raise UsageError(f"--engine {engine!r}: use local or ray")
    if ray_address:
        raise UsageError("--ray-address is for --engine ray")
    return InProcess() if jobs == 1 else Pool(jobs)
