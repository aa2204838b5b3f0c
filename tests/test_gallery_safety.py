"""Installs are safe and quiet: refused before downloading when the disk is too small, one line per
step for scripts (progress bars only on a terminal), and `models list` shows sizes and licenses."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from localai_aio.gallery.install import InstallError, install, load_gallery, parse_size
from test_gallery import PAYLOAD, build_wheel, write_gallery


@pytest.fixture
def gallery_file(tmp_path: Path) -> Path:
    build_wheel(tmp_path / "wheels")
    path = write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest())
    data = yaml.safe_load(path.read_text())
    data["models"]["tiny"].update(size="2 GB", license="Apache-2.0")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("value", "size"), [(1234, 1234), ("98 MB", 98_000_000), ("1.5GB", 1_500_000_000),
                                              ("2 GiB", 2 << 30), (None, None)])
def test_sizes(value: object, size: int | None) -> None:
    assert parse_size(value, "x") == size


def test_a_bad_size_is_a_clear_error() -> None:
    with pytest.raises(InstallError, match="size 'lots' is not a size"):
        parse_size("lots", "x")


def test_no_room_refuses_before_any_download(tmp_path: Path, gallery_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=500_000_000))  # 500 MB free
    fetched = []
    monkeypatch.setattr("localai_aio.gallery.install.fetch_file", lambda *a, **k: fetched.append(a))
    with pytest.raises(InstallError, match=r"tiny needs 2.0 GB on disk and .* has 500.0 MB free"):
        install(load_gallery(gallery_file).get("tiny"), models, find_links=[str(tmp_path / "wheels")])
    assert fetched == [] and list(models.iterdir()) == []


def test_steps_are_one_line_each_off_a_terminal(tmp_path: Path, gallery_file: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "localai_aio", "models", "install", "tiny", "--gallery",
                           str(gallery_file), "--models-path", str(tmp_path / "models"), "--find-links",
                           str(tmp_path / "wheels")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["tiny: fetch 1/1 model.bin", f"tiny: installed in {tmp_path / 'models'}"]
    assert "it/s" not in done.stderr and "%|" not in done.stderr  # no progress bar off a terminal


def test_list_shows_size_license_and_json(tmp_path: Path, gallery_file: Path) -> None:
    args = [sys.executable, "-m", "localai_aio", "models", "list", "--gallery", str(gallery_file), "--models-path",
            str(tmp_path / "models")]
    text = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    assert text.split()[:5] == ["tiny", "-", "2.0", "GB", "Apache-2.0"]
    rows = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert rows == [{"name": "tiny", "installed": False, "default": True, "size": 2_000_000_000,
                     "license": "Apache-2.0", "description": "a test model", "from_gallery": True}]
