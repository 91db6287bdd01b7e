// Canvas charts for the dashboard: plain 2D drawing, no library.
"use strict";

const cssColor = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// A 2D context sized to the canvas's CSS width (its height is the `height` attribute it was written with).
function chartContext(canvas) {
  if (!canvas.dataset.h) canvas.dataset.h = canvas.getAttribute("height");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = Number(canvas.dataset.h);
  canvas.style.height = h + "px";
  if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
  if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return {ctx, w, h};
}

function axisLabel(ctx, text, x, y, align) {
  ctx.fillStyle = cssColor("--muted");
  ctx.textAlign = align || "left";
  ctx.fillText(text, x, y);
}

const siNumber = (v) => {
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [scale, unit] of units) if (Math.abs(v) >= scale) return (v / scale).toPrecision(3) + unit;
  return Number(v.toPrecision(3)).toString();
};

// Tokens per step, decode below prefill, against the step token budget; preemptions as red ticks.
function drawSteps(canvas, steps, budget) {
  const {ctx, w, h} = chartContext(canvas);
  const top = 14, bottom = h - 14, left = 34;
  const most = Math.max(budget, ...steps.map((s) => s.decode + s.prefill), 1);
  const y = (v) => bottom - (v / most) * (bottom - top);
  const n = Math.max(steps.length, 60);
  const bw = (w - left) / n;
  steps.forEach((s, i) => {
    const x = left + (n - steps.length + i) * bw;
    ctx.fillStyle = cssColor("--decode");
    ctx.fillRect(x, y(s.decode), Math.max(1, bw - 1), bottom - y(s.decode));
    ctx.fillStyle = cssColor("--prefill");
    ctx.fillRect(x, y(s.decode + s.prefill), Math.max(1, bw - 1), y(s.decode) - y(s.decode + s.prefill));
    if (s.preempted) { ctx.fillStyle = cssColor("--danger"); ctx.fillRect(x, top - 10, Math.max(2, bw - 1), 8); }
  });
  ctx.strokeStyle = cssColor("--danger");
  ctx.setLineDash([4, 3]);
  ctx.beginPath(); ctx.moveTo(left, y(budget)); ctx.lineTo(w, y(budget)); ctx.stroke();
  ctx.setLineDash([]);
  axisLabel(ctx, `max_num_batched_tokens ${budget}`, w - 4, y(budget) - 3, "right");
  axisLabel(ctx, siNumber(most), 2, top + 8);
  axisLabel(ctx, "0", 2, bottom);
  axisLabel(ctx, `last ${steps.length} steps →`, left, h - 2);
}

// Lines over the last minute: each series is {points: [[age_s, value]], max, color, label}.
function drawTimeline(canvas, series) {
  const {ctx, w, h} = chartContext(canvas);
  const top = 8, bottom = h - 14, left = 34;
  const x = (age) => left + (1 - age / 60) * (w - left);
  for (const s of series) {
    const most = Math.max(s.max, ...s.points.map((p) => p[1]), 1e-9);
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.points.forEach((p, i) => {
      const px = x(p[0]), py = bottom - (p[1] / most) * (bottom - top);
      if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    });
    ctx.stroke();
    if (s.label) axisLabel(ctx, s.label(most), 2, top + 8 + 12 * series.indexOf(s));
  }
  axisLabel(ctx, "-60 s", left, h - 2);
  axisLabel(ctx, "now", w - 2, h - 2, "right");
}

// Counts on log-spaced bins (edges in seconds).
function drawHistogram(canvas, edges, counts, color, title) {
  const {ctx, w, h} = chartContext(canvas);
  const top = 12, bottom = h - 13, left = 4;
  const most = Math.max(...counts, 1);
  const bw = (w - left) / counts.length;
  ctx.fillStyle = color;
  counts.forEach((c, i) => {
    const bh = (c / most) * (bottom - top);
    ctx.fillRect(left + i * bw, bottom - bh, Math.max(1, bw - 1), bh);
  });
  edges.forEach((e, i) => {
    const decade = Math.log10(e);
    if (Math.abs(decade - Math.round(decade)) < 1e-6 && i % 4 === 0) {
      axisLabel(ctx, e >= 1 ? `${e} s` : `${e * 1000} ms`, left + i * bw, h - 2, i === 0 ? "left" : "center");
    }
  });
  const total = counts.reduce((a, b) => a + b, 0);
  axisLabel(ctx, `${title}: ${total} samples`, w - 2, top - 1, "right");
}

// Log-log roofline: the roof min(peak FLOP/s, bandwidth x intensity) and each step's point.
function drawRoofline(canvas, roof, points) {
  const {ctx, w, h} = chartContext(canvas);
  const top = 10, bottom = h - 16, left = 44, right = w - 8;
  const xs = points.map((p) => p.intensity), ys = points.map((p) => p.flops_per_s);
  const peak = roof && roof.peak_flops, bw = roof && roof.bandwidth;
  const xmin = Math.min(0.5, ...xs) / 2, xmax = Math.max(2e3, ...xs) * 2;
  const ymin = Math.min(...(ys.length ? ys : [1e9])) / 10, ymax = Math.max(peak || 0, ...ys, 1e9) * 3;
  const lx = (v) => left + (Math.log10(v) - Math.log10(xmin)) / (Math.log10(xmax) - Math.log10(xmin)) * (right - left);
  const ly = (v) => bottom - (Math.log10(v) - Math.log10(ymin)) / (Math.log10(ymax) - Math.log10(ymin)) * (bottom - top);
  if (peak && bw) {
    ctx.strokeStyle = cssColor("--text");
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    const ridge = peak / bw;
    const start = Math.max(xmin, ymin / bw);
    ctx.moveTo(lx(start), ly(bw * start));
    if (ridge < xmax) { ctx.lineTo(lx(ridge), ly(peak)); ctx.lineTo(lx(xmax), ly(peak)); } else ctx.lineTo(lx(xmax), ly(bw * xmax));
    ctx.stroke();
    axisLabel(ctx, `peak ${siNumber(peak)}FLOP/s`, right, ly(peak) - 4, "right");
    axisLabel(ctx, `${siNumber(bw)}B/s`, lx(start) + 4, ly(bw * start) - 4);
  }
  points.forEach((p, i) => {
    const last = i === points.length - 1;
    ctx.fillStyle = last ? cssColor("--danger") : (p.prefill ? cssColor("--prefill") : cssColor("--decode"));
    ctx.globalAlpha = last ? 1 : 0.45;
    ctx.beginPath();
    ctx.arc(lx(p.intensity), ly(p.flops_per_s), last ? 5 : 3, 0, 2 * Math.PI);
    ctx.fill();
  });
  ctx.globalAlpha = 1;
  axisLabel(ctx, "FLOP/byte →", right, h - 3, "right");
  axisLabel(ctx, siNumber(xmin), left, h - 3);
  axisLabel(ctx, `${siNumber(ymax)}`, 2, top + 8);
  axisLabel(ctx, `${siNumber(ymin)}`, 2, bottom);
}
