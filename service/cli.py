"""The `secant` command. `secant serve` starts the gateway; every other subcommand (solve,
jobs ...) is the SDK's (`secant.cli.main`), so there is one command for both."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from service import logs

log = logging.getLogger("secant.cli")


def _serve_parser() -> argparse.ArgumentParser:
    from service.validation import Limits  # torch-heavy: only `serve` pays for it

    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="secant serve", description="Run the secant gateway (gRPC) on this machine."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="Prometheus /metrics port on 127.0.0.1 (-1: off)")
    parser.add_argument("--db", default="./secant.db",
                        help="SQLite job store file ('memory' for a throwaway store)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (needs RAY_AUTH_TOKEN if it uses token "
                        "auth) instead of starting an embedded loopback-only one")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the embedded Ray (default: every core)")
    parser.add_argument("--workers", type=int, default=0,
                        help="warm solver processes (default: one per CPU Ray reports)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--max-dimension", type=int, default=defaults.max_dimension)
    parser.add_argument("--max-expression-length", type=int,
                        default=defaults.max_expression_length)
    parser.add_argument("--max-concurrent-jobs", type=int, default=defaults.max_concurrent_jobs)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--trust-code", action="store_true",
                        help="accept torch.export and cloudpickle objectives (they run caller "
                        "code: trusted callers only)")
    parser.add_argument("--allow-remote-without-auth", action="store_true",
                        help="allow a non-loopback --host although auth is not configured")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds in-flight RPCs get on shutdown")
    parser.add_argument("--callback-lease-s", type=float, default=300.0,
                        help="how long a callback job waits for its caller to reconnect")
    parser.add_argument("--callback-eval-deadline-s", type=float, default=600.0,
                        help="how long a callback job waits for one evaluation")
    return parser


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    if args.ray_address is None:
        from service.ray_env import prepare_loopback_ray_env

        prepare_loopback_ray_env()  # before anything imports ray
    from service.callbacks import CallbackSettings
    from service.server import Gateway, GatewayConfig  # heavy imports (torch, ray) only here
    from service.validation import Limits

    logs.configure(args.log_level)
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        db=args.db,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        workers=args.workers,
        trust_code=args.trust_code,
        allow_remote_without_auth=args.allow_remote_without_auth,
        grace_s=args.grace,
        callbacks=CallbackSettings(
            lease_s=args.callback_lease_s,
            evaluation_deadline_s=args.callback_eval_deadline_s,
        ),
        limits=Limits(
            max_message_bytes=args.max_message_bytes,
            max_dimension=args.max_dimension,
            max_expression_length=args.max_expression_length,
            max_concurrent_jobs=args.max_concurrent_jobs,
            max_batch_size=args.max_batch_size,
        ),
    )

    async def run() -> None:
        gateway = Gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await gateway.start()
        print(f"secant serving on {gateway.address}", flush=True)
        await stop.wait()
        log.info("shutting down")
        await gateway.stop()

    try:
        asyncio.run(run())
    except ValueError as exc:  # a configuration the gateway refused
        print(f"secant serve: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    try:
        from secant.cli import main as client_main
    except ImportError:
        print("secant: the client commands are not installed (secant.cli)", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return int(client_main(argv) or 0)
    return 130


if __name__ == "__main__":
    sys.exit(main())
