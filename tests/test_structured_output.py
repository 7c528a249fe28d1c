"""Structured output through vLLM's grammar machinery: the runner applies the
grammar's token bitmask to the logits before sampling."""

import json
import re

import pytest
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    # guidance: xgrammar 0.2.8 lets raw control characters into JSON strings.
    # No free whitespace: a random-weight model would spend its tokens on it.
    engine = start_llm(tiny_model("qwen3"), structured_outputs_config={
        "backend": "guidance", "disable_any_whitespace": True})
    yield engine
    stop_llm(engine)


def sample(llm, n, max_tokens, **structured):
    params = SamplingParams(temperature=1.0, seed=0, n=n, max_tokens=max_tokens,
                            structured_outputs=StructuredOutputsParams(**structured))
    return [c.text for c in llm.generate(["Answer:"], params)[0].outputs]


def test_choice(llm):
    texts = sample(llm, 8, 10, choice=["yes", "no", "maybe"])
    assert set(texts) <= {"yes", "no", "maybe"}


def test_choice_with_the_default_backend(tiny_model):
    engine = start_llm(tiny_model("qwen3"))
    try:
        texts = sample(engine, 8, 10, choice=["red", "green", "blue"])
    finally:
        stop_llm(engine)
    assert set(texts) <= {"red", "green", "blue"}


def test_regex(llm):
    for text in sample(llm, 8, 12, regex=r"[a-c]{3}-[0-9]{2}"):
        assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", text)


def test_json_schema_20_samples_all_validate(llm):
    import jsonschema

    texts = sample(llm, 20, 64, json=SCHEMA)
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
