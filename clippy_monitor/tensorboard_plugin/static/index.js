// The Clippy tab of TensorBoard (clippy-monitor).
//
// TensorBoard renders this ES module in the plugin's iframe and calls render().
// All data comes from the plugin's routes (relative URLs: the iframe's base is
// data/plugin/clippy/): runs, summary, series, heatmap, layers; plotly.js is
// served by the plugin from the installed plotly package (no CDN).
//
// Views: loss and task losses with divergence events (step-a/b/c, micro) and
// what the recovery ladder did (rollbacks, skipped steps: /summary's recovery);
// sharpness at the probed steps with the stability limit at 2 (/series's sharpness);
// heatmaps layers x steps of per-layer metrics on a log colour scale; a layer
// table at a chosen step (Figure 4b of Tang et al., KDD 2023).  Hovering a
// step marks it in every plot; zooming one plot zooms all and re-fetches that
// range at full resolution (the backend downsamples with min/max envelopes,
// never by striding, so spikes survive at every zoom level).

// Metrics, rules, moments and event kinds come from the server (/summary's
// catalog: clippy_monitor/catalog.py, the one vocabulary of every reader).
const RUN_COLORS = ['#1565c0', '#7b1fa2', '#00897b', '#6d4c41', '#ad1457', '#546e7a'];
const FACTOR_SCALE = [[0, '#7f0000'], [0.35, '#d7301f'], [0.6, '#fc8d59'], [0.85, '#fdd49e'], [1, '#fff7ec']];
const LIVE_MS = 5000;
const PLOT_CONFIG = {
  displaylogo: false,
  responsive: true,
  modeBarButtonsToRemove: ['select2d', 'lasso2d', 'autoScale2d', 'toggleSpikelines'],
};
// Loss plot: event labels in two rows just above the plot, under the mode bar (about 28 px);
// a third row, above them, for the recovery ladder's labels ("rollback → 25") when there are any.
const LABEL_ROW_PX = 13;
const MODE_BAR_PX = 28;
// Skipped steps: markers along the bottom of the loss plot (y2 is 0..1 over the plot height).
const SKIP_MARK_Y = 0.03;
const FONT = {family: 'Roboto, system-ui, -apple-system, "Segoe UI", sans-serif', size: 12, color: '#212121'};

export async function render() {
  addStyle();
  const root = el('div', {class: 'clippy-root'});
  document.body.appendChild(root);
  const status = el('div', {class: 'clippy-status'}, 'Loading plotly.js…');
  root.appendChild(status);
  try {
    await loadScript('./plotly.min.js');
  } catch (err) {
    status.textContent = 'Could not load plotly.js from the plugin: ' + err;
    return;
  }
  status.remove();
  const app = new ClippyApp(root);
  window.clippyApp = app; // for debugging and the browser tests
  await app.start();
}

class ClippyApp {
  constructor(root) {
    this.root = root;
    this.runs = [];            // from /runs
    this.selected = [];        // run names, in selection order
    this.summaries = {};       // run -> /summary
    this.range = null;         // [start, end] steps or null (everything)
    this.tableStep = null;     // the step asked for; the table on screen: tableBox.dataset.step
    this.tableRequest = 0;     // the latest drawTables call (older answers are dropped)
    this.hoverStep = null;
    this.vocab = null;         // vocabulary() of /summary's catalog
    this.metrics = null;       // heatmaps shown (the catalog's default ones at first)
    this.plots = [];           // {div, kind, run, metric, payload, baseShapes, marksKey}
    this.heatmapKey = null;    // metrics and runs of the heatmap grid on screen
    this.heatmapJobs = [];     // [{metric, divs}] of that grid
    this.live = true;
    this.renderToken = 0;
    this.hoverFrame = 0;
    this.build();
  }

  // ------------------------------------------------------------------ layout

  build() {
    const bar = el('div', {class: 'clippy-toolbar'});
    this.runBox = el('div', {class: 'clippy-runs'});
    this.stepInput = el('input', {type: 'number', placeholder: 'step', class: 'clippy-step', title: 'Show the layer table at this step'});
    this.stepInput.addEventListener('keydown', (e) => { if (e.key === 'Enter') this.showStep(this.stepInput.value); });
    const stepButton = el('button', {}, 'Show step');
    stepButton.addEventListener('click', () => this.showStep(this.stepInput.value));
    const resetButton = el('button', {title: 'Show all steps'}, 'Reset zoom');
    resetButton.addEventListener('click', () => this.setRange(null));
    this.liveBox = el('input', {type: 'checkbox'});
    this.liveBox.checked = this.live;
    this.liveBox.addEventListener('change', () => { this.live = this.liveBox.checked; this.schedulePoll(); });
    this.info = el('span', {class: 'clippy-info'});
    bar.append(
      el('span', {class: 'clippy-title'}, 'Clippy'), this.runBox,
      el('span', {class: 'clippy-group'}, [this.stepInput, stepButton, resetButton,
        el('label', {title: 'Re-read the records every 5 s'}, [this.liveBox, ' live'])]),
      this.info);
    this.eventsBox = el('div', {class: 'clippy-events'});
    this.lossDiv = el('div', {class: 'clippy-plot clippy-loss'});
    this.logBox = el('input', {type: 'checkbox'});
    this.logBox.addEventListener('change', () => this.drawLoss(this.renderToken));
    this.lossNote = el('div', {class: 'clippy-note'});
    // Sharpness (runs recorded with sharpness_every): shown only when a selected run has it.
    this.sharpDiv = el('div', {class: 'clippy-plot clippy-sharpness'});
    this.sharpNote = el('div', {class: 'clippy-note clippy-sharpness-note'});
    this.sharpCard = el('section', {class: 'clippy-card clippy-sharpness-card'}, [
      el('h3', {}, 'Sharpness at the probed steps (top Hessian eigenvalue; preconditioned: of P^½ H P^½)'),
      this.sharpDiv, this.sharpNote]);
    this.sharpCard.style.display = 'none';
    this.metricBox = el('div', {class: 'clippy-metrics'});
    this.heatmapBox = el('div', {class: 'clippy-heatmaps'});
    this.tableBox = el('div', {class: 'clippy-tables'},
      el('div', {class: 'clippy-note'}, 'Click a heatmap cell, an event or type a step to see every layer at that step.'));
    this.hoverLabel = el('div', {class: 'clippy-hover'});
    this.root.append(
      bar, this.eventsBox,
      el('section', {class: 'clippy-card'}, [
        el('h3', {}, ['Loss and task losses ', el('label', {class: 'clippy-muted clippy-inline'}, [this.logBox, ' log scale'])]),
        this.lossDiv, this.lossNote]),
      this.sharpCard,
      el('div', {class: 'clippy-columns'}, [
        el('section', {class: 'clippy-card clippy-main'}, [
          el('h3', {}, 'Per-layer statistics (layers × steps, log colour scale)'),
          this.metricBox, this.heatmapBox]),
        el('section', {class: 'clippy-card clippy-side'}, [el('h3', {}, 'Layers at one step'), this.tableBox]),
      ]),
      this.hoverLabel);
    window.addEventListener('resize', debounce(() => this.refreshAll(), 400));
  }

  async start() {
    await this.loadRuns();
    if (!this.runs.length) {
      this.info.textContent = 'No clippy run records in this logdir.';
      return;
    }
    const names = this.runs.map((r) => r.run);
    this.selected = names.slice(0, 3);
    this.drawRunBox();
    await this.refreshAll();
    this.schedulePoll();
  }

  async loadRuns() {
    const payload = await getJSON('runs');
    this.runs = payload.runs.filter((r) => !r.error);
    this.selected = this.selected.filter((name) => this.runs.some((r) => r.run === name));
  }

  drawRunBox() {
    this.runBox.replaceChildren(el('span', {class: 'clippy-label'}, 'Runs:'));
    this.runs.forEach((run) => {
      const box = el('input', {type: 'checkbox', value: run.run});
      box.checked = this.selected.includes(run.run);
      box.addEventListener('change', () => {
        this.selected = box.checked ? [...this.selected, run.run] : this.selected.filter((n) => n !== run.run);
        this.drawRunBox();
        this.refreshAll();
      });
      const i = this.selected.indexOf(run.run);
      const swatch = el('span', {class: 'clippy-swatch'});
      swatch.style.background = i >= 0 ? this.color(run.run) : 'transparent';
      this.runBox.append(el('label', {class: 'clippy-run', title: `${run.layers} layers`}, [box, swatch, run.run]));
    });
  }

  drawMetricBox() {
    const all = [...this.vocab.heatmaps, ...this.vocab.extraHeatmaps].filter((m) => this.anyRunHas(m));
    const labels = this.labels();
    this.metricBox.replaceChildren(el('span', {class: 'clippy-label'}, 'Show:'));
    all.forEach((metric) => {
      const chip = el('button', {class: 'clippy-chip' + (this.metrics.includes(metric) ? ' on' : '')}, labels[metric] || metric);
      chip.addEventListener('click', () => {
        this.metrics = this.metrics.includes(metric) ? this.metrics.filter((m) => m !== metric) : all.filter((m) => m === metric || this.metrics.includes(m));
        this.drawMetricBox();
        this.drawHeatmaps(this.renderToken);
      });
      this.metricBox.append(chip);
    });
    this.metricBox.append(el('span', {class: 'clippy-note'}, 'Each cell: max (min for factors σ) over its steps · grey: non-finite'));
  }

  color(run) {
    const i = this.selected.indexOf(run);
    return RUN_COLORS[(i < 0 ? 0 : i) % RUN_COLORS.length];
  }

  labels() {
    const out = {};
    for (const run of this.selected) Object.assign(out, (this.summaries[run] || {}).metric_labels || {});
    return out;
  }

  kindLabel(kind) {
    return this.vocab.kinds[kind === 'full' ? 'full' : 'micro'].label;
  }

  anyRunHas(metric) {
    return this.selected.some((run) => ((this.summaries[run] || {}).layer_metrics || []).includes(metric));
  }

  // ----------------------------------------------------------------- refresh

  // Rendered state, for the browser tests and anyone scripting the page:
  // document.body.dataset.clippyReady is '1' only while the last refreshAll()
  // is on screen (removed when one starts; a table asked for meanwhile by
  // showStep() replaces that refresh's table), and
  // tableBox.dataset.step is the step of the layer table on screen, set once
  // its DOM is written (tableStep is the step asked for, set before the fetch).
  async refreshAll() {
    const token = ++this.renderToken;
    delete document.body.dataset.clippyReady;
    if (!this.selected.length) {
      this.clearPlots();
      this.info.textContent = 'Select a run.';
      document.body.dataset.clippyReady = '1';
      return;
    }
    try {
      const summaries = await Promise.all(this.selected.map((run) => getJSON('summary', {run})));
      if (token !== this.renderToken) return;
      this.summaries = Object.fromEntries(summaries.map((s) => [s.run, s]));
      this.vocab = vocabulary(summaries[0].catalog);
      if (this.metrics == null) this.metrics = this.vocab.heatmaps.slice();
      if (this.tableStep == null) this.tableStep = this.defaultStep();
      if (this.tableStep != null) this.stepInput.value = String(this.tableStep);
      this.drawInfo();
      this.drawEvents();
      this.drawMetricBox();
      await Promise.all([this.drawLoss(token), this.drawHeatmaps(token), this.drawTables(token)]);
      if (token === this.renderToken) document.body.dataset.clippyReady = '1';
    } catch (err) {
      this.info.textContent = 'Error: ' + err.message;
    }
  }

  defaultStep() {
    // Start where the story is: step-b of the first full divergence, else of
    // any event, else the last step.
    const events = this.selected.flatMap((run) => this.summaries[run].events);
    const ev = events.find((e) => e.kind === 'full') || events[0];
    if (ev && typeof ev.step_b === 'number') return ev.step_b;
    const last = this.selected.map((run) => this.summaries[run].last_step).filter((s) => s != null);
    return last.length ? Math.max(...last) : null;
  }

  clearPlots() {
    for (const p of this.plots) Plotly.purge(p.div);
    this.plots = [];
    this.heatmapKey = null;
    this.heatmapJobs = [];
    this.heatmapBox.replaceChildren();
    this.eventsBox.replaceChildren();
  }

  drawInfo() {
    // Per run: its shape and detector status, then what the recovery ladder did.
    const parts = [];
    this.selected.forEach((run, i) => {
      const s = this.summaries[run];
      const status = s.status ? ` · ${s.status}` : '';
      const skipped = s.skipped.length ? ` · ${s.skipped.length} damaged parts skipped` : '';
      if (i) parts.push('   |   ');
      parts.push(`${run}: ${fmtInt(s.steps)} steps, ${s.layers.length} layers${s.optimizer ? ' · ' + s.optimizer : ''}${status}${skipped}`);
      if (s.recovery) {
        const ladder = el('span', {class: 'clippy-recovery', 'data-run': run}, ` · ↺ ${s.recovery.summary}`);
        ladder.style.color = this.vocab.kinds[s.recovery.gave_up ? 'gave_up' : 'rollback'].color;
        parts.push(ladder);
      }
    });
    this.info.replaceChildren(...parts);
  }

  drawEvents() {
    const chips = [];
    for (const run of this.selected) {
      for (const ev of this.summaries[run].events) {
        const chip = el('span', {class: 'clippy-event ' + (ev.kind === 'full' ? 'full' : 'micro')});
        chip.append(el('b', {}, `${run}: ${this.kindLabel(ev.kind)}`));
        for (const role of ['step_a', 'step_b', 'step_c', 'recovered']) {
          if (typeof ev[role] !== 'number') continue;
          const name = this.vocab.moments[role].label;
          const link = el('a', {href: '#', title: `Layer table at ${name}`}, `${name} ${fmtInt(ev[role])}`);
          link.addEventListener('click', (e) => { e.preventDefault(); this.showStep(ev[role]); });
          chip.append(' ', link);
        }
        if (ev.task) chip.append(el('span', {class: 'clippy-muted'}, ` · ${ev.task}`));
        if (ev.reason && ev.kind === 'full') chip.append(el('span', {class: 'clippy-muted'}, ` · ${ev.reason}`));
        chips.push(chip);
      }
      chips.push(...this.repeatedChips(run));
      chips.push(...this.recoveryChips(run));
    }
    this.eventsBox.replaceChildren(...(chips.length ? chips : [el('span', {class: 'clippy-muted'}, 'No divergence events recorded.')]));
  }

  repeatedChips(run) {
    // A run that consistently micro-diverges (episodes.repeated_micro, paper 5.1.2): one chip.
    const r = this.summaries[run].repeated_micro;
    if (!r) return [];
    const chip = el('span', {class: 'clippy-event micro clippy-repeated', 'data-run': run});
    chip.append(el('b', {}, `${run}: consistently micro-diverging`));
    const link = el('a', {href: '#', title: `Layer table at step ${fmtInt(r.first_step)}`}, `${r.count} micro-divergences in steps ${fmtInt(r.first_step)}-${fmtInt(r.last_step)}`);
    link.addEventListener('click', (e) => { e.preventDefault(); this.showStep(r.first_step); });
    chip.append(' ', link);
    return [chip];
  }

  recoveryChips(run) {
    // The recovery ladder's actions: one chip per rollback, one for the skipped steps, one if it gave up.
    const rec = this.summaries[run].recovery;
    if (!rec) return [];
    const chip = (kind, title, step, rest) => {
      const node = el('span', {class: 'clippy-event clippy-ladder ' + kind});
      node.style.borderLeftColor = this.vocab.kinds[kind].color;
      const link = el('a', {href: '#', title: `Layer table at step ${fmtInt(step)}`}, `step ${fmtInt(step)}`);
      link.addEventListener('click', (e) => { e.preventDefault(); this.showStep(step); });
      node.append(el('b', {}, `${run}: ${title}`), ' at ', link, el('span', {class: 'clippy-muted'}, rest));
      return node;
    };
    const out = rec.rollbacks.map((r) => chip('rollback', rollbackLabel(r), r.step,
      ` · ${fmtInt(r.batches_skipped)} batches skipped` + (r.trigger ? ` · ${r.trigger}` : '') +
      (r.lr_factor != null && r.cooldown_steps ? ` · lr ×${r.lr_factor} → ×1 over ${fmtInt(r.cooldown_steps)} steps` : '')));
    const n = rec.skipped_steps.length;
    if (n) {
      const why = Object.entries(rec.skip_reasons).map(([k, v]) => `${k.replaceAll('_', ' ')}: ${fmtInt(v)}`).join(', ');
      out.push(chip('skipped', `${fmtInt(n)} step${n === 1 ? '' : 's'} skipped, the latest`, rec.skipped_steps[n - 1], ` · ${why}`));
    }
    if (rec.gave_up) out.push(chip('gave_up', 'recovery gave up', rec.gave_up.step, rec.gave_up.trigger ? ` · ${rec.gave_up.trigger}` : ''));
    return out;
  }

  hasLadderLabels() {
    return this.selected.some((run) => {
      const rec = (this.summaries[run] || {}).recovery;
      return rec && (rec.rollbacks.length || rec.gave_up);
    });
  }

  skippedTraces() {
    // Per run: a marker at each skipped step in view, along the bottom of the plot.
    const traces = [];
    for (const run of this.selected) {
      const rec = (this.summaries[run] || {}).recovery;
      if (!rec || !rec.skipped_steps.length) continue;
      const x = this.range ? rec.skipped_steps.filter((s) => s >= this.range[0] && s <= this.range[1]) : rec.skipped_steps;
      traces.push({
        type: 'scatter', mode: 'markers', name: `${run} · ${this.vocab.kinds.skipped.label}`, x, y: x.map(() => SKIP_MARK_Y),
        yaxis: 'y2', marker: {symbol: 'triangle-up', color: this.vocab.kinds.skipped.color, size: 8, line: {width: 1, color: this.color(run)}},
        hovertemplate: `${run}: step %{x} skipped (update not applied)<extra></extra>`,
      });
    }
    return traces;
  }

  // ------------------------------------------------------------------ loss

  async drawLoss(token) {
    const width = Math.max(this.lossDiv.clientWidth, 400);
    const params = this.rangeParams({max_points: Math.round(2 * width)});
    const payloads = await Promise.all(this.selected.map((run) => getJSON('series', {run, ...params})));
    if (token !== this.renderToken) return;
    const traces = [];
    const nonfinite = [];
    let inRange = 0;
    let downsampled = false;
    payloads.forEach((p) => {
      const color = this.color(p.run);
      inRange = Math.max(inRange, p.steps_in_range);
      downsampled = downsampled || p.downsampled;
      p.series.forEach((s, i) => {
        const task = s.name !== 'loss';
        traces.push({
          type: 'scatter', mode: 'lines', name: `${p.run} · ${s.name}`,
          x: s.steps, y: s.values, connectgaps: false,
          line: {color, width: task ? 1 : 1.6, dash: task ? (i % 2 ? 'dot' : 'dash') : 'solid'},
          opacity: task ? 0.75 : 1,
          hovertemplate: `${p.run} · ${s.name}: %{y:.4g}<extra></extra>`,
        });
        nonfinite.push(...s.nonfinite_steps);
      });
    });
    traces.push(...this.skippedTraces());
    if (nonfinite.length) {
      traces.push({
        type: 'scatter', mode: 'markers', name: 'non-finite loss', x: nonfinite, y: nonfinite.map(() => 1),
        yaxis: 'y2', marker: {symbol: 'x', color: '#c62828', size: 7},
        hovertemplate: 'non-finite loss at step %{x}<extra></extra>',
      });
    }
    const top = MODE_BAR_PX + (this.hasLadderLabels() ? 3 : 2) * LABEL_ROW_PX;
    const layout = this.baseLayout({
      height: 312 + top, // the plot area keeps its height
      // The top margin holds the mode bar and, below it, the event labels (two or three rows).
      margin: {l: 56, r: 16, t: top, b: 36},
      hovermode: 'x unified',
      legend: {orientation: 'h', y: -0.16, font: {size: 11}},
      yaxis: {title: {text: 'loss'}, zeroline: false, gridcolor: '#eee', type: this.logBox.checked ? 'log' : 'linear'},
      yaxis2: {overlaying: 'y', range: [0, 1.05], visible: false, fixedrange: true},
    });
    layout.shapes = this.eventShapes(true);
    layout.annotations = this.eventAnnotations();
    await this.plot(this.lossDiv, traces, layout, {kind: 'loss'});
    const shown = payloads.reduce((n, p) => Math.max(n, ...p.series.map((s) => s.steps.length)), 0);
    this.lossNote.textContent = downsampled
      ? `${fmtInt(inRange)} steps in view, drawn as ${fmtInt(shown)} points: the min and max of each bucket of steps (no spike is dropped). Zoom to see every step.`
      : `${fmtInt(inRange)} steps in view, every step drawn.`;
    await this.drawSharpness(payloads.filter((p) => p.sharpness));
  }

  // ------------------------------------------------------------- sharpness

  async drawSharpness(payloads) {
    // /series's sharpness: preconditioned (left axis, solid, the dashed line at the threshold)
    // and plain (right axis, dotted) at the probed steps, in each run's colour; under the
    // plot, each run's reading against step-b (the post-mortem's sentence).
    if (!payloads.length) {
      if (this.sharpCard.style.display !== 'none') {
        Plotly.purge(this.sharpDiv);
        this.plots = this.plots.filter((q) => q.div !== this.sharpDiv);
      }
      this.sharpCard.style.display = 'none';
      return;
    }
    this.sharpCard.style.display = 'block';
    const threshold = payloads[0].sharpness.threshold;
    const traces = [];
    const values = {y: [], y2: []};
    for (const p of payloads) {
      for (const s of p.sharpness.series) {
        const pre = s.name === 'preconditioned_sharpness';
        const label = pre ? 'preconditioned sharpness' : 'sharpness';
        values[pre ? 'y' : 'y2'].push(...s.values.filter((v) => v != null));
        traces.push({
          type: 'scatter', mode: 'lines+markers', name: `${p.run} · ${label}`, x: s.steps, y: s.values,
          yaxis: pre ? 'y' : 'y2', connectgaps: true,
          line: {color: this.color(p.run), width: pre ? 1.6 : 1.1, dash: pre ? 'solid' : 'dot'},
          marker: {color: this.color(p.run), size: pre ? 6 : 5, symbol: pre ? 'circle' : 'diamond-open'},
          hovertemplate: `${p.run} · ${label}: %{y:.3g}<extra>step %{x}</extra>`,
        });
      }
    }
    const hasPre = values.y.length > 0;
    const left = sharpAxis(values.y, hasPre ? threshold : null);
    const top = MODE_BAR_PX + (this.hasLadderLabels() ? 3 : 2) * LABEL_ROW_PX;
    const layout = this.baseLayout({
      height: 230 + top,
      margin: {l: 56, r: 56, t: top, b: 36},
      hovermode: 'closest',
      legend: {orientation: 'h', y: -0.2, font: {size: 11}},
      yaxis: {title: {text: 'preconditioned'}, gridcolor: '#eee', zeroline: false, ...left},
      yaxis2: {title: {text: 'sharpness'}, overlaying: 'y', side: 'right', showgrid: false, zeroline: false, ...sharpAxis(values.y2, null)},
    });
    if (!this.range) {
      // The loss plot's steps (the probes need not reach the first and last step).
      const spans = this.selected.map((run) => this.summaries[run]).filter((r) => r && r.first_step != null);
      if (spans.length) {
        layout.xaxis.range = [Math.min(...spans.map((r) => r.first_step)), Math.max(...spans.map((r) => r.last_step))];
        layout.xaxis.autorange = false;
      }
    }
    layout.shapes = this.eventShapes(true);
    layout.annotations = this.eventAnnotations();
    if (hasPre) {
      const color = '#c62828';
      layout.shapes.push({type: 'line', xref: 'paper', yref: 'y', x0: 0, x1: 1, y0: threshold, y1: threshold,
        line: {color, dash: 'dash', width: 1.2}, name: 'stability limit'});
      layout.annotations.push({xref: 'paper', yref: 'y', x: 0.005, y: left.type === 'log' ? Math.log10(threshold) : threshold,
        xanchor: 'left', yanchor: 'bottom', showarrow: false, font: {size: 10, color},
        text: `${threshold} (stability limit, preconditioned)`, name: 'stability limit'});
    }
    await this.plot(this.sharpDiv, traces, layout, {kind: 'sharpness'});
    this.sharpNote.replaceChildren(...payloads.map((p) => el('div', {'data-run': p.run},
      `${p.run}: preconditioned sharpness ${p.sharpness.crossing.text}.`)));
  }

  // --------------------------------------------------------------- heatmaps

  async drawHeatmaps(token) {
    const metrics = this.metrics.filter((m) => this.anyRunHas(m));
    const key = JSON.stringify([metrics, this.selected]);
    if (key !== this.heatmapKey) this.buildHeatmapGrid(metrics, key);
    // Same grid as before (e.g. a live update): redraw in place, so the page
    // keeps its height and scroll position.
    await Promise.all(this.heatmapJobs.map((job) => this.drawHeatmapRow(token, job.metric, job.divs)));
  }

  buildHeatmapGrid(metrics, key) {
    for (const p of this.plots.filter((q) => q.kind === 'heatmap')) Plotly.purge(p.div);
    this.plots = this.plots.filter((q) => q.kind !== 'heatmap');
    const rows = [];
    const jobs = [];
    const labels = this.labels();
    for (const metric of metrics) {
      const cells = this.selected.map((run) => {
        const div = el('div', {class: 'clippy-plot clippy-heatmap'});
        return el('div', {class: 'clippy-cell'}, [el('div', {class: 'clippy-cell-title'}, [
          el('span', {class: 'clippy-swatch'}, ''), `${labels[metric] || metric} · ${run}`]), div]);
      });
      cells.forEach((cell, i) => { cell.querySelector('.clippy-swatch').style.background = this.color(this.selected[i]); });
      const row = el('div', {class: 'clippy-heatrow'}, cells);
      rows.push(row);
      jobs.push({metric, divs: cells.map((c) => c.querySelector('.clippy-heatmap'))});
    }
    this.heatmapBox.replaceChildren(...rows);
    this.heatmapKey = key;
    this.heatmapJobs = jobs;
  }

  async drawHeatmapRow(token, metric, divs) {
    const width = Math.max(divs[0].clientWidth - 150, 100);
    const params = this.rangeParams({metric, max_columns: Math.min(Math.round(width), 2000)});
    const payloads = await Promise.all(this.selected.map((run) => getJSON('heatmap', {run, ...params})));
    if (token !== this.renderToken) return;
    const isFactor = this.vocab.factors.has(metric);
    // One colour range per metric across runs, so side-by-side runs compare.
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of payloads) {
      if (p.min_positive != null) lo = Math.min(lo, Math.log10(p.min_positive));
      if (p.max != null && p.max > 0) hi = Math.max(hi, Math.log10(p.max));
    }
    if (!isFinite(lo) || !isFinite(hi)) { lo = -3; hi = 0; }
    if (isFactor) { hi = 0; lo = Math.min(lo, -2); }
    if (hi - lo < 0.5) { lo -= 0.25; hi += 0.25; }
    await Promise.all(payloads.map((p, i) => this.drawHeatmap(divs[i], p, lo, hi, isFactor)));
  }

  async drawHeatmap(div, p, lo, hi, isFactor) {
    const raw = decodeFloat32(p.z);
    const [nLayers, nCols] = p.shape;
    const x = p.first_steps.map((first, j) => (first + p.last_steps[j]) / 2);
    const z = [];
    const text = [];
    for (let r = 0; r < nLayers; r++) {
      const zr = new Array(nCols);
      const tr = new Array(nCols);
      for (let c = 0; c < nCols; c++) {
        const v = raw[r * nCols + c];
        zr[c] = Number.isNaN(v) ? null : v === Infinity ? hi : v <= 0 ? lo : Math.min(Math.max(Math.log10(v), lo), hi);
        const span = p.first_steps[c] === p.last_steps[c] ? `step ${p.first_steps[c]}` : `steps ${p.first_steps[c]}–${p.last_steps[c]} (${p.reduce})`;
        tr[c] = `${p.layers[r]}<br>${span}<br>${p.label} = ${fmtNum(v)}`;
      }
      z.push(zr);
      text.push(tr);
    }
    const ticks = logTicks(lo, hi);
    const trace = {
      type: 'heatmap', x, y: p.layers.map(shortName), z, text,
      zmin: lo, zmax: hi, zsmooth: false,
      colorscale: isFactor ? FACTOR_SCALE : 'Viridis',
      hovertemplate: '%{text}<extra></extra>', hoverongaps: false,
      colorbar: {thickness: 10, len: 1, tickvals: ticks.map((t) => t[0]), ticktext: ticks.map((t) => t[1]), tickfont: {size: 10}, outlinewidth: 0},
    };
    const layout = this.baseLayout({
      height: Math.min(Math.max(16 * nLayers + 50, 150), 560),
      margin: {l: 130, r: 8, t: 12, b: 28},
      plot_bgcolor: '#bdbdbd',
      yaxis: {autorange: 'reversed', tickfont: {size: 10}, fixedrange: true, automargin: false},
    });
    layout.shapes = this.eventShapes(false, p.run);
    await this.plot(div, [trace], layout, {kind: 'heatmap', run: p.run, metric: p.metric, payload: p});
  }

  // ------------------------------------------------------------------ table

  async showStep(value, pick) {
    const step = Number(value);
    if (!Number.isFinite(step)) return;
    this.tableStep = Math.round(step);
    this.stepInput.value = String(this.tableStep);
    await this.drawTables(this.renderToken, pick);
    this.updateMarks();
  }

  async drawTables(token, pick) {
    if (this.tableStep == null) return;
    const request = ++this.tableRequest;
    const payloads = [];
    for (const run of this.selected) {
      const params = {run, step: this.tableStep};
      if (pick && pick.run === run) Object.assign(params, {step: pick.first, until: pick.last, layer: pick.layer, metric: pick.metric});
      payloads.push(getJSON('layers', params).catch((err) => ({run, error: err.message})));
    }
    const tables = await Promise.all(payloads);
    if (token !== this.renderToken || request !== this.tableRequest) return; // superseded
    if (pick) {
      // The picked step (the extreme within the clicked bucket) becomes the step for every run.
      const picked = tables.find((t) => t.run === pick.run && !t.error);
      if (picked && picked.step !== this.tableStep) {
        this.tableStep = picked.step;
        this.stepInput.value = String(picked.step);
        return this.drawTables(token);
      }
    }
    this.tableBox.replaceChildren(...tables.map((t) => this.tableCard(t)));
    this.tableBox.dataset.step = String(this.tableStep);
  }

  ladderRoles(run, step) {
    // What the recovery ladder did at this step of this run.
    const rec = (this.summaries[run] || {}).recovery;
    if (!rec) return [];
    const out = [];
    if (rec.skipped_steps.includes(step)) out.push(`${this.vocab.kinds.skipped.label} (update not applied)`);
    for (const r of rec.rollbacks) if (r.step === step) out.push(rollbackLabel(r));
    if (rec.gave_up && rec.gave_up.step === step) out.push(this.vocab.kinds.gave_up.label);
    return out;
  }

  tableCard(t) {
    if (t.error) return el('div', {class: 'clippy-note'}, `${t.run}: ${t.error}`);
    const card = el('div', {class: 'clippy-table-card'});
    const roles = t.events.map((e) => `${(this.vocab.moments[e.role] || {}).label || e.role} of ${this.kindLabel(e.kind)}`);
    roles.push(...this.ladderRoles(t.run, t.step));
    const head = el('div', {class: 'clippy-table-head'});
    const swatch = el('span', {class: 'clippy-swatch'});
    swatch.style.background = this.color(t.run);
    const prev = el('button', {title: 'previous recorded step', class: 'clippy-small'}, '◀');
    const next = el('button', {title: 'next recorded step', class: 'clippy-small'}, '▶');
    prev.disabled = t.previous_step == null;
    next.disabled = t.next_step == null;
    prev.addEventListener('click', () => this.showStep(t.previous_step));
    next.addEventListener('click', () => this.showStep(t.next_step));
    head.append(swatch, el('b', {}, t.run), ` step ${fmtInt(t.step)}`, prev, next);
    if (!t.exact) head.append(el('span', {class: 'clippy-muted'}, ` (last recorded step ≤ ${fmtInt(t.requested_step)})`));
    if (roles.length) head.append(el('span', {class: 'clippy-role'}, roles.join(', ')));
    const loss = Object.entries(t.series).filter(([k]) => k === 'loss' || k.startsWith('loss/'))
      .map(([k, v]) => `${k} ${fmtNum(v)}`).join(' · ');
    card.append(head, el('div', {class: 'clippy-muted clippy-losses'}, loss));

    // Count columns (non-finite entries) only when something was counted.
    const {factors, counts} = this.vocab;
    const counted = (m) => t.values.some((row) => row[t.metrics.indexOf(m)] !== 0);
    const cols = this.vocab.tableMetrics.filter((m) => t.metrics.includes(m) && (!counts.has(m) || counted(m)));
    const idx = cols.map((m) => t.metrics.indexOf(m));
    const colMax = idx.map((j) => Math.max(...t.values.map((row) => (typeof row[j] === 'number' ? row[j] : -Infinity))));
    const table = el('table', {class: 'clippy-table'});
    table.append(el('thead', {}, el('tr', {}, [el('th', {}, 'layer'), ...cols.map((m, k) => el('th', {}, t.metric_labels[idx[k]]))])));
    const body = el('tbody');
    t.layers.forEach((layer, r) => {
      const tr = el('tr', {}, el('td', {class: 'clippy-layer', title: layer}, shortName(layer)));
      cols.forEach((m, k) => {
        const v = t.values[r][idx[k]];
        const td = el('td', {}, fmtNum(v));
        if (typeof v === 'string') td.classList.add('clippy-bad');
        else if (factors.has(m) && v < 1) td.style.background = factorColor(v);
        else if (!factors.has(m) && !counts.has(m) && v === colMax[k] && t.layers.length > 1) td.classList.add('clippy-max');
        else if (counts.has(m) && v > 0) td.classList.add('clippy-bad');
        tr.append(td);
      });
      body.append(tr);
    });
    table.append(body);
    card.append(el('div', {class: 'clippy-table-wrap'}, table));
    card.append(el('div', {class: 'clippy-muted clippy-fixed'},
      `σ columns: at the thresholds recorded with the run (the paper's: ${thresholdsText(t.thresholds)}), as you would train with them.`));
    if (t.sensitivity) card.append(reactionBox(t.sensitivity));
    return card;
  }

  // ----------------------------------------------------- shapes, hover, zoom

  eventShapes(withRegions, onlyRun) {
    const shapes = [];
    for (const run of this.selected) {
      if (onlyRun && run !== onlyRun) continue;
      for (const ev of (this.summaries[run] || {}).events || []) {
        if (withRegions && typeof ev.step_b === 'number') {
          const end = ev.kind === 'full' ? ev.step_c : ev.recovered;
          if (typeof end === 'number') {
            shapes.push({type: 'rect', xref: 'x', yref: 'paper', x0: ev.step_b, x1: end, y0: 0, y1: 1, line: {width: 0},
              fillcolor: ev.kind === 'full' ? rgba(this.vocab.kinds.full.color, 0.08) : rgba(this.vocab.kinds.micro.color, 0.18), layer: 'below'});
          }
        }
        const roles = ev.kind === 'full' ? ['step_a', 'step_b', 'step_c'] : ['step_b'];
        for (const role of roles) {
          if (typeof ev[role] !== 'number') continue;
          const color = ev.kind === 'full' ? this.vocab.moments[role].color : this.vocab.kinds.micro.color;
          // Loss plot: full-height lines.  Heatmaps: ticks above the cells, which
          // must stay visible (the interesting columns are right at the events).
          const [y0, y1] = withRegions ? [0, 1] : [1.005, 1.1];
          shapes.push({type: 'line', xref: 'x', yref: 'paper', x0: ev[role], x1: ev[role], y0, y1,
            line: {color, width: withRegions ? 1.5 : 2.5, dash: withRegions && role === 'step_a' ? 'dot' : 'solid'}});
        }
      }
      shapes.push(...this.ladderShapes(run, withRegions));
    }
    return shapes;
  }

  ladderShapes(run, withRegions) {
    // Rollbacks: a line where each acted (over a light band of the steps it undid), and the
    // step the ladder gave up at; above the cells on heatmaps.
    const rec = (this.summaries[run] || {}).recovery;
    if (!rec) return [];
    const [y0, y1] = withRegions ? [0, 1] : [1.005, 1.1];
    const line = (x, kind) => ({type: 'line', xref: 'x', yref: 'paper', x0: x, x1: x, y0, y1, name: kind,
      line: {color: this.vocab.kinds[kind].color, width: withRegions ? 2 : 2.5, dash: withRegions ? 'dashdot' : 'solid'}});
    const shapes = [];
    for (const r of rec.rollbacks) {
      if (withRegions) {
        shapes.push({type: 'rect', xref: 'x', yref: 'paper', x0: r.snapshot_step, x1: r.step, y0: 0, y1: 1, line: {width: 0},
          fillcolor: rgba(this.vocab.kinds.rollback.color, 0.07), layer: 'below'});
      }
      shapes.push(line(r.step, 'rollback'));
    }
    if (rec.gave_up) shapes.push(line(rec.gave_up.step, 'gave_up'));
    return shapes;
  }

  eventAnnotations() {
    const out = [];
    for (const run of this.selected) {
      for (const ev of (this.summaries[run] || {}).events || []) {
        const roles = ev.kind === 'full' ? ['step_a', 'step_b', 'step_c'] : ['step_b'];
        for (const role of roles) {
          if (typeof ev[role] !== 'number') continue;
          const label = ev.kind === 'full' ? role.slice(-1) : 'micro';
          // step-a is usually one step before step-b: its label (left of its line) and
          // step-c's (right of its line) share the lower row, step-b's is on the row above.
          const raised = ev.kind === 'full' && role === 'step_b';
          out.push({x: ev[role], xref: 'x', y: 1, yref: 'paper', yanchor: 'bottom', text: label, showarrow: false,
            yshift: raised ? LABEL_ROW_PX : 0, height: LABEL_ROW_PX,
            xanchor: role === 'step_a' ? 'right' : role === 'step_c' ? 'left' : 'center',
            font: {size: 10, color: ev.kind === 'full' ? this.vocab.moments[role].color : '#b07d00'}});
        }
      }
      out.push(...this.ladderAnnotations(run));
    }
    return out;
  }

  ladderAnnotations(run) {
    // The ladder's labels have the third row to themselves, so they never cover step-a/b/c's:
    // "rollback → <snapshot step>" right of its line, "gave up" left of its line.
    const rec = (this.summaries[run] || {}).recovery;
    if (!rec) return [];
    const label = (x, text, kind, xanchor, hovertext) => ({x, xref: 'x', y: 1, yref: 'paper', yanchor: 'bottom',
      yshift: 2 * LABEL_ROW_PX, height: LABEL_ROW_PX, xanchor, text, showarrow: false, hovertext,
      font: {size: 10, color: this.vocab.kinds[kind].color}, name: kind});
    const out = rec.rollbacks.map((r) => label(r.step, rollbackLabel(r), 'rollback', 'left',
      `${run}: rolled back at step ${fmtInt(r.step)} to the snapshot after step ${fmtInt(r.snapshot_step)}`));
    if (rec.gave_up) out.push(label(rec.gave_up.step, this.vocab.kinds.gave_up.label, 'gave_up', 'right', `${run}: ${rec.summary}`));
    return out;
  }

  markShapes(withHover = true) {
    const shapes = [];
    if (this.tableStep != null) {
      shapes.push({type: 'line', xref: 'x', yref: 'paper', x0: this.tableStep, x1: this.tableStep, y0: 0, y1: 1,
        line: {color: '#212121', width: 1}, opacity: 0.7, name: 'table-step'});
    }
    if (withHover && this.hoverStep != null) {
      shapes.push({type: 'line', xref: 'x', yref: 'paper', x0: this.hoverStep, x1: this.hoverStep, y0: 0, y1: 1,
        line: {color: '#d81b60', width: 1.2, dash: 'dash'}, name: 'hover-step'});
    }
    return shapes;
  }

  updateMarks(source) {
    // The hovered plot shows its own hover label, the others a line at that
    // step.  Only plots whose marks changed are touched.
    for (const p of this.plots) {
      const marks = this.markShapes(p.div !== source);
      const key = marksKey(marks);
      if (key === p.marksKey) continue;
      p.marksKey = key;
      Plotly.relayout(p.div, {shapes: [...p.baseShapes, ...marks]});
    }
    this.hoverLabel.textContent = this.hoverStep == null ? '' : `step ${fmtInt(Math.round(this.hoverStep))}`;
    this.hoverLabel.style.display = this.hoverStep == null ? 'none' : 'block';
  }

  setHover(step, source) {
    this.hoverStep = step;
    cancelAnimationFrame(this.hoverFrame);
    this.hoverFrame = requestAnimationFrame(() => this.updateMarks(source));
  }

  rangeParams(extra) {
    const out = {...extra};
    if (this.range) { out.start = Math.floor(this.range[0]); out.end = Math.ceil(this.range[1]); }
    return out;
  }

  setRange(range) {
    this.range = range;
    this.refreshAll();
  }

  baseLayout(extra) {
    const xaxis = {showspikes: false, gridcolor: '#eee', zeroline: false, tickformat: ',d', hoverformat: ',d'};
    if (this.range) { xaxis.range = this.range.slice(); xaxis.autorange = false; }
    return {
      font: FONT, paper_bgcolor: 'white', plot_bgcolor: 'white', showlegend: true,
      xaxis, dragmode: 'zoom', ...extra,
    };
  }

  async plot(div, traces, layout, info) {
    const base = layout.shapes || [];
    const marks = this.markShapes();
    layout.shapes = [...base, ...marks];
    // Heatmaps: no mode bar (it would cover the cells); drag to zoom, double-click to reset.
    const config = info.kind === 'heatmap' ? {...PLOT_CONFIG, displayModeBar: false} : PLOT_CONFIG;
    await Plotly.react(div, traces, layout, config);
    let entry = this.plots.find((p) => p.div === div);
    if (!entry) {
      entry = {div};
      this.plots.push(entry);
      div.on('plotly_hover', (e) => {
        const pt = e.points && e.points[0];
        if (!pt) return;
        const x = entry.kind === 'heatmap' ? pickHeatmapStep(entry.payload, pt) : pt.x;
        this.setHover(x, div);
      });
      div.on('plotly_unhover', () => this.setHover(null, div));
      div.on('plotly_click', (e) => this.onClick(entry, e));
      div.on('plotly_relayout', (e) => this.onRelayout(e));
    }
    Object.assign(entry, info, {baseShapes: base, marksKey: marksKey(marks)});
  }

  onClick(entry, e) {
    const pt = e.points && e.points[0];
    if (!pt) return;
    if (entry.kind === 'heatmap') {
      const [row, col] = pt.pointIndex;
      const p = entry.payload;
      this.showStep(p.first_steps[col], {run: p.run, first: p.first_steps[col], last: p.last_steps[col], layer: row, metric: p.metric});
    } else {
      this.showStep(pt.x);
    }
  }

  onRelayout(e) {
    if ('xaxis.autorange' in e) return this.setRange(null);
    const lo = e['xaxis.range[0]'] ?? (e['xaxis.range'] || [])[0];
    const hi = e['xaxis.range[1]'] ?? (e['xaxis.range'] || [])[1];
    if (lo == null || hi == null) return;
    this.setRange([Number(lo), Number(hi)]);
  }

  // ------------------------------------------------------------------- live

  schedulePoll() {
    clearTimeout(this.pollTimer);
    if (!this.live) return;
    this.pollTimer = setTimeout(() => this.poll(), LIVE_MS);
  }

  async poll() {
    try {
      const before = this.runs.map((r) => r.run).join('\n');
      await this.loadRuns();
      if (this.runs.map((r) => r.run).join('\n') !== before) this.drawRunBox();
      const fresh = await Promise.all(this.selected.map((run) => getJSON('summary', {run})));
      const changed = fresh.some((s) => !this.summaries[s.run] || this.summaries[s.run].version !== s.version);
      if (changed) await this.refreshAll();
    } catch (err) {
      this.info.textContent = 'Live update failed: ' + err.message;
    }
    this.schedulePoll();
  }
}

// ---------------------------------------------------------------- helpers

// How each rule reacts at step-b with thresholds calibrated on the run's healthy
// steps (clippy_monitor.sensitivity; /layers' "sensitivity"): sentence and one row per rule.
function reactionBox(s) {
  const box = el('div', {class: 'clippy-reaction'});
  box.append(el('div', {class: 'clippy-caption'},
    `How each rule reacts at step-b (${fmtInt(s.step_b)}), thresholds calibrated on this run's healthy steps`));
  box.append(el('div', {class: 'clippy-muted'}, s.text));
  if (!s.rules.length) return box;
  const table = el('table', {class: 'clippy-reactions'});
  table.append(el('thead', {}, el('tr', {}, ['rule', 'layer', 'jump', 'σ calibrated'].map((h) => el('th', {}, h)))));
  const body = el('tbody');
  for (const r of s.rules) {
    const most = r.rule === s.reacts_most;
    const td = el('td', {}, most ? el('b', {}, r.label) : r.label);
    const factor = el('td', {}, fmtNum(r.factor));
    if (typeof r.factor === 'number' && r.factor < 1) factor.style.background = factorColor(r.factor);
    body.append(el('tr', {}, [td, el('td', {class: 'clippy-layer', title: r.layer || ''}, shortName(r.layer || '–')),
      el('td', {}, `${fmtNum(r.jump)}x ${r.measurement_label}`), factor]));
  }
  table.append(body);
  box.append(table);
  return box;
}

function thresholdsText(t) {
  if (!t) return 'not recorded';
  return `GC ${fmtNum(t.gc_clipnorm)}, AGC ${fmtNum(t.agc_clipping)}, Clippy ${fmtNum(t.lambda_rel)} / ${fmtNum(t.lambda_abs)}`;
}

function rollbackLabel(r) {
  return `rollback → ${fmtInt(r.snapshot_step)}`;
}

function marksKey(shapes) {
  return shapes.map((s) => `${s.name}@${s.x0}`).join(',');
}

// The server's catalog as the lookups the tab draws with.
function vocabulary(catalog) {
  const byName = (rows) => Object.fromEntries(rows.map((r) => [r.name, r]));
  const names = (pick) => new Set(catalog.metrics.filter(pick).map((m) => m.name));
  return {
    heatmaps: catalog.heatmaps,            // shown at first
    extraHeatmaps: catalog.extra_heatmaps, // offered as chips
    tableMetrics: catalog.table_metrics,   // columns of the layer table
    factors: names((m) => m.kind === 'factor'),
    counts: names((m) => m.kind === 'count'),
    moments: byName(catalog.moments),
    kinds: byName(catalog.event_kinds),
  };
}

// A sharpness axis: log (its range padded, and holding ``include``) when every value is positive.
function sharpAxis(values, include) {
  const shown = include == null ? values : [...values, include];
  if (!shown.length || shown.some((v) => v <= 0)) return {type: 'linear'};
  const lo = Math.log10(Math.min(...shown));
  const hi = Math.log10(Math.max(...shown));
  const pad = 0.1 * Math.max(hi - lo, 0.5);
  return {type: 'log', range: [lo - pad, hi + pad], tickformat: '.3~g'};
}

function rgba(hex, alpha) {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return `rgba(${r},${g},${b},${alpha})`;
}

function pickHeatmapStep(payload, pt) {
  const col = pt.pointIndex[1];
  return (payload.first_steps[col] + payload.last_steps[col]) / 2;
}

async function getJSON(route, params) {
  const query = params ? '?' + new URLSearchParams(params) : '';
  const response = await fetch('./' + route + query);
  if (!response.ok) throw new Error(`${route}: HTTP ${response.status} ${(await response.text()).slice(0, 200)}`);
  return response.json();
}

function loadScript(src) {
  if (window.Plotly) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = src;
    script.onload = () => resolve();
    script.onerror = () => reject(new Error(`${src} failed to load`));
    document.head.appendChild(script);
  });
}

function decodeFloat32(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true); // little-endian
  return out;
}

function logTicks(lo, hi) {
  const ticks = [];
  const span = hi - lo;
  const mantissas = span < 1.5 ? [1, 2, 5] : [1];
  const step = span > 8 ? 2 : 1;
  for (let k = Math.floor(lo); k <= Math.ceil(hi); k += step) {
    for (const m of mantissas) {
      const t = k + Math.log10(m);
      if (t >= lo - 1e-9 && t <= hi + 1e-9) ticks.push([t, fmtPow(m, k)]);
    }
  }
  return ticks;
}

function fmtPow(m, k) {
  if (k >= -2 && k <= 3) return String(+(m * 10 ** k).toPrecision(3));
  return `${m === 1 ? '' : m + '·'}1e${k}`;
}

function fmtNum(v) {
  if (typeof v === 'string') return v === 'Infinity' ? '∞' : v === '-Infinity' ? '−∞' : v;
  if (v == null) return '–';
  if (Number.isNaN(v)) return 'NaN';
  if (!Number.isFinite(v)) return v > 0 ? '∞' : '−∞';
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(+v.toPrecision(3));
}

function fmtInt(v) {
  return v == null ? '–' : Number(v).toLocaleString('en-US');
}

function factorColor(v) {
  const t = Math.min(Math.max(-Math.log10(Math.max(v, 1e-12)) / 3, 0), 1);
  return `rgba(230, 74, 25, ${(0.1 + 0.6 * t).toFixed(2)})`;
}

function shortName(name) {
  return name.length > 22 ? '…' + name.slice(-21) : name;
}

function debounce(fn, ms) {
  let timer = 0;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (children != null) {
    for (const child of Array.isArray(children) ? children : [children]) {
      node.append(typeof child === 'string' ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function addStyle() {
  const style = document.createElement('style');
  style.textContent = `
    body { margin: 0; background: #f5f5f5; font: 13px Roboto, system-ui, -apple-system, "Segoe UI", sans-serif; color: #212121; }
    .clippy-root { padding: 8px 12px 40px; }
    .clippy-toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 16px; padding: 6px 0 8px; }
    .clippy-title { font-weight: 600; font-size: 15px; color: #e65100; }
    .clippy-runs, .clippy-group, .clippy-metrics { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 8px; }
    .clippy-run { display: inline-flex; align-items: center; gap: 4px; cursor: pointer; }
    .clippy-label { color: #616161; }
    .clippy-info { color: #424242; font-size: 12px; }
    .clippy-swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
    .clippy-step { width: 100px; }
    button { font: inherit; padding: 2px 8px; border: 1px solid #bdbdbd; background: white; border-radius: 3px; cursor: pointer; }
    button:hover:not(:disabled) { background: #fff3e0; }
    button.clippy-small { padding: 0 5px; margin-left: 4px; font-size: 11px; }
    .clippy-chip { border-radius: 12px; padding: 1px 10px; color: #616161; }
    .clippy-chip.on { background: #ffe0b2; border-color: #fb8c00; color: #212121; }
    .clippy-events { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 8px; }
    .clippy-event { background: white; border: 1px solid #e0e0e0; border-left: 4px solid #f9a825; border-radius: 3px; padding: 3px 8px; }
    .clippy-event.full { border-left-color: #c62828; }
    .clippy-event a { color: #1565c0; text-decoration: none; }
    .clippy-event a:hover { text-decoration: underline; }
    .clippy-muted { color: #757575; }
    .clippy-inline { font-weight: normal; font-size: 12px; margin-left: 12px; }
    .clippy-note { color: #757575; font-size: 12px; margin: 4px 2px; }
    .clippy-card { background: white; border: 1px solid #e0e0e0; border-radius: 4px; padding: 8px 10px; margin-bottom: 10px; min-width: 0; }
    .clippy-card h3 { margin: 0 0 6px; font-size: 13px; font-weight: 600; color: #424242; }
    .clippy-columns { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
    .clippy-main { flex: 3 1 620px; }
    .clippy-side { flex: 2 1 460px; position: sticky; top: 4px; max-height: calc(100vh - 16px); overflow: auto; }
    .clippy-heatrow { display: flex; gap: 8px; }
    .clippy-cell { flex: 1 1 0; min-width: 0; }
    .clippy-cell-title { font-size: 12px; color: #424242; margin: 6px 0 0 4px; display: flex; align-items: center; }
    .clippy-plot { width: 100%; }
    .clippy-table-card { margin-bottom: 12px; }
    .clippy-table-head { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; margin-bottom: 2px; }
    .clippy-role { background: #ffe0b2; border-radius: 3px; padding: 0 6px; margin-left: 6px; font-size: 12px; }
    .clippy-losses { font-size: 12px; margin-bottom: 4px; }
    .clippy-table-wrap { overflow-x: auto; }
    .clippy-reaction { margin-top: 8px; } .clippy-caption { font-weight: 600; font-size: 12px; margin-bottom: 2px; }
    .clippy-reactions { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; margin-top: 4px; }
    .clippy-reactions th { text-align: right; font-weight: 600; padding: 3px 6px; border-bottom: 2px solid #9e9e9e; }
    .clippy-reactions td { text-align: right; padding: 2px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }
    .clippy-reactions th:first-child, .clippy-reactions td:first-child, .clippy-reactions td.clippy-layer { text-align: left; }
    .clippy-table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
    .clippy-table th { text-align: right; font-weight: 600; padding: 3px 6px; border-bottom: 2px solid #9e9e9e; white-space: nowrap; }
    .clippy-table th:first-child, .clippy-table td.clippy-layer { text-align: left; }
    .clippy-table td { text-align: right; padding: 2px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }
    .clippy-table td.clippy-layer { color: #424242; max-width: 190px; overflow: hidden; text-overflow: ellipsis; }
    .clippy-table td.clippy-max { font-weight: 700; }
    .clippy-table td.clippy-bad { color: #c62828; font-weight: 700; }
    .clippy-hover { position: fixed; right: 10px; bottom: 8px; background: #d81b60; color: white; border-radius: 3px; padding: 2px 8px; display: none; font-size: 12px; }
    .clippy-status { padding: 20px; color: #616161; }
  `;
  document.head.appendChild(style);
}
