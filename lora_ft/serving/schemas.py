"""Request bodies. Pydantic answers malformed ones with 422; size limits (413) are checked by the app."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = dict(ge=0, lt=2**64)  # what torch.Generator.manual_seed takes; beyond it a 422, not a 500


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    inputs: Union[str, list[str]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: Union[str, list[str]]
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = Field(0, **SEED_RANGE)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add name/tool fields we do not use
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields lora_ft honours; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # the OpenAI default; 0 is greedy
    stream: bool = False
    seed: Optional[int] = Field(None, **SEED_RANGE)
    n: int = Field(1, ge=1, le=1)
