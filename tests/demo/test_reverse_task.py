import typing

from nlm.demo.reverse import LETTERS, MAX_LETTERS, MIN_LETTERS, build_reverse_data, reverse_corpus
from nlm.demo.tasks import TASK_NAMES, TASKS, get_task


def _word(prompt: str) -> str:
    assert prompt.startswith("reverse: ")
    return prompt.removeprefix("reverse: ").replace(" ", "")


def test_same_seed_same_data_other_seed_other_data():
    assert build_reverse_data(0) == build_reverse_data(0)
    assert build_reverse_data(0).teacher_train != build_reverse_data(1).teacher_train


def test_answers_are_the_word_reversed_letter_by_letter():
    data = build_reverse_data(2)
    for row in data.teacher_train + data.heldout:
        word = _word(row["prompt"])
        assert MIN_LETTERS <= len(word) <= MAX_LETTERS and set(word) <= set(LETTERS)
        assert row["completion"].split() == list(reversed(word))


def test_heldout_words_are_unseen_and_students_get_a_small_labelled_subset():
    data = build_reverse_data(0)
    train = {r["prompt"] for r in data.teacher_train}
    assert len(train) == len(data.teacher_train) and not train & {r["prompt"] for r in data.heldout}
    assert data.student_train == data.teacher_train[: len(data.student_train)]
    assert len(data.student_train) * 10 < len(data.teacher_train)


def test_every_letter_is_one_token_so_answers_are_multi_token():
    from nlm.models.scratch import build_tokenizer

    data = build_reverse_data(0)
    tokenizer = build_tokenizer(reverse_corpus(data), vocab_size=400)
    for row in data.heldout[:50]:
        letters = row["completion"].split()
        assert len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) == len(letters) >= MIN_LETTERS


def test_registry_names_match_the_command_choices_and_the_default_is_unchanged():
    from nlm.commands.demo import Options

    assert tuple(typing.get_args(Options.model_fields["task"].annotation)) == TASK_NAMES == tuple(TASKS)
    assert Options().task == "colours" and get_task("colours").on_policy is None
    assert get_task("reverse").on_policy["lmbda"] > 0
