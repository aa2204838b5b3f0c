"""All configuration: server settings (flags > environment > conf file > defaults) and model configs.

Server settings are declared once, in ``SETTINGS``; the ``serve`` flags, the environment variables and
the conf-file keys are all derived from that table so the three can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localai_aio.cpu_budget import POLICIES, Priority, usable_cores

log = logging.getLogger(__name__)

#: The package's own defaults (the gallery, the server settings); in a checkout, the repository's conf/.
BUNDLED_CONF = Path(__file__).resolve().parent / "conf"


def conf_file(name: str) -> Path:
    """``conf/<name>`` in the working directory when it exists (an override), else the package's own, so
    an installed package works from any directory."""
    local = Path("conf") / name
    return local if local.is_file() else BUNDLED_CONF / name


class ConfigError(Exception):
    """A setting or a model config that cannot be used; the message says which and why."""


#: The API key deploy/kubernetes/secret.yaml ships with, for the user to replace. Everyone who has read the
#: manifests knows it, so a server started with it as a key would be open to all: it refuses to start.
PLACEHOLDER_API_KEY = "CHANGE-ME"


def check_api_keys(keys: Sequence[str]) -> None:
    """Refuse to serve with the deployment files' placeholder key (checked at start, by ``create_app``)."""
    if PLACEHOLDER_API_KEY in keys:
        raise ConfigError(f"the API key {PLACEHOLDER_API_KEY!r} is the placeholder of the deployment files; set "
                          "LOCALAI_API_KEY and LOCALAI_ADMIN_API_KEYS (or --api-keys and --admin-api-keys) to "
                          "secret keys of your own")


def _csv(value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(item.strip() for item in value if str(item).strip())


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _address(value: str) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _base_url(value: str) -> str:
    value = str(value).strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _database_url(value: str) -> str:
    value = str(value).strip()
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// URL (or nothing, for SQLite under the config dir)")
    return value


def _blob_url(value: str) -> str:
    from localai_aio.store.blobs import parse_url

    value = str(value).strip().rstrip("/")
    parse_url(value)
    return value


def _fraction(value: str | float) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return number


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if str(value).lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value).lower()

    return parse


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return number


def _at_least_one(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return number


@dataclass(frozen=True)
class Setting:
    """One server setting: its flag, environment variables, parser and help text."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    env: tuple[str, ...] = ()
    metavar: str | None = None
    flag_only_bool: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("address", "127.0.0.1:8080", _address, "Address to listen on, HOST:PORT.",
            ("LOCALAI_ADDRESS",), "HOST:PORT"),
    Setting("models_path", "models", str,
            "Directory holding model files and their YAML configs.",
            ("LOCALAI_MODELS_PATH", "MODELS_PATH"), "DIR"),
    Setting("api_keys", (), _csv,
            "Comma-separated API keys. Once --admin-api-keys is set these are user keys: each sees only the "
            "assistants, files and responses it made, and may not change the models or read /metrics; without "
            "admin keys every key may do everything. With no keys at all the API is open, to this machine's "
            "host names only (see --allowed-hosts).", ("LOCALAI_API_KEY", "API_KEY"), "K1,K2"),
    Setting("admin_api_keys", (), _csv,
            "Comma-separated admin API keys: they may also install, reload and remove models (the gallery API, "
            "POST /models/reload) and read /metrics, and they see every key's assistants, files and responses.",
            ("LOCALAI_ADMIN_API_KEYS",), "K1,K2"),
    Setting("allowed_hosts", (), _csv,
            "Comma-separated host names the server answers for when no API keys are set (the Host header, its "
            "port ignored), besides localhost, the loopback addresses and the hosts of --address and --base-url; "
            "other names get 403, so that a web page elsewhere cannot reach the server through a browser (DNS "
            "rebinding). '*' answers any name. Listening on 0.0.0.0 or :: without keys, list here the names "
            "clients use.", ("LOCALAI_ALLOWED_HOSTS",), "H1,H2"),
    Setting("config_dir", "data", str,
            "Directory for persistent state (assistants, files, generated content).",
            ("LOCALAI_CONFIG_DIR",), "DIR"),
    Setting("database_url", "", _database_url,
            "PostgreSQL for assistants, files' records and stored responses, shared by replicas "
            "(postgresql://USER:PASSWORD@HOST/DB). Unset: SQLite under the config dir.",
            ("LOCALAI_DATABASE_URL",), "URL"),
    Setting("blob_url", "", _blob_url,
            "Where uploaded files and generated images are kept: file:///DIR (a shared volume) or "
            "s3://BUCKET/PREFIX (endpoint and credentials from the AWS_* environment). Unset: the config dir.",
            ("LOCALAI_BLOB_URL",), "URL"),
    Setting("background_lease", 30.0, _positive_float,
            "Seconds a replica's claim on a background response lasts without renewal; if the replica dies, "
            "the response is marked failed once its lease runs out.", ("LOCALAI_BACKGROUND_LEASE",), "SECONDS"),
    Setting("threads", usable_cores(), _positive_int,
            "Default CPU threads per model instance (a model's YAML `threads` overrides it). Default: the cores "
            "this process may use (its CPU affinity and cgroup quota).", ("LOCALAI_THREADS",), "N"),
    Setting("cpu_policy", "interactive-first", _choice(*POLICIES),
            "How engines share the cores. interactive-first: engines take turns on the cores a piece of work at "
            "a time, and conversations (chat, speech; a model's YAML `priority: interactive`) go before bulk "
            "work (transcription, embeddings, rerank, images; `priority: bulk`), which uses the cores they "
            "leave. fair: turns without priorities. off: every engine runs its threads at once, as if it "
            "had the machine to itself.", ("LOCALAI_CPU_POLICY",), "POLICY"),
    Setting("cpu_bulk_share", 0.2, _fraction,
            "Under interactive-first: the part of the core time bulk work still gets while conversations keep "
            "the cores busy (0 to 1), so transcriptions finish on a server that is never quiet.",
            ("LOCALAI_CPU_BULK_SHARE",), "FRACTION"),
    Setting("parallel", 4, _at_least_one,
            "Requests one llama-cpp model serves at once (sequence slots in one context, one copy of the "
            "weights); a model's YAML `parallel` overrides it. Other backends load `parallel` instances, "
            "1 unless their YAML says otherwise.", ("LOCALAI_PARALLEL",), "N"),
    Setting("context_size", 2048, _positive_int,
            "Default context size in tokens (a model's YAML `context_size` overrides it).",
            ("LOCALAI_CONTEXT_SIZE",), "N"),
    Setting("upload_limit", 15, _positive_float,
            "Largest request body accepted, in MB; larger ones get 413.",
            ("LOCALAI_UPLOAD_LIMIT",), "MB"),
    Setting("cors", False, _bool,
            "Answer cross-origin requests (CORS) from the web pages --cors-allow-origins names, or from any page "
            "when it names none.", ("LOCALAI_CORS",), flag_only_bool=True),
    Setting("cors_allow_origins", (), _csv,
            "Comma-separated web origins (scheme://host[:port]) whose pages may use the API from a browser: "
            "they get CORS answers and may send POST, PUT, PATCH and DELETE, which other sites' pages may not "
            "(403). '*' allows any. Naming origins turns --cors on.", ("LOCALAI_CORS_ALLOW_ORIGINS",), "O1,O2"),
    Setting("max_loaded_models", 0, _positive_int,
            "Most models kept loaded at once; the least recently used idle one is unloaded first. "
            "0 means no limit.", ("LOCALAI_MAX_LOADED_MODELS",), "N"),
    Setting("idle_timeout", 0.0, _positive_float,
            "Unload a model unused for this many seconds. 0 keeps models loaded.",
            ("LOCALAI_IDLE_TIMEOUT",), "SECONDS"),
    Setting("preload_models", (), _csv, "Comma-separated models to load at start.",
            ("LOCALAI_PRELOAD_MODELS",), "A,B"),
    Setting("watch_models", True, _bool,
            "Serve new, changed and removed model YAMLs of the models directory as they appear, without a "
            "restart (SIGHUP and POST /models/reload reload them too).", ("LOCALAI_WATCH_MODELS",), "BOOL"),
    Setting("disable_gallery_api", False, _bool,
            "Turn off the gallery API (POST /models/apply, GET /models/jobs..., GET /models/available): installs "
            "only from the command line.", ("LOCALAI_DISABLE_GALLERY_API",), flag_only_bool=True),
    Setting("queue_size", 16, _positive_int,
            "Requests that may wait for a busy model; more get 503 with Retry-After.",
            ("LOCALAI_QUEUE_SIZE",), "N"),
    Setting("embeddings_max_inputs", 2048, _positive_int,
            "Most inputs one embeddings request may carry; more get 400.",
            ("LOCALAI_EMBEDDINGS_MAX_INPUTS",), "N"),
    Setting("batch_window_ms", 5.0, _positive_float,
            "How long concurrent embeddings requests for one model are collected into one run, in ms.",
            ("LOCALAI_BATCH_WINDOW_MS",), "MS"),
    Setting("max_batch_size", 64, _positive_int,
            "Most inputs merged into one embeddings run.", ("LOCALAI_MAX_BATCH_SIZE",), "N"),
    Setting("image_max_size", 1024, _positive_int,
            "Largest image width or height accepted by /v1/images/generations, in pixels.",
            ("LOCALAI_IMAGE_MAX_SIZE",), "PIXELS"),
    Setting("generated_max_age", 3600.0, _positive_float,
            "Generated images are deleted once older than this many seconds.",
            ("LOCALAI_GENERATED_MAX_AGE",), "SECONDS"),
    Setting("retention_days", 0.0, _positive_float,
            "Delete stored responses, uploaded files and generated images once older than this many days (a "
            "fraction is fine), swept in the background every few minutes. 0 keeps responses and files until "
            "they are deleted.", ("LOCALAI_RETENTION_DAYS",), "DAYS"),
    Setting("write_timeout", 30.0, _positive_float,
            "Seconds a streaming client may take no data before its connection is dropped. 0 waits forever.",
            ("LOCALAI_WRITE_TIMEOUT",), "SECONDS"),
    Setting("max_audio_seconds", 7200.0, _positive_float,
            "Longest audio /v1/audio/transcriptions and /translations accept, in seconds, judged from the file's "
            "header before decoding; longer clips get 400. 0 means no limit.",
            ("LOCALAI_MAX_AUDIO_SECONDS",), "SECONDS"),
    Setting("base_url", "", _base_url,
            "The server's public URL (behind a proxy), for the links it returns, such as generated images. "
            "Unset: from X-Forwarded-Proto/X-Forwarded-Host, else from the request.",
            ("LOCALAI_BASE_URL",), "URL"),
    Setting("shutdown_grace", 30.0, _positive_float,
            "Seconds in-flight requests (streams too) get to finish after SIGTERM, while readiness says 503 and "
            "no new connection is accepted.", ("LOCALAI_SHUTDOWN_GRACE", "LOCALAI_SHUTDOWN_TIMEOUT"), "SECONDS"),
    Setting("log_level", "info", _choice("debug", "info", "warning", "error"), "Log level.",
            ("LOCALAI_LOG_LEVEL",), "LEVEL"),
    Setting("log_format", "text", _choice("text", "json"), "Log line format: text or json.",
            ("LOCALAI_LOG_FORMAT",), "FORMAT"),
)
_SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class ServerSettings:
    """The server's settings once every source has been merged and parsed."""

    address: str = "127.0.0.1:8080"
    models_path: str = "models"
    api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    config_dir: str = "data"
    database_url: str = ""
    blob_url: str = ""
    background_lease: float = 30.0
    threads: int = 1
    cpu_policy: str = "interactive-first"
    cpu_bulk_share: float = 0.2
    parallel: int = 4
    context_size: int = 2048
    upload_limit: float = 15
    cors: bool = False
    cors_allow_origins: tuple[str, ...] = ()
    max_loaded_models: int = 0
    idle_timeout: float = 0.0
    preload_models: tuple[str, ...] = ()
    watch_models: bool = True
    disable_gallery_api: bool = False
    queue_size: int = 16
    embeddings_max_inputs: int = 2048
    batch_window_ms: float = 5.0
    max_batch_size: int = 64
    image_max_size: int = 1024
    generated_max_age: float = 3600.0
    retention_days: float = 0.0
    write_timeout: float = 30.0
    max_audio_seconds: float = 7200.0
    base_url: str = ""
    shutdown_grace: float = 30.0
    log_level: str = "info"
    log_format: str = "text"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def cross_origins(self) -> tuple[str, ...]:
        """The web origins answered with CORS and allowed to change state: those named, else any with --cors."""
        return self.cors_allow_origins or (("*",) if self.cors else ())

    @property
    def upload_limit_bytes(self) -> int:
        return int(self.upload_limit * 1024 * 1024)

    @property
    def retention_seconds(self) -> float:
        return self.retention_days * 86400.0

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; flags left unset stay ``None`` so lower-precedence sources apply."""
    parser.add_argument("--config-file", metavar="FILE", default=None,
                        help="Server config file (YAML). Default: conf/server.yaml when it exists, else the "
                        "package's own; env LOCALAI_CONFIG_FILE.")
    for s in SETTINGS:
        env = f" Env: {' or '.join(s.env)}." if s.env else ""
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        text = f"{s.help}{env} Default: {default!r}."
        if s.flag_only_bool:
            parser.add_argument(s.flag, dest=s.name, action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(s.flag, dest=s.name, metavar=s.metavar, default=None, help=text)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    unknown = sorted(set(data) - set(_SETTINGS_BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {', '.join(unknown)}")
    return data


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                  config_file: str | Path | None = None) -> ServerSettings:
    """Merge the sources by precedence: flags > environment > config file > defaults."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    if config_file is None:
        config_file = flags.pop("config_file", None) or environ.get("LOCALAI_CONFIG_FILE")
        if config_file is None and conf_file("server.yaml").is_file():
            config_file = conf_file("server.yaml")
    flags.pop("config_file", None)
    from_file = _read_config_file(Path(config_file)) if config_file else {}

    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw, source = s.default, "default"
        if s.name in from_file:
            raw, source = from_file[s.name], f"config file {config_file}"
        for var in s.env:
            if environ.get(var) not in (None, ""):
                raw, source = environ[var], f"environment variable {var}"
                break
        if flags.get(s.name) is not None:
            raw, source = flags[s.name], f"flag {s.flag}"
        try:
            values[s.name] = s.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {s.name} from {source}: {exc}") from None
    return ServerSettings(**values)


# ---------------------------------------------------------------------------------------------------------
# Model configs (LocalAI's YAML keys)
# ---------------------------------------------------------------------------------------------------------

# Keys this server reads from a model YAML. Backend options (read with ``ModelConfig.option``) stay in
# ``extra`` for their backend; anything else is kept there too and logged once as unused.
KNOWN_MODEL_KEYS = frozenset({
    "name", "backend", "parameters", "context_size", "threads", "template", "stopwords", "embeddings",
    "known_usecases", "system_prompt", "parallel", "seed", "aliases", "f16", "gpu_layers",
    "description", "usage", "function", "tts", "diffusers", "options", "roles",
    "installed_by",  # the gallery's mark on what it installed (gallery.install.INSTALLED_BY)
    "priority",  # interactive or bulk: its turn on the cores (cpu_budget)
})
BACKEND_OPTION_KEYS = frozenset({
    "providers", "spinning", "mmap", "lib", "extra_buffers", "prompt_cache_mb",  # engines
    "pooling", "normalize", "max_length",  # onnx-embeddings
    "voices",  # piper
    "encoder_weights", "cpu",  # onnx-whisper: int8 or fp32 encoder, and the CPU the installer chose it for
    "decoder_threads", "encoder_batch",  # onnx-whisper: threads of the token-by-token decoder; windows encoded at once
    "reasoning",  # chat: where a reasoning model's thoughts start and end (reasoning.markers_for)
    "scheduler", "step", "steps", "guidance_scale", "cfg_scale", "size",  # onnx-diffusion
})


@dataclass(frozen=True)
class ModelConfig:
    """One model as the server sees it: name, backend, file and the YAML's other keys."""

    name: str
    backend: str | None
    model_path: Path | None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    context_size: int | None = None
    threads: int | None = None
    priority: Priority | None = None  # None: its backend's default (backends.default_priority)
    parallel: int | None = None  # None: the server's default (llama-cpp slots) or 1 instance (others)
    seed: int | None = None
    template: Mapping[str, Any] = field(default_factory=dict)
    stopwords: tuple[str, ...] = ()
    system_prompt: str | None = None
    embeddings: bool = False
    known_usecases: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    function: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    error: str | None = None
    created: int = 0  # mtime of the YAML or the bare file: the `created` of /v1/models

    def option(self, key: str, default: Any = None) -> Any:
        """A backend-specific key from the YAML (``extra``) or its ``parameters``."""
        if key in self.extra:
            return self.extra[key]
        return self.parameters.get(key, default)


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` strictly below ``root``; refuse absolute paths, ``..`` and symlinks that leave
    it, and anything naming ``root`` itself (``.``, ``a/..``): callers delete and replace what this returns,
    and "the model named ." must never be the whole models directory."""
    if not relative or os.path.isabs(relative) or "\x00" in relative:
        raise ConfigError(f"model path {relative!r} must be relative to the models directory")
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate == root:
        raise ConfigError(f"model path {relative!r} names the models directory itself, not something in it")
    if root not in candidate.parents:
        raise ConfigError(f"model path {relative!r} leaves the models directory")
    return candidate


def model_folder(root: Path, name: str) -> Path:
    """``<root>/<name>``, the folder of the model called ``name`` (its YAML is ``<root>/<name>.yaml``): the
    one check of a name that installs, exports and removals turn into paths. A name is one plain path
    component: with a separator its YAML would land where the server never reads it, and names starting
    with a dot are the installs' own temporary folders. The path is not resolved, so removing a model
    whose folder is a symlink removes the link, not what it points to."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or not name.isprintable():
        raise ConfigError(f"model name {name!r} must be one plain file name (no '/', not starting with '.')")
    resolve_inside(root, name)
    return Path(root) / name


def _model_from_yaml(data: dict[str, Any], source: Path, models_path: Path) -> ModelConfig:
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("missing `name`")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("`parameters` must be a mapping")
    model_file = params.get("model")
    path = None
    error = None
    if model_file is not None:
        path = resolve_inside(models_path, str(model_file))
        if not path.exists():
            error = f"model file {model_file!r} of model {name!r} does not exist in the models directory"
    template = data.get("template") or {}
    if isinstance(template, str):
        template = {"chat": template}
    stopwords = data.get("stopwords") or ()
    if isinstance(stopwords, str):
        stopwords = (stopwords,)
    parallel = data.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError("`parallel` must be a whole number of at least 1")
    priority = data.get("priority")
    if priority is not None:
        try:
            priority = Priority(str(priority).lower())
        except ValueError:
            raise ConfigError(f"`priority` must be one of {', '.join(p.value for p in Priority)}") from None
    extra = {k: v for k, v in data.items() if k not in KNOWN_MODEL_KEYS}
    return ModelConfig(
        name=name.strip(), backend=data.get("backend"), model_path=path, parameters=dict(params),
        context_size=data.get("context_size"), threads=data.get("threads"), priority=priority, parallel=parallel,
        seed=data.get("seed", params.get("seed")), template=dict(template),
        stopwords=tuple(str(s) for s in stopwords), system_prompt=data.get("system_prompt"),
        embeddings=bool(data.get("embeddings", False)),
        known_usecases=tuple(data.get("known_usecases") or ()),
        aliases=tuple(str(a) for a in data.get("aliases") or ()), function=dict(data.get("function") or {}),
        extra=extra, source=source, error=error, created=int(source.stat().st_mtime),
    )


MODEL_FILE_SUFFIXES = (".gguf", ".bin", ".ggml")


def load_model_configs(models_path: str | Path) -> tuple[dict[str, ModelConfig], list[str]]:
    """Read every YAML in the models directory, plus bare model files not claimed by a YAML.

    Returns the configs by name and the problems found (one line each). A broken YAML is reported
    and skipped; a config whose file is missing is kept with ``error`` set so that requests for it
    get a clear answer instead of "unknown model".
    """
    root = Path(models_path)
    configs: dict[str, ModelConfig] = {}
    problems: list[str] = []
    if not root.is_dir():
        return configs, [f"models directory {root} does not exist; no models are configured"]
    claimed: set[Path] = set()
    for source in sorted(list(root.glob("*.yaml")) + list(root.glob("*.yml"))):
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ConfigError("the file must hold a mapping")
            cfg = _model_from_yaml(data, source, root)
        except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError) as exc:
            problems.append(f"model config {source.name} is broken and is not served: {_one_line(exc)}")
            continue
        if cfg.name in configs:
            problems.append(f"model config {source.name}: name {cfg.name!r} is already defined; ignored")
            continue
        if cfg.error:
            problems.append(f"model config {source.name}: {cfg.error}")
        unused = sorted(set(cfg.extra) - BACKEND_OPTION_KEYS)
        if unused:
            log.info("model %s: keeping keys this server does not use: %s", cfg.name, ", ".join(unused))
        configs[cfg.name] = cfg
        if cfg.model_path is not None:
            claimed.add(cfg.model_path)
    for path in sorted(root.iterdir()):
        if path.suffix.lower() in MODEL_FILE_SUFFIXES and path.is_file() and path.resolve() not in claimed:
            try:
                resolved = resolve_inside(root, path.name)
            except ConfigError as exc:
                problems.append(f"model file {path.name}: {exc}")
                continue
            if path.name not in configs:
                configs[path.name] = ModelConfig(name=path.name, backend=None, model_path=resolved,
                                                 created=int(path.stat().st_mtime))
    return configs, problems


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
