"""`bumblecore serve`: an OpenAI-compatible chat API and a web chat page, hosted by LitServe.

Two processes, in LitServe's layout. This one runs the HTTP server (one uvicorn server in a thread):
`serving_http` checks each request (`openai_request`), renders and tokenizes the prompt with the
model's chat template, and streams the reply. LitServe's inference worker process holds the model
and one `GenerationEngine` (`serving_worker`). In front of every route, `request_guard` refuses
what a browser on another site could send. What LitServe offers only through private names is in
`litserve_adapter`. This module assembles the server and holds the command.
"""

import os
import signal
import sys
from pathlib import Path
from typing import Optional

from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from bumblecore.inference.litserve_adapter import InProcessLitServer
from bumblecore.inference.loading import refuse_reward_model
from bumblecore.inference.openai_request import APIError
from bumblecore.inference.request_guard import HeadTimeoutH11Protocol, RequestGuard
from bumblecore.inference.sampling import SamplingArgs
from bumblecore.inference.serve_settings import (
    DEFAULT_PREFIX_CACHE_MB,
    DEFAULT_STREAM_INTERVAL,
    SERVE_SAMPLING,
    ServeSettings,
    context_length,
    model_dirs,
)
from bumblecore.inference.serving_completions import CompletionsSpec
from bumblecore.inference.serving_http import (
    api_error_response,
    http_error_response,
    server_error_response,
)
from bumblecore.inference.serving_worker import EngineAPI

WEB_DIR = Path(__file__).parent / "web"
MAX_HEADER_BYTES = 64 * 1024  # a request line and headers larger than this are refused


class BumbleServer(InProcessLitServer):
    """The API (EngineAPI with CompletionsSpec: chat and text completions), the page at / and its files under /web,
    OpenAI-shaped errors, CORS for --allowed_origins, and the request guard in front of it all."""

    def __init__(self, settings: ServeSettings):
        import torch

        on_gpu = settings.device_map.startswith("cuda") or (settings.device_map == "auto" and torch.cuda.is_available())
        api = EngineAPI(settings, CompletionsSpec(settings))
        super().__init__(api, accelerator="cuda" if on_gpu else "cpu", devices=1, timeout=False)
        self.settings = settings
        app = self.app
        self.replace_get_route("/", self.page)
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
        app.add_exception_handler(APIError, api_error_response)
        app.add_exception_handler(StarletteHTTPException, http_error_response)
        app.add_exception_handler(Exception, server_error_response)
        if settings.allowed_origins:  # their pages call the API cross-origin: answer the browser's CORS checks
            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
        app.add_middleware(RequestGuard, settings=settings)  # added last: outermost, before any other work

    async def page(self):
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")

    def run(self, host: str, port: int, log_level: str = "info") -> None:
        """Serve until stopped (Ctrl+C, SIGTERM, or stop() from another thread)."""
        # uvicorn options, through LitServer.run: a deadline for each request head, and the idle
        # time between kept-alive requests, both --header_timeout.
        protocol = type("HeadTimeoutH11", (HeadTimeoutH11Protocol,), {"head_timeout": self.settings.header_timeout})
        super().run(
            host=host,
            port=port,
            log_level=log_level,
            generate_client_file=False,
            http=protocol,
            timeout_keep_alive=self.settings.header_timeout,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )


# The stages whose models `serve` answers: raw-text completion or chat (inference/commands.py tells which).
SERVED_STAGES = ("pretrain", "continue_pretrain", "sft", "dpo")


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: str = "bumblebee",
    training_stage: str = "sft",
    system_prompt: Optional[str] = None,
    max_batch_size: int = 16,
    max_model_len: Optional[int] = None,
    max_request_bytes: int = 1_000_000,
    allowed_hosts: Optional[list[str]] = None,
    allowed_origins: Optional[list[str]] = None,
    dtype: str = "auto",
    device_map: str = "auto",
    trust_remote_code: bool = False,
    sampling: SamplingArgs = SERVE_SAMPLING,
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    stream_interval: float = DEFAULT_STREAM_INTERVAL,
    log_level: str = "info",
    chat_template: Optional[str] = None,
    base_model_path: Optional[str] = None,
    ignore_base_mismatch: bool = False,
    static_cache: bool = False,
) -> None:
    """Serve a model: OpenAI-compatible /v1/chat/completions (streaming too), /v1/models, /health, and a web chat page at /.

    The sampling options are the defaults for requests that leave a field out (max_tokens, temperature,
    top_p, top_k, repetition_penalty); a request's own values win, and its temperature 0 is greedy.

    Args:
        model_path: a model directory (HF layout) or a LoRA adapter directory.
        host: address to bind; 127.0.0.1 (this machine only) unless you mean to expose it (0.0.0.0 or ::).
        port: TCP port.
        api_key: when set, API routes need `Authorization: Bearer <key>`. Prefer the environment variable BUMBLECORE_API_KEY (the default): a flag shows in `ps` to every user of the machine. None: any key is accepted.
        model_name: the model id clients send and /v1/models lists.
        training_stage: pretrain/continue_pretrain serve raw-text completion; sft/dpo chat through the template.
        system_prompt: system message for conversations without one (default: whatever the template adds itself; "": none).
        max_batch_size: requests decoded together (KV-cache slots); more wait for a free slot.
        max_model_len: tokens per request, prompt and reply together (default: the model's, at most 4096).
        max_request_bytes: larger request bodies are refused with 413.
        allowed_hosts: Host names to serve besides localhost/127.0.0.1/::1 when bound to loopback (else: the only names served; default any); "*" serves any (this disables the DNS-rebinding guard).
        allowed_origins: web origins (scheme://host[:port]) whose pages may call the API, besides the server's own page; "*" allows any site's pages.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        device_map: auto, cpu or cuda:N.
        trust_remote_code: allow a model or tokenizer that ships its own Python code (only for directories you trust).
        sampling: defaults for requests that leave a field out.
        prefix_cache_mb: MiB of KV cache kept from finished requests, so a conversation's next turn prefills only its new tokens (its history's are reused); 0 disables.
        stream_interval: seconds at least between two chunks of a reply; tokens generated meanwhile go out together in one chunk (a model faster than that sends several tokens a chunk); 0: a chunk per decode step.
        log_level: uvicorn/LitServe log level (debug, info, warning, error).
        chat_template: a built-in template (chatml, qwen2.5, llama3, mistral, gemma, phi3) or a .jinja file; default: the model's own (the one it was trained with). A conversation it cannot render is answered 400.
        base_model_path: for a LoRA adapter: the base to apply it to (default: the one the adapter names); it must be the base the adapter was trained on.
        ignore_base_mismatch: apply a LoRA adapter to a base other than the one it was trained on (its base_fingerprint.json says which) instead of refusing.
        static_cache: decode every slot in one fixed-shape step compiled for the batch (inductor on CPU, CUDA graphs on CUDA): the server compiles a few minutes before its first replies on a CPU, then steps faster; not for an unmerged LoRA adapter (merge it first).
    """
    if training_stage not in SERVED_STAGES:
        raise ValueError(f"training_stage {training_stage!r}: expected pretrain, continue_pretrain, sft or dpo")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    if prefix_cache_mb < 0:
        raise ValueError("prefix_cache_mb must be at least 0 (0 disables the prefix cache)")
    if not 0 <= stream_interval <= 1:
        raise ValueError("stream_interval must be between 0 and 1 second (0: a chunk per decode step)")
    if api_key and any(arg == "--api_key" or arg.startswith("--api_key=") for arg in sys.argv):
        print(
            "bumblecore serve: note: --api_key is visible to every user of this machine (ps, /proc); "
            "set BUMBLECORE_API_KEY in the environment instead.",
            file=sys.stderr,
            flush=True,
        )
    api_key = api_key or os.environ.get("BUMBLECORE_API_KEY") or None
    settings = ServeSettings(
        model_path,
        model_name=model_name,
        api_key=api_key,
        training_stage=training_stage,
        system_prompt=system_prompt,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
        max_request_bytes=max_request_bytes,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        sampling=sampling,
        prefix_cache_mb=prefix_cache_mb,
        stream_interval=stream_interval,
        chat_template=chat_template,
        base_model_path=base_model_path,
        ignore_base_mismatch=ignore_base_mismatch,
        static_cache=static_cache,
        host=host,
        allowed_hosts=tuple(allowed_hosts or ()),
        allowed_origins=tuple(allowed_origins or ()),
    )
    # A wrong path, or an adapter on another base than its own, fails here, in one line, before any process starts.
    if (Path(model_path) / "adapter_config.json").is_file():
        from bumblecore.model.adapter_base import adapter_base_dir

        adapter_base_dir(model_path, base_model_path, ignore_base_mismatch)
    refuse_reward_model(model_dirs(model_path, base_model_path)[0], model_path)
    context_length(model_path, max_model_len, base_model_path)
    if chat_template:  # likewise a wrong template name or file, or one whose markers the tokenizer lacks
        from bumblecore.chat.templates import use_chat_template
        from bumblecore.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dirs(model_path, base_model_path)[1], trust_remote_code=trust_remote_code)
        use_chat_template(tokenizer, chat_template, model_path)
    check_tokenizer_fits(model_path, trust_remote_code, base_model_path)  # as would every request, later, in the worker
    server = BumbleServer(settings)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(
        f"bumblecore serve: http://{shown}:{port}/ (chat page), http://{shown}:{port}/v1 (OpenAI API, model "
        f"{model_name!r}{', API key required' if api_key else ''})",
        flush=True,
    )
    # SIGTERM (docker stop, kill, systemd) shuts down like Ctrl+C does: LitServe then stops the worker
    # process too, instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    server.run(host=host, port=port, log_level=log_level)


def check_tokenizer_fits(
    model_path: str, trust_remote_code: bool = False, base_model_path: Optional[str] = None
) -> None:
    """Raise ValueError when the tokenizer has ids the model has no embedding for (load_for_inference
    checks it too, in the worker; here it fails in one line, before any process starts)."""
    from bumblecore.model.vocab import adapter_vocab_size
    from bumblecore.tokenizer import check_fits_model, load_tokenizer

    config_dir, tokenizer_dir = model_dirs(model_path, base_model_path)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    if config_dir != Path(model_path) and adapter_vocab_size(model_path, tokenizer, config_dir):
        return  # an adapter that trained the tokens its tokenizer adds: the base grows to it
    check_fits_model(tokenizer, config_dir, tokenizer_dir)


def stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt
