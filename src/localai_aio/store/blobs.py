"""Where uploaded files and generated images live: a blob store that several replicas can share.

Records (which files exist, their names and purposes) belong to the database; the bytes belong here, so
that any replica can serve what another one stored. Two kinds:

- ``LocalBlobs``: a directory, the default (``--config-dir``, where earlier versions kept the same files
  under the same names) and right for a volume that the replicas mount together;
- ``S3Blobs``: S3-compatible object storage (``--blob-url s3://bucket/prefix``), through boto3, which
  finds the endpoint (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``), the region and the credentials where
  every AWS tool looks for them.

Bytes arrive in a local staging file first (an upload streamed from the client, an image just encoded)
and ``put`` makes them durable under their key in one step, so nobody ever reads half a blob. Blobs are
never rewritten under the same key, which is what lets ``S3Blobs`` keep downloaded copies without asking
whether they are out of date. Every method blocks: callers run them in the thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

#: Staged files untouched for this long are leftovers of a crash. An upload in progress keeps touching its
#: file and a staged image is stored within milliseconds, so a replica starting on a shared volume never
#: removes what another replica is still writing.
STAGING_GRACE = 3600.0
#: S3Blobs: a downloaded copy nobody asked for in this long is removed by ``sweep_staging``.
CACHE_MAX_AGE = 24 * 3600.0
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: float  # unix seconds


class BlobUnavailable(Exception):
    """The blob service cannot be reached or refuses us (network, 5xx, credentials, missing bucket): nothing
    is known about the blob itself, so callers answer "try again later", never "not found"."""


class BlobNotFound(LookupError):
    """No blob under this key."""


class BlobStore(Protocol):
    """All methods are blocking (called from a thread pool); keys are like 'files/file-abc' or
    'generated-images/<32hex>.png'."""

    description: str  # e.g. "directory /x/y" or "s3://bucket/prefix", for log lines

    def staging_path(self) -> Path:
        """A fresh local path (its folder exists, the file does not) on which to receive bytes before ``put``."""
        ...

    def put(self, key: str, staged: Path) -> int:
        """Make ``staged`` durable under ``key`` (on disk or uploaded once this returns) and return its size.
        ``staged`` is gone afterwards, also when this fails: the caller has nothing to clean up."""
        ...

    def fetch(self, key: str) -> Path:
        """A local readable path holding the blob's bytes (S3: a copy downloaded once); raises ``BlobNotFound``."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the blob; a missing one is fine."""
        ...

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix``."""
        ...

    def sweep_staging(self, older_than: float = STAGING_GRACE) -> int:
        """Remove staged files a crash left behind (and, where there are any, stale downloaded copies);
        returns how many files were removed."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


@dataclass(frozen=True)
class BlobLocation:
    """What a blob URL names: a directory (``path``) or an S3 bucket and prefix."""

    kind: str  # "local" or "s3"
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""


def parse_url(url: str) -> BlobLocation | None:
    """The one check of ``--blob-url`` (the settings call it, ``from_url`` uses it): None for '' (the config
    dir); ValueError with a one-line message for anything but file:///abs/dir or s3://bucket[/prefix]."""
    if not url:
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise ValueError(f"blob URL {url!r}: a query or fragment is not allowed")
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"blob URL {url!r}: a file URL names an absolute directory, file:///abs/dir")
        return BlobLocation("local", path=Path(path))
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.match(bucket):
            raise ValueError(f"blob URL {url!r}: expected s3://bucket or s3://bucket/prefix with a valid bucket name")
        prefix = unquote(parts.path).strip("/")
        if prefix and not _valid_key(prefix):
            raise ValueError(f"blob URL {url!r}: the prefix must be path segments without '.', '..' or '//'")
        return BlobLocation("s3", bucket=bucket, prefix=prefix)
    raise ValueError(f"blob URL {url!r}: expected file:///abs/dir or s3://bucket/prefix")


def from_url(url: str | None, local_root: Path) -> BlobStore:
    """'' or None -> LocalBlobs(local_root); 'file:///abs/dir' -> LocalBlobs(that dir); 's3://bucket/prefix'
    -> S3Blobs(bucket, prefix, staging under local_root/'.blob-staging'). A bad URL, or S3 without boto3:
    ValueError with a one-line message."""
    location = parse_url(url or "")
    if location is None:
        return LocalBlobs(local_root)
    if location.kind == "local":
        assert location.path is not None
        return LocalBlobs(location.path)
    return S3Blobs(location.bucket, location.prefix, local_root / ".blob-staging")


def _valid_key(key: str) -> bool:
    # Segments starting with '.' are refused: they are where staging files and caches live.
    return bool(key) and "\\" not in key and "\0" not in key and all(
        part and not part.startswith(".") for part in key.split("/"))


def _check_key(key: str) -> str:
    if not _valid_key(key):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix and not _valid_key(prefix.removesuffix("/")):
        raise ValueError(f"invalid blob key prefix {prefix!r}")
    return prefix


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(paths: Iterator[Path], older_than: float) -> int:
    cutoff = time.time() - older_than
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed += 1
    return removed


class LocalBlobs:
    """Blobs as files: ``root/<key>``. Staging is ``root/.staging``, on the same file system, so that
    ``put`` is a rename."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.description = f"directory {self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def staging_path(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"upload-{secrets.token_hex(16)}"

    def put(self, key: str, staged: Path) -> int:
        try:
            final = self._path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            with staged.open("rb") as f:
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            os.replace(staged, final)
            _fsync_dir(final.parent)
            return size
        finally:
            staged.unlink(missing_ok=True)

    def fetch(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        folder = _check_prefix(prefix).rpartition("/")[0]
        for dirpath, dirnames, filenames in os.walk(self.root / folder if folder else self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                key = name if rel == "." else f"{rel}/{name}"
                if name.startswith(".") or not key.startswith(prefix):
                    continue
                try:
                    stat = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # deleted while we looked
                    continue
                yield BlobInfo(key, stat.st_size, stat.st_mtime)

    def sweep_staging(self, older_than: float = STAGING_GRACE) -> int:
        # Earlier versions staged uploads as files/.upload-* and images as generated-images/.*.tmp.
        old = [*self.root.glob("files/.upload-*"), *self.root.glob("generated-images/.*.tmp")]
        staged = list(self.staging.iterdir()) if self.staging.is_dir() else []
        return _remove_stale(iter(staged + old), older_than)

    def close(self) -> None:
        pass


class S3Blobs:
    """Blobs as objects ``<prefix>/<key>`` in one bucket. Staging and downloaded copies are local, under
    ``staging_root`` (downloaded copies in ``staging_root/cache/<key>``)."""

    def __init__(self, bucket: str, prefix: str, staging_root: Path):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ValueError("S3 blob storage needs boto3: pip install 'localai-aio[s3]'") from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.staging = Path(staging_root)
        self.cache = self.staging / "cache"
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # A short connect timeout and few retries: an unreachable store fails the request in seconds.
        config = Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        self._client: Any = boto3.session.Session().client("s3", config=config)

    def _object(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _calling(self, key: str | None = None) -> Iterator[None]:
        """Turn boto3's failures into ``BlobNotFound`` (when about ``key``) or ``BlobUnavailable``."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if key is not None and code in ("404", "NoSuchKey", "NotFound"):  # not NoSuchBucket: a broken setup
                raise BlobNotFound(key) from exc
            raise BlobUnavailable(f"{self.description}: {code} {error.get('Message') or ''}".rstrip()) from exc
        except (ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError,
                CredentialRetrievalError, S3UploadFailedError, RetriesExceededError) as exc:
            raise BlobUnavailable(f"{self.description}: {exc}") from exc

    def staging_path(self, kind: str = "upload") -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{kind}-{secrets.token_hex(16)}"

    def put(self, key: str, staged: Path) -> int:
        try:
            name = self._object(key)
            size = staged.stat().st_size
            with self._calling():
                self._client.upload_file(str(staged), self.bucket, name)
            return size
        finally:
            staged.unlink(missing_ok=True)

    def fetch(self, key: str) -> Path:
        name = self._object(key)
        cached = self.cache / key
        if cached.is_file():
            # The copy cannot be stale, but another replica may have deleted the object since.
            if not self.exists(key):
                cached.unlink(missing_ok=True)
                raise BlobNotFound(key)
            with contextlib.suppress(FileNotFoundError):
                os.utime(cached)  # in use: sweep_staging keeps it
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = self.staging_path("download")
        try:
            with self._calling(key):
                self._client.download_file(self.bucket, name, str(part))
            os.replace(part, cached)  # whole or not at all, also when two requests download it at once
        finally:
            part.unlink(missing_ok=True)
        return cached

    def exists(self, key: str) -> bool:
        try:
            with self._calling(key):
                self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._calling():
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
        (self.cache / key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=root + _check_prefix(prefix))
        with self._calling():
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield BlobInfo(obj["Key"][len(root):], obj["Size"], obj["LastModified"].timestamp())

    def sweep_staging(self, older_than: float = STAGING_GRACE) -> int:
        if not self.staging.is_dir():
            return 0
        staged = [p for p in self.staging.iterdir() if p.name.startswith(("upload-", "download-"))]
        cached = self.cache.rglob("*")
        return _remove_stale(iter(staged), older_than) + _remove_stale(cached, max(older_than, CACHE_MAX_AGE))

    def close(self) -> None:
        self._client.close()

