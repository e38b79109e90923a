"""Prometheus metrics (prefix `secant_`), one registry per gateway so that several gateways in
one process (tests) do not collide, served on 127.0.0.1:--metrics-port."""

from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
_ITERATION_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000)
_BATCH_SIZE_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "secant_rpc_requests", "RPCs handled, by method and status code",
            ["method", "code"], registry=r,
        )
        self.rpc_latency = Histogram(
            "secant_rpc_latency_seconds", "RPC latency (whole stream for streaming RPCs)",
            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.jobs_submitted = Counter(
            "secant_jobs_submitted", "Jobs accepted, by method", ["method"], registry=r
        )
        self.jobs = Counter(
            "secant_jobs", "Jobs entering each state (queued, running, waiting_for_client, "
            "succeeded, failed, cancelled), by method", ["state", "method"], registry=r,
        )
        self.jobs_finished = Counter(
            "secant_jobs_finished", "Jobs ended, by final state and method",
            ["state", "method"], registry=r,
        )
        self.solve_duration = Histogram(
            "secant_solve_duration_seconds", "Time inside the solver loop, on the worker",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.job_wall_time = Histogram(
            "secant_job_wall_time_seconds", "Submit to result, as the gateway saw it",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.iterations = Histogram(
            "secant_solve_iterations", "Iterations per finished solve", ["method"],
            buckets=_ITERATION_BUCKETS, registry=r,
        )
        self.evaluations = Counter(
            "secant_evaluations", "Objective evaluations, by method and kind (f, grad, hess)",
            ["method", "kind"], registry=r,
        )
        self.batch_members = Counter(
            "secant_batch_members", "Members of finished batch jobs, by method and final"
            " member status (converged, non_finite, max_iterations, cancelled_by_user, ...)",
            ["method", "status"], registry=r,
        )
        self.batch_size = Histogram(
            "secant_batch_size", "Members per finished batch job", ["method"],
            buckets=_BATCH_SIZE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "secant_queue_depth", "Jobs waiting for a worker", registry=r
        )
        self.running_jobs = Gauge("secant_running_jobs", "Jobs on a worker now", registry=r)
        self.train_steps = Counter(
            "secant_train_steps", "Training steps completed, by optimizer", ["method"],
            registry=r,
        )
        self.train_step_time = Histogram(
            "secant_train_step_seconds", "Training step time (global batch)", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.train_memory = Gauge(
            "secant_train_memory_bytes", "Bytes a training worker held after its first step "
            "(latest job), by ZeRO stage, kind (param, grad, optimizer) and rank",
            ["stage", "kind", "rank"], registry=r,
        )
        self.train_memory_formula = Gauge(
            "secant_train_memory_formula_bytes", "The ZeRO paper's per-worker bytes for the "
            "latest training job's stage", ["stage"], registry=r,
        )
        self.callback_roundtrip = Histogram(
            "secant_callback_roundtrip_seconds",
            "Callback jobs: evaluation request sent to the caller's answer received",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1, 10, 60),
            registry=r,
        )
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and status code, with its latency."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self._metrics

        def record(context, started, outcome: grpc.StatusCode) -> None:
            # An abort set the code on the context; otherwise the outcome we saw stands.
            code = context.code() or outcome
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.rpcs.labels(method, name).inc()
            metrics.rpc_latency.labels(method, name).observe(time.perf_counter() - started)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                started, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    response = await inner(request, context)
                    outcome = grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    outcome = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    record(context, started, outcome)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        def counted_stream(inner):
            # Server-streaming and bidi handlers alike: the first argument is passed through.
            async def streamed(request_or_iterator, context):
                started, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    async for item in inner(request_or_iterator, context):
                        yield item
                    outcome = grpc.StatusCode.OK
                except (asyncio.CancelledError, GeneratorExit):  # the caller went away
                    outcome = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    record(context, started, outcome)

            return streamed

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                counted_stream(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                counted_stream(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer,
            )
        return handler
