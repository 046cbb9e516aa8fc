"""The Ray runtime that ``--engine ray`` runs on: joining a cluster (or starting a local one) and its size.

Ray is an optional dependency (the ``ray`` extra): it is imported here, when a command asks for it, never when
a command's parser is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from typing import Any, Iterator

from vlkit.errors import VlkitError

WORKER_ENV = ("LANCE_LOG", "VLKIT_MAX_PIXELS")
"""Environment variables of this process that Ray workers get too."""

MISSING_RAY = "--engine ray needs Ray Data, which is not installed: pip install 'vlkit[ray]'"


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line :class:`~vlkit.errors.VlkitError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the engine needs Ray Data, not only Ray core)
    except ImportError:
        raise VlkitError(MISSING_RAY) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``), or start a local one, for the ``with`` block.

    A runtime already started in this process (``ray.init`` by the caller) is used as it is and left running;
    one started here is shut down at the end of the block. Without an address a new local runtime is started,
    with every CPU of this machine and no dashboard, even where a cluster runs on this machine (``auto`` joins
    that one).

    Args:
        address: a cluster address (``ray://host:10001`` or ``host:6379``), or ``auto`` for the one running on
            this machine (``ray start --head``).

    Yields:
        The ``ray`` module, connected.

    Raises:
        VlkitError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # the workers see what this command set for itself: Lance's log level, the pixel limit (--max-pixels)
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    try:
        with warnings.catch_warnings():
            # Ray starts its processes from this one; none of them uses this process's Lance handles
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            if address:
                ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
            else:
                # "local": a new runtime, even where a cluster was started on this machine (--ray-address auto
                # joins that one)
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         logging_level=logging.WARNING, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; a cluster with token authentication also needs RAY_AUTH_MODE=token and its token "
                "(~/.ray/auth_token or RAY_AUTH_TOKEN)") if address and address != "auto" else ""
        raise VlkitError(f"cannot start or join {where} ({first}){hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: Any) -> int:
    """The CPUs of the connected cluster (at least 1): the default number of Ray workers."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def task_pool(ray: Any, size: int) -> Any:
    """A Ray Data compute strategy running at most ``size`` tasks at once."""
    return ray.data.TaskPoolStrategy(size=size)


def actor_pool(ray: Any, size: int) -> Any:
    """A Ray Data compute strategy of ``size`` actors (each keeps its state, e.g. a loaded model)."""
    return ray.data.ActorPoolStrategy(size=size)


def map_batches(data: Any, fn: Any, *, retries: int, actors: bool = False, **kwargs: Any) -> Any:
    """``data.map_batches(fn, **kwargs)`` where a lost worker (or actor) is retried at most ``retries`` times.

    Ray Data retries lost workers for ever by default, so an input that kills its worker every time (a crash
    in a decoder) would never end the command.
    """
    limits = {"max_restarts": retries, "max_task_retries": retries} if actors else {"max_retries": retries}
    with warnings.catch_warnings():  # Ray 2.60 deprecates these keyword arguments but names no replacement yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return data.map_batches(fn, **kwargs, **limits)


def failure_line(exc: BaseException) -> str:
    """One line for an error Ray raised: a vlkit error raised on a worker as its own message, else the error's
    type and first line (Ray's colour codes removed)."""
    cause = getattr(exc, "cause", None)  # a task's own exception, when Ray kept it
    if isinstance(cause, VlkitError):
        return str(cause)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    raised = re.findall(r"vlkit\.errors\.\w+: (.+)", text)  # a worker's traceback, printed into the message
    if raised:
        return raised[-1].strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
