"""The `secant` command. `secant serve` starts the gateway and `secant tokens` manages its
tokens file; every other subcommand (solve, jobs ...) is the SDK's (`secant.cli.main`), so
there is one command for both."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from service import logs

log = logging.getLogger("secant.cli")


DEFAULT_DASHBOARD_PORT = 9465  # beside /metrics' 9464; Ray's own dashboard has 8265


def _serve_parser() -> argparse.ArgumentParser:
    from service.validation import Limits  # torch-heavy: only `serve` pays for it

    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="secant serve", description="Run the secant gateway (gRPC) on this machine."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for /metrics (a pod IP on Kubernetes; default loopback)")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="Prometheus /metrics port on 127.0.0.1 (-1: off)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="web dashboard port (0: any free port; default 9465, or no "
                        "dashboard when another process holds 9465)")
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="address for the dashboard (default loopback; beyond it needs "
                        "--tokens)")
    parser.add_argument("--no-dashboard", action="store_true", help="serve no web dashboard")
    parser.add_argument("--db", default="./secant.db",
                        help="SQLite job store file ('memory' for a throwaway store)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (needs RAY_AUTH_TOKEN if it uses token "
                        "auth) instead of starting an embedded loopback-only one")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the embedded Ray (default: every core)")
    parser.add_argument("--workers", type=int, default=0,
                        help="warm solver processes (default: one per CPU Ray reports)")
    parser.add_argument("--solver-processes", type=int, default=None,
                        help="the gateway's own solver processes, where small solves start"
                        " (default: as many as --workers; 0: small solves start on Ray)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--max-dimension", type=int, default=defaults.max_dimension)
    parser.add_argument("--max-expression-length", type=int,
                        default=defaults.max_expression_length)
    parser.add_argument("--max-concurrent-jobs", type=int, default=defaults.max_concurrent_jobs)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-jobs-per-caller", type=int, default=defaults.max_jobs_per_caller,
                        help="quota: queued + running jobs of one caller")
    parser.add_argument("--max-dimension-per-caller", type=int,
                        default=defaults.max_dimension_per_caller,
                        help="quota: total dimension (sum of n) of one caller's queued + "
                        "running jobs")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=4096,
                        help="RPCs (streams included) in flight at once; beyond it new RPCs "
                        "are RESOURCE_EXHAUSTED (0: unbounded)")
    parser.add_argument("--trust-code", action="store_true",
                        help="accept torch.export and cloudpickle objectives (they run caller "
                        "code) from callers with the trust-code role")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="let training specs name a data file (data_uri: .npz or "
                        ".safetensors holding X and y) under DIR, read by the Ray workers "
                        "(every caller with the train role can read every file under it; "
                        "default: data URIs are refused)")
    parser.add_argument("--tokens", default=None, metavar="FILE",
                        help="turn auth on: bearer tokens (hashed) with callers and roles; "
                        "see `secant tokens add`. Re-read when it changes")
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="serve TLS with this certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the TLS private key")
    parser.add_argument("--tls-client-ca", default=None, metavar="PEM",
                        help="mutual TLS: require client certificates signed by this CA")
    parser.add_argument("--allow-remote-without-auth", action="store_true",
                        help="allow a non-loopback --host although no --tokens are configured "
                        "(anyone who reaches the port can run jobs)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds in-flight RPCs get on shutdown")
    parser.add_argument("--checkpoint-interval-s", type=float, default=1.0,
                        help="seconds of solving between checkpoints a lost worker or a "
                        "restarted gateway resumes from (0: never)")
    parser.add_argument("--max-worker-restarts", type=int, default=3,
                        help="how often a job may lose its worker and resume")
    parser.add_argument("--callback-lease-s", type=float, default=300.0,
                        help="how long a callback job waits for its caller to reconnect")
    parser.add_argument("--callback-eval-deadline-s", type=float, default=600.0,
                        help="how long a callback job waits for one evaluation")
    return parser


def _dashboard_port(args: argparse.Namespace) -> int | None:
    if args.no_dashboard or (args.dashboard_port is not None and args.dashboard_port < 0):
        return None
    return DEFAULT_DASHBOARD_PORT if args.dashboard_port is None else args.dashboard_port


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    if args.ray_address is None:
        from service.ray_env import prepare_loopback_ray_env

        prepare_loopback_ray_env()  # before anything imports ray
    from service.callbacks import CallbackSettings
    from service.server import (  # heavy imports (torch, ray) only here
        Gateway,
        GatewayConfig,
        check_config,
    )
    from service.validation import Limits

    logs.configure(args.log_level)
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        dashboard_port=_dashboard_port(args),
        dashboard_host=args.dashboard_host,
        dashboard_best_effort=args.dashboard_port is None,
        db=args.db,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        workers=args.workers,
        solver_processes=args.solver_processes,
        trust_code=args.trust_code,
        data_root=args.data_root,
        tokens=args.tokens,
        allow_remote_without_auth=args.allow_remote_without_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        grace_s=args.grace,
        checkpoint_interval_s=args.checkpoint_interval_s,
        max_worker_restarts=args.max_worker_restarts,
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
            max_jobs_per_caller=args.max_jobs_per_caller,
            max_dimension_per_caller=args.max_dimension_per_caller,
        ),
    )
    try:
        check_config(config)  # refuse before Ray starts, with a plain message
    except ValueError as exc:
        print(f"secant serve: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        gateway = Gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await gateway.start()
        print(f"secant serving on {gateway.address}", flush=True)
        if gateway.dashboard_url:
            print(f"dashboard on {gateway.dashboard_url}", flush=True)
        await stop.wait()
        log.info("shutting down")
        await gateway.stop()

    try:
        asyncio.run(run())
    except ValueError as exc:  # a configuration the gateway refused
        print(f"secant serve: {exc}", file=sys.stderr)
        return 2
    return 0


DEFAULT_TOKENS_FILE = "./secant-tokens.yaml"


def _tokens_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secant tokens", description="Manage a gateway's tokens file (secant serve --tokens)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add", help="make a new token for a caller: prints it once, stores only its hash"
    )
    add.add_argument("caller", help="the caller's name (owner of its jobs)")
    add.add_argument("--roles", default="solve",
                     help="comma-separated: solve, train, trust-code, admin (default solve)")
    add.add_argument("--file", default=None,
                     help=f"tokens file (env SECANT_TOKENS_FILE, default {DEFAULT_TOKENS_FILE})")
    listing = actions.add_parser("list", help="callers and roles in the file (no secrets)")
    listing.add_argument("--file", default=None)
    return parser


def tokens(argv: list[str]) -> int:
    import os

    from service.auth import add_token, parse_tokens

    args = _tokens_parser().parse_args(argv)
    path = args.file or os.environ.get("SECANT_TOKENS_FILE") or DEFAULT_TOKENS_FILE
    try:
        if args.action == "add":
            roles = [r.strip() for r in args.roles.split(",") if r.strip()]
            token = add_token(path, args.caller, roles)
            print(token)
            print(f"added caller {args.caller!r} with roles {','.join(sorted(roles))} to "
                  f"{path}; the token is shown only now", file=sys.stderr)
        else:
            with open(path) as handle:
                for entry in parse_tokens(handle.read(), path):
                    print(f"{entry.caller}\t{','.join(sorted(entry.roles))}\t"
                          f"sha256:{entry.sha256[:12]}")
    except (OSError, ValueError) as exc:
        print(f"secant tokens: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] == "health":
        from service.health_cli import main as health_main

        return health_main(argv[1:])
    if argv and argv[0] == "tokens":
        return tokens(argv[1:])
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
