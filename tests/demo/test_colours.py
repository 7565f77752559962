import json

from nlm.demo.colours import COLOURS, build_demo_data, write_jsonl


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b, c = build_demo_data(0), build_demo_data(0), build_demo_data(1)
    assert a == b
    assert a.teacher_train != c.teacher_train
    write_jsonl(tmp_path / "a.jsonl", a.heldout)
    write_jsonl(tmp_path / "b.jsonl", b.heldout)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_splits_are_disjoint_and_student_data_is_a_subset():
    data = build_demo_data(0)
    train_prompts = {r["prompt"] for r in data.teacher_train}
    assert not train_prompts & {r["prompt"] for r in data.heldout}
    assert all(row in data.teacher_train for row in data.student_train)
    assert len(data.student_train) * 5 < len(data.teacher_train)


def test_answers_are_correct():
    data = build_demo_data(3)
    for distribution in data.task.distributions.values():
        assert set(distribution) == set(COLOURS) and abs(sum(distribution.values()) - 1) < 1e-9
    for row in data.heldout:
        obj = row["prompt"].split()[2]
        assert row["completion"] == data.task.most_likely(obj)
    for row in data.teacher_train:
        assert row["completion"] in COLOURS and row["prompt"].split()[2] in data.task.objects


def test_labels_are_samples_not_always_the_mode():
    """The point of the task: a single label is often not the most likely answer."""
    data = build_demo_data(0)
    modes = [row["completion"] == data.task.most_likely(row["prompt"].split()[2]) for row in data.teacher_train]
    assert 0.4 < sum(modes) / len(modes) < 0.6


def test_records_are_normal_prompt_completion_jsonl(tmp_path):
    from nlm.data.reader import load_records

    path = write_jsonl(tmp_path / "d.jsonl", build_demo_data(0).student_train)
    records, stats = load_records([path])
    assert stats.formats == {"prompt_completion": len(records)} and not stats.skipped
    assert json.loads(path.read_text().splitlines()[0]).keys() == {"prompt", "completion"}
