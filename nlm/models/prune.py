"""A student made from a teacher by keeping some of its decoder layers (DistilBERT / Minitron-style start).

The kept layers, the embeddings, the final norm and the head are copied; the config says the new depth,
and per-layer config lists (e.g. `layer_types`) keep their kept entries. The folder is a plain
transformers model: `AutoModelForCausalLM.from_pretrained(DIR)` loads it with no missing or unexpected keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nlm.config.paths import claim_folder, record_written
from nlm.errors import ConfigError
from nlm.models.importance import (
    block_influence,
    decoder_layers,
    even_layers,
    important_layers,
    layer_count,
    sample_batches,
)

logger = logging.getLogger(__name__)

# Written into the student's config.json: the teacher layers it was cut from (0-based) and the teacher's depth,
# so `distillation.hidden_states.layers: auto` maps each kept layer to the teacher layer it stands for.
KEPT_LAYERS_KEY = "nlm_kept_layers"
TEACHER_DEPTH_KEY = "nlm_teacher_num_layers"


def kept_layers(config: Any, teacher_depth: int | None = None) -> tuple[int, ...] | None:
    """The teacher layers a student made by `init_student` keeps, when its config records them (and, given
    `teacher_depth`, they were cut from a teacher of that depth); None otherwise."""
    kept = getattr(config, KEPT_LAYERS_KEY, None)
    if not isinstance(kept, (list, tuple)) or not kept:
        return None
    if teacher_depth is not None and getattr(config, TEACHER_DEPTH_KEY, None) not in (None, teacher_depth):
        return None
    return tuple(int(layer) for layer in kept)


def _setlayer_count(config: Any, depth: int) -> None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            setattr(config, name, depth)
            return


def choose_layers(depth: int, layers: Sequence[int] | None = None, keep_every: int | None = None) -> list[int]:
    """Sorted, distinct layer numbers to keep: given ones, or every N-th starting at 0 plus the last."""
    if (layers is None) == (keep_every is None):
        raise ConfigError("give --layers, --keep_every or --num_layers, exactly one")
    if keep_every is not None:
        if keep_every < 1:
            raise ConfigError(f"--keep_every {keep_every}: expected a positive number")
        chosen = sorted(set(range(0, depth, keep_every)) | {depth - 1})
    else:
        chosen = sorted(set(layers or []))
    if not chosen:
        raise ConfigError("--layers: expected at least one layer number")
    outside = [layer for layer in chosen if not 0 <= layer < depth]
    if outside:
        raise ConfigError(f"--layers {','.join(map(str, outside))}: the teacher has layers 0..{depth - 1}")
    return chosen


def prune_layers(model: Any, keep: Sequence[int]) -> Any:
    """Keep only the decoder layers `keep` (in place); returns the model."""
    blocks = decoder_layers(model)
    kept = [blocks[i] for i in keep]
    for new_index, block in enumerate(kept):
        for module in block.modules():  # attention modules index the KV cache by layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for index in range(len(blocks) - 1, -1, -1):
        del blocks[index]
    blocks.extend(kept)
    config = model.config
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == layer_count(config) and name not in ("architectures",):
            setattr(config, name, [value[i] for i in keep])  # per-layer lists such as layer_types
    _setlayer_count(config, len(keep))
    return model


def init_student(teacher: str, output: Path, layers: Sequence[int] | None = None, keep_every: int | None = None,
                 overwrite: bool = False, trust_remote_code: bool = False, num_layers: int | None = None,
                 by: str = "even", data: Path | None = None, samples: int = 64,
                 max_seq_length: int = 512) -> dict[str, Any]:
    """Write a student folder (config, weights, tokenizer, generation config) made of the teacher's `layers`,
    or of `num_layers` layers chosen `by` even spacing or by block influence measured on `data`."""
    from nlm.models.loading import load_causal_lm, load_tokenizer

    # The choice of layers is checked before anything is written or loaded (bad input leaves no folder).
    if num_layers is None and (by != "even" or data is not None):
        raise ConfigError("--by and --data choose --num_layers layers: pass --num_layers N")
    if num_layers is not None and (layers is not None or keep_every is not None):
        raise ConfigError("give --num_layers, --layers or --keep_every, exactly one")
    if by not in ("even", "importance"):
        raise ConfigError(f"--by {by}: expected even or importance")
    if num_layers is not None and by == "importance" and data is None:
        raise ConfigError("--by importance measures the layers on sample data: pass --data FILE")
    output = claim_folder(output, created_by="nlm init-student", owns=("*.partial",), overwrite=overwrite,
                          exists_message=f"{output} already holds a student; choose another --output or pass --overwrite")
    before = [entry.name for entry in output.iterdir()]  # what --overwrite kept (a user's files) stays theirs
    model = load_causal_lm(teacher, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    depth = layer_count(model.config)
    influence = None
    if num_layers is None:
        keep = choose_layers(depth, layers, keep_every)
    elif by == "importance":
        model.eval()
        influence = block_influence(model, sample_batches(Path(data), tokenizer, samples, max_seq_length))
        keep = important_layers(influence, num_layers)
    elif by == "even":
        keep = even_layers(depth, num_layers)
    prune_layers(model, keep)
    setattr(model.config, KEPT_LAYERS_KEY, list(keep))
    setattr(model.config, TEACHER_DEPTH_KEY, depth)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    record_written(output, "nlm init-student", before)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("student with teacher layers %s (%d of %d) written to %s: %d parameters", keep, len(keep), depth, output, parameters)
    report: dict[str, Any] = {"output": str(output), "layers": keep, "teacher_layers": depth, "parameters": parameters}
    if influence is not None:
        report["influence"] = [round(value, 6) for value in influence]
    return report
