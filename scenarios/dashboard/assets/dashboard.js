/* The nmoe dashboard: draws a view (see scenarios/dashboard/view.py for its keys). Live, it follows
   the server's event stream; as a report, it draws the embedded view once. Read-only. */
(function () {
  "use strict";
  var MODE = document.body.dataset.mode;
  var COLORS = ["#3b75af", "#ef8636", "#519e3e", "#c53a32", "#8d69b8", "#84584e", "#d57fbe", "#7f7f7f",
                "#bcbc35", "#42becd"];
  var charts = {};

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "class") node.className = attrs[k]; else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function num(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    var units = ["B", "kB", "MB", "GB"], i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }
  function table(node, head, rows, numeric) {
    clear(node);
    if (!rows.length) { node.appendChild(el("tr", {}, [el("td", { class: "empty" }, ["nothing yet"])])); return; }
    node.appendChild(el("tr", {}, head.map(function (h, i) {
      return el("th", numeric && numeric[i] ? { class: "num" } : {}, [h]);
    })));
    rows.forEach(function (r) {
      var attrs = r.attrs || {};
      node.appendChild(el("tr", attrs, (r.cells || r).map(function (c, i) {
        var a = numeric && numeric[i] ? { class: "num" } : {};
        return el("td", a, [c]);
      })));
    });
  }
  function chart(id, type, data, options) {
    var canvas = document.getElementById(id);
    if (!canvas || typeof Chart === "undefined") return;
    var base = { responsive: true, maintainAspectRatio: false, animation: false,
                 plugins: { legend: { labels: { boxWidth: 12 } } } };
    var opts = Object.assign(base, options || {});
    if (charts[id]) { charts[id].data = data; charts[id].update("none"); return; }
    charts[id] = new Chart(canvas, { type: type, data: data, options: opts });
  }

  function header(v) {
    var run = v.run || {};
    document.getElementById("title").textContent = "nmoe: " + (run.name || "run");
    var status = document.getElementById("status");
    status.textContent = run.status || "";
    status.className = "pill " + (run.status || "");
    var ch = run.channel || {};
    var bits = [run.clients + " clients", run.mode || "", ch.model === "emulated" ?
      "channel " + ch.preset + " (time scale " + ch.time_scale + ")" : "direct channel"];
    if (run.stage) bits.push("stage " + run.stage);
    if (run.wall_s) bits.push(num(run.wall_s, 0) + " s");
    document.getElementById("headline").textContent = bits.filter(Boolean).join(" · ");
  }

  function fleet(v) {
    var rows = Object.keys(v.fleet || {}).map(function (name) {
      var c = v.fleet[name];
      var state = c.online === true ? "online" : c.online === false ? "offline" :
                  c.joined === true ? "took part" : c.joined === false ? "never joined" : "unknown";
      var dot = el("span", { class: "dot " + (c.online === true ? "on" : c.online === false ? "off" : "") });
      var last = el("span", /^(missing|offline|rejected|error|late|never)/.test(c.last || "") ? { class: "fail" } : {},
                    [c.last || "-"]);
      return { attrs: { "data-client": name, "data-online": String(c.online) },
               cells: [name, el("span", { class: "nowrap" }, [dot, state]), c.link || "-", c.device || "-", last, c.failures || 0] };
    });
    table(document.getElementById("fleet"), ["client", "status", "link", "device", "last answer", "failures"], rows,
          [0, 0, 0, 0, 0, 1]);
  }

  function round(v) {
    var node = clear(document.getElementById("round"));
    var r = v.round;
    var done = (v.rounds || []).length;
    document.querySelector("#sec-round h2").textContent = r ? "Round in progress" : "Rounds";
    if (!r) {
      node.appendChild(el("div", {}, [
        el("span", { id: "round-counter", "data-steps": String(done) }, [done + " step(s) finished"]),
        el("span", { class: "muted" }, [v.run && v.run.status === "running" ? " · between steps" : ""])]));
      return;
    }
    var unit = r.modeled ? " modeled s" : " s";
    var share = r.targets.length ? r.answered.length / r.targets.length : 0;
    node.appendChild(el("div", {}, [
      el("b", { id: "round-counter", "data-steps": String(done), "data-round": String(r.round) },
         [r.stage + " · round " + r.round + " · " + r.op]),
      el("span", { class: "muted" }, ["   " + r.answered.length + "/" + r.targets.length + " answered · " +
         num(r.elapsed_s, 1) + " of " + num(r.deadline_s, 0) + unit + " before the deadline"])]));
    var bar = el("div", { class: "bar" }, [el("div", { style: "width:" + (100 * share).toFixed(1) + "%" })]);
    node.appendChild(bar);
    var waiting = r.targets.filter(function (t) { return r.answered.indexOf(t) < 0 && !(t in r.failures); });
    var bits = ["answered: " + (r.answered.join(", ") || "none"), "waiting on: " + (waiting.join(", ") || "nobody")];
    Object.keys(r.failures || {}).forEach(function (c) { bits.push(c + ": " + r.failures[c]); });
    node.appendChild(el("div", { class: "muted" }, [bits.join(" · ")]));
  }

  function curves(v) {
    var series = {};
    (v.rounds || []).forEach(function (r) {
      if ((r.op === "stage1_fit" || r.op === "stage3_fit") && r.loss !== null && r.loss !== undefined) {
        (series[r.stage] = series[r.stage] || []).push({ x: r.round, y: r.loss });
      }
    });
    var datasets = Object.keys(series).map(function (s, i) {
      return { label: s, data: series[s], borderColor: COLORS[i % COLORS.length],
               backgroundColor: COLORS[i % COLORS.length], tension: 0.2, pointRadius: 3 };
    });
    chart("chart-loss", "line", { datasets: datasets }, {
      parsing: true, scales: { x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
                               y: { title: { display: true, text: "mean local loss" } } } });
    var methods = v.methods || {};
    var names = Object.keys(methods).filter(function (m) { return methods[m].accuracy !== undefined; });
    chart("chart-accuracy", "bar", {
      labels: names.map(function (m) { return methods[m].label || m; }),
      datasets: [{ label: "accuracy", data: names.map(function (m) { return methods[m].accuracy; }),
                   backgroundColor: COLORS[0] },
                 { label: "macro-F1", data: names.map(function (m) { return methods[m].f1_macro; }),
                   backgroundColor: COLORS[1] }] },
      { scales: { y: { min: 0, max: 1 } } });
    table(document.getElementById("methods"), ["method", "accuracy", "macro-F1", "fallback", "local share"],
      names.map(function (m) {
        var r = methods[m];
        return [r.label || m, num(r.accuracy, 4) + (r.accuracy_std !== undefined ? " ± " + num(r.accuracy_std, 3) : ""),
                num(r.f1_macro, 4), num(r.fallback_rate, 3), num(r.local_share, 2)];
      }), [0, 1, 1, 1, 1]);
  }

  function traffic(v) {
    var t = v.traffic || {};
    document.getElementById("traffic-scope").textContent = t.scope ? "(" + t.scope + ")" : "";
    var kinds = Object.keys(t.per_kind || {}).sort();
    chart("chart-traffic", "bar", { labels: kinds, datasets: [{ label: "MB", backgroundColor: COLORS[0],
      data: kinds.map(function (k) { return t.per_kind[k].bytes / 1e6; }) }] }, { indexAxis: "y" });
    table(document.getElementById("per-kind"), ["kind", "messages", "bytes"], kinds.map(function (k) {
      return [k, t.per_kind[k].messages, bytes(t.per_kind[k].bytes)];
    }), [0, 1, 1]);
    var rejected = t.rejected || {};
    table(document.getElementById("rejected"), ["reason", "messages"], Object.keys(rejected).sort().map(function (k) {
      return [k, rejected[k]];
    }), [0, 1]);
    var links = t.links || {};
    var names = Object.keys(links);
    document.getElementById("sec-links").hidden = !names.length;
    chart("chart-links", "bar", { labels: names, datasets: [
      { label: "p50 ms", backgroundColor: COLORS[0], data: names.map(function (n) { return 1000 * (links[n].latency_p50_s || 0); }) },
      { label: "p95 ms", backgroundColor: COLORS[1], data: names.map(function (n) { return 1000 * (links[n].latency_p95_s || 0); }) }] },
      { scales: { x: { ticks: { autoSkip: false, maxRotation: 60 } } } });
    table(document.getElementById("links"), ["link", "delivered", "bytes", "p50 ms", "p95 ms", "dropped"],
      names.map(function (n) {
        var s = links[n], drops = s.dropped || {};
        var dropped = Object.keys(drops).map(function (k) { return k + " " + drops[k]; }).join(", ");
        return [n, s.delivered, bytes(s.bytes), num(1000 * s.latency_p50_s, 1), num(1000 * s.latency_p95_s, 1),
                dropped || "0"];
      }), [0, 1, 1, 1, 1, 0]);
  }

  function inference(v) {
    var inf = v.inference || {};
    var node = clear(document.getElementById("routing-matrix"));
    if (!inf.clients || !inf.clients.length || !inf.has_matrix) {
      node.appendChild(el("tr", {}, [el("td", { class: "empty" }, [inf.clients && inf.clients.length ?
        "this run recorded no routing (written by an older nmoe)" : "after evaluation"])]));
    } else {
      node.appendChild(el("tr", {}, [el("th", {}, ["client \u2192 expert"])].concat(inf.experts.map(function (e) {
        return el("th", {}, [e.replace("client-", "#")]);
      }))));
      inf.clients.forEach(function (c, i) {
        node.appendChild(el("tr", { "data-client": c }, [el("th", {}, [c])].concat(inf.matrix[i].map(function (x) {
          var alpha = Math.min(1, x);
          return el("td", { style: "background: rgba(59,117,175," + alpha.toFixed(3) + ");" +
                                   (alpha > 0.55 ? "color:#fff" : "") }, [x ? x.toFixed(2) : "\u00b7"]);
        }))));
      });
    }
    var per = inf.per_client || {};
    table(document.getElementById("inference"), ["client", "accuracy", "local share", "fallback", "p50 ms", "p95 ms"],
      Object.keys(per).map(function (c) {
        var r = per[c];
        return [c, num(r.accuracy, 3), num(r.local_share, 2), num(r.fallback_rate, 3), num(r.latency_p50_ms, 1),
                num(r.latency_p95_ms, 1)];
      }), [0, 1, 1, 1, 1, 1]);
  }

  function privacy(v) {
    var p = v.privacy || {};
    var node = clear(document.getElementById("privacy"));
    if (p.epsilon === undefined) {
      node.appendChild(el("div", { class: "empty" }, ["no correlation matrix released yet (or no DP in this run)"]));
      return;
    }
    node.appendChild(el("div", { class: "kv" }, [
      el("div", {}, [el("b", { id: "epsilon" }, [num(p.epsilon, 2)]), "\u03b5 spent"]),
      el("div", {}, [el("b", {}, [String(p.delta)]), "\u03b4"]),
      el("div", {}, [el("b", {}, [String(p.releases)]), "releases (worst client)"]),
      el("div", {}, [el("b", {}, [String(p.noise_multiplier)]), "noise multiplier"])]));
  }

  function events(v) {
    var node = clear(document.getElementById("events"));
    (v.events || []).slice(-100).reverse().forEach(function (e) {
      var when = new Date(e.t * 1000).toLocaleTimeString();
      node.appendChild(el("li", {}, [el("span", { class: "muted" }, [when + "  "]), e.text]));
    });
    if (!node.firstChild) node.appendChild(el("li", { class: "empty" }, ["none"]));
  }

  function sweep(s) {
    document.getElementById("run-view").hidden = true;
    document.getElementById("sweep-view").hidden = false;
    document.getElementById("title").textContent = "nmoe sweep: " + s.name;
    var status = document.getElementById("status");
    status.textContent = s.runs + " run(s)";
    status.className = "pill done";
    document.getElementById("headline").textContent = s.description || "";
    var box = clear(document.getElementById("sweep-charts"));
    Object.keys(s.charts).forEach(function (metric, k) {
      var c = s.charts[metric];
      var canvas = el("canvas", { id: "sweep-chart-" + k });
      box.appendChild(el("div", { class: "chart" }, [canvas]));
      chart(canvas.id, "bar", { labels: c.cells, datasets: Object.keys(c.methods).map(function (m, i) {
        return { label: m, data: c.methods[m], backgroundColor: COLORS[i % COLORS.length] };
      }) }, { plugins: { title: { display: true, text: metric + " (mean over seeds)" } },
              scales: { x: { title: { display: true, text: c.axis } } } });
    });
    table(document.getElementById("sweep-table"), s.columns, s.rows, s.columns.map(function (c) {
      return /_(mean|ci95)$|^n_seeds$|^failed_seeds$/.test(c) ? 1 : 0;
    }));
  }

  function draw(v) {
    if (v.sweep) { sweep(v.sweep); return; }
    header(v); round(v); fleet(v); curves(v); traffic(v); inference(v); privacy(v); events(v);
  }

  draw(JSON.parse(document.getElementById("view").textContent));
  if (MODE === "live" && typeof EventSource !== "undefined") {
    var stream = new EventSource("events");
    stream.onmessage = function (e) {
      var v = JSON.parse(e.data);
      draw(v);
      if (v.run && (v.run.status === "done" || v.run.status === "failed")) stream.close();  // nothing more comes
    };
    stream.onerror = function () {
      var status = document.getElementById("status");
      if (status.className.indexOf("done") < 0 && status.className.indexOf("failed") < 0) {
        status.textContent = "connection lost, retrying"; status.className = "pill lost";
      }
    };
  }
})();
