"""This process and the processes under and above it.

A stage stops the way it was asked to: SIGTERM, SIGINT or SIGHUP first stops every process it started (accelerate's
ranks, dataloader workers, a pipeline's child stages: SIGTERM, then SIGKILL after a grace period) and then raises
:class:`Interrupted` in the main thread, so the run is closed KILLED with the signal named and the exit code is
128 + the signal. A stage whose launcher died (``make`` or ``mlflow run`` killed, even with SIGKILL) stops itself the
same way instead of training on as an orphan: a watchdog thread polls the chain of launchers above it. Whether a pid on
this host is still the process that wrote a run (:func:`alive`) is how stale runs are told from live ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP")) if s is not None)
GRACE_S = 20.0          # how long a child gets to close its own run before SIGKILL
WATCH_EVERY_S = 1.0     # how often the watchdog looks at the launchers
LAUNCHERS = ("make", "gmake", "mlflow", "accelerate", "torchrun")


class Interrupted(BaseException):
    """A signal (or the death of the launcher) ended the stage. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` in a library swallows it on its way to the run's close."""

    def __init__(self, signum: int, why: str = ""):
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"killed by {self.signame}" + (f" ({why})" if why else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def host() -> str:
    return socket.gethostname()


def started(pid: int | None = None) -> float:
    """When the process began (seconds since the epoch): with the pid, what tells it from a later one with that pid."""
    import psutil

    return psutil.Process(pid or os.getpid()).create_time()


def alive(pid: int, began: float | None) -> bool:
    """Whether process ``pid`` on this host runs and, when ``began`` is known, is the same process (a reused pid is
    not); a zombie is not alive."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return began is None or abs(proc.create_time() - began) < 1.0
    except psutil.Error:
        return False


def stop_children(grace: float = GRACE_S) -> list[int]:
    """SIGTERM every process under this one, wait up to ``grace`` seconds for them to close, SIGKILL the rest;
    the pids that had to be killed."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, left = psutil.wait_procs(children, timeout=grace)
    for child in left:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(left, timeout=5)
    return [c.pid for c in left]


def end_waiting_mlflow_run() -> None:
    """After a signal ended this stage: stop the ``mlflow run`` that launched it and waits for it. Once the stage
    exits non-zero that waiter marks the run FAILED without looking at what the stage wrote (MLflow 3.17's
    ``_maybe_set_run_terminated`` compares the status string with numeric codes, so a run the stage closed KILLED
    would read FAILED). The stage has closed its run; the waiter has nothing left to do."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        cmd = parent.cmdline()
    except psutil.Error:
        return
    heads = [Path(w).name for w in cmd[:3]]
    if "run" in cmd and ("mlflow" in heads or any(w == "-m" and n == "mlflow" for w, n in zip(cmd, cmd[1:], strict=False))):
        with contextlib.suppress(psutil.Error):
            parent.kill()


def _is_launcher(proc) -> bool:
    """``make``, ``mlflow run``, ``accelerate launch``/torchrun, ``python -m pipeline.…`` and the ``bash -c`` between
    them: the processes whose death means nobody waits for this stage any more. A user's shell is not one (a stage
    under ``nohup`` outlives it)."""
    import psutil

    try:
        name, cmd = proc.name(), proc.cmdline()
    except psutil.Error:
        return False
    if name in ("bash", "sh", "dash"):
        return len(cmd) > 1 and cmd[1] == "-c"
    heads = [Path(w).name for w in cmd[:2]]
    modules = [cmd[i + 1] for i, w in enumerate(cmd[:-1]) if w == "-m"]
    return name in LAUNCHERS or any(h in LAUNCHERS for h in heads) or \
        any(m.startswith(("pipeline.", "mlflow", "accelerate.", "torch.distributed.")) for m in modules)


def launcher_chain() -> list:
    """The launchers above this process, nearest first, up to the first process that is not one."""
    import psutil

    chain, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1 and _is_launcher(proc):
        chain.append(proc)
        proc = proc.parent()
    return chain


class _Supervisor:
    def __init__(self) -> None:
        self.stopping = False
        self.why = ""

    def on_signal(self, signum: int, frame) -> None:
        if self.stopping:  # a second signal (Ctrl-C reaches the whole group, the launcher forwards it): let the
            return         # close that is under way finish
        self.stopping = True
        killed = stop_children()
        if killed:
            log.warning("killed %d process(es) that did not stop within %.0f s: %s", len(killed), GRACE_S, killed)
        raise Interrupted(signum, self.why)

    def watch(self, chain: list, done: threading.Event) -> None:
        import psutil

        parent = os.getppid()
        while not done.wait(WATCH_EVERY_S):
            gone = None if os.getppid() == parent else chain[0]
            for proc in chain[1:] if gone is None else ():
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE or not proc.is_running():
                        gone = proc
                except psutil.Error:
                    gone = proc
                if gone is not None:
                    break
            if gone is not None and not done.is_set():
                self.why = f"its launcher, pid {gone.pid}, is gone"
                log.error("the process that launched this stage (pid %d) is gone: stopping", gone.pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return


@contextlib.contextmanager
def supervised() -> Iterator[None]:
    """Signals end the stage (children first, then :class:`Interrupted`) and a dead launcher stops it; both undone on
    leaving (a stage called in-process, as tests do, leaves the caller's handlers as they were). A signal ignored when
    the stage started (``nohup``: SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sup, done = _Supervisor(), threading.Event()
    # a signal the stage was started ignoring stays ignored: SIGHUP under nohup, SIGINT in a background job
    before = {s: signal.signal(s, sup.on_signal) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    chain = launcher_chain()
    if chain:
        threading.Thread(target=sup.watch, args=(chain, done), daemon=True, name="zh-align-launcher-watch").start()
    try:
        yield
    finally:
        done.set()
        for s, handler in before.items():
            signal.signal(s, handler)
