// What the Train steps node shows about its run: loss history, validation, previews and status.
// Fed by live `loraloom.progress` payloads and, after a page reload, by the run's metrics records.
// Points are kept per step, so a resumed run that re-does steps, or history that overlaps live
// events, replaces points instead of drawing them twice.

export class RunState {
  constructor(run = null) {
    this.run = run;
    this.losses = new Map(); // step -> {step, loss, lr}
    this.validation = new Map(); // step -> {step, val_loss}
    this.images = []; // [{filename, subfolder, type}] for /view
    this.status = { state: null, step: 0, total: 0, it_s: null, eta_s: null, message: null };
  }

  get points() {
    return [...this.losses.values()].sort((a, b) => a.step - b.step);
  }

  get validationPoints() {
    return [...this.validation.values()].sort((a, b) => a.step - b.step);
  }

  /** Merge one `loraloom.progress` payload (see the contract in README "Live training view"). */
  applyProgress(payload) {
    for (const p of payload.points ?? []) this.losses.set(p.step, p);
    for (const v of payload.validation ?? []) this.validation.set(v.step, v);
    if (payload.images?.length) this.images = payload.images;
    const { state, step, total, it_s, eta_s, message } = payload;
    this.status = { state, step, total, it_s, eta_s, message };
  }

  /** Rebuild from the records of `GET /loraloom/runs/{run}/metrics` (metrics.jsonl lines). */
  applyRecords(records) {
    let lastStep = this.status.step;
    for (const r of records) {
      if (r.type === "step") this.losses.set(r.step, { step: r.step, loss: r.loss, lr: r.lr });
      else if (r.type === "validation") this.validation.set(r.step, { step: r.step, val_loss: r.val_loss });
      else if (r.type === "preview") this.images = [previewRef(this.run, r.path)];
      if (Number.isFinite(r.step)) lastStep = Math.max(lastStep, r.step);
    }
    // A reloaded page knows where the run got to, not whether it is still running.
    this.status = { ...this.status, step: lastStep, state: this.status.state ?? "idle" };
  }
}

// Previews are written to <output>/loraloom/runs/<run>/samples/; /view wants them relative to output.
function previewRef(run, path) {
  const filename = String(path).split(/[\\/]/).pop();
  return { filename, subfolder: `loraloom/runs/${run}/samples`, type: "output" };
}

/** "1:05" or "2:03:09" for a number of seconds; "" when unknown. */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.round(seconds);
  const [h, m, sec] = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
}
