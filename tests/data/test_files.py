import pytest

from nlm.data.files import resolve_eval_files, resolve_train_files
from nlm.errors import DataError


def test_train_file_wins_over_the_channel(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    assert resolve_train_files(tmp_path / "a.jsonl", {"SM_CHANNEL_TRAIN": str(tmp_path)}) == [tmp_path / "a.jsonl"]


def test_sm_channel_train_takes_every_jsonl_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    assert resolve_train_files(None, {"SM_CHANNEL_TRAIN": str(tmp_path)}) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_channel_errors(tmp_path):
    with pytest.raises(DataError, match="holds no \\*.jsonl"):
        resolve_train_files(None, {"SM_CHANNEL_TRAIN": str(tmp_path)})
    with pytest.raises(DataError, match="not a directory"):
        resolve_train_files(None, {"SM_CHANNEL_TRAIN": str(tmp_path / "missing")})


def test_no_training_data_names_both_options():
    with pytest.raises(DataError, match="set train_file .* or \\$SM_CHANNEL_TRAIN"):
        resolve_train_files(None, {})


def test_eval_channels_in_order(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.jsonl").write_text("{}\n")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "y.jsonl").write_text("{}\n")
    assert resolve_eval_files(None, {"SM_CHANNEL_VALIDATION": str(tmp_path / "v")}) == [tmp_path / "v" / "y.jsonl"]
    both = {"SM_CHANNEL_EVAL": str(tmp_path / "e"), "SM_CHANNEL_VALIDATION": str(tmp_path / "v")}
    assert resolve_eval_files(None, both) == [tmp_path / "e" / "x.jsonl"]
    assert resolve_eval_files(None, {}) == []
