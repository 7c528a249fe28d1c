"""No request stops the engine: what the runner cannot serve gets a 4xx for that
request alone, and the server goes on serving everyone else."""

import pytest
import requests

from vllm_metal.testing.server import Server

BAD_REQUESTS = {
    "token id beyond the vocabulary": {"prompt": [1, 2, 10**6]},
    "prompt embeddings": {"prompt_embeds": "AAAA"},
    "thinking budget": {"prompt": "The river", "thinking_token_budget": 4},
    "logit bias beyond the vocabulary": {"prompt": "The river", "logit_bias": {"100000": 5}},
    "allowed token beyond the vocabulary": {"prompt": "The river",
                                            "allowed_token_ids": [100000]},
    "too many logprobs": {"prompt": "The river", "logprobs": 10**6},
    "too many prompt logprobs": {"prompt": "The river", "prompt_logprobs": 10**6},
    "prompt longer than the model": {"prompt": [5] * 600},
}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("bad_requests") / "serve.log"
    srv = Server([tiny_model("qwen3"), "--dtype", "float32", "--max-model-len", "512",
                  "--kv-cache-memory-bytes", str(64 * 1024**2), "--served-model-name", "tiny"],
                 log_path=log)
    with srv:
        yield srv


def complete(server, **body):
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, **body}
    return requests.post(server.url + "/v1/completions", json=body, timeout=60)


def test_bad_requests_are_refused_and_the_server_keeps_serving(server):
    good = complete(server, prompt="The river")
    assert good.status_code == 200, good.text
    for name, body in BAD_REQUESTS.items():
        response = complete(server, **body)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        again = complete(server, prompt="The river")
        assert again.status_code == 200, (name, server.tail())
        assert again.json()["choices"][0]["text"] == good.json()["choices"][0]["text"]


@pytest.mark.parametrize("engine_input,params", [
    ({"type": "embeds", "prompt_embeds": None}, {}),
    ({"type": "token", "prompt_token_ids": [1, 2]}, {"thinking_token_budget": 4}),
])
def test_platform_refuses_what_the_runner_cannot_serve(engine_input, params):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_metal.platform import MetalPlatform

    with pytest.raises(VLLMValidationError, match="vllm-metal"):
        MetalPlatform.validate_request(engine_input, SamplingParams(**params))
    MetalPlatform.validate_request({"type": "token", "prompt_token_ids": [1, 2]}, SamplingParams())
