"""A private dockerd (and the containerd it starts) for tests.

Everything lives under one short temp dir ``D`` (the unix socket path must stay
under 108 bytes, so it is ``/tmp/dXXXXXX``): ``D/root`` data, ``D/exec`` exec
root, ``D/sock`` the API socket, ``D/pid``. No iptables, no bridge, vfs storage,
so it touches nothing of the host's network. Daemon and clients run with a
blackhole HTTP(S) proxy (see procs.offline_env): a fallback to the real Docker
Hub after a mirror failure fails at once instead of leaving the machine.
dockerd launches its own containerd at ``D/exec/containerd/containerd.sock``
(only because no system containerd is running at /run/containerd: if one is,
dockerd 20.10 would use that instead, and ``containerd_sock`` follows it).

From an async test whose mirror runs on the test's event loop, use ``adocker``/
``actr`` so the loop stays free while the client talks to the mirror.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import skopeo
from .images import BuiltImage
from .procs import CommandFailed, ManagedProcess, offline_env, require_tool, run

UPSTREAM_SERVERS = {"docker.io": "https://registry-1.docker.io"}
SYSTEM_CONTAINERD = Path("/run/containerd/containerd.sock")


def write_hosts_dir(
    base: Path,
    mirror_url: str,
    registry_host: str = "docker.io",
    *,
    server: str | None = None,
    capabilities: Sequence[str] = ("pull", "resolve"),
    skip_verify: bool = False,
) -> Path:
    """Write ``base/<registry_host>/hosts.toml`` sending ``registry_host`` pulls to ``mirror_url``.

    Returns ``base`` (pass it as ``--hosts-dir``). Call once per registry host;
    containerd adds ``?ns=<registry_host>`` to the mirror's requests.
    """
    upstream = server or UPSTREAM_SERVERS.get(registry_host, f"https://{registry_host}")
    caps = ", ".join(f'"{c}"' for c in capabilities)
    lines = [f'server = "{upstream}"', "", f'[host."{mirror_url.rstrip("/")}"]', f"  capabilities = [{caps}]"]
    if skip_verify:
        lines.append("  skip_verify = true")
    directory = Path(base) / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text("\n".join(lines) + "\n")
    return Path(base)


class DockerDaemon:
    """``dockerd`` with an optional ``--registry-mirror``; stop() by the pid it wrote."""

    def __init__(
        self,
        mirror_url: str | None = None,
        *,
        insecure_registries: Iterable[str] = (),
        extra_args: Sequence[str] = (),
        start_timeout: float = 60.0,
        storage_driver: str = "vfs",
    ) -> None:
        self.mirror_url = mirror_url
        # vfs works everywhere; overlay2 (where the kernel allows it, as here) builds images about ten
        # times faster, because vfs copies the whole file system for every layer and build step.
        self.storage_driver = storage_driver
        self.insecure_registries = list(insecure_registries)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.proc: ManagedProcess | None = None
        self._config_dir: Path | None = None

    # -- paths -----------------------------------------------------------------------

    def _d(self) -> Path:
        if self.dir is None:
            raise RuntimeError("dockerd not started")
        return self.dir

    @property
    def sock(self) -> Path:
        return self._d() / "sock"

    @property
    def host(self) -> str:
        """The DOCKER_HOST value."""
        return f"unix://{self.sock}"

    @property
    def pid_file(self) -> Path:
        return self._d() / "pid"

    @property
    def containerd_sock(self) -> Path:
        own = self._d() / "exec" / "containerd" / "containerd.sock"
        return own if own.exists() or not SYSTEM_CONTAINERD.exists() else SYSTEM_CONTAINERD

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> DockerDaemon:
        dockerd = require_tool("dockerd")
        require_tool("docker")
        # Short on purpose: /tmp/dXXXXXXXX/exec/containerd/containerd.sock must fit in 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="d", dir="/tmp"))
        self._config_dir = self.dir / "cli"  # an empty client config: no creds, no contexts of the host
        self._config_dir.mkdir()
        d = self.dir
        argv = [
            dockerd,
            "--iptables=false", "--ip6tables=false", "--bridge=none",
            f"--storage-driver={self.storage_driver}",
            "--data-root", str(d / "root"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "pid"),
            "-H", f"unix://{d / 'sock'}",
            # A config file of our own, or dockerd would read the host's /etc/docker/daemon.json.
            "--config-file", str(self._write_daemon_json()),
        ]
        if self.mirror_url:
            argv += ["--registry-mirror", self.mirror_url]
        for registry in self.insecure_registries:
            argv += ["--insecure-registry", registry]
        argv += self.extra_args
        env = offline_env()
        self.proc = ManagedProcess(argv, name="dockerd", log_dir=d, env=env, stop_timeout=20.0)
        self.proc.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_daemon_json(self) -> Path:
        path = self._d() / "daemon.json"
        path.write_text("{}\n")
        return path

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            self.proc.check_alive()
            if self.sock.exists():
                result = self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
                if result.returncode == 0:
                    return
                last = result.stderr.decode(errors="replace")
            time.sleep(0.1)
        raise TimeoutError(f"dockerd not ready after {self.start_timeout}s: {last}\n{self.proc.log_text()}")

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containerd), wait, then remove its directory."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        if self.dir is not None:
            _remove_tree(self.dir)
            self.dir = None

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self, tail: int | None = 4000) -> str:
        return self.proc.log_text(tail) if self.proc is not None else ""

    # -- clients ---------------------------------------------------------------------

    def client_env(self) -> dict[str, str]:
        env = offline_env()  # ctr pulls in-process: same blackhole guard as the daemon
        env["DOCKER_HOST"] = self.host
        env["DOCKER_CONFIG"] = str(self._config_dir)
        env.pop("DOCKER_CONTEXT", None)
        return env

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this daemon; raises CommandFailed (with stderr) when check."""
        return run(
            [require_tool("docker"), *args], env=self.client_env(), timeout=timeout, check=check,
            input=input, what="docker " + (args[0] if args else ""),
        )

    def ctr(
        self, *args: str, namespace: str = "test", check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr`` against this daemon's containerd, in its own namespace (not dockerd's "moby")."""
        return run(
            [require_tool("ctr"), "--address", str(self.containerd_sock), "-n", namespace, *args],
            env=self.client_env(), timeout=timeout, check=check, what="ctr " + (args[0] if args else ""),
        )

    def ctr_pull(
        self, ref: str, hosts_dir: Path, *, platform: str | None = None, user: str | None = None,
        namespace: str = "test", timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr images pull --hosts-dir H REF``: containerd resolving through a hosts.toml mirror."""
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        if platform:
            args += ["--platform", platform]
        if user:
            args += ["--user", user]
        return self.ctr(*args, ref, namespace=namespace, timeout=timeout)

    def load(self, image: BuiltImage, name: str, *, workdir: Path | None = None) -> str:
        """Load a built image as ``name`` (``repo:tag``) via skopeo docker-archive + ``docker load``.

        For a multi-arch image, this machine's platform is picked. Returns ``name``.
        """
        tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="load-"))
        archive = tmp / "image.tar"
        try:
            # docker-archive holds one image, so never --all; skopeo picks the host platform.
            skopeo.copy(image.ref, f"docker-archive:{archive}:{name}", all=False, preserve_digests=False)
            self.docker("load", "--input", str(archive))
        finally:
            archive.unlink(missing_ok=True)
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
        return name

    def run_image(self, image: str, *cmd: str, timeout: float = 60.0) -> str:
        """``docker run --rm --network none IMAGE [CMD]``; returns stdout."""
        result = self.docker("run", "--rm", "--network", "none", image, *cmd, timeout=timeout)
        return result.stdout.decode(errors="replace")

    async def adocker(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(self.docker, *args, **kwargs)

    async def actr(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(self.ctr, *args, **kwargs)

    async def actr_pull(self, ref: str, hosts_dir: Path, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(self.ctr_pull, ref, hosts_dir, **kwargs)


def _remove_tree(path: Path) -> None:
    """rmtree, after unmounting anything a crashed daemon left mounted below ``path``."""
    try:
        with open("/proc/self/mounts") as mounts:
            targets = [line.split()[1] for line in mounts if line.split()[1].startswith(str(path) + "/")]
    except OSError:
        targets = []
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["DockerDaemon", "write_hosts_dir", "CommandFailed"]
