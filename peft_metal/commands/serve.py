"""`peft-metal serve`: the HTTP service; its API key from a file or the environment, never the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .common import load_pgm_for


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="an HTTP service: prompts generated once and stored, completions read after them, batched"
    )
    serve.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    serve.add_argument(
        "--pgm", help="a saved PGM (folder or Hub id); default: the one shipped for --model, else a fresh untrained one"
    )
    serve.add_argument("--store", required=True, help="the prompt store folder (created if missing)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key-file",
        help="a file holding the key that /v1/* then requires as 'Authorization: Bearer KEY' (default: the key in "
        "$PEFT_METAL_API_KEY, else none)",
    )
    serve.add_argument("--api-key", help=argparse.SUPPRESS)  # refused: a key on the command line shows in `ps`
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    serve.add_argument("--max-shots", type=int, default=512, help="shots per prompt request at most (default 512)")
    serve.add_argument(
        "--max-request-tokens", type=int, default=32768,
        help="tokens one completion request makes the LM read and generate, at most (default 32768)",
    )
    serve.add_argument(
        "--max-streams", type=int, default=16, help="streamed completions open at once at most (default 16; then 429)"
    )
    serve.add_argument(
        "--max-refine-jobs", type=int, default=2,
        help="prompts refined at once at most (refine_steps > 0; default 2; then 429 with Retry-After)",
    )
    serve.add_argument(
        "--batch-window-ms", type=float, default=5.0,
        help="how long the first waiting input of a prompt waits for others to batch with (default 5)",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="inputs per batched LM call at most (default 16)")
    serve.add_argument("--context-cache-size", type=int, default=64, help="prompt contexts kept in memory (default 64)")
    serve.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    serve.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="weights of the frozen LM: auto = bf16 on a CPU with AMX / AVX512-BF16 or a bf16 GPU, else fp32",
    )
    serve.add_argument("--seed", type=int, default=0, help="seeds a fresh PGM when none is given (default 0)")
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    serve.set_defaults(run=run, methods="metal")


def _api_key(args: argparse.Namespace) -> Optional[str]:
    """The key from --api-key-file, else $PEFT_METAL_API_KEY, else None; never from the command line itself."""
    import os

    if args.api_key is not None:
        raise ValueError(
            "--api-key is not accepted: a key on the command line is visible to every user of the machine (ps). "
            "Put it in $PEFT_METAL_API_KEY or in a file passed as --api-key-file."
        )
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file}: {error.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty.")
        return key
    return os.environ.get("PEFT_METAL_API_KEY") or None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..precision import cast_frozen_weights
        from ..serving.app import create_app
        from ..serving.store import PromptStore
    except ModuleNotFoundError as error:
        print(f"peft-metal serve: error: {error}. Serving needs fastapi and uvicorn (pip install fastapi uvicorn).", file=sys.stderr)
        return 2
    if args.max_batch < 1 or args.context_cache_size < 1 or args.batch_window_ms < 0:
        print(
            "peft-metal serve: error: --max-batch and --context-cache-size must be at least 1, --batch-window-ms not "
            "negative.",
            file=sys.stderr,
        )
        return 2
    try:
        store = PromptStore(args.store)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"peft-metal serve: error: cannot open the prompt store {args.store}: {error}", file=sys.stderr)
        return 2
    try:
        api_key = _api_key(args)
    except ValueError as error:
        print(f"peft-metal serve: error: {error}", file=sys.stderr)
        return 2
    if api_key is None and not _is_loopback(args.host):
        print(
            f"peft-metal serve: warning: listening on {args.host} without an API key: anyone who can reach this "
            "address can use the model and the prompt store. Set $PEFT_METAL_API_KEY or pass --api-key-file.",
            file=sys.stderr,
        )
    model, tokenizer, pgm = load_pgm_for(args)
    precision = cast_frozen_weights(model, args.precision)
    try:
        app = create_app(
            model, tokenizer, store, api_key=api_key, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
            context_cache_size=args.context_cache_size, model_name=args.model, max_body_bytes=args.max_body_bytes,
            max_shots=args.max_shots, max_request_tokens=args.max_request_tokens, max_streams=args.max_streams,
            max_refine_jobs=args.max_refine_jobs,
        )
    except ValueError as error:
        print(f"peft-metal serve: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Serving {args.model} ({precision} weights; PGM: {pgm or 'fresh, untrained'}) with prompts in {args.store}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
