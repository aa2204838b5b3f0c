"""The blob store, both kinds through one suite: a directory, and S3 against a real S3 server (moto's)."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localai_aio.store.blobs import (
    STAGING_GRACE,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    LocalBlobs,
    S3Blobs,
    from_url,
)

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    server._server.server_close()  # stop() leaves the listening socket open


def isolate_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """Dummy credentials and the endpoint, and nothing read from this machine's AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[object, str]]:
    """A raw boto3 client on the test server and a fresh bucket on it."""
    import boto3

    isolate_aws(monkeypatch, tmp_path, s3_server)
    client = boto3.client("s3")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    client.close()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        blobs: BlobStore = LocalBlobs(tmp_path / "blobs")
    else:
        _, bucket = request.getfixturevalue("s3")
        blobs = from_url(f"s3://{bucket}/pre/fix", tmp_path / "replica-1")
    yield blobs
    blobs.close()


@pytest.fixture
def replica(store: BlobStore, tmp_path: Path) -> Iterator[BlobStore]:
    """A second store on the same storage, as another server replica has it."""
    if isinstance(store, S3Blobs):
        other: BlobStore = from_url(f"s3://{store.bucket}/{store.prefix}", tmp_path / "replica-2")
    else:
        other = LocalBlobs(tmp_path / "blobs")
    yield other
    other.close()


def stage(store: BlobStore, data: bytes) -> Path:
    staged = store.staging_path()
    staged.write_bytes(data)
    return staged


def make_old(path: Path, age: float = STAGING_GRACE + 60) -> None:
    then = time.time() - age
    os.utime(path, (then, then))


@pytest.mark.parametrize("size", [0, 1000, 9 * 2**20])  # 9 MiB: boto3 uploads it in parts
def test_put_then_fetch_gives_the_same_bytes(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    staged = stage(store, data)
    assert store.put("files/file-abc", staged) == size
    assert not staged.exists()
    assert store.exists("files/file-abc")
    assert store.fetch("files/file-abc").read_bytes() == data
    assert store.fetch("files/file-abc").read_bytes() == data  # S3: now from the local copy


def test_list_shows_sizes_and_keeps_to_the_prefix(store: BlobStore) -> None:
    for key, data in (("files/file-a", b"a"), ("files/file-bb", b"bb"), ("generated-images/x.png", b"png")):
        store.put(key, stage(store, data))
    files = sorted(store.list("files/"), key=lambda info: info.key)
    assert [(info.key, info.size) for info in files] == [("files/file-a", 1), ("files/file-bb", 2)]
    assert all(abs(info.modified - time.time()) < 120 for info in files)
    assert [info.key for info in store.list("generated-images/")] == ["generated-images/x.png"]
    assert [info.key for info in store.list("files/file-b")] == ["files/file-bb"]
    assert list(store.list("nothing/")) == []
    assert isinstance(files[0], BlobInfo)


def test_list_pages_through_many(store: BlobStore) -> None:
    if isinstance(store, S3Blobs):
        store._client.meta.events.register(  # pages of 7, so that a listing takes several requests
            "before-parameter-build.s3.ListObjectsV2", lambda params, **_: params.setdefault("MaxKeys", 7))
    for i in range(20):
        store.put(f"generated-images/{i:02d}.png", stage(store, b"x" * i))
    assert sorted((info.key, info.size) for info in store.list("generated-images/")) == [
        (f"generated-images/{i:02d}.png", i) for i in range(20)]


def test_delete_and_missing_keys(store: BlobStore) -> None:
    store.put("files/file-gone", stage(store, b"bytes"))
    store.fetch("files/file-gone")
    store.delete("files/file-gone")
    store.delete("files/file-gone")  # missing is fine
    assert not store.exists("files/file-gone")
    with pytest.raises(BlobNotFound):
        store.fetch("files/file-gone")
    with pytest.raises(BlobNotFound):
        store.fetch("files/file-never")
    assert list(store.list("files/")) == []


def test_replicas_see_each_others_blobs(store: BlobStore, replica: BlobStore) -> None:
    store.put("generated-images/shared.png", stage(store, b"from replica 1"))
    assert replica.fetch("generated-images/shared.png").read_bytes() == b"from replica 1"
    replica.delete("generated-images/shared.png")
    with pytest.raises(BlobNotFound):  # also where the first replica had a local copy
        store.fetch("generated-images/shared.png")


@pytest.mark.parametrize("key", ["", "/abs", "../up", "files/../../up", "files//x", "files/", ".staging/upload-x",
                                 "files/.upload-x", "a\\b"])
def test_keys_cannot_leave_the_store(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        store.exists(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put(key, stage(store, b"x"))


def test_sweep_staging_removes_leftovers_only(store: BlobStore) -> None:
    leftovers = [stage(store, b"crashed"), stage(store, b"crashed too")]
    for path in leftovers:
        make_old(path)
    writing = stage(store, b"another replica is receiving this")
    if isinstance(store, LocalBlobs):  # where earlier versions staged
        old = store.root / "files" / ".upload-0123"
        old.parent.mkdir(parents=True)
        old.write_bytes(b"half")
        make_old(old)
        leftovers.append(old)
    assert store.sweep_staging() == len(leftovers)
    assert not any(path.exists() for path in leftovers)
    assert writing.exists()
    assert store.sweep_staging() == 0
    assert store.sweep_staging(older_than=0) == 1 and not writing.exists()


def test_local_layout_keeps_existing_installs_files(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-old").write_bytes(b"stored by an earlier version")
    blobs = from_url("", tmp_path)
    assert blobs.fetch("files/file-old") == tmp_path / "files" / "file-old"
    blobs.put("files/file-new", stage(blobs, b"new"))
    assert (tmp_path / "files" / "file-new").read_bytes() == b"new"
    assert not any((tmp_path / ".staging").iterdir())


def test_s3_keys_go_under_the_prefix(s3: tuple, tmp_path: Path) -> None:
    client, bucket = s3
    for url, expected in ((f"s3://{bucket}/some/prefix", "some/prefix/files/file-x"),
                          (f"s3://{bucket}/", "files/file-x")):
        blobs = from_url(url, tmp_path)
        blobs.put("files/file-x", stage(blobs, b"x"))
        assert expected in [obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]]
        assert [info.key for info in blobs.list("files/")] == ["files/file-x"]
        blobs.close()
    assert client.get_object(Bucket=bucket, Key="some/prefix/files/file-x")["Body"].read() == b"x"


def test_from_url(tmp_path: Path, s3: tuple) -> None:
    _, bucket = s3
    for url in ("", None):
        local = from_url(url, tmp_path)
        assert isinstance(local, LocalBlobs) and local.root == tmp_path
    shared = from_url(f"file://{tmp_path}/shared%20dir", tmp_path / "ignored")
    assert isinstance(shared, LocalBlobs) and shared.root == tmp_path / "shared dir"
    assert from_url(f"file://localhost{tmp_path}", tmp_path / "x").root == tmp_path
    s3blobs = from_url(f"s3://{bucket}/some/prefix/", tmp_path)
    assert isinstance(s3blobs, S3Blobs)
    assert (s3blobs.bucket, s3blobs.prefix, s3blobs.description) == (bucket, "some/prefix",
                                                                     f"s3://{bucket}/some/prefix")
    assert s3blobs.staging_path().parent == tmp_path / ".blob-staging"
    s3blobs.close()


@pytest.mark.parametrize(("url", "message"), [
    ("file://relative/dir", "absolute directory"),
    ("file:relative", "absolute directory"),
    ("s3://", "valid bucket name"),
    ("s3:///prefix", "valid bucket name"),
    ("s3://bad bucket/x", "valid bucket name"),
    ("s3://bucket/a/../b", "the prefix must be"),
    ("s3://bucket/a//b", "the prefix must be"),
    ("s3://bucket/p?versioning=1", "query or fragment"),
    ("http://example.com/blobs", "expected file:///abs/dir or s3://bucket/prefix"),
    ("/just/a/path", "expected file:///abs/dir or s3://bucket/prefix"),
])
def test_from_url_refuses(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        from_url(url, tmp_path)
    assert str(caught.value).startswith(f"blob URL {url!r}: ") and "\n" not in str(caught.value)


def test_s3_without_boto3_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ValueError, match=r"pip install 'localai-aio\[s3\]'"):
        from_url("s3://bucket", tmp_path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port()}")
    blobs = from_url("s3://bucket/p", tmp_path)
    started = time.monotonic()
    with pytest.raises(BlobUnavailable, match="s3://bucket/p"):
        blobs.put("files/file-x", stage(blobs, b"x"))
    with pytest.raises(BlobUnavailable, match="s3://bucket/p"):
        blobs.fetch("files/file-x")
    with pytest.raises(BlobUnavailable):
        blobs.exists("files/file-x")
    with pytest.raises(BlobUnavailable):
        list(blobs.list("files/"))
    assert time.monotonic() - started < 30
    assert list((tmp_path / ".blob-staging").glob("upload-*")) == []
    blobs.close()


def test_s3_refusals_are_unavailable_not_missing(s3: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = from_url("s3://no-such-bucket-here", tmp_path)
    with pytest.raises(BlobUnavailable, match="NoSuchBucket"):
        blobs.put("files/file-x", stage(blobs, b"x"))
    with pytest.raises(BlobUnavailable, match="NoSuchBucket"):
        list(blobs.list("files/"))
    blobs.close()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    blobs = from_url(f"s3://{s3[1]}", tmp_path)
    with pytest.raises(BlobUnavailable, match="credentials"):
        blobs.exists("files/file-x")
    blobs.close()


async def test_files_api_keeps_uploads_in_s3(s3: tuple, make_client, tmp_path: Path) -> None:  # noqa: ANN001
    """Through the API: the bytes of an upload go to the bucket (under the prefix), its content is served
    from there, and a delete removes the object."""
    import aiohttp

    from localai_aio.config import ServerSettings

    raw, bucket = s3
    client = await make_client(ServerSettings(models_path=str(tmp_path / "none"), config_dir=str(tmp_path / "d"),
                                              blob_url=f"s3://{bucket}/pre"))
    form = aiohttp.FormData()
    form.add_field("purpose", "assistants")
    form.add_field("file", b"bytes in a bucket", filename="n.txt", content_type="text/plain")
    made = await (await client.post("/v1/files", data=form)).json()
    assert raw.get_object(Bucket=bucket, Key=f"pre/files/{made['id']}")["Body"].read() == b"bytes in a bucket"
    assert await (await client.get(f"/v1/files/{made['id']}/content")).read() == b"bytes in a bucket"
    assert (await client.delete(f"/v1/files/{made['id']}")).status == 200
    assert raw.list_objects_v2(Bucket=bucket, Prefix="pre/files/").get("KeyCount") == 0
