"""One teacher cache for all trials only when no point of the space needs the live teacher or another cache."""

import pytest
import yaml

from nlm.tune.shared import cache_plan
from nlm.tune.spec import load_tune


def _setup(tmp_path, model_dirs, pc_file, space, **tune):
    document = {"student_model": str(model_dirs["student"]), "teacher_model": str(model_dirs["teacher"]),
                "train_file": str(pc_file), "eval_split": 0.25, "output_dir": str(tmp_path / "out"),
                "tune": {"space": space, **tune}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_tune(path)


@pytest.mark.parametrize("space, reason", [
    ({"distillation.alpha": {"low": 0.0, "high": 1.0}, "learning_rate": [1e-3, 1e-2],
      "distillation.divergence": ["jsd", "tvd"]}, None),
    ({"distillation.temperature": {"low": 1.0, "high": 4.0}},
     "distillation.temperature = 1.0 changes the teacher cache's fingerprint"),
    ({"max_seq_length": [16, 32]}, "max_seq_length = 16 changes the teacher cache's fingerprint"),
    ({"distillation.lmbda": [0.0, 0.5]}, "distillation.lmbda = 0.5: distillation.lmbda > 0"),
    ({"distillation.temperature_mode": ["fixed", "entropy"]}, "temperature_mode=entropy"),
    ({"distillation.hidden_states.weight": {"low": 0.0, "high": 1.0}}, "distillation.hidden_states"),
    ({"teacher_model": ["a", "b"]}, "the space searches teacher_model"),
])
def test_the_cache_is_shared_only_when_every_point_can_use_it(tmp_path, model_dirs, pc_file, space, reason):
    plan = cache_plan(_setup(tmp_path, model_dirs, pc_file, space))
    assert plan == reason if reason is None else reason in plan


def test_the_cache_can_be_turned_off(tmp_path, model_dirs, pc_file):
    setup = _setup(tmp_path, model_dirs, pc_file, {"distillation.alpha": [0.2, 0.8]}, teacher_cache="off")
    assert cache_plan(setup) == "tune.teacher_cache: off"
