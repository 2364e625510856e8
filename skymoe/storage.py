"""fsspec storage: a local folder by default, ``s3://`` (any S3-compatible endpoint) when configured.

Object stores have no atomic rename, so every write here puts a whole object at once (a local
write goes to a temporary name and is renamed). Completion is then recorded by a separate small
object written afterwards (a done-record or a manifest), never inferred from a file's presence.
"""

from __future__ import annotations

import glob as globlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from skymoe.config import StorageConfig

T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage location is unusable (missing bucket, no permission, bad endpoint)."""


@dataclass(frozen=True)
class Storage:
    """Opens URIs with the right filesystem and options.

    The options hold an endpoint and region only; credentials are left to botocore's standard
    lookup (environment, profile), so nothing secret is ever serialized with a ``Storage``.
    """

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    retries: int = 4

    @classmethod
    def from_config(cls, config: StorageConfig) -> "Storage":
        return cls(s3_endpoint_url=config.s3.endpoint_url, s3_region=config.s3.region)

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec options for a URI. S3 listings are never cached: done-records are written by
        other processes (executor workers, a resumed run), and a cached listing would hide them."""
        if not uri.startswith("s3://"):
            return {}
        client_kwargs: dict[str, Any] = {}
        endpoint = self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.s3_region:
            client_kwargs["region_name"] = self.s3_region
        return {"use_listings_cache": False, **({"client_kwargs": client_kwargs} if client_kwargs else {})}

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem and the path inside it."""
        return url_to_fs(uri, **self.options(uri))

    # -------------------------------------------------------------------------------- reading
    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return self._retry(lambda: fs.exists(path))

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        return self._retry(lambda: fs.cat_file(path))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def open_read(self, uri: str) -> IO[bytes]:
        """A seekable binary file for streaming reads: large inputs are never held whole, and
        Parquet readers fetch only the row groups they ask for (ranged requests on S3)."""
        fs, path = self.fs(uri)
        return self._retry(lambda: fs.open(path, "rb"))

    def size(self, uri: str) -> int:
        fs, path = self.fs(uri)
        return int(self._retry(lambda: fs.size(path)))

    def disk_usage(self, uri: str) -> int:
        """Total bytes of every file under a folder or prefix (the file's size for a file, 0 when absent).

        One recursive listing with sizes (``find(detail=True)``), not fsspec's ``du``, which asks
        for each object's info again: on S3 that is a request per object.
        """
        fs, path = self.fs(uri)
        found = self._retry(lambda: fs.find(path, detail=True))
        return sum(int(info.get("size") or 0) for info in found.values() if info.get("type") != "directory")

    def listdir(self, uri: str) -> list[str]:
        """Immediate children of a folder as full URIs, sorted; empty when the folder is absent."""
        fs, path = self.fs(uri)
        if not self._retry(lambda: fs.exists(path)):
            return []
        entries = self._retry(lambda: fs.ls(path, detail=False))
        return sorted(join(uri, os.path.basename(e.rstrip("/"))) for e in entries if e.rstrip("/") != path.rstrip("/"))

    def files(self, uri: str) -> list[str]:
        """Every file under a folder or prefix, recursively, as full URIs, sorted; empty when absent."""
        fs, path = self.fs(uri)
        found = self._retry(lambda: fs.find(path, detail=True))
        root = path.rstrip("/")
        return sorted(join(uri, name[len(root) + 1:]) for name, info in found.items()
                      if info.get("type") == "file" and name.startswith(root + "/") and not name.endswith("/"))

    def expand(self, pattern: str, hidden: bool = False) -> list[str]:
        """Files named by a file URI, a folder (recursively) or a glob, as sorted full URIs.

        Hidden files (see :meth:`is_hidden`: editor and tool leftovers such as ``.ipynb_checkpoints/``,
        ``_SUCCESS``, ``_tmp/``) are left out unless ``hidden``; a caller that must account for every
        file (the cleaning stage's inputs) lists them and says why it does not read them.
        """
        fs, path = self.fs(pattern)
        protocol = _protocol(pattern)
        if globlib.has_magic(path):
            found = self._retry(lambda: fs.glob(path))
            files = [p for p in found if self._retry(lambda p=p: fs.isfile(p))]
        elif self._retry(lambda: fs.isdir(path)):
            files = self._retry(lambda: fs.find(path))
        elif self._retry(lambda: fs.isfile(path)):
            files = [path]
        else:
            files = []
        root = _listing_root(path)
        return sorted(f"{protocol}://{f}" if protocol else f for f in files if hidden or not _hidden(f, root))

    def is_hidden(self, uri: str, pattern: str) -> bool:
        """Whether ``uri``, one of the files ``pattern`` expands to, is hidden: its name, or a folder's
        between it and the folder the pattern names, starts with '.' or '_'. A file named by the pattern
        itself is never hidden (naming it is asking for it)."""
        return _hidden(self.fs(uri)[1], _listing_root(self.fs(pattern)[1]))

    def checksum(self, uri: str) -> str:
        """A content checksum: xxh3 of the bytes for local files, the store's ETag for objects."""
        fs, path = self.fs(uri)
        if _protocol(uri):
            info = self._retry(lambda: fs.info(path))
            tag = info.get("ETag") or info.get("etag") or info.get("md5") or info.get("checksum")
            if tag:
                return f"etag:{str(tag).strip(chr(34))}:{info.get('size')}"
        import xxhash

        digest = xxhash.xxh3_128()
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return f"xxh3:{digest.hexdigest()}"

    def link(self, uri: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A link a browser can open: a presigned HTTP URL for an object (it carries a signature
        and the access key's id, never the secret), a ``file://`` URL for a local path."""
        fs, path = self.fs(uri)
        if _protocol(uri) == "s3":
            return self._retry(lambda: fs.url(path, expires=expires_s))
        if not _protocol(uri):
            return Path(path).resolve().as_uri()
        return uri

    # -------------------------------------------------------------------------------- writing
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object: readers never see it half-written."""
        fs, path = self.fs(uri)
        if _protocol(uri):
            self._retry(lambda: fs.pipe_file(path, data))
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # a done-record must never point at bytes still in the page cache
        os.replace(tmp, path)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    @contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary file for streaming writes that appears whole or not at all, like ``write_bytes``:
        a local file is written under a temporary name and renamed on success; an S3 object is a
        multipart upload that only becomes visible when completed (and is aborted on error)."""
        fs, path = self.fs(uri)
        if _protocol(uri):
            handle = self._retry(lambda: fs.open(path, "wb"))
            try:
                yield handle
            except BaseException:
                handle.discard()  # abort the multipart upload: closing would publish a partial object
                raise
            handle.close()
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)

    def check_writable_root(self, uri: str) -> None:
        """Fail early with a clear message when a root cannot be used (e.g. missing bucket)."""
        fs, path = self.fs(uri)
        if not _protocol(uri):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise StorageError(f"cannot create root folder {uri}: {err}") from None
            if not os.access(path, os.W_OK):
                raise StorageError(f"root folder {uri} is not writable")
            return
        if _protocol(uri) == "s3":
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)  # not exists(): s3fs answers False for an endpoint it cannot reach, too
            except FileNotFoundError:
                raise StorageError(f"s3 bucket '{bucket}' does not exist (root {uri})") from None
            except Exception as err:  # endpoint unreachable, bad credentials, ...
                raise StorageError(f"cannot reach s3 bucket '{bucket}' for root {uri}: {err}") from None

    def _retry(self, action: Callable[[], T]) -> T:
        """Retry transient store errors with exponential backoff; missing things fail at once. A store
        that stays unreachable ends the run with a :class:`StorageError` that says how to go on, not a
        botocore traceback: everything finished is recorded, so the same command resumes."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
                raise
            except (OSError, *_unreachable_store_errors()) as err:
                if attempt < self.retries:
                    time.sleep(0.2 * 2**attempt)
                elif isinstance(err, _unreachable_store_errors()):
                    raise StorageError(f"the object store did not answer ({self.retries + 1} attempts): {err}. "
                                       "Finished work is recorded: run the same command again to resume") from err
                else:
                    raise
        raise AssertionError("unreachable")


def _unreachable_store_errors() -> tuple[type[BaseException], ...]:
    """botocore's "cannot connect" errors, which s3fs passes on untranslated (not OSErrors)."""
    try:
        from botocore.exceptions import ConnectionError as EndpointUnreachable, HTTPClientError
    except ImportError:  # no S3 support installed: nothing of the kind can be raised
        return ()
    return EndpointUnreachable, HTTPClientError


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def _first_magic(path: str) -> int:
    return min(i for i, ch in enumerate(path) if ch in "*?[")


def _listing_root(path: str) -> str:
    """The folder a pattern lists below: the path itself, or a glob's fixed leading folder."""
    return path.rstrip("/") if not globlib.has_magic(path) else path[: _first_magic(path)].rsplit("/", 1)[0]


def _hidden(path: str, root: str) -> bool:
    """Hidden files and anything in hidden folders below the listed root (.ipynb_checkpoints/, _tmp/)."""
    below = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
    return any(part.startswith((".", "_")) for part in below.split("/") if part)

