"""Process plumbing shared by every wrapper of a real binary.

Each process is started in its own session (so its pgid is its pid), logs to a
file instead of a pipe (a full pipe would block a chatty daemon), and is stopped
by its pid: SIGTERM, wait, then SIGKILL.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest

REQUIRE_ENV = "MIRROR_REQUIRE_REAL_CLIENTS"


# Nothing listens on 127.0.0.1:1, so a proxy there refuses at once. Real clients
# get it as their HTTP(S) proxy with loopback exempt: a fallback to the real
# Docker Hub (dockerd after a mirror error, containerd's hosts.toml "server")
# then fails fast on this machine instead of sending DNS or traffic outside.
BLACKHOLE_PROXY = "http://127.0.0.1:1"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def offline_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with every proxy variable replaced by the blackhole proxy."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k.lower() not in _PROXY_VARS}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = BLACKHOLE_PROXY
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


def real_clients_required() -> bool:
    """True when CI asked for real clients: a missing binary is then a failure."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """Return the path of binary ``name``; skip the test if it is missing.

    Under MIRROR_REQUIRE_REAL_CLIENTS=1 a missing binary fails instead, so a
    CI machine that lost a package cannot go green by skipping everything.
    """
    path = shutil.which(name)
    if path is None:
        message = f"required binary {name!r} is not on PATH"
        if real_clients_required():
            pytest.fail(f"{message} and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(message)
    return path


def require_file(path: str | Path, why: str) -> Path:
    """Like require_tool, for a file a test needs (e.g. /bin/busybox from busybox-static)."""
    found = Path(path)
    if not found.exists():
        message = f"{found} is missing ({why})"
        if real_clients_required():
            pytest.fail(f"{message} and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    There is a small race between closing this socket and the real server
    binding the port; wrappers retry start-up on a fresh port when it is lost.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 10.0, *, popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM ``pid``, wait up to ``timeout``, then SIGKILL it and its process group.

    ``popen`` (when we are the parent) is used to reap the child, otherwise a
    zombie would look alive to ``os.kill(pid, 0)`` forever.
    """

    def alive() -> bool:
        if popen is not None:
            return popen.poll() is None
        return pid_alive(pid)

    if not alive():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return
        time.sleep(0.05)
    # The group id equals the pid because we start with start_new_session=True;
    # killing the group also takes children (e.g. dockerd's containerd) that
    # would otherwise be orphaned by a SIGKILL of the parent.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class ManagedProcess:
    """A long-running binary with its output in ``log_path``.

    Use as a context manager or call ``start()``/``stop()``; ``stop()`` is
    idempotent so fixtures can call it unconditionally in teardown.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        # Without a log_dir, a temp dir is made at start() and left for post-mortems.
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-log-"))
        return self._log_dir

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def start(self) -> ManagedProcess:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Append, so a restart keeps the earlier run's log for post-mortems.
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _live.add(self)
        return self

    def stop(self, timeout: float | None = None) -> None:
        if self._popen is None:
            return
        stop_pid(self._popen.pid, self.stop_timeout if timeout is None else timeout, popen=self._popen)
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL at once, no grace period (for crash tests), and reap it."""
        if self._popen is None or self._popen.poll() is not None:
            return
        try:
            os.kill(self._popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._popen.wait(timeout=10)

    def log_text(self, tail: int | None = 4000) -> str:
        if self._log_dir is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail is None else text[-tail:]

    def check_alive(self) -> None:
        """Raise with the log tail if the process already died (e.g. bad config, port taken)."""
        if self._popen is not None and self._popen.poll() is not None:
            raise ProcessDied(self.name, self._popen.returncode, self.log_text())

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen is not None else None
        return f"<ManagedProcess {self.name} pid={pid} running={self.running}>"


# Processes started and not yet stopped. Fixtures stop theirs in teardown; this is
# the backstop for a test run that dies before teardown (a fixture's own crash,
# sys.exit): our children run in their own sessions, so nothing else would stop them.
_live: set[ManagedProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_live):
        proc.stop(timeout=5)


class ProcessDied(RuntimeError):
    def __init__(self, name: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(f"{name} exited early with status {returncode}; log tail:\n{log_tail}")
        self.returncode = returncode
        self.log_tail = log_tail


def http_status(
    url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None, ca_file: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
) -> int:
    """Status code of a GET to ``url``; raises OSError when nothing answers. ``ca_file``: trust for https;
    ``client_cert``: (cert, key) to present for mutual TLS."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    # No proxies: a stray http_proxy in the environment must not reroute loopback traffic.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        if client_cert is not None:
            context.load_cert_chain(*client_cert)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def wait_http(
    url: str,
    timeout: float = 20.0,
    *,
    ready: Callable[[int], bool] = lambda status: status < 500,
    proc: ManagedProcess | None = None,
    interval: float = 0.05,
    ca_file: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
) -> int:
    """Poll ``url`` until ``ready(status)``; return that status.

    ``proc`` lets a crashed server fail fast with its log instead of a timeout.
    """
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while True:
        if proc is not None:
            proc.check_alive()
        try:
            status = http_status(url, timeout=min(2.0, max(0.1, deadline - time.monotonic())), ca_file=ca_file,
                                 client_cert=client_cert)
            if ready(status):
                return status
            last = f"status {status}"
        except OSError as err:
            last = repr(err)
        if time.monotonic() >= deadline:
            extra = f"\nlog tail:\n{proc.log_text()}" if proc is not None else ""
            raise TimeoutError(f"{url} not ready after {timeout}s ({last}){extra}")
        time.sleep(interval)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
    input: bytes | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a short-lived command, capturing output; raise CommandFailed with stderr on failure.

    subprocess.run kills the child when ``timeout`` expires, so nothing outlives the call.
    """
    argv = [str(a) for a in argv]
    result = subprocess.run(
        argv, env=dict(env) if env is not None else None, capture_output=True, timeout=timeout, input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise CommandFailed(what or argv[0], argv, result)
    return result


class CommandFailed(RuntimeError):
    def __init__(self, what: str, argv: Sequence[str], result: subprocess.CompletedProcess[bytes]) -> None:
        self.argv = list(argv)
        self.returncode = result.returncode
        self.stdout = result.stdout.decode(errors="replace")
        self.stderr = result.stderr.decode(errors="replace")
        super().__init__(
            f"{what} failed with status {result.returncode}: {' '.join(self.argv)}\n"
            f"stderr:\n{self.stderr[-4000:]}\nstdout:\n{self.stdout[-2000:]}"
        )
