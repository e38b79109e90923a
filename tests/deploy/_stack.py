"""The docker-compose topology run as plain processes on 127.0.0.1: a Ray head (`ray start
--head`), with SECANT_DEPLOY_TWO_NODES=1 a second Ray node (`ray start --address`), the gateway
started with the exact command docker-compose.yml gives it, and optionally Debian's Prometheus
with deploy/prometheus.yml.

Why the second node is opt-in: Ray 2.60 keeps every socket on 127.0.0.1 only in single-node
mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); a node that joins with `ray start --address` makes
the GCS, raylets, agents and workers listen on every interface, which a shared machine must
not do. In the containers each node has its own network namespace.

Only addresses, ports, paths and CPU counts are substituted (container names -> 127.0.0.1, fixed
ports -> free ports, /var/lib/secant -> a temp dir); every process runs in its own session so
that stop() ends it and everything it started, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
SECRET_PATH = "/run/secrets/ray_auth_token"


TWO_NODES = os.environ.get("SECANT_DEPLOY_TWO_NODES") == "1"
NODES = 2 if TWO_NODES else 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready in {timeout:.0f} s (last error: {last_exc!r})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _set_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """Sets --flag=value (or the two-word form) in argv, appending it if absent; value None
    drops the flag."""
    out, i, found = [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == flag or arg.startswith(flag + "="):
            found = True
            if arg == flag and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
            if value is not None:
                out.append(f"{flag}={value}")
        else:
            out.append(arg)
        i += 1
    if not found and value is not None:
        out.append(f"{flag}={value}")
    return out


def session_pids(sids: set[int]) -> set[int]:
    """Every live process whose session is one of ours."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is the state; session id is field 6 of stat, i.e. index 3 after the comm.
        if fields[0] != "Z" and int(fields[3]) in sids:
            pids.add(int(entry.name))
    return pids


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace")[:160]


def listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listener owned by one of pids, from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local = parts[3]
        for pid in re.findall(r"pid=(\d+)", line):
            if int(pid) in pids:
                found.append((local, int(pid)))
    return found


@dataclass
class Stack:
    tmp: Path
    env: dict
    join_env: dict = field(default_factory=dict)
    gcs_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    prometheus_port: int = 0
    head_metrics_port: int = 0
    worker_metrics_port: int = 0
    gateway_argv: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def sids(self) -> set[int]:
        return {p.pid for p in self.procs.values()}

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv, env=self.env if env is None else env, cwd=self.tmp, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    # --- Ray ------------------------------------------------------------------------------
    def _ray_node_argv(self, service: dict, *, head: bool) -> list[str]:
        argv = _command(service)
        assert argv[:2] == ["ray", "start"], argv
        argv[0] = str(BIN / "ray")
        if head:
            argv = _set_flag(argv, "--port", str(self.gcs_port))
            argv = _set_flag(argv, "--ray-client-server-port", str(free_port()))
            argv = _set_flag(argv, "--dashboard-port", str(free_port()))
            argv = _set_flag(argv, "--dashboard-host", None)  # no dashboard in the test venv
            argv = _set_flag(argv, "--include-dashboard", "false")
            argv = _set_flag(argv, "--temp-dir", str(self.tmp / "ray"))
            argv = _set_flag(argv, "--metrics-export-port", str(self.head_metrics_port))
        else:
            address = dict(a.split("=", 1) for a in argv if a.startswith("--address="))
            assert address["--address"] == "ray-head:6379", argv
            argv = _set_flag(argv, "--address", f"{LOOPBACK}:{self.gcs_port}")
            argv = _set_flag(argv, "--metrics-export-port", str(self.worker_metrics_port))
        # The compose head schedules only (--num-cpus=0); here each node gives one CPU so the
        # gateway's pool (one solver per cluster CPU) spans both nodes.
        argv = _set_flag(argv, "--num-cpus", "1")
        argv = _set_flag(argv, "--node-ip-address", LOOPBACK)
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port"):
            argv = _set_flag(argv, flag, str(free_port()))
        assert "--block" in argv, "compose runs Ray nodes in the foreground (--block)"
        return argv

    def start_ray(self, timeout: float = 60.0) -> None:
        services = compose()["services"]
        self.gcs_port = free_port()
        self.head_metrics_port, self.worker_metrics_port = free_port(), free_port()
        self._spawn("ray-head", self._ray_node_argv(services["ray-head"], head=True))
        wait_for(lambda: self._check_alive("ray-head") or port_open(self.gcs_port),
                 timeout, "Ray head GCS port")
        if not TWO_NODES:
            return
        self._spawn("ray-worker", self._ray_node_argv(services["ray-worker"], head=False),
                    env=self.join_env)
        probe = (
            "import ray, sys, time\n"
            f"ray.init(address='{LOOPBACK}:{self.gcs_port}', logging_level='ERROR',"
            " log_to_driver=False)\n"
            "deadline = time.monotonic() + 45\n"
            "while time.monotonic() < deadline:\n"
            "    if len([n for n in ray.nodes() if n['Alive']]) >= 2: break\n"
            "    time.sleep(0.2)\n"
            "print(len([n for n in ray.nodes() if n['Alive']]))\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True,
                             text=True, timeout=timeout, cwd=self.tmp)
        self._check_alive("ray-worker")
        assert out.stdout.strip().endswith("2"), (out.stdout, out.stderr[-2000:])

    def ray_state(self) -> dict:
        """Alive nodes and total / available CPUs of the test cluster (a separate driver)."""
        probe = (
            "import json, ray\n"
            f"ray.init(address='{LOOPBACK}:{self.gcs_port}', logging_level='ERROR',"
            " log_to_driver=False)\n"
            "print(json.dumps({'nodes': len([n for n in ray.nodes() if n['Alive']]),"
            " 'cpu_total': ray.cluster_resources().get('CPU', 0),"
            " 'cpu_available': ray.available_resources().get('CPU', 0)}))\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True,
                             text=True, timeout=60, cwd=self.tmp)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # --- gateway --------------------------------------------------------------------------
    def gateway_command(self) -> list[str]:
        """docker-compose.yml's gateway command with only its addresses, ports and paths
        substituted; asserts nothing else had to change."""
        argv = _command(compose()["services"]["gateway"])
        substitutions = {
            "--host": ("0.0.0.0", LOOPBACK),
            "--port": ("50051", str(self.grpc_port)),
            "--metrics-port": ("9464", str(self.metrics_port)),
            "--db": ("/var/lib/secant/secant.db", str(self.tmp / "secant.db")),
            "--ray-address": ("ray-head:6379", f"{LOOPBACK}:{self.gcs_port}"),
        }
        out, i = [], 0
        while i < len(argv):
            arg = argv[i]
            flag, _, inline = arg.partition("=")
            if flag in substitutions:
                value = inline if inline else argv[i + 1]
                expected, replacement = substitutions.pop(flag)
                assert value == expected, f"compose gateway {flag} {value!r}: expected {expected!r}"
                out += [flag, replacement]
                i += 1 if inline else 2
                continue
            out.append(arg)
            i += 1
        assert not substitutions, f"compose gateway command lacks {sorted(substitutions)}"
        assert out[:2] == ["secant", "serve"], out
        out[0] = str(BIN / "secant")
        return out

    def start_gateway(self, timeout: float = 120.0) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.gateway_argv = self.gateway_command()
        self._spawn("gateway", self.gateway_argv)
        # The image's HEALTHCHECK: `secant health` (service.health_cli), exit 0 once SERVING.
        health = [sys.executable, "-m", "service.health_cli", "--address", self.address,
                  "--timeout", "2", "--quiet"]

        def serving() -> bool:
            self._check_alive("gateway")
            return subprocess.run(health, env=self.env, cwd=ROOT, timeout=30).returncode == 0

        wait_for(serving, timeout, "gateway health SERVING", interval=1.0)

    # --- Prometheus -----------------------------------------------------------------------
    def prometheus_config(self) -> dict:
        """deploy/prometheus.yml pointed at this test's ports, scraping every second."""
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"]["scrape_interval"] = "1s"
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        gateway = jobs["secant-gateway"]
        assert gateway["static_configs"][0]["targets"] == ["127.0.0.1:9464"], gateway
        gateway["static_configs"][0]["targets"] = [f"{LOOPBACK}:{self.metrics_port}"]
        gateway["scrape_interval"] = "1s"
        ray_job = jobs["ray"]
        assert ray_job["static_configs"][0]["targets"] == ["ray-head:8080"], ray_job
        ray_job["static_configs"][0]["targets"] = [f"{LOOPBACK}:{self.head_metrics_port}"]
        ray_job.pop("dns_sd_configs", None)  # compose DNS names: the worker is static here
        ray_job["static_configs"].append({"targets": [f"{LOOPBACK}:{self.worker_metrics_port}"]})
        return config

    def start_prometheus(self, binary: str, timeout: float = 30.0) -> None:
        self.prometheus_port = free_port()
        config_path = self.tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.prometheus_config()))
        self._spawn("prometheus", [
            binary, f"--config.file={config_path}",
            f"--storage.tsdb.path={self.tmp / 'prometheus-data'}",
            f"--web.listen-address={LOOPBACK}:{self.prometheus_port}",
            "--log.level=warn",
        ])

        def ready() -> bool:
            self._check_alive("prometheus")
            with urllib.request.urlopen(self.prometheus_url("/-/ready"), timeout=2) as r:
                return r.status == 200

        wait_for(ready, timeout, "Prometheus /-/ready", interval=0.3)

    def prometheus_url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}{path}"

    def promql(self, query: str) -> list[dict]:
        url = self.prometheus_url("/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    # --- teardown -------------------------------------------------------------------------
    def stop(self) -> set[int]:
        """Ends every process of ours (gateway first, Ray last); returns any survivors."""
        sids = self.sids
        order = ["prometheus", "gateway", "ray-worker", "ray-head"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Stragglers of our sessions (Ray workers re-parented away) get SIGKILL by pid.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = session_pids(sids)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        return session_pids(sids)


def make_stack() -> Stack:
    tmp = Path(tempfile.mkdtemp(prefix="sdt-", dir="/tmp"))  # Ray's socket paths stay short
    token_file = tmp / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({str(k): str(v) for k, v in compose()["services"]["gateway"]["environment"].items()})
    # The compose secret lands at /run/secrets/ray_auth_token; here it is a file in tmp.
    assert env.get("RAY_AUTH_TOKEN_PATH") == SECRET_PATH, env.get("RAY_AUTH_TOKEN_PATH")
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # Not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (service/ray_env.py's loopback trick for an
    # embedded single-node head): with it `ray start --address` refuses to join ("Multi-node
    # Ray clusters are not supported"), and a joining node without it resolves the head's
    # 127.0.0.1 to the machine's external address. Loopback comes from --node-ip-address.
    if not TWO_NODES:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single node: loopback only
    join_env = dict(env)
    env["PYTHONPATH"] = str(ROOT)  # service.health_cli from this tree
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return Stack(tmp=tmp, env=env, join_env=join_env)


def cleanup(stack: Stack) -> set[int]:
    try:
        return stack.stop()
    finally:
        shutil.rmtree(stack.tmp, ignore_errors=True)


_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "vector", "le", "bool", "topk", "bottomk", "quantile", "stddev", "abs", "clamp_min",
    "clamp_max", "delta", "deriv", "label_replace", "time", "scalar", "sort", "sort_desc",
}


def dashboard_metrics(dashboard: dict) -> set[str]:
    """Metric names in every PromQL expression of a Grafana dashboard: identifiers that are
    not PromQL words, not inside {...} label matchers, [...] ranges, (by|without) (...) label
    lists, or quoted strings, and not Grafana variables ($__rate_interval)."""
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        text = re.sub(r'"[^"]*"', "", expr)
        text = re.sub(r"\{[^}]*\}", "", text)
        text = re.sub(r"\[[^\]]*\]", "", text)
        text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
        text = re.sub(r"\$\w+", "", text)
        for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
            if name not in _PROMQL_WORDS:
                names.add(name)
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return exprs
