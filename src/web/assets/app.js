// shelfwatch: the daemon's local page. One script for the four views; index.html is
// the same at /, /zones, /health and /identify and the path picks the view. The
// server's CSP allows only same-origin scripts and styles, so everything is built
// here with DOM calls (no inline handlers, no style attributes in markup).
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const STATUSES = new Set(['ok', 'low-stock', 'out-of-stock', 'over-stock']);
  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ DOM helpers

  function applyAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') el.textContent = String(v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    applyAttrs(el, attrs);
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c);
    return el;
  }

  function svgEl(tag, attrs) {
    const el = document.createElementNS(SVG_NS, tag);
    applyAttrs(el, attrs);
    return el;
  }

  // Each line its own block, so server messages with file:line prefixes stay readable.
  function showResult(box, kind, lines, ...extra) {
    box.className = `result ${kind}`;
    box.replaceChildren(...lines.map((l) => h('span', { class: 'line', text: l })), ...extra);
  }

  function clearResult(box) {
    box.className = 'result';
    box.replaceChildren();
  }

  // ------------------------------------------------------------------ formatting

  const fmt = {
    num(v, digits = 0) {
      return typeof v === 'number' && Number.isFinite(v) ? v.toFixed(digits) : '–';
    },
    int(v) {
      return typeof v === 'number' && Number.isFinite(v) ? String(v) : '–';
    },
    time(ts) {
      if (!ts) return '';
      const d = new Date(ts);
      return Number.isNaN(d.getTime()) ? String(ts) : d.toLocaleString();
    },
    uptime(s) {
      if (typeof s !== 'number' || !Number.isFinite(s)) return '–';
      let left = Math.floor(s);
      const d = Math.floor(left / 86400); left -= d * 86400;
      const hh = Math.floor(left / 3600); left -= hh * 3600;
      const m = Math.floor(left / 60); left -= m * 60;
      const parts = [];
      if (d) parts.push(`${d}d`);
      if (d || hh) parts.push(`${hh}h`);
      if (d || hh || m) parts.push(`${m}m`);
      parts.push(`${left}s`);
      return parts.join(' ');
    },
    bytes(n) {
      if (typeof n !== 'number' || !Number.isFinite(n)) return '–';
      if (n < 1024) return `${n} B`;
      const units = ['KiB', 'MiB', 'GiB', 'TiB'];
      let v = n / 1024;
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return `${v.toFixed(1)} ${units[i]}`;
    },
    value(v) {
      if (Array.isArray(v)) return v.map((x) => fmt.value(x)).join(', ');
      if (typeof v === 'number' && !Number.isInteger(v)) return String(Number(v.toFixed(3)));
      if (v !== null && typeof v === 'object') return JSON.stringify(v);
      return String(v);
    },
  };

  // ------------------------------------------------------------------ the JSON API

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, url, body) {
    const init = { method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    let text;
    try {
      res = await fetch(url, init);
      text = await res.text();
    } catch (e) {
      throw new ApiError(0, `cannot reach the daemon (${e.message})`, null);
    }
    let data = null;
    if (text) {
      // axum's own rejections (a malformed body, say) are plain text, not JSON.
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!res.ok) {
      const msg = data && typeof data.error === 'string'
        ? data.error
        : (text && text.trim()) || `HTTP ${res.status} ${res.statusText}`;
      throw new ApiError(res.status, msg, data);
    }
    if (data === null) throw new ApiError(res.status, 'the daemon answered with something other than JSON', null);
    return data;
  }

  const getJSON = (url) => api('GET', url);

  function showConnection(err) {
    const box = document.getElementById('connection');
    if (!box) return;
    if (!err) {
      box.hidden = true;
      box.textContent = '';
      return;
    }
    box.textContent = `The page could not refresh: ${err.message}. Retrying…`;
    box.hidden = false;
  }

  // Runs fn now and then every `ms` after the previous run finished, so a slow
  // daemon never gets overlapping requests. now() asks for an immediate run; if one
  // is under way, another follows it, so the caller always sees data fetched after
  // its call. A hidden tab stops polling until it is shown again.
  function poller(fn, ms) {
    let timer = null;
    let running = false;
    let again = false;
    async function tick() {
      clearTimeout(timer);
      timer = null;
      if (running) { again = true; return; }
      if (document.hidden) return;
      running = true;
      try {
        await fn();
        showConnection(null);
      } catch (e) {
        showConnection(e);
        if (!(e instanceof ApiError)) console.error(e);
      }
      running = false;
      if (again) { again = false; tick(); return; }
      timer = setTimeout(tick, ms);
    }
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && timer === null && !running) tick();
    });
    tick();
    return { now: tick };
  }

  let viewTitle = '';
  function setDevice(id) {
    if (!id) return;
    const el = document.getElementById('device');
    if (el && el.textContent !== id) el.textContent = id;
    document.title = `${viewTitle} · ${id} · shelfwatch`;
  }

  // ------------------------------------------------------------------ geometry

  const clamp01 = (v) => Math.min(1, Math.max(0, v));
  const round5 = (v) => Math.round(v * 1e5) / 1e5;
  const pct = (v) => `${(v * 100).toFixed(3)}%`;

  // Normalised frame coordinates of a pointer event. The overlay covers the image
  // exactly, so its box is the frame whatever size the page shows it at.
  function pointerToNorm(el, ev) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) return [0, 0];
    return [clamp01((ev.clientX - r.left) / r.width), clamp01((ev.clientY - r.top) / r.height)];
  }

  // Screen distance between two normalised points: hit tolerances are in pixels,
  // which stay the same on a phone and on a wide desktop frame.
  function screenDistance(el, a, b) {
    const r = el.getBoundingClientRect();
    return Math.hypot((a[0] - b[0]) * r.width, (a[1] - b[1]) * r.height);
  }

  function pointInPolygon(p, poly) {
    let inside = false;
    for (let i = 0, j = poly.length - 1; i < poly.length; j = i, i += 1) {
      const [xi, yi] = poly[i];
      const [xj, yj] = poly[j];
      if ((yi > p[1]) !== (yj > p[1]) && p[0] < ((xj - xi) * (p[1] - yi)) / (yj - yi) + xi) inside = !inside;
    }
    return inside;
  }

  function bounds(poly) {
    const xs = poly.map((p) => p[0]);
    const ys = poly.map((p) => p[1]);
    return { minX: Math.min(...xs), minY: Math.min(...ys), maxX: Math.max(...xs), maxY: Math.max(...ys) };
  }

  const pointsAttr = (poly) => poly.map((p) => `${p[0]},${p[1]}`).join(' ');

  // ------------------------------------------------------------------ zones, shared

  const zoneStatus = (state) => (state && STATUSES.has(state.status) ? state.status : 'counting');

  function zoneSummary(name, state) {
    return state ? `${name}: ${state.total} ${state.status}` : `${name}: counting…`;
  }

  function countsText(state) {
    if (!state || !state.counts) return '–';
    const parts = Object.entries(state.counts).map(([label, n]) => `${label}: ${n}`);
    return parts.length ? parts.join(', ') : '–';
  }

  function zonePolygon(name, polygon, status, extra) {
    return svgEl('polygon', {
      class: `zone status-${status}${extra ? ` ${extra}` : ''}`,
      'data-zone': name,
      points: pointsAttr(polygon),
      'vector-effect': 'non-scaling-stroke',
    });
  }

  // Labels are HTML over the frame: SVG text would be stretched by the viewBox's
  // non-uniform scaling.
  function zoneLabel(name, text, status, polygon, extra) {
    const b = bounds(polygon);
    const right = b.minX > 0.6;
    const el = h('div', {
      class: `zone-label status-${status}${right ? ' right' : ''}${extra ? ` ${extra}` : ''}`,
      'data-zone': name,
      text,
    });
    if (right) el.style.right = pct(1 - b.maxX);
    else el.style.left = pct(b.minX);
    el.style.top = pct(b.minY);
    return el;
  }

  function detectionRect(d) {
    const [x1, y1, x2, y2] = d.box;
    const rect = svgEl('rect', {
      class: 'detection',
      x: Math.min(x1, x2),
      y: Math.min(y1, y2),
      width: Math.abs(x2 - x1),
      height: Math.abs(y2 - y1),
      'vector-effect': 'non-scaling-stroke',
    });
    rect.append(svgEl('title', { text: `${d.label} ${fmt.num(d.score, 2)}` }));
    return rect;
  }

  // ------------------------------------------------------------------ frame + overlay

  const frameUrl = (camera, seq) => `/api/cameras/${enc(camera)}/frame.jpg?seq=${enc(seq)}`;

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error('the frame did not decode'));
      img.src = url;
    });
  }

  // The camera frame with an SVG overlay (viewBox 0..1, stretched to the frame) and an
  // HTML layer for labels. A new frame is fetched as a blob and decoded off-screen
  // before it replaces the shown one, so the picture never flickers, and `seq` is the
  // number of the frame actually on screen (the server says it in X-Frame-Seq).
  class FrameView {
    constructor({ imgId, svgId, wrapClass } = {}) {
      this.img = h('img', { class: 'frame', id: imgId, alt: 'camera frame', draggable: 'false' });
      this.svg = svgEl('svg', { class: 'overlay', id: svgId, viewBox: '0 0 1 1', preserveAspectRatio: 'none' });
      this.labels = h('div', { class: 'zone-labels' });
      this.note = h('div', { class: 'frame-note', text: 'Waiting for the first frame…' });
      this.root = h('div', { class: `frame-wrap waiting${wrapClass ? ` ${wrapClass}` : ''}` },
        this.img, this.svg, this.labels, this.note);
      this.camera = null;
      this.seq = null;
      this.loadingSeq = null;
      this.url = null;
      this.token = 0;
      // While frozen the shown frame stays, e.g. while a box drawn on it is in use.
      this.frozen = false;
    }

    reset(camera) {
      this.token += 1;
      this.camera = camera;
      this.seq = null;
      this.loadingSeq = null;
      this.img.removeAttribute('src');
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = null;
      this.root.classList.add('waiting');
    }

    update(camera, frame) {
      if (camera !== this.camera) this.reset(camera);
      if (frame && frame.width > 0 && frame.height > 0) {
        this.root.style.aspectRatio = `${frame.width} / ${frame.height}`;
      }
      if (!frame || this.frozen) return;
      if (frame.seq === this.seq || frame.seq === this.loadingSeq) return;
      this.load(frame.seq);
    }

    async load(seq) {
      this.token += 1;
      const token = this.token;
      const camera = this.camera;
      this.loadingSeq = seq;
      try {
        const res = await fetch(frameUrl(camera, seq), { credentials: 'same-origin', cache: 'no-store' });
        if (!res.ok) throw new Error(`frame: HTTP ${res.status}`);
        const header = res.headers.get('x-frame-seq');
        const shownSeq = header !== null && header.trim() !== '' && Number.isFinite(Number(header)) ? Number(header) : seq;
        const blob = await res.blob();
        if (token !== this.token) return;
        const url = URL.createObjectURL(blob);
        try {
          const next = await loadImage(url);
          if (next.decode) await next.decode().catch(() => {});
        } catch (e) {
          URL.revokeObjectURL(url);
          throw e;
        }
        if (token !== this.token || this.frozen) {
          URL.revokeObjectURL(url);
          return;
        }
        const old = this.url;
        this.img.src = url;
        this.url = url;
        this.seq = shownSeq;
        this.root.classList.remove('waiting');
        if (old) URL.revokeObjectURL(old);
      } catch (_) {
        // Keep the frame on screen; the next refresh tries again.
      } finally {
        if (token === this.token) this.loadingSeq = null;
      }
    }

    toNorm(ev) {
      return pointerToNorm(this.svg, ev);
    }

    distance(a, b) {
      return screenDistance(this.svg, a, b);
    }
  }

  // A <select id="camera-select"> kept in step with the cameras the daemon reports.
  function cameraPicker(onChange) {
    const el = h('select', { id: 'camera-select' });
    el.addEventListener('change', () => onChange(el.value));
    let key = null;
    return {
      el,
      set(ids, current) {
        const k = ids.join('\n');
        if (k !== key) {
          key = k;
          el.replaceChildren(...ids.map((id) => h('option', { value: id, text: id })));
        }
        if (current !== null && el.value !== current) el.value = current;
      },
    };
  }

  // The camera asked for in ?camera=, so a view can be linked to directly.
  function preferredCamera() {
    return new URLSearchParams(location.search).get('camera');
  }

  function rememberCamera(id) {
    const url = new URL(location.href);
    url.searchParams.set('camera', id);
    history.replaceState(null, '', url);
  }

  // ================================================================== Live view

  class LiveCard {
    constructor(id) {
      this.badge = h('span', { class: 'pill' });
      this.when = h('span', { class: 'when' });
      this.view = new FrameView();
      this.rows = h('tbody');
      this.root = h('section', { class: 'camera', 'data-camera': id },
        h('div', { class: 'camera-head' }, h('h2', { text: id }), this.badge, this.when),
        this.view.root,
        h('div', { class: 'table-scroll' },
          h('table', { class: 'zones' },
            h('thead', {}, h('tr', {},
              h('th', { text: 'Zone' }),
              h('th', { class: 'num', text: 'Total' }),
              h('th', { text: 'Counts' }),
              h('th', { text: 'Status' }))),
            this.rows)));
    }

    update(cam) {
      this.badge.className = `pill ${cam.online ? 'online' : 'offline'}`;
      this.badge.textContent = cam.online ? 'online' : 'offline';
      this.when.textContent = cam.frame ? `frame ${cam.frame.seq} · ${fmt.time(cam.frame.captured_at)}` : 'no frame yet';
      this.view.update(cam.id, cam.frame);

      const shapes = [];
      const labels = [];
      const rows = [];
      for (const z of cam.zones || []) {
        const status = zoneStatus(z.state);
        if (z.coordinates === 'normalised' && z.polygon && z.polygon.length >= 3) {
          shapes.push(zonePolygon(z.name, z.polygon, status));
          labels.push(zoneLabel(z.name, zoneSummary(z.name, z.state), status, z.polygon));
        }
        rows.push(h('tr', { 'data-zone': z.name },
          h('td', { class: 'name', text: z.name }),
          h('td', { class: 'total num', text: z.state ? String(z.state.total) : '…' }),
          h('td', { class: 'counts', text: countsText(z.state) }),
          h('td', { class: 'status' },
            h('span', { class: `pill status-${status}`, text: z.state ? z.state.status : 'counting…' }))));
      }
      if (!rows.length) rows.push(h('tr', {}, h('td', { class: 'muted', colspan: 4, text: 'No zones on this camera.' })));
      const boxes = (cam.detections || []).filter((d) => Array.isArray(d.box) && d.box.length === 4).map(detectionRect);
      this.view.svg.replaceChildren(...shapes, ...boxes);
      this.view.labels.replaceChildren(...labels);
      this.rows.replaceChildren(...rows);
    }
  }

  function liveView(app) {
    const empty = h('p', { class: 'note', text: 'No cameras are configured.', hidden: true });
    const grid = h('div', { class: 'cameras' });
    app.append(empty, grid);
    const cards = new Map();

    poller(async () => {
      const data = await getJSON('/api/cameras');
      setDevice(data.device);
      const cameras = data.cameras || [];
      const ids = new Set(cameras.map((c) => c.id));
      for (const [id, card] of cards) {
        if (!ids.has(id)) { card.root.remove(); cards.delete(id); }
      }
      for (const cam of cameras) {
        let card = cards.get(cam.id);
        if (!card) {
          card = new LiveCard(cam.id);
          cards.set(cam.id, card);
          grid.append(card.root);
        }
        card.update(cam);
      }
      empty.hidden = cameras.length > 0;
    }, 1000);
  }

  // ================================================================== Zones view (editor)

  function zonesView(app) {
    const st = {
      data: null,          // the last /api/cameras answer
      version: null,       // config version the edits are based on
      camera: null,
      zones: [],           // the working zone list of st.camera
      drafts: new Map(),   // camera -> its zone list while it has unsaved edits
      selected: -1,
      drawing: null,       // vertices of the zone being drawn, or null
      cursor: null,        // pointer position while drawing, for the rubber band
      drag: null,
      saving: false,
      gen: 0,              // bumped by each save, to drop answers fetched before it
    };

    const view = new FrameView({ imgId: 'editor-frame', svgId: 'editor', wrapClass: 'editor-wrap' });
    const picker = cameraPicker((id) => { switchCamera(id); rememberCamera(id); });
    const btnNew = h('button', { id: 'new-zone', type: 'button', text: 'New zone' });
    const btnFinish = h('button', { id: 'finish-zone', type: 'button', text: 'Finish' });
    const btnCancel = h('button', { id: 'cancel-zone', type: 'button', text: 'Cancel' });
    const btnDelete = h('button', { id: 'delete-zone', type: 'button', class: 'danger', text: 'Delete zone' });
    const hint = h('p', { class: 'hint' });
    const note = h('p', { class: 'note', hidden: true });
    const inName = h('input', { id: 'zone-name', type: 'text', autocomplete: 'off', spellcheck: 'false' });
    const inMin = h('input', { id: 'zone-min', type: 'number', min: 0, step: 1, inputmode: 'numeric', placeholder: 'none' });
    const inMax = h('input', { id: 'zone-max', type: 'number', min: 0, step: 1, inputmode: 'numeric', placeholder: 'none' });
    const inLabels = h('input', { id: 'zone-labels', type: 'text', autocomplete: 'off', spellcheck: 'false', placeholder: 'any product' });
    const form = h('form', { id: 'zone-form', class: 'panel', onsubmit: (ev) => ev.preventDefault() },
      h('h3', { text: 'Selected zone' }),
      h('label', { class: 'field' }, h('span', { text: 'Name' }), inName),
      h('div', { class: 'field-row' },
        h('label', { class: 'field' }, h('span', { text: 'Min (low stock below)' }), inMin),
        h('label', { class: 'field' }, h('span', { text: 'Max (over stock above)' }), inMax)),
      h('label', { class: 'field' }, h('span', { text: 'Labels (comma-separated)' }), inLabels));
    const list = h('ul', { id: 'zone-list', class: 'zone-list' });
    const btnSave = h('button', { id: 'save', type: 'button', class: 'primary', text: 'Save' });
    const btnDiscard = h('button', { id: 'discard', type: 'button', text: 'Discard changes' });
    const dirtyNote = h('span', { class: 'dirty' });
    const result = h('div', { id: 'save-result', class: 'result', role: 'status', 'aria-live': 'polite' });

    app.append(note, h('div', { class: 'editor-layout' },
      h('div', { class: 'panel' },
        h('div', { class: 'toolbar' },
          h('label', {}, 'Camera', picker.el), btnNew, btnFinish, btnCancel, btnDelete),
        view.root,
        hint),
      h('aside', {},
        form,
        h('div', { class: 'panel' },
          h('h3', { text: 'Zones' }),
          list,
          h('div', { class: 'save-row' }, btnSave, btnDiscard, dirtyNote),
          result))));

    // ---- state helpers

    const serverCamera = () => (st.data && st.data.cameras || []).find((c) => c.id === st.camera) || null;
    const isDirty = () => st.drafts.has(st.camera);

    // Polygons in pixels (a camera without a frame yet) cannot be placed on the
    // overlay, and saving them as normalised would move them.
    function geometryOk() {
      const cam = serverCamera();
      return !!(cam && cam.frame && (cam.zones || []).every((z) => z.coordinates !== 'pixels'));
    }

    function serverZones(cam) {
      return (cam ? cam.zones || [] : []).map((z) => ({
        name: z.name,
        polygon: (z.polygon || []).map((p) => [p[0], p[1]]),
        labels: [...(z.labels || [])],
        min: z.min === undefined ? null : z.min,
        max: z.max === undefined ? null : z.max,
      }));
    }

    function liveStates() {
      const cam = serverCamera();
      const m = new Map();
      for (const z of cam ? cam.zones || [] : []) m.set(z.name, z.state || null);
      return m;
    }

    function markDirty() {
      st.drafts.set(st.camera, st.zones);
    }

    function unusedName() {
      for (let n = 1; ; n += 1) {
        const name = `zone-${n}`;
        if (!st.zones.some((z) => z.name === name)) return name;
      }
    }

    // ---- rendering

    function renderOverlay() {
      const shapes = [];
      const labels = [];
      if (geometryOk()) {
        const states = liveStates();
        const order = st.zones.map((_, i) => i).filter((i) => i !== st.selected);
        if (st.selected >= 0) order.push(st.selected);
        for (const i of order) {
          const z = st.zones[i];
          if (z.polygon.length < 3) continue;
          const state = states.get(z.name);
          const status = zoneStatus(state);
          const selected = i === st.selected;
          const extra = selected ? 'selected' : st.selected >= 0 ? 'dimmed' : '';
          shapes.push(zonePolygon(z.name, z.polygon, status, extra));
          const text = states.has(z.name) ? zoneSummary(z.name, state) : `${z.name} (not saved)`;
          labels.push(zoneLabel(z.name, text, status, z.polygon, selected ? 'selected' : ''));
        }
        const sel = st.zones[st.selected];
        if (sel) {
          sel.polygon.forEach((p, k) => {
            // r is tiny on purpose: the non-scaling stroke draws a round dot of
            // fixed screen size even though the viewBox is stretched unevenly.
            const attrs = { cx: p[0], cy: p[1], r: 0.0005, 'data-vertex': k, 'vector-effect': 'non-scaling-stroke' };
            shapes.push(svgEl('circle', { ...attrs, class: 'handle-ring' }));
            shapes.push(svgEl('circle', { ...attrs, class: 'handle' }));
          });
        }
        if (st.drawing) {
          const pts = st.drawing;
          if (pts.length >= 2) {
            shapes.push(svgEl(pts.length >= 3 ? 'polygon' : 'polyline', {
              class: 'draft', points: pointsAttr(pts), 'vector-effect': 'non-scaling-stroke',
            }));
          }
          if (pts.length && st.cursor) {
            const last = pts[pts.length - 1];
            shapes.push(svgEl('line', {
              class: 'rubber', x1: last[0], y1: last[1], x2: st.cursor[0], y2: st.cursor[1],
              'vector-effect': 'non-scaling-stroke',
            }));
          }
          pts.forEach((p, k) => shapes.push(svgEl('circle', {
            class: `draft-point${k === 0 ? ' first' : ''}`, cx: p[0], cy: p[1], r: 0.0005,
            'vector-effect': 'non-scaling-stroke',
          })));
        }
      }
      view.svg.replaceChildren(...shapes);
      view.labels.replaceChildren(...labels);
    }

    function renderList() {
      const states = liveStates();
      const items = st.zones.map((z, i) => {
        const state = states.get(z.name);
        let live;
        if (state) live = `${state.total} · ${state.status}`;
        else if (states.has(z.name)) live = 'counting…';
        else live = 'not saved';
        return h('li', {
          'data-zone': z.name,
          class: i === st.selected ? 'selected' : null,
          onclick: () => { if (!st.drawing) selectZone(i); },
        },
        h('span', { class: `swatch status-${zoneStatus(state)}` }),
        h('span', { class: 'zname', text: z.name || '(no name)' }),
        h('span', { class: 'live', text: live }));
      });
      if (!items.length) items.push(h('li', { class: 'empty', text: 'No zones yet: press “New zone”.' }));
      list.replaceChildren(...items);
    }

    function fillForm() {
      const z = st.zones[st.selected];
      inName.value = z ? z.name : '';
      inMin.value = z && Number.isFinite(z.min) ? String(z.min) : '';
      inMax.value = z && Number.isFinite(z.max) ? String(z.max) : '';
      inLabels.value = z ? z.labels.join(', ') : '';
      for (const i of [inName, inMin, inMax, inLabels]) {
        i.classList.remove('invalid');
        i.disabled = !z;
      }
    }

    function renderControls() {
      const data = st.data;
      const geo = geometryOk();
      btnNew.disabled = !geo;
      btnFinish.disabled = !st.drawing || st.drawing.length < 3;
      btnCancel.hidden = !st.drawing;
      btnDelete.disabled = st.selected < 0 || !!st.drawing;
      btnSave.disabled = !data || !data.editable || st.saving || !geo;
      btnDiscard.disabled = !isDirty() || st.saving;
      dirtyNote.textContent = isDirty() ? 'Unsaved changes' : '';
      view.root.classList.toggle('drawing', !!st.drawing);

      if (data && !data.editable) {
        note.textContent = 'Zone editing is turned off on this device (http.edit = false): zones can be tried out here but not saved.';
        note.hidden = false;
      } else if (data && st.camera && !geo) {
        note.textContent = 'This camera has not delivered a frame yet; zones can be edited once it has.';
        note.hidden = false;
      } else {
        note.hidden = true;
      }

      if (st.drawing) {
        hint.textContent = st.drawing.length < 3
          ? `Click on the frame to place the corners (${st.drawing.length} so far, at least 3).`
          : 'Click the first corner or press Finish to close the zone; Esc cancels.';
      } else if (st.selected >= 0) {
        hint.textContent = 'Drag a corner to move it, drag inside the zone to move all of it. Click elsewhere to deselect.';
      } else {
        hint.textContent = 'Click a zone to select it, or press New zone to draw one.';
      }
    }

    function renderAll() {
      renderOverlay();
      renderList();
      fillForm();
      renderControls();
    }

    // ---- actions

    function selectZone(i) {
      st.selected = i;
      renderAll();
    }

    function switchCamera(id) {
      st.camera = id;
      st.zones = st.drafts.get(id) || serverZones(serverCamera());
      st.selected = -1;
      st.drawing = null;
      st.cursor = null;
      st.drag = null;
      if (id !== null) picker.el.value = id;
      const cam = serverCamera();
      view.update(id, cam ? cam.frame : null);
      clearResult(result);
      renderAll();
    }

    // Takes the server's zones unless they are what is shown already, so the
    // selection and the form survive refreshes.
    function rereadZones() {
      const fresh = serverZones(serverCamera());
      if (JSON.stringify(fresh) === JSON.stringify(st.zones)) return;
      const name = st.zones[st.selected] ? st.zones[st.selected].name : null;
      st.zones = fresh;
      st.selected = name === null ? -1 : fresh.findIndex((z) => z.name === name);
      fillForm();
    }

    function startDrawing() {
      if (!geometryOk()) return;
      st.drawing = [];
      st.cursor = null;
      st.selected = -1;
      clearResult(result);
      renderAll();
    }

    function cancelDrawing() {
      st.drawing = null;
      st.cursor = null;
      renderAll();
    }

    function finishDrawing() {
      if (!st.drawing || st.drawing.length < 3) return;
      st.zones.push({ name: unusedName(), polygon: st.drawing, labels: [], min: null, max: null });
      st.drawing = null;
      st.cursor = null;
      st.selected = st.zones.length - 1;
      markDirty();
      renderAll();
      // Focusing on a phone would pop the keyboard over the frame.
      if (window.matchMedia && window.matchMedia('(pointer: fine)').matches) {
        inName.focus();
        inName.select();
      }
    }

    function addDraftPoint(p) {
      const pts = st.drawing;
      if (pts.length >= 3 && view.distance(p, pts[0]) <= 12) { finishDrawing(); return; }
      // The second click of a double click lands on the same spot: not a new corner.
      if (pts.length && view.distance(p, pts[pts.length - 1]) < 3) return;
      pts.push(p);
      renderOverlay();
      renderControls();
    }

    function deleteZone() {
      if (st.selected < 0) return;
      st.zones.splice(st.selected, 1);
      st.selected = -1;
      markDirty();
      renderAll();
    }

    function discard() {
      st.drafts.delete(st.camera);
      st.zones = serverZones(serverCamera());
      st.selected = -1;
      st.drawing = null;
      clearResult(result);
      if (st.drafts.size === 0 && st.data) st.version = st.data.config_version;
      renderAll();
    }

    // Applies a form edit to the selected zone at once; the form itself is not
    // re-rendered so the caret stays where the user is typing.
    function editSelected(fn) {
      const z = st.zones[st.selected];
      if (!z) return;
      fn(z);
      markDirty();
      renderOverlay();
      renderList();
      renderControls();
    }

    // NaN marks a value the daemon could not take; Save refuses it with a message.
    function parseLimit(input) {
      const raw = input.value.trim();
      let value;
      if (raw === '') value = input.validity && input.validity.badInput ? NaN : null;
      else {
        const n = Number(raw);
        value = Number.isInteger(n) && n >= 0 && n <= 4294967295 ? n : NaN;
      }
      input.classList.toggle('invalid', Number.isNaN(value));
      return value;
    }

    inName.addEventListener('input', () => editSelected((z) => { z.name = inName.value.trim(); }));
    inMin.addEventListener('input', () => editSelected((z) => { z.min = parseLimit(inMin); }));
    inMax.addEventListener('input', () => editSelected((z) => { z.max = parseLimit(inMax); }));
    inLabels.addEventListener('input', () => editSelected((z) => {
      z.labels = inLabels.value.split(',').map((s) => s.trim()).filter(Boolean);
    }));

    btnNew.addEventListener('click', startDrawing);
    btnFinish.addEventListener('click', finishDrawing);
    btnCancel.addEventListener('click', cancelDrawing);
    btnDelete.addEventListener('click', deleteZone);
    btnDiscard.addEventListener('click', discard);
    btnSave.addEventListener('click', save);

    document.addEventListener('keydown', (ev) => {
      const t = ev.target;
      if (t && (t.tagName === 'INPUT' || t.tagName === 'SELECT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
      if (ev.key === 'Escape') {
        if (st.drawing) cancelDrawing();
        else if (st.selected >= 0) selectZone(-1);
      } else if (ev.key === 'Enter' && st.drawing) {
        ev.preventDefault();
        finishDrawing();
      } else if (ev.key === 'Delete' && st.selected >= 0 && !st.drawing) {
        deleteZone();
      }
    });

    // ---- pointer editing on the overlay

    function vertexAt(p) {
      const z = st.zones[st.selected];
      if (!z) return -1;
      let best = -1;
      let bestD = 12;
      z.polygon.forEach((v, k) => {
        const d = view.distance(p, v);
        if (d <= bestD) { best = k; bestD = d; }
      });
      return best;
    }

    // Topmost first: the selected zone is drawn last, then the later zones.
    function zoneAt(p) {
      if (st.selected >= 0 && pointInPolygon(p, st.zones[st.selected].polygon)) return st.selected;
      for (let i = st.zones.length - 1; i >= 0; i -= 1) {
        if (pointInPolygon(p, st.zones[i].polygon)) return i;
      }
      return -1;
    }

    view.svg.addEventListener('pointerdown', (ev) => {
      if (ev.button !== 0 || !geometryOk() || st.drag) return;
      ev.preventDefault();
      const p = view.toNorm(ev);
      if (st.drawing) { addDraftPoint(p); return; }
      let drag = null;
      const k = vertexAt(p);
      if (k >= 0) {
        drag = { kind: 'vertex', vertex: k };
      } else {
        const i = zoneAt(p);
        if (i < 0) { if (st.selected >= 0) selectZone(-1); return; }
        if (i !== st.selected) selectZone(i);
        drag = { kind: 'move', orig: st.zones[i].polygon.map((q) => [q[0], q[1]]) };
      }
      st.drag = { ...drag, index: st.selected, start: p, pointerId: ev.pointerId, moved: false };
      try { view.svg.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events have no capture */ }
    });

    view.svg.addEventListener('pointermove', (ev) => {
      const d = st.drag;
      if (d && ev.pointerId === d.pointerId) {
        const p = view.toNorm(ev);
        // A click that wobbles a pixel should select, not edit.
        if (!d.moved && view.distance(p, d.start) < 3) return;
        const z = st.zones[d.index];
        if (!z) return;
        if (d.kind === 'vertex') {
          z.polygon[d.vertex] = p;
        } else {
          const b = bounds(d.orig);
          const dx = Math.min(1 - b.maxX, Math.max(-b.minX, p[0] - d.start[0]));
          const dy = Math.min(1 - b.maxY, Math.max(-b.minY, p[1] - d.start[1]));
          z.polygon = d.orig.map((q) => [clamp01(q[0] + dx), clamp01(q[1] + dy)]);
        }
        if (!d.moved) {
          d.moved = true;
          view.root.classList.add('dragging');
          markDirty();
          renderControls();
        }
        renderOverlay();
      } else if (st.drawing) {
        st.cursor = view.toNorm(ev);
        renderOverlay();
      }
    });

    function endDrag(ev) {
      const d = st.drag;
      if (!d || ev.pointerId !== d.pointerId) return;
      st.drag = null;
      view.root.classList.remove('dragging');
      try { view.svg.releasePointerCapture(ev.pointerId); } catch (_) { /* already released */ }
      if (d.moved) { renderOverlay(); renderList(); }
    }
    view.svg.addEventListener('pointerup', endDrag);
    view.svg.addEventListener('pointercancel', endDrag);
    view.svg.addEventListener('pointerleave', () => {
      if (st.drawing && st.cursor) { st.cursor = null; renderOverlay(); }
    });

    // ---- saving

    function saveErrorLines(e) {
      const lines = [];
      if (e.status === 409) {
        lines.push(e.message);
        lines.push('The configuration file changed on disk since this page read it. Reload the page to get the current zones (the edits here are lost), then edit again.');
      } else if (e.status === 403) {
        lines.push(e.message);
      } else if (e.status === 422 || e.status === 0) {
        lines.push(e.message);
      } else {
        lines.push(`Not saved (HTTP ${e.status}): ${e.message}`);
      }
      const problems = e.body && Array.isArray(e.body.problems) ? e.body.problems : [];
      for (const p of problems) lines.push(p.text || `${p.key}: ${p.message}`);
      return lines;
    }

    async function save() {
      const camera = st.camera;
      if (camera === null || st.saving) return;
      const problems = [];
      st.zones.forEach((z, i) => {
        const label = z.name || `zone ${i + 1}`;
        if (Number.isNaN(z.min)) problems.push(`${label}: min must be a whole number, 0 or more (or empty)`);
        if (Number.isNaN(z.max)) problems.push(`${label}: max must be a whole number, 0 or more (or empty)`);
      });
      if (problems.length) {
        showResult(result, 'error', ['Not saved:', ...problems]);
        return;
      }
      const body = {
        version: st.version || '',
        zones: st.zones.map((z) => ({
          name: z.name,
          polygon: z.polygon.map((p) => [round5(p[0]), round5(p[1])]),
          labels: z.labels,
          min: z.min,
          max: z.max,
        })),
      };
      st.saving = true;
      renderControls();
      showResult(result, 'busy', ['Saving…']);
      try {
        const res = await api('PUT', `/api/cameras/${enc(camera)}/zones`, body);
        st.gen += 1;
        st.drafts.delete(camera);
        st.version = res.version;
        const backup = res.backup ? ` (backup ${res.backup})` : '';
        const reloaded = res.reloaded
          ? 'reloaded'
          : 'not reloaded: the daemon keeps counting with the old zones until it is restarted';
        showResult(result, 'ok', [`Saved to ${res.saved}${backup}; ${reloaded}`]);
        poll.now();
      } catch (e) {
        const extra = [];
        if (e.status === 409) {
          extra.push(h('button', { type: 'button', text: 'Reload the page', onclick: () => location.reload() }));
        }
        showResult(result, 'error', saveErrorLines(e), ...extra);
      } finally {
        st.saving = false;
        renderControls();
        renderList();
      }
    }

    // ---- refresh: the frame and the live counts always, the zones only when
    // nothing here is being edited

    async function refresh() {
      const gen = st.gen;
      const data = await getJSON('/api/cameras');
      // A save landed while this was in flight: its answer predates the save and
      // the follow-up refresh has the truth.
      if (gen !== st.gen) return;
      st.data = data;
      setDevice(data.device);
      if (st.drafts.size === 0) st.version = data.config_version;
      const ids = (data.cameras || []).map((c) => c.id);
      picker.set(ids, st.camera);
      if (!ids.includes(st.camera)) {
        const want = preferredCamera();
        switchCamera(ids.includes(want) ? want : ids.length ? ids[0] : null);
        return;
      }
      if (!isDirty() && !st.drag && !st.drawing) rereadZones();
      const cam = serverCamera();
      view.update(st.camera, cam ? cam.frame : null);
      if (!st.drag) renderOverlay();
      renderList();
      renderControls();
    }

    renderAll();
    const poll = poller(refresh, 2000);
  }

  // ================================================================== Health view

  function healthView(app) {
    const uptime = h('span', { id: 'uptime', text: '…' });
    const camRows = h('tbody');
    const camTable = h('table', { id: 'health-cameras' },
      h('thead', {}, h('tr', {},
        h('th', { text: 'Camera' }),
        h('th', { text: 'Online' }),
        h('th', { class: 'num', text: 'Frames/s' }),
        h('th', { class: 'num', text: 'Inference p50 ms' }),
        h('th', { class: 'num', text: 'p99 ms' }),
        h('th', { class: 'num', text: 'Captured' }),
        h('th', { class: 'num', text: 'Processed' }),
        h('th', { class: 'num', text: 'Dropped' }),
        h('th', { class: 'num', text: 'Corrupt' }),
        h('th', { class: 'num', text: 'Reconnects' }))),
      camRows);
    const mqtt = h('div', { id: 'health-mqtt' });
    const events = h('ol', { id: 'events', class: 'events' });
    const noEvents = h('p', { class: 'muted', text: 'No events yet.', hidden: true });

    app.append(h('div', { class: 'health-grid' },
      h('section', { class: 'panel' }, h('h2', { text: 'Daemon' }), h('p', {}, 'Up for ', uptime)),
      h('section', { class: 'panel' }, h('h2', { text: 'Cameras' }), h('div', { class: 'table-scroll' }, camTable)),
      h('section', { class: 'panel' }, h('h2', { text: 'MQTT' }), mqtt),
      h('section', { class: 'panel' }, h('h2', { text: 'Last events' }), noEvents, events)));

    const yesNo = (v, yes, no, good = true) => h('span', { class: `pill ${v === good ? 'online' : 'offline'}`, text: v ? yes : no });
    const td = (cls, text) => h('td', { class: `${cls} num`, text });

    function renderMqtt(m) {
      if (!m) {
        mqtt.replaceChildren(h('p', { class: 'muted', text: 'no MQTT sink' }));
        return;
      }
      const rows = [
        ['Connected', yesNo(!!m.connected, 'connected', 'disconnected')],
        ['Spooled messages', fmt.int(m.spooled)],
        ['Spooled bytes', fmt.bytes(m.spooled_bytes)],
        ['Dropped', fmt.int(m.dropped)],
        ['Damaged spool entries', fmt.int(m.spool_damaged)],
        ['Reconnects', fmt.int(m.connect_attempts)],
        ['Spool on disk', m.spool_on_disk ? 'yes' : 'no (memory only)'],
      ];
      mqtt.replaceChildren(h('dl', { class: 'kv' },
        rows.map(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)])));
    }

    const SKIP = new Set(['schema', 'device', 'seq', 'ts', 'type', 'camera', 'zone', 'event']);

    function renderEvents(list) {
      events.replaceChildren(...list.map((e) => {
        const details = Object.entries(e)
          .filter(([k]) => !SKIP.has(k))
          .map(([k, v]) => `${k}: ${fmt.value(v)}`)
          .join(' · ');
        const where = [e.camera, e.zone].filter(Boolean).join(' / ');
        return h('li', { 'data-seq': e.seq },
          h('span', { class: 'ts', text: fmt.time(e.ts) }),
          h('span', { class: 'where', text: where }),
          h('span', { class: `pill event-${e.event}`, text: e.event || 'event' }),
          details ? h('span', { class: 'details', text: details }) : null);
      }));
      noEvents.hidden = list.length > 0;
    }

    poller(async () => {
      const data = await getJSON('/api/health');
      setDevice(data.device);
      const health = data.health || {};
      uptime.textContent = fmt.uptime(health.uptime_s);
      const cams = health.cameras || [];
      camRows.replaceChildren(...cams.map((c) => h('tr', { 'data-camera': c.camera },
        h('td', { class: 'camera', text: c.camera }),
        h('td', { class: 'online' }, yesNo(!!c.online, 'online', 'offline')),
        td('fps', fmt.num(c.fps, 1)),
        td('p50', fmt.num(c.inference_ms_p50, 1)),
        td('p99', fmt.num(c.inference_ms_p99, 1)),
        td('captured', fmt.int(c.frames_captured)),
        td('processed', fmt.int(c.frames_processed)),
        td('dropped', fmt.int(c.frames_dropped)),
        td('corrupt', fmt.int(c.frames_corrupt)),
        td('reconnects', fmt.int(c.reconnects)))));
      if (!cams.length) camRows.append(h('tr', {}, h('td', { colspan: 10, class: 'muted', text: 'No cameras.' })));
      renderMqtt(health.mqtt);
      renderEvents(Array.isArray(data.events) ? data.events : []);
    }, 2000);
  }

  // ================================================================== Identify view

  function identifyView(app) {
    const st = {
      data: null,
      camera: null,
      box: null,       // [x1, y1, x2, y2] normalised, or null
      boxSeq: null,    // the frame the box was drawn on
      drag: null,
      busy: false,
    };

    const view = new FrameView({ imgId: 'identify-frame', svgId: 'identify-svg', wrapClass: 'identify-wrap' });
    const picker = cameraPicker((id) => { switchCamera(id); rememberCamera(id); });
    const btnClear = h('button', { id: 'clear-box', type: 'button', text: 'Clear box' });
    const hint = h('p', { class: 'hint' });
    const note = h('p', { class: 'note', hidden: true });
    const inSku = h('input', { id: 'sku', type: 'text', autocomplete: 'off', spellcheck: 'false', placeholder: 'e.g. SKU-1' });
    const inName = h('input', { id: 'product-name', type: 'text', autocomplete: 'off', placeholder: 'optional' });
    const btnEnrol = h('button', { id: 'enrol', type: 'button', class: 'primary', text: 'Enrol' });
    const btnIdentify = h('button', { id: 'identify', type: 'button', text: 'Identify' });
    const result = h('div', { id: 'identify-result', class: 'result', role: 'status', 'aria-live': 'polite' });
    const inPhoto = h('input', { id: 'photo', type: 'file', accept: 'image/jpeg,image/png,image/bmp' });
    const btnPhoto = h('button', { id: 'identify-photo', type: 'button', text: 'Identify photo' });

    app.append(note, h('div', { class: 'identify-layout' },
      h('div', { class: 'panel' },
        h('div', { class: 'toolbar' }, h('label', {}, 'Camera', picker.el), btnClear),
        view.root,
        hint),
      h('aside', {},
        h('form', { class: 'panel', onsubmit: (ev) => ev.preventDefault() },
          h('h3', { text: 'Product in the box' }),
          h('label', { class: 'field' }, h('span', { text: 'SKU' }), inSku),
          h('label', { class: 'field' }, h('span', { text: 'Product name' }), inName),
          h('div', { class: 'buttons' }, btnEnrol, btnIdentify),
          h('h3', { text: 'Or a photo' }),
          h('label', { class: 'field' }, h('span', { text: 'Photo of one product' }), inPhoto),
          h('div', { class: 'buttons' }, btnPhoto),
          result))));

    const serverCamera = () => (st.data && st.data.cameras || []).find((c) => c.id === st.camera) || null;
    const enabled = () => !!(st.data && st.data.identification);

    function render() {
      const shapes = [];
      if (st.box) {
        const [x1, y1, x2, y2] = st.box;
        shapes.push(svgEl('rect', {
          class: 'pick', x: x1, y: y1, width: x2 - x1, height: y2 - y1, 'vector-effect': 'non-scaling-stroke',
        }));
      }
      view.svg.replaceChildren(...shapes);
      btnClear.disabled = !st.box || !!st.drag;
      btnEnrol.disabled = !enabled() || st.busy;
      btnIdentify.disabled = !enabled() || st.busy;
      btnPhoto.disabled = !enabled() || st.busy;
      if (st.data && !enabled()) {
        note.textContent = 'Product identification is not configured on this device ([identify] in the config): enrolling and identifying are off.';
        note.hidden = false;
      } else {
        note.hidden = true;
      }
      hint.textContent = st.box
        ? `Frame ${st.boxSeq} stays on screen while the box is drawn; Clear box to go back to the live picture.`
        : 'Drag on the frame to draw a box around one product.';
    }

    function clearBox() {
      st.box = null;
      st.boxSeq = null;
      st.drag = null;
      view.frozen = false;
      render();
      const cam = serverCamera();
      view.update(st.camera, cam ? cam.frame : null);
    }

    function switchCamera(id) {
      st.camera = id;
      st.box = null;
      st.boxSeq = null;
      st.drag = null;
      view.frozen = false;
      if (id !== null) picker.el.value = id;
      const cam = serverCamera();
      view.update(id, cam ? cam.frame : null);
      clearResult(result);
      render();
    }

    view.svg.addEventListener('pointerdown', (ev) => {
      if (ev.button !== 0 || view.seq === null || st.busy) return;
      ev.preventDefault();
      const p = view.toNorm(ev);
      // Freeze first: a frame arriving mid-drag must not slide under the box.
      view.frozen = true;
      st.drag = { pointerId: ev.pointerId, start: p };
      st.box = [p[0], p[1], p[0], p[1]];
      st.boxSeq = view.seq;
      try { view.svg.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events have no capture */ }
      render();
      // The camera moves on while the box is drawn and the SKU typed: ask the daemon to
      // keep this frame (it keeps only the last few otherwise) so enrol finds it.
      const camera = st.camera;
      api('POST', `/api/cameras/${enc(camera)}/pin`, { frame: st.boxSeq }).catch((e) => {
        if (st.camera === camera) showResult(result, 'error', [e.message]);
      });
    });

    view.svg.addEventListener('pointermove', (ev) => {
      const d = st.drag;
      if (!d || ev.pointerId !== d.pointerId) return;
      const p = view.toNorm(ev);
      st.box = [Math.min(d.start[0], p[0]), Math.min(d.start[1], p[1]), Math.max(d.start[0], p[0]), Math.max(d.start[1], p[1])];
      render();
    });

    function endDrag(ev) {
      const d = st.drag;
      if (!d || ev.pointerId !== d.pointerId) return;
      st.drag = null;
      try { view.svg.releasePointerCapture(ev.pointerId); } catch (_) { /* already released */ }
      const [x1, y1, x2, y2] = st.box;
      if (view.distance([x1, y1], [x2, y1]) < 4 || view.distance([x1, y1], [x1, y2]) < 4) {
        clearBox();
        return;
      }
      render();
    }
    view.svg.addEventListener('pointerup', endDrag);
    view.svg.addEventListener('pointercancel', endDrag);
    btnClear.addEventListener('click', clearBox);

    function needBox() {
      if (st.box && st.boxSeq !== null && !st.drag) return true;
      showResult(result, 'error', ['Draw a box around one product on the frame first.']);
      return false;
    }

    async function run(what, fn) {
      st.busy = true;
      render();
      showResult(result, 'busy', [`${what}…`]);
      try {
        await fn();
      } catch (e) {
        const lines = [e.message];
        if (e.status === 409) {
          lines.push('The box has been cleared: draw it again on the current frame.');
          clearBox();
        }
        showResult(result, 'error', lines);
      } finally {
        st.busy = false;
        render();
      }
    }

    const boxBody = () => ({ frame: st.boxSeq, box: st.box.map(round5) });

    btnEnrol.addEventListener('click', () => {
      if (!needBox()) return;
      const sku = inSku.value.trim();
      if (!sku) {
        showResult(result, 'error', ['Enter the SKU to enrol the product under.']);
        inSku.focus();
        return;
      }
      const body = { ...boxBody(), sku };
      const name = inName.value.trim();
      if (name) body.name = name;
      run('Enrolling', async () => {
        const r = await api('POST', `/api/cameras/${enc(st.camera)}/enrol`, body);
        const reloaded = r.reloaded ? 'identification reloaded' : 'not reloaded yet';
        showResult(result, 'ok', [
          `Enrolled ${r.sku} from frame ${body.frame}.`,
          `The gallery now holds ${r.references} reference${r.references === 1 ? '' : 's'} of ${r.skus} SKU${r.skus === 1 ? '' : 's'}; ${reloaded}.`,
        ]);
      });
    });

    // The closest SKUs as a table under a one-line verdict.
    function showMatches(r, footer) {
      const head = r.sku === 'unknown'
        ? 'Unknown product: nothing enrolled is similar enough.'
        : `Identified as ${r.sku}.`;
      const matches = Array.isArray(r.matches) ? r.matches : [];
      const table = matches.length
        ? h('table', { class: 'matches' },
          h('thead', {}, h('tr', {},
            h('th', { class: 'num', text: '#' }),
            h('th', { text: 'SKU' }),
            h('th', { text: 'Name' }),
            h('th', { class: 'num', text: 'Similarity' }))),
          h('tbody', {}, matches.map((m, i) => h('tr', { 'data-sku': m.sku },
            h('td', { class: 'num', text: String(i + 1) }),
            h('td', { class: 'sku', text: m.sku }),
            h('td', { class: 'name', text: m.name || '' }),
            h('td', { class: 'similarity num', text: fmt.num(m.similarity, 3) })))))
        : h('p', { class: 'muted', text: 'No products are enrolled yet.' });
      showResult(result, 'ok', [head, `${footer}, ${fmt.num(r.ms, 1)} ms.`], table);
    }

    btnIdentify.addEventListener('click', () => {
      if (!needBox()) return;
      const body = boxBody();
      run('Identifying', async () => {
        const r = await api('POST', `/api/cameras/${enc(st.camera)}/identify`, body);
        showMatches(r, `Frame ${body.frame}`);
      });
    });

    // A photo from this device (a phone at the shelf, a scanner's picture): sent as is,
    // the daemon holds it to the scanner requests' size limits.
    btnPhoto.addEventListener('click', () => {
      const file = inPhoto.files && inPhoto.files[0];
      if (!file) {
        showResult(result, 'error', ['Choose a photo of one product first.']);
        return;
      }
      run('Identifying the photo', async () => {
        const res = await fetch('/api/identify', {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'Content-Type': file.type || 'application/octet-stream' },
          body: file,
        });
        const r = await res.json().catch(() => ({}));
        if (!res.ok) {
          const e = new Error(r.error || `${res.status} ${res.statusText}`);
          e.status = res.status;
          throw e;
        }
        showMatches(r, file.name);
      });
    });

    async function refresh() {
      const data = await getJSON('/api/cameras');
      st.data = data;
      setDevice(data.device);
      const ids = (data.cameras || []).map((c) => c.id);
      picker.set(ids, st.camera);
      if (!ids.includes(st.camera)) {
        const want = preferredCamera();
        switchCamera(ids.includes(want) ? want : ids.length ? ids[0] : null);
        return;
      }
      const cam = serverCamera();
      view.update(st.camera, cam ? cam.frame : null);
      render();
    }

    render();
    poller(refresh, 2000);
  }

  // ================================================================== start

  const VIEWS = {
    '/': { key: 'live', title: 'Live', start: liveView },
    '/zones': { key: 'zones', title: 'Zones', start: zonesView },
    '/health': { key: 'health', title: 'Health', start: healthView },
    '/identify': { key: 'identify', title: 'Identify', start: identifyView },
  };

  function start() {
    const path = location.pathname.replace(/\/+$/, '') || '/';
    const v = VIEWS[path] || VIEWS['/'];
    viewTitle = v.title;
    document.title = `${v.title} · shelfwatch`;
    for (const a of document.querySelectorAll('.topbar nav a')) {
      if (a.dataset.view === v.key) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const app = document.getElementById('app');
    app.replaceChildren();
    app.classList.add(`view-${v.key}`);
    v.start(app);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
