"""Engine choices that would silently change results: DataParallel without a launcher."""

import logging

import pytest
from torch import nn
from transformers import TrainingArguments

from nlm.training.arguments import one_device_without_launcher


def test_several_gpus_without_a_launcher_train_on_one_never_under_data_parallel(tmp_path, caplog, tiny_trainer):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args._n_gpu = 2  # what the library computes on a machine with two visible GPUs and no launcher
    assert args.parallel_mode.name == "NOT_DISTRIBUTED"
    with caplog.at_level(logging.WARNING):
        one_device_without_launcher(args)
    assert args.n_gpu == 1 and args.parallel_mode.name == "NOT_PARALLEL"
    assert "2 GPUs are visible but nlm was started without a launcher" in caplog.text and "torchrun" in caplog.text
    trainer = tiny_trainer(args)
    assert not isinstance(trainer._wrap_model(trainer.model), nn.DataParallel)
    assert trainer.args.train_batch_size == args.per_device_train_batch_size


def test_one_gpu_or_a_launcher_is_left_alone(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING):
        one_device_without_launcher(args)
    assert args.n_gpu == 0 and not caplog.text


@pytest.fixture
def tiny_trainer(model_dirs, pc_file, tokenizer):
    from nlm.config.settings import DistillationConfig
    from nlm.data.tokenize import PaddingCollator, TokenizeSettings, tokenize_records
    from nlm.models.loading import load_causal_lm
    from nlm.training.trainer import DistillationTrainer

    def build(args):
        data = tokenize_records([pc_file], tokenizer, TokenizeSettings(max_seq_length=32))
        return DistillationTrainer(model=load_causal_lm(str(model_dirs["student"])), args=args, train_dataset=data.dataset,
                                   data_collator=PaddingCollator(0), teacher=None,
                                   distillation=DistillationConfig(alpha=0.0), vocab_width=len(tokenizer))

    return build
