// LoRA Loom front end: a live view on every "Train steps" node (status, loss chart, latest previews).
// It listens to the `loraloom.progress` events the node sends while training, and after a page
// reload refetches the run's history from GET /loraloom/runs/{run}/metrics.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COLORS, drawLossChart } from "./loss_chart.js";
import { formatDuration, RunState } from "./run_state.js";

const NODE_TYPE = "LoraLoomTrainSteps";
const EVENT = "loraloom.progress";
const RUN_WIDGET = "run_name";
const STATUS_HEIGHT = 46;
const CHART_MIN_HEIGHT = 190;
const WIDGET_MARGIN = 10; // the front end's default margin around a DOM widget
const STATE_COLORS = {
  loading: COLORS.text, training: COLORS.loss, saving: COLORS.lr,
  done: "#3fb950", cancelled: COLORS.validation, error: "#f85149", idle: COLORS.text,
};

const STYLE = `
.loraloom-view { display: flex; flex-direction: column; gap: 6px; font: 12px system-ui, sans-serif;
  color: ${COLORS.text}; box-sizing: border-box; }
.loraloom-status { display: flex; flex-direction: column; gap: 4px; height: ${STATUS_HEIGHT - 6}px; }
.loraloom-status-line { display: flex; gap: 10px; align-items: baseline; white-space: nowrap; overflow: hidden; }
.loraloom-state { font-weight: 600; text-transform: uppercase; letter-spacing: .04em; font-size: 11px; }
.loraloom-figures { color: #c9d1d9; font-variant-numeric: tabular-nums; }
.loraloom-message { overflow: hidden; text-overflow: ellipsis; }
.loraloom-bar { height: 3px; background: ${COLORS.grid}; border-radius: 2px; overflow: hidden; }
.loraloom-bar > div { height: 100%; width: 0; background: ${COLORS.loss}; transition: width .3s; }
.loraloom-chart { flex: 1 1 auto; min-height: ${CHART_MIN_HEIGHT}px; width: 100%; border-radius: 6px; }
.loraloom-previews img { display: block; width: 100%; border-radius: 6px; cursor: zoom-in; }
`;

class TrainView {
  constructor(node) {
    this.node = node;
    this.state = new RunState();
    this.el = element("div", "loraloom-view");
    const status = element("div", "loraloom-status", this.el);
    const line = element("div", "loraloom-status-line", status);
    this.stateLabel = element("span", "loraloom-state", line);
    this.figures = element("span", "loraloom-figures", line);
    this.message = element("span", "loraloom-message", line);
    this.bar = element("div", "", element("div", "loraloom-bar", status));
    this.canvas = element("canvas", "loraloom-chart", this.el);
    this.previews = element("div", "loraloom-previews", this.el);
    const widget = node.addDOMWidget("loraloom_live", "loraloom_live", this.el, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => this.minHeight(),
    });
    widget.serialize = false; // nothing to save in the workflow: the run's log is the record
    new ResizeObserver(() => this.drawChart()).observe(this.canvas);
    this.render();
  }

  /** A payload for this node: start over when it is about a different run than the one shown. */
  onProgress(payload) {
    if (payload.run !== this.state.run) this.state = new RunState(payload.run);
    this.state.applyProgress(payload);
    this.render();
  }

  /** Show what run `run` has logged so far (nothing if it was never started). */
  async loadHistory(run) {
    const response = await api.fetchApi(`/loraloom/runs/${encodeURIComponent(run)}/metrics`);
    if (this.state.run !== run) this.state = new RunState(run);
    if (response.ok) this.state.applyRecords((await response.json()).events);
    this.render();
  }

  render() {
    const { state, step, total, it_s, eta_s, message } = this.state.status;
    const label = state ?? "idle";
    this.stateLabel.textContent = label;
    this.stateLabel.style.color = STATE_COLORS[label] ?? COLORS.text;
    const figures = [total ? `step ${step} / ${total}` : step ? `step ${step}` : ""];
    if (it_s) figures.push(it_s >= 1 ? `${it_s.toFixed(2)} it/s` : `${(1 / it_s).toFixed(1)} s/it`);
    if (state === "training" && Number.isFinite(eta_s)) figures.push(`ETA ${formatDuration(eta_s)}`);
    this.figures.textContent = figures.filter(Boolean).join(" · ");
    this.message.textContent = [this.state.run, message].filter(Boolean).join(": ");
    this.bar.style.width = total ? `${Math.min(100, (100 * step) / total)}%` : "0";
    this.bar.style.background = STATE_COLORS[label] ?? COLORS.loss;
    this.renderPreviews();
    this.drawChart();
    // Reported for tests and for anyone inspecting the page.
    this.el.dataset.state = label;
    this.el.dataset.points = String(this.state.losses.size);
    this.el.dataset.validation = String(this.state.validation.size);
  }

  drawChart() {
    drawLossChart(this.canvas, {
      points: this.state.points,
      validation: this.state.validationPoints,
    });
  }

  renderPreviews() {
    const urls = this.state.images.map((ref) => api.apiURL(`/view?${new URLSearchParams(ref)}`));
    const shown = [...this.previews.children].map((img) => img.getAttribute("src"));
    if (urls.join() === shown.join()) return;
    this.previews.replaceChildren(...urls.map((url) => {
      const img = element("img");
      img.src = url;
      img.title = "latest preview: click to open";
      img.onclick = () => window.open(url, "_blank");
      img.onload = () => this.grow();
      return img;
    }));
  }

  minHeight() {
    const width = this.node.size[0] - 2 * WIDGET_MARGIN;
    let previews = 0;
    for (const img of this.previews.children) {
      if (img.naturalWidth) previews += 6 + (width * img.naturalHeight) / img.naturalWidth;
    }
    return STATUS_HEIGHT + CHART_MIN_HEIGHT + previews;
  }

  /** Make room for what was added, never shrink what the user sized. */
  grow() {
    const [width, height] = this.node.size;
    this.node.setSize([width, Math.max(height, this.node.computeSize()[1])]);
    this.node.setDirtyCanvas(true, true);
  }
}

function element(tag, className = "", parent = null) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  parent?.append(el);
  return el;
}

/** The node an execution id names: "12", or "5:12" for node 12 inside subgraph node 5. */
function nodeForExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(Number(part)) ?? graph?.getNodeById(part);
    graph = node?.subgraph;
  }
  return node;
}

function showHistory(node) {
  const run = node.widgets?.find((w) => w.name === RUN_WIDGET)?.value;
  if (run) node.loraloomView.loadHistory(run).catch((error) => console.warn("LoRA Loom:", error));
}

app.registerExtension({
  name: "LoraLoom.TrainView",

  setup() {
    const style = element("style");
    style.textContent = STYLE;
    document.head.append(style);
    api.addEventListener(EVENT, ({ detail }) => nodeForExecutionId(detail.node)?.loraloomView?.onProgress(detail));
  },

  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    node.loraloomView = new TrainView(node);
    node.setSize([Math.max(node.size[0], 460), node.computeSize()[1]]);
    // Naming another run shows that run's history.
    const runWidget = node.widgets?.find((w) => w.name === RUN_WIDGET);
    if (runWidget) {
      const callback = runWidget.callback;
      runWidget.callback = function (...args) {
        showHistory(node);
        return callback?.apply(this, args);
      };
    }
  },

  // After a page reload or opening a saved workflow: redraw the run's history from its metrics log.
  loadedGraphNode(node) {
    if (node.loraloomView) showHistory(node);
  },
});
