"""`secant health`: asks a gateway's gRPC health service (grpc.health.v1) whether it is serving.

Exit 0 when the answer is SERVING, 1 for any other answer or when the gateway cannot be reached
in time, 2 for a usage error. Import-light on purpose (grpcio and grpcio-health-checking only: no
torch, no ray), because container health checks run it every few seconds.
"""

from __future__ import annotations

import argparse
import sys

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secant health",
        description="Check a secant gateway's gRPC health service; exit 0 when it is SERVING.",
    )
    parser.add_argument("--address", default="127.0.0.1:50051",
                        help="the gateway, host:port (default 127.0.0.1:50051)")
    parser.add_argument("--service", default="",
                        help="service name to ask about ('' is the whole server; "
                        "'secant.v1.Optimizer' the optimizer service)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for an answer (default 3)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    parser.add_argument("--root-cert", default=None,
                        help="TLS: CA bundle (PEM) to verify the gateway (plaintext without it)")
    parser.add_argument("--cert", default=None, help="mutual TLS: client certificate (PEM)")
    parser.add_argument("--key", default=None, help="mutual TLS: client private key (PEM)")
    parser.add_argument("--server-name", default=None,
                        help="TLS: name to check the gateway's certificate against")
    return parser


def _channel(address: str, root_cert=None, cert=None, key=None, server_name=None):
    import grpc

    if root_cert is None and cert is None:
        return grpc.insecure_channel(address)

    def read(path):
        with open(path, "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(root_cert) if root_cert else None,
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str = "", timeout: float = 3.0, **tls) -> str:
    """The health status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN) or, when the
    call itself failed, the gRPC status code name prefixed with 'UNREACHABLE: '."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address, **tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            return f"UNREACHABLE: {name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "health":  # tolerate being handed the subcommand name too
        argv = argv[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return int(exc.code or 0)
    status = check(args.address, args.service, args.timeout, root_cert=args.root_cert,
                   cert=args.cert, key=args.key, server_name=args.server_name)
    if not args.quiet:
        print(f"{args.address}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING


if __name__ == "__main__":
    sys.exit(main())
