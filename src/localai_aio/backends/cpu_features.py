"""What this CPU does fast, for the choices that depend on it (int8 or float32 weights, thread layout).

Read once from ``/proc/cpuinfo`` (model name and flags; on ARM the ``Features`` line) and from ONNX
Runtime's own view of the machine (``get_ep_devices()``: the CPU's vendor), so the same rule holds
wherever the process runs. Dynamic int8 quantization replaces float32 matrix products by int8 ones and
adds the quantization of every activation: a clear gain where the CPU has int8 dot-product instructions
(x86 VNNI or AMX, ARM's dot product or i8mm), and no gain, or a loss, on a compute-bound graph where it
has not. Measured on an AMD EPYC (Zen 5, avx512_vnni), 2 threads: Whisper base's encoder takes 165 ms
in int8 (convolutions in float32) against 293 ms in float32.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig

log = logging.getLogger(__name__)

#: Flags (``/proc/cpuinfo``) of int8 dot-product instructions that ONNX Runtime's int8 kernels use.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "asimddp", "i8mm")
#: Flags worth showing next to a figure or a choice (what the choices and the kernels depend on).
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", *INT8_FLAGS, "amx_bf16", "sve")
WEIGHTS = ("int8", "fp32")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    flags: frozenset[str]

    @property
    def int8_fast(self) -> bool:
        """The CPU has int8 dot-product instructions: int8 matrix products beat float32 ones."""
        return any(flag in self.flags for flag in INT8_FLAGS)

    def describe(self) -> str:
        """``AMD EPYC (avx2, fma, avx512f, avx512_vnni, ...)``: the model and the flags that matter here."""
        shown = [flag for flag in SHOWN_FLAGS if flag in self.flags]
        return f"{self.model} ({', '.join(shown) or 'no vector extensions listed'})"


def parse_cpuinfo(text: str, vendor: str = "") -> CpuInfo:
    """A ``/proc/cpuinfo`` text (its first processor) as a ``CpuInfo``; ``vendor`` when it names none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: the others are the same
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags") or fields.get("features") or ""
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or "unknown CPU"
    return CpuInfo(model, fields.get("vendor_id") or vendor, frozenset(flags.split()))


def _ort_vendor() -> str:
    """The CPU's vendor as ONNX Runtime reports it ("" when it cannot say)."""
    try:
        import onnxruntime as ort

        return next((d.device.vendor for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"), "")
    except Exception:  # an older onnxruntime without the device API, or none at all
        return ""


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, _ort_vendor())


def choose_weights(cpu: CpuInfo) -> str:
    """int8 or fp32 weights for a compute-bound graph (an encoder) on ``cpu``."""
    return "int8" if cpu.int8_fast else "fp32"


def weights_for(cfg: ModelConfig, key: str, cpu: CpuInfo | None = None) -> str:
    """The weights the YAML's ``key`` asks for: ``int8`` or ``fp32`` as written, or, for ``auto`` (or no
    key), what suits this CPU. A choice recorded for another CPU (the YAML's ``cpu``, written at install)
    is kept, with a warning that ``auto`` would choose again."""
    cpu = cpu or cpu_info()
    wanted = str(cfg.option(key) or "auto").lower()
    if wanted not in (*WEIGHTS, "auto"):
        from localai_aio.backends.base import BackendError

        raise BackendError(f"`{key}` must be int8, fp32 or auto, not {wanted!r}")
    recorded = cfg.option("cpu")
    if wanted != "auto" and recorded and recorded != cpu.describe() and wanted != choose_weights(cpu):
        log.warning("model %s: %s %s was chosen at install for %s; this CPU is %s, for which `%s: auto` would "
                    "choose %s", cfg.name, key, wanted, recorded, cpu.describe(), key, choose_weights(cpu))
    return choose_weights(cpu) if wanted == "auto" else wanted


def resolve_auto(config: dict[str, Any], keys: tuple[str, ...], cpu: CpuInfo | None = None) -> dict[str, Any]:
    """A model config with each of ``keys`` that says ``auto`` replaced by this CPU's choice, and the CPU it
    was chosen for recorded as ``cpu`` (what the gallery writes at install)."""
    cpu = cpu or cpu_info()
    auto = [key for key in keys if str(config.get(key, "")).lower() == "auto"]
    if not auto:
        return config
    return {**config, **{key: choose_weights(cpu) for key in auto}, "cpu": cpu.describe()}
