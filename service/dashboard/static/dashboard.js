// secant dashboard: live jobs table and job pages (plots with the vendored uPlot).
// Everything arrives as server-sent events from the gateway; nothing is fetched elsewhere.
"use strict";

(function () {
  const REDRAW_MS = 150;

  // -- the jobs table: the server renders rows, the stream swaps them in ------------------
  function jobsTable() {
    const body = document.getElementById("job-rows");
    if (!body) return;
    const live = document.getElementById("live");
    const source = new EventSource("/jobs/stream" + window.location.search);
    source.addEventListener("rows", (e) => {
      body.innerHTML = JSON.parse(e.data).html;
      if (live) live.classList.add("on");
    });
    source.onerror = () => { if (live) live.classList.remove("on"); };
  }

  // -- plots --------------------------------------------------------------------------------
  // A chart over one x column and named y columns; log y axes fall back to linear as soon
  // as a value is not positive (log scales cannot show it).
  function Chart(el, opts) {
    this.el = el;
    this.opts = opts; // {x: label, series: [{label, scale, color}], scales: {name: {log}}}
    this.x = [];
    this.ys = opts.series.map(() => []);
    this.logOk = {};
    for (const name of Object.keys(opts.scales)) this.logOk[name] = !!opts.scales[name].log;
    this.plot = null;
    this.pending = false;
  }
  Chart.prototype.push = function (x, values) {
    this.x.push(x);
    values.forEach((v, i) => {
      const y = (v === null || v === undefined || !isFinite(v)) ? null : v;
      const scale = this.opts.series[i].scale;
      if (y !== null && y <= 0 && this.logOk[scale]) {
        this.logOk[scale] = false;
        this.destroy(); // rebuilt linear on the next draw
      }
      this.ys[i].push(y);
    });
  };
  Chart.prototype.destroy = function () {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
  };
  Chart.prototype.build = function () {
    const width = Math.max(320, this.el.clientWidth || 800);
    const height = this.el.classList.contains("small") ? 180 : 300;
    const scales = { x: { time: false } };
    // x counts iterations or steps: whole-number ticks only.
    const axes = [{ label: this.opts.x, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3,
      1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7] }];
    Object.keys(this.opts.scales).forEach((name, i) => {
      scales[name] = this.logOk[name] ? { distr: 3, log: 10 } : {};
      axes.push({ scale: name, label: this.opts.scales[name].label || "",
                  side: i === 0 ? 3 : 1, grid: { show: i === 0 },
                  size: 70, space: 30, values: (u, vals) => vals.map(fmt) });
    });
    const series = [{ label: this.opts.x }].concat(this.opts.series.map((s) => ({
      label: s.label, scale: s.scale, stroke: s.color, width: 1.5, spanGaps: true,
      value: (u, v) => (v === null || v === undefined ? "—" : fmt(v)),
    })));
    this.plot = new uPlot({ width, height, scales, axes, series, legend: { live: true } },
                          this.data(), this.el);
  };
  Chart.prototype.data = function () {
    // uPlot wants null (a gap) where a log scale cannot place a value.
    const ys = this.ys.map((col, i) => {
      const scale = this.opts.series[i].scale;
      return this.logOk[scale] ? col.map((v) => (v !== null && v > 0 ? v : null)) : col;
    });
    return [this.x].concat(ys);
  };
  Chart.prototype.draw = function () {
    if (this.pending) return;
    this.pending = true;
    setTimeout(() => {
      this.pending = false;
      if (!this.plot) this.build(); else this.plot.setData(this.data());
      this.el.dataset.points = String(this.x.length);
    }, REDRAW_MS);
  };

  function fmt(v) {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(Math.round(v * 1e4) / 1e4);
  }

  function chart(id, opts) {
    const el = document.getElementById(id);
    return el ? new Chart(el, opts) : null;
  }

  // -- the job page -------------------------------------------------------------------------
  function jobPage() {
    const cfgEl = document.getElementById("job-config");
    if (!cfgEl) return;
    const cfg = JSON.parse(cfgEl.textContent);
    const charts = [];
    let onIterate = null;
    let onMetrics = null;

    if (cfg.kind === "solve") {
      const c = chart("chart-convergence", {
        x: "iteration",
        series: [{ label: "f", scale: "f", color: "#1f6feb" },
                 { label: "‖grad‖∞", scale: "g", color: "#d1242f" }],
        scales: { f: { log: true, label: "f" }, g: { log: true, label: "‖grad‖∞" } },
      });
      charts.push(c);
      onIterate = (e) => c.push(e.it, [e.f, e.g]);
    } else if (cfg.kind === "batch") {
      const members = chart("chart-members", {
        x: "iteration",
        series: [{ label: "active", scale: "m", color: "#1f6feb" },
                 { label: "converged", scale: "m", color: "#1a7f37" },
                 { label: "failed", scale: "m", color: "#d1242f" }],
        scales: { m: { log: false, label: "members" } },
      });
      const values = chart("chart-batch-values", {
        x: "iteration",
        series: [{ label: "median f", scale: "f", color: "#1f6feb" },
                 { label: "best f", scale: "f", color: "#8250df" },
                 { label: "median ‖grad‖∞", scale: "g", color: "#d1242f" },
                 { label: "best ‖grad‖∞", scale: "g", color: "#bf8700" }],
        scales: { f: { log: true, label: "f" }, g: { log: true, label: "‖grad‖∞" } },
      });
      charts.push(members, values);
      onIterate = (e) => {
        const b = e.batch;
        if (!b) return;
        members.push(e.it, [b.active, b.converged, b.failed]);
        values.push(e.it, [b.median_f, b.best_f, b.median_g, b.best_g]);
      };
    } else if (cfg.kind === "train") {
      const loss = chart("chart-loss", {
        x: "step",
        series: [{ label: "loss", scale: "l", color: "#1f6feb" },
                 { label: "train_loss", scale: "l", color: "#8250df" }],
        scales: { l: { log: true, label: "loss" } },
      });
      const lr = chart("chart-lr", {
        x: "step", series: [{ label: "lr", scale: "lr", color: "#1a7f37" }],
        scales: { lr: { log: false, label: "lr" } },
      });
      const speed = chart("chart-speed", {
        x: "step",
        series: [{ label: "step_time_s", scale: "s", color: "#d1242f" },
                 { label: "samples_per_s", scale: "r", color: "#bf8700" }],
        scales: { s: { log: false, label: "s" }, r: { log: false, label: "samples/s" } },
      });
      charts.push(loss, lr, speed);
      onMetrics = (e) => {
        const v = e.values || {};
        if ("mem_formula_bytes" in v) { memoryTable(v); return; }
        if (!("loss" in v)) return;
        loss.push(e.step, [v.loss, v.train_loss]);
        lr.push(e.step, [v.lr]);
        speed.push(e.step, [v.step_time_s, v.samples_per_s]);
      };
    }

    const timeline = document.getElementById("timeline");
    function note(e, text) {
      if (!timeline) return;
      const li = document.createElement("li");
      const when = e.time ? new Date(e.time * 1000).toLocaleTimeString() : "";
      li.textContent = `${when}  #${e.seq}  ${text}`;
      timeline.appendChild(li);
    }

    const source = new EventSource(cfg.events);
    source.addEventListener("events", (msg) => {
      for (const e of JSON.parse(msg.data)) {
        if (e.kind === "iterate") { if (onIterate) onIterate(e); }
        else if (e.kind === "metrics") { if (onMetrics) onMetrics(e); }
        else if (e.kind === "accepted") note(e, `accepted (${e.method})`);
        else if (e.kind === "state_change") {
          note(e, e.state + (e.reason ? ` — ${e.reason}` : ""));
          const badge = document.getElementById("job-state");
          if (badge && !cfg.terminal) { badge.textContent = e.state; badge.className = `state state-${e.state}`; }
        }
        else if (e.kind === "result") note(e, `result: ${e.status} after ${e.nit} iterations — ${e.message}`);
        else if (e.kind === "failure") note(e, `failed: ${e.code} — ${e.message}`);
        else if (e.kind === "train_result") note(e, `trained: ${e.steps} steps`);
      }
      charts.forEach((c) => c && c.draw());
    });
    source.addEventListener("end", () => {
      source.close();
      charts.forEach((c) => c && c.draw());
      document.body.dataset.streamEnded = "1";
      // The page was drawn while the job ran: draw it again with its result.
      if (!cfg.terminal) setTimeout(() => window.location.reload(), 400);
    });
  }

  function memoryTable(v) {
    const table = document.getElementById("memory");
    if (!table) return;
    const workers = v.workers || 0;
    const mib = bytes;
    let html = "<thead><tr><th>rank</th><th>params</th><th>grads</th>" +
      "<th>optimizer state</th><th>total</th><th>total / formula</th></tr></thead><tbody>";
    for (let r = 0; r < workers; r++) {
      const ratio = v[`mem_ratio_rank${r}`];
      html += `<tr><td>${r}</td><td>${mib(v[`mem_param_bytes_rank${r}`])}</td>` +
        `<td>${mib(v[`mem_grad_bytes_rank${r}`])}</td><td>${mib(v[`mem_optimizer_bytes_rank${r}`])}</td>` +
        `<td>${mib(v[`mem_total_bytes_rank${r}`])}</td><td>${ratio === null || ratio === undefined ? "—" : ratio.toFixed(3)}</td></tr>`;
    }
    html += `<tr class="muted"><td>formula (ZeRO ${v.zero_stage})</td><td>${mib(v.mem_formula_param_bytes)}</td>` +
      `<td>${mib(v.mem_formula_grad_bytes)}</td><td>${mib(v.mem_formula_optimizer_bytes)}</td>` +
      `<td>${mib(v.mem_formula_bytes)}</td><td></td></tr></tbody>`;
    table.innerHTML = html; // numbers only: built from a metrics event's float values
  }

  function bytes(b) {
    if (b === null || b === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return `${i ? b.toFixed(2) : b} ${units[i]}`;
  }

  document.addEventListener("DOMContentLoaded", () => { jobsTable(); jobPage(); });
})();
