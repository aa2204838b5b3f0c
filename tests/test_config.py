from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from localai_aio.cli import build_parser
from localai_aio.config import SETTINGS, ConfigError, load_model_configs, load_settings


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({}, environ={}, config_file=None)
    assert (s.address, s.models_path, s.api_keys, s.upload_limit) == ("127.0.0.1:8080", "models", (), 15)
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.log_format == "text" and s.cors is False


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    conf = tmp_path / "server.yaml"
    conf.write_text("address: 0.0.0.0:7000\nthreads: 3\ncontext_size: 512\nupload_limit: 2\n")
    env = {"LOCALAI_ADDRESS": "127.0.0.1:7001", "LOCALAI_THREADS": "5"}
    s = load_settings({"address": "127.0.0.1:7002"}, environ=env, config_file=conf)
    assert s.address == "127.0.0.1:7002"  # flag
    assert s.threads == 5  # env beats file
    assert s.context_size == 512  # file beats default
    assert s.upload_limit == 2


def test_alternative_environment_names() -> None:
    s = load_settings({}, environ={"MODELS_PATH": "/m", "API_KEY": "a, b"}, config_file=None)
    assert s.models_path == "/m"
    assert s.api_keys == ("a", "b")
    s = load_settings({}, environ={"LOCALAI_MODELS_PATH": "/x", "MODELS_PATH": "/m"}, config_file=None)
    assert s.models_path == "/x"


def test_config_file_from_env_and_flag(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("log_format: json\n")
    assert load_settings({}, environ={"LOCALAI_CONFIG_FILE": str(conf)}).log_format == "json"
    assert load_settings({"config_file": str(conf)}, environ={}).log_format == "json"


@pytest.mark.parametrize(("source", "message"), [
    ({"address": "nohost"}, "invalid address from flag --address"),
    ({"threads": "-1"}, "invalid threads from flag --threads"),
    ({"log_format": "xml"}, "expected one of text, json"),
    ({"database_url": "mysql://db/x"}, "invalid database_url from flag --database-url: expected a postgresql://"),
    ({"blob_url": "ftp://host/x"}, "invalid blob_url .*expected file:///abs/dir or s3://bucket/prefix"),
    ({"blob_url": "s3://bucket/a/../b"}, "the prefix must be path segments"),
])
def test_invalid_values_name_the_setting(source: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(source, environ={}, config_file=None)


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("adress: 1\n")
    with pytest.raises(ConfigError, match="unknown settings adress"):
        load_settings({}, environ={}, config_file=conf)


def test_serve_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for setting in SETTINGS:
        assert setting.flag in text
        for var in setting.env:
            assert var in text


def test_flags_parse_into_settings() -> None:
    args = build_parser().parse_args(["serve", "--api-keys", "k1,k2", "--cors", "--preload-models", "a,b"])
    s = load_settings({k: v for k, v in vars(args).items() if k not in {"command", "func"}}, environ={})
    assert s.api_keys == ("k1", "k2") and s.cors is True and s.preload_models == ("a", "b")


def test_model_configs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"x")
    (models / "bare.gguf").write_bytes(b"x")
    (models / "good.yaml").write_text(
        "name: good\nbackend: llama-cpp\nparameters:\n  model: a.gguf\n  temperature: 0.2\n"
        "context_size: 100\nstopwords: ['</s>']\ntemplate:\n  chat: chatml\nfancy_key: 1\naliases: [gpt-4]\n"
        "providers: [CPUExecutionProvider]\n")
    (models / "broken.yaml").write_text("name: [unclosed\n")
    (models / "missing.yaml").write_text("name: missing\nparameters:\n  model: nothere.gguf\n")
    (models / "escape.yaml").write_text("name: escape\nparameters:\n  model: ../outside.gguf\n")
    (models / "absolute.yml").write_text("name: absolute\nparameters:\n  model: /etc/passwd\n")
    (tmp_path / "outside.gguf").write_bytes(b"x")
    os.symlink(tmp_path / "outside.gguf", models / "link.gguf")
    (models / "link.yaml").write_text("name: link\nparameters:\n  model: link.gguf\n")
    with caplog.at_level(logging.INFO):
        configs, problems = load_model_configs(models)
    assert sorted(configs) == ["bare.gguf", "good", "missing"]
    good = configs["good"]
    assert good.backend == "llama-cpp" and good.model_path == (models / "a.gguf").resolve()
    assert good.parameters["temperature"] == 0.2 and good.context_size == 100
    assert good.stopwords == ("</s>",) and good.template == {"chat": "chatml"}
    assert good.extra == {"fancy_key": 1, "providers": ["CPUExecutionProvider"]} and good.aliases == ("gpt-4",)
    assert good.option("providers") == ["CPUExecutionProvider"]
    assert "keeping keys this server does not use: fancy_key" in caplog.text  # backend options are not "unused"
    assert configs["bare.gguf"].backend is None
    assert configs["missing"].error and "does not exist" in configs["missing"].error
    joined = "\n".join(problems)
    assert "broken.yaml is broken" in joined
    assert "escape.yaml" in joined and "leaves the models directory" in joined
    assert "absolute.yml" in joined and "must be relative" in joined
    assert "link.yaml" in joined
    assert "model file link.gguf" in joined  # the bare symlink is refused too
    assert len(problems) == 6  # broken, missing file, escape, absolute, symlink yaml, bare symlink


def test_configuration_doc_documents_every_setting() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "CONFIGURATION.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.flag}" in doc, setting.flag
        for var in setting.env:
            assert f"`{var}`" in doc, var


def test_json_log_format(capsys: pytest.CaptureFixture) -> None:
    import json

    from localai_aio.logs import setup_logging

    setup_logging("info", "json")
    try:
        logging.getLogger("localai_aio.access").info("GET /v1/models 200", extra={"status": 200, "request_id": "r1"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["message"] == "GET /v1/models 200" and record["status"] == 200 and record["request_id"] == "r1"
        assert record["levelname"] == "INFO" and record["name"] == "localai_aio.access"
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
