#!/usr/bin/env python3
"""Check the web UI's vendored libraries against the npm registry, byte for byte.

``src/localai_aio/web/vendor/manifest.json`` pins each package (name, version, licence, the tarball's
``integrity`` as npm publishes it) and each file taken from it (the tarball member, where it is committed,
its sha256). This script downloads each pinned tarball from the npm registry, checks the tarball's
integrity, and compares every committed file with its member: a copy that was edited, or a pin that no
longer matches what the registry serves, fails. Nothing is installed and no build step runs: the files
are served as they were published.

    python scripts/check_web_vendor.py            # check (needs the npm registry)
    python scripts/check_web_vendor.py --write    # after changing a version or a file list in the
                                                  # manifest: copy the members in, record their sha256
                                                  # and the tarball's integrity

The offline half of the check (the committed files against the manifest's sha256) is a test,
``tests/test_web_ui.py``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "src" / "localai_aio" / "web" / "vendor"
MANIFEST = VENDOR / "manifest.json"
REGISTRY = "https://registry.npmjs.org"


def tarball_url(package: str, version: str) -> str:
    """npm's tarball address: ``<registry>/<name>/-/<name without scope>-<version>.tgz``."""
    return f"{REGISTRY}/{package}/-/{package.rpartition('/')[2]}-{version}.tgz"


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 - a fixed https registry
        return resp.read()


def members(tarball: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for info in archive.getmembers():
            if info.isfile():
                out[info.name] = archive.extractfile(info).read()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="copy the members in and record their checksums")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    problems = []
    for pkg in manifest["packages"]:
        name, version = pkg["package"], pkg["version"]
        url = tarball_url(name, version)
        data = download(url)
        if args.write:
            pkg["integrity"] = integrity_of(data)
        elif integrity_of(data) != pkg["integrity"]:
            problems.append(f"{name}@{version}: the registry's tarball is not the pinned one ({url})")
            continue
        inside = members(data)
        for entry in pkg["files"]:
            member, target = entry["member"], VENDOR / entry["path"]
            if member not in inside:
                problems.append(f"{name}@{version} has no {member}")
                continue
            if args.write:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(inside[member])
                entry["sha256"] = hashlib.sha256(inside[member]).hexdigest()
            elif not target.is_file() or target.read_bytes() != inside[member]:
                problems.append(f"{entry['path']} differs from {member} of {name}@{version}")
            elif hashlib.sha256(inside[member]).hexdigest() != entry["sha256"]:
                problems.append(f"{entry['path']}: the manifest's sha256 is not the file's")
        print(f"{name}@{version}: {len(pkg['files'])} file(s) {'written' if args.write else 'checked'}")
    if args.write:
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
