"""OpenAI-compatible request bodies (validated, unknown fields refused) and the error object.

Only what the server does is accepted: n = 1, no penalties, no logit bias, no suffix. A field the server does not
know is a 400 naming it — never silently ignored, so a client never believes a setting ran that did not.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def _strict(data: Any, numbers: frozenset[str], path: str = "") -> None:
    """Refuse what JSON allows but a request cannot mean: true/false where a number belongs (`numbers`: the
    numeric fields; pydantic would read true as 1), and text that is not valid Unicode (a lone surrogate such
    as "\\ud800", which no tokenizer can encode)."""
    if isinstance(data, dict):
        for k, v in data.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(v, bool) and where in numbers:
                raise ValueError(f"{where} must be a number, not {str(v).lower()}")
            _strict(v, numbers, where)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _strict(v, numbers, f"{path}[{i}]")
    elif isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path or 'body'} is not valid Unicode text (a lone surrogate at character "
                             f"{e.start})") from None


@functools.lru_cache(maxsize=None)
def _numeric(model: type[BaseModel], prefix: str = "") -> frozenset[str]:
    """Dotted names of the fields of `model` (and of its nested models) typed as numbers, not booleans."""
    out = set()
    for name, f in model.model_fields.items():
        ann = f.annotation
        args = [getattr(a, "__origin__", a) if hasattr(a, "__metadata__") else a  # Annotated[int, Strict()]
                for a in (getattr(ann, "__args__", None) or (ann,))]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        for n in nested:
            out |= _numeric(n, f"{prefix}{name}.")
        kinds = {a for a in args if isinstance(a, type)}
        if kinds & {int, float} and bool not in kinds:
            out.add(prefix + name)
    return frozenset(out)


class Extension(BaseModel):
    """The "mumoe" object of a request: per-request pruning, overriding the server's defaults."""

    model_config = ConfigDict(extra="forbid")
    active: float | None = Field(None, description="μ-MoE active-weight ratio ρ in (0, 1]; 1 = dense")
    structure: str | None = Field(None, description="μ-MoE structure: row, column or N:M")
    experts: StrictInt | None = Field(None, description="per-prompt expert pruning: experts kept per layer")
    task: str | None = Field(None, description="TAER: 'auto' (match the prompt) or a task name of the library")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the served model's name; may be omitted (the served model)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported")
    user: str | None = None
    mumoe: Extension | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_bools_no_surrogates(cls, data):
        _strict(data, _numeric(cls))
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: int = Field(1, ge=1, le=1)
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("the prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def token_budget(self) -> int:
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return 256


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic / FastAPI validation error as one line (and the field it names)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    # a union's members add their type to the location (prompt.str, prompt.list[int]...): keep the field path
    path = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float"))
    if kind == "missing":
        return f"missing required field '{path}'", path
    if kind == "extra_forbidden":
        return f"unknown field '{path}' (not supported by mumoe serve)", path
    if kind == "value_error" and not path:
        return str(e.get("msg", "invalid value")).removeprefix("Value error, "), None
    if kind == "model_attributes_type" and not path:
        return "the body must be a JSON object", None
    return f"{path or 'body'}: {e.get('msg', 'invalid value')}", path or None
