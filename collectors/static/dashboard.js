// The collector's dashboard: reads the JSON read API of the same collector and draws
// the chart (hand-made SVG), the open blocking events and the probe fleet.
// No library, no external fetch: the page works offline and under a strict CSP.
// Every value from the data is written with textContent or setAttribute, never as
// markup: a hostile service name stays text.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Okabe-Ito colours, told apart by people with colour-vision deficiencies.
  const COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#8c6d00"];
  const MAX_SERIES = COLOURS.length;
  const KINDS = {
    dns: "DNS", tcp_ip: "TCP/IP", tls: "TLS", "http-failure": "HTTP failure",
    "http-diff": "HTTP content", throttling: "throttling",
  };
  const STALE_MS = 24 * 3600 * 1000;  // a probe silent this long needs a look
  const REFRESH_MS = 5 * 60 * 1000;
  const W = 760, H = 320, M = { top: 16, right: 20, bottom: 44, left: 52 };

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function row(cells, attrs) {
    const tr = el("tr", attrs);
    for (const cell of cells) {
      if (cell instanceof Node) {
        const td = el("td");
        td.appendChild(cell);
        tr.appendChild(td);
      } else {
        tr.appendChild(el("td", {}, cell));
      }
    }
    return tr;
  }

  async function getJSON(path) {
    const answer = await fetch(path, { headers: { Accept: "application/json" } });
    let body = {};
    try { body = await answer.json(); } catch (e) { /* not JSON: reported below */ }
    if (!answer.ok) throw new Error(`${path}: ${body.error || answer.status + " " + answer.statusText}`);
    return body;
  }

  function network(asn, cc) {
    if (asn === null || asn === undefined) return "unknown network";
    return `AS${asn} (${cc || "??"})`;
  }

  function percent(share) {
    return `${Math.round(share * 1000) / 10}%`;
  }

  function kinds(list) {
    return (list || []).map((k) => KINDS[k] || k).join(", ") || "unknown";
  }

  function ago(iso, now) {
    const ms = now - Date.parse(iso);
    const minutes = Math.round(ms / 60000);
    if (minutes < 1) return "just now";
    if (minutes < 90) return `${minutes} min ago`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ago`;
    return `${Math.floor(hours / 24)} days ago`;
  }

  function timeCell(iso, now) {
    const t = el("time", { datetime: iso, title: iso }, `${iso.slice(0, 16).replace("T", " ")} UTC (${ago(iso, now)})`);
    return t;
  }

  function shortId(id) {
    // The public sees a probe's pseudonym, or nothing when the collector has no key.
    if (id == null) return el("code", { title: "not shown to the public" }, "-");
    return el("code", { title: id, "data-probe-id": id }, id.length > 8 ? id.slice(0, 8) : id);
  }

  // -- the chart -------------------------------------------------------------

  function dayList(days, today) {
    const list = [];
    for (let i = days - 1; i >= 0; i--) {
      list.push(new Date(today - i * 86400000).toISOString().slice(0, 10));
    }
    return list;
  }

  // One series per service and network: per day, measured and blocked counts.
  function buildSeries(aggregates) {
    const byKey = new Map();
    for (const a of aggregates) {
      const key = `${a.service}|${a.asn}|${a.cc}`;
      let s = byKey.get(key);
      if (!s) {
        s = { key, service: a.service, asn: a.asn, cc: a.cc, days: new Map(), total: 0, blocked: 0 };
        byKey.set(key, s);
      }
      let d = s.days.get(a.day);
      if (!d) { d = { total: 0, blocked: 0 }; s.days.set(a.day, d); }
      const blocked = a.blocking !== false && a.blocking !== null ? a.count : 0;
      d.total += a.count; d.blocked += blocked;
      s.total += a.count; s.blocked += blocked;
    }
    return [...byKey.values()].sort((x, y) => y.blocked - x.blocked || (x.key < y.key ? -1 : 1));
  }

  function seriesName(s) {
    return `${s.service} on ${network(s.asn, s.cc)}`;
  }

  function drawChart(series, days) {
    const chart = document.getElementById("chart");
    const title = document.getElementById("chart-title");
    const desc = document.getElementById("chart-desc");
    while (chart.lastChild) chart.removeChild(chart.lastChild);
    chart.appendChild(title);
    chart.appendChild(desc);
    const plotW = W - M.left - M.right, plotH = H - M.top - M.bottom;
    const x = (i) => M.left + (days.length > 1 ? (i * plotW) / (days.length - 1) : plotW / 2);
    const y = (share) => M.top + plotH * (1 - share);

    const axes = svg("g", { class: "axes", "aria-hidden": "true" });
    for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
      axes.appendChild(svg("line", { x1: M.left, x2: W - M.right, y1: y(tick), y2: y(tick), class: "grid" }));
      axes.appendChild(svg("text", { x: M.left - 8, y: y(tick) + 4, "text-anchor": "end" }, `${tick * 100}%`));
    }
    const step = Math.max(1, Math.ceil(days.length / 8));
    days.forEach((day, i) => {
      if ((days.length - 1 - i) % step === 0) {
        axes.appendChild(svg("text", { x: x(i), y: H - M.bottom + 18, "text-anchor": "middle" }, day.slice(5)));
      }
    });
    axes.appendChild(svg("text", { x: M.left + plotW / 2, y: H - 6, "text-anchor": "middle" }, "day (UTC)"));
    chart.appendChild(axes);

    const shown = series.filter((s) => s.blocked > 0).slice(0, MAX_SERIES);
    const legend = document.getElementById("legend");
    while (legend.lastChild) legend.removeChild(legend.lastChild);
    shown.forEach((s, n) => {
      const colour = COLOURS[n];
      const g = svg("g", { class: "series", "data-series": seriesName(s), stroke: colour, fill: colour });
      let segment = [];
      const flush = () => {
        if (segment.length > 1) g.appendChild(svg("polyline", { points: segment.join(" "), fill: "none" }));
        segment = [];
      };
      days.forEach((day, i) => {
        const d = s.days.get(day);
        if (!d) { flush(); return; }
        const share = d.blocked / d.total;
        segment.push(`${x(i).toFixed(1)},${y(share).toFixed(1)}`);
        const dot = svg("circle", {
          cx: x(i).toFixed(1), cy: y(share).toFixed(1), r: 3.5,
          "data-day": day, "data-blocked": d.blocked, "data-total": d.total,
        });
        dot.appendChild(svg("title", {}, `${seriesName(s)}, ${day}: ${d.blocked} of ${d.total} blocked (${percent(share)})`));
        g.appendChild(dot);
      });
      flush();
      chart.appendChild(g);
      const item = el("li", { "data-series": seriesName(s) });
      const swatch = svg("svg", { width: 14, height: 14, viewBox: "0 0 14 14", "aria-hidden": "true" });
      swatch.appendChild(svg("rect", { width: 14, height: 14, fill: colour }));
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(` ${seriesName(s)}: ${s.blocked} of ${s.total} blocked`));
      legend.appendChild(item);
    });

    const hidden = series.filter((s) => s.blocked > 0).length - shown.length;
    if (!shown.length) {
      chart.appendChild(svg("text", { x: M.left + plotW / 2, y: M.top + plotH / 2, "text-anchor": "middle", class: "empty" },
        series.length ? "No measurement was judged blocked in this period." : "No measurements in this period."));
      desc.textContent = series.length
        ? `No blocking seen: ${series.reduce((n, s) => n + s.total, 0)} measurements of ${series.length} services and networks, none judged blocked.`
        : "No measurements in this period.";
      return;
    }
    const worst = [];
    for (const s of shown) {
      let peak = null;
      for (const [day, d] of s.days) {
        if (!peak || d.blocked / d.total > peak.share) peak = { day, share: d.blocked / d.total };
      }
      worst.push(`${seriesName(s)}: ${s.blocked} of ${s.total} measurements blocked, at most ${percent(peak.share)} on ${peak.day}`);
    }
    desc.textContent = `Blocking from ${days[0]} to ${days[days.length - 1]}. ` + worst.join("; ") + "." +
      (hidden > 0 ? ` ${hidden} more series with blocking are in the table.` : "");
  }

  function fillSeriesTable(series, days) {
    const body = document.querySelector("#series-table tbody");
    while (body.lastChild) body.removeChild(body.lastChild);
    for (const s of series) {
      for (const day of days) {
        const d = s.days.get(day);
        if (!d) continue;
        body.appendChild(row([s.service, network(s.asn, s.cc), day, d.blocked, d.total, percent(d.blocked / d.total)],
          { "data-series": seriesName(s), "data-day": day }));
      }
    }
  }

  // -- events and probes --------------------------------------------------------

  function fillEvents(events, now) {
    const body = document.querySelector("#events tbody");
    while (body.lastChild) body.removeChild(body.lastChild);
    if (!events.length) {
      const tr = el("tr");
      tr.appendChild(el("td", { colspan: 6 }, "No blocking event is open."));
      body.appendChild(tr);
      return;
    }
    for (const e of events) {
      body.appendChild(row([e.service, e.status, kinds(e.blocking), network(e.asn, e.cc), shortId(e.probe_id),
        timeCell(e.started_at, now)], { "data-event-id": e.id }));
    }
  }

  function probeState(p, now) {
    if (p.revoked) return "revoked";
    if (!p.last_seen_at) return "never seen";
    if (now - Date.parse(p.last_seen_at) > STALE_MS) return "silent for over a day";
    if (p.backlog) return "catching up";
    return "active";
  }

  function fillProbes(probes, now) {
    const body = document.querySelector("#probes tbody");
    while (body.lastChild) body.removeChild(body.lastChild);
    if (!probes.length) {
      const tr = el("tr");
      tr.appendChild(el("td", { colspan: 5 }, "No probe is enrolled yet."));
      body.appendChild(tr);
      return;
    }
    for (const p of probes) {
      const state = probeState(p, now);
      body.appendChild(row([
        shortId(p.probe_id),
        p.asn === null ? "unknown" : network(p.asn, p.cc),
        p.last_seen_at ? timeCell(p.last_seen_at, now) : "never",
        p.backlog === null || p.backlog === undefined ? "unknown" : String(p.backlog),
        state,
      ], { "data-probe-id": p.probe_id, "data-state": state }));
    }
  }

  // -- loading ------------------------------------------------------------------

  async function load() {
    const status = document.getElementById("status");
    const range = Number(document.getElementById("range").value) || 30;
    const now = Date.now();
    const today = Date.parse(new Date(now).toISOString().slice(0, 10) + "T00:00:00Z");
    const days = dayList(range, today);
    const problems = [];
    const [aggregates, events, probes] = await Promise.all([
      getJSON(`api/v1/aggregates?since=${days[0]}`).catch((e) => { problems.push(e.message); return null; }),
      getJSON("api/v1/events?open=true").catch((e) => { problems.push(e.message); return null; }),
      getJSON("api/v1/probes").catch((e) => { problems.push(e.message); return null; }),
    ]);
    let series = [];
    if (aggregates) {
      series = buildSeries(aggregates.aggregates);
      drawChart(series, days);
      fillSeriesTable(series, days);
    }
    if (events) fillEvents(events.events, now);
    if (probes) fillProbes(probes.probes, now);
    const parts = [];
    if (events) {
      const n = events.events.length;
      parts.push(n === 0 ? "No blocking event is open" :
        `${n} blocking event${n > 1 ? "s" : ""} open: ` +
        events.events.slice(0, 3).map((e) => `${e.service} on ${network(e.asn, e.cc)}`).join(", ") +
        (n > 3 ? ", …" : ""));
    }
    if (probes) {
      const silent = probes.probes.filter((p) => ["silent for over a day", "never seen"].includes(probeState(p, now))).length;
      parts.push(`${probes.probes.length} probes enrolled, ${silent} not heard from in a day`);
    }
    status.textContent = (parts.length ? parts.join(". ") + "." : "") +
      (problems.length ? ` Could not load: ${problems.join("; ")}` : "") +
      ` Updated ${new Date(now).toISOString().slice(0, 16).replace("T", " ")} UTC.`;
    document.body.setAttribute("data-loaded", problems.length ? "partly" : "yes");
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("range").addEventListener("change", load);
    document.getElementById("range-form").addEventListener("submit", (e) => { e.preventDefault(); load(); });
    load();
    setInterval(load, REFRESH_MS);
  });
})();
