// emotion-monitor live dashboard. Messages arrive over Server-Sent Events from `emotion-monitor dashboard`;
// each only updates the in-memory model and marks what changed as dirty. One requestAnimationFrame pass then
// updates the dirty cards (captions and canvas only while on screen, at most 4 times a second each), so 50 busy
// streams cost a few canvases a frame.
"use strict";

const LABELS = ["anger", "disgust", "fear", "joy", "neutral", "sadness"];
const COLOURS = {
  anger: "#e5484d", disgust: "#30a46c", fear: "#d23fd2",
  joy: "#f5a524", neutral: "#8b8d98", sadness: "#3e7bfa",
};
const MAX_POINTS = 120; // per stream: the plot and the page stay the same cost however long a call runs
const MAX_CAPTIONS = 3;
const MAX_ALERTS = 30;
const MAX_ENDED_CALLS = 30; // older ended calls leave the page, so it stays light through a day of calls
const FRAME_BUDGET_MS = 8; // a burst is applied over several frames rather than freezing the page
const REDRAW_MS = 250; // a card's captions and plot change at most 4 times a second, however busy its stream
const PLOT_W = 600, PLOT_H = 150, BAND_H = 10, MARK_H = 12;

const model = {
  groups: new Map(), // "node/call_id" for calls, "node:NODE" for plain streams
  streams: new Map(), // "node/stream" or "node/call/CALL/ROLE"
  nodes: new Map(),
  alerts: [],
  eventTimes: [],
  errors: 0,
  work: { frames: 0, maxMs: 0, totalMs: 0 }, // script time per animation frame, printed by the tests
  connected: false,
  broker: null,
};
const dirty = { groups: new Set(), streams: new Set(), header: true, alerts: false };
const pending = []; // envelopes received, applied in the next frames within FRAME_BUDGET_MS
const laterStreams = []; // cards drawn less than REDRAW_MS ago: drawn again in a later frame
let pendingAt = 0;
let frameRequested = false;

const $ = (id) => document.getElementById(id);
const num = (x, fallback = 0) => (typeof x === "number" && Number.isFinite(x) ? x : fallback);
const text = (x) => (x === null || x === undefined ? "" : String(x));
const two = (n) => String(n).padStart(2, "0");
const clock = (t) => { // toLocaleTimeString builds an Intl formatter per call: too slow for 50 busy cards
  const d = new Date(t);
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
};
const pct = (x) => `${Math.round(num(x) * 100)}%`;

function el(tag, cls, content) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (content !== undefined) node.textContent = content;
  return node;
}

function labelOf(x) {
  return LABELS.includes(x) ? x : "neutral";
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  return `${Math.floor(s / 60)}:${two(s % 60)}`;
}

function schedule() {
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(render);
  }
}

// ---- model ------------------------------------------------------------------------------------------

function getGroup(env) {
  const isCall = Boolean(env.call);
  const key = isCall ? `${env.node}/${env.call}` : `node:${env.node}`;
  let group = model.groups.get(key);
  if (!group) {
    group = {
      key, isCall, node: text(env.node), callId: text(env.call), started: null, ended: null,
      alerts: [], streams: [], tmin: Infinity, tmax: -Infinity, el: null, summaryDrawn: false,
    };
    model.groups.set(key, group);
    buildGroup(group);
  }
  dirty.groups.add(group);
  return group;
}

function getStream(env, role) {
  let stream = model.streams.get(env.key);
  if (!stream) {
    const group = getGroup(env);
    const name = group.isCall ? text(role || env.role) : env.key.slice(text(env.node).length + 1);
    stream = {
      key: env.key, group, name, points: [], alerts: [], incongruent: 0, ended: false,
      el: null, visible: !observer, viewDirty: true, drawnAt: -Infinity, // drawn once the observer reports it on screen
    };
    model.streams.set(env.key, stream);
    group.streams.push(stream);
    buildCard(stream);
  }
  return stream;
}

function touch(stream) {
  dirty.streams.add(stream);
  stream.viewDirty = true;
  stream.headDirty = true;
}

function refreshDomain(group) { // the roles of a call share one time axis: the span of their kept points
  let tmin = Infinity, tmax = -Infinity;
  for (const s of group.streams) {
    if (!s.points.length) continue;
    tmin = Math.min(tmin, s.points[0].t0);
    tmax = Math.max(tmax, s.points[s.points.length - 1].t1);
  }
  if (tmin === group.tmin && tmax === group.tmax) return;
  group.tmin = tmin;
  group.tmax = tmax;
  group.streams.forEach(touch);
}

function applyEvent(env) {
  const d = env.data;
  const stream = getStream(env, env.role || d.role);
  const tEnd = Date.parse(d.time) || Date.now();
  const point = {
    t0: tEnd - Math.max(0, num(d.end_s) - num(d.start_s)) * 1000,
    t1: tEnd,
    scores: LABELS.map((l) => num(d.scores && d.scores[l])),
    label: labelOf(d.label),
    confidence: num(d.confidence),
    incongruent: d.incongruent === true,
    final: d.final !== false,
    segment: d.segment_id ?? d.event_id,
    transcript: text(d.transcript),
    valence: num(d.valence), arousal: num(d.arousal),
    latency: d.latency_ms ? num(d.latency_ms.total, NaN) : NaN,
  };
  const pts = stream.points;
  const last = pts[pts.length - 1];
  if (last && point.segment !== undefined && last.segment === point.segment) {
    stream.incongruent -= last.incongruent; // the final event replaces the interim ones of its segment
    pts[pts.length - 1] = point;
  } else {
    pts.push(point);
    if (pts.length > MAX_POINTS) stream.incongruent -= pts.shift().incongruent;
  }
  stream.incongruent += point.incongruent;
  stream.ended = Boolean(d.ended); // a retained last state says whether its stream had ended
  if (!d.retained) model.eventTimes.push(performance.now());
  touch(stream);
  const group = stream.group;
  if (group.isCall) refreshDomain(group);
  dirty.groups.add(group);
}

function applyCall(env) {
  const d = env.data;
  const group = getGroup(env);
  if (d.type === "started") group.started = d;
  else if (d.type === "ended") {
    group.ended = d;
    forgetOldCalls();
  }
  for (const role of Array.isArray(d.roles) ? d.roles : []) {
    getStream({ key: `${env.node}/call/${env.call}/${role}`, node: env.node, call: env.call, role }, role);
  }
}

function forgetOldCalls() {
  const ended = [...model.groups.values()].filter((g) => g.ended);
  ended.slice(0, Math.max(0, ended.length - MAX_ENDED_CALLS)).forEach(dropGroup);
}

function dropGroup(group) { // with its streams, from the model and the page
  for (const stream of group.streams) {
    model.streams.delete(stream.key);
    dirty.streams.delete(stream);
    if (observer) observer.unobserve(stream.el);
  }
  dirty.groups.delete(group);
  model.groups.delete(group.key);
  group.el.remove();
}

function applyAlert(env) {
  const d = env.data;
  const role = text(d.role);
  const alert = {
    call: `${env.node}/${env.call}`, role, label: labelOf(d.label), confidence: num(d.confidence),
    rule: text(d.rule), t: Date.parse(d.time) || Date.now(),
  };
  const group = getGroup(env);
  group.alerts.push(alert);
  if (role) {
    const stream = getStream({ key: `${env.node}/call/${env.call}/${role}`, node: env.node, call: env.call }, role);
    stream.alerts.push(alert);
    if (stream.alerts.length > MAX_POINTS) stream.alerts.shift();
    touch(stream);
  }
  model.alerts.push(alert);
  if (model.alerts.length > MAX_ALERTS) model.alerts.shift();
  dirty.alerts = true;
}

function markEnded(stream) {
  stream.ended = true;
  touch(stream);
}

function applyEnded(env) {
  const stream = model.streams.get(env.key);
  if (stream) markEnded(stream);
}

function setStatus(env) {
  const status = text(env.data);
  nodeOf(env).status = status;
  if (status !== "offline") return;
  const group = model.groups.get(`node:${env.node}`); // a node gone offline ended its streams
  for (const stream of group ? group.streams : []) markEnded(stream);
}

function forgetNode(env) { // offline for longer than the daemon keeps nodes: it goes with its streams and calls
  model.nodes.delete(env.node);
  [...model.groups.values()].filter((g) => g.node === env.node).forEach(dropGroup);
}

function nodeOf(env) {
  if (!model.nodes.has(env.node)) model.nodes.set(env.node, {});
  return model.nodes.get(env.node);
}

function apply(env) {
  try {
    if (!env || typeof env !== "object" || !env.data) throw new Error("not an envelope");
    switch (env.kind) {
      case "event": applyEvent(env); break;
      case "call": applyCall(env); break;
      case "alert": applyAlert(env); break;
      case "status": setStatus(env); break;
      case "ended": applyEnded(env); break;
      case "forget": forgetNode(env); break;
      case "health": nodeOf(env).health = env.data; break;
      case "broker": model.broker = env.data; break;
      default: return;
    }
  } catch (err) {
    model.errors += 1;
    console.warn("dashboard: skipped a message", err, env);
  }
  dirty.header = true;
}

function receive(envelopes) {
  for (const env of Array.isArray(envelopes) ? envelopes : [envelopes]) pending.push(env);
  schedule();
}

function reset() {
  if (observer) observer.disconnect();
  for (const group of model.groups.values()) group.el.remove();
  model.groups.clear();
  model.streams.clear();
  model.nodes.clear();
  model.alerts.length = 0;
  dirty.groups.clear();
  dirty.streams.clear();
  dirty.alerts = true;
}

// ---- DOM construction (once per group and per stream) ------------------------------------------------

const observer = "IntersectionObserver" in window
  ? new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const stream = entry.target._stream;
      stream.visible = entry.isIntersecting;
      if (stream.visible && stream.viewDirty) {
        touch(stream);
        schedule();
      }
    }
  }, { rootMargin: "200px" })
  : null;

function buildGroup(group) {
  const section = el("section", `group ${group.isCall ? "call" : "plain"}`);
  if (group.isCall) section.dataset.call = group.key;
  section.dataset.node = group.node;
  const header = el("header");
  const title = el("h2", null, group.isCall ? group.callId : `${group.node}`);
  group.metaEl = el("span", "meta");
  group.stateEl = el("span", "state");
  header.append(title, group.metaEl, group.stateEl);
  group.alertsEl = el("ul", "call-alerts");
  group.cardsEl = el("div", "cards");
  section.append(header, group.alertsEl, group.cardsEl);
  group.el = section;
  const empty = $("empty");
  if (empty) empty.remove();
  $("groups").prepend(section); // newest call on top
  applyFilter(group);
}

function buildCard(stream) {
  const card = el("article", "card");
  card.dataset.stream = stream.key;
  card.dataset.points = "0";
  card.dataset.label = "";
  const header = el("header");
  stream.nameEl = el("span", "name", stream.name);
  stream.badgeEl = el("span", "badge", "—");
  stream.infoEl = el("span", "info");
  header.append(stream.nameEl, stream.badgeEl, stream.infoEl);
  const bar = el("div", "confidence");
  stream.barEl = el("span");
  bar.append(stream.barEl);
  const canvas = el("canvas");
  const dpr = Math.min(2, window.devicePixelRatio || 1);
  canvas.width = PLOT_W * dpr;
  canvas.height = PLOT_H * dpr;
  stream.ctx = canvas.getContext("2d");
  stream.ctx.scale(dpr, dpr);
  stream.ctx.font = "10px system-ui, sans-serif"; // set once: assigning a font is parsed every time
  stream.captionsEl = el("ol", "captions");
  card.append(header, bar, canvas, stream.captionsEl);
  card._stream = stream;
  stream.el = card;
  stream.group.cardsEl.append(card);
  if (observer) observer.observe(card);
}

// ---- rendering (one pass per animation frame) --------------------------------------------------------

function render() {
  frameRequested = false;
  const t0 = performance.now();
  while (pendingAt < pending.length && performance.now() - t0 < FRAME_BUDGET_MS) apply(pending[pendingAt++]);
  if (pendingAt === pending.length) pending.length = pendingAt = 0;
  else schedule();
  laterStreams.length = 0;
  for (const stream of dirty.streams) renderStream(stream);
  dirty.streams.clear();
  if (laterStreams.length) {
    for (const stream of laterStreams) dirty.streams.add(stream);
    schedule();
  }
  for (const group of dirty.groups) renderGroup(group);
  dirty.groups.clear();
  if (dirty.alerts) renderAlerts();
  if (dirty.header) renderHeader();
  const ms = performance.now() - t0;
  model.work.frames += 1;
  model.work.totalMs += ms;
  model.work.maxMs = Math.max(model.work.maxMs, ms);
}

function renderStream(stream) {
  const card = stream.el;
  const pts = stream.points;
  const last = pts[pts.length - 1];
  if (stream.headDirty) renderHead(stream, card, pts, last);
  // captions and plot of off-screen cards wait until they scroll in
  if (stream.visible && stream.viewDirty) {
    const now = performance.now();
    if (now - stream.drawnAt < REDRAW_MS) {
      laterStreams.push(stream);
      return;
    }
    renderCaptions(stream);
    drawPlot(stream);
    stream.viewDirty = false;
    stream.drawnAt = now;
  }
}

function renderHead(stream, card, pts, last) {
  stream.headDirty = false;
  card.dataset.points = String(pts.length);
  card.dataset.incongruent = String(stream.incongruent);
  card.dataset.alerts = String(stream.alerts.length);
  if (last) {
    card.dataset.label = last.label;
    card.style.setProperty("--label", COLOURS[last.label]);
    stream.badgeEl.textContent = `${last.label.toUpperCase()} ${last.confidence.toFixed(2)}`;
    stream.barEl.style.width = pct(last.confidence);
    const latency = Number.isFinite(last.latency) ? ` · ${Math.round(last.latency)} ms` : "";
    const info = `${pts.length} utt. · v ${last.valence.toFixed(2)} a ${last.arousal.toFixed(2)}${latency}`;
    stream.infoEl.textContent = stream.ended ? `ended · ${info}` : info;
    card.classList.toggle("interim", !last.final);
  }
  card.classList.toggle("ended", stream.ended);
}

function renderCaptions(stream) {
  const items = [];
  for (let i = stream.points.length - 1; i >= 0 && items.length < MAX_CAPTIONS; i--) {
    const p = stream.points[i];
    if (!p.transcript) continue;
    const li = el("li", `caption${p.final ? "" : " interim"}${p.incongruent ? " incongruent" : ""}`);
    li.style.setProperty("--label", COLOURS[p.label]);
    li.append(el("time", null, clock(p.t1)), el("b", null, p.label), el("q", null, p.transcript));
    if (p.incongruent) li.append(el("span", "mark-incongruent", "≠ voice/words"));
    items.push(li);
  }
  stream.captionsEl.replaceChildren(...items.reverse());
}

function drawPlot(stream) {
  const ctx = stream.ctx;
  const pts = stream.points;
  ctx.clearRect(0, 0, PLOT_W, PLOT_H);
  const top = MARK_H, bottom = PLOT_H - BAND_H - 2, h = bottom - top;
  ctx.strokeStyle = "rgba(255,255,255,0.08)";
  ctx.lineWidth = 1;
  for (const y of [0, 0.5, 1]) {
    ctx.beginPath();
    ctx.moveTo(0, bottom - y * h + 0.5);
    ctx.lineTo(PLOT_W, bottom - y * h + 0.5);
    ctx.stroke();
  }
  if (!pts.length && !stream.alerts.length) return;
  let tmin, tmax;
  if (stream.group.isCall && Number.isFinite(stream.group.tmin)) {
    tmin = stream.group.tmin; tmax = stream.group.tmax;
  } else {
    tmin = pts.length ? pts[0].t0 : Date.now() - 30000;
    tmax = pts.length ? pts[pts.length - 1].t1 : Date.now();
  }
  if (tmax - tmin < 10000) tmin = tmax - 10000;
  const x = (t) => 4 + ((t - tmin) / (tmax - tmin)) * (PLOT_W - 8);
  ctx.fillStyle = "#6b7080";
  ctx.textAlign = "left";
  ctx.fillText(clock(tmin), 4, 9);
  ctx.textAlign = "right";
  ctx.fillText(clock(tmax), PLOT_W - 4, 9);
  ctx.textAlign = "left";
  // dominant label of each utterance as a band under the plot
  for (const p of pts) {
    ctx.fillStyle = COLOURS[p.label];
    ctx.globalAlpha = 0.35 + 0.65 * p.confidence;
    ctx.fillRect(x(p.t0), PLOT_H - BAND_H, Math.max(2, x(p.t1) - x(p.t0)), BAND_H);
  }
  ctx.globalAlpha = 1;
  // six scores, one line each, a point per utterance
  ctx.lineWidth = 1.6;
  LABELS.forEach((label, i) => {
    ctx.strokeStyle = COLOURS[label];
    ctx.fillStyle = COLOURS[label];
    ctx.beginPath();
    pts.forEach((p, j) => {
      const px = x(p.t1), py = bottom - p.scores[i] * h;
      if (j) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    });
    ctx.stroke();
    if (pts.length === 1) ctx.fillRect(x(pts[0].t1) - 2, bottom - pts[0].scores[i] * h - 2, 4, 4);
  });
  // ◆ marks: an incongruent utterance (voice and words disagree)
  ctx.fillStyle = COLOURS.fear;
  for (const p of pts) {
    if (!p.incongruent) continue;
    const px = x(p.t1);
    ctx.beginPath();
    ctx.moveTo(px, 1); ctx.lineTo(px + 5, 6); ctx.lineTo(px, 11); ctx.lineTo(px - 5, 6);
    ctx.fill();
  }
  // escalation alerts: a red line across the plot
  for (const a of stream.alerts) {
    if (a.t < tmin) continue;
    const px = Math.min(x(a.t), PLOT_W - 2);
    ctx.strokeStyle = "#ff3b3b";
    ctx.lineWidth = 2;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(px, 0); ctx.lineTo(px, PLOT_H);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#ff3b3b";
    ctx.fillText("!", px + 3, 10);
  }
}

function renderGroup(group) {
  const section = group.el;
  if (group.isCall) {
    const info = group.ended || group.started || {};
    // an `ended` message also carries the start time, for a daemon that missed `started`
    const started = Date.parse((group.started && group.started.time) || (group.ended && group.ended.started));
    const parts = [group.node, text(info.protocol)].filter(Boolean);
    if (started) parts.push(`started ${clock(started)}`);
    if (group.ended && group.ended.summary) parts.push(`${duration(num(group.ended.summary.duration_s))} long`);
    else if (started) parts.push(duration((Date.now() - started) / 1000));
    const md = info.metadata && typeof info.metadata === "object" ? info.metadata : {};
    for (const [k, v] of Object.entries(md).slice(0, 4)) parts.push(`${k}: ${text(v)}`);
    group.metaEl.textContent = parts.join(" · ");
    section.dataset.state = group.ended ? "ended" : "active";
    group.stateEl.textContent = group.ended
      ? `ended (${text(group.ended.reason) || "?"})${group.ended.error ? `: ${text(group.ended.error)}` : ""}`
      : "● live";
    if (group.alerts.length !== group.alertsEl.childElementCount) {
      group.alertsEl.replaceChildren(...group.alerts.slice(-5).map(alertItem));
    }
    if (group.ended && !group.summaryDrawn) {
      group.summaryDrawn = true;
      section.append(buildSummary(group));
    }
  } else {
    group.metaEl.textContent = `${group.streams.length} stream${group.streams.length === 1 ? "" : "s"}`;
  }
  applyFilter(group);
}

function alertItem(a) {
  const li = el("li", "alert");
  li.dataset.call = a.call;
  li.style.setProperty("--label", COLOURS[a.label]);
  li.append(
    el("time", null, clock(a.t)),
    el("b", null, `${a.role || "?"}: ${a.label} ${a.confidence.toFixed(2)}`),
    el("span", null, a.rule),
  );
  return li;
}

function renderAlerts() {
  dirty.alerts = false;
  $("alert-feed").hidden = model.alerts.length === 0;
  $("alerts").replaceChildren(...model.alerts.slice().reverse().map((a) => {
    const li = alertItem(a);
    li.prepend(el("span", "call-id", a.call));
    return li;
  }));
}

function buildSummary(group) {
  const d = group.ended;
  const s = d.summary && typeof d.summary === "object" ? d.summary : {};
  const box = el("div", "summary");
  box.dataset.call = group.key;
  const head = el("h3", null, `Call summary · ${duration(num(s.duration_s))} · ${text(d.reason) || "ended"}`);
  box.append(head);
  if (d.error) box.append(el("p", "error", text(d.error)));
  const table = el("table");
  const thead = el("tr");
  for (const h of ["role", "utterances", "share of labels", "mean scores"]) thead.append(el("th", null, h));
  table.append(thead);
  const utter = s.utterances && typeof s.utterances === "object" ? s.utterances : {};
  const share = s.share && typeof s.share === "object" ? s.share : {};
  const means = s.mean_scores && typeof s.mean_scores === "object" ? s.mean_scores : {};
  const roles = [...new Set([...Object.keys(utter), ...Object.keys(share), ...Object.keys(means)])];
  for (const role of roles) {
    const tr = el("tr");
    tr.append(el("td", "role", role), el("td", "num", text(num(utter[role]))));
    const stack = el("div", "stack");
    for (const label of LABELS) {
      const f = num(share[role] && share[role][label]);
      if (f <= 0) continue;
      const seg = el("span", null, f >= 0.12 ? `${label} ${pct(f)}` : "");
      seg.style.flexGrow = String(f);
      seg.style.background = COLOURS[label];
      seg.title = `${label} ${pct(f)}`;
      stack.append(seg);
    }
    const tdShare = el("td");
    tdShare.append(stack);
    const bars = el("div", "means");
    for (const label of LABELS) {
      const v = num(means[role] && means[role][label]);
      const b = el("span");
      b.style.height = `${Math.round(v * 100)}%`;
      b.style.background = COLOURS[label];
      b.title = `${label} ${v.toFixed(2)}`;
      bars.append(b);
    }
    const tdMeans = el("td");
    tdMeans.append(bars);
    tr.append(tdShare, tdMeans);
    table.append(tr);
  }
  box.append(table);
  if (Array.isArray(s.timeline) && s.timeline.length) box.append(summaryTimeline(s.timeline, roles, num(s.duration_s)));
  const peaks = (Array.isArray(s.peaks) ? s.peaks : []).sort((a, b) => num(b.confidence) - num(a.confidence));
  if (peaks.length) {
    const list = el("ul", "peaks");
    for (const p of peaks.slice(0, 6)) {
      const li = el("li");
      li.style.setProperty("--label", COLOURS[labelOf(p.label)]);
      li.append(
        el("time", null, duration(num(p.start_s))),
        el("b", null, `${text(p.role)} ${labelOf(p.label)} ${num(p.confidence).toFixed(2)}`),
        el("q", null, text(p.transcript)),
      );
      list.append(li);
    }
    box.append(el("h4", null, "Peaks"), list);
  }
  const alerts = Array.isArray(s.alerts) ? s.alerts : [];
  box.append(el("p", "alert-count", `${alerts.length} escalation alert${alerts.length === 1 ? "" : "s"}`));
  return box;
}

function summaryTimeline(timeline, roles, total) {
  const rows = roles.length ? roles : [...new Set(timeline.map((t) => text(t.role)))];
  const canvas = el("canvas", "timeline");
  const rowH = 14, labelW = 80, width = PLOT_W;
  canvas.width = width;
  canvas.height = rows.length * rowH + 4;
  const ctx = canvas.getContext("2d");
  const end = Math.max(total, ...timeline.map((t) => num(t.end_s)), 1);
  ctx.font = "11px system-ui, sans-serif";
  rows.forEach((role, i) => {
    ctx.fillStyle = "#9aa0aa";
    ctx.fillText(role, 2, i * rowH + 12);
  });
  for (const t of timeline) {
    const row = rows.indexOf(text(t.role));
    if (row < 0) continue;
    const x0 = labelW + (num(t.start_s) / end) * (width - labelW);
    const x1 = labelW + (num(t.end_s) / end) * (width - labelW);
    ctx.fillStyle = COLOURS[labelOf(t.label)];
    ctx.globalAlpha = 0.35 + 0.65 * num(t.confidence);
    ctx.fillRect(x0, row * rowH + 2, Math.max(2, x1 - x0), rowH - 4);
    if (t.incongruent) {
      ctx.globalAlpha = 1;
      ctx.fillStyle = "#fff";
      ctx.fillRect(x0, row * rowH + 2, 2, rowH - 4);
    }
  }
  ctx.globalAlpha = 1;
  return canvas;
}

function renderHeader() {
  dirty.header = false;
  const conn = $("connection");
  conn.textContent = model.connected ? "live" : "reconnecting…";
  conn.className = model.connected ? "on" : "off";
  const broker = $("broker");
  const up = model.broker && model.broker.connected;
  broker.textContent = model.broker ? `broker ${text(model.broker.url)} ${up ? "✓" : "✗"}` : "broker ?";
  broker.className = up ? "on" : "off";
  const nodes = [];
  for (const [name, n] of model.nodes) {
    const li = el("li", n.status === "online" ? "on" : "off", `${name} ${n.status || "?"}`);
    if (n.health) li.title = JSON.stringify(n.health);
    nodes.push(li);
  }
  $("nodes").replaceChildren(...nodes);
  const now = performance.now();
  while (model.eventTimes.length && model.eventTimes[0] < now - 10000) model.eventTimes.shift();
  let active = 0;
  for (const g of model.groups.values()) active += g.isCall && !g.ended;
  $("counts").textContent =
    `${model.streams.size} streams · ${active} live calls · ${(model.eventTimes.length / 10).toFixed(1)} events/s`;
}

// ---- filter -------------------------------------------------------------------------------------------

function applyFilter(group) {
  const q = $("filter").value.trim().toLowerCase();
  const hideEnded = $("hide-ended").checked && group.ended;
  const match = !q || group.key.toLowerCase().includes(q) || group.streams.some((s) => s.key.toLowerCase().includes(q));
  group.el.hidden = Boolean(hideEnded) || !match;
}

function refilter() {
  for (const group of model.groups.values()) applyFilter(group);
}

// ---- wiring -------------------------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (e) => {
    model.connected = true;
    reset();
    pending.length = pendingAt = 0;
    try { receive(JSON.parse(e.data)); } catch (err) { model.errors += 1; }
  });
  source.onmessage = (e) => { // a batch: whatever the daemon had queued for this tab
    try { receive(JSON.parse(e.data)); } catch (err) { model.errors += 1; }
  };
  source.onerror = () => {
    model.connected = false;
    dirty.header = true;
    schedule();
  };
}

function init() {
  $("legend").replaceChildren(...LABELS.map((l) => {
    const li = el("li", null, l);
    li.style.setProperty("--label", COLOURS[l]);
    return li;
  }));
  $("filter").addEventListener("input", refilter);
  $("hide-ended").addEventListener("change", refilter);
  setInterval(() => { // running call durations and the events/s figure
    for (const g of model.groups.values()) if (g.isCall && !g.ended) dirty.groups.add(g);
    dirty.header = true;
    schedule();
  }, 1000);
  window.dashboard = { model }; // for tests and for a look from the browser console
  connect();
}

init();
