"""The Options -> flags / environment / YAML machinery every command uses, on a model with every kind of field."""

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from nlm.commands.options import build_parser, parse_options
from nlm.errors import ConfigError


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a positional", json_schema_extra={"positional": True})
    count: int = Field(3, ge=1, le=10, description="a bounded integer")
    ratio: float = Field(0.5, gt=0, description="a positive number")
    mode: Literal["fast", "slow"] = Field("fast", description="a choice")
    tags: list[str] = Field(default_factory=list, description="repeatable")
    verbose: bool = Field(False, description="a flag", json_schema_extra={"aliases": ["--loud"]})
    as_json: bool = Field(False, alias="json", description="a flag named by its alias")
    name: str | None = Field(None, description="optional text")


def parse(argv, env=None):
    return parse_options("sample", Sample, argv, environ=env or {})


def test_every_kind_of_field_becomes_a_flag():
    options = parse(["data.jsonl", "--count", "4", "--ratio", "0.25", "--mode", "slow", "--tags", "a", "b",
                     "--tags", "c", "--loud", "--json", "--name", "x"])
    assert options == Sample(path="data.jsonl", count=4, ratio=0.25, mode="slow", tags=["a", "b", "c"], verbose=True,
                             json=True, name="x")
    assert parse(["p"]) == Sample(path="p")
    assert parse(["p", "--verbose", "--no-verbose"]).verbose is False


@pytest.mark.parametrize("argv, message", [
    (["p", "--count", "0"], "sample --count: expected an integer >= 1 and <= 10, got '0'"),
    (["p", "--count", "many"], "sample --count: expected an integer, got 'many'"),
    (["p", "--ratio", "0"], "sample --ratio: expected a number > 0, got '0'"),
    (["p", "--ratio", "x"], "sample --ratio: expected a number, got 'x'"),
    (["p", "--mode", "medium"], "sample --mode: expected one of fast, slow, got 'medium'"),
    ([], "sample path is required"),
    (["p", "--cuont", "3"], "sample: unknown arguments --cuont 3 (did you mean '--count'?)"),
])
def test_errors_are_one_line_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as info:
        parse(argv)
    assert str(info.value) == message and info.value.exit_code == 2


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text("count: 5\nratio: 0.1\nmode: slow\ntags: [y1, y2]\n")
    env = {"NLM_SAMPLE__COUNT": "6", "NLM_SAMPLE__RATIO": "0.2", "NLM_SAMPLE__TAGS": "e1,e2", "NLM_SAMPLE__VERBOSE": "true"}
    options = parse(["p", "--config", str(config), "--count", "7"], env)
    assert (options.count, options.ratio, options.mode, options.tags, options.verbose) == (7, 0.2, "slow", ["e1", "e2"], True)
    assert options.name is None  # default
    assert parse(["p", "--config", str(config)]).count == 5
    assert parse(["p"], {"NLM_SAMPLE__TAGS": '["j1", "j2"]'}).tags == ["j1", "j2"]


def test_errors_name_the_environment_variable_or_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"NLM_SAMPLE__COUNT \(environment\): expected an integer >= 1 and <= 10, got '0'"):
        parse(["p"], {"NLM_SAMPLE__COUNT": "0"})
    with pytest.raises(ConfigError, match=r"NLM_SAMPLE__CUONT is not an option of 'nlm sample' \(did you mean 'NLM_SAMPLE__COUNT'\?\)"):
        parse(["p"], {"NLM_SAMPLE__CUONT": "1"})
    config = tmp_path / "sample.yaml"
    config.write_text("count: 11\n")
    with pytest.raises(ConfigError, match=rf"count in {config}: expected an integer >= 1 and <= 10, got 11"):
        parse(["p", "--config", str(config)])
    config.write_text("cuont: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'cuont' for 'nlm sample' \(did you mean 'count'\?\)"):
        parse(["p", "--config", str(config)])
    config.write_text("# all commented out\n")
    with pytest.raises(ConfigError, match="is empty"):
        parse(["p", "--config", str(config)])
    config.write_text("- count\n- 3\n")
    with pytest.raises(ConfigError, match="expected a mapping of option: value, found a list"):
        parse(["p", "--config", str(config)])
    with pytest.raises(ConfigError, match="is a directory"):
        parse(["p", "--config", str(tmp_path)])


class WithTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="a training YAML, handed to the command")
    top_k: int = Field(8, ge=1, description="the command's own option")
    rest: list[str] = Field(default_factory=list, json_schema_extra={"training_flags": True})


def test_a_config_field_is_passed_through_and_training_flags_collected(tmp_path):
    options = parse_options("mix", WithTrainingConfig, ["--config", "run.yaml", "--top_k", "4", "--lora.r", "8", "--overwrite"],
                            environ={"NLM_MIX__TOP_K": "2"})
    assert options.config == "run.yaml" and options.top_k == 4 and options.rest == ["--lora.r", "8", "--overwrite"]


def test_help_shows_description_range_default_and_choices():
    text = " ".join(build_parser("sample", Sample).format_help().split())  # argparse wraps lines
    assert "a bounded integer (an integer >= 1 and <= 10) [default: 3]" in text
    assert "{fast,slow}" in text and "--verbose, --no-verbose, --loud" in text and "(required)" in text
    assert "--config FILE" in text and "NLM_SAMPLE__<OPTION>" in text
