import os

import pytest

from nlm.config.paths import path_inside, safe_output_dir
from nlm.errors import UnsafePathError


@pytest.mark.parametrize("path", ["/etc", "/etc/nlm", "/usr/local/out", "/proc/self", "/var/lib/x", "/root/runs", "/boot", "/dev/shm/x", "/sys/x", "/bin/x", "/sbin", "/lib/x"])
def test_system_directories_are_refused(path):
    with pytest.raises(UnsafePathError, match="inside the system directory"):
        safe_output_dir(path)


def test_dotdot_that_lands_in_a_system_directory_is_refused(tmp_path):
    sneaky = str(tmp_path) + "/" + "../" * 20 + "etc/nlm"
    with pytest.raises(UnsafePathError, match="/etc"):
        safe_output_dir(sneaky)


def test_symlink_into_a_system_directory_is_refused(tmp_path):
    link = tmp_path / "outputs"
    os.symlink("/etc", link)
    with pytest.raises(UnsafePathError, match="resolves to /etc"):
        safe_output_dir(link / "run")


def test_ordinary_folders_are_accepted_and_resolved(tmp_path):
    assert safe_output_dir(tmp_path / "a" / ".." / "b") == (tmp_path / "b").resolve()


def test_paths_must_stay_inside_the_output_dir(tmp_path):
    assert path_inside(tmp_path, "run/final") == (tmp_path / "run" / "final").resolve()
    with pytest.raises(UnsafePathError, match="outside"):
        path_inside(tmp_path, "../elsewhere")
    os.symlink("/tmp", tmp_path / "escape")
    with pytest.raises(UnsafePathError, match="outside"):
        path_inside(tmp_path, "escape/file")
