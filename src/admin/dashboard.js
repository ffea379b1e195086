/*
 * canaryd dashboard: polls the admin API of this origin every 2 s and draws it.
 * No framework, no external asset; the server's Content-Security-Policy admits only this
 * script and the page's style (by hash) and fetches to this origin.
 *
 * Text formats of the numbers (stable, the tests read them):
 *   weights (effective, configured)  the JSON number as JavaScript prints it, then "%":
 *                                    "90%", "12.5%"
 *   window requests, errors          the integer as printed by String(): "1234"
 *   error rate                       error_rate * 100, (x).toFixed(2), then "%": "1.25%"
 *   p50, p99                         milliseconds, (x).toFixed(3), then " ms": "0.252 ms"
 *   request rate                     requests per second between two polls of /metrics,
 *                                    (x).toFixed(1), then " req/s": "12.3 req/s"
 *   shadow mismatch rate             mismatch_rate * 100, (x).toFixed(2), then "%"
 *   a missing value (null, or no rate before the second poll) is "\u2013" (en dash).
 *
 * Stable hooks: section.arm[data-arm=NAME] holds [data-field=effective_weight |
 * configured_weight | requests | errors | error_rate | p50 | p99 | rate | verdict | trip |
 * trip-reason | trip-detail | trip-at | warmup | srm | analysis], [data-chart=...] sparklines,
 * input[data-input=weight], button[data-action=set-weight | promote]. Buttons #action-rollback,
 * #action-reset, #action-rollout-{start,pause,resume,abort}; the confirmation is #dialog with
 * #dialog-confirm, #dialog-cancel, #dialog-token, #dialog-error. body[data-polls] counts the
 * successful polls.
 *
 * The admin token, when the server asks for one (401), lives only in the variable `token`.
 */
(function () {
  'use strict';

  const POLL_MS = 2000;
  const HISTORY = 90;
  const MIN_SPAN = 12;
  const DASH = '\u2013';
  const COLORS = 6;
  /* The SVG namespace, taken from the HTML parser rather than spelled out. */
  const SVG_NS = (function () {
    const d = document.createElement('div');
    d.innerHTML = '<svg></svg>';
    return d.firstChild.namespaceURI;
  })();
  const CHARTS = [
    ['rate', 'request rate', 1],
    ['error_rate', 'error rate', 0.01],
    ['p50', 'p50', 1],
    ['p99', 'p99', 1],
  ];

  let token = null;
  let pending = null;
  let polls = 0;
  const state = { armKey: null, cards: {}, hist: {}, prevCounts: null, prevAt: 0, rates: {} };

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, props, children) {
    const e = document.createElement(tag);
    if (props) {
      for (const k of Object.keys(props)) {
        const v = props[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k === 'text') e.textContent = v;
        else e.setAttribute(k, v === true ? '' : String(v));
      }
    }
    if (children) {
      for (const c of children) {
        if (c === null || c === undefined) continue;
        e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
      }
    }
    return e;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function isNum(x) {
    return typeof x === 'number' && isFinite(x);
  }

  function fmtWeight(w) {
    return isNum(w) ? String(w) + '%' : DASH;
  }
  function fmtInt(n) {
    return isNum(n) ? String(n) : DASH;
  }
  function fmtPct(r) {
    return isNum(r) ? (r * 100).toFixed(2) + '%' : DASH;
  }
  function fmtMs(ms) {
    return isNum(ms) ? ms.toFixed(3) + ' ms' : DASH;
  }
  function fmtRate(r) {
    return isNum(r) ? r.toFixed(1) + ' req/s' : DASH;
  }
  function fmtSig(x, low) {
    if (x === null || x === undefined) return low ? '\u2212\u221e' : '\u221e';
    return isNum(x) ? String(Number(x.toPrecision(3))) : DASH;
  }
  /* "2026-12-06T22:43:39.294Z" -> "22:43:39 UTC" */
  function fmtTime(rfc) {
    return typeof rfc === 'string' && rfc.length >= 19 ? rfc.slice(11, 19) + ' UTC' : DASH;
  }
  function fmtDuration(s) {
    if (!isNum(s)) return DASH;
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (h > 0) return h + 'h ' + m + 'm';
    if (m > 0) return m + 'm ' + Math.floor(s % 60) + 's';
    return Math.floor(s) + 's';
  }

  function badge(verdict, extraClass) {
    return el('span', { class: 'badge' + (extraClass ? ' ' + extraClass : ''), 'data-verdict': verdict, text: verdict });
  }

  /* Sums canaryd_requests_total per upstream label. */
  function requestCounts(text) {
    const out = {};
    for (const line of text.split('\n')) {
      if (!line.startsWith('canaryd_requests_total{')) continue;
      const close = line.lastIndexOf('}');
      const labels = line.slice(line.indexOf('{') + 1, close);
      const m = /(?:^|,)\s*upstream="((?:[^"\\]|\\.)*)"/.exec(labels);
      if (!m) continue;
      const name = m[1].replace(/\\(.)/g, function (_, c) {
        return c === 'n' ? '\n' : c;
      });
      const v = Number(line.slice(close + 1).trim().split(/\s+/)[0]);
      if (isFinite(v)) out[name] = (out[name] || 0) + v;
    }
    return out;
  }

  async function getJson(path) {
    const r = await fetch(path, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) throw new Error('GET ' + path + ' answered ' + r.status);
    return r.json();
  }

  function setConn(kind, text) {
    const c = $('conn');
    c.dataset.state = kind;
    setText(c, text);
  }

  /* record: take a rate sample and extend the charts (the regular poll); false after an action. */
  async function refresh(record) {
    try {
      const all = await Promise.all([
        getJson('/status'),
        getJson('/weights'),
        getJson('/rollout').catch(function () {
          return null;
        }),
        getJson('/shadow').catch(function () {
          return null;
        }),
        fetch('/metrics', { cache: 'no-store', credentials: 'same-origin' })
          .then(function (r) {
            return r.ok ? r.text() : null;
          })
          .catch(function () {
            return null;
          }),
      ]);
      render(all[0], all[1], all[2], all[3], all[4], record);
      polls += 1;
      document.body.dataset.polls = String(polls);
      setConn('ok', 'live \u00b7 ' + new Date().toLocaleTimeString());
    } catch (e) {
      setConn('error', 'cannot read the admin API: ' + e.message);
    }
  }

  async function loop() {
    await refresh(true);
    setTimeout(loop, POLL_MS);
  }

  function render(status, weights, rollout, shadow, metrics, record) {
    ensureArms(status);
    if (record) sampleRates(metrics);
    renderMeta(status);
    renderBanners(status);
    renderBar(status, weights);
    const srmMismatch = status.srm && Array.isArray(status.srm.mismatch) ? status.srm.mismatch : [];
    for (const a of status.arms) {
      renderArm(state.cards[a.name], a, status, srmMismatch, record);
    }
    renderRollout(rollout);
    renderShadow(shadow);
  }

  function sampleRates(metrics) {
    const now = performance.now();
    if (metrics === null) {
      state.rates = {};
      state.prevCounts = null;
      return;
    }
    const counts = requestCounts(metrics);
    const prev = state.prevCounts;
    const dt = (now - state.prevAt) / 1000;
    const rates = {};
    for (const name of Object.keys(state.cards)) {
      const cur = counts[name] || 0;
      if (prev !== null && dt > 0) {
        const delta = cur - (prev[name] || 0);
        rates[name] = delta >= 0 ? delta / dt : null;
      } else {
        rates[name] = null;
      }
    }
    state.rates = rates;
    state.prevCounts = counts;
    state.prevAt = now;
  }

  function renderMeta(status) {
    const parts = [
      'baseline ' + status.baseline,
      'weights from ' + status.source,
      'generation ' + status.generation,
      'up ' + fmtDuration(status.uptime_seconds),
    ];
    setText($('meta'), parts.join(' \u00b7 '));
  }

  function renderBanners(status) {
    const box = $('banners');
    box.textContent = '';
    for (const a of status.arms) {
      if (!a.tripped) continue;
      box.appendChild(
        el('div', { class: 'banner', 'data-banner': 'trip', 'data-arm-trip': a.name }, [
          el('b', { text: a.name }),
          ' is tripped (' + a.tripped.reason + ')' + (a.tripped.detail ? ': ' + a.tripped.detail : '') +
            ' \u2014 since ' + fmtTime(a.tripped.at) + '; its users go to the baseline until POST /reset.',
        ])
      );
    }
    if (status.srm && Array.isArray(status.srm.mismatch) && status.srm.mismatch.length > 0) {
      box.appendChild(
        el('div', { class: 'banner warn', 'data-banner': 'srm' }, [
          el('b', { text: 'Sample ratio mismatch' }),
          ' (alpha ' + status.srm.alpha + '): ' + status.srm.mismatch.join(', ') +
            ' \u2014 the traffic split differs from the weights; comparisons may be biased.',
        ])
      );
    }
  }

  function renderBar(status, weights) {
    const bar = $('weights-bar');
    const legend = $('weights-legend');
    const eff = (weights && weights.effective) || {};
    const conf = (weights && weights.configured) || {};
    const tripped = (weights && weights.tripped) || {};
    if (bar.dataset.key !== state.armKey) {
      bar.textContent = '';
      status.arms.forEach(function (a, i) {
        bar.appendChild(el('div', { class: 'seg c' + (i % COLORS), 'data-segment': a.name }));
      });
      bar.dataset.key = state.armKey;
    }
    legend.textContent = '';
    status.arms.forEach(function (a, i) {
      const w = isNum(eff[a.name]) ? eff[a.name] : a.effective_weight;
      const c = isNum(conf[a.name]) ? conf[a.name] : a.configured_weight;
      const seg = bar.querySelector('[data-segment="' + CSS.escape(a.name) + '"]');
      if (seg) {
        seg.style.width = (isNum(w) ? w : 0) + '%';
        setText(seg, isNum(w) && w >= 8 ? a.name + ' ' + fmtWeight(w) : '');
        seg.title = a.name + ': ' + fmtWeight(w);
      }
      const parts = [
        el('span', { class: 'swatch c' + (i % COLORS) }),
        el('b', { text: a.name }),
        el('span', { class: 'num', text: fmtWeight(w) }),
      ];
      if (c !== w) parts.push(el('span', { class: 'muted', text: '(configured ' + fmtWeight(c) + ')' }));
      if (tripped[a.name] || a.tripped) parts.push(el('span', { class: 'badge tripped', text: 'tripped' }));
      legend.appendChild(el('span', { class: 'item', 'data-legend': a.name }, parts));
    });
  }

  function ensureArms(status) {
    const key = status.arms
      .map(function (a) {
        return a.name + (a.baseline ? '*' : '');
      })
      .join('\n');
    if (key === state.armKey) return;
    state.armKey = key;
    const box = $('arms');
    box.textContent = '';
    state.cards = {};
    const hist = {};
    status.arms.forEach(function (a, i) {
      state.cards[a.name] = buildCard(a, i);
      box.appendChild(state.cards[a.name].root);
      hist[a.name] = state.hist[a.name] || { rate: [], error_rate: [], p50: [], p99: [] };
    });
    state.hist = hist;
  }

  function buildCard(a, i) {
    const f = {};
    const color = i % COLORS;
    function field(name, tag, cls) {
      const e = el(tag || 'span', { 'data-field': name, class: cls });
      f[name] = e;
      return e;
    }
    const charts = el('div', { class: 'charts' });
    const paths = {};
    for (const c of CHARTS) {
      const svg = document.createElementNS(SVG_NS, 'svg');
      svg.setAttribute('viewBox', '0 0 100 30');
      svg.setAttribute('preserveAspectRatio', 'none');
      svg.setAttribute('aria-hidden', 'true');
      const base = document.createElementNS(SVG_NS, 'line');
      base.setAttribute('x1', '0');
      base.setAttribute('x2', '100');
      base.setAttribute('y1', '29.5');
      base.setAttribute('y2', '29.5');
      const path = document.createElementNS(SVG_NS, 'path');
      path.setAttribute('class', 'k' + color);
      path.setAttribute('fill', 'none');
      svg.appendChild(base);
      svg.appendChild(path);
      paths[c[0]] = path;
      charts.appendChild(
        el('div', { class: 'chart', 'data-chart': c[0] }, [
          el('span', { class: 'label', text: c[1] }),
          field(c[0], 'span', 'value'),
          svg,
        ])
      );
    }
    const trip = el('div', { class: 'trip', 'data-field': 'trip', hidden: true }, [
      'Tripped: ',
      field('trip-reason', 'b'),
      ' ',
      field('trip-detail', 'span'),
      ' ',
      field('trip-at', 'span'),
    ]);
    f.trip = trip;
    let actions = null;
    if (!a.baseline) {
      const input = el('input', {
        type: 'number',
        min: '0',
        max: '100',
        step: '0.01',
        'data-input': 'weight',
        'aria-label': 'new weight of ' + a.name + ' in percent',
      });
      f.input = input;
      const set = el('button', { type: 'button', 'data-action': 'set-weight', text: 'Set weight' });
      const promote = el('button', { type: 'button', 'data-action': 'promote', text: 'Promote' });
      set.addEventListener('click', function () {
        const text = input.value.trim();
        const n = Number(text);
        if (text === '' || !isFinite(n)) {
          showResult('error', 'Set weight of ' + a.name + ': type a number from 0 to 100 first.');
          return;
        }
        const body = {};
        body[a.name] = n;
        openAction({
          label: 'Set weight of ' + a.name,
          message: 'Set the weight of ' + a.name + ' to ' + n + '%? The baseline gets the rest.',
          method: 'PUT',
          path: '/weights',
          body: body,
        });
      });
      promote.addEventListener('click', function () {
        openAction({
          label: 'Promote ' + a.name,
          message: 'Promote ' + a.name + '? It gets 100% of the traffic.',
          method: 'POST',
          path: '/promote',
          body: { upstream: a.name },
        });
      });
      actions = el('div', { class: 'arm-actions' }, [
        el('label', { text: 'weight %' }),
        input,
        set,
        promote,
      ]);
    }
    const root = el('section', { class: 'panel arm', 'data-arm': a.name, 'data-baseline': String(a.baseline) }, [
      el('div', { class: 'arm-head' }, [
        el('span', { class: 'swatch c' + color }),
        el('h2', { text: a.name }),
        el('span', { class: 'badge', text: a.baseline ? 'baseline' : 'candidate' }),
        field('verdict', 'span', 'badge'),
        field('url', 'span', 'url'),
      ]),
      el('div', { class: 'weights-line' }, [
        'weight ',
        field('effective_weight', 'b', 'num'),
        ' effective \u00b7 ',
        field('configured_weight', 'span', 'num'),
        ' configured',
      ]),
      trip,
      field('warmup', 'div', 'note'),
      charts,
      el('div', { class: 'window' }, [
        field('window', 'span'),
        ': ',
        field('requests', 'span', 'num'),
        ' requests, ',
        field('errors', 'span', 'num'),
        ' errors',
      ]),
      field('analysis', 'div', 'verdicts'),
      field('srm', 'div', 'srm'),
      actions,
    ]);
    f.verdict.hidden = true;
    f.warmup.hidden = true;
    f.srm.hidden = true;
    f.analysis.hidden = true;
    return { root: root, f: f, paths: paths };
  }

  function drawSpark(path, values, floor) {
    let max = floor;
    for (const v of values) if (isNum(v) && v > max) max = v;
    const n = values.length;
    /* Newest at the right; a poll is 1/(MIN_SPAN - 1) of the width until more polls are kept. */
    const step = 100 / (Math.max(n, MIN_SPAN) - 1);
    let d = '';
    let pen = false;
    values.forEach(function (v, i) {
      if (!isNum(v)) {
        pen = false;
        return;
      }
      const x = 100 - (n - 1 - i) * step;
      const y = 29 - (v / max) * 27;
      d += (pen ? 'L' : 'M') + x.toFixed(2) + ' ' + y.toFixed(2);
      pen = true;
    });
    path.setAttribute('d', d);
  }

  function renderArm(card, a, status, srmMismatch, record) {
    const f = card.f;
    const w = a.window || {};
    const rate = state.rates[a.name];
    setText(f.effective_weight, fmtWeight(a.effective_weight));
    setText(f.configured_weight, fmtWeight(a.configured_weight));
    setText(f.url, a.url || '');
    setText(f.requests, fmtInt(w.requests));
    setText(f.errors, fmtInt(w.errors));
    setText(f.error_rate, fmtPct(w.error_rate));
    setText(f.p50, fmtMs(w.p50_ms));
    setText(f.p99, fmtMs(w.p99_ms));
    setText(f.rate, fmtRate(rate));
    setText(f.window, 'last ' + ((status.circuit && status.circuit.window) || 'window'));
    if (f.input) f.input.placeholder = isNum(a.configured_weight) ? String(a.configured_weight) : '';

    if (record) {
      const h = state.hist[a.name];
      const point = { rate: rate, error_rate: w.error_rate, p50: w.p50_ms, p99: w.p99_ms };
      for (const k of Object.keys(point)) {
        h[k].push(isNum(point[k]) ? point[k] : null);
        if (h[k].length > HISTORY) h[k].shift();
      }
      for (const c of CHARTS) drawSpark(card.paths[c[0]], h[c[0]], c[2]);
    }

    if (a.tripped) {
      f.trip.hidden = false;
      setText(f['trip-reason'], String(a.tripped.reason));
      setText(f['trip-detail'], a.tripped.detail ? '\u2014 ' + a.tripped.detail : '');
      setText(f['trip-at'], 'at ' + fmtTime(a.tripped.at));
    } else {
      f.trip.hidden = true;
    }

    const an = a.analysis;
    if (an && an.verdict) {
      f.verdict.hidden = false;
      f.verdict.dataset.verdict = an.verdict;
      setText(f.verdict, an.verdict);
    } else {
      f.verdict.hidden = true;
    }
    renderAnalysis(f.analysis, an);

    const wu = a.warmup;
    if (wu && typeof wu === 'object') {
      f.warmup.hidden = false;
      let text = 'Warm-up (' + wu.phase + '): weight \u00d7 ' + (isNum(wu.factor) ? wu.factor.toFixed(2) : DASH);
      if (isNum(wu.ends_in_seconds)) text += ', ends in ' + wu.ends_in_seconds.toFixed(1) + ' s';
      setText(f.warmup, text);
    } else {
      f.warmup.hidden = true;
    }

    const srm = a.srm;
    if (srm && typeof srm === 'object') {
      f.srm.hidden = false;
      const parts = [];
      for (const k of ['requests', 'users']) {
        const s = srm[k];
        if (!s) continue;
        parts.push(
          k + ' ' + fmtInt(s.observed) + ' observed / ' + (isNum(s.expected) ? s.expected.toFixed(1) : DASH) +
            ' expected, p ' + fmtSig(s.p_value)
        );
      }
      const bad = srmMismatch.indexOf(a.name) >= 0;
      f.srm.dataset.mismatch = String(bad);
      const lag = status.srm && isNum(status.srm.lag_seconds) ? ' (requests counted ' + status.srm.lag_seconds + ' s after routing)' : '';
      setText(f.srm, 'Sample ratio' + (bad ? ' MISMATCH' : '') + ': ' + parts.join('; ') + lag);
    } else {
      f.srm.hidden = true;
    }
  }

  function renderAnalysis(box, an) {
    box.textContent = '';
    if (!an) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    const head = [];
    if (isNum(an.confidence)) head.push('confidence ' + an.confidence);
    if (an.arm && an.baseline) head.push(an.arm.requests + ' vs ' + an.baseline.requests + ' baseline requests');
    if (an.below_min_requests) head.push('below min_requests');
    box.appendChild(
      el('div', { class: 'metric', 'data-metric': 'overall' }, [
        el('span', { class: 'name', text: 'analysis' }),
        badge(an.verdict),
        el('span', { class: 'check', text: head.join(' \u00b7 ') }),
      ])
    );
    const metrics = an.metrics || {};
    for (const name of Object.keys(metrics)) {
      const m = metrics[name];
      const checks = (m.checks || [])
        .map(function (c) {
          const iv = c.interval || [null, null];
          return (
            c.quantity.replace(/_/g, ' ') + ' ' + fmtSig(c.estimate) + ' [' + fmtSig(iv[0], true) + ', ' +
            fmtSig(iv[1], false) + '] limit ' + c.limit
          );
        })
        .join('; ');
      box.appendChild(
        el('div', { class: 'metric', 'data-metric': name }, [
          el('span', { class: 'name', text: name.replace(/_/g, ' ') }),
          badge(m.verdict),
          el('span', { class: 'check', text: checks }),
        ])
      );
    }
  }

  function renderRollout(r) {
    const sec = $('rollout');
    if (!r || (r.phase === 'idle' && !r.config)) {
      sec.hidden = true;
      return;
    }
    sec.hidden = false;
    const phase = $('rollout-phase');
    phase.dataset.phase = r.phase;
    setText(phase, r.phase);
    const cfg = r.config || {};
    const upstream = r.upstream || cfg.upstream || '';
    setText($('rollout-upstream'), upstream ? 'of ' + upstream : '');
    const steps = r.steps || cfg.steps || [];
    const stepNo = isNum(r.step) ? r.step : 0;
    let reason;
    if (r.phase === 'idle') {
      reason = 'Configured, not started (start: ' + (cfg.start || DASH) + ').';
    } else {
      reason = 'Step ' + stepNo + ' of ' + steps.length + ' \u00b7 weight ' + fmtWeight(r.weight);
      if (r.reason && !/^at step \d+ of \d+/.test(r.reason)) reason += ' \u00b7 ' + r.reason;
    }
    setText($('rollout-reason'), reason);
    const stepBox = $('rollout-steps');
    stepBox.textContent = '';
    steps.forEach(function (w, i) {
      let cls = 'step';
      if (r.phase === 'succeeded' || i + 1 < stepNo) cls += ' done';
      else if (i + 1 === stepNo && r.phase !== 'idle') cls += ' current';
      stepBox.appendChild(el('span', { class: cls, 'data-step': i + 1, text: fmtWeight(w) }));
    });
    const at = [];
    if (r.at_step) {
      at.push('at this step for ' + (isNum(r.at_step.seconds) ? r.at_step.seconds.toFixed(1) : DASH) + ' s');
      const req = r.at_step.requests || {};
      at.push(
        'requests ' +
          Object.keys(req)
            .map(function (k) {
              return k + ' ' + req[k];
            })
            .join(', ')
      );
      if (r.at_step.holding) at.push('holding');
    }
    if (Array.isArray(r.waiting_for) && r.waiting_for.length) at.push('waiting for ' + r.waiting_for.join(', '));
    if (cfg.min_requests !== undefined && r.phase !== 'idle') {
      at.push('each step: at least ' + cfg.min_step_duration_seconds + ' s and ' + cfg.min_requests + ' requests per arm');
    }
    setText($('rollout-at-step'), at.join(' \u00b7 '));
    renderAnalysis($('rollout-verdicts'), r.analysis);
    const body = $('rollout-history').tBodies[0];
    body.textContent = '';
    for (const h of r.history || []) {
      body.appendChild(
        el('tr', { 'data-history-step': h.step }, [
          el('td', { text: String(h.step) }),
          el('td', { text: fmtWeight(h.weight) }),
          el('td', { text: fmtTime(h.started_at) }),
          el('td', { text: h.ended_at ? fmtTime(h.ended_at) : DASH }),
          el('td', { text: h.outcome || 'current' }),
          el('td', { text: h.detail || '' }),
        ])
      );
    }
    $('rollout-history').hidden = !(r.history && r.history.length);
    const running = r.phase === 'progressing' || r.phase === 'paused' || r.phase === 'waiting';
    $('action-rollout-start').disabled = running || !r.config;
    $('action-rollout-pause').disabled = !(r.phase === 'progressing' || r.phase === 'waiting');
    $('action-rollout-resume').disabled = r.phase !== 'paused';
    $('action-rollout-abort').disabled = !running;
  }

  function renderShadow(s) {
    const sec = $('shadow');
    if (!s || !s.configured) {
      sec.hidden = true;
      return;
    }
    sec.hidden = false;
    const c = s.configured;
    setText($('shadow-upstream'), 'copies ' + c.percent + '% of requests to ' + c.upstream);
    setText($('shadow-mismatch-rate'), fmtPct(s.mismatch_rate));
    setText($('shadow-compared'), fmtInt(s.compared));
    const q = s.requests || {};
    const counts = ['match', 'mismatch', 'error', 'dropped', 'skipped'].map(function (k) {
      return k + ' ' + fmtInt(q[k]);
    });
    if (isNum(s.mean_duration_ms)) counts.push('mean ' + fmtMs(s.mean_duration_ms));
    setText($('shadow-counts'), counts.join(' \u00b7 '));
    const fm = s.field_mismatches || {};
    const keys = Object.keys(fm).sort(function (x, y) {
      return fm[y] - fm[x];
    });
    setText(
      $('shadow-fields'),
      keys.length
        ? 'mismatches by field: ' +
            keys
              .slice(0, 8)
              .map(function (k) {
                return k + ' ' + fm[k];
              })
              .join(', ')
        : ''
    );
  }

  /* ---- actions ---- */

  function showResult(kind, text) {
    const p = $('action-result');
    p.hidden = false;
    p.dataset.state = kind;
    setText(p, text);
  }

  function dialogError(text) {
    const e = $('dialog-error');
    e.hidden = !text;
    setText(e, text || '');
  }

  function openAction(action) {
    pending = action;
    setText($('dialog-title'), action.label);
    setText($('dialog-message'), action.message);
    $('dialog-token-row').hidden = true;
    $('dialog-token').value = '';
    dialogError('');
    setText($('dialog-confirm'), 'Confirm');
    $('dialog-confirm').disabled = false;
    const d = $('dialog');
    if (!d.open) d.showModal();
    $('dialog-confirm').focus();
  }

  function errorMessage(text, status) {
    try {
      const v = JSON.parse(text);
      if (v && typeof v.error === 'string') return v.error;
    } catch (e) {
      /* not JSON */
    }
    return text.trim() || 'HTTP ' + status;
  }

  async function confirmAction() {
    const action = pending;
    if (!action) return;
    const row = $('dialog-token-row');
    if (!row.hidden) {
      const t = $('dialog-token').value.trim();
      if (!t) {
        dialogError('Enter the admin token.');
        return;
      }
      token = t;
      $('dialog-token').value = '';
    }
    const headers = {};
    if (action.body !== undefined) headers['content-type'] = 'application/json';
    if (token !== null) headers['authorization'] = 'Bearer ' + token;
    const confirm = $('dialog-confirm');
    confirm.disabled = true;
    let res;
    let text;
    try {
      res = await fetch(action.path, {
        method: action.method,
        headers: headers,
        body: action.body === undefined ? undefined : JSON.stringify(action.body),
        cache: 'no-store',
        credentials: 'same-origin',
      });
      text = await res.text();
    } catch (e) {
      confirm.disabled = false;
      dialogError('The request failed: ' + e.message);
      return;
    }
    confirm.disabled = false;
    if (pending !== action) return;
    const message = errorMessage(text, res.status);
    if (res.status === 401) {
      const refused = token !== null;
      token = null;
      row.hidden = false;
      setText(confirm, 'Send with token');
      dialogError((refused ? 'Token refused: ' : 'The server asks for the admin token: ') + message);
      $('dialog-token').focus();
      return;
    }
    if (!res.ok) {
      dialogError(action.label + ' failed (' + res.status + '): ' + message);
      showResult('error', action.label + ' failed: ' + message);
      return;
    }
    pending = null;
    $('dialog').close();
    showResult('ok', action.label + ': done.');
    refresh(false);
  }

  function simple(id, label, message, path) {
    $(id).addEventListener('click', function () {
      openAction({ label: label, message: message, method: 'POST', path: path });
    });
  }

  simple(
    'action-rollback',
    'Roll back',
    'Roll back every canary? Each non-baseline arm goes to weight 0 and is marked tripped (reason manual); its users go to the baseline until a reset.',
    '/rollback'
  );
  simple('action-reset', 'Reset trips', 'Clear every trip and return to the configured or admin weights?', '/reset');
  simple('action-rollout-start', 'Start the rollout', 'Start the progressive rollout at its first step?', '/rollout/start');
  simple('action-rollout-pause', 'Pause the rollout', 'Pause the rollout at its current step?', '/rollout/pause');
  simple('action-rollout-resume', 'Resume the rollout', 'Resume the rollout from its current step?', '/rollout/resume');
  simple(
    'action-rollout-abort',
    'Abort the rollout',
    'Abort the rollout? The candidate is tripped (reason manual) and its users go to the baseline.',
    '/rollout/abort'
  );

  $('dialog-confirm').addEventListener('click', confirmAction);
  $('dialog-cancel').addEventListener('click', function () {
    $('dialog').close();
  });
  $('dialog').addEventListener('close', function () {
    pending = null;
    $('dialog-token').value = '';
  });
  $('dialog-token').addEventListener('keydown', function (e) {
    if (e.key === 'Enter') {
      e.preventDefault();
      confirmAction();
    }
  });

  loop();
})();
