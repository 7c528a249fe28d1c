"""Hugging Face hub ids load from huggingface_hub's cache, at the requested revision,
the way vLLM resolves the config and tokenizer; a model that is not there gives one
message naming it and the fix. Offline: a tiny model is written in the hub cache layout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metal.models.hub import ModelNotFound, resolve_checkpoint
from vllm_metal.testing.reference import mlx_lm_greedy

REPO = "tiny-org/tiny-qwen3"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}
PROMPT = [5, 17, 33, 90, 12]


def write_hub_cache(cache: Path, repo_id: str, revisions: dict[str, tuple[str, Path]]) -> None:
    """models--org--name/snapshots/<commit>/..., refs/<ref> -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, (commit, source) in revisions.items():
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tiny_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    sources = {"main": Path(tiny_model("qwen3")), "v2": Path(tiny_model("qwen3", seed=1))}
    write_hub_cache(cache, REPO, {ref: (COMMITS[ref], sources[ref]) for ref in sources})
    partial = cache / "partial"
    shutil.copytree(sources["main"], partial)
    (partial / "model.safetensors").unlink()
    write_hub_cache(cache, "tiny-org/config-only", {"main": (COMMITS["main"], partial)})
    return cache, sources


def test_revision_picks_its_snapshot(hub_cache):
    cache, _ = hub_cache
    for ref, commit in COMMITS.items():
        path = resolve_checkpoint(REPO, revision=ref, download_dir=str(cache))
        assert Path(path).name == commit


def test_missing_model_names_the_id_and_the_fix(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ModelNotFound) as info:
        resolve_checkpoint("tiny-org/absent", revision="main", download_dir=str(cache))
    assert "tiny-org/absent" in str(info.value) and "hf download tiny-org/absent" in str(info.value)


ENGINE_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs

if __name__ == "__main__":
    prompt, repo = json.loads(sys.argv[1]), sys.argv[2]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = {}
    for revision in (None, "v2"):
        llm = LLM(repo, revision=revision, dtype="float32", max_model_len=256,
                  kv_cache_memory_bytes=32 * 1024**2)
        result = llm.generate({"prompt_token_ids": prompt}, params)
        out[str(revision)] = result[0].outputs[0].token_ids
        llm.llm_engine.engine_core.shutdown()
    try:
        EngineArgs(model="tiny-org/config-only", dtype="float32").create_engine_config()
        out["config-only"] = "started"
    except Exception as error:
        out["config-only"] = str(error)
    try:
        EngineArgs(model="tiny-org/absent", dtype="float32").create_engine_config()
        out["absent"] = "started"
    except Exception as error:
        out["absent"] = f"{type(error).__name__}: {error}"
    print("RESULT " + json.dumps(out))
"""


def test_engine_serves_each_revision_from_the_cache(hub_cache, tmp_path):
    cache, sources = hub_cache
    script = tmp_path / "run.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), json.dumps(PROMPT), REPO], env=env,
                          capture_output=True, text=True, timeout=400)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["None"] == mlx_lm_greedy(str(sources["main"]), PROMPT, 6)
    assert result["v2"] == mlx_lm_greedy(str(sources["v2"]), PROMPT, 6)
    assert result["None"] != result["v2"]
    assert "no model*.safetensors weights" in result["config-only"]
    assert "hf download" in result["config-only"]
    # Missing from the cache: vLLM resolves the id before the platform, the plugin names it.
    assert result["absent"].startswith("ModelNotFound: vllm-metal cannot find model "
                                       "'tiny-org/absent' in the Hugging Face cache"), result
    assert "hf download tiny-org/absent" in result["absent"]
