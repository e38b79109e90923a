"""The secant gateway: grpc.aio servicer, validation, job manager, job store, Ray scheduler,
metrics and the `secant serve` command."""
