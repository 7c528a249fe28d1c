"""LoRA adapters (PEFT safetensors) applied in MLX: each request gets the greedy
tokens of transformers float32 running its adapter through PEFT, alone or
in a batch mixing two adapters and none; adapters load, list and unload through
vLLM's API and `vllm serve --lora-modules`; bad adapters are refused by name."""

import pytest
import requests
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from vllm_metal.testing.reference import greedy_tokens, load_hf, with_peft_adapter
from vllm_metal.testing.server import Server
from vllm_metal.testing.tiny_models import write_tiny_lora

PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10], [3, 4, 5], list(range(100, 140))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_OPTIONS = dict(enable_lora=True, max_lora_rank=8)


@pytest.fixture(scope="module")
def adapted(tiny_model, tmp_path_factory):
    """The model, two adapters (ids 1 and 2; id 0: none) and each one's reference tokens."""
    model = tiny_model("qwen3")
    root = tmp_path_factory.mktemp("lora")
    adapters = {
        1: write_tiny_lora(model, root / "a1", seed=1),
        2: write_tiny_lora(model, root / "a2", seed=2, rank=8, alpha=4, modules=ALL_PROJECTIONS),
    }
    expected = {0: [greedy_tokens(load_hf(model), p, GREEDY.max_tokens) for p in PROMPTS]}
    for lora_id, path in adapters.items():
        hf = with_peft_adapter(load_hf(model), path)
        expected[lora_id] = [greedy_tokens(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    assert expected[1] != expected[0] and expected[2] != expected[1]
    return model, adapters, expected


def lora_request(adapters, lora_id):
    return LoRARequest(f"a{lora_id}", lora_id, str(adapters[lora_id])) if lora_id else None


def mixed_batch(llm, adapters) -> dict[tuple[int, int], list[int]]:
    """Every prompt under every adapter choice, in one generate call: (adapter, prompt) -> tokens."""
    keys = [(lora_id, i) for lora_id in (0, 1, 2) for i in range(len(PROMPTS))]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[i]) for _, i in keys], GREEDY,
                           lora_request=[lora_request(adapters, lora_id) for lora_id, _ in keys])
    return {key: list(o.outputs[0].token_ids) for key, o in zip(keys, outputs)}


@pytest.mark.parametrize("max_loras", [2, 1])
def test_each_request_gets_its_adapters_tokens_mixed_and_alone(adapted, max_loras):
    """max_loras=2: both adapters share a batch; 1: they take the one slot in turn."""
    model, adapters, expected = adapted
    llm = start_llm(model, max_loras=max_loras, **LORA_OPTIONS)
    try:
        mixed = mixed_batch(llm, adapters)
        alone = {key: list(llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[key[1]])], GREEDY,
                                        lora_request=lora_request(adapters, key[0]))[0]
                           .outputs[0].token_ids)
                 for key in mixed}
    finally:
        stop_llm(llm)
    assert mixed == alone
    assert mixed == {(lora_id, i): expected[lora_id][i] for lora_id, i in mixed}


def test_adapters_load_list_unload_and_bad_ones_are_refused_by_name(adapted, tmp_path):
    """One slot and room for one loaded adapter: a pinned adapter stays while another
    serves a request; an adapter reloaded in place (load_inplace) takes its new weights."""
    model, adapters, expected = adapted
    too_big = write_tiny_lora(model, tmp_path / "big", rank=16)
    llm = start_llm(model, max_loras=1, max_cpu_loras=1, **LORA_OPTIONS)
    engine = llm.llm_engine

    def first_prompt(request):
        out = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], GREEDY,
                           lora_request=request)
        return list(out[0].outputs[0].token_ids)

    try:
        for bad, words in [(LoRARequest("big", 5, str(too_big)), "rank 16 is greater than max_lora_rank 8"),
                           (LoRARequest("gone", 6, str(tmp_path / "nowhere")), "not a local directory")]:
            with pytest.raises(Exception, match=words):
                engine.add_lora(bad)
        assert engine.add_lora(lora_request(adapters, 1))
        assert set(engine.list_loras()) == {1}
        assert engine.pin_lora(1)
        assert first_prompt(lora_request(adapters, 2)) == expected[2][0]
        assert 1 in set(engine.list_loras())
        assert first_prompt(lora_request(adapters, 1)) == expected[1][0]
        reloaded = LoRARequest("a1", 1, str(adapters[2]), load_inplace=True)
        assert engine.add_lora(reloaded)
        assert first_prompt(reloaded) == expected[2][0]
        assert engine.remove_lora(1)
        assert 1 not in set(engine.list_loras())
    finally:
        stop_llm(llm)


def test_adapting_a_module_without_adapters_is_refused(adapted, tmp_path):
    model, _, _ = adapted
    path = write_tiny_lora(model, tmp_path / "k", modules=("q_proj", "k_proj"))
    llm = start_llm(model, max_loras=1, enable_lora=True, max_lora_rank=8,
                    lora_target_modules=["q_proj"])
    try:
        with pytest.raises(Exception, match=r"adapts model\.layers\.\d+\.self_attn\.k_proj, which "
                                            r"takes no adapter here"):
            llm.llm_engine.add_lora(LoRARequest("k", 3, str(path)))
    finally:
        stop_llm(llm)


def test_lora_with_tensor_parallel_is_refused_at_startup(adapted):
    model, _, _ = adapted
    with pytest.raises(Exception, match="--enable-lora with tensor or pipeline parallel"):
        start_llm(model, tensor_parallel_size=2, **LORA_OPTIONS)


def test_server_serves_lora_modules_by_name(adapted, tmp_path):
    model, adapters, expected = adapted
    args = [model, "--dtype", "float32", "--max-model-len", "512", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"first={adapters[1]}",
            f"second={adapters[2]}"]
    with Server(args, log_path=tmp_path / "serve.log") as server:
        names = {m["id"] for m in requests.get(server.url + "/v1/models", timeout=10).json()["data"]}
        assert {"first", "second", model} <= names
        for name, lora_id in (("first", 1), ("second", 2), (model, 0)):
            body = {"model": name, "prompt": PROMPTS[0], "max_tokens": GREEDY.max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
            reply = requests.post(server.url + "/v1/completions", json=body, timeout=60).json()
            assert reply["choices"][0]["token_ids"] == expected[lora_id][0], name
