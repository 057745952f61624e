"""An OCI image layout — a folder, a tar archive, or an archive cut into pieces — as a `Registry`.

The layout is the air-gap bundle's format and also what skopeo (`oci:DIR:REF`, `oci-archive:FILE:REF`),
crane and oras read and write: `oci-layout`, `index.json`, `blobs/<algorithm>/<hex>`. Images are named in
`index.json` by the `org.opencontainers.image.ref.name` annotation holding the full reference
(`docker.io/library/alpine:3.20`); a repository of this registry is that name without its tag. A layout
another tool wrote with bare tags (`ref.name: 1`) is read as tags of `bare_tags_repository`.

Blobs are never held in memory: a folder is written through temp file + verify + rename, an archive is
written as a stream (header, the blob's bytes as they arrive, padding) and read by the offsets of its
members. A layout being written is built under a `.partial` name and takes its final name only when
`close()` finished: a failed export never leaves something that looks like a bundle.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from mirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    SizeInvalid,
    Unsupported,
)
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import INDEX_TYPES, OCI_INDEX, OCI_MANIFEST, Descriptor, parse_manifest
from mirror.oci.names import validate_tag
from mirror.storage.backend import file_chunks
from mirror.storage.interface import BlobInfo, Manifest, ManifestInfo, PutManifestResult, Registry, TagMoveCheck

REF_NAME = "org.opencontainers.image.ref.name"
# containerd's `ctr import` names images by this one; the OCI one alone would give it bare tags.
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
CHECKSUM_SUFFIX = ".sha256"
PIECE_SUFFIX_DIGITS = 3
READ_PIECE_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
_TAR_BLOCK = 512


class LayoutError(RegistryError):
    """A layout or archive that cannot be read: not a layout, truncated, pieces missing."""

    code, status, default_message = "BLOB_UNKNOWN", 400, "invalid OCI layout"


def split_ref_name(ref: str) -> tuple[str | None, str]:
    """`docker.io/library/alpine:3.20` -> (`docker.io/library/alpine`, `3.20`); a bare `3.20` -> (None, `3.20`)."""
    name, sep, tag = ref.rpartition(":")
    if sep and name and "/" not in tag:
        return name, tag
    return None, ref


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _digest_of_name(name: str) -> Digest | None:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return Digest.parse(f"{parts[1]}:{parts[2]}")
    except RegistryError:
        return None


# -- archives: pieces read as one file ---------------------------------------------------------------


def archive_pieces(path: Path) -> list[Path]:
    """The files of an archive: `FILE.tar` itself, or `FILE.tar.001`, `.002`, ... when it was split.
    `path` may name the archive, any of its pieces or its checksum file."""
    text = str(path)
    for suffix in (CHECKSUM_SUFFIX,):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    base = Path(text)
    if base.suffix[1:].isdigit() and len(base.suffix) == PIECE_SUFFIX_DIGITS + 1:
        base = base.with_suffix("")
    if base.is_file():
        return [base]
    pieces = sorted(base.parent.glob(base.name + "." + "[0-9]" * PIECE_SUFFIX_DIGITS))
    if not pieces:
        raise LayoutError(f"{path}: no such bundle (neither a folder, an archive nor pieces of one)")
    numbers = [int(p.suffix[1:]) for p in pieces]
    expected = list(range(1, len(pieces) + 1))
    if numbers != expected:
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise LayoutError(
            f"{base}: piece(s) missing: " + ", ".join(f"{base.name}.{n:0{PIECE_SUFFIX_DIGITS}d}" for n in missing)
        )
    return pieces


def checksum_file(pieces: list[Path]) -> Path:
    first = pieces[0]
    base = first.with_suffix("") if len(pieces) > 1 or first.suffix[1:].isdigit() else first
    return base.with_name(base.name + CHECKSUM_SUFFIX)


class _Pieces(io.RawIOBase):
    """Read-only, seekable view of several files as one (an archive cut for removable media)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._fds = [os.open(p, os.O_RDONLY) for p in paths]
        self._starts: list[int] = []
        total = 0
        for fd in self._fds:
            self._starts.append(total)
            total += os.fstat(fd).st_size
        self.size = total
        self._pos = 0

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0 and offset < self.size:
            index = bisect.bisect_right(self._starts, offset) - 1
            piece = os.pread(self._fds[index], length, offset - self._starts[index])
            if not piece:
                break
            out += piece
            offset += len(piece)
            length -= len(piece)
        return bytes(out)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.pread(self._pos, len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        super().close()


@dataclass(frozen=True, slots=True)
class _Member:
    offset: int
    size: int


def _index_archive(pieces: _Pieces, where: Path) -> dict[str, _Member]:
    """Blocking: every regular file of the tar and where its bytes are; only headers are read."""
    members: dict[str, _Member] = {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(pieces, 1 << 16), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = os.path.normpath(info.name).lstrip("/")
                if info.offset_data + info.size > pieces.size:
                    raise LayoutError(f"{where}: archive is truncated inside {name}")
                members[name] = _Member(info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise LayoutError(f"{where}: not a readable tar archive ({exc})") from exc
    return members


# -- where a layout's files live ---------------------------------------------------------------------


class _Files:
    """The files of a layout, read and written by relative name. Blocking; called in threads."""

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def pread(self, name: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FolderFiles(_Files):
    def __init__(self, root: Path) -> None:
        self.root = root

    def size(self, name: str) -> int | None:
        try:
            stat = (self.root / name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return stat.st_size

    def pread(self, name: str, offset: int, length: int) -> bytes:
        with open(self.root / name, "rb", buffering=0) as handle:
            return os.pread(handle.fileno(), length, offset)

    def names(self) -> Iterable[str]:
        blobs = self.root / "blobs"
        if not blobs.is_dir():
            return []
        return [f"blobs/{a.name}/{b.name}" for a in blobs.iterdir() if a.is_dir() for b in a.iterdir() if b.is_file()]


class _ArchiveFiles(_Files):
    def __init__(self, pieces: list[Path]) -> None:
        self.pieces = pieces
        # Its own view for tarfile, which closes the file it was given when done.
        self._members = _index_archive(_Pieces(pieces), pieces[0])
        self._view = _Pieces(pieces)

    def size(self, name: str) -> int | None:
        member = self._members.get(name)
        return None if member is None else member.size

    def pread(self, name: str, offset: int, length: int) -> bytes:
        member = self._members[name]
        length = max(0, min(length, member.size - offset))
        data = self._view.pread(member.offset + offset, length)
        if len(data) != length:
            raise LayoutError(f"{self.pieces[0]}: archive is truncated inside {name}")
        return data

    def names(self) -> Iterable[str]:
        return list(self._members)

    def close(self) -> None:
        self._view.close()


# -- writers ------------------------------------------------------------------------------------------


class _Sink:
    """Where a new layout's files go. `put_stream` verifies the digest before the blob counts as written."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    async def put_stream(self, name: str, digest: Digest, chunks: AsyncIterable[bytes], size: int | None) -> int:
        raise NotImplementedError

    async def put_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    async def finish(self) -> list[Path]:
        raise NotImplementedError

    async def abort(self) -> None:
        raise NotImplementedError


def _check(digest: Digest, hasher: Any, size: int, expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise SizeInvalid(f"blob {digest} is {size} bytes, expected {expected_size}")
    if hasher.hexdigest() != digest.hex:
        raise DigestInvalid(f"blob content does not match {digest}", detail={"digest": str(digest)})


class _FolderSink(_Sink):
    def __init__(self, final: Path) -> None:
        super().__init__()
        self.final = final
        self.root = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        (self.root / "blobs").mkdir(parents=True)
        self.temp = self.root / ".tmp"
        self.temp.mkdir()

    async def put_stream(self, name: str, digest: Digest, chunks: AsyncIterable[bytes], size: int | None) -> int:
        temp = self.temp / uuid.uuid4().hex
        try:
            written = await _write_verified(temp, digest, chunks, size)
            await asyncio.to_thread(_place, temp, self.root / name)
        except BaseException:
            await asyncio.to_thread(temp.unlink, True)
            raise
        self.sizes[name] = written
        return written

    async def put_bytes(self, name: str, data: bytes) -> None:
        def write() -> None:
            temp = self.temp / uuid.uuid4().hex
            temp.write_bytes(data)
            _place(temp, self.root / name)

        await asyncio.to_thread(write)
        self.sizes[name] = len(data)

    async def finish(self) -> list[Path]:
        def finish() -> None:
            shutil.rmtree(self.temp, ignore_errors=True)
            os.rename(self.root, self.final)

        await asyncio.to_thread(finish)
        return [self.final]

    async def abort(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root, True)


async def _write_verified(path: Path, digest: Digest, chunks: AsyncIterable[bytes], size: int | None) -> int:
    """Stream `chunks` into `path`, hashing as it goes; raise unless digest (and size, when given) match."""
    handle = await asyncio.to_thread(open, path, "wb")
    hasher = digest.hasher()
    written = 0
    try:
        async for chunk in chunks:
            await asyncio.to_thread(_write_and_hash, handle, hasher, chunk)
            written += len(chunk)
    finally:
        await asyncio.to_thread(handle.close)
    _check(digest, hasher, written, size)
    return written


class _InPlaceFolderSink(_FolderSink):
    """Writes into an existing folder layout (a replication destination): blobs appear verified, one by
    one; index.json is replaced atomically by close(). Nothing is renamed at the end."""

    def __init__(self, root: Path) -> None:
        _Sink.__init__(self)
        self.final = root
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.temp = root / f".mirror-tmp-{uuid.uuid4().hex[:8]}"
        self.temp.mkdir()

    async def finish(self) -> list[Path]:
        await asyncio.to_thread(shutil.rmtree, self.temp, True)
        return [self.final]

    async def abort(self) -> None:
        # Blobs written so far are whole and verified: the next run finds them instead of sending them again.
        await asyncio.to_thread(shutil.rmtree, self.temp, True)


def _write_and_hash(handle: BinaryIO, hasher: Any, chunk: bytes) -> None:
    handle.write(chunk)
    hasher.update(chunk)


def _place(temp: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, target)


class _PieceWriter:
    """Blocking file-like sink that cuts what it is given into pieces of `limit` bytes (or one file)."""

    def __init__(self, directory: Path, base_name: str, limit: int | None) -> None:
        self.directory = directory
        self.base_name = base_name
        self.limit = limit
        self.paths: list[Path] = []
        self.digests: list[str] = []
        self._handle: BinaryIO | None = None
        self._hasher: Any = None
        self._in_piece = 0

    def _next_piece(self) -> None:
        self._close_piece()
        number = len(self.paths) + 1
        name = self.base_name if self.limit is None else f"{self.base_name}.{number:0{PIECE_SUFFIX_DIGITS}d}"
        path = self.directory / name
        self.paths.append(path)
        self._handle = open(path, "wb")
        self._hasher = hashlib.sha256()
        self._in_piece = 0

    def _close_piece(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self.digests.append(self._hasher.hexdigest())
            self._handle = None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._handle is None or (self.limit is not None and self._in_piece >= self.limit):
                self._next_piece()
            assert self._handle is not None
            room = len(view) if self.limit is None else min(len(view), self.limit - self._in_piece)
            self._handle.write(view[:room])
            self._hasher.update(view[:room])
            self._in_piece += room
            view = view[room:]

    def close(self) -> None:
        if self._handle is None and not self.paths:
            self._next_piece()
        self._close_piece()


class _ArchiveSink(_Sink):
    """A tar written front to back as blobs arrive: one blob at a time, its size known before its bytes."""

    def __init__(self, final: Path, split_bytes: int | None) -> None:
        super().__init__()
        self.final = final
        self.work = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        self.work.mkdir(parents=True)
        self.split_bytes = split_bytes
        self._out = _PieceWriter(self.work, final.name, split_bytes)
        self._lock = asyncio.Lock()
        self._broken: BaseException | None = None

    def _header(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        return info.tobuf(format=tarfile.PAX_FORMAT)

    @staticmethod
    def _padding(size: int) -> bytes:
        return b"\0" * (-size % _TAR_BLOCK)

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise LayoutError(f"{self.final}: archive is unusable after an earlier failure") from self._broken

    async def put_stream(self, name: str, digest: Digest, chunks: AsyncIterable[bytes], size: int | None) -> int:
        if size is None:
            # A tar header needs the size first: spool to a temp file, then add it.
            spool = self.work / f".spool-{uuid.uuid4().hex}"
            try:
                size = await _write_verified(spool, digest, chunks, None)
                await self.put_stream(name, digest, file_chunks(spool), size)
            finally:
                await asyncio.to_thread(spool.unlink, True)
            return size
        async with self._lock:
            self._raise_if_broken()
            hasher = digest.hasher()
            written = 0
            try:
                await asyncio.to_thread(self._out.write, self._header(name, size))
                async for chunk in chunks:
                    if written + len(chunk) > size:
                        raise SizeInvalid(f"blob {digest} is longer than {size} bytes")
                    await asyncio.to_thread(_write_and_hash, self._out, hasher, chunk)  # type: ignore[arg-type]
                    written += len(chunk)
                _check(digest, hasher, written, size)
                await asyncio.to_thread(self._out.write, self._padding(size))
            except BaseException as exc:
                # The header promised `size` bytes: nothing else can be appended to this tar.
                self._broken = exc
                raise
        self.sizes[name] = size
        return size

    async def put_bytes(self, name: str, data: bytes) -> None:
        async with self._lock:
            self._raise_if_broken()
            await asyncio.to_thread(self._out.write, self._header(name, len(data)) + data + self._padding(len(data)))
        self.sizes[name] = len(data)

    async def finish(self) -> list[Path]:
        def finish() -> list[Path]:
            self._out.write(b"\0" * (2 * _TAR_BLOCK))
            self._out.close()
            final_paths = []
            for path in self._out.paths:
                target = self.final.with_name(path.name)
                os.replace(path, target)
                final_paths.append(target)
            pairs = zip(self._out.digests, final_paths, strict=True)
            lines = "".join(f"{digest}  {path.name}\n" for digest, path in pairs)
            checksums = self.final.with_name(self.final.name + CHECKSUM_SUFFIX)
            checksums.write_text(lines)
            shutil.rmtree(self.work, ignore_errors=True)
            return final_paths

        async with self._lock:
            self._raise_if_broken()
            return await asyncio.to_thread(finish)

    async def abort(self) -> None:
        def abort() -> None:
            with contextlib.suppress(Exception):
                self._out.close()
            shutil.rmtree(self.work, ignore_errors=True)

        await asyncio.to_thread(abort)


# -- the registry -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """One descriptor of index.json; `repo`/`tag` come from its ref.name (None for an untagged referrer)."""

    descriptor: dict[str, Any]
    repo: str | None
    tag: str | None
    ref: str | None = None  # the annotation as written (a bare tag when `repo` is unknown)

    @property
    def digest(self) -> Digest:
        return Digest.parse(str(self.descriptor.get("digest")))


class LayoutRegistry(Registry):
    """An OCI image layout as a content source or destination of the copier.

    Open an existing layout with `open()` (folder, archive or pieces; read-only) or start a new one with
    `create()` (write; readable as it grows, finished by `close()`). `inherited` (digest -> size) are
    blobs and manifests an earlier bundle carried: a delta layout answers that it has them, so the copier
    leaves them out, and remembers which were asked for (`inherited_used`)."""

    read_only_message = "this OCI layout was opened for reading"

    def __init__(
        self,
        path: Path,
        files: _Files | None,
        sink: _Sink | None,
        entries: list[_Entry],
        *,
        inherited: dict[Digest, int] | None = None,
    ) -> None:
        self.path = path
        self._files = files
        self._sink = sink
        self.entries = entries
        self.inherited = dict(inherited or {})
        self.inherited_used: set[Digest] = set()
        self.written_for: dict[Digest, str] = {}  # digest -> the repository it was first written for
        self.extra_files: dict[str, bytes] = {}
        self._media_types: dict[Digest, str] = {}
        self._subjects: dict[Digest, Descriptor | None] | None = None
        self._carry_over = False  # an archive being rewritten: copy the previous one's blobs at close()
        for entry in entries:
            with contextlib.suppress(RegistryError):
                self._media_types[entry.digest] = str(entry.descriptor.get("mediaType") or "")

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    async def open(cls, path: Path, *, bare_tags_repository: str | None = None) -> LayoutRegistry:
        def open_sync() -> LayoutRegistry:
            files: _Files
            if path.is_dir():
                files = _FolderFiles(path)
            else:
                files = _ArchiveFiles(archive_pieces(path))
            try:
                if files.size(LAYOUT_FILE) is None or files.size(INDEX_FILE) is None:
                    raise LayoutError(
                        f"{path}: not a complete OCI layout (oci-layout and index.json are required; "
                        "a bundle cut short lacks them)"
                    )
                index = _read_json(files, INDEX_FILE, path)
                entries = _entries_of(index, path, bare_tags_repository)
                return cls(path, files, None, entries)
            except BaseException:
                files.close()
                raise

        return await asyncio.to_thread(open_sync)

    @classmethod
    async def create(
        cls, path: Path, *, split_bytes: int | None = None, inherited: dict[Digest, int] | None = None
    ) -> LayoutRegistry:
        """A new layout at `path`: an archive when the name ends in `.tar`, else a folder."""

        def create_sync() -> LayoutRegistry:
            if path.exists() and (path.is_file() or any(path.iterdir())):
                raise LayoutError(f"{path} already exists; export to a new name")
            if path.is_dir():
                path.rmdir()
            path.parent.mkdir(parents=True, exist_ok=True)
            is_archive = path.name.endswith(".tar")
            if split_bytes is not None and not is_archive:
                raise LayoutError("--split cuts an archive into pieces: export to a FILE.tar")
            sink: _Sink = _ArchiveSink(path, split_bytes) if is_archive else _FolderSink(path)
            return cls(path, None, sink, [], inherited=inherited)

        layout = await asyncio.to_thread(create_sync)
        assert layout._sink is not None
        await layout._sink.put_bytes(LAYOUT_FILE, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        return layout

    @classmethod
    async def update(cls, path: Path) -> LayoutRegistry:
        """A layout kept up to date in place (a replication destination `oci_layout: DIR` or
        `archive: FILE.tar`), created if missing. A folder gets new blobs verified one by one and a new
        index.json at close(); an interrupted run leaves the previous index.json, and the blobs it did
        write are found by the next run. An archive is rewritten whole: the previous one's content and the
        new, under a temporary name, then renamed over it at close()."""

        def update_sync() -> LayoutRegistry:
            previous: _Files | None = None
            sink: _Sink
            if path.name.endswith(".tar"):
                if path.is_file():
                    previous = _ArchiveFiles([path])
                path.parent.mkdir(parents=True, exist_ok=True)
                sink = _ArchiveSink(path, None)
            else:
                path.mkdir(parents=True, exist_ok=True)
                previous = _FolderFiles(path)
                sink = _InPlaceFolderSink(path)
            entries: list[_Entry] = []
            if previous is not None and previous.size(INDEX_FILE) is not None:
                entries = _entries_of(_read_json(previous, INDEX_FILE, path), path, None)
            layout = cls(path, previous, sink, entries)
            layout._carry_over = isinstance(previous, _ArchiveFiles)
            return layout

        layout = await asyncio.to_thread(update_sync)
        assert layout._sink is not None
        if layout._carry_over or layout._files is None or layout._files.size(LAYOUT_FILE) is None:
            await layout._sink.put_bytes(LAYOUT_FILE, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        return layout

    async def close(self) -> list[Path]:
        """Finish a new layout (index.json and extra files last) and give it its final name; returns
        the files written (the folder, or the archive's pieces). For an opened layout: release it."""
        if self._sink is None:
            if self._files is not None:
                await asyncio.to_thread(self._files.close)
            return []
        if self._carry_over and self._files is not None:
            await self._copy_previous_blobs(self._files, self._sink)
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [entry.descriptor for entry in self.entries],
        }
        await self._sink.put_bytes(INDEX_FILE, json.dumps(index, indent=1).encode())
        for name, data in self.extra_files.items():
            await self._sink.put_bytes(name, data)
        written = await self._sink.finish()
        if self._files is not None:
            await asyncio.to_thread(self._files.close)
        return written

    async def _copy_previous_blobs(self, previous: _Files, sink: _Sink) -> None:
        """An archive being rewritten keeps every blob of the one it replaces."""
        for name in await asyncio.to_thread(lambda: list(previous.names())):
            digest = _digest_of_name(name)
            size = previous.size(name)
            if digest is None or size is None or name in sink.sizes:
                continue
            await sink.put_stream(name, digest, self._previous_stream(previous, name, size), size)

    @staticmethod
    async def _previous_stream(previous: _Files, name: str, size: int) -> AsyncIterator[bytes]:
        offset = 0
        while offset < size:
            piece = await asyncio.to_thread(previous.pread, name, offset, READ_PIECE_BYTES)
            if not piece:
                raise LayoutError(f"{name} is shorter than its recorded size")
            offset += len(piece)
            yield piece

    async def abort(self) -> None:
        """Drop a layout being written (nothing of it remains) or release an opened one."""
        if self._sink is not None:
            await self._sink.abort()
        if self._files is not None:
            await asyncio.to_thread(self._files.close)

    # -- reading helpers -------------------------------------------------------------------------------
    def _writable(self) -> _Sink:
        if self._sink is None:
            raise Unsupported(self.read_only_message)
        return self._sink

    def _size(self, name: str) -> int | None:
        if self._sink is not None and name in self._sink.sizes:
            return self._sink.sizes[name]
        return None if self._files is None else self._files.size(name)

    async def read_file(self, name: str, limit: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """A small file of an opened layout (index.json, a manifest, the bundle manifest), or None."""
        if self._files is None:
            return self.extra_files.get(name)
        files = self._files

        def read() -> bytes | None:
            size = files.size(name)
            if size is None:
                return None
            if size > limit:
                raise ManifestInvalid(f"{name} in {self.path} is larger than {limit} bytes")
            return files.pread(name, 0, size)

        return await asyncio.to_thread(read)

    def blob_names(self) -> list[tuple[Digest, int]]:
        """Blocking: every blob the layout carries, with its size."""
        if self._files is None:
            return []
        found = []
        for name in self._files.names():
            digest = _digest_of_name(name)
            size = self._files.size(name)
            if digest is not None and size is not None:
                found.append((digest, size))
        return found

    async def hash_blob(self, digest: Digest) -> tuple[str, int]:
        """The actual hex digest and size of a carried blob (read in pieces, in a thread)."""
        files = self._files
        if files is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        name = _blob_name(digest)

        def digest_sync() -> tuple[str, int]:
            hasher = digest.hasher()
            size = files.size(name) or 0
            offset = 0
            while offset < size:
                piece = files.pread(name, offset, 4 * READ_PIECE_BYTES)
                if not piece:
                    raise LayoutError(f"{self.path}: {name} is shorter than its recorded size")
                hasher.update(piece)
                offset += len(piece)
            return hasher.hexdigest(), offset

        return await asyncio.to_thread(digest_sync)

    def carries(self, digest: Digest) -> bool:
        """Blocking: whether the layout itself holds the bytes of `digest`."""
        return self._size(_blob_name(digest)) is not None

    def tag_digest(self, repo: str, tag: str) -> Digest | None:
        entry = self._tagged(repo, tag)
        return None if entry is None else entry.digest

    # -- Registry: blobs -------------------------------------------------------------------------------
    async def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        size = await asyncio.to_thread(self._size, _blob_name(digest))
        if size is None:
            if digest in self.inherited:
                self.inherited_used.add(digest)
                return BlobInfo(digest, self.inherited[digest])
            raise BlobUnknown(detail={"digest": str(digest)})
        return BlobInfo(digest, size)

    def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        return self._stream(digest, start)

    async def _stream(self, digest: Digest, start: int) -> AsyncIterator[bytes]:
        files = self._files
        name = _blob_name(digest)
        size = None if files is None else await asyncio.to_thread(files.size, name)
        if files is None or size is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        offset = start
        while offset < size:
            piece = await asyncio.to_thread(files.pread, name, offset, READ_PIECE_BYTES)
            if not piece:
                raise LayoutError(f"{self.path}: {name} is shorter than its recorded size")
            offset += len(piece)
            yield piece

    async def open_blob(self, repo: str, digest: Digest) -> Any:
        raise Unsupported("an OCI layout serves blobs as streams only")

    async def put_blob(
        self, repo: str, digest: Digest, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> BlobInfo:
        written = await self._writable().put_stream(_blob_name(digest), digest, chunks, size)
        self.written_for.setdefault(digest, repo)
        return BlobInfo(digest, written)

    async def mount_blob(self, repo: str, source_repo: str, digest: Digest) -> bool:
        # Blobs are not per repository in a layout: anything written is there for every name.
        return await asyncio.to_thread(self._size, _blob_name(digest)) is not None

    # -- Registry: manifests ---------------------------------------------------------------------------
    def _tagged(self, repo: str, tag: str) -> _Entry | None:
        return next((e for e in reversed(self.entries) if e.repo == repo and e.tag == tag), None)

    async def _resolve(self, repo: str, reference: str) -> tuple[Digest, str | None]:
        if looks_like_digest(reference):
            return Digest.parse(reference), None
        entry = self._tagged(repo, reference)
        if entry is None:
            raise ManifestUnknown(detail={"reference": f"{repo}:{reference}"})
        return entry.digest, str(entry.descriptor.get("mediaType") or "") or None

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        digest, media_type = await self._resolve(repo, reference)
        size = await asyncio.to_thread(self._size, _blob_name(digest))
        if size is None:
            if digest in self.inherited:
                self.inherited_used.add(digest)
                return ManifestInfo(digest, media_type or self._media_types.get(digest, ""), self.inherited[digest])
            raise ManifestUnknown(detail={"reference": reference})
        if media_type is None:
            media_type = self._media_types.get(digest) or (await self.get_manifest(repo, str(digest))).media_type
        return ManifestInfo(digest, media_type, size)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        digest, media_type = await self._resolve(repo, reference)
        body = await self.read_file(_blob_name(digest))
        if body is None:
            raise ManifestUnknown(detail={"reference": reference})
        if Digest.of(body, digest.algorithm) != digest:
            raise DigestInvalid(f"manifest {digest} in {self.path} does not match its digest")
        media_type = media_type or self._media_types.get(digest) or _media_type_of(body)
        parsed = parse_manifest(body, media_type)
        for child in parsed.manifests:
            self._media_types.setdefault(child.digest, child.media_type)
        return Manifest(digest, parsed.media_type, body)

    async def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None,
        *, on_tag_move: TagMoveCheck | None = None,
    ) -> PutManifestResult:
        self._refuse_tag_move_check(on_tag_move)
        sink = self._writable()
        if len(body) > MAX_MANIFEST_BYTES:
            raise ManifestInvalid(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        parsed = parse_manifest(body, content_type)
        digest = Digest.of(body)
        if looks_like_digest(reference) and Digest.parse(reference) != digest:
            raise DigestInvalid(f"manifest digest {digest} does not match {reference}")
        name = _blob_name(digest)
        if digest in self.inherited:
            self.inherited_used.add(digest)
        elif name not in sink.sizes:
            await sink.put_bytes(name, body)
            self.written_for.setdefault(digest, repo)
        self._media_types[digest] = parsed.media_type
        descriptor: dict[str, Any] = {"mediaType": parsed.media_type, "digest": str(digest), "size": len(body)}
        if not looks_like_digest(reference):
            tag = validate_tag(reference)
            full = f"{repo}:{tag}"
            self.entries = [e for e in self.entries if not (e.repo == repo and e.tag == tag)]
            descriptor["annotations"] = {REF_NAME: full, CONTAINERD_NAME: full}
            self.entries.append(_Entry(descriptor, repo, tag, full))
        elif parsed.subject is not None and not any(e.digest == digest for e in self.entries):
            # Listed untagged so oras and crane find referrers (they walk index.json for subjects).
            if parsed.artifact_type:
                descriptor["artifactType"] = parsed.artifact_type
            self.entries.append(_Entry(descriptor, None, None))
        return PutManifestResult(digest, parsed.subject.digest if parsed.subject else None)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        """Drop a tag (or every entry of a digest) from index.json; blobs stay until the layout is rebuilt."""
        self._writable()
        if looks_like_digest(reference):
            digest = Digest.parse(reference)
            kept = [e for e in self.entries if e.digest != digest]
        else:
            kept = [e for e in self.entries if not (e.repo == repo and e.tag == reference)]
        if len(kept) == len(self.entries):
            raise ManifestUnknown(detail={"reference": reference})
        self.entries = kept

    # -- Registry: discovery ---------------------------------------------------------------------------
    async def list_tags(self, repo: str) -> list[str]:
        tags = sorted({e.tag for e in self.entries if e.repo == repo and e.tag is not None})
        if not tags:
            raise NameUnknown(detail={"name": repo})
        return tags

    async def list_repositories(self) -> list[str]:
        return sorted({e.repo for e in self.entries if e.repo is not None})

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        if self._subjects is None:
            subjects: dict[Digest, Descriptor | None] = {}
            for entry in self.entries:
                try:
                    manifest = await self.get_manifest(repo, str(entry.digest))
                    subjects[entry.digest] = parse_manifest(manifest.body, manifest.media_type).subject
                except RegistryError:
                    subjects[entry.digest] = None
            self._subjects = subjects
        found = []
        for entry in self.entries:
            found_subject = self._subjects.get(entry.digest)
            if found_subject is None or found_subject.digest != subject:
                continue
            manifest = await self.get_manifest(repo, str(entry.digest))
            parsed = parse_manifest(manifest.body, manifest.media_type)
            found.append(Descriptor(parsed.media_type, entry.digest, len(manifest.body),
                                    artifact_type=parsed.artifact_type, annotations=parsed.annotations or None))
        return found


class _LayoutDestination(Protocol):
    @property
    def path(self) -> Path | None: ...


async def open_layout_destination(spec: _LayoutDestination, stack: contextlib.AsyncExitStack) -> LayoutRegistry:
    """A rule's `{oci_layout: DIR}` or `{archive: FILE.tar}` destination, updated in place; `stack`
    finishes it (index.json written with every image whose copy completed, even when the run failed:
    the copier tags an image only once all of it is there)."""
    if spec.path is None:
        raise LayoutError("an oci_layout or archive destination needs a path")
    layout = await LayoutRegistry.update(Path(spec.path))
    stack.push_async_callback(layout.close)
    return layout


def _media_type_of(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
    declared = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    return OCI_INDEX if isinstance(document, dict) and "manifests" in document else OCI_MANIFEST


def _read_json(files: _Files, name: str, where: Path) -> Any:
    size = files.size(name) or 0
    if size > MAX_MANIFEST_BYTES * 4:
        raise LayoutError(f"{where}: {name} is implausibly large ({size} bytes)")
    try:
        return json.loads(files.pread(name, 0, size))
    except ValueError as exc:
        raise LayoutError(f"{where}: {name} is not valid JSON ({exc})") from exc


def _entries_of(index: Any, where: Path, bare_tags_repository: str | None) -> list[_Entry]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise LayoutError(f"{where}: index.json has no manifests list")
    entries = []
    for i, raw in enumerate(manifests):
        if not isinstance(raw, dict) or not isinstance(raw.get("digest"), str):
            raise LayoutError(f"{where}: index.json manifests[{i}] is not a descriptor")
        try:
            Digest.parse(raw["digest"])
        except RegistryError as exc:
            raise LayoutError(f"{where}: index.json manifests[{i}] has an invalid digest") from exc
        raw_annotations = raw.get("annotations")
        annotations: dict[str, Any] = raw_annotations if isinstance(raw_annotations, dict) else {}
        found = annotations.get(REF_NAME) or annotations.get(CONTAINERD_NAME)
        ref = found if isinstance(found, str) and found else None
        repo: str | None = None
        tag: str | None = None
        if ref is not None:
            repo, tag = split_ref_name(ref)
            if repo is None:
                repo = bare_tags_repository
        entries.append(_Entry(dict(raw), repo, tag if repo is not None else None, ref))
    return entries


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES
