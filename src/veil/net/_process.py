"""Start ``veil worker`` in a subprocess on this machine (tests, benchmarks, demos)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil._errors import WorkerUnavailable
from veil.net._auth import new_token

if TYPE_CHECKING:
    from veil.net._client import WebSocketWorker


class WorkerProcess:
    """A ``veil worker`` subprocess listening on a free loopback port.

    Use it as a context manager (or call :meth:`stop`). The worker exits by itself when this
    process does. Its log is in :attr:`log_file`.

    Args:
        name: the worker's name.
        token: the token clients must prove; ``True`` makes a fresh one, None runs without.
        args: more ``veil worker`` arguments (``--data``, limits, TLS...).
        scheme: ``"ws"``, or ``"wss"`` when ``args`` give a certificate.
        start_timeout: seconds to wait for the worker to listen.
    """

    def __init__(
        self,
        name: str,
        *,
        token: str | bool | None = True,
        args: tuple[str, ...] | list[str] = (),
        scheme: str = "ws",
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"veil-worker-{name}-"))
        self.token = new_token() if token is True else (token or None)
        cmd = [
            sys.executable,
            "-m",
            "veil.cli",
            "worker",
            "--name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(self.dir / "port"),
            "--exit-with-parent",
            *args,
        ]
        if self.token is not None:
            token_file = self.dir / "token"
            token_file.touch(mode=0o600)
            token_file.write_text(self.token + "\n")
            cmd += ["--token-file", str(token_file)]
        self.log_file = self.dir / "worker.log"
        self._final_log: str | None = None
        self._terminated = False
        self._log = open(self.log_file, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.port = self._wait_for_port(start_timeout)
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    def _wait_for_port(self, timeout: float) -> int:
        port_file = self.dir / "port"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text())
            if self.proc.poll() is not None:
                self.stop()
                raise WorkerUnavailable(
                    f"veil worker {self.name} exited with {self.proc.returncode}: "
                    + self.log()[-2000:]
                )
            time.sleep(0.02)
        self.stop()
        raise WorkerUnavailable(f"veil worker {self.name} did not start within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.proc.poll() is None

    def log(self) -> str:
        """What the worker has logged so far (all of it, once stopped)."""
        if self._final_log is not None:
            return self._final_log
        self._log.flush()
        return self.log_file.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM without waiting (see :meth:`stop`)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout``); the exit code."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_files()
        return self.proc.returncode

    def _close_files(self) -> None:
        if self._final_log is None:
            self._log.close()
            self._final_log = self.log_file.read_text(errors="replace")
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, as in a crash."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_files()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_worker(name: str, **kwargs: object) -> WorkerProcess:
    """Start ``veil worker --name NAME`` on a free loopback port; see :class:`WorkerProcess`."""
    return WorkerProcess(name, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def started_workers(*specs: tuple[str, dict[str, Any]]) -> Iterator[list[WorkerProcess]]:
    """Start ``spawn_worker(name, **kwargs)`` for each ``(name, kwargs)``, in parallel; stop
    them all at the end (SIGTERM to all, then each is waited for), also those that had
    started when another failed to (whose error is raised)."""
    with ThreadPoolExecutor(max(1, len(specs))) as pool:
        futures = [pool.submit(spawn_worker, name, **kwargs) for name, kwargs in specs]
    procs = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            error = f.exception()
            if error is not None:
                raise error
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.stop()


@contextlib.contextmanager
def local_workers(
    *names: str,
    threads: int | None = 1,
    args: tuple[str, ...] | list[str] = (),
    timeout: float = 60.0,
) -> Iterator[list[WebSocketWorker]]:
    """Start one ``veil worker`` process per name on loopback, at once, and connect to each.

    For experiments and benchmarks on one machine: the workers share a fresh token, each
    runs torch on ``threads`` threads (``None``: torch's default; 1 keeps several workers from
    fighting over the cores), with ``args`` passed on. Yields the connected handles, in the
    order of ``names``; on exit (also on error) the connections close and the processes stop.
    If any worker fails to start, the others are stopped and its error is raised.

    Example::

        with veil.net.local_workers("alice", "bob") as (alice, bob):
            (torch.ones(3).send(alice) * 2).get()
    """
    from veil.net._client import connect

    if not names:
        raise ValueError("local_workers needs at least one worker name")
    token = new_token()
    extra = [*args] + ([] if threads is None else ["--threads", str(threads)])
    with started_workers(*((n, {"token": token, "args": extra}) for n in names)) as procs:
        handles: list[WebSocketWorker] = []
        try:
            for p in procs:
                handles.append(connect(p.url, token=token, timeout=timeout))
            yield handles
        finally:
            for h in handles:
                h.close()
