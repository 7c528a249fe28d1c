"""The README's serve command, run as written, serves the bundled real model;
its answers equal transformers' float32 output on the same GGUF file. The
README's settings table is the code's."""

import re
import shlex
from pathlib import Path

import pytest
import requests
import torch

from vllm_metal import envs
from vllm_metal.models.gguf import bundled_smollm2_path
from vllm_metal.testing.server import Server

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time, there was a little", "The capital of France is",
           "def fibonacci(n):"]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_install_then_serve_and_test():
    serve, test = readme_commands()
    assert serve.startswith("./install.sh && ") and "vllm serve " in serve
    assert test.startswith("./install.sh && ") and "pytest" in test


def settings_table(text: str) -> list[tuple[str, str, str]]:
    """(variable, default, meaning) rows of the first markdown table headed
    ``| variable | default | meaning |`` in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if re.fullmatch(r"\|\s*variable\s*\|\s*default\s*\|\s*meaning\s*\|", line.strip()))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, line
        rows.append(tuple(cells))
    return rows


def test_readme_settings_table_is_the_codes():
    readme = settings_table((ROOT / "README.md").read_text())
    assert readme == settings_table(envs.__doc__)
    assert [(name, default) for name, default, _ in readme] == [
        (s.name, s.default) for s in envs.SETTINGS.values()]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    serve, _ = readme_commands()
    log = tmp_path_factory.mktemp("readme") / "serve.log"
    # bash -c 'CMD "$@"' serve --host 127.0.0.1 --port N: the README's line, on a free port.
    line = serve.replace(" && ", " && exec ", 1)  # the server replaces bash: one process to stop
    server = Server([], command=["bash", "-c", line + ' "$@"', "serve"], log_path=log, cwd=ROOT)
    server.start(timeout=400)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return tokenizer, model.eval()


def served_model(server) -> str:
    return requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_chat_answers_paris(readme_server):
    r = requests.post(readme_server.url + "/v1/chat/completions", timeout=120, json={
        "model": served_model(readme_server),
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


@torch.no_grad()
def test_first_8_greedy_tokens_equal_transformers(readme_server, reference):
    tokenizer, model = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
        r = requests.post(readme_server.url + "/v1/completions", timeout=120, json={
            "model": served_model(readme_server), "prompt": ids[0].tolist(), "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"][: len(expected)] == expected, prompt
