"""The cache folder: handed out only if nobody but this user and root can change it; files read only if theirs."""

import logging
import os
import stat

import pytest

from dpsign_fl import cache
from dpsign_fl.cache import open_cached_file, trusted_cache_dir

pytestmark = pytest.mark.skipif(os.name != "posix", reason="ownership and modes are POSIX's")
ANOTHER_USER = 65534  # nobody


@pytest.fixture(autouse=True)
def no_warnings_remembered():
    cache._warn_refused.cache_clear()
    yield
    cache._warn_refused.cache_clear()


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_missing_cache_folders_are_created_for_this_user_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(tmp_path / "a" / "cache"))

    folder = trusted_cache_dir("vote-kernel")

    assert folder == tmp_path / "a" / "cache" / "vote-kernel"
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "cache", folder)] == [0o700] * 3


def test_a_sticky_folder_others_can_write_may_hold_the_cache_but_not_be_it(monkeypatch, tmp_path, caplog):
    shared = tmp_path / "shared"  # as /tmp
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(shared / "mine"))
    assert trusted_cache_dir("features") == shared / "mine" / "features"

    monkeypatch.setenv("DPSIGN_FL_CACHE", str(shared))
    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert trusted_cache_dir("features") is None
    assert f"{shared} is writable by group or others (mode 1777)" in caplog.text


def test_a_link_to_a_trusted_folder_is_resolved_and_the_target_checked(monkeypatch, tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(tmp_path / "link"))
    assert trusted_cache_dir("features") == tmp_path / "real" / "features"

    (tmp_path / "real").chmod(0o777)
    assert trusted_cache_dir("features") is None


@pytest.mark.skipif(os.name == "posix" and os.getuid() != 0, reason="giving a folder to another user needs root")
def test_nothing_is_created_inside_a_folder_of_another_user(monkeypatch, tmp_path, caplog):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, ANOTHER_USER, ANOTHER_USER)
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(theirs / "cache"))

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert trusted_cache_dir("vote-kernel") is None
        assert trusted_cache_dir("vote-kernel") is None

    assert list(theirs.iterdir()) == []
    assert caplog.text.count(f"{theirs} is owned by uid {ANOTHER_USER}") == 1  # warned once


def test_open_cached_file_reads_this_user_s_file_and_refuses_links_and_files_others_can_write(tmp_path):
    mine = tmp_path / "mine"
    mine.write_bytes(b"cached")
    (tmp_path / "link").symlink_to(mine)
    writable = tmp_path / "writable"
    writable.write_bytes(b"planted")
    writable.chmod(0o666)

    with open_cached_file(mine) as handle:
        assert handle.read() == b"cached"
    with pytest.raises(PermissionError, match="link is a symbolic link"):
        open_cached_file(tmp_path / "link")
    with pytest.raises(PermissionError, match=r"writable is writable by group or others \(mode 666\)"):
        open_cached_file(writable)
    with pytest.raises(PermissionError, match="is not a regular file"):
        open_cached_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_cached_file(tmp_path / "absent")
