"""skopeo, configured so no system file (policy.json, auth.json, registries.d) matters.

Every call gets a permissive ``--policy``, an empty ``--registries.d``, a private
``--tmpdir``, and an empty auth file, so "no creds" really means anonymous and
the outcome doesn't depend on root's ~/.docker/config.json.

From an async test whose server runs on the test's event loop (an aiohttp
TestServer mirror), use the ``a*`` variants: they run skopeo in a thread, so
the loop stays free to answer skopeo's requests.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .procs import CommandFailed, offline_env, require_tool, run

Creds = tuple[str, str]


class SkopeoError(CommandFailed):
    """skopeo exited non-zero; ``str(err)`` carries its stderr."""


_state_dir: Path | None = None


def _state() -> Path:
    """A per-process directory with the permissive policy and an empty auth file."""
    global _state_dir
    if _state_dir is None:
        root = Path(tempfile.mkdtemp(prefix="skopeo-"))
        (root / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (root / "registries.d").mkdir()
        (root / "tmp").mkdir()
        (root / "auth.json").write_text("{}")
        (root / "docker-config").mkdir()
        atexit.register(shutil.rmtree, root, True)
        _state_dir = root
    return _state_dir


def _global_args() -> list[str]:
    state = _state()
    return [
        require_tool("skopeo"),
        "--policy", str(state / "policy.json"),
        "--registries.d", str(state / "registries.d"),
        "--tmpdir", str(state / "tmp"),
    ]


def _env() -> dict[str, str]:
    state = _state()
    env = offline_env()
    env["REGISTRY_AUTH_FILE"] = str(state / "auth.json")
    env["DOCKER_CONFIG"] = str(state / "docker-config")
    env["XDG_RUNTIME_DIR"] = str(state)  # default auth.json lookup lands in our empty dir
    return env


def _creds_args(prefix: str, creds: Creds | None) -> list[str]:
    if creds is None:
        return [f"--{prefix}no-creds"]
    return [f"--{prefix}creds", f"{creds[0]}:{creds[1]}"]


def _is_registry(ref: str) -> bool:
    return ref.startswith("docker://")


def _skopeo(args: Sequence[str], *, timeout: float, what: str) -> bytes:
    argv = [*_global_args(), *args]
    result = run(argv, env=_env(), timeout=timeout, check=False)
    if result.returncode != 0:
        raise SkopeoError(what, argv, result)
    return result.stdout


def copy(
    src: str,
    dst: str,
    *,
    all: bool = True,
    src_creds: Creds | None = None,
    dest_creds: Creds | None = None,
    preserve_digests: bool = True,
    extra: Sequence[str] = (),
    timeout: float = 180.0,
) -> None:
    """``skopeo copy`` between transports (``oci:DIR:TAG``, ``docker://HOST/REPO:TAG``, ``docker-archive:...``).

    TLS verification is off for both sides (plain HTTP on 127.0.0.1).
    ``preserve_digests`` makes skopeo fail rather than silently convert a
    manifest, which would break digest comparisons. It is ignored for
    docker-archive destinations, where a conversion is the point.
    """
    args = ["copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
    if all:
        args.append("--all")
    if preserve_digests and not dst.startswith("docker-archive:"):
        args.append("--preserve-digests")
    if _is_registry(src):
        args += _creds_args("src-", src_creds)
    if _is_registry(dst):
        args += _creds_args("dest-", dest_creds)
    args += [*extra, src, dst]
    _skopeo(args, timeout=timeout, what="skopeo copy")


def inspect_raw(ref: str, creds: Creds | None = None, *, config: bool = False, timeout: float = 60.0) -> bytes:
    """The manifest (or with ``config=True`` the config blob) exactly as the registry serves it."""
    args = ["inspect", "--raw", "--tls-verify=false"]
    if config:
        args.append("--config")
    if _is_registry(ref):
        args += _creds_args("", creds)
    args.append(ref)
    return _skopeo(args, timeout=timeout, what="skopeo inspect")


def inspect(ref: str, creds: Creds | None = None, *, timeout: float = 60.0) -> dict[str, Any]:
    """skopeo's parsed summary (Digest, Architecture, Layers...) for this machine's platform."""
    args = ["inspect", "--tls-verify=false"]
    if _is_registry(ref):
        args += _creds_args("", creds)
    args.append(ref)
    result: dict[str, Any] = json.loads(_skopeo(args, timeout=timeout, what="skopeo inspect"))
    return result


def list_tags(ref: str, creds: Creds | None = None, *, timeout: float = 60.0) -> list[str]:
    """Tags of ``docker://HOST/REPO``."""
    args = ["list-tags", "--tls-verify=false", *_creds_args("", creds), ref]
    tags: list[str] = json.loads(_skopeo(args, timeout=timeout, what="skopeo list-tags")).get("Tags") or []
    return tags


def sha256_of(data: bytes) -> str:
    """The digest a registry gives these manifest bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def acopy(src: str, dst: str, **kwargs: Any) -> None:
    await asyncio.to_thread(copy, src, dst, **kwargs)


async def ainspect_raw(ref: str, creds: Creds | None = None, **kwargs: Any) -> bytes:
    return await asyncio.to_thread(inspect_raw, ref, creds, **kwargs)


async def ainspect(ref: str, creds: Creds | None = None, **kwargs: Any) -> dict[str, Any]:
    return await asyncio.to_thread(inspect, ref, creds, **kwargs)
