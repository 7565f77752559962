"""The one configuration of a training run.

Every option lives here once, with its help text and its allowed range; the CLI flags, the `NLM_…`
environment variables, the YAML keys and `nlm config show` are all derived from these classes.
Sources and their precedence are in `nlm.config.sources`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def registered_divergences() -> tuple[str, ...]:
    """The names `@register_divergence` gives in nlm/distill/divergences.py, read from its source: importing it
    would import torch, which validating a config must not. So the choices follow the registry, one file."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "distill" / "divergences.py").read_text(encoding="utf-8"))
    return tuple(decorator.args[0].value for node in tree.body if isinstance(node, ast.FunctionDef)
                 for decorator in node.decorator_list
                 if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_divergence")


DIVERGENCE_NAMES = registered_divergences()
Divergence = Literal[DIVERGENCE_NAMES]  # type: ignore[valid-type]
DeviceName = Literal["cuda", "mps", "cpu"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

# transformers' SchedulerType values, listed here so validating a config never imports transformers (start-up
# time of `nlm config show` and of usage errors); tests/config/test_settings.py keeps the list in sync.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)

# Secret fields: accepted from the environment and the command line only, never from a file.
SECRET_FIELDS = ("hf_token", "teacher_api_key")


class LoRAConfig(BaseModel):
    """Low-rank adapters on the student (through PEFT)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="Train LoRA adapters instead of every student weight.")
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto",
        description="Module names to adapt, or 'auto': every attention and MLP projection found in the model.",
    )
    include_lm_head: bool = Field(False, description="Also adapt the output head (auto mode only).")
    required: bool = Field(
        False, description="Fail instead of falling back to full fine-tuning when no target module is found."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str) and value != "auto":
            return [name.strip() for name in value.split(",") if name.strip()]
        if value == ["auto"]:  # `--lora.target_modules auto`: the CLI source hands a list-typed option a list
            return "auto"
        return value


class QuantizationAwareConfig(BaseModel):
    """Quantization-aware distillation (issue 25): the student trains through torchao's fake quantizers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scheme: Literal["none", "int8", "int4"] = Field(
        "none", description="none (off), or what `nlm export --format` will write: int8 (per row) or int4 (per "
        "group of group_size input columns); the student trains through torchao's fake quantizers of it.")
    group_size: int = Field(32, ge=32, description="int4: columns per quantization group (a divisor of the "
                            "hidden and MLP widths); int8 is per row and ignores it.")
    keep_head_fp: bool = Field(False, description="Leave the output head and input embedding unquantized "
                               "(then export with --keep_head_fp).")

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"


class TeacherSpec(BaseModel):
    """One teacher of several (issue 12): `teachers: [{model: ..., weight: ...}, ...]`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="Hugging Face hub id or local folder; must share the student's tokenizer.")
    weight: float = Field(1.0, ge=0, description="Mixture weight (normalised over all teachers).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    device: str | None = Field(None, description="This teacher's device (e.g. cuda:1); default: teacher_device or the student's.")
    name: str | None = Field(None, description="Name records use in their `teacher` field to route to it; default: model.")

    @property
    def route_name(self) -> str:
        return self.name or self.model


class HiddenStatesConfig(BaseModel):
    """Layer-wise distillation (issue 12): match student hidden states to the teacher's at target tokens."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weight: float = Field(0.0, ge=0, description="Weight of the hidden-state term; 0 turns it off.")
    loss: Literal["mse", "cosine"] = Field("mse", description="mse: squared error relative to the teacher's square norm, "
                                           "per token (scale-free; after projection); cosine: 1 - cos.")
    layers: dict[int, int] | Literal["auto"] = Field(
        "auto", description="{student_layer: teacher_layer}, 0-based; auto maps student layers evenly onto the teacher's."
    )


class DistillationConfig(BaseModel):
    """The loss: (1-alpha)·CE(student, label) + alpha·temperature²·divergence(teacher, student)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation term; 0 is plain fine-tuning.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature for both models' distributions.")
    divergence: Divergence = Field("forward_kl", description=f"{', '.join(DIVERGENCE_NAMES[:-1])} or {DIVERGENCE_NAMES[-1]}.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="Mixture weight of the generalised Jensen-Shannon divergence.")
    skew_lambda: float = Field(0.1, ge=0, lt=1, description="Skew of skew_kl: KL(p || λp + (1-λ)q).")
    divergence_options: dict[str, float] = Field(
        default_factory=dict, description="Options of the chosen divergence that have no setting of their own, by "
        "keyword of its function in nlm/distill/divergences.py (e.g. {beta: 0.3}); checked when the run starts.")
    # Cross-tokenizer distillation (a teacher whose tokenizer differs from the student's)
    cross_tokenizer: Literal["uld", "hybrid", "alm"] | None = Field(
        None, description="Teacher with another tokenizer: uld (sorted-probability distance), hybrid (exact KL over "
        "tokens both vocabularies spell alike, ULD for the rest) or alm (likelihood of each aligned text span). "
        "Ignored when the tokenizers are equal.")
    hybrid_matched_weight: float = Field(1.0, ge=0, description="hybrid: weight of the exact KL over matched tokens.")
    hybrid_unmatched_weight: float = Field(1.0, ge=0, description="hybrid: weight of the ULD term over unmatched tokens.")

    # Issue 12: several teachers, adaptive temperature, hidden states.
    teacher_mixture: Literal["average", "route"] = Field(
        "average", description="With `teachers`: average their softened distributions, or route each example to one."
    )
    temperature_mode: Literal["fixed", "entropy", "learned"] = Field(
        "fixed", description="fixed: `temperature`; entropy: per token, to reach target_entropy; learned: one trained scalar."
    )
    target_entropy: float = Field(1.0, gt=0, description="Entropy (nats) of the teacher's softened distribution in entropy mode.")
    temperature_min: float = Field(0.5, gt=0, description="Lower bound of an adaptive temperature.")
    temperature_max: float = Field(8.0, gt=0, le=100, description="Upper bound of an adaptive temperature.")
    hidden_states: HiddenStatesConfig = Field(default_factory=HiddenStatesConfig)

    @model_validator(mode="after")
    def _temperature_bounds(self) -> DistillationConfig:
        if self.temperature_min >= self.temperature_max:
            raise ValueError("temperature_min must be below temperature_max")
        if self.temperature_mode == "learned" and not self.temperature_min < self.temperature < self.temperature_max:
            raise ValueError("temperature_mode=learned starts at temperature, which must lie between temperature_min and temperature_max")
        return self

    # On-policy (GKD) and sequence-level distillation (issue 11); TRL's names. See nlm/training/policy.py.
    lmbda: float = Field(
        0.0, ge=0, le=1,
        description="Share of optimiser steps trained on the student's own samples, scored by the teacher "
        "(on-policy distillation, GKD); 0 is plain off-policy distillation.",
    )
    seq_kd: bool = Field(
        False, description="Train off-policy steps on completions the teacher generates on the fly (sequence-level KD)."
    )
    max_new_tokens: int = Field(128, ge=1, le=65_536, description="Longest generated completion (lmbda > 0 or seq_kd).")
    generation_temperature: float = Field(
        1.0, ge=0, le=100, description="Sampling temperature of generated completions; 0 is greedy."
    )
    generation_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of generated completions (1: off).")
    generation_top_k: int = Field(0, ge=0, description="Top-k sampling of generated completions (0: off).")


# --- Data mixing and curriculum (issue 14) ---------------------------------------------------------------
class MixtureSource(BaseModel):
    """One source of a training mixture: its files, its sampling weight, its name in logs and metadata."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="A JSONL file, a folder of *.jsonl or a glob; default: every *.jsonl in $SM_CHANNEL_<NAME>."
    )
    weight: float = Field(1.0, gt=0, description="Sampling weight; weights are normalised to probabilities.")
    name: str | None = Field(None, min_length=1, max_length=64, description="Source name (default: the file's stem).")

    @model_validator(mode="after")
    def _path_or_channel(self) -> MixtureSource:
        if self.path is None and self.name is None:
            raise ValueError("give a path (or a name whose $SM_CHANNEL_<NAME> holds the files)")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(str(self.path).rstrip("/")).stem.replace("*", "") or "source"


class CurriculumConfig(BaseModel):
    """Easy examples first: only the easiest `start_fraction` is sampled at first, all of it from `full_at`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    by: str | None = Field(
        None,
        min_length=1,
        description="Difficulty: length (target tokens), teacher_loss, student_loss, or a numeric FIELD of the "
        "records; unset: no curriculum.",
    )
    order: Literal["easy_first", "hard_first"] = Field("easy_first", description="easy_first or hard_first.")
    pacing: Literal["linear", "step", "root"] = Field("linear", description="How the pool grows: linear, step or root.")
    start_fraction: float = Field(0.2, gt=0, le=1, description="Fraction of the data sampled at the start.")
    full_at: float = Field(0.5, gt=0, le=1, description="Fraction of training after which all the data is sampled.")


class TrainingConfig(BaseSettings):
    """Everything `nlm train` needs. Precedence: CLI flags > NLM_… environment > YAML (--config) > defaults."""

    model_config = SettingsConfigDict(
        env_prefix="NLM_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
        validate_default=True,
        cli_implicit_flags=False,
    )

    # Models
    teacher_model: str | None = Field(None, description="Teacher: a Hugging Face hub id or a local folder.")
    student_model: str | None = Field(None, description="Student: a Hugging Face hub id or a local folder.")
    teacher_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the teacher.")
    student_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the student.")
    hf_token: SecretStr | None = Field(
        None, description="Hugging Face token for private models (environment NLM_HF_TOKEN or --hf_token only)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repository.")
    teachers: list[TeacherSpec] = Field(
        default_factory=list, description="Several teachers (see distillation.teacher_mixture); excludes teacher_model."
    )

    # Data
    train_file: Path | None = Field(None, description="Training JSONL; else every *.jsonl in $SM_CHANNEL_TRAIN.")
    eval_file: Path | None = Field(None, description="Evaluation JSONL; else $SM_CHANNEL_EVAL / $SM_CHANNEL_VALIDATION / $SM_CHANNEL_TEST.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of the training data held out for eval.")
    max_seq_length: int = Field(512, ge=8, le=1_048_576, description="Longer sequences are truncated.")
    completion_only_loss: bool = Field(True, description="Train only on completion/assistant tokens.")
    prompt_separator: str = Field("\n", description="Text between prompt and completion.")
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="JSONL lines longer than this are skipped.")
    # Mixing and curriculum (issue 14): which examples the student sees when (nlm.data.sampler).
    train_mixture: list[MixtureSource] | None = Field(
        None, description="Several training sources with weights: [{path, weight, name}, ...] (instead of train_file)."
    )
    mixture_stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="An epoch of a mixture ends when the first source runs out, or when all have been seen (oversampling).",
    )
    mixture_size: int | None = Field(None, ge=1, description="Examples per epoch of a mixture (overrides mixture_stopping).")
    log_per_source: bool = Field(False, description="Log the task loss of each mixture source.")
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)

    # Output
    output_dir: Path = Field(Path("outputs"), description="Runs are written under output_dir/run_name.")
    run_name: str = Field("distill", min_length=1, max_length=128, description="Name of this run's folder.")
    overwrite: bool = Field(False, description="Replace an earlier run in the run folder: only what nlm wrote there is removed.")
    resume: bool = Field(False, description="Continue from the latest checkpoint of an existing run.")
    merge_lora: bool = Field(False, description="Also write the LoRA adapter merged into the student.")

    # Optimisation
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Total optimiser steps; -1 means use num_train_epochs.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler_type: str = Field("cosine", description="Any transformers scheduler name: linear, cosine, constant…")
    warmup_steps: float = Field(0.0, ge=0, description="Warm-up steps; a value in (0, 1) is a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Sequences per device per micro-batch.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Sequences per device per eval batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    auto_find_batch_size: bool = Field(False, description="Halve the batch size on out-of-memory and retry.")
    gradient_checkpointing: bool = Field(False, description="Recompute student activations to save memory.")
    seed: int = Field(42, ge=0, description="Seed for data order, initialisation and eval split.")
    max_bad_steps: int = Field(3, ge=1, description="Stop after this many consecutive NaN/inf losses.")
    loss_impl: Literal["fused", "simple"] = Field(
        "fused", description="fused: chunked loss from hidden states, no full logits; simple: full logits."
    )
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="Tokens per chunk of the fused loss (default: about 4M logits per chunk)."
    )
    teacher_cache: Path | None = Field(
        None, description="Train from a cache written by `nlm teacher-cache` instead of running the teacher."
    )
    # Served teacher (issue 30): the teacher behind an OpenAI-compatible server (nlm serve, vLLM), asked over HTTP.
    teacher_url: str | None = Field(
        None, description="Teacher served over HTTP: the OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1.")
    teacher_served_model: str | None = Field(None, description="The `model` to ask the server for (default: its only model).")
    teacher_api_key: SecretStr | None = Field(
        None, description="Bearer key of the teacher server (environment NLM_TEACHER_API_KEY or --teacher_api_key only).")
    teacher_top_k: int = Field(20, ge=1, le=1024, description="Top log-probs asked per token; the rest is one tail bucket.")
    teacher_concurrency: int = Field(4, ge=1, le=256, description="Teacher requests in flight at once.")
    teacher_timeout: float = Field(60.0, gt=0, description="Seconds before a teacher request is retried.")
    teacher_retries: int = Field(5, ge=0, le=100, description="Retries of a teacher request (timeouts, 429, 5xx), with backoff.")
    teacher_prefetch_batches: int = Field(2, ge=0, le=64, description="Micro-batches whose teacher requests run ahead of the student.")

    # Devices and precision
    device_preference: list[DeviceName] = Field(
        ["cuda", "mps", "cpu"], min_length=1, description="Devices to try, first available wins."
    )
    device: DeviceName | None = Field(None, description="Force one device; an error if it is unavailable.")
    precision: Precision = Field("auto", description="auto: bf16 on capable CUDA, fp16 on older CUDA, else fp32.")
    teacher_device: str | None = Field(None, description="Teacher's own device (e.g. cuda:1); default: the student's.")
    teacher_precision: Precision = Field("auto", description="Teacher weights' dtype; auto follows precision.")

    # Evaluation, checkpoints, logging
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to evaluate; 'steps' uses eval_steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: logging_steps).")
    save_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to write checkpoints.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    load_best_model_at_end: bool = Field(False, description="Keep the checkpoint with the lowest eval loss.")
    logging_steps: int = Field(10, ge=1, description="Log losses every N steps.")
    report_to: list[str] = Field(default_factory=list, description="Trackers: tensorboard, wandb, mlflow (none: []).")

    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    quantization_aware: QuantizationAwareConfig = Field(default_factory=QuantizationAwareConfig)

    @field_validator("run_name")
    @classmethod
    def _run_name_is_one_folder(cls, value: str) -> str:
        if value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise ValueError("must be a single folder name (no '/', '\\' or '..')")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and value in (["none"], ["None"]):
            return []
        return value

    # issue 15: an unknown, uninstalled or credential-less tracker is a config error naming the fix.
    @field_validator("report_to")
    @classmethod
    def _report_to_usable(cls, value: list[str]) -> list[str]:
        from nlm.config.trackers import check_trackers

        return check_trackers(value)

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"expected one of {', '.join(LR_SCHEDULERS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: pick one")
        if self.eval_file is not None and self.eval_split > 0:
            raise ValueError("give eval_file or eval_split, not both")
        if self.teachers and self.teacher_model:
            raise ValueError("give teacher_model or teachers, not both (teacher_model is the one-teacher shorthand)")
        if self.teachers and self.teacher_cache:
            raise ValueError("teacher_cache replaces the teachers: give one or the other (build the cache from `teachers`)")
        if self.teacher_url and (self.teacher_model or self.teachers or self.teacher_cache):
            raise ValueError("teacher_url is the teacher: give it alone, without teacher_model, teachers or teacher_cache")
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise ValueError("load_best_model_at_end needs eval_strategy 'steps' or 'epoch'")
        # A cache holds the teacher's view of the dataset's text only; it cannot score generated text.
        if self.teacher_cache is not None and self.distillation.lmbda > 0:
            raise ValueError("distillation.lmbda > 0 (on-policy) needs a live teacher to score the student's "
                             "samples; it cannot be used with teacher_cache")
        if self.teacher_cache is not None and self.distillation.seq_kd:
            raise ValueError("distillation.seq_kd needs a live teacher to generate; it cannot be used with teacher_cache")
        if self.train_mixture is not None:
            if self.train_file is not None:
                raise ValueError("give train_file or train_mixture, not both")
            if not self.train_mixture:
                raise ValueError("train_mixture needs at least one source")
            if self.teacher_cache is not None:
                raise ValueError("train_mixture with teacher_cache is not supported yet: the cache covers train_file only")
            labels = [source.label for source in self.train_mixture]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"train_mixture: source name {repeated[0]!r} is used twice; give each source a distinct name")
        return self

    # --- issue 25: quantization-aware distillation trains every weight. With LoRA the export would quantize
    # base + adapter after training, which is not the model the fake quantizers trained.
    @model_validator(mode="after")
    def _quantization_aware_full_fine_tuning(self) -> TrainingConfig:
        if self.quantization_aware.enabled and self.lora.enabled:
            raise ValueError("quantization_aware with lora.enabled is not supported: the merged adapter would be "
                             "quantized after training, so the export would not be the model trained; turn "
                             "lora off (quantization-aware distillation trains every student weight)")
        return self

    # --- issue 9 (trust): output paths are checked when the configuration is parsed, so a system directory
    # or a symlink out of output_dir fails (exit 2) before any model is loaded.
    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_safe(cls, value: Path) -> Path:
        from nlm.config.paths import safe_output_dir
        from nlm.errors import UnsafePathError

        try:
            safe_output_dir(value)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _run_dir_stays_inside(self) -> TrainingConfig:
        from nlm.config.paths import path_inside
        from nlm.errors import UnsafePathError

        try:
            path_inside(self.output_dir, self.run_name)
        except UnsafePathError as exc:
            raise ValueError(f"run_name {self.run_name!r}: {exc}") from None
        return self

    @property
    def route_teachers(self) -> tuple[str, ...]:
        """Teacher names records route to (distillation.teacher_mixture: route), in `teachers` order."""
        if self.teachers and self.distillation.teacher_mixture == "route":
            return tuple(spec.route_name for spec in self.teachers)
        return ()

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name
