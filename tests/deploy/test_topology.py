"""The docker-compose topology as processes on 127.0.0.1 (no Docker engine here): a Ray head and a
second Ray node from the compose commands, the gateway with the exact compose command
(`--ray-address`), a solve through the SDK that runs on that cluster, Debian's Prometheus with
deploy/prometheus.yml answering PromQL about the gateway, the Grafana dashboard's metrics against
the live /metrics, nothing listening beyond loopback, and nothing left running at the end."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import _stack
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/secant.json"


@pytest.fixture(scope="module")
def stack():
    stack = _stack.make_stack()
    survivors: set[int] = set()
    try:
        stack.start_ray()
        stack.start_gateway()
        binary = shutil.which("prometheus")
        if binary:
            stack.start_prometheus(binary)
        yield stack
    except BaseException:
        for name in stack.procs:
            print(f"--- {name} log ---\n{stack.log(name)}")
        raise
    finally:
        survivors = _stack.cleanup(stack)
    assert not survivors, f"processes left running after stop: {sorted(survivors)}"


@pytest.fixture(scope="module")
def solved(stack):
    import secant

    with secant.Client(stack.address) as client:
        result = client.minimize("sum(x**2)", [1.0, 2.0])
    return result


def test_gateway_runs_the_compose_command(stack):
    argv = stack.gateway_argv
    assert argv[1] == "serve"
    assert argv[argv.index("--ray-address") + 1] == f"127.0.0.1:{stack.gcs_port}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_solve_through_the_sdk_runs_on_the_cluster(stack, solved):
    assert solved.success, solved.message
    assert abs(solved.fun) < 1e-10
    assert max(abs(v) for v in solved.x) < 1e-5
    state = stack.ray_state()
    # Two Ray nodes (ray start --head, ray start --address), one CPU each; the gateway's warm
    # pool (one solver actor per cluster CPU) holds both, so the cluster's solvers span nodes.
    assert state["nodes"] == _stack.NODES, state
    assert state["cpu_total"] == _stack.NODES, state
    assert state["cpu_available"] == 0, state


def test_prometheus_scrapes_the_gateway(stack, solved):
    if "prometheus" not in stack.procs:
        pytest.skip("Debian's prometheus is not installed (deploy/check.sh installs it)")
    query = 'sum(secant_jobs_total{job="secant-gateway", state="queued"})'

    def submitted() -> float:
        result = stack.promql(query)
        return result and float(result[0]["value"][1]) >= 1

    _stack.wait_for(submitted, 30, f"PromQL {query} >= 1", interval=0.5)
    up = stack.promql('up{job="secant-gateway"}')
    assert [float(r["value"][1]) for r in up] == [1.0], up
    finished = stack.promql('sum by (state) (secant_jobs_finished_total{job="secant-gateway"})')
    assert any(r["metric"].get("state") for r in finished), finished


def test_dashboard_metrics_exist_on_the_live_gateway(stack, solved):
    time.sleep(0.2)
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        exposition = response.read().decode()
    samples = {line.split("{")[0].split(" ")[0]
               for line in exposition.splitlines() if line and not line.startswith("#")}
    secant_metrics = {m for m in _stack.dashboard_metrics(json.loads(DASHBOARD.read_text()))
                      if m.startswith("secant_")}
    assert secant_metrics, "the dashboard queries no secant_ metric"
    missing = sorted(secant_metrics - samples)
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"


def test_nothing_listens_beyond_loopback(stack, solved):
    pids = _stack.session_pids(stack.sids)
    listeners = _stack.listening_sockets(pids)
    assert listeners, "found none of the stack's listening sockets"
    ports = {int(local.rsplit(":", 1)[1]) for local, _pid in listeners}
    assert {stack.gcs_port, stack.grpc_port, stack.metrics_port} <= ports, (ports, listeners)
    # What secant itself opens (gRPC, /metrics) and Prometheus: loopback only, always.
    ours = {stack.grpc_port, stack.metrics_port, stack.prometheus_port}
    for local, pid in listeners:
        if int(local.rsplit(":", 1)[1]) in ours:
            assert _loopback(local), (local, _stack.cmdline(pid))
    wide = [(local, pid, _stack.cmdline(pid)) for local, pid in listeners if not _loopback(local)]
    # Every other listener is Ray's: its nodes' processes, and the Ray core worker inside
    # the gateway process (the gateway is a Ray driver).
    if wide and _stack.TWO_NODES:
        # Ray 2.60, multi-node: `ray start --node-ip-address=127.0.0.1` still lets the GCS,
        # raylets, agents and workers bind every interface; only an embedded single-node head
        # with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stays on loopback, and that setting makes
        # `ray start --address` refuse to join. In the containers each node has its own
        # network namespace; on a shared host, firewall Ray's ports. See deploy/README.md.
        pytest.xfail(f"Ray's own processes listen beyond 127.0.0.1 ({len(wide)} sockets)")
    assert not wide, f"listening beyond 127.0.0.1: {wide}"


def _loopback(local: str) -> bool:
    return local.startswith("127.0.0.1:") or local.startswith("[::ffff:127.0.0.1]:")

