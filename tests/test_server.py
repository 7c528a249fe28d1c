"""`vllm serve` on a tiny model, over real HTTP on 127.0.0.1."""

import json
import socket
import subprocess
import sys

import psutil
import pytest
import requests

from conftest import free_port, requires_tool
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts
from vllm_metal.testing.server import Server, _holds_listener


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = Server([tiny_model("qwen3"), "--dtype", "float32", "--max-model-len", "512",
                  "--kv-cache-memory-bytes", str(64 * 1024**2), "--served-model-name", "tiny",
                  "--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}'],
                 log_path=log)
    with srv:
        yield srv


def post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, timeout=60, **kw)


def test_log_names_the_mlx_platform(server):
    assert "Metal/MLX platform selected" in server.tail(200_000)


def test_health_and_models(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_completion(server):
    r = post(server, "/v1/completions",
             {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0,
              "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"


def stream_events(response):
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield json.loads(line[6:])


def test_streaming_completion_equals_plain(server):
    body = {"model": "tiny", "prompt": "The river", "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    with post(server, "/v1/completions", {**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200
        pieces = [e["choices"][0]["text"] for e in stream_events(r) if e["choices"]]
    assert len(pieces) >= 2
    assert "".join(pieces) == plain


def test_chat_plain_and_streaming(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}],
            "max_tokens": 6, "temperature": 0}
    plain = post(server, "/v1/chat/completions", body)
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["message"]["content"]
    with post(server, "/v1/chat/completions", {**body, "stream": True}, stream=True) as r:
        deltas = [e["choices"][0]["delta"].get("content") or "" for e in stream_events(r)
                  if e["choices"]]
    assert "".join(deltas) == text


def test_too_long_prompt_is_400_and_server_keeps_serving(server):
    r = post(server, "/v1/completions",
             {"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4})
    assert r.status_code == 400
    assert "maximum context length" in r.json()["error"]["message"]
    again = post(server, "/v1/completions",
                 {"model": "tiny", "prompt": "still alive", "max_tokens": 3})
    assert again.status_code == 200


def test_bad_request_is_400(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5})
    assert r.status_code == 400
    r = post(server, "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404


def test_chat_response_format_json_schema(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    r = post(server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Answer in JSON"}],
        "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in ({"ok": True}, {"ok": False})


def test_a_port_another_server_answers_on_is_left_for_a_fresh_one(tiny_model, tmp_path):
    """A port taken between free_port and the server's bind: the other server's health
    answer is not taken for this one's; it starts again on another port."""
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = other.server_address[1]
    server = Server([tiny_model("qwen3")], log_path=tmp_path / "server.log")
    server.port = taken
    server.command[server.command.index("--port") + 1] = str(taken)
    try:
        with server:
            assert server.port != taken
            assert server._listens()
    finally:
        other.shutdown()


@requires_tool(can_simulate_hosts())
def test_a_listener_in_another_network_namespace_is_seen_as_its_process_s():
    """Servers of the Ray and multi-host tests run under `ip netns exec`: their sockets
    are listed in their namespace's tables, which the port check must read."""
    with SimulatedHosts(1) as hosts:
        address, port = hosts.addresses[0], free_port()
        listener = subprocess.Popen(
            ["ip", "netns", "exec", hosts.names[0], sys.executable, "-c",
             f"import socket, time; s = socket.socket(); s.bind(('{address}', {port})); "
             f"s.listen(); print('up', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "up"
            with socket.create_connection((address, port), timeout=5):
                pass
            process = psutil.Process(listener.pid)
            assert _holds_listener(process, port)
            assert not _holds_listener(process, port + 1)
            assert not _holds_listener(psutil.Process(), port)
        finally:
            listener.kill()
            listener.wait()
