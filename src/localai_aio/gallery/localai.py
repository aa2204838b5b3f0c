"""LocalAI gallery entries, installed by ``models install <file or URL>``.

A LocalAI entry is a YAML mapping (or a list of them, an index): ``name``, ``description``,
``license``, a base config (``url:`` naming another YAML, whose ``config_file`` holds the model YAML),
``config_file`` itself, ``overrides`` merged into it, and ``files`` (``filename``, ``sha256``, ``uri``).
It becomes one of our gallery entries: ``huggingface://org/repo/path`` and ``https://huggingface.co/...``
files come through the Hugging Face source, other ``http(s)`` URLs are downloaded as they are, and the
model YAML keeps the keys this server reads. What it cannot use is named, never silently dropped:
Go templates (the GGUF's own chat template serves instead), backends it does not have, ``oci://`` or
``ollama://`` files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import yaml

from localai_aio.gallery.install import GalleryEntry, GalleryFile, InstallError, parse_size

#: LocalAI backend names -> ours (None: not served here).
BACKENDS = {"llama-cpp": "llama-cpp", "llama": "llama-cpp", "llama.cpp": "llama-cpp", "llama-cpp-grpc": "llama-cpp",
            "piper": "piper", "ctransformers": "ctransformers"}
HF_URL = re.compile(r"^https://huggingface\.co/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")


def read_yaml(where: str) -> Any:
    """A YAML document from a path or an http(s) URL (``github:org/repo/path@ref`` as raw GitHub)."""
    if where.startswith("github:"):
        spec, _, ref = where[len("github:"):].partition("@")
        org, repo, path = spec.split("/", 2)
        where = f"https://raw.githubusercontent.com/{org}/{repo}/{ref or 'main'}/{path}"
    try:
        if urlparse(where).scheme in ("http", "https"):
            import urllib.request

            with urllib.request.urlopen(where, timeout=30) as resp:  # noqa: S310 - http(s) only, checked above
                text = resp.read().decode("utf-8")
        else:
            text = Path(where).read_text(encoding="utf-8")
        return yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InstallError(f"cannot read the LocalAI gallery file {where}: {exc}") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def _source(uri: str) -> dict[str, Any]:
    if uri.startswith("huggingface://"):
        org, repo, path = uri[len("huggingface://"):].split("/", 2)
        return {"hf": f"{org}/{repo}", "file": path}
    match = HF_URL.match(uri)
    if match:
        return {"hf": match.group(1), "revision": match.group(2), "file": match.group(3)}
    if urlparse(uri).scheme in ("http", "https"):
        return {"url": uri}
    raise InstallError(f"files from {uri.split(':', 1)[0]}:// are not supported (Hugging Face and http(s) are)")


def select(document: Any, name: str | None, where: str) -> Mapping[str, Any]:
    """The entry of a LocalAI gallery document: the mapping itself, or the list item named ``name``."""
    if isinstance(document, Mapping):
        return document
    if isinstance(document, list):
        entries = [e for e in document if isinstance(e, Mapping)]
        if name is None and len(entries) == 1:
            return entries[0]
        chosen = [e for e in entries if e.get("name") == name]
        if chosen:
            return chosen[0]
        raise InstallError(f"{where} holds {len(entries)} entries; pick one with {where}#NAME")
    raise InstallError(f"{where} is not a LocalAI gallery entry (a mapping with `name` and `files`)")


def convert(raw: Mapping[str, Any], where: str) -> tuple[GalleryEntry, list[str]]:
    """Our gallery entry for a LocalAI one, and what of it this server does not use."""
    unused: list[str] = []
    base: dict[str, Any] = {}
    if raw.get("url"):
        base_doc = read_yaml(str(raw["url"]))
        base = dict(base_doc) if isinstance(base_doc, Mapping) else {}
    config_file = raw.get("config_file", base.get("config_file")) or {}
    config = yaml.safe_load(config_file) if isinstance(config_file, str) else dict(config_file)
    config = _merge(config or {}, raw.get("overrides") or {})
    name = str(raw.get("name") or base.get("name") or config.get("name") or Path(where).stem)
    backend = config.get("backend")
    if backend is not None:
        if str(backend) not in BACKENDS:
            raise InstallError(f"{name}: backend {backend!r} is not available here (this server runs: "
                               f"{', '.join(sorted(set(BACKENDS.values())))})")
        config["backend"] = BACKENDS[str(backend)]
    template = config.get("template")
    if isinstance(template, Mapping):
        # a completion template of just {{.Input}} is understood here (prompts.render_completion)
        go = sorted(k for k, v in template.items() if isinstance(v, str) and "{{" in v
                    and not (k == "completion" and re.sub(r"\{\{\s*\.Input\s*\}\}", "", v).find("{{") < 0))
        if go:
            unused.append(f"template.{', template.'.join(go)} (Go templates: the model file's own chat template "
                          "is used)")
            config["template"] = {k: v for k, v in template.items() if k not in go}
    files = []
    for item in [*(base.get("files") or []), *(raw.get("files") or [])]:
        filename = str(item.get("filename") or "")
        if not filename or PurePosixPath(filename).is_absolute() or ".." in PurePosixPath(filename).parts:
            raise InstallError(f"{name}: a file entry needs a relative `filename` (got {filename!r})")
        files.append(GalleryFile(path=filename, sha256=item.get("sha256") or None, source=_source(str(item["uri"]))))
    if not files:
        raise InstallError(f"{name}: the entry lists no `files` to install")
    missing = [f.path for f in files if not f.sha256]
    if missing:
        unused.append(f"no sha256 for {', '.join(missing)}: installed unchecked")
    config.pop("name", None)
    entry = GalleryEntry(name=name, description=str(raw.get("description") or base.get("description") or "").strip(),
                         files=tuple(files), config=config, size=parse_size(raw.get("size"), name),
                         license=str(raw.get("license") or base.get("license") or ""))
    return entry, unused


def load_entry(spec: str) -> tuple[GalleryEntry, list[str]]:
    """``spec``: a path or URL of a LocalAI gallery YAML, optionally ``#name`` to pick from an index."""
    where, _, name = spec.partition("#")
    return convert(select(read_yaml(where), name or None, where), where)


def looks_like_entry_file(name: str) -> bool:
    return name.split("#", 1)[0].endswith((".yaml", ".yml")) or "://" in name or name.startswith("github:")
