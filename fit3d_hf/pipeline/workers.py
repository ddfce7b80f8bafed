"""Independent jobs of a stage in worker processes of one torch thread each (`DemoConfig.workers`).

A lifting step is a chain of small ops that a second torch thread barely speeds up: in the demo a
room lifts at 9.4 it/s with two threads and 6.7 it/s with one, so two one-thread processes lifting
two rooms side by side do 1.43x the work on a 2-core AVX2 machine; probe training gains 1.37x and
fine-tuning 1.27x the same way (docs/performance.md). On a busy machine one-thread processes also
lose less: none waits for a partner thread that the scheduler has paused. So the demo lifts its
rooms, runs its two fine-tunings and trains each probe seed's probes as jobs (`resolve_workers`).
"""

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import TypeVar

from fit3d_hf.threads import configure_threads

T = TypeVar("T")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: int, jobs: int) -> int:
    """Worker processes for `jobs` jobs: `workers`, or when 0 one per job, at most two per available core;
    never more than `jobs`. Two one-thread workers share a core without waiting for each other, so three
    jobs on two cores take 1.5 jobs' time side by side instead of two jobs' time in two rounds.

    Raises:
        ValueError: `workers` is negative.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per job, at most two per available core), got {workers}")
    return max(1, min(workers or 2 * available_cores(), jobs))


def run_jobs(jobs: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Run `jobs`, each a picklable callable without arguments (e.g. a `functools.partial` of a
    module-level function), `workers` at a time in spawned processes with one torch thread each;
    return their results in the order of `jobs`.

    With one worker (or one job) they run here, one after the other, with this process's threads.
    The first job that raises stops the jobs not yet started and its error is raised here once
    the running ones end.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    # spawn, not fork: a forked child would inherit torch's thread pool and OpenMP state half set up.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=configure_threads, initargs=(1,)) as pool:
        futures = [pool.submit(job) for job in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            future.result()  # raises the job's error, if any
        return [future.result() for future in futures]
