"""Generate a completion for one prompt.

Three ways to send the prompt: by default it is followed by the separator the model was trained with (as a
prompt/completion record in training); --raw sends it exactly as given; --chat wraps it as one user message in
the tokenizer's chat template (as a "messages" record in training, and as the server's /v1/chat/completions).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a trained model folder (full or LoRA adapter) or hub id")
    prompt: str = Field(description="the prompt")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy",
                               json_schema_extra={"expected": "a temperature in [0, 2] (0 is greedy)"})
    seed: int | None = Field(None, ge=0, description="sampling seed")
    raw: bool = Field(False, description="do not append the training prompt separator")
    chat: bool = Field(False, description="send the prompt as a user message through the model's chat template")
    device: Literal["cuda", "mps", "cpu"] | None = Field(None, description="force one device")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights")


def run(options: Options) -> int:
    from nlm.errors import ConfigError
    from nlm.models.device import select_device
    from nlm.models.generation import GenerationSettings, generate_texts
    from nlm.models.loading import load_tokenizer, load_trained_model
    from nlm.models.model_info import prompt_separator

    if options.chat and options.raw:
        raise ConfigError("generate: --chat and --raw exclude each other: pick one")
    tokenizer = load_tokenizer(options.model, trust_remote_code=options.trust_remote_code)
    if options.chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"generate --chat: the tokenizer of {options.model} has no chat template; "
                          "drop --chat to send the prompt as text")
    device = select_device(forced=options.device) if options.device else select_device()
    model = load_trained_model(options.model, device=device, trust_remote_code=options.trust_remote_code,
                               allow_pickle=options.allow_pickle)
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  seed=options.seed)
    if options.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": options.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = options.prompt if options.raw else options.prompt + prompt_separator(options.model)
    for text in generate_texts(model, tokenizer, [prompt], settings, add_special_tokens=not options.chat)[0]:
        print(text)
    return 0
