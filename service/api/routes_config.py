"""GET /v1/config: the served model, where it runs, and every field of /generate with its type,
default and range, so a client can build a request form without hard-coding a limit.

Types, defaults and the ranges the request schema checks itself come from `GenerateRequest`'s
JSON schema; the ranges of the sampling settings, which `SamplingParams` checks, come from the
table in `model/sampling_params.py`, beside the checks it describes. Defaults that the server's settings decide
(`logprobs_mode`, `timeout`, `speculative`) are this server's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from model.dtypes import dtype_name
from model.sampling_params import SAMPLING_RANGES
from service.api.dependencies import AppState, StateDep
from service.api.schemas import GenerateRequest
from service.api.startup_summary import quantization_of

router = APIRouter(prefix="/v1", tags=["configuration"])


class FieldSpec(BaseModel):
    """One field of a /generate (and /stream) body."""

    name: str
    types: list[str] = Field(description='JSON types it accepts, such as ["number", "null"]')
    required: bool
    default: Any = Field(
        default=None, description="the value this server uses when the field is left out"
    )
    # int | float: a seed's bounds (2**64 - 1) are exact integers, not rounded floats
    minimum: int | float | None = Field(default=None, description="for logit_bias: of each bias")
    maximum: int | float | None = None
    exclusive_minimum: bool = Field(
        default=False, description="true: the minimum itself is refused"
    )
    choices: list[str] | None = None
    description: str


class ServerConfig(BaseModel):
    """Body of /v1/config."""

    model: str = Field(description="the served model's name, as requests and /v1/models name it")
    num_parameters: int
    device: str = Field(description="cpu, cuda, cuda:1, ...")
    dtype: str = Field(description="float32, bfloat16 or float16")
    quantization: str = Field(description="none, or int8 (int8 linear weights)")
    kv_cache_dtype: str = Field(
        description="the KV cache's keys and values: the model's dtype, or bfloat16 / float16 "
        "(logits then no longer bit-exact)"
    )
    max_model_len: int = Field(description="the context window, in tokens: prompt + generated")
    vocab_size: int = Field(description="token ids lie in [0, vocab_size)")
    eos_token_id: int
    generate_fields: list[FieldSpec] = Field(description="the body of /generate and /stream")


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return list(schema.get("anyOf", [schema]))


def field_specs(server_defaults: dict[str, Any]) -> list[FieldSpec]:
    """Every field of GenerateRequest, in its declared order, the prompt first."""
    schema = GenerateRequest.model_json_schema()
    required = set(schema.get("required", ()))
    names = sorted(schema["properties"], key=lambda name: name != "prompt")
    specs = []
    for name in names:
        prop = schema["properties"][name]
        branches = _branches(prop)
        spec = FieldSpec(
            name=name,
            types=list(dict.fromkeys(branch["type"] for branch in branches)),
            required=name in required,
            default=server_defaults.get(name, prop.get("default")),
            description=prop.get("description", ""),
        )
        for branch in branches:
            if "enum" in branch:
                spec.choices = list(branch["enum"])
            if "minimum" in branch:
                spec.minimum = branch["minimum"]
            if "exclusiveMinimum" in branch:
                spec.minimum, spec.exclusive_minimum = branch["exclusiveMinimum"], True
            if "maximum" in branch:
                spec.maximum = branch["maximum"]
        sampling_range = SAMPLING_RANGES.get(name)
        if sampling_range is not None:
            spec.minimum = sampling_range.minimum
            spec.maximum = sampling_range.maximum
            spec.exclusive_minimum = sampling_range.exclusive_minimum
        specs.append(spec)
    return specs


def server_config(state: AppState) -> ServerConfig:
    """The configuration a client sees, from the app's state."""
    engine = state.engine.engine
    model = engine.model
    settings = state.settings
    defaults = {
        "logprobs_mode": settings.logprobs_mode,
        "timeout": settings.request_timeout,
        "speculative": settings.speculative_method != "none",
    }
    return ServerConfig(
        model=state.model_name,
        num_parameters=model.config.num_parameters,
        device=str(model.device),
        dtype=dtype_name(model.dtype),
        quantization=quantization_of(model),
        kv_cache_dtype=dtype_name(engine.runner.cache.k.dtype),
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        eos_token_id=state.tokenizer.eos_token_id,
        generate_fields=field_specs(defaults),
    )


@router.get("/config")
async def config(state: StateDep) -> ServerConfig:
    """The served model, where it runs, and each field of /generate with its type, this server's
    default and its range, for clients that build a request form (such as the playground at /).
    """
    return server_config(state)
