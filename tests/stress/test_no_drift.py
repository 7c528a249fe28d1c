"""16 concurrent streams with their own stop strings, lengths, seeds and sampling
settings under TP=2 and PP=2: every stream ends normally (a batch the ranks
disagree on would stop the engine), and the greedy ones give the one-rank
server's text. CI runs each layout for 15 s; ``-m slow`` for 2 minutes."""

import random
import threading
import time

import pytest
import requests

from vllm_metal.testing.server import Server

STREAMS = 16
PROMPTS = ["Once upon a time", "The river", "def main():", "In the beginning",
           "Numbers: 1, 2, 3,", "Dear friend,", "The weather today", "Q: why? A:"]
COMMON = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
          str(128 * 1024**2), "--served-model-name", "tiny", "--seed", "0"]


def request_body(rng: random.Random, greedy: bool) -> dict:
    body = {"model": "tiny", "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, 48),
            "stop": rng.choice([None, ["\n"], [" the", "."], ["xyz"]]), "stream": True}
    if greedy:
        body["temperature"] = 0
    else:
        body.update(temperature=rng.choice([0.5, 1.0]), top_p=rng.choice([1.0, 0.9]),
                    top_k=rng.choice([-1, 20]), seed=rng.randint(0, 10**6),
                    presence_penalty=rng.choice([0.0, 0.5]))
    return body


def streamed(url: str, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of one streamed completion; raises on any error."""
    import json

    text, finish = [], None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as response:
        response.raise_for_status()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]", lines[-1]
    for line in lines[:-1]:
        event = json.loads(line[6:])
        assert "error" not in event, event
        for choice in event["choices"]:
            text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def drive(url: str, seconds: float) -> tuple[list, list]:
    """STREAMS clients until the deadline: (greedy (body, text) pairs, failures)."""
    deadline = time.monotonic() + seconds
    greedy, failures = [], []

    def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            body = request_body(rng, greedy=index % 4 == 0)
            try:
                text, finish = streamed(url, body)
                assert finish in ("stop", "length"), finish
                if body.get("temperature") == 0:
                    greedy.append((body, text))
            except Exception as error:  # any failure of any stream fails the test
                failures.append(f"{body}: {error!r}"[:400])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return greedy, failures


def run_layout(model: str, layout: list[str], seconds: float, tmp_path) -> None:
    with Server([model, *COMMON, *layout], log_path=tmp_path / "split.log") as split:
        greedy, failures = drive(split.url, seconds)
        log = split.tail(10**7)
    assert not failures, failures[:5]
    assert "scheduled a different batch" not in log
    assert len(greedy) >= 8
    with Server([model, *COMMON], log_path=tmp_path / "one.log") as one:
        for body, text in greedy:
            assert streamed(one.url, body)[0] == text, body


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "2"],
                                    ["--pipeline-parallel-size", "2"]], ids=["tp2", "pp2"])
def test_no_drift_ci(tiny_model, tmp_path, layout):
    run_layout(tiny_model("qwen3"), layout, 15, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "2"],
                                    ["--pipeline-parallel-size", "2"]], ids=["tp2", "pp2"])
def test_no_drift_two_minutes(tiny_model, tmp_path, layout):
    run_layout(tiny_model("qwen3"), layout, 120, tmp_path)
