"""Generate a completion for one prompt.

By default the prompt is followed by the separator the model was trained with (as in training data). --raw
sends the prompt exactly as given.
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
    device: Literal["cuda", "mps", "cpu"] | None = Field(None, description="force one device")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights")


def run(options: Options) -> int:
    from nlm.models.device import select_device
    from nlm.models.generation import GenerationSettings, generate_texts
    from nlm.models.loading import load_tokenizer, load_trained_model
    from nlm.models.model_info import prompt_separator

    device = select_device(forced=options.device) if options.device else select_device()
    tokenizer = load_tokenizer(options.model, trust_remote_code=options.trust_remote_code)
    model = load_trained_model(options.model, device=device, trust_remote_code=options.trust_remote_code,
                               allow_pickle=options.allow_pickle)
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  seed=options.seed)
    prompt = options.prompt if options.raw else options.prompt + prompt_separator(options.model)
    for text in generate_texts(model, tokenizer, [prompt], settings)[0]:
        print(text)
    return 0
