"""configs/accelerate/*.yaml are read by accelerate's own loader (as `accelerate launch --config_file` does),
and hold what nlm's docs rely on: the engine, FSDP's version, a full (one-file) final state dict, ZeRO's stage,
and mixed precision left to nlm's `precision` option. Every key must be one `accelerate launch` knows: its
argument parser turns the file's keys into flags, and a misspelt key would be silently dropped."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "fsdp1.yaml": (DistributedType.FSDP, {"fsdp_version": 1, "fsdp_state_dict_type": "FULL_STATE_DICT",
                                          "fsdp_use_orig_params": True}),
    "fsdp2.yaml": (DistributedType.FSDP, {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT",
                                          "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, {"zero_stage": 2}),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, {"zero_stage": 3, "zero3_save_16bit_model": True}),
}


def test_every_shipped_file_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_loads_the_file_with_the_keys_the_docs_rely_on(name):
    config = load_config_from_file(str(CONFIGS / name))
    engine, keys = EXPECTED[name]
    assert config.distributed_type == engine
    assert config.mixed_precision == "no"  # precision is nlm's own option
    section = config.fsdp_config if engine == DistributedType.FSDP else config.deepspeed_config
    assert {key: section.get(key) for key in keys} == keys
    flags = {action.dest for action in launch_command_parser()._actions}
    unknown = [key for key in section if key not in flags]
    assert not unknown, f"{name}: keys accelerate launch does not know: {unknown}"
