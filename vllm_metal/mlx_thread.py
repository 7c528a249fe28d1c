"""One thread that does all of a model runner's MLX work.

A decode step's host time is vLLM's Python (scheduling, reading outputs) plus
MLX's issue of the forward, whose launch half runs in C++ with the GIL released
(``mx.eval`` and ``mx.async_eval`` release it). On the engine's own thread the
two run one after the other; with the runner's work on a thread of its own,
vLLM schedules step n+1 and reads step n's output while MLX launches step n's
kernels.

MLX 0.32's streams belong to the thread that made them: a graph built, or a
function compiled, on one thread cannot be evaluated on another ("There is no
Stream(gpu, 0) in current thread"). So everything of the runner that touches
MLX runs here, from selecting the device and loading the model to each step,
in the order it was submitted.
"""

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class MlxThread:
    def __init__(self, name: str = "vllm-metal-runner"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """``fn(*args, **kwargs)`` on the thread, after what was submitted before."""
        future: Future = Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` on the thread; waits for it and returns its result
        (raises its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def call_unless(self, done: threading.Event, fn: Callable, *args) -> None:
        """``fn(*args)`` on the thread, unless work already queued there sets ``done``
        first: returns as soon as ``done`` is set."""
        if done.is_set():
            return
        if threading.current_thread() is self._thread:
            fn(*args)
            return
        future = self.submit(fn, *args)
        future.add_done_callback(lambda _: done.set())
        done.wait()
        if future.done():
            future.result()  # its error, where it ran and failed

    def stop(self, timeout: float = 10.0) -> None:
        self._tasks.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # noqa: BLE001 - handed to the waiter
                future.set_exception(error)
