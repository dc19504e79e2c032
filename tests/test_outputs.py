"""unidiff.outputs: bad output paths are named before any work; writes are atomic."""

from __future__ import annotations

import os

import pytest

from unidiff.outputs import atomic_write, check_output_dir, check_output_file


def test_output_file_checks_name_the_flag(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "input.npz").write_text("data")
    assert check_output_file("out", str(tmp_path / "new" / "deeper" / "r.npz")) == str(tmp_path / "new/deeper/r.npz")
    with pytest.raises(ValueError, match=r"^--out .*: is a folder"):
        check_output_file("out", str(tmp_path / "folder"))
    with pytest.raises(ValueError, match=r"^--out .*afile is a file, not a folder"):
        check_output_file("out", str(tmp_path / "afile" / "r.npz"))
    # The same file by another spelling, and by a link, is still the input.
    for spelling in (str(tmp_path / "folder" / ".." / "input.npz"), str(tmp_path / "link.npz")):
        if spelling.endswith("link.npz"):
            os.symlink(tmp_path / "input.npz", spelling)
        with pytest.raises(ValueError, match=r"^--save .*is also the input --samples"):
            check_output_file("save", spelling, {"samples": str(tmp_path / "input.npz"), "other": None})
    assert check_output_file("save", str(tmp_path / "x.npz"), {"samples": str(tmp_path / "input.npz")})
    assert (tmp_path / "input.npz").read_text() == "data"


def test_unwritable_folder_is_named(tmp_path):
    # /proc takes no new files, not even from root; a folder without write permission
    # stops everyone else (permission bits do not stop root, so that case needs a non-root user).
    with pytest.raises(ValueError, match=r"^--json /proc/r.json: cannot write in /proc"):
        check_output_file("json", "/proc/r.json")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="cannot write in"):
                check_output_file("json", str(locked / "r.json"))
        finally:
            locked.chmod(0o700)


def test_output_dir_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert check_output_dir("workdir", str(tmp_path / "a" / "b")) == str(tmp_path / "a/b")
    assert not (tmp_path / "a").exists()  # checked, not created
    with pytest.raises(ValueError, match=r"^--workdir .*: is a file"):
        check_output_dir("workdir", str(tmp_path / "afile"))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_dir("workdir", str(tmp_path / "afile" / "w"))


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "r.json"
    with atomic_write(str(path), "w") as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("half of the second")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left behind
