"""Mixture sources: files, folders, globs and SageMaker channels; each error names train_mixture[i].path."""

import pytest

from nlm.data.mixture import source_files
from nlm.errors import ConfigError
from tests.conftest import write_jsonl


def test_a_source_is_a_file_a_folder_a_glob_or_a_channel(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    a = write_jsonl(folder / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(folder / "b.jsonl", [{"text": "y"}])
    assert source_files(0, str(a), None) == [a]
    assert source_files(0, str(folder), None) == [a, b]
    assert source_files(0, str(folder / "*.jsonl"), None) == [a, b]
    assert source_files(0, None, "chat", environ={"SM_CHANNEL_CHAT": str(folder)}) == [a, b]


def test_missing_sources_name_their_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train_mixture\[2\]\.path = .*no such file"):
        source_files(2, str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(ConfigError, match=r"train_mixture\[0\]\.path = .*matches no file"):
        source_files(0, str(tmp_path / "*.jsonl"), None)
    with pytest.raises(ConfigError, match=r"\$SM_CHANNEL_TOOLS is empty"):
        source_files(1, None, "tools", environ={})
