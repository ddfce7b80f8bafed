import functools
import operator
import os

import pytest
import torch

from fit3d_hf.pipeline.workers import available_cores, resolve_workers, run_jobs


def test_workers_default_to_one_per_job_and_at_most_two_per_core():
    assert resolve_workers(0, 3) == min(2 * available_cores(), 3)
    assert resolve_workers(0, 100) == 2 * available_cores()
    assert resolve_workers(3, 2) == 2 and resolve_workers(1, 4) == 1 and resolve_workers(0, 0) == 1
    with pytest.raises(ValueError, match="workers must be >= 0"):
        resolve_workers(-1, 2)


def test_jobs_run_in_one_thread_worker_processes_in_order_and_their_errors_reach_the_caller():
    assert run_jobs([os.getpid, os.getpid], 1) == [os.getpid()] * 2  # one worker: in this process
    pids = run_jobs([os.getpid] * 3, 2)
    assert os.getpid() not in pids and len(set(pids)) <= 2
    assert run_jobs([torch.get_num_threads] * 2, 2) == [1, 1]
    assert run_jobs([functools.partial(operator.add, 1, k) for k in range(4)], 2) == [1, 2, 3, 4]
    with pytest.raises(ZeroDivisionError):
        run_jobs([functools.partial(operator.truediv, 1, 0), os.getpid], 2)
