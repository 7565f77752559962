"""Teacher and student must share a tokenizer; their output heads may still differ by padding rows."""

from __future__ import annotations

import logging
from typing import Any

from nlm.errors import VocabularyMismatchError

logger = logging.getLogger(__name__)


def output_rows(model: Any) -> int:
    """How many logits the model produces per position (its head's rows, padding included)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def tokenizers_equal(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Same tokens at the same ids: the same-tokenizer path applies."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def own_vocab_width(tokenizer: Any, model: Any, role: str) -> int:
    """A model's vocabulary width under its own tokenizer (padding rows of its head dropped)."""
    width, rows = len(tokenizer), output_rows(model)
    if rows < width:
        raise VocabularyMismatchError(
            f"the {role}'s output head has {rows} rows but its tokenizer has {width} tokens; "
            "resize the model's embeddings to the tokenizer"
        )
    return width


def shared_vocab_width(teacher_tokenizer: Any, student_tokenizer: Any, teacher: Any, student: Any) -> int:
    """The number of logits both models are compared over: the shared tokenizer's size.

    Heads padded past the tokenizer (e.g. 152,064 rows over a 151,936-token Qwen2.5 tokenizer) are fine:
    the extra logits are never a real token and are dropped. Different tokens at one id are an error.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        teacher_by_id = {i: t for t, i in teacher_vocab.items()}
        student_by_id = {i: t for t, i in student_vocab.items()}
        for token_id in range(max(len(teacher_by_id), len(student_by_id)) + 1):
            a, b = teacher_by_id.get(token_id), student_by_id.get(token_id)
            if a != b:
                raise VocabularyMismatchError(
                    f"teacher and student tokenizers differ: id {token_id} is {a!r} for the teacher and {b!r} "
                    f"for the student (sizes {len(teacher_vocab)} and {len(student_vocab)}); set "
                    "distillation.cross_tokenizer to uld, hybrid or alm to distil across tokenizers"
                )
    width = len(student_tokenizer)
    for role, model in (("teacher", teacher), ("student", student)):
        rows = output_rows(model)
        if rows < width:
            raise VocabularyMismatchError(
                f"the {role}'s output head has {rows} rows but the tokenizer has {width} tokens; "
                "resize the model's embeddings to the tokenizer"
            )
        if rows > width:
            logger.info("%s head has %d rows for %d tokens: the %d padding logits are dropped", role, rows, width, rows - width)
    return width


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides token identity: every (token, id) pair and the special tokens. Two tokenizers
    with the same fingerprint give the same token the same id; a served teacher publishes it on /v1/models so
    a client can check it before trusting the server's token ids (the chat template is not part of it)."""
    import hashlib
    import json

    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()
