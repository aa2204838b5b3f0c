"""POST /v1/rerank on tiny real cross-encoders: a random BertForSequenceClassification exported to ONNX by the
project's exporter (onnx-rerank), and the same kind of model written as a BERT GGUF with a classification head
(llama-cpp's rank pooling). Every score is checked against transformers running the same weights."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from tiny_models import (
    EMBED_VOCAB,
    export_tiny_cross_encoder,
    save_tiny_cross_encoder,
    write_standin_embedder,
    write_standin_reranker,
    write_tiny_gguf,
    write_tiny_rerank_gguf,
)

R = "/v1/rerank"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
needs_export = pytest.mark.skipif(importlib.util.find_spec("optimum") is None,
                                  reason="the export tool chain (optimum, torch) is not installed")

QUERY = "the small cat"
DOCS = ["a big car", "the cat", "hello world", "a small kitten", "the dog", "big big car car"]
CLS, SEP = EMBED_VOCAB.index("[CLS]"), EMBED_VOCAB.index("[SEP]")


# -- references: transformers on the same weights --------------------------------------------------------------

def reference_pairs(source: Path, query: str, docs: list[str], *, label: int = -1) -> tuple[np.ndarray, list[int]]:
    """Scores and token counts as sentence-transformers' CrossEncoder computes them: the tokenizer's own
    pairs ([CLS] q [SEP] d [SEP], segment ids 0 then 1), truncated at 64, sigmoid of the label's logit."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    model = BertForSequenceClassification.from_pretrained(source).eval()
    tok = BertTokenizerFast.from_pretrained(source)
    enc = tok([query] * len(docs), docs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, label]
    return torch.sigmoid(logits.double()).numpy(), enc["attention_mask"].sum(dim=1).tolist()


def rank_ids(source: Path, query: str, doc: str, *, template: bool = False) -> list[int]:
    """The ids llama.cpp's server builds for a pair of this GGUF: [CLS] q [SEP] d [SEP] (add_bos, add_eos),
    or with the test's rerank template, [CLS] d [SEP] q [SEP]."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(source)
    q, d = (tok(text, add_special_tokens=False)["input_ids"] for text in (query, doc))
    return [CLS, *d, SEP, *q, SEP] if template else [CLS, *q, SEP, *d, SEP]


def reference_ids(source: Path, id_lists: list[list[int]]) -> np.ndarray:
    """sigmoid(logit) for token ids run one at a time, every segment id 0 (llama.cpp's BERT graph adds the
    first token-type row to every token)."""
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(source).eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids]), token_type_ids=torch.zeros(1, len(ids), dtype=torch.long))
                  .logits[0, -1].double() for ids in id_lists]
    return torch.sigmoid(torch.stack(logits)).numpy()


async def ask(client, body: dict, path: str = R) -> dict:  # noqa: ANN001
    resp = await client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def assert_ranked(body: dict, docs: list[str], scores: np.ndarray, *, top_n: int | None = None,
                  documents: bool = True) -> None:
    """The whole answer: its keys, the order by falling score, top_n, and each score to 1e-5."""
    assert set(body) == {"model", "results", "usage"}
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n or len(docs)]
    assert [r["index"] for r in body["results"]] == order
    got = [r["relevance_score"] for r in body["results"]]
    assert got == sorted(got, reverse=True) and all(0 <= s <= 1 for s in got)
    for result in body["results"]:
        assert set(result) == ({"index", "relevance_score", "document"} if documents else {"index", "relevance_score"})
        assert abs(result["relevance_score"] - scores[result["index"]]) <= 1e-5, (result, scores)
        if documents:
            assert result["document"] == {"text": docs[result["index"]]}


# -- onnx-rerank on a stand-in cross-encoder (no torch: runs in every environment) ------------------------------

def standin_pair(query: str, doc: str, limit: int = 16) -> tuple[list[int], list[int]]:
    """A pair's ids and segment ids as BERT's tokenizer builds them, by hand (the test sentences are whole
    vocabulary words): [CLS] q [SEP] d [SEP], segment 0 then 1, the longer side cut first to ``limit``."""
    q, d = ([EMBED_VOCAB.index(w) for w in text.lower().split()] for text in (query, doc))
    while len(q) + len(d) + 3 > limit:
        (q if len(q) > len(d) else d).pop()
    return [CLS, *q, SEP, *d, SEP], [0] * (len(q) + 2) + [1] * (len(d) + 1)


@pytest.fixture
async def standin(make_client, tmp_path: Path):  # noqa: ANN001, ANN201
    models = tmp_path / "models"
    _, weights = write_standin_reranker(models / "standin")
    write_model_yaml(models, "standin", backend="onnx-rerank", parameters={"model": "standin"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    return client, weights


def standin_scores(weights: dict, query: str, docs: list[str]) -> tuple[np.ndarray, list[int]]:
    pairs = [standin_pair(query, d) for d in docs]
    logits = np.array([(weights["table"][ids].astype(np.float64) + weights["types"][types]).sum(axis=0)
                       @ weights["weight"][:, 0] for ids, types in pairs])
    return 1 / (1 + np.exp(-logits)), [len(ids) for ids, _ in pairs]


async def test_standin_exact_scores(standin) -> None:  # noqa: ANN001
    """Scores are sigmoid of the graph's logit for the pair the tokenizer builds, segment ids included
    (the stand-in adds a row per segment, so a pair fed without them would score otherwise)."""
    client, weights = standin
    scores, counts = standin_scores(weights, QUERY, DOCS)
    assert np.diff(np.sort(scores)).min() > 1e-3
    body = await ask(client, {"model": "standin", "query": QUERY, "documents": DOCS})
    assert_ranked(body, DOCS, scores)
    assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    top = await ask(client, {"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 1,
                             "return_documents": False}, "/rerank")
    assert_ranked(top, DOCS, scores, top_n=1, documents=False)


async def test_standin_truncates_longest_first(standin) -> None:  # noqa: ANN001
    client, weights = standin
    docs = ["the cat " * 15, "hello world"]
    scores, counts = standin_scores(weights, "a small kitten", docs)
    body = await ask(client, {"model": "standin", "query": "a small kitten", "documents": docs})
    assert_ranked(body, docs, scores)
    assert counts == [16, 8] and body["usage"]["total_tokens"] == 24


# -- onnx-rerank on an optimum-exported BERT -------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    if importlib.util.find_spec("optimum") is None:
        pytest.skip("the export tool chain (optimum, torch) is not installed")
    root = tmp_path_factory.mktemp("rerank-onnx")
    one, one_onnx = export_tiny_cross_encoder(root / "one")
    two, two_onnx = export_tiny_cross_encoder(root / "two", num_labels=2)
    models = root / "models"
    models.mkdir()
    shutil.copytree(one_onnx, models / "ce")  # a symlink out of the models directory is refused
    shutil.copytree(two_onnx, models / "ce2")
    write_model_yaml(models, "ce", backend="onnx-rerank", parameters={"model": "ce"}, aliases=["my-reranker"])
    write_model_yaml(models, "ce2", backend="onnx-rerank", parameters={"model": "ce2"})
    write_standin_embedder(models / "standin")
    write_model_yaml(models, "emb", backend="onnx-embeddings", parameters={"model": "standin"})
    write_tiny_gguf(models / "t.gguf")
    write_model_yaml(models, "chat", backend="llama-cpp", context_size=128, parameters={"model": "t.gguf"})
    return models, {"ce": one, "ce2": two}


@pytest.fixture
async def rclient(make_client, tmp_path: Path, onnx_models):  # noqa: ANN001, ANN201
    models, _ = onnx_models
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                            embeddings_max_inputs=40))


@needs_export
async def test_scores_order_shape_and_usage_match_transformers(rclient, onnx_models) -> None:  # noqa: ANN001
    _, sources = onnx_models
    scores, counts = reference_pairs(sources["ce"], QUERY, DOCS)
    assert np.diff(np.sort(scores)).min() > 1e-4  # the tiny model does tell the documents apart
    for path in (R, "/rerank"):
        body = await ask(rclient, {"model": "ce", "query": QUERY, "documents": DOCS}, path)
        assert_ranked(body, DOCS, scores)
        assert body["model"] == "ce"
        assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    aliased = await ask(rclient, {"model": "my-reranker", "query": QUERY, "documents": DOCS})
    assert aliased["model"] == "my-reranker" and aliased["results"] == body["results"]


@needs_export
async def test_top_n_return_documents_and_text_objects(rclient, onnx_models) -> None:  # noqa: ANN001
    _, sources = onnx_models
    scores, counts = reference_pairs(sources["ce"], QUERY, DOCS)
    top = await ask(rclient, {"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 2})
    assert_ranked(top, DOCS, scores, top_n=2)
    assert top["usage"]["total_tokens"] == sum(counts)  # every document was scored
    bare = await ask(rclient, {"model": "ce", "query": QUERY, "documents": DOCS, "return_documents": False})
    assert_ranked(bare, DOCS, scores, documents=False)
    objects = [{"text": d, "id": f"doc-{i}"} for i, d in enumerate(DOCS)]  # Cohere's clients' extra keys stay theirs
    body = await ask(rclient, {"model": "ce", "query": QUERY, "documents": objects, "top_n": 100})
    assert_ranked(body, DOCS, scores)  # top_n beyond the documents: all of them


@needs_export
async def test_many_documents_in_one_request_equal_one_per_request(rclient, onnx_models) -> None:  # noqa: ANN001
    """A request's pairs run batched (sorted by length, 16 a run, each padded to its own longest): the scores
    are those of each pair run alone."""
    docs = [" ".join(EMBED_VOCAB[5 + (i * 7 + j) % 10] for j in range(1 + i % 9)) for i in range(35)]
    together = await ask(rclient, {"model": "ce", "query": QUERY, "documents": docs})
    alone = {}
    tokens = 0
    for i, doc in enumerate(docs):
        body = await ask(rclient, {"model": "ce", "query": QUERY, "documents": [doc]})
        alone[i] = body["results"][0]["relevance_score"]
        tokens += body["usage"]["total_tokens"]
    for result in together["results"]:
        assert abs(result["relevance_score"] - alone[result["index"]]) <= 1e-6
    assert together["usage"]["total_tokens"] == tokens


@needs_export
async def test_long_pairs_are_truncated_longest_first(rclient, onnx_models) -> None:  # noqa: ANN001
    _, sources = onnx_models
    docs = ["cat " * 100, "the dog"]
    scores, counts = reference_pairs(sources["ce"], "a small kitten " * 3, docs)
    body = await ask(rclient, {"model": "ce", "query": "a small kitten " * 3, "documents": docs})
    assert_ranked(body, docs, scores)
    assert counts[0] == 64 and body["usage"]["total_tokens"] == sum(counts)


@needs_export
async def test_two_labels_score_with_the_last(rclient, onnx_models) -> None:  # noqa: ANN001
    _, sources = onnx_models
    scores, _ = reference_pairs(sources["ce2"], QUERY, DOCS, label=-1)
    assert_ranked(await ask(rclient, {"model": "ce2", "query": QUERY, "documents": DOCS}), DOCS, scores)


@needs_export
async def test_without_model_the_first_reranker_answers(rclient, onnx_models) -> None:  # noqa: ANN001
    body = await ask(rclient, {"query": QUERY, "documents": DOCS[:2]})
    assert body["model"] == "ce" and len(body["results"]) == 2


@needs_export
@pytest.mark.parametrize(("body", "param", "status"), [
    ({"model": "ce", "query": "a", "documents": []}, "documents", 400),
    ({"model": "ce", "query": "a", "documents": "a cat"}, "documents", 400),
    ({"model": "ce", "query": "a", "documents": ["a", 3]}, "documents.1", 400),
    ({"model": "ce", "query": "a", "documents": [{"title": "a"}]}, "documents.0", 400),
    ({"model": "ce", "query": "a", "documents": ["x"] * 41}, "documents", 400),
    ({"model": "ce", "query": "a", "documents": ["a"], "top_n": 0}, "top_n", 400),
    ({"model": "ce", "query": "a", "documents": ["a"], "top_n": "2"}, "top_n", 400),
    ({"model": "ce", "query": "a", "documents": ["a"], "return_documents": "yes"}, "return_documents", 400),
    ({"model": "ce", "documents": ["a"]}, "query", 400),
    ({"model": "ce", "query": 5, "documents": ["a"]}, "query", 400),
    ({"model": "emb", "query": "a", "documents": ["a"]}, "model", 400),
    ({"model": "chat", "query": "a", "documents": ["a"]}, "model", 400),
    ({"model": "nope", "query": "a", "documents": ["a"]}, "model", 404),
])
async def test_errors(rclient, body: dict, param: str, status: int) -> None:  # noqa: ANN001
    resp = await rclient.post(R, json=body)
    assert resp.status == status, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    if param == "model" and status == 400:
        assert error["code"] == "unsupported_for_model" and "does not rerank" in error["message"]


@needs_export
async def test_document_lists_the_rerank_models(rclient) -> None:  # noqa: ANN001
    spec = await (await rclient.get("/swagger.json")).json()
    for path in (R, "/rerank"):
        operation = spec["paths"][path]["post"]
        model = operation["requestBody"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]["model"]
        assert model["enum"] == ["ce", "ce2", "my-reranker"]  # the rerankers and their aliases, nothing else
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer == {"$ref": "#/components/schemas/Rerank"}
    assert spec["components"]["schemas"]["Rerank"]["required"] == ["model", "results", "usage"]


# -- llama-cpp with rank pooling ---------------------------------------------------------------------------------

TEMPLATE = "[CLS] {document} [SEP] {query} [SEP]"


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (the reference implementation)")
    root = tmp_path_factory.mktemp("rerank-gguf")
    # llama.cpp's CPU GELU is a float16 table and its flash attention rounds K and V to float16: relative
    # errors of some 1e-4 in the logit. With this seed and a head scaled 300x the scores agree with float32
    # transformers to about 2e-6, while the documents' scores lie at least 2e-4 apart.
    source = save_tiny_cross_encoder(root / "source", scale=300.0, seed=6)
    models = root / "models"
    models.mkdir()
    write_tiny_rerank_gguf(source, models / "rank.gguf")
    write_tiny_rerank_gguf(source, models / "plain.gguf", pooling=False)
    write_tiny_rerank_gguf(source, models / "nohead.gguf", head=False)
    write_tiny_rerank_gguf(source, models / "templated.gguf", rerank_template=TEMPLATE)
    write_tiny_gguf(models / "t.gguf")
    # detected from the GGUF's bert.pooling_type; the YAML only says what the model is for
    write_model_yaml(models, "detected", backend="llama-cpp", known_usecases=["rerank"], context_size=64,
                     parameters={"model": "rank.gguf"})
    write_model_yaml(models, "forced", backend="llama-cpp", pooling="rank", context_size=64,
                     parameters={"model": "plain.gguf"})
    write_model_yaml(models, "short", backend="llama-cpp", pooling="rank", context_size=16,
                     parameters={"model": "rank.gguf"})
    write_model_yaml(models, "templated", backend="llama-cpp", pooling="rank", context_size=64,
                     parameters={"model": "templated.gguf"})
    write_model_yaml(models, "headless", backend="llama-cpp", pooling="rank", context_size=64,
                     parameters={"model": "nohead.gguf"})
    write_model_yaml(models, "not-ranking", backend="llama-cpp", known_usecases=["rerank"], context_size=64,
                     parameters={"model": "plain.gguf"})
    write_model_yaml(models, "chat", backend="llama-cpp", context_size=128, parameters={"model": "t.gguf"})
    return models, source


@pytest.fixture
async def gclient(make_client, tmp_path: Path, gguf_models):  # noqa: ANN001, ANN201
    models, _ = gguf_models
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


@pytest.mark.llama
@pytest.mark.parametrize("model", ["detected", "forced"])
async def test_gguf_rank_pooling_matches_transformers(gclient, gguf_models, model: str) -> None:  # noqa: ANN001
    """Rank pooling from the GGUF's pooling type (or forced by the YAML on a file without one): each pair as
    llama.cpp's server formats it, its score sigmoid of the head's logit, and usage its real token count."""
    _, source = gguf_models
    ids = [rank_ids(source, QUERY, d) for d in DOCS]
    scores = reference_ids(source, ids)
    assert np.diff(np.sort(scores)).min() > 1e-4
    body = await ask(gclient, {"model": model, "query": QUERY, "documents": DOCS})
    assert_ranked(body, DOCS, scores)
    tokens = sum(len(i) for i in ids)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    top = await ask(gclient, {"model": model, "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 3,
                              "return_documents": False})
    assert_ranked(top, DOCS, scores, top_n=3, documents=False)


@pytest.mark.llama
async def test_gguf_rerank_template(gclient, gguf_models) -> None:  # noqa: ANN001
    """A GGUF with a ``rerank`` chat template is prompted through it, as llama.cpp's server does."""
    _, source = gguf_models
    ids = [rank_ids(source, QUERY, d, template=True) for d in DOCS]
    body = await ask(gclient, {"model": "templated", "query": QUERY, "documents": DOCS})
    assert_ranked(body, DOCS, reference_ids(source, ids))
    assert body["usage"]["total_tokens"] == sum(len(i) for i in ids)


@pytest.mark.llama
async def test_gguf_long_pairs_are_truncated_longest_first(gclient, gguf_models) -> None:  # noqa: ANN001
    _, source = gguf_models
    query, doc = "a small kitten", "the cat " * 20  # 3 + 40 tokens; the context takes 16 with 3 specials
    ids = [CLS, *rank_ids(source, query, doc)[1:4], SEP, *rank_ids(source, query, doc)[5:15], SEP]
    assert len(ids) == 16
    body = await ask(gclient, {"model": "short", "query": query, "documents": [doc, "hello"]})
    short = rank_ids(source, query, "hello")
    assert_ranked(body, [doc, "hello"], reference_ids(source, [ids, short]))
    assert body["usage"]["total_tokens"] == 16 + len(short)


@pytest.mark.llama
async def test_gguf_models_that_cannot_rank(gclient) -> None:  # noqa: ANN001
    headless = await gclient.post(R, json={"model": "headless", "query": "a", "documents": ["a"]})
    error = (await headless.json())["error"]
    assert headless.status == 500 and error["code"] == "model_load_failed"
    assert "classification head" in error["message"]
    plain = await gclient.post(R, json={"model": "not-ranking", "query": "a", "documents": ["a"]})
    error = (await plain.json())["error"]
    assert plain.status == 400 and error["param"] == "model" and "no rank pooling" in error["message"]
    chat = await gclient.post(R, json={"model": "chat", "query": "a", "documents": ["a"]})
    assert chat.status == 400 and (await chat.json())["error"]["code"] == "unsupported_for_model"
    for route in ("/v1/chat/completions", "/v1/embeddings"):  # a `pooling: rank` model serves rerank only
        body = {"messages": [{"role": "user", "content": "a"}]} if "chat" in route else {"input": "a"}
        resp = await gclient.post(route, json={"model": "forced", **body})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"
