"""A small file store over a URI: a local directory, or ``s3://`` / ``gs://`` through ``pyarrow.fs``.

This is the same mechanism Ray Train uses for ``storage_path``. The registry needs only five
things from it: read a file, write a file so readers never see a partial one, create a file
only if it does not exist yet (the commit point of a publish), list a directory, and check
existence. Local directories get true atomicity (temp file + ``os.replace`` / ``os.link``);
object stores get it from their atomic single-object PUT, and ``create_exclusive`` there is a
write followed by a read-back check (documented in the README: pyarrow exposes no conditional
PUT).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to check."""


@dataclass(frozen=True)
class Storage:
    """Files under one root URI. Paths passed to methods are relative, ``/``-separated."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def from_uri(cls, uri: str) -> Storage:
        """Open a store; a bare path or ``file://`` URI is created if missing."""
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
            Path(uri).mkdir(parents=True, exist_ok=True)
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises several types for bad URIs
            raise StorageError(f"cannot open artifact store {uri!r}: {exc}; "
                               "fix: use a local path, file://, s3:// or gs:// URI") from exc
        if isinstance(fs, pafs.LocalFileSystem):
            Path(root).mkdir(parents=True, exist_ok=True)
        return cls(uri=uri, fs=fs, root=root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _full(self, rel: str) -> str:
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise StorageError(f"path {rel!r} escapes the store root")
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str) -> Path | None:
        """The path on this machine's disk, or None for an object store."""
        return Path(self._full(rel)) if self.is_local else None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._full(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """Whole file contents; raises FileNotFoundError naming the path if missing."""
        full = self._full(rel)
        try:
            with self.fs.open_input_stream(full) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no file {rel!r}") from None
        except OSError as exc:
            if self.fs.get_file_info(full).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.uri}: no file {rel!r}") from None
            raise StorageError(f"{self.uri}: cannot read {rel!r}: {exc}") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file so that readers see either the old or the new contents."""
        full = self._full(rel)
        if self.is_local:
            target = Path(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(full) as f:  # a single PUT: atomic on S3/GCS
            f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` only if it does not exist. True if this call created it.

        This is the commit point of a publish: two writers racing for the same version number
        get exactly one winner, and the file is never seen half-written.
        """
        full = self._full(rel)
        if self.is_local:
            target = Path(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, target)  # atomic, fails if target exists
                return True
            except FileExistsError:
                return False
            finally:
                Path(tmp).unlink(missing_ok=True)
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        # Object stores: last writer wins; the manifest holds a unique blob id, so reading it
        # back tells whether this call won the race.
        return self.read_bytes(rel) == data

    def modified_at(self, rel: str) -> float | None:
        """The file's modification time (Unix seconds) as the store reports it; None if unknown."""
        info = self.fs.get_file_info(self._full(rel))
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return None
        return info.mtime.timestamp()

    def list_dir(self, rel: str) -> list[str]:
        """Names (not paths) of the direct children of ``rel``; empty if it does not exist."""
        selector = pafs.FileSelector(self._full(rel), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete_file(self, rel: str) -> None:
        """Remove one file; a missing file is not an error."""
        full = self._full(rel)
        if self.fs.get_file_info(full).type != pafs.FileType.NotFound:
            self.fs.delete_file(full)

    def delete_dir(self, rel: str) -> None:
        """Remove a directory tree (used only for garbage collection of unpublished blobs)."""
        full = self._full(rel)
        if self.fs.get_file_info(full).type != pafs.FileType.NotFound:
            self.fs.delete_dir(full)
