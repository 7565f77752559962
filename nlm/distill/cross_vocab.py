"""Divergences between next-token distributions over two different vocabularies.

`uld`  Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two probability vectors
       sorted in decreasing order (the shorter one padded with zeros) — a closed form of the Wasserstein
       distance under a uniform cost, which needs no correspondence between the vocabularies.
`hybrid` tokens spelled by the same bytes in both vocabularies are matched one to one (`VocabMap`); over them
       the exact forward KL terms Σ p_t·(log p_t − log p_s) are summed, and the remaining (unmatched)
       probability mass of each side is compared with ULD. With identical tokenizers every token matches,
       the ULD part is empty and the result is today's forward KL exactly. Only where a group is one token
       on both sides (`one_to_one`): where a side spells the group with several tokens, its first token is a
       *piece* ("gr" of "green"), and a token-for-token match would push the other side towards that piece;
       those groups are compared with ULD alone.
`alm`  Approximate Likelihood Matching (Minixhofer et al. 2025): each group's likelihood — the product of
       a side's (softened) conditionals over its own tokens of the group — is compared as a binary
       distribution, KL(Bernoulli(p_t) ‖ Bernoulli(p_s)). It compares the same event (this text follows) on
       both sides whatever the tokenisation, at the price of carrying nothing about the alternatives.

Rows are the aligned group-start positions (see `nlm.data.align`); every function returns one value per row
(fp32), to be summed and normalised by the caller like the same-tokenizer divergences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(visible, codes, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    found: set[str] = set()
    stack = [decoder]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "type" in node:
                found.add(str(node["type"]))
            stack.extend(node.get("decoders") or [])
    return found


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The bytes each ordinary (non-special) token spells, for byte-level BPE and SentencePiece-style vocabularies.

    Tokens whose bytes cannot be known exactly are left out (they fall to the ULD part of `hybrid`).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kinds = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in kinds
    decoder = _byte_decoder()
    out: dict[int, bytes] = {}
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if byte_level:
            if all(ch in decoder for ch in token):
                out[index] = bytes(decoder[ch] for ch in token)
            continue
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                out[index] = bytes([int(token[3:5], 16)])
            except ValueError:
                pass
            continue
        out[index] = token.replace("\u2581", " ").encode("utf-8")
    return out


@dataclass(frozen=True)
class VocabMap:
    """Teacher and student ids that spell the same bytes (one to one), and how many tokens each side has."""

    teacher_ids: torch.Tensor  # [M] long
    student_ids: torch.Tensor  # [M] long
    teacher_size: int
    student_size: int

    @property
    def matched(self) -> int:
        return int(self.teacher_ids.numel())


def build_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, teacher_size: int, student_size: int) -> VocabMap:
    """Match tokens by their bytes; the same bytes spelled by two ids on one side keep the lowest id."""
    student_by_bytes: dict[bytes, int] = {}
    for index, spelled in sorted(token_bytes(student_tokenizer).items()):
        if index < student_size:
            student_by_bytes.setdefault(spelled, index)
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for index, spelled in sorted(token_bytes(teacher_tokenizer).items()):
        match = student_by_bytes.get(spelled)
        if index < teacher_size and match is not None and match not in used:
            pairs[index] = match
            used.add(match)
    # Special tokens with the same text (e.g. </s>) match too: the EOS group compares them.
    for token, index in teacher_tokenizer.get_vocab().items():
        if index in getattr(teacher_tokenizer, "all_special_ids", []) and index < teacher_size:
            match = student_tokenizer.get_vocab().get(token)
            if match is not None and match < student_size and match not in used and index not in pairs:
                pairs[index] = match
                used.add(match)
    teacher_ids = torch.tensor(sorted(pairs), dtype=torch.long)
    student_ids = torch.tensor([pairs[i] for i in sorted(pairs)], dtype=torch.long)
    return VocabMap(teacher_ids, student_ids, teacher_size, student_size)


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_i |sort↓(p)_i − sort↓(q)_i| per row, the shorter side padded with zero probabilities."""
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = F.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(dim=-1)


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[G, Vs] and [G, Vt] logits -> [G] ULD distances between the softened distributions."""
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return _sorted_l1(p_s, p_t)


def hybrid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab: VocabMap,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    one_to_one: torch.Tensor | None = None,
) -> torch.Tensor:
    """[G] matched-token forward KL (exact) plus ULD over the unmatched probability mass; where `one_to_one`
    ([G] bool) is False, `unmatched_weight`·ULD over the whole distributions."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    t_ids = vocab.teacher_ids.to(log_t.device)
    s_ids = vocab.student_ids.to(log_s.device)
    log_t_m, log_s_m = log_t[:, t_ids], log_s[:, s_ids].to(log_t.device)
    p_t_m = log_t_m.exp()
    matched = torch.where(p_t_m > 0, p_t_m * (log_t_m - log_s_m), torch.zeros_like(p_t_m)).sum(dim=-1)
    pieces = None if one_to_one is None or bool(one_to_one.all()) else ~one_to_one.to(log_t.device)
    if pieces is not None:
        whole = unmatched_weight * _sorted_l1(log_s.exp().to(log_t.device), log_t.exp())
    if vocab.matched == log_t.shape[-1] and vocab.matched == log_s.shape[-1]:
        exact = matched_weight * matched
        return exact if pieces is None else torch.where(pieces, whole, exact)
    t_rest = torch.ones(log_t.shape[-1], dtype=torch.bool, device=log_t.device)
    t_rest[t_ids] = False
    s_rest = torch.ones(log_s.shape[-1], dtype=torch.bool, device=log_s.device)
    s_rest[s_ids] = False
    rest = _sorted_l1(log_s[:, s_rest].exp().to(log_t.device), log_t[:, t_rest].exp())
    split = matched_weight * matched + unmatched_weight * rest
    return split if pieces is None else torch.where(pieces, whole, split)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[G] KL(Bernoulli(p_t) ‖ Bernoulli(p_s)) from log-likelihoods; both clamped below log(1 − eps) so a
    certain side gives a large, finite value (and no gradient past the clamp) rather than inf."""
    top = torch.log1p(torch.tensor(-eps, dtype=torch.float64)).item()
    lt, ls = log_p_teacher.float().clamp(max=top), log_p_student.float().clamp(max=top)
    p_t = lt.exp()
    return p_t * (lt - ls) + (1 - p_t) * (_log1mexp(lt) - _log1mexp(ls))
