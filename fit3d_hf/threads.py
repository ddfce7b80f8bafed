"""The thread policy of fit3d_hf: how many threads torch uses and how waiting OpenMP threads behave.

torch runs CPU ops on OpenMP threads that by default spin while they wait for one another. On cores
shared with another CPU-bound process a spinning thread holds a core that its partner needs, so
every op waits for a time slice: with torch's default two threads on two busy cores, a lifting
step took 10× longer than with one thread (docs/performance.md). With `OMP_WAIT_POLICY=PASSIVE`
waiting threads sleep instead; the same step then costs no more than with one thread, and on
idle cores both threads work. So the policy is:

- `OMP_WAIT_POLICY=PASSIVE`, put into the environment when `fit3d_hf` is imported before torch
  (the `fit3d` command and the recipes do this; OpenMP reads it once, when torch loads). A value
  already in the environment is kept. Import `fit3d_hf` first, or export it yourself, to get it
  in your own scripts.
- Intra-op threads: torch's default (one per physical core, or `OMP_NUM_THREADS`), unless a
  command's `--threads N` (`configure_threads`) says otherwise.
- Inter-op threads are left alone: fit3d_hf runs nothing on torch's inter-op pool.
"""

import os
import sys

# OpenMP settings applied when torch is not loaded yet (OpenMP reads the environment once).
OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
THREADS_HELP = (
    "torch CPU threads; 0 (default): torch's default, one per physical core. Waiting threads sleep "
    "(OMP_WAIT_POLICY=PASSIVE), so the default stays fast on a busy machine."
)


def prepare_openmp() -> None:
    """Put `OPENMP_ENVIRONMENT` into `os.environ` where unset, if torch has not been imported yet."""
    if "torch" not in sys.modules:
        for name, value in OPENMP_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def configure_threads(threads: int = 0) -> int:
    """Use `threads` intra-op threads in torch (0: keep torch's default); return the count in use.

    Raises:
        ValueError: `threads` is negative.
    """
    import torch

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def describe_threads() -> str:
    """One line for a timing record: intra-op threads and the OpenMP wait policy in effect."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default: spin, then sleep)")
    return f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={policy}"
