"""Run a function in N real processes on 127.0.0.1, with a hard timeout.

Every multi-process test uses this:

    from spawn import run_workers
    results = run_workers(_body, world_size=4, backend="gloo", timeout=60)

``_body(rank, world_size, *args)`` must be a module-level function (it is
pickled into spawned processes). Each worker gets MASTER_ADDR/MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in its environment and, when
``backend`` is given, an initialised default process group (destroyed after
the body returns). The return values come back in rank order. A worker that
raises, dies or outlives ``timeout`` fails the test with every worker's
traceback; all workers are killed, nothing hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback

# Imported once in the forkserver, before it forks any worker. Only imports:
# no torch op runs there (a fork after OpenMP's or a native thread pool's first
# use would give the worker a pool without threads).
_PRELOAD = ["torch", "torch.distributed", "ichiban_comm", "spawn"]
_IMPORT_SETTINGS = ("ICHIBAN_SHARED_TENSORS",)
_ctx = None


def _context():
    """The multiprocessing context of the workers (created once per test process)."""
    global _ctx
    if _ctx is None:
        method = os.environ.get("ICHIBAN_TEST_SPAWN", "forkserver")
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"ICHIBAN_TEST_SPAWN={method!r}: expected 'forkserver' or 'spawn'")
        _ctx = mp.get_context(method)
        if method == "forkserver":
            from multiprocessing import forkserver

            _ctx.set_forkserver_preload(_PRELOAD)
            # Start it now, without the settings that change what importing the package
            # does (the shared-tensor allocator cannot be enabled in a process forked
            # after it was); each worker applies its own environment after the fork.
            saved = {k: os.environ.pop(k) for k in _IMPORT_SETTINGS if k in os.environ}
            try:
                forkserver.ensure_running()
            finally:
                os.environ.update(saved)
    return _ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(AssertionError):
    pass


def native_stderr(fn) -> str:
    """Run fn() with file descriptor 2 sent to a temporary file; return what was written
    there (native code such as ICHIBAN_DEBUG's log writes to the descriptor, not sys.stderr)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read()


def _worker(fn_bytes, rank, world_size, port, backend, pg_timeout, env, args, out, parent):
    environ, cwd, path = parent
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    os.chdir(cwd)
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
    })
    os.environ.update(env or {})
    try:
        import torch.distributed as dist

        fn = pickle.loads(fn_bytes)  # by reference: needs the test's directory on sys.path
        if "ichiban_comm" in sys.modules:  # preloaded: apply this worker's environment
            sys.modules["ichiban_comm"].distributed.enable_from_env()

        if backend is not None:
            if backend not in ("gloo", "nccl", "mpi"):
                import ichiban_comm  # noqa: F401  (registers the backend)
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            if backend is not None and dist.is_initialized():
                dist.destroy_process_group()
        out.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, "error", traceback.format_exc()))


def run_workers(fn, world_size: int, *, backend: str | None = "gloo", timeout: float = 60.0,
                pg_timeout: float | None = None, env: dict | None = None, args: tuple = (),
                expect_failure_ranks: tuple = (), fresh: bool = False):
    """Run fn in world_size processes; return the per-rank results in rank order.

    Ranks in ``expect_failure_ranks`` may exit without reporting (a test that
    kills a peer on purpose); their result is None. ``fresh=True`` starts the
    workers as new interpreters that have imported nothing (a test of what an
    import does), instead of forking them from the preloaded forkserver.
    """
    ctx = mp.get_context("spawn") if fresh else _context()
    out = ctx.Queue()
    port = free_port()
    pg_timeout = pg_timeout if pg_timeout is not None else max(5.0, timeout * 0.75)
    parent = (dict(os.environ), os.getcwd(), list(sys.path))
    fn_bytes = pickle.dumps(fn)
    procs = [ctx.Process(target=_worker, args=(fn_bytes, r, world_size, port, backend, pg_timeout,
                                                env, args, out, parent), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = out.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and r not in errors]
                # A dead worker may still have a message in flight: give it a moment.
                if dead and all(procs[r].exitcode not in (None, 0) for r in dead):
                    try:
                        rank, status, payload = out.get(timeout=1.0)
                    except queue.Empty:
                        for r in dead:
                            if r in expect_failure_ranks:
                                results[r] = None
                            else:
                                errors[r] = f"worker died with exit code {procs[r].exitcode}"
                        continue
                else:
                    continue
            (results if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = [r for r in range(world_size) if r not in results and r not in errors]
    if errors or missing:
        lines = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
        if missing:
            lines.append(f"ranks {missing} did not finish within {timeout:.0f} s (killed)")
        raise WorkerError("multi-process test failed:\n" + "\n".join(lines))
    return [results[r] for r in range(world_size)]


def random_tensor(shape, dtype, seed: int):
    """Random values of any dtype the collectives take (never all zeros), reproducible
    from `seed` in every process: booleans, floats from a normal, integers in [-1000, 1000)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
