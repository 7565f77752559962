import os
from pathlib import Path

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


# --- folders nlm owns: --overwrite deletes only what nlm made -----------------------------------------

from nlm.config.paths import MARKER, claim_folder, clear_owned, mark_folder, read_marker, refuse_protected  # noqa: E402
from nlm.errors import FolderNotOwnedError, RunExistsError  # noqa: E402


def _claim(folder, overwrite=False):
    return claim_folder(folder, created_by="nlm test", owns=("data", "report.md", "*.partial"), overwrite=overwrite,
                        exists_message=f"{folder} already holds output")


def test_a_new_or_empty_folder_is_created_and_marked(tmp_path):
    folder = _claim(tmp_path / "new" / "deep")
    marker = read_marker(folder)
    assert marker["created_by"] == "nlm test" and marker["owns"] == ["data", "report.md", "*.partial"]
    (tmp_path / "empty").mkdir()
    assert read_marker(_claim(tmp_path / "empty")) is not None


def test_an_unmarked_folder_with_a_users_file_is_refused_and_kept(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    for overwrite in (False, True):
        with pytest.raises(FolderNotOwnedError, match=r"mine is not empty and was not created by nlm \(it holds thesis.txt\)") as caught:
            _claim(folder, overwrite=overwrite)
        assert caught.value.exit_code == 2
    assert (folder / "thesis.txt").read_text() == "four years of work"
    assert read_marker(folder) is None
    with pytest.raises(FolderNotOwnedError):
        clear_owned(folder)


def test_overwrite_removes_only_what_nlm_wrote_in_a_marked_folder(tmp_path):
    folder = _claim(tmp_path / "out")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "report.md").write_text("# report")
    (folder / "notes.txt").write_text("my notes")
    (folder / "papers").mkdir()
    (folder / "papers" / "draft.tex").write_text("\\section{}")
    with pytest.raises(RunExistsError, match="already holds output"):
        _claim(folder)
    assert (folder / "report.md").exists()
    _claim(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "notes.txt", "papers"]
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "papers" / "draft.tex").is_file()


def test_overwrite_recurses_into_marked_sub_folders_and_keeps_a_users_file_there(tmp_path):
    folder = _claim(tmp_path / "out")
    mark_folder(folder / "runs", "nlm demo", (".cache",))
    run = mark_folder(folder / "runs" / "a", "nlm train", ("final",))
    (run / "final").mkdir()
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    other = mark_folder(folder / "b", "nlm train", ("final",))
    (other / "final").mkdir()
    (other / "keep.txt").write_text("mine")
    kept = clear_owned(folder)
    assert not (run / "final").exists()
    assert not (folder / "runs").exists()  # emptied of nlm's files, so removed with their markers
    assert (other / "keep.txt").read_text() == "mine" and not (other / "final").exists()
    assert kept == ["b/keep.txt"]
    (folder / "unmarked").mkdir()
    mark_folder(folder / "unmarked" / "run", "nlm train", ("final",))
    assert clear_owned(folder) == ["b/keep.txt", "unmarked"]  # an unmarked folder is kept whole


def test_a_link_in_an_owned_entry_is_removed_never_followed(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file.txt").write_text("keep")
    folder = _claim(tmp_path / "out")
    os.symlink(precious, folder / "data")
    _claim(folder, overwrite=True)
    assert not (folder / "data").exists() and (precious / "file.txt").read_text() == "keep"


def test_root_home_and_the_current_directory_are_never_emptied(tmp_path, monkeypatch):
    with pytest.raises(UnsafePathError, match="filesystem root"):
        refuse_protected(Path("/"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UnsafePathError, match="home folder"):
        refuse_protected(home)
    folder = _claim(tmp_path / "out")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(folder / "data")
    for target in (folder, folder / "data"):
        with pytest.raises(UnsafePathError, match="contains the current directory"):
            refuse_protected(target)
    with pytest.raises(UnsafePathError, match="contains the current directory"):
        _claim(folder, overwrite=True)
    assert (folder / "data" / "train.jsonl").is_file()
    marked_home = mark_folder(home, "nlm test", ("*",))
    (marked_home / "a.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePathError, match="home folder"):
        clear_owned(marked_home)
    assert (home / "a.txt").exists()


def test_a_non_empty_unmarked_folder_is_never_claimed_by_mark_folder(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "pip").mkdir()
    mark_folder(folder, "nlm train", ("*",))
    assert read_marker(folder) is None


def test_output_paths_are_checked_when_the_configuration_is_parsed(tmp_path, capsys, monkeypatch):
    from nlm.cli import main

    assert main(["config", "show", "--output_dir", "/etc/x"]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "inside the system directory /etc" in err and len(err.strip().splitlines()) == 1
    # `nlm train` fails the same way before it looks for (or loads) any model: these do not exist.
    assert main(["train", "--student_model", str(tmp_path / "none"), "--teacher_model", str(tmp_path / "none"),
                 "--train_file", str(tmp_path / "none.jsonl"), "--output_dir", "/etc/x"]) == 2
    assert "inside the system directory /etc" in capsys.readouterr().err
    os.symlink("/usr", tmp_path / "link")
    assert main(["config", "show", "--output_dir", str(tmp_path / "link" / "out")]) == 2
    assert "resolves to /usr" in capsys.readouterr().err
    monkeypatch.setenv("NLM_OUTPUT_DIR", "/proc/out")
    assert main(["config", "show"]) == 2
    assert "NLM_OUTPUT_DIR" in capsys.readouterr().err
    monkeypatch.delenv("NLM_OUTPUT_DIR")
    (tmp_path / "out").mkdir()
    os.symlink("/tmp", tmp_path / "out" / "escape")
    assert main(["config", "show", "--output_dir", str(tmp_path / "out"), "--run_name", "escape"]) == 2
    assert "run_name 'escape'" in capsys.readouterr().err
