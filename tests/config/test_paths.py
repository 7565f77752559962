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

from nlm.config.paths import (  # noqa: E402
    MARKER,
    claim_file,
    claim_folder,
    clear_owned,
    mark_folder,
    read_marker,
    record_file,
    record_written,
    refuse_protected,
)
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
    record_written(folder / "data", "nlm test")
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


def test_an_owned_folder_is_never_removed_whole_a_users_file_inside_survives(tmp_path):
    """data/, final/, checkpoint-N/, runs/: what nlm wrote goes (listed in the folder's marker, or one of the
    files transformers/TensorBoard write when it has no marker), a user's file there stays and is named."""
    folder = _claim(tmp_path / "out")
    data = folder / "data"
    data.mkdir()
    (data / "mine.jsonl").write_text("{}\n")  # the user's, there before nlm wrote
    (data / "train.jsonl").write_text("{}\n")
    record_written(data, "nlm test", before=["mine.jsonl"])
    assert read_marker(data)["owns"] == ["train.jsonl"]
    for name in ("report.md",):
        (folder / name).write_text("x")
    run = mark_folder(folder / "runs", "nlm test", ("checkpoint-*",))
    checkpoint = run / "checkpoint-2"
    (checkpoint / "nested").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", "nested/events.out.tfevents.1"):
        (checkpoint / name).write_text("nlm's")
    (checkpoint / "analysis.ipynb").write_text("the user's")
    kept = clear_owned(folder)
    assert kept == ["data/mine.jsonl", "runs/checkpoint-2/analysis.ipynb"]
    assert sorted(p.name for p in data.iterdir()) == [MARKER, "mine.jsonl"]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["analysis.ipynb"]
    assert not (folder / "report.md").exists()


def test_an_output_file_is_replaced_only_when_nlm_wrote_it(tmp_path):
    mine = tmp_path / "selected.jsonl"
    mine.write_text("the user's\n")
    for overwrite in (False, True):
        with pytest.raises(FolderNotOwnedError, match="was not written by nlm"):
            claim_file(mine, overwrite=overwrite)
    assert mine.read_text() == "the user's\n"
    ours = tmp_path / "ours.jsonl"
    assert claim_file(ours, overwrite=False) == ours.resolve()
    ours.write_text("{}\n")
    record_file(ours, "nlm test")
    with pytest.raises(RunExistsError, match="pass --overwrite"):
        claim_file(ours, overwrite=False)
    assert claim_file(ours, overwrite=True) == ours.resolve()
    assert claim_file(ours, overwrite=False, resumable=True) == ours.resolve()
    with pytest.raises(UnsafePathError, match="system directory"):
        claim_file("/etc/nlm.jsonl", overwrite=True)
    with pytest.raises(UnsafePathError, match="is a folder"):
        claim_file(tmp_path, overwrite=True)


# Every command that writes checks its output path when its options are parsed: a system path is exit 2
# with one line, before any model (these do not even exist) is looked at.
WRITING_COMMANDS = {
    "init-student": ["init-student", "--teacher", "none", "--keep_every", "2", "--output", "/etc/nlm-x"],
    "export": ["export", "--model", "none", "--output", "/usr/nlm-x"],
    "teacher-generate": ["teacher-generate", "--teacher_model", "none", "--data", "none.jsonl", "--output", "/etc/x.jsonl"],
    "data select": ["data", "select", "--teacher", "none", "--student", "none", "--data", "none.jsonl", "--count", "1",
                    "--output", "ok.jsonl", "--scores", "/proc/x.jsonl"],
    "data mix": ["data", "mix", "--config", "none.yaml", "--output", "/etc/order.jsonl"],
    "teacher-cache": ["teacher-cache", "--config", "none.yaml", "--output", "/boot/cache"],
    "report": ["report", "none", "--output", "/sys/report"],
    "demo": ["demo", "--output_dir", "/etc/demo"],
}


@pytest.mark.parametrize("command", list(WRITING_COMMANDS))
def test_every_writing_command_refuses_a_system_path_when_parsing(command, capsys, tmp_path, monkeypatch):
    from nlm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(WRITING_COMMANDS[command]) == 2
    err = capsys.readouterr().err
    assert "inside the system directory" in err and len(err.strip().splitlines()) == 1, err
