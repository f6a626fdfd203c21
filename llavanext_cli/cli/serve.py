"""`llava serve`: a warm model behind an OpenAI-compatible API, for the CLI's --server and any other program."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt

_SERVE = "Serving"
_SAFETY = "What requests may do"


def serve(
    host: Annotated[str, typer.Option("--host", help="The address to listen on (127.0.0.1: this machine only).",
                                      rich_help_panel=_SERVE)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The port to listen on (0: any free one, said on stderr).",
                                      min=0, max=65535, rich_help_panel=_SERVE)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", help="Ask every request but /health for this key (Authorization: Bearer KEY); env LLAVA_API_KEY.",
        rich_help_panel=_SERVE, show_default=False)] = None,
    alias: Annotated[Optional[list[str]], typer.Option(
        "--alias", help="Another name the model answers to in requests and /v1/models (repeat for several).",
        rich_help_panel=_SERVE, show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting or running at once; beyond, 429.",
                                           min=1, rich_help_panel=_SERVE)] = 64,
    batch_window: Annotated[float, typer.Option(
        "--batch-window", help="Milliseconds the worker waits for requests to answer together.", min=0,
        rich_help_panel=_SERVE)] = 10.0,
    cache_memory: Annotated[str, typer.Option(
        "--cache-memory", help="Memory for the cached prefixes of earlier requests (a conversation's turns, an "
        "image asked again); the least recently used go first.", rich_help_panel=_SERVE)] = "2GiB",
    media_root: Annotated[Optional[str], typer.Option(
        "--media-root", help="Allow file:// image URLs of files under this folder (none: no file is read).",
        rich_help_panel=_SAFETY, show_default=False)] = None,
    allow_url_images: Annotated[bool, typer.Option(
        "--allow-url-images", help="Fetch http(s) image URLs (never from loopback, private, link-local or metadata "
        "addresses, checked on every redirect).", rich_help_panel=_SAFETY)] = False,
    allow_network: Annotated[Optional[list[str]], typer.Option(
        "--allow-network", help="A network (CIDR) whose addresses image URLs may reach although private (repeat).",
        rich_help_panel=_SAFETY, show_default=False)] = None,
    max_body: Annotated[str, typer.Option("--max-body", help="The largest request body; beyond, 413.",
                                          rich_help_panel=_SAFETY)] = "32MiB",
    max_images: Annotated[int, typer.Option("--max-images", help="Images a request may carry; beyond, 413.", min=1,
                                            rich_help_panel=_SAFETY)] = 8,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Pixels an image may have; beyond, 413.", min=1,
                                            rich_help_panel=_SAFETY)] = 40_000_000,
    model: opt.ModelOpt = None,
    prompt_format: opt.PromptFormatOpt = None,
    dtype: opt.DtypeOpt = None,
    quant: opt.QuantOpt = None,
    quant_type: opt.QuantTypeOpt = None,
    attn: opt.AttnOpt = None,
    device: opt.DeviceOpt = None,
    batch_size: opt.BatchSizeOpt = None,
    max_new_tokens: opt.MaxNewTokensOpt = None,
    max_memory: opt.MaxMemoryOpt = None,
    memory_check: opt.MemoryCheckOpt = None,
    config: opt.ConfigOpt = None,
    offline: opt.OfflineOpt = None,
    verbose: opt.VerboseOpt = False,
) -> int:
    """Serve one model, loaded once: OpenAI's /v1/chat/completions and /v1/models, the native /v1/caption, /v1/ask
    and /v1/classify (the CLI's records), and /health. caption, ask, classify and chat take --server URL to use it.

    Examples:

      llava serve -m ./tiny

      llava serve -m llava-hf/llava-v1.6-mistral-7b-hf --api-key "$(cat key)" --batch-size 8

      llava caption photos/ --server http://127.0.0.1:8000 -o captions.jsonl
    """
    flags = opt.model_flags(locals())
    return _run_server(flags, config, verbose, host=host, port=port, api_key=api_key or os.environ.get("LLAVA_API_KEY"),
                      aliases=alias or [], max_queue=max_queue, batch_window=batch_window / 1000,
                      cache_memory=cache_memory, media_root=media_root, allow_url_images=allow_url_images,
                      allow_network=allow_network or [], max_body=max_body, max_images=max_images,
                      max_pixels=max_pixels)


def _run_server(flags: dict, config, verbose: bool, *, host: str, port: int, api_key: str | None,
                aliases: list[str], max_queue: int, batch_window: float, cache_memory: str, media_root: str | None,
                allow_url_images: bool, allow_network: list[str], max_body: str, max_images: int,
                max_pixels: int) -> int:
    """The model opened and its weights loaded (before the first request), then uvicorn until SIGTERM or Ctrl-C:
    it stops taking requests, finishes those waiting and running, and the command exits 0."""
    import signal
    import socket

    import uvicorn

    from llavanext_cli.cli import out
    from llavanext_cli.cli.batch import command_model, open_model
    from llavanext_cli.io.settings import memory_size, resolve_settings
    from llavanext_cli.serve.app import Server, ServerLimits, make_app
    from llavanext_cli.serve.media import media_policy_from
    from llavanext_cli.serve.scheduler import Scheduler

    limits = ServerLimits(max_body=memory_size(max_body, "--max-body"), max_images=max_images)
    policy = media_policy_from(media_root, allow_url_images, allow_network, max_pixels)
    model = open_model(command_model(resolve_settings(flags, config)), verbose)
    model.checkpoint.load()
    scheduler = Scheduler(model, max_queue=max_queue, window=batch_window,
                          cache_memory=memory_size(cache_memory, "--cache-memory"))
    server = Server([model.name, *aliases], scheduler, policy, limits, api_key)
    listener = socket.create_server((host, port))  # bound here: port 0 is known before uvicorn runs
    bound = listener.getsockname()[1]
    config_ = uvicorn.Config(make_app(server), log_level="info" if verbose else "warning", access_log=verbose,
                             timeout_graceful_shutdown=None)
    out.note(f"llava serve: {model.name} on http://{host}:{bound} ({'a key is needed' if api_key else 'no key'}; "
             f"Ctrl-C or SIGTERM stops it)")
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the handler it found: a server asked to
    # stop that stopped is a success (exit 0), not a run cut short.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config_).run(sockets=[listener])
    out.note("llava serve: stopped.")
    return 0
