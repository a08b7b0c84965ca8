// dcdeploy web: renders the JSON the server pushes over Server-Sent Events.
// Everything from the store is untrusted text: it goes in with textContent, never as HTML.
"use strict";

const COLOURS = ["#1e88e5", "#8e24aa", "#00897b", "#f4511e", "#6d4c41", "#3949ab"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 90) return s.toFixed(1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "-";
}

function renderFleet(data) {
  const table = document.getElementById("fleet");
  const head = el("tr", {}, el("th", {}, "host"), ...data.services.map(s => el("th", {}, s)));
  const rows = [head];
  for (const rack of data.racks) {
    rows.push(el("tr", {}, el("th", {class: "rack", colspan: data.services.length + 1},
                              "rack " + rack.rack)));
    for (const host of rack.hosts) {
      const cells = data.services.map(svc => {
        const c = host.cells[svc];
        if (!c) return el("td", {});
        const title = c.state + (c.fetch ? ", download " + c.fetch : "") +
                      (c.fetch_error ? ": " + c.fetch_error : "");
        return el("td", {}, el("span", {class: "cell " + c.cls, "data-host": host.name,
                                        "data-service": svc, "data-state": c.cls, title},
                               (c.version || "-") + " " + c.state));
      });
      rows.push(el("tr", {"data-host-row": host.name},
                   el("td", {class: "host"}, host.name + (host.online ? "" : " (offline)")),
                   ...cells));
    }
  }
  table.replaceChildren(...rows);
}

function renderQueue(data) {
  const box = document.getElementById("queue");
  if (!data.queue.length) {
    box.replaceChildren(el("p", {}, "(empty)"));
    return;
  }
  box.replaceChildren(...data.queue.map(item => {
    const pct = item.total ? Math.round(100 * item.done / item.total) : 0;
    return el("div", {class: "item " + item.cls, "data-item": item.item, "data-state": item.state,
                      "data-done": item.done, "data-total": item.total},
      el("b", {}, item.service + " " + item.version), " ", item.state,
      " \u2014 " + item.done + "/" + item.total + " hosts",
      el("div", {class: "bar"}, el("div", {style: "width:" + pct + "%"})),
      item.reason ? el("div", {class: "reason"}, item.reason) : null);
  }));
}

function renderProblems(data) {
  const list = document.getElementById("problems");
  list.replaceChildren(...(data.problems.length ? data.problems.map(p => el("li", {}, p))
                                                : [el("li", {}, "none")]));
}

function renderHistory(data) {
  const table = document.getElementById("history");
  const rows = [el("tr", {}, ...["item", "service", "version", "state", "finished", "took",
                                 "reason"].map(h => el("th", {}, h)))];
  for (const h of data.history) {
    rows.push(el("tr", {"data-history": h.item}, el("td", {}, h.item), el("td", {}, h.service),
                 el("td", {}, h.version), el("td", {}, h.state), el("td", {}, clock(h.finished)),
                 el("td", {}, seconds(h.duration)), el("td", {}, h.reason || "")));
  }
  table.replaceChildren(...rows);
}

// Hosts serving per service over time (steps), with each service's quorum dashed.
function renderChart(data) {
  const box = document.getElementById("chart");
  const samples = data.chart.samples;
  const W = 520, H = 200, L = 30, B = 20, T = 10, R = 90;
  const svg = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  if (!samples.length) {
    box.replaceChildren(svg);
    return;
  }
  const t0 = samples[0].t, t1 = Math.max(data.t, t0 + 1);
  let top = 1;
  for (const s of samples) for (const n of Object.values(s.serving)) top = Math.max(top, n);
  for (const q of Object.values(data.chart.quorum)) if (q) top = Math.max(top, q);
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = n => H - B - (H - B - T) * n / top;
  svg.append(svgEl("line", {x1: L, y1: y(0), x2: W - R, y2: y(0), stroke: "#999"}));
  for (let n = 0; n <= top; n += Math.max(1, Math.ceil(top / 5))) {
    const label = svgEl("text", {x: L - 6, y: y(n) + 4, "text-anchor": "end", "font-size": 11});
    label.textContent = n;
    svg.append(label);
  }
  const span = svgEl("text", {x: L, y: H - 4, "font-size": 11});
  span.textContent = clock(t0) + " \u2013 " + clock(t1);
  svg.append(span);
  data.services.forEach((svc, i) => {
    const colour = COLOURS[i % COLOURS.length];
    let points = "", last = null;
    for (const s of samples) {
      const n = s.serving[svc] || 0;
      if (last !== null) points += `${x(s.t)},${y(last)} `;
      points += `${x(s.t)},${y(n)} `;
      last = n;
    }
    points += `${x(t1)},${y(last)}`;
    svg.append(svgEl("polyline", {points, fill: "none", stroke: colour, "stroke-width": 2,
                                  "data-service": svc}));
    const q = data.chart.quorum[svc];
    if (q) {
      svg.append(svgEl("line", {x1: L, y1: y(q), x2: W - R, y2: y(q), stroke: colour,
                                "stroke-dasharray": "5,4", "data-quorum": svc}));
    }
    const label = svgEl("text", {x: W - R + 6, y: T + 14 * (i + 1), fill: colour,
                                 "font-size": 12});
    label.textContent = svc + (q ? " (quorum " + q + ")" : "");
    svg.append(label);
  });
  box.replaceChildren(svg);
}

function render(data) {
  document.getElementById("store").textContent = data.store || "";
  document.getElementById("updated").textContent = "updated " + clock(data.t);
  const error = document.getElementById("error");
  error.hidden = !data.error;
  error.textContent = data.error || "";
  renderFleet(data);
  renderQueue(data);
  renderChart(data);
  renderProblems(data);
  renderHistory(data);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/events");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn up"; };
  source.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn down"; };
  source.onmessage = event => render(JSON.parse(event.data));
}

connect();
