"""The choices that depend on the CPU (int8 or float32 encoder), with the CPU's features faked both ways."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from localai_aio.backends import cpu_features
from localai_aio.backends.base import BackendError
from localai_aio.backends.cpu_features import choose_weights, parse_cpuinfo, resolve_auto, weights_for
from localai_aio.config import ModelConfig

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 avx512_vnni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx fma avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8
"""
ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu avx fma avx2 avx512f avx_vnni avx512_bf16 avx512_vnni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm
CPU implementer\t: 0x41
"""


def test_cpuinfo_is_read_from_the_first_processor() -> None:
    zen3 = parse_cpuinfo(ZEN3)
    assert zen3.model == "AMD EPYC 7B13" and zen3.vendor == "AuthenticAMD"
    assert "avx512_vnni" not in zen3.flags and not zen3.int8_fast  # the second processor is not read
    assert zen3.describe() == "AMD EPYC 7B13 (avx2, fma)"
    arm = parse_cpuinfo(GRAVITON, vendor="ARM")
    assert arm.int8_fast and arm.vendor == "ARM" and arm.model == "unknown CPU"
    assert parse_cpuinfo("").flags == frozenset()


@pytest.mark.parametrize(("text", "weights"), [(ZEN3, "fp32"), (SAPPHIRE_RAPIDS, "int8"), (ZEN5, "int8"),
                                               (GRAVITON, "int8"), ("", "fp32")])
def test_int8_only_where_the_cpu_has_int8_dot_products(text: str, weights: str) -> None:
    assert choose_weights(parse_cpuinfo(text)) == weights


def this_machine_reads(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(cpu_features, "cpu_info", lambda path="/proc/cpuinfo": parse_cpuinfo(text))


def config(tmp_path: Path, **extra: object) -> ModelConfig:
    return ModelConfig(name="w", backend="onnx-whisper", model_path=tmp_path, extra=extra)


@pytest.mark.parametrize(("text", "weights"), [(ZEN3, "fp32"), (ZEN5, "int8")])
def test_auto_or_no_key_follows_the_cpu_and_a_written_choice_wins(monkeypatch, tmp_path: Path, caplog, text: str,
                                                                   weights: str) -> None:  # noqa: ANN001
    this_machine_reads(monkeypatch, text)
    assert weights_for(config(tmp_path), "encoder_weights") == weights
    assert weights_for(config(tmp_path, encoder_weights="auto"), "encoder_weights") == weights
    other = "fp32" if weights == "int8" else "int8"
    with caplog.at_level(logging.WARNING):
        assert weights_for(config(tmp_path, encoder_weights=other, cpu="Some other CPU ()"), "encoder_weights") == other
    assert "chosen at install for Some other CPU" in caplog.text  # moved to another CPU: said, not overridden
    with pytest.raises(BackendError, match="int8, fp32 or auto"):
        weights_for(config(tmp_path, encoder_weights="int4"), "encoder_weights")


@pytest.mark.parametrize(("text", "weights"), [(ZEN3, "fp32"), (SAPPHIRE_RAPIDS, "int8")])
def test_install_writes_the_choice_and_the_cpu(monkeypatch, text: str, weights: str) -> None:  # noqa: ANN001
    from localai_aio.config import conf_file
    from localai_aio.gallery.install import load_gallery, model_yaml

    this_machine_reads(monkeypatch, text)
    written = model_yaml(load_gallery(conf_file("gallery.yaml")).get("whisper-base"))
    assert written["encoder_weights"] == weights
    assert written["cpu"] == parse_cpuinfo(text).describe()
    assert resolve_auto({"backend": "llama-cpp"}, ("encoder_weights",)) == {"backend": "llama-cpp"}  # nothing auto


@pytest.mark.parametrize(("text", "expected"), [(ZEN3, "encoder_model.onnx"), (ZEN5, "encoder_model.int8.onnx")])
def test_the_encoder_file_follows_the_choice_and_older_installs_keep_theirs(monkeypatch, tmp_path: Path,
                                                                            text: str, expected: str) -> None:  # noqa: ANN001
    from localai_aio.backends.onnx_whisper import encoder_file

    this_machine_reads(monkeypatch, text)
    (tmp_path / "encoder_model.onnx").write_bytes(b"")
    assert encoder_file(tmp_path, config(tmp_path)).name == "encoder_model.onnx"  # one encoder: that one
    (tmp_path / "encoder_model.int8.onnx").write_bytes(b"")
    assert encoder_file(tmp_path, config(tmp_path)).name == expected
    assert encoder_file(tmp_path, config(tmp_path, encoder_weights="fp32")).name == "encoder_model.onnx"
    assert encoder_file(tmp_path, config(tmp_path, encoder_weights="int8")).name == "encoder_model.int8.onnx"


def test_this_machine_is_described() -> None:
    cpu_features.cpu_info.cache_clear()
    cpu = cpu_features.cpu_info()
    assert cpu.describe().startswith(cpu.model)
