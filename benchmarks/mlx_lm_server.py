"""``mlx_lm.server`` with three changes for a like-for-like benchmark, then its own main():

- OpenBLAS is loaded before MLX (as vllm-metal does), so float32 runs on the same BLAS;
- EOS does not end a request: mlx_lm.server has no ``ignore_eos``, which
  ``vllm bench serve`` sends so that every request produces the same number of
  tokens. Stop strings sent by a client still work;
- no ``: keepalive N/M`` SSE comments during prompt processing. vLLM 0.32's bench
  client strips each network read before splitting SSE messages, so such a
  comment glues onto the next ``data:`` message and the whole stream is lost
  ("Never received a valid chunk to calculate TTFT").

    python -m benchmarks.mlx_lm_server --model DIR --host 127.0.0.1 --port PORT
"""

from benchmarks.blas import preload_openblas


def stop_words_only(tokenizer, stop_words=None):
    from mlx_lm.generate import StopSequences

    sequences = [tuple(tokenizer.encode(w, add_special_tokens=False)) for w in stop_words or []]
    return StopSequences(sequences or None)


def without_progress_comments(generate):
    def wrapped(self, request, generation_args, progress_callback=None):
        return generate(self, request, generation_args, progress_callback=None)

    return wrapped


def main() -> None:
    preload_openblas()
    import mlx_lm.server as server

    server.make_stop_sequences = stop_words_only
    server.ResponseGenerator.generate = without_progress_comments(server.ResponseGenerator.generate)
    server.main()


if __name__ == "__main__":
    main()
