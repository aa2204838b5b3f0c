"""Backend ``onnx-diffusion``: optimum-exported Stable Diffusion folders on ONNX Runtime.

``ORTDiffusionPipeline`` reads ``model_index.json`` and picks the matching pipeline (Stable Diffusion
1.x/2.x, SD-Turbo, LCM). It needs torch at run time (``pip install 'localai-aio[diffusion]'``).
LocalAI's ``clip_skip`` is applied when the export has the text encoder's hidden states, and ignored
(with a log line) otherwise. YAML keys: ``scheduler`` (e.g. ``euler_a``, ``lcm``, ``ddim``, ``dpm``),
``step`` (default steps), ``guidance_scale`` (``cfg_scale`` also accepted), ``size`` (default ``WxH``), ``providers``.
Generation checks a cancel flag after every denoising step, so a client that leaves stops it.
"""

from __future__ import annotations

import io
import logging
import random
from typing import TYPE_CHECKING, Any

from localai_aio.backends.base import BackendError, require_file, scrub, threads_for
from localai_aio.backends.onnx_common import BudgetedSession, default_providers

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings
    from localai_aio.runtime import CancelFlag

log = logging.getLogger(__name__)

#: The pipeline's ONNX parts (each an optimum model holding a ``session``).
PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_encoder", "vae_decoder")

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
}


class Cancelled(Exception):
    """The client left; generation stopped between steps."""


class DiffusionEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        folder = require_file(cfg)
        if not (folder / "model_index.json").is_file():
            raise BackendError("an onnx-diffusion model is an optimum-exported folder with model_index.json")
        try:
            import onnxruntime as ort
            from optimum.onnxruntime import ORTDiffusionPipeline
        except ImportError:
            raise BackendError("image generation needs optimum and torch: pip install 'localai-aio[diffusion]'") \
                from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads_for(cfg, settings)
        options.log_severity_level = 3
        providers = cfg.option("providers") or default_providers(ort.get_available_providers())
        try:
            self.pipe = ORTDiffusionPipeline.from_pretrained(str(folder), providers=list(providers),
                                                             session_options=options)
        except Exception as exc:  # optimum raises many kinds for a broken folder
            raise BackendError(f"could not load the pipeline: {scrub(exc, folder)}") from None
        self.pipe.set_progress_bar_config(disable=True)
        for part in PARTS:  # every step of every part is a piece of work on the CPU budget
            component = getattr(self.pipe, part, None)
            if component is not None and hasattr(component, "session"):
                component.session = BudgetedSession(component.session, options.intra_op_num_threads)
        encoder = getattr(self.pipe, "text_encoder", None)
        outputs = [o.name for o in encoder.session.get_outputs()] if encoder is not None else []
        # clip_skip needs the text encoder's hidden states, which an export only has when asked for them.
        self.supports_clip_skip = any(name.startswith("hidden_states") for name in outputs)
        scheduler = cfg.option("scheduler")
        if scheduler:
            self._use_scheduler(str(scheduler))
        self.default_steps = int(cfg.option("step") or cfg.option("steps") or 25)
        self.guidance = float(cfg.option("guidance_scale") or cfg.option("cfg_scale") or 7.5)
        self.default_size = str(cfg.option("size") or "512x512")
        log.info("model %s: %s with %s", cfg.name, type(self.pipe).__name__, type(self.pipe.scheduler).__name__)

    def _use_scheduler(self, name: str) -> None:
        import diffusers

        cls_name = SCHEDULERS.get(name.lower(), name)
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise BackendError(f"unknown scheduler {name!r} (one of {', '.join(SCHEDULERS)})")
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)

    def generate(self, *, prompt: str, negative_prompt: str | None, n: int, width: int, height: int,
                 steps: int | None, seed: int | None, clip_skip: int | None, cancel: CancelFlag) -> list[bytes]:
        """PNG bytes of ``n`` images; raises ``Cancelled`` when the flag is set between steps."""
        import torch

        generator = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))

        def check(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                raise Cancelled
            return kwargs

        extra: dict[str, Any] = {}
        if clip_skip and self.supports_clip_skip:
            extra["clip_skip"] = clip_skip
        elif clip_skip:
            log.info("clip_skip=%d ignored: this export's text encoder has no hidden-state outputs", clip_skip)
        images = self.pipe(prompt=prompt, negative_prompt=negative_prompt or None, height=height, width=width,
                           num_inference_steps=steps or self.default_steps, guidance_scale=self.guidance,
                           num_images_per_prompt=n, generator=generator, callback_on_step_end=check,
                           **extra).images
        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out

    def close(self) -> None:
        self.pipe = None


def load(cfg: ModelConfig, settings: ServerSettings) -> DiffusionEngine:
    return DiffusionEngine(cfg, settings)
