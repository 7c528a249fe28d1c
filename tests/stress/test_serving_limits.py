"""`vllm serve` under overload and against callers without the key: a bounded queue
answers 429 at once past its limit while the admitted requests finish; with
--api-key every route needs it; the server listens only where --host says."""

import concurrent.futures
import socket
import time

import psutil
import requests

from vllm_metal.testing.server import Server

LONG = 3000  # tokens: the admitted requests are still running when the others arrive
COMMON = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
          str(64 * 1024**2)]


def complete(url: str, max_tokens: int, **headers) -> tuple[int, float, dict]:
    start = time.monotonic()
    response = requests.post(url + "/v1/completions", headers=headers, timeout=300, json={
        "model": "tiny", "prompt": "Count with me:", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True})
    return response.status_code, time.monotonic() - start, response.json()


def test_past_the_queue_bound_requests_get_429_at_once_and_admitted_ones_finish(
        tiny_model, tmp_path):
    running, waiting, sent = 2, 2, 10
    server = Server([tiny_model("qwen3"), "--dtype", "float32", "--max-model-len", "4096",
                     "--kv-cache-memory-bytes", str(64 * 1024**2), "--served-model-name", "tiny",
                     "--max-num-seqs", str(running)],
                    env={"VLLM_METAL_MAX_WAITING_REQUESTS": str(waiting)},
                    log_path=tmp_path / "serve.log")
    with server:
        with concurrent.futures.ThreadPoolExecutor(sent) as pool:
            # Long enough that the admitted ones are still running when the rest arrive.
            admitted = [pool.submit(complete, server.url, LONG) for _ in range(running + waiting)]
            time.sleep(1.0)
            extra = [pool.submit(complete, server.url, LONG) for _ in range(sent - running - waiting)]
            time.sleep(0.5)
            assert not any(f.done() for f in admitted), "the admitted requests ended too soon"
            results = [f.result() for f in admitted + extra]
        after = complete(server.url, 4)  # the queue drained: admitted again
    statuses = [status for status, _, _ in results]
    assert statuses[:running + waiting] == [200] * (running + waiting), results
    for status, seconds, body in results[running + waiting:]:
        assert status == 429 and seconds < 1.0, (status, seconds, body)
        assert "VLLM_METAL_MAX_WAITING_REQUESTS" in body["error"]["message"]
    for status, _, body in results[:running + waiting]:
        assert body["usage"]["completion_tokens"] == LONG
    assert after[0] == 200


def test_api_key_is_required_on_every_route(tiny_model, tmp_path):
    key = "s3cret-key"
    server = Server([tiny_model("qwen3"), *COMMON, "--served-model-name", "tiny",
                     "--api-key", key], log_path=tmp_path / "serve.log")
    with server:
        schema = requests.get(server.url + "/openapi.json", timeout=10,
                              headers={"Authorization": f"Bearer {key}"}).json()
        routes = [(method.upper(), path) for path, methods in schema["paths"].items()
                  for method in methods]
        routes += [("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"),
                   ("GET", "/metrics")]
        assert ("POST", "/invocations") in routes and ("POST", "/tokenize") in routes
        for method, path in routes:
            concrete = path.replace("{", "").replace("}", "")
            response = requests.request(method, server.url + concrete, timeout=30, json={})
            assert response.status_code == 401, (method, path, response.status_code)
            wrong = requests.request(method, server.url + concrete, timeout=30, json={},
                                     headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 401, (method, path, wrong.status_code)
        status, _, body = complete(server.url, 4, Authorization=f"Bearer {key}")
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert requests.get(server.url + "/health", timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_server_listens_only_where_host_says_and_reads_no_file_a_request_names(
        tiny_model, tmp_path):
    server = Server([tiny_model("qwen3"), *COMMON, "--served-model-name", "tiny"],
                    log_path=tmp_path / "serve.log")  # --host 127.0.0.1
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    with server:
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for address in others:
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((address, server.port)) != 0, address
        for body in ({"model": str(secret), "prompt": "x", "max_tokens": 2},
                     {"model": "tiny", "prompt": str(secret), "max_tokens": 2},
                     {"model": "tiny", "prompt": "x", "max_tokens": 2,
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"$ref": f"file://{secret}"}}}):
            response = requests.post(server.url + "/v1/completions", json=body, timeout=60)
            assert "TOP-SECRET-CONTENT" not in response.text
