// The live loss chart, drawn on a plain canvas: training loss (raw and smoothed), validation loss,
// and the learning rate on its own axis on the right.

export const COLORS = {
  background: "#15181d",
  grid: "#262b33",
  text: "#8b95a3",
  loss: "#58a6ff",
  validation: "#f2cc60",
  lr: "#d2a8ff",
};
const FONT = "11px system-ui, sans-serif";
const PAD = { left: 46, right: 54, top: 24, bottom: 22 };

/**
 * Draw `points` ([{step, loss, lr}]) and `validation` ([{step, val_loss}]) on `canvas`, at its CSS size.
 * The x axis spans the steps logged so far; the status bar above it shows how far the run has to go.
 */
export function drawLossChart(canvas, { points, validation }) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width < 10 || height < 10) return;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = FONT;

  if (!points.length && !validation.length) {
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("no steps yet: queue the graph to train", width / 2, height / 2);
    return;
  }

  const plot = { x: PAD.left, y: PAD.top, w: width - PAD.left - PAD.right, h: height - PAD.top - PAD.bottom };
  const lastStep = Math.max(...points.map((p) => p.step), ...validation.map((v) => v.step));
  const xEnd = Math.max(lastStep, 1);
  const xTicks = niceTicks(0, xEnd, 5, 1).filter((t) => t <= xEnd);
  const losses = [...points.map((p) => p.loss), ...validation.map((v) => v.val_loss)].filter(Number.isFinite);
  const yTicks = losses.length ? niceTicks(Math.min(...losses), Math.max(...losses), 4) : [0, 1]; // all NaN: axes only
  const lrMax = Math.max(0, ...points.map((p) => p.lr).filter(Number.isFinite));
  const x = scale(0, xEnd, plot.x, plot.x + plot.w);
  const y = scale(yTicks[0], yTicks.at(-1), plot.y + plot.h, plot.y);
  const yLr = scale(0, lrMax * 1.1 || 1, plot.y + plot.h, plot.y);

  drawGrid(ctx, plot, xTicks, yTicks, x, y);
  drawLrAxis(ctx, plot, lrMax, yLr);

  if (lrMax > 0) {
    ctx.setLineDash([4, 3]);
    strokeLine(ctx, points.map((p) => [x(p.step), yLr(p.lr)]), COLORS.lr, 1.25);
    ctx.setLineDash([]);
  }
  const raw = points.map((p) => [x(p.step), y(p.loss)]);
  strokeLine(ctx, raw, withAlpha(COLORS.loss, 0.35), 1);
  const smooth = smoothed(points.map((p) => p.loss));
  strokeLine(ctx, points.map((p, i) => [x(p.step), y(smooth[i])]), COLORS.loss, 2);
  if (points.length === 1) dot(ctx, raw[0], COLORS.loss, 3);

  const val = validation.map((v) => [x(v.step), y(v.val_loss)]);
  strokeLine(ctx, val, withAlpha(COLORS.validation, 0.6), 1.25);
  for (const p of val) dot(ctx, p, COLORS.validation, 3.5);

  drawLegend(ctx, plot, points, validation, lrMax > 0);
}

/** About `count` round tick values covering [lo, hi], at least `minStep` apart. */
export function niceTicks(lo, hi, count, minStep = 0) {
  if (!(hi > lo)) [lo, hi] = [lo - (Math.abs(lo) * 0.1 || 1), hi + (Math.abs(hi) * 0.1 || 1)];
  const raw = Math.max((hi - lo) / count, minStep);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw * 0.999);
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t < hi + step * 0.999; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

/** Tick labels with as many decimals as the tick spacing needs, the same for every tick. */
function tickFormatter(ticks) {
  const step = ticks.length > 1 ? ticks[1] - ticks[0] : 1;
  const decimals = Math.min(10, Math.max(0, Math.ceil(-Math.log10(step) - 1e-9)));
  return (v) => v.toFixed(decimals);
}

/** Debiased exponential moving average; smooths more as the run gets longer. */
function smoothed(values) {
  const weight = Math.min(0.9, Math.max(0, 1 - 8 / values.length));
  let ema = 0;
  return values.map((v, i) => {
    ema = weight * ema + (1 - weight) * v;
    return ema / (1 - weight ** (i + 1));
  });
}

function scale(d0, d1, r0, r1) {
  return (v) => r0 + ((v - d0) / (d1 - d0 || 1)) * (r1 - r0);
}

function drawGrid(ctx, plot, xTicks, yTicks, x, y) {
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const label = tickFormatter(yTicks);
  for (const t of yTicks) {
    const py = Math.round(y(t)) + 0.5;
    line(ctx, plot.x, py, plot.x + plot.w, py);
    ctx.fillText(label(t), plot.x - 6, py);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) {
    const px = Math.round(x(t)) + 0.5;
    line(ctx, px, plot.y, px, plot.y + plot.h);
    ctx.fillText(String(t), px, plot.y + plot.h + 5);
  }
}

function drawLrAxis(ctx, plot, lrMax, yLr) {
  if (!(lrMax > 0)) return;
  ctx.fillStyle = COLORS.lr;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  for (const v of [0, lrMax]) ctx.fillText(v ? formatLr(v) : "0", plot.x + plot.w + 6, yLr(v));
}

function drawLegend(ctx, plot, points, validation, showLr) {
  const items = [];
  if (points.length) items.push(["loss", COLORS.loss, `loss ${formatNumber(points.at(-1).loss)}`]);
  if (validation.length) {
    items.push(["val", COLORS.validation, `val ${formatNumber(validation.at(-1).val_loss)}`]);
  }
  if (showLr) items.push(["lr", COLORS.lr, `lr ${formatLr(points.at(-1).lr)}`]);
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let px = plot.x;
  const py = PAD.top / 2;
  for (const [kind, color, label] of items) {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.setLineDash(kind === "lr" ? [4, 3] : []);
    if (kind === "val") dot(ctx, [px + 7, py], color, 3.5);
    else line(ctx, px, py, px + 14, py);
    ctx.setLineDash([]);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(label, px + 19, py);
    px += 19 + ctx.measureText(label).width + 14;
  }
}

function strokeLine(ctx, xy, color, width) {
  if (xy.length < 2) return;
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.lineJoin = "round";
  ctx.beginPath();
  xy.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
}

function line(ctx, x0, y0, x1, y1) {
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  ctx.lineTo(x1, y1);
  ctx.stroke();
}

function dot(ctx, [px, py], color, radius) {
  ctx.fillStyle = color;
  ctx.beginPath();
  ctx.arc(px, py, radius, 0, 2 * Math.PI);
  ctx.fill();
}

function withAlpha(hex, alpha) {
  return hex + Math.round(alpha * 255).toString(16).padStart(2, "0");
}

function formatNumber(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1000 || a < 0.001 ? v.toExponential(1) : String(+v.toPrecision(4));
}

function formatLr(v) {
  return v.toExponential(1).replace(".0e", "e");
}
