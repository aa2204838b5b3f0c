"""Image generation on a tiny random Stable Diffusion pipeline exported by optimum inside the test session."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import time
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.server import keys
from localai_aio.store.generated_images import remove_old_images

pytestmark = [
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("diffusers", "optimum", "torch")),
                       reason="the diffusion and export tool chains are not installed"),
    # diffusers' schedulers and optimum's pipelines warn about their own deprecations while they run
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]
IMAGES = "/v1/images/generations"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import export_tiny_stable_diffusion

    return export_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


@pytest.fixture
async def iclient(make_client, tmp_path: Path, tiny_sd: Path):  # noqa: ANN001
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "tiny-sd")
    write_model_yaml(models, "sd", backend="onnx-diffusion", step=2, size="64x64", parameters={"model": "tiny-sd"})
    write_model_yaml(models, "sd-euler", backend="onnx-diffusion", step=2, scheduler="euler_a", size="64x64",
                     parameters={"model": "tiny-sd"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              image_max_size=128))
    return client, tmp_path


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


async def test_b64_images_sizes_and_count(iclient) -> None:  # noqa: ANN001
    client, _ = iclient
    resp = await client.post(IMAGES, json={"model": "sd", "prompt": "a cat", "n": 2, "size": "64x48",
                                           "response_format": "b64_json", "seed": 1})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert set(item) == {"b64_json"}
        assert png_size(base64.b64decode(item["b64_json"])) == (64, 48)


async def test_seed_reproducible(iclient) -> None:  # noqa: ANN001
    client, _ = iclient

    async def image(seed: int, model: str = "sd") -> bytes:
        resp = await client.post(IMAGES, json={"model": model, "prompt": "a dog", "seed": seed,
                                               "response_format": "b64_json"})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return base64.b64decode(body["data"][0]["b64_json"])

    first = await image(42)
    assert await image(42) == first
    assert await image(43) != first
    assert png_size(await image(7, "sd-euler")) == (64, 64)  # the YAML scheduler works too


async def test_image_links_work_behind_a_proxy_and_without_the_key(make_client, tmp_path: Path,
                                                                    tiny_sd: Path) -> None:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "tiny-sd")
    write_model_yaml(models, "sd", backend="onnx-diffusion", step=1, size="64x64", parameters={"model": "tiny-sd"})
    keyed = {"Authorization": "Bearer k"}
    ask = {"model": "sd", "prompt": "a cat"}
    proxied = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "a"), threads=1,
                                               api_keys=("k",)))
    body = await (await proxied.post(IMAGES, json=ask, headers={
        **keyed, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "ai.example.org"})).json()
    url = body["data"][0]["url"]
    assert url.startswith("https://ai.example.org/generated-images/") and len(url.rsplit("/", 1)[1]) >= 32
    image = await proxied.get(url.removeprefix("https://ai.example.org"))  # no key: the name is the capability
    assert image.status == 200 and png_size(await image.read()) == (64, 64)
    assert (await proxied.post(IMAGES, json=ask)).status == 401  # generating still needs the key
    configured = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "b"),
                                                  threads=1, base_url="https://public.example/ai"))
    body = await (await configured.post(IMAGES, json=ask, headers={"X-Forwarded-Host": "ignored"})).json()
    assert body["data"][0]["url"].startswith("https://public.example/ai/generated-images/")


async def test_url_images_are_served_and_cleaned_up(iclient) -> None:  # noqa: ANN001
    client, tmp_path = iclient
    body = await (await client.post(IMAGES, json={"model": "sd", "prompt": "a cat", "step": 1})).json()
    url = body["data"][0]["url"]
    assert url.startswith(str(client.make_url("/generated-images/")))
    path = url.split(str(client.make_url("")).rstrip("/"), 1)[1]
    resp = await client.get(path)
    assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
    assert png_size(await resp.read()) == (64, 64)
    stored = list((tmp_path / "d" / "generated-images").iterdir())
    assert [p.name for p in stored] == [path.rsplit("/", 1)[1]]
    old = time.time() - 7200
    os.utime(stored[0], (old, old))
    assert remove_old_images(client.app[keys.BLOBS], max_age=3600) == 1
    assert (await client.get(path)).status == 404


def sd_models(tmp_path: Path, tiny_sd: Path) -> Path:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "tiny-sd")
    write_model_yaml(models, "sd", backend="onnx-diffusion", step=1, size="64x64", parameters={"model": "tiny-sd"})
    return models


async def test_replicas_serve_each_others_images(make_client, tmp_path: Path, tiny_sd: Path) -> None:
    """Two servers on one shared volume (--blob-url file://...): an image made by one is served by the other,
    and either one's cleanup removes it for both."""
    models = sd_models(tmp_path, tiny_sd)
    shared = f"file://{tmp_path}/shared"
    one, two = [await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / name),
                                                 threads=1, blob_url=shared)) for name in ("one", "two")]
    body = await (await one.post(IMAGES, json={"model": "sd", "prompt": "a cat"})).json()
    path = "/generated-images/" + body["data"][0]["url"].rsplit("/", 1)[1]
    first, second = await one.get(path), await two.get(path)
    assert first.status == second.status == 200
    assert await first.read() == await second.read()
    assert [p.name for p in (tmp_path / "shared" / "generated-images").iterdir()] == [path.rsplit("/", 1)[1]]
    assert not (tmp_path / "one" / "generated-images").exists()
    assert remove_old_images(two.app[keys.BLOBS], max_age=3600, now_=time.time() + 7200) == 1
    assert (await one.get(path)).status == 404


async def test_images_in_s3_and_503_while_it_is_unreachable(make_client, tmp_path: Path, tiny_sd: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                            ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1"),
                            ("AWS_CONFIG_FILE", str(tmp_path / "absent")), ("AWS_EC2_METADATA_DISABLED", "true"),
                            ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent"))):
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="images")
        client = await make_client(ServerSettings(models_path=str(sd_models(tmp_path, tiny_sd)), threads=1,
                                                  config_dir=str(tmp_path / "d"), blob_url="s3://images/pre"))
        body = await (await client.post(IMAGES, json={"model": "sd", "prompt": "a cat"})).json()
        name = body["data"][0]["url"].rsplit("/", 1)[1]
        stored = s3.get_object(Bucket="images", Key=f"pre/generated-images/{name}")["Body"].read()
        s3.close()
        resp = await client.get(f"/generated-images/{name}")
        assert resp.status == 200 and await resp.read() == stored
        assert png_size(stored) == (64, 64)
    finally:
        server.stop()
        server._server.server_close()  # stop() leaves the listening socket open
    for resp in (await client.get(f"/generated-images/{name}"), await client.get(f"/generated-images/{'1' * 32}.png"),
                 await client.post(IMAGES, json={"model": "sd", "prompt": "a cat"})):
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "storage_unavailable" and resp.headers["Retry-After"]
    resp = await client.post(IMAGES, json={"model": "sd", "prompt": "a cat", "response_format": "b64_json"})
    assert resp.status == 200  # what needs no storage still works


@pytest.mark.parametrize(("body", "param", "status"), [
    ({"model": "sd", "prompt": "x", "size": "65x64"}, "size", 400),
    ({"model": "sd", "prompt": "x", "size": "256x256"}, "size", 400),
    ({"model": "sd", "prompt": "x", "size": "big"}, "size", 400),
    ({"model": "sd", "prompt": "x", "n": 11}, "n", 400),
    ({"model": "sd", "prompt": "x", "n": 0}, "n", 400),
    ({"model": "sd", "prompt": ""}, "prompt", 400),
    ({"model": "sd", "prompt": "x", "response_format": "png"}, "response_format", 400),
    ({"model": "nope", "prompt": "x"}, "model", 404),
])
async def test_errors(iclient, body: dict, param: str, status: int) -> None:  # noqa: ANN001
    client, _ = iclient
    resp = await client.post(IMAGES, json=body)
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["param"] == param


async def test_generated_image_names_cannot_traverse(iclient) -> None:  # noqa: ANN001
    client, _ = iclient
    for name in ("..%2F..%2Fetc%2Fpasswd", "x.png", "../d.png", "0" * 32 + ".png"):
        assert (await client.get(f"/generated-images/{name}")).status == 404, name


async def test_localai_extras_and_metrics(iclient) -> None:  # noqa: ANN001
    client, _ = iclient
    resp = await client.post(IMAGES, json={"model": "sd", "prompt": "a cat", "negative_prompt": "blurry",
                                           "mode": 0, "clip_skip": 1, "step": 1, "response_format": "b64_json"})
    assert resp.status == 200, await resp.text()
    metrics = await (await client.get("/metrics")).text()
    assert 'localai_inference_duration_seconds_count{model="sd",task="image"} 1.0' in metrics


async def test_client_leaving_cancels_between_steps(iclient, caplog) -> None:  # noqa: ANN001
    import asyncio
    import logging

    client, _ = iclient
    warm = await client.post(IMAGES, json={"model": "sd", "prompt": "x", "step": 1, "response_format": "b64_json"})
    assert warm.status == 200  # the model is loaded, so the next request is generating when it is cancelled
    long_job = asyncio.ensure_future(client.post(IMAGES, json={
        "model": "sd", "prompt": "a cat", "n": 10, "size": "128x128", "step": 150, "response_format": "b64_json"}))
    await asyncio.sleep(1.0)
    with caplog.at_level(logging.INFO, logger="localai_aio.api.openai.images"):
        long_job.cancel()  # the client goes away mid-generation
        with pytest.raises(asyncio.CancelledError):
            await long_job
        resp = await client.post(IMAGES, json={"model": "sd", "prompt": "a dog", "step": 1,
                                               "response_format": "b64_json"})
    assert resp.status == 200  # the engine was freed at the next denoising step
    assert "client left; image generation on sd stopped" in caplog.text
