"""The LitServe names bumblecore/inference/litserve_adapter.py relies on beyond LitServe's public
surface, each checked for the shape the adapter uses. A LitServe upgrade that moves one fails here,
with a message that names it, instead of in a running server."""

import asyncio
import inspect
import pickle
import queue
from types import SimpleNamespace

import litserve as ls
import pytest

from bumblecore.inference import litserve_adapter as adapter

VERSION = getattr(ls, "__version__", "?")


def moved(name: str, what: str):
    pytest.fail(
        f"LitServe {VERSION} moved {name}: {what}. bumblecore/inference/litserve_adapter.py relies on it; "
        f"update the adapter (and this test) before widening the litserve pin.",
        pytrace=False,
    )


def private(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        moved(f"{module}.{name}", "it no longer exists")


def parameters(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def source(function) -> str:
    return inspect.getsource(function)


class Captured:
    """A transport that keeps what a loop sends."""

    def __init__(self):
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append((consumer_id, item))


def test_the_stop_message_is_what_litserves_own_loops_stop_on():
    sentinel = private("litserve.loops.base", "_SENTINEL_VALUE")
    stop_error = private("litserve.loops.base", "_StopLoopError")
    collate = private("litserve.loops.base", "collate_requests")
    requests = queue.Queue()
    requests.put(sentinel)
    api = SimpleNamespace(batch_timeout=0, max_batch_size=4, request_timeout=False, stream=True)
    try:
        collate(ls.loops.LitLoop(), api, requests, Captured())
    except stop_error:
        pass
    else:
        moved("litserve.loops.base._SENTINEL_VALUE", "LitServe's loops no longer stop on it")
    assert adapter.is_stop_message(sentinel) and not adapter.is_stop_message((0, "uid", 1.0, {}))


def test_a_queued_request_reads_back_as_litserves_loops_read_it():
    collate = private("litserve.loops.base", "collate_requests")
    spec = SimpleNamespace(request_queue=queue.Queue(), response_queue_id=3)
    adapter.send_to_worker(spec, "uid-1", {"prompt_ids": [1, 2]})
    item = spec.request_queue.get_nowait()
    assert adapter.unpack_request(item) == (3, "uid-1", {"prompt_ids": [1, 2]})
    spec.request_queue.put(item)
    api = SimpleNamespace(batch_timeout=0, max_batch_size=4, request_timeout=False, stream=True)
    payloads, _ = collate(ls.loops.LitLoop(), api, spec.request_queue, Captured())
    if payloads != [(3, "uid-1", {"prompt_ids": [1, 2]})]:
        moved(
            "the request-queue message (response_queue_id, uid, timestamp, payload)",
            f"LitServe's collate_requests read {payloads!r}",
        )


def test_the_spec_is_connected_to_the_request_queue_and_reply_buffers():
    names = ("request_queue", "response_buffer", "response_queue_id")
    spec = ls.specs.base.LitSpec()
    for name in names:
        if not hasattr(spec, name):
            moved(f"LitSpec.{name}", "a LitSpec no longer has it")
    setup = source(ls.specs.base.LitSpec.setup)
    for name in ("request_queue", "response_buffer"):
        if f"self.{name} =" not in setup:
            moved(f"LitSpec.{name}", "LitSpec.setup(server) no longer sets it")


def test_the_reply_reader_fills_a_reply_buffer():
    reader = private("litserve.server", "response_queue_to_buffer")
    fields = private("litserve.utils", "ResponseBufferItem").__dataclass_fields__
    for name in ("event", "response_queue"):
        if name not in fields:
            moved(f"litserve.utils.ResponseBufferItem.{name}", "the field is gone")
    status = private("litserve.utils", "LitAPIStatus")
    kind = private("litserve.utils", "LoopResponseType")

    async def deliver():
        spec = SimpleNamespace(response_buffer={})
        replies = adapter.ReplyBuffer(spec, "uid-1")
        messages = [("uid-1", ('{"text": "hi"}\n', status.OK, kind.STREAMING, 0))]

        class Transport:
            async def areceive(self, consumer_id):
                if messages:
                    return messages.pop()
                raise asyncio.CancelledError

        await reader(
            Transport(), spec.response_buffer, 0, SimpleNamespace(lit_apis=[object()], any_stream=lambda: True)
        )
        await replies.wait(timeout=0.1)
        got = replies.next()
        replies.close()
        return got, spec.response_buffer

    got, buffers = asyncio.run(deliver())
    if got is None or tuple(got) != ('{"text": "hi"}\n', status.OK):  # (data, status), as a list or tuple
        moved("litserve.server.response_queue_to_buffer", f"a streamed message reached the buffer as {got!r}")
    assert buffers == {}


def test_a_workers_error_reply_unpickles_to_its_message():
    loop = ls.loops.LitLoop()
    transport = Captured()
    kind = private("litserve.utils", "LoopResponseType")
    loop.put_error_response(transport, 0, "uid-1", '{"error": "ValueError: boom"}\n', kind.STREAMING)
    loop.put_error_response(transport, 0, "uid-2", RuntimeError("step failed"), kind.STREAMING)
    try:
        data = [item[1][0] for _, item in transport.sent]
        pickle.loads(data[0])
    except Exception as err:
        moved(
            "LitLoop.put_error_response",
            f"its message is no longer (uid, (pickled error, status, type, worker)): {err!r}",
        )
    assert [adapter.worker_error_message(d) for d in data] == ["ValueError: boom", "step failed"]


def test_the_server_methods_the_adapter_overrides():
    server_class = ls.LitServer
    expected = {
        "_start_server": ["port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type", "kwargs"],
        "_perform_graceful_shutdown": ["manager", "uvicorn_workers", "shutdown_reason"],
        "verify_worker_status": [],
        "_init_manager": ["num_api_servers"],
    }
    for name, params in expected.items():
        method = getattr(server_class, name, None)
        if method is None:
            moved(f"LitServer.{name}", "the method is gone")
        if parameters(method) != params:
            moved(f"LitServer.{name}", f"its parameters are now {parameters(method)}, not {params}")
    run = source(server_class.run)
    for call in (
        "self.verify_worker_status()",
        "self._start_server(",
        "**kwargs",
        "self._shutdown_event.wait()",
        "self._perform_graceful_shutdown(",
    ):
        if call not in run:
            moved(f"LitServer.run's use of {call}", "run() no longer makes it")
    init_manager = source(server_class._init_manager)
    for name in ("self.workers_setup_status", "self._shutdown_event", "self.transport_config.manager"):
        if name not in init_manager:
            moved(f"LitServer.{name.split('.', 1)[1]}", "_init_manager no longer sets it")
    if run.index("self._init_manager(") > run.index("self.launch_inference_worker("):
        moved("LitServer._init_manager", "run() starts the workers before it makes the transport")
    for method in (server_class.launch_inference_worker, server_class.lifespan):
        if "self._transport" not in source(method):
            moved("LitServer._transport", f"{method.__name__} no longer hands it over")
    if "self._get_request_queue(" not in source(server_class.launch_inference_worker):
        moved("LitServer.litapi_request_queues", "launch_inference_worker no longer hands the worker its queue")
    if "server._get_request_queue(" not in source(ls.specs.base.LitSpec.setup):
        moved("LitServer.litapi_request_queues", "LitSpec.setup no longer takes its queue from there")
    if "self.litapi_request_queues[" not in init_manager:
        moved("LitServer.litapi_request_queues", "_init_manager no longer fills it")
    if "self.inference_workers" not in run:
        moved("LitServer.inference_workers", "run() no longer sets it")
    if "self.monitor_internal" not in source(server_class._start_worker_monitoring):
        moved("LitServer.monitor_internal", "the worker monitor no longer sleeps that long between polls")
    status = private("litserve.utils", "WorkerSetupStatus")
    if not (hasattr(status, "READY") and hasattr(status, "ERROR")):
        moved("litserve.utils.WorkerSetupStatus", "READY or ERROR is gone")


def test_an_in_process_server_serves_its_own_index_route():
    server = adapter.InProcessLitServer(ls.test_examples.SimpleLitAPI(), accelerator="cpu", devices=1)
    assert server.monitor_internal == adapter.MONITOR_INTERVAL
    if server._shutdown_event is not None:
        moved("LitServer._shutdown_event", "it is set before run()")

    async def page():
        return "ours"

    server.replace_get_route("/", page)
    index = [route for route in server.app.router.routes if getattr(route, "path", None) == "/"]
    assert len(index) == 1 and index[0].endpoint is page
    server.stop()  # before run(): nothing to stop, no error


def test_the_loop_and_api_hooks_the_worker_overrides():
    """Public, but the worker's loop replaces them whole: their parameters must still be these."""
    loop = ls.loops.ContinuousBatchingLoop
    expected = {
        "prefill": [
            "pending_requests",
            "lit_api",
            "lit_spec",
            "request_queue",
            "transport",
            "max_batch_size",
            "batch_timeout",
        ],
        "run": [
            "lit_api",
            "device",
            "worker_id",
            "request_queue",
            "transport",
            "workers_setup_status",
            "callback_runner",
        ],
        "add_request": ["uid", "request", "lit_api", "lit_spec", "transport"],
        "get_request": ["request_queue", "block", "timeout"],
    }
    for name, params in expected.items():
        if parameters(getattr(loop, name)) != params:
            moved(f"ContinuousBatchingLoop.{name}", f"its parameters are now {parameters(getattr(loop, name))}")
    instance = loop()
    for name in ("response_queue_ids", "active_sequences"):
        if not isinstance(getattr(instance, name, None), dict):
            moved(f"ContinuousBatchingLoop.{name}", "it is no longer a dict")
    if "lit_api.health()" not in source(ls.LitServer._register_internal_endpoints):
        moved("LitAPI.health", "/health no longer asks it")


def test_a_steps_one_message_reaches_each_requests_buffer():
    """send_step's message through LitServe's own reply reader: each (data, status) lands in its
    request's buffer, in order, as a message per request would; a closed request's are dropped."""
    reader = private("litserve.server", "response_queue_to_buffer")
    status = private("litserve.utils", "LitAPIStatus")
    transport = Captured()
    items = [
        ("uid-1", {"text": "a"}, status.OK),
        ("gone", {"text": "x"}, status.OK),
        ("uid-2", {"text": "b"}, status.OK),
    ]
    items.append(("uid-1", "", status.FINISH_STREAMING))
    adapter.send_step(ls.loops.LitLoop(), transport, {0: items})
    assert [consumer for consumer, _ in transport.sent] == [0]

    async def deliver():
        spec = SimpleNamespace(response_buffer={})
        adapter.StepFanOut.install(spec)
        first, second = adapter.ReplyBuffer(spec, "uid-1"), adapter.ReplyBuffer(spec, "uid-2")
        messages = [item for _, item in transport.sent]

        class Transport:
            async def areceive(self, consumer_id):
                if messages:
                    return messages.pop()
                raise asyncio.CancelledError

        await reader(
            Transport(), spec.response_buffer, 0, SimpleNamespace(lit_apis=[object()], any_stream=lambda: True)
        )
        await first.wait(timeout=0.1)
        got = []
        for replies in (first, second):
            got.append([])
            while (message := replies.next()) is not None:
                got[-1].append(tuple(message))
        return got

    got = asyncio.run(deliver())
    if got != [[({"text": "a"}, status.OK), ("", status.FINISH_STREAMING)], [({"text": "b"}, status.OK)]]:
        moved("litserve.server.response_queue_to_buffer", f"a step's message reached the buffers as {got!r}")
    assert adapter.worker_error_message({"error": "ValueError: boom"}) == "ValueError: boom"


def send_from_worker(transport, items):
    for item in items:
        transport.send(item, consumer_id=0)


@pytest.mark.slow
def test_the_pipe_transport_carries_a_workers_messages_whole_and_in_order():
    """What a spawned worker sends through PipeTransport reaches LitServe's own reply reader in the
    HTTP process's event loop, as sent and in order: many small messages, and one larger than the
    pipe's buffer (it arrives in pieces); close() ends the reader, as LitServe's shutdown expects."""
    import multiprocessing

    reader = private("litserve.server", "response_queue_to_buffer")
    status = private("litserve.utils", "LitAPIStatus")
    kind = private("litserve.utils", "LoopResponseType")
    transport = adapter.PipeTransport()
    items = [(f"uid-{i}", ({"text": "bee" * (i % 5)}, status.OK, kind.STREAMING, 0)) for i in range(200)]
    items[50] = ("uid-50", ({"text": "蜜" * 300_000}, status.OK, kind.STREAMING, 0))
    worker = multiprocessing.get_context("spawn").Process(target=send_from_worker, args=(transport, items))
    worker.start()

    async def receive():
        spec = SimpleNamespace(response_buffer={})
        buffers = [adapter.ReplyBuffer(spec, uid) for uid, _ in items]
        reading = asyncio.ensure_future(
            reader(transport, spec.response_buffer, 0, SimpleNamespace(lit_apis=[object()], any_stream=lambda: True))
        )
        await asyncio.wait_for(buffers[-1].item.event.wait(), timeout=60)
        transport.close()
        await asyncio.wait_for(reading, timeout=10)
        return [tuple(b.next()) for b in buffers]

    try:
        got = asyncio.run(receive())
    finally:
        worker.join(timeout=30)
    assert got == [(data, state) for _, (data, state, _, _) in items]
