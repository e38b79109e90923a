"""The ``secant`` command line (every subcommand but ``serve``, which lives in service/).

    secant solve SPEC.yaml              stream progress, print the result
    secant solve SPEC.yaml --batch B.npz [--member-data NAME]... [--out results.npz]
                                        one vectorized job: x0 (B x n) and data from B.npz
    secant jobs list [--state S] [--method M] [--batch B] [--limit N]
    secant jobs show JOB | watch JOB | cancel JOB... | plot JOB -o conv.png

Global flags (before or after the subcommand): --address (env SECANT_ADDRESS, default
127.0.0.1:50051), --token (env SECANT_TOKEN), --tls (env SECANT_TLS=1), --root-cert PEM (env
SECANT_TLS_ROOT_CERT), --cert PEM and --key PEM for mutual TLS (env SECANT_TLS_CERT,
SECANT_TLS_KEY), --server-name (env SECANT_TLS_SERVER_NAME).
Exit status: 0 done (solve: converged), 1 error, 2 usage, 3 solve ended without converging.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from secant._batch import BatchSolveResult
from secant._client import Client
from secant._core import DEFAULT_ADDRESS, TLSConfig, tls_from_env
from secant._errors import SecantError
from secant._result import IterateRecord, JobState, OptimizeResult, plot_history
from secant._tensors import from_tensor, is_empty
from secant.v1 import optimizer_pb2 as pb

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_CONVERGED = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one CLI command; returns the exit status (does not call sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        with _client(args) as client:
            return args.handler(client, args)
    except SecantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, ImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def main_entry() -> None:
    """Console-script entry point of the SDK-only install (``serve`` needs the server)."""
    sys.exit(main())


def build_parser() -> argparse.ArgumentParser:
    # Connection flags work before or after the subcommand: the subparsers share a parent
    # whose defaults are SUPPRESSed so a later level never overwrites an earlier value.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--address", default=argparse.SUPPRESS, help="gateway host:port (env SECANT_ADDRESS)"
    )
    connection.add_argument(
        "--token", default=argparse.SUPPRESS, help="bearer token (env SECANT_TOKEN)"
    )
    connection.add_argument("--tls", action="store_true", default=argparse.SUPPRESS, help="use TLS")
    connection.add_argument(
        "--root-cert", default=argparse.SUPPRESS,
        help="CA bundle (PEM) for TLS (env SECANT_TLS_ROOT_CERT)",
    )
    connection.add_argument(
        "--cert", default=argparse.SUPPRESS,
        help="client certificate chain (PEM) for mutual TLS (env SECANT_TLS_CERT)",
    )
    connection.add_argument(
        "--key", default=argparse.SUPPRESS,
        help="client private key (PEM) for mutual TLS (env SECANT_TLS_KEY)",
    )
    connection.add_argument(
        "--server-name", default=argparse.SUPPRESS,
        help="name to check the server's certificate against (env SECANT_TLS_SERVER_NAME)",
    )

    parser = argparse.ArgumentParser(
        prog="secant", parents=[connection], description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    solve = commands.add_parser("solve", parents=[connection], help="solve a YAML/JSON spec")
    solve.add_argument("spec", help="problem spec file (see examples/ and docs/sdk.md)")
    solve.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    solve.add_argument("--json", action="store_true", help="print the result as JSON")
    solve.add_argument("--detach", action="store_true", help="submit, print the job id, exit")
    solve.add_argument("--timeout", type=float, default=None, help="give up waiting after S s")
    solve.add_argument(
        "--batch", metavar="FILE.npz", default=None,
        help="solve a vectorized batch: the .npz holds x0 (B x n, one start per member) and "
        "data arrays (shared unless named by --member-data); the spec gives the objective, "
        "written for one member, and no x0",
    )
    solve.add_argument(
        "--member-data", action="append", default=[], metavar="NAME",
        help="with --batch: an array of the .npz with one entry per member (leading "
        "dimension B); repeat for several",
    )
    solve.add_argument(
        "--out", metavar="FILE.npz", default=None,
        help="with --batch: write x, fun, status, nit, nfev and success per member",
    )
    solve.add_argument(
        "--chunk-size", type=int, default=0,
        help="with --batch: members per CPU worker chunk (0: the server's default)",
    )
    solve.set_defaults(handler=_solve)

    train = commands.add_parser("train", parents=[connection],
                                help="train a model from a YAML spec (docs/training.md)")
    train.add_argument("spec", help="training spec file (see examples/train_digits.yaml)")
    train.add_argument("-o", "--output", default=None,
                       help="write the trained weights (safetensors) to this file")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.add_argument("--timeout", type=float, default=None, help="give up after S s")
    train.add_argument("--plan", action="store_true",
                       help="print the memory plan (bytes per worker per ZeRO stage, "
                            "checkpointing, accumulation) instead of training")
    train.add_argument("--workers", type=int, default=None,
                       help="with --plan: data-parallel workers (default: the spec's)")
    train.add_argument("--budget", default=None,
                       help="with --plan: memory per worker, e.g. 16GiB (default: the spec's "
                            "scaling.memory_budget, else the server's)")
    train.set_defaults(handler=_train)

    jobs = commands.add_parser("jobs", parents=[connection], help="list and manage jobs")
    job_commands = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")

    listing = job_commands.add_parser("list", parents=[connection], help="list jobs")
    listing.add_argument("--state", help="queued|running|succeeded|failed|cancelled")
    listing.add_argument("--method")
    listing.add_argument("--batch", dest="batch_id")
    listing.add_argument("--limit", type=int, default=50, help="at most N rows (0: all)")
    listing.set_defaults(handler=_jobs_list)

    show = job_commands.add_parser("show", parents=[connection], help="one job's record")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_jobs_show)

    watch = job_commands.add_parser("watch", parents=[connection], help="follow a job's events")
    watch.add_argument("job_id")
    watch.add_argument("--after-seq", type=int, default=0, help="replay events after this seq")
    watch.set_defaults(handler=_jobs_watch)

    cancel = job_commands.add_parser("cancel", parents=[connection], help="cancel jobs")
    cancel.add_argument("job_ids", nargs="+")
    cancel.set_defaults(handler=_jobs_cancel)

    plot = job_commands.add_parser("plot", parents=[connection], help="convergence plot (PNG)")
    plot.add_argument("job_id")
    plot.add_argument("-o", "--output", default="conv.png", help="image path (default conv.png)")
    plot.set_defaults(handler=_jobs_plot)
    return parser


def _client(args: argparse.Namespace) -> Client:
    address = getattr(args, "address", None) or os.environ.get("SECANT_ADDRESS") or DEFAULT_ADDRESS
    token = getattr(args, "token", None)  # None: the Client reads SECANT_TOKEN
    tls: bool | TLSConfig | None = None  # None: the Client reads SECANT_TLS_*
    files = {
        name: getattr(args, name, None) for name in ("root_cert", "cert", "key", "server_name")
    }
    if any(files.values()):
        tls = tls_from_env(None)
        base = tls if isinstance(tls, TLSConfig) else TLSConfig()
        tls = TLSConfig(
            root_certificates=files["root_cert"] or base.root_certificates,
            certificate_chain=files["cert"] or base.certificate_chain,
            private_key=files["key"] or base.private_key,
            server_name=files["server_name"] or base.server_name,
        )
    elif getattr(args, "tls", False):
        tls = tls_from_env(None) or True
    return Client(address, token=token, tls=tls)


# -- solve ---------------------------------------------------------------------------------


def _solve(client: Client, args: argparse.Namespace) -> int:
    from secant._spec import SpecError, load_spec

    if args.batch is not None:
        return _solve_batch(client, args)
    if args.member_data or args.out or args.chunk_size:
        print("error: --member-data, --out and --chunk-size go with --batch", file=sys.stderr)
        return EXIT_USAGE
    try:
        kwargs = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.detach:
        job = client.submit(**kwargs)
        print(job.id)
        return EXIT_OK
    show_progress = not (args.quiet or args.json) and sys.stderr.isatty()
    result = client.minimize(**kwargs, progress=show_progress, timeout=args.timeout)
    if not show_progress and not (args.quiet or args.json):
        _print_history_summary(result.history)
    print(_result_json(result) if args.json else _result_text(result))
    return EXIT_OK if result.success else EXIT_NOT_CONVERGED


def _solve_batch(client: Client, args: argparse.Namespace) -> int:
    from secant._spec import SpecError, load_spec

    def usage(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        kwargs = load_spec(args.spec, require_x0=False)
    except SpecError as exc:
        return usage(f"{args.spec}: {exc}")
    for key, why in (("x0", f"x0 comes from {args.batch} (its 'x0' array)"),
                     ("report_x_every", "batch jobs report counts, not x")):  # fmt: skip
        if key in kwargs:
            return usage(f"{args.spec}: remove {key!r} from the spec with --batch: {why}")
    try:
        arrays = load_batch_arrays(args.batch)
    except ValueError as exc:
        return usage(str(exc))
    if "x0" not in arrays:
        return usage(
            f"{args.batch} has no 'x0' array (the B x n starts); it has {sorted(arrays) or 'none'}"
        )
    x0 = arrays.pop("x0")
    missing = [name for name in args.member_data if name not in arrays]
    if missing:
        return usage(
            f"--member-data {', '.join(missing)}: not in {args.batch} (it has {sorted(arrays)})"
        )
    member = {name: arrays.pop(name) for name in args.member_data}
    batch_kwargs = dict(
        data=arrays or None, member_data=member or None, chunk_size=args.chunk_size, **kwargs
    )
    objective = batch_kwargs.pop("objective")
    if args.detach:
        job = client.submit_batch_problem(objective, x0, **batch_kwargs)
        print(job.id)
        return EXIT_OK
    show_progress = not (args.quiet or args.json) and sys.stderr.isatty()
    result = client.minimize_batch(
        objective, x0, progress=show_progress, timeout=args.timeout, **batch_kwargs
    )
    if args.out:
        save_batch_result(args.out, result)
    print(_batch_json(result, args.out) if args.json else result.summary())
    if args.out and not args.json:
        print(f"  wrote {args.out} (x, fun, status, nit, nfev, success)")
    return EXIT_OK if result.all_converged else EXIT_NOT_CONVERGED


def load_batch_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive by name (never unpickled); ValueError names the problem."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--batch {path}: cannot read it as an .npz archive ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"--batch {path}: expected an .npz archive (np.savez(path, x0=X0, ...)), "
            "got a single array"
        )
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def save_batch_result(path: str, result: BatchSolveResult) -> None:
    """Writes the per-member arrays (x, fun, status, nit, nfev, success) to an .npz."""
    np.savez(
        path, x=result.x, fun=result.fun, status=result.status, nit=result.nit,
        nfev=result.nfev, success=result.success,
    )  # fmt: skip


def _batch_json(result: BatchSolveResult, out: str | None) -> str:
    finite = result.fun[np.isfinite(result.fun)]
    summary = {
        "job_id": result.job_id,
        "members": len(result),
        "converged": result.converged,
        "status_counts": result.status_counts(),
        "median_nit": float(np.median(result.nit)) if len(result) else 0.0,
        "best_fun": float(finite.min()) if finite.size else None,
        "wall_time_s": result.wall_time_s,
        "solve_time_s": result.solve_time_s,
        "message": result.message,
        "out": out,
    }
    return json.dumps(summary, indent=2)


def _train(client: Client, args: argparse.Namespace) -> int:
    if args.plan:
        plan = client.plan(spec=args.spec, workers=args.workers, budget=args.budget,
                           timeout=args.timeout)
        print(plan.table)
        return EXIT_OK
    show_progress = not args.quiet and sys.stderr.isatty()
    run = client.train(args.spec, progress=show_progress, timeout=args.timeout)
    if args.output:
        with open(args.output, "wb") as fh:
            fh.write(run.weights())
    summary = {"job_id": run.job_id, "steps": run.steps, "metrics": run.metrics,
               "stopped_early": run.stopped_early, "restarts": run.restarts,
               "weights": args.output}
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _print_history_summary(history: list[IterateRecord]) -> None:
    # Not a terminal (CI logs, pipes): a few lines instead of a redrawn bar.
    step = max(1, len(history) // 10)
    for record in history[::step]:
        print(f"iter {record.nit:6d}  f {record.f: .10e}  |g| {record.grad_norm:.3e}")


def _result_text(result: OptimizeResult) -> str:
    return repr(result)


def _result_json(result: OptimizeResult) -> str:
    plain = {k: _jsonable(v) for k, v in result.items() if k != "history"}
    plain["history_length"] = len(result.get("history", []))
    return json.dumps(plain, indent=2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- jobs ----------------------------------------------------------------------------------


def _jobs_list(client: Client, args: argparse.Namespace) -> int:
    rows = [("JOB", "STATE", "METHOD", "N", "BATCH", "CREATED", "FUN")]
    for count, job in enumerate(client.jobs(args.state, args.method, args.batch_id), start=1):
        info = job.info
        fun = f"{info.result.fun:.6g}" if info.HasField("result") else "-"
        rows.append(
            (
                info.job_id,
                str(JobState.parse(info.state)),
                info.method,
                str(info.n),
                info.batch_id or "-",
                _timestamp(info, "created"),
                fun,
            )
        )
        if args.limit and count >= args.limit:
            break
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _jobs_show(client: Client, args: argparse.Namespace) -> int:
    info = client.get_job(args.job_id).info
    if args.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(info))
        return EXIT_OK
    fields = [
        ("job", info.job_id),
        ("state", str(JobState.parse(info.state))),
        ("kind", info.kind or "solve"),
        ("method", info.method),
        ("n", str(info.n)),
        ("batch", info.batch_id or "-"),
        ("created", _timestamp(info, "created")),
        ("started", _timestamp(info, "started")),
        ("finished", _timestamp(info, "finished")),
        ("events", str(info.last_seq)),
    ]
    fields += [(f"label {k}", v) for k, v in sorted(info.labels.items())]
    for name, value in fields:
        print(f"{name:>10}: {value}")
    if info.HasField("result") and info.result.HasField("batch"):
        print(BatchSolveResult.from_proto(info.result, job_id=info.job_id).summary())
    elif info.HasField("result"):
        print(repr(OptimizeResult.from_proto(info.result, job_id=info.job_id)))
    if info.HasField("failure"):
        print(f"   failure: {info.failure.code}: {info.failure.message}")
    return EXIT_OK


def _jobs_watch(client: Client, args: argparse.Namespace) -> int:
    for event in client.watch(args.job_id, after_seq=args.after_seq):
        print(format_event(event), flush=True)
    return EXIT_OK


def _jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    for job_id in args.job_ids:
        job = client.cancel(job_id)
        print(f"{job.id}  {job.state}")
    return EXIT_OK


def _jobs_plot(client: Client, args: argparse.Namespace) -> int:
    # Replays every stored event (Watch after_seq=0): the same history a live caller saw.
    job = client.get_job(args.job_id)
    history: list[IterateRecord] = []
    for event in job.events(after_seq=0):
        if event.WhichOneof("kind") == "iterate":
            history.append(IterateRecord.from_proto(event.iterate))
    if not history:
        print(f"error: job {args.job_id} has no iterate events to plot", file=sys.stderr)
        return EXIT_ERROR
    plot_history(history, path=args.output, title=f"job {args.job_id} ({job.info.method})")
    print(f"wrote {args.output} ({len(history)} iterations)")
    return EXIT_OK


def format_event(event: pb.JobEvent) -> str:
    """One line per event, for ``jobs watch`` and logs."""
    kind = event.WhichOneof("kind")
    head = f"{event.seq:6d} {kind or 'event':<12}"
    if kind == "accepted":
        a = event.accepted
        members = f" members={a.members}" if a.members else ""
        return f"{head} state={JobState.parse(a.state)} method={a.method} n={a.n}{members}"
    if kind == "iterate":
        it = event.iterate
        text = (
            f"{head} iter={it.iteration} f={it.f:.10e} gnorm={it.grad_norm:.3e} "
            f"step={it.step_size:.3g} nfev={it.nfev} t={it.elapsed_s:.3f}s"
        )
        if it.HasField("batch"):
            b = it.batch
            text += f" active={b.active} converged={b.converged} failed={b.failed}/{b.size}"
        if not is_empty(it.x):
            text += f" x={np.array2string(from_tensor(it.x), threshold=6, precision=4)}"
        return text
    if kind == "result":
        r = event.result
        if r.HasField("batch"):
            size = r.batch.fun.shape[0] if r.batch.fun.shape else 0
            return f"{head} converged={r.batch.converged}/{size} best fun={r.fun:.10e}"
        return f"{head} success={r.success} fun={r.fun:.10e} nit={r.nit} message={r.message!r}"
    if kind == "failure":
        return f"{head} {event.failure.code}: {event.failure.message}"
    if kind == "state_change":
        change = event.state_change
        return f"{head} state={JobState.parse(change.state)} {change.reason}".rstrip()
    if kind == "metrics":
        values = " ".join(f"{k}={v:.4g}" for k, v in sorted(event.metrics.values.items()))
        return f"{head} step={event.metrics.step} {values}"
    return head


def _timestamp(info: pb.Job, field: str) -> str:
    if not info.HasField(field):
        return "-"
    return getattr(info, field).ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    main_entry()
