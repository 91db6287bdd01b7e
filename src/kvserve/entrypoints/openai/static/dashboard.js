// The dashboard: reads /dashboard/events (server-sent events, with the API key) and draws each frame.
"use strict";

const STATE_NAMES = ["free", "cached", "used", "shared"];
const STATE_COLORS = () => [cssColor("--free"), cssColor("--cached"), cssColor("--used"), cssColor("--shared")];
const el = (id) => document.getElementById(id);
let latest = null;  // the last frame
let pools = [];     // per pool: {canvas, cell, columns, holders}

function pct(v) { return (100 * v).toFixed(1) + "%"; }

// A block's holders, from the sequences' tables: block id -> [{seq, index}].
function holdersOf(pool) {
  const holders = new Map();
  for (const seq of pool.sequences) {
    seq.block_table.forEach((block, index) => {
      if (block < 0) return;
      if (!holders.has(block)) holders.set(block, []);
      holders.get(block).push({seq, index});
    });
  }
  return holders;
}

function drawPools(frame) {
  const box = el("pools");
  while (pools.length < frame.pools.length) {
    const title = document.createElement("div");
    title.className = "muted";
    const canvas = document.createElement("canvas");
    canvas.setAttribute("height", "10");
    canvas.addEventListener("mousemove", (event) => hoverBlock(event, pools.length && pools.find((p) => p.canvas === canvas)));
    canvas.addEventListener("mouseleave", () => el("tooltip").classList.add("hidden"));
    box.append(title, canvas);
    pools.push({canvas, title});
  }
  const counts = [0, 0, 0, 0];
  const colors = STATE_COLORS();
  frame.pools.forEach((pool, p) => {
    const view = pools[p];
    view.pool = pool;
    view.holders = holdersOf(pool);
    const n = pool.states.length;
    const width = view.canvas.clientWidth || 800;
    const cell = n <= 512 ? 14 : n <= 2048 ? 9 : n <= 8192 ? 6 : 3;
    const columns = Math.max(1, Math.floor(width / cell));
    const rows = Math.ceil(n / columns);
    view.cell = cell;
    view.columns = columns;
    view.canvas.setAttribute("height", String(rows * cell));
    view.canvas.dataset.h = String(rows * cell);
    const {ctx} = chartContext(view.canvas);
    for (let i = 0; i < n; i++) {
      const s = pool.states.charCodeAt(i) - 48;
      counts[s]++;
      ctx.fillStyle = colors[s];
      ctx.fillRect((i % columns) * cell, Math.floor(i / columns) * cell, cell - 1, cell - 1);
    }
    view.title.textContent = frame.pools.length > 1 ? `replica ${p}: ${n} blocks of ${pool.block_size} tokens` :
      `${n} blocks of ${pool.block_size} tokens · ${pool.waiting} waiting`;
  });
  STATE_NAMES.forEach((name, s) => { el(`count-${name}`).textContent = counts[s]; });
}

function hoverBlock(event, view) {
  const tip = el("tooltip");
  if (!view || !view.pool) return;
  const rect = view.canvas.getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) / view.cell), row = Math.floor((event.clientY - rect.top) / view.cell);
  const block = row * view.columns + col;
  if (col >= view.columns || block >= view.pool.states.length) { tip.classList.add("hidden"); return; }
  const state = STATE_NAMES[view.pool.states.charCodeAt(block) - 48];
  const holders = view.holders.get(block) || [];
  const bs = view.pool.block_size;
  const lines = [`block ${block}: ${state}, ref count ${holders.length}`];
  for (const {seq, index} of holders) {
    const first = index * bs, last = Math.min((index + 1) * bs, seq.tokens) - 1;
    lines.push(`  ${seq.request_id} (seq ${seq.seq_id}): tokens ${first}–${last}, table entry ${index}`);
  }
  if (state === "cached") lines.push("  keeps a cached prefix; reused by a matching prompt until evicted");
  tip.textContent = lines.join("\n");
  tip.style.left = event.clientX + 14 + "px";
  tip.style.top = event.clientY + 14 + "px";
  tip.classList.remove("hidden");
}

function drawRequests(frame) {
  const box = el("requests");
  const rows = [];
  frame.pools.forEach((pool) => {
    const byRequest = new Map();
    for (const seq of pool.sequences) {
      if (!byRequest.has(seq.request_id)) byRequest.set(seq.request_id, []);
      byRequest.get(seq.request_id).push(seq);
    }
    const refs = holdersOf(pool);
    for (const [requestId, seqs] of byRequest) {
      seqs.forEach((seq, k) => {
        const row = document.createElement("div");
        row.className = "seq" + (k > 0 ? " fork" : "");
        row.dataset.request = requestId;
        const label = document.createElement("div");
        const shared = seq.block_table.filter((b) => b >= 0 && (refs.get(b) || []).length > 1).length;
        const parts = [`${requestId.slice(0, 22)} · seq ${seq.seq_id}`,
          `${seq.computed}/${seq.tokens} tokens computed (prompt ${seq.prompt_tokens})`];
        if (seq.cached_tokens) parts.push(`prefix-cache hit ${seq.cached_tokens} tokens`);
        if (seqs.length > 1) parts.push(`${k === 0 ? "first" : "fork"} of ${seqs.length}`);
        if (shared) parts.push(`${shared} shared blocks`);
        if (seq.preemptions) parts.push(`preempted ${seq.preemptions}×`);
        label.textContent = parts.join(" · ");
        label.title = label.textContent;
        const blocks = document.createElement("div");
        blocks.className = "blocks";
        seq.block_table.forEach((b, i) => {
          const cell = document.createElement("i");
          if (b < 0) cell.className = "dropped";
          else if ((refs.get(b) || []).length > 1) cell.className = "shared";
          if (b >= 0 && (i + 1) * pool.block_size > seq.computed) cell.classList.add("partial");
          cell.title = b < 0 ? "released behind the sliding window" : `block ${b}`;
          blocks.appendChild(cell);
        });
        row.append(label, blocks);
        rows.push(row);
      });
    }
  });
  if (!rows.length) {
    const none = document.createElement("span");
    none.className = "muted";
    none.textContent = "no sequence is running";
    rows.push(none);
  }
  box.replaceChildren(...rows);
}

function drawStats(frame) {
  const pc = frame.prefix_cache;
  const minute = frame.timeline;
  const first = minute[0], last = minute[minute.length - 1];
  const queries = first && last ? last[4] - first[4] : 0, hits = first && last ? last[5] - first[5] : 0;
  const seconds = minute.length > 1 ? Math.max(1, minute[0][0] - minute[minute.length - 1][0]) : 1;
  const tokens = minute.reduce((a, r) => a + r[1], 0);
  el("model").textContent = `${frame.model} · ${frame.num_blocks} KV blocks × ${frame.block_size} tokens · max_num_seqs ${frame.max_num_seqs}`;
  el("stat-running").textContent = frame.running;
  el("stat-waiting").textContent = frame.waiting;
  el("stat-kv").textContent = last ? pct(last[3]) : "0.0%";
  el("stat-hit-rate").textContent = pc.queries ? pct(pc.hits / pc.queries) : "–";
  el("stat-hit-rate-minute").textContent = queries ? pct(hits / queries) : "–";
  el("stat-throughput").textContent = (tokens / seconds).toFixed(1);
  el("stat-preemptions").textContent = frame.preemptions;
  const recent = frame.steps.filter((s) => s[0] <= 5);
  el("stat-steps").textContent = (recent.length / 5).toFixed(1);
}

function drawCharts(frame) {
  const steps = frame.steps.map((s) => ({age: s[0], decode: s[1], prefill: s[2], seqs: s[3], preempted: s[4],
                                         ms: s[5], flops: s[6], bytes: s[7]}));
  drawSteps(el("steps-chart"), steps.slice(-120), frame.max_num_batched_tokens);
  const points = steps.filter((s) => s.flops && s.ms > 0 && s.decode + s.prefill > 0).slice(-60).map((s) => ({
    intensity: s.flops / s.bytes, flops_per_s: s.flops / (s.ms / 1000), prefill: s.prefill > 0,
  }));
  drawRoofline(el("roofline-chart"), frame.roofline, points);
  const roof = frame.roofline;
  const lastPoint = points[points.length - 1];
  el("roofline-note").textContent = !roof ? "measuring this machine's floors…" :
    (roof.hardware || "no floors for this device") + (lastPoint ?
      ` · latest step: ${lastPoint.intensity.toFixed(1)} FLOP/byte, ${siNumber(lastPoint.flops_per_s)}FLOP/s` +
      (roof.peak_flops ? ` (${pct(lastPoint.flops_per_s / Math.min(roof.peak_flops, roof.bandwidth * lastPoint.intensity))} of the roof)` : "") : "");
  const t = frame.timeline;
  drawTimeline(el("timeline-chart"), [
    {points: t.map((r) => [r[0], r[1]]), max: 1, color: cssColor("--decode"), label: (m) => `${siNumber(m)} tok/s`},
    {points: t.map((r) => [r[0], 100 * r[3]]), max: 100, color: cssColor("--shared")},
    {points: t.map((r, i) => [r[0], i && r[4] > t[i - 1][4] ? 100 * (r[5] - t[i - 1][5]) / (r[4] - t[i - 1][4]) : 0]),
     max: 100, color: cssColor("--cached")},
  ]);
  drawHistogram(el("ttft-chart"), frame.latency_edges, frame.ttft_counts, cssColor("--prefill"), "TTFT");
  drawHistogram(el("itl-chart"), frame.latency_edges, frame.itl_counts, cssColor("--used"), "ITL");
}

function draw(frame) {
  latest = frame;
  drawStats(frame);
  drawPools(frame);
  drawRequests(frame);
  drawCharts(frame);
  document.body.dataset.frames = String(Number(document.body.dataset.frames || 0) + 1);
}

// Reads the event stream until it ends, then reconnects after a pause.
async function connect() {
  for (;;) {
    try {
      const response = await authorizedFetch("/dashboard/events", {headers: {Accept: "text/event-stream"}});
      await readEvents(response, draw);
    } catch (error) {
      el("model").textContent = `disconnected (${error.message}); retrying…`;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

window.addEventListener("resize", () => { if (latest) draw(latest); });
connect();
