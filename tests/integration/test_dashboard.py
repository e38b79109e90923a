"""The web dashboard end to end: real gateways on the session Ray, jobs submitted through the
SDK, pages driven in headless Chromium (Debian's chromium through Playwright's Python package).

Screenshots go to $SECANT_DASHBOARD_SCREENSHOTS (docs/img to refresh the committed ones), else
to a temporary directory.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

import secant
from service.auth import add_token
from service.server import GatewayConfig, check_config

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("SECANT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 15_000
ROSENBROCK = "sum(100 * (x[1:] - x[:-1]**2)**2 + (1 - x[:-1])**2)"
# Gradient descent on a quadratic of condition number 1e4: thousands of iterates a second,
# f falling steadily over many decades, for up to 30 s.
LONG_SOLVE = dict(objective="sum(d * x**2)", x0=np.ones(2000), method="gd",
                  data={"d": np.geomspace(1.0, 1e4, 2000)},
                  options={"max_iter": 10_000_000, "gtol": 1e-15, "time_limit": 30})
TRAIN_SPEC = {
    "model": {"kind": "mlp", "sizes": [64, 32, 10], "activation": "tanh"},
    "loss": "cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.01},
    "batch_size": 64,
    "steps": 20,
    "seed": 3,
    "validation_fraction": 0.2,
    "dataset": "digits",
    "workers": 1,
    "scaling": {"zero_stage": 1},  # a scaled run: its worker reports what it holds
}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` installs Debian's package")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page's script raised: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("SECANT_DASHBOARD_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("dashboard-shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def dash(gateway_factory):
    """A gateway without auth and with its dashboard on a free loopback port."""
    server = gateway_factory(dashboard_port=0, workers=2, cancel_grace_s=0.5)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dash_url(dash) -> str:
    return dash.gateway.dashboard_url.rstrip("/")


@pytest.fixture(scope="module")
def client(dash):
    with secant.Client(dash.address) as client:
        yield client


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tokens file of this module's own (a test edits it): (path, {caller: token})."""
    path = tmp_path_factory.mktemp("dashboard-auth") / "tokens.yaml"
    roles = {"alice": ["solve"], "bob": ["solve"], "root": ["admin"], "eve": ["solve"]}
    return path, {name: add_token(path, name, r) for name, r in roles.items()}


@pytest.fixture(scope="module")
def auth_dash(gateway_factory, tokens_file):
    server = gateway_factory(tokens=str(tokens_file[0]), dashboard_port=0, workers=1,
                             cancel_grace_s=0.5)
    try:
        yield server
    finally:
        server.stop()


def send(url: str, method: str = "GET", body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict, str]:
    """(status, headers, text) of one request, without following redirects."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        data = urllib.parse.urlencode(body).encode() if body is not None else None
        send = {"content-type": "application/x-www-form-urlencoded"} if data else {}
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                           body=data, headers={**send, **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


# -- the table, a training job, a live solve and its cancel ----------------------------------


def test_jobs_table_lists_a_solve_and_a_training_job_and_filters_them(
    client, dash_url, page, shots
):
    solved = client.minimize(ROSENBROCK, [-1.2, 1.0], method="bfgs", timeout=60)
    trained = client.train(TRAIN_SPEC, timeout=120)

    page.goto(f"{dash_url}/jobs")

    solve_row = page.locator(f'tr[data-job="{solved.job_id}"]')
    train_row = page.locator(f'tr[data-job="{trained.job_id}"]')
    assert solve_row.locator(".state").inner_text() == "succeeded"
    assert train_row.locator(".state").inner_text() == "succeeded"
    assert "train:adam" in train_row.inner_text()
    page.goto(f"{dash_url}/jobs?method=train:adam")
    assert page.locator(f'tr[data-job="{trained.job_id}"]').count() == 1
    assert page.locator(f'tr[data-job="{solved.job_id}"]').count() == 0
    page.goto(f"{dash_url}/jobs?state=failed&method=bfgs")
    assert page.locator(f'tr[data-job="{solved.job_id}"]').count() == 0
    page.goto(f"{dash_url}/jobs?sort=method")
    methods = page.locator("#job-rows tr td:nth-child(3)").all_inner_texts()
    assert methods == sorted(methods)

    page.goto(f"{dash_url}/jobs/{trained.job_id}")
    page.wait_for_function(
        "n => +document.querySelector('#chart-loss').dataset.points >= n",
        arg=TRAIN_SPEC["steps"])
    memory = page.locator("#memory").inner_text()
    assert "formula (ZeRO 1)" in memory and "KiB" in memory
    assert page.locator("#train-result").inner_text().count("val_accuracy") == 1
    assert '"zero_stage": 1' in page.locator("#problem").inner_text()
    page.screenshot(path=str(shots / "dashboard-training.png"), full_page=True)


def test_a_running_solve_plots_live_and_is_cancelled_from_its_page(client, dash_url, browser,
                                                                    page, shots):
    job = client.submit(**LONG_SOLVE)
    table = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
    try:
        table.set_default_timeout(PAGE_TIMEOUT_MS)
        table.goto(f"{dash_url}/jobs")
        page.goto(f"{dash_url}/jobs/{job.id}")
        page.wait_for_function(
            "() => +document.querySelector('#chart-convergence').dataset.points > 0")
        first = points(page, "chart-convergence")
        page.wait_for_function(
            "n => +document.querySelector('#chart-convergence').dataset.points > n + 100",
            arg=first)
        assert page.locator("#job-state").inner_text() == "running"
        table.locator(f'tr[data-job="{job.id}"][data-state="running"]').wait_for()
        page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
        table.screenshot(path=str(shots / "dashboard-jobs.png"))

        page.click("#cancel")

        page.wait_for_function(
            "() => document.querySelector('#job-state').textContent === 'cancelled'")
        # the table, open all along, follows without a reload
        table.locator(f'tr[data-job="{job.id}"][data-state="cancelled"]').wait_for()
    finally:
        table.context.close()
        client.cancel(job.id)
    assert client.get_job(job.id).state == secant.JobState.CANCELLED
    assert page.locator("#cancel").count() == 0
    assert "CANCELLED_BY_USER" in page.locator("#result").inner_text()


def test_a_batch_job_page_shows_members_over_iterations_and_their_distributions(
    client, dash_url, page, shots
):
    rng = np.random.default_rng(7)
    X0 = rng.normal(scale=1.5, size=(48, 2))
    X0[:3] = np.nan  # non-finite starts: those members end NON_FINITE, the others carry on
    job = client.submit_batch_problem(ROSENBROCK, X0, method="bfgs", options={"max_iter": 25})
    result = job.result(timeout=60)

    page.goto(f"{dash_url}/jobs/{job.id}")

    statuses = page.locator("#batch-statuses").inner_text()
    assert "NON_FINITE" in statuses and "CONVERGED" in statuses
    assert f"{result.converged} of 48 converged" in page.locator("#batch-result").inner_text()
    bins = page.locator("#batch-nit tr td.num").all_inner_texts()
    assert sum(int(count) for count in bins) == 48
    page.wait_for_function("() => +document.querySelector('#chart-members').dataset.points > 0")
    assert page.locator("#job-kind").inner_text() == "batch"
    page.screenshot(path=str(shots / "dashboard-batch.png"), full_page=True)


# -- errors, and nothing mutates without a POST and the caller's rights ------------------------


def test_errors_are_pages_and_only_a_same_site_post_with_its_token_cancels(client, dash_url,
                                                                          page):
    response = page.goto(f"{dash_url}/jobs/0123456789abcdef")
    assert response.status == 404
    assert "Job not found" in page.inner_text("h1")
    assert page.goto(f"{dash_url}/no/such/page").status == 404
    response = page.goto(f"{dash_url}/jobs?state=sleeping")
    assert response.status == 400 and "state: unknown 'sleeping'" in page.inner_text("main")
    assert "Traceback" not in page.content()

    job = client.submit(**LONG_SOLVE)
    try:
        assert page.goto(f"{dash_url}/jobs/{job.id}/cancel").status == 405
        status, _, _ = send(f"{dash_url}/jobs/{job.id}/cancel", "POST", {"csrf": "forged"})
        assert status == 403
        page.goto(f"{dash_url}/jobs/{job.id}")
        csrf = page.get_attribute("#cancel-form input[name=csrf]", "value")
        status, _, _ = send(f"{dash_url}/jobs/{job.id}/cancel", "POST", {"csrf": csrf},
                            headers={"origin": "http://attacker.example"})
        assert status == 403
        port = urllib.parse.urlsplit(dash_url).port
        status, _, _ = send(f"{dash_url}/jobs", headers={"host": f"rebound.example:{port}"})
        assert status == 421  # a DNS-rebinding page cannot read the loopback dashboard
        assert client.get_job(job.id).state in (secant.JobState.QUEUED, secant.JobState.RUNNING)

        status, headers, _ = send(f"{dash_url}/jobs/{job.id}/cancel", "POST", {"csrf": csrf},
                                  headers={"origin": dash_url})
        assert status == 303 and headers["location"] == f"/jobs/{job.id}"
    finally:
        client.cancel(job.id)


def test_a_taken_default_port_leaves_the_gateway_serving_without_its_dashboard(make_gateway):
    with socket.socket() as holder:  # another gateway's dashboard, say
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]

        server = make_gateway(dashboard_port=taken, dashboard_best_effort=True)

        assert server.gateway.dashboard_url is None
        with secant.Client(server.address) as client:
            assert client.minimize("sum((x - 1)**2)", [0.0, 0.0], timeout=60).success


def test_the_dashboard_beyond_loopback_needs_tokens():
    config = GatewayConfig(dashboard_port=0, dashboard_host="0.0.0.0")
    with pytest.raises(ValueError, match="--dashboard-host 0.0.0.0.*needs auth"):
        check_config(config)


# -- login: a caller sees its own jobs, admin all ---------------------------------------------


def test_login_with_a_token_shows_only_the_callers_jobs_and_admin_sees_all(
    auth_dash, tokens_file, page, shots
):
    _, tokens = tokens_file
    url = auth_dash.gateway.dashboard_url.rstrip("/")
    with secant.Client(auth_dash.address, token=tokens["alice"]) as alice:
        mine = alice.minimize(ROSENBROCK, [-1.2, 1.0], timeout=60).job_id
    with secant.Client(auth_dash.address, token=tokens["bob"]) as bob:
        theirs = bob.minimize(ROSENBROCK, [1.5, 2.0], timeout=60).job_id

    page.goto(f"{url}/jobs")
    assert page.url.startswith(f"{url}/login")
    page.fill("input[name=token]", tokens["alice"] + "x")
    page.click("#login button[type=submit]")
    assert "not valid" in page.inner_text("#login-error")
    page.screenshot(path=str(shots / "dashboard-login.png"))
    page.fill("input[name=token]", tokens["alice"])
    page.click("#login button[type=submit]")

    page.wait_for_url(f"{url}/jobs")
    assert page.inner_text("#caller") == "alice"
    assert page.locator(f'tr[data-job="{mine}"]').count() == 1
    assert page.locator(f'tr[data-job="{theirs}"]').count() == 0
    assert page.goto(f"{url}/jobs/{theirs}").status == 404
    page.goto(f"{url}/jobs/{mine}")
    page.click("text=Log out")
    page.wait_for_url(f"{url}/login")

    page.fill("input[name=token]", tokens["root"])
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{url}/jobs")
    assert page.locator(f'tr[data-job="{mine}"]').count() == 1
    assert page.locator(f'tr[data-job="{theirs}"]').count() == 1
    page.goto(f"{url}/jobs?caller=bob")
    assert page.locator(f'tr[data-job="{mine}"]').count() == 0
    assert page.locator(f'tr[data-job="{theirs}"]').count() == 1

    # scripts: a bearer header instead of the form, and the same rights
    status, _, body = send(f"{url}/api/jobs", headers={"authorization": f"Bearer {tokens['bob']}"})
    assert status == 200 and [job["id"] for job in json.loads(body)["jobs"]] == [theirs]
    assert send(f"{url}/api/jobs")[0] == 401
    status, _, _ = send(f"{url}/jobs/{mine}/cancel", "POST", {},
                        headers={"authorization": f"Bearer {tokens['bob']}"})
    assert status == 404  # another caller's job does not exist for bob


def test_a_token_removed_from_the_tokens_file_ends_its_sessions(auth_dash, tokens_file, page):
    path, tokens = tokens_file
    url = auth_dash.gateway.dashboard_url.rstrip("/")
    page.goto(f"{url}/login")
    page.fill("input[name=token]", tokens["eve"])
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{url}/jobs")
    assert page.inner_text("#caller") == "eve"

    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if '"eve"' not in line))

    deadline = time.monotonic() + 10  # the tokens file is re-read at most once a second
    while time.monotonic() < deadline:
        page.goto(f"{url}/jobs")
        if page.url.startswith(f"{url}/login"):
            break
        time.sleep(0.3)
    assert page.url.startswith(f"{url}/login")
