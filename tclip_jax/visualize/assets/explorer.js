/* TCLIP results explorer: per-word maps over the image, offline, no server, no external resources.
 *
 * Data (tclip_jax/visualize/explorer.py): page = {title, run, model (the model's name), turbo (hex RGB x 256),
 * images: [entry | stub]}; a stub {name, title, script} names a data script that calls
 * TCLIPExplorer.register(name, entry). An entry has the photo, the prompts with their words (and `cut`, where a
 * prompt cut to fit the model's context stops being mapped; `partly`, where it stops being mapped by every one of a
 * method's template texts, each cut by itself), and panels (one per method) whose maps point into
 * entry.blobs: 8-bit grayscale PNGs of q = 255 (v - lo) / (hi - lo), with [lo, hi] beside them; a panel's `covered`
 * (x1, y1, x2, y2, image pixels) is what its model saw, all but what a centre crop cut off. Maps are decoded
 * onto a canvas and coloured here, on the scale the viewer picks. A map stored smaller than the photo (INTER_AREA)
 * has a value per cell, the mean over the photo pixels it covers: the pointer readout names those (`cellPixels`),
 * and where some of them lie outside `covered`, says the mean counts the fill the crop left there.
 */
(() => {
  'use strict';
  const previous = window.TCLIPExplorer;
  const registry = (previous && previous.registry) || {};  // linked entries by name, as their scripts register
  const waiting = (previous && previous.waiting) || {};    // name -> [{resolve, reject}]

  function register(name, entry) {
    registry[name] = entry;
    (waiting[name] || []).forEach((w) => w.resolve(entry));
    delete waiting[name];
  }

  function loadEntry(info) {
    if (!info.script) return Promise.resolve(info);
    if (registry[info.name]) return Promise.resolve(registry[info.name]);
    return new Promise((resolve, reject) => {
      const first = !waiting[info.name];
      (waiting[info.name] = waiting[info.name] || []).push({resolve, reject});
      if (!first) return;
      const tag = document.createElement('script');
      tag.src = info.script;
      const fail = (message) => {
        const error = new Error(message);
        (waiting[info.name] || []).forEach((w) => w.reject(error));
        delete waiting[info.name];
        tag.remove();
      };
      tag.onerror = () => fail(`could not load ${info.script}: keep each image's folder next to index.html`);
      // A script that loads but throws (a file cut short in copying) registers nothing: say so, do not wait.
      tag.onload = () => { if (waiting[info.name]) fail(`${info.script} is damaged: it holds no image data`); };
      document.head.appendChild(tag);
    });
  }

  // ------------------------------------------------------------------------------------------------ helpers
  // A number as the page shows it: 4 decimal places under 10 in magnitude, 4 significant digits from 10 up (in
  // exponent form from 1e4), a tie rounded away from zero. figures.format_number is this rule in Python.
  const fmt = (v) => (v === null || v === undefined ? '—' : (Math.abs(v) < 10 ? v.toFixed(4) : v.toPrecision(4)));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function hexBytes(hex) {
    const bytes = new Uint8Array(hex.length / 2);
    for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(2 * i, 2), 16);
    return bytes;
  }

  function decode(entry, index) {
    if (!entry._decoded) Object.defineProperty(entry, '_decoded', {value: new Map()});
    if (!entry._decoded.has(index)) {
      entry._decoded.set(index, new Promise((resolve, reject) => {
        const img = new Image();
        img.onload = () => {
          const w = img.naturalWidth;
          const h = img.naturalHeight;
          const canvas = document.createElement('canvas');
          canvas.width = w;
          canvas.height = h;
          const ctx = canvas.getContext('2d', {willReadFrequently: true});
          ctx.drawImage(img, 0, 0);
          const rgba = ctx.getImageData(0, 0, w, h).data;
          const q = new Uint8Array(w * h);
          for (let i = 0; i < q.length; i++) q[i] = rgba[4 * i];
          resolve({w, h, q});
        };
        img.onerror = () => reject(new Error('a map could not be decoded'));
        img.src = entry.blobs[index];
      }));
    }
    return entry._decoded.get(index);
  }

  // Colour a decoded map: value v = lo + q (hi - lo) / 255, shown at t = (v - L) / (H - L) on the turbo table.
  function paint(canvas, decoded, range, scale, turbo) {
    const [lo, hi] = range;
    const [low, high] = scale;
    const lut = new Uint8Array(256);
    for (let q = 0; q < 256; q++) {
      const t = high > low ? (lo + (q / 255) * (hi - lo) - low) / (high - low) : 0;
      lut[q] = Math.max(0, Math.min(255, Math.round(t * 255)));
    }
    if (scale === range) for (let q = 0; q < 256; q++) lut[q] = hi > lo ? q : 0;  // exact: the map's own range
    canvas.width = decoded.w;
    canvas.height = decoded.h;
    const ctx = canvas.getContext('2d');
    const image = ctx.createImageData(decoded.w, decoded.h);
    const out = image.data;
    const q = decoded.q;
    for (let i = 0; i < q.length; i++) {
      const k = 3 * lut[q[i]];
      out[4 * i] = turbo[k];
      out[4 * i + 1] = turbo[k + 1];
      out[4 * i + 2] = turbo[k + 2];
      out[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
  }

  function items(entry) {
    const list = [];
    entry.prompts.forEach((p, i) => {
      p.words.forEach((w, j) => list.push({key: `p${i}w${j}`, text: w.text}));
      list.push({key: `p${i}`, text: p.prompt});
    });
    return list;
  }

  const pick = (m, kind) => (kind === 'soft' && m.soft ? m.soft : m.heatmap);

  function sharedScale(panel, kind) {
    let low = Infinity;
    let high = -Infinity;
    for (const m of Object.values(panel.maps)) {
      const source = pick(m, kind);
      low = Math.min(low, source.range[0]);
      high = Math.max(high, source.range[1]);
    }
    return [low, high];
  }

  // The photo pixels first..last (along one axis of `size` pixels) that cell d of a map stored `cells` wide covers,
  // and whether they weigh the same in it. explorer.py shrinks a map with OpenCV's INTER_AREA: cell d is the mean
  // over [d s, (d + 1) s), s = size / cells, a pixel at either end weighted by the part of it inside. This is
  // OpenCV's own arithmetic (resize.cpp, computeResizeAreaTab), its tolerance of 1e-3 pixel included.
  function cellPixels(d, cells, size) {
    const scale = 1 / (cells / size);  // as OpenCV computes it, from the inverse scale
    const start = d * scale;
    const end = start + scale;
    const last = Math.min(Math.floor(end), size - 1);
    const first = Math.min(Math.ceil(start), last);
    const parts = [];  // the part of each pixel inside the cell: its weight
    if (first - start > 1e-3) parts.push(first - start);  // the pixel before `first`
    if (last > first) parts.push(1);                       // first..last - 1, whole
    if (end - last > 1e-3) parts.push(Math.min(end - last, 1));  // `last`
    return {first: first - start > 1e-3 ? first - 1 : first, last: end - last > 1e-3 ? last : last - 1,
            even: Math.max(...parts) - Math.min(...parts) <= 1e-3};
  }

  const valueName = (panel) => (panel.method === 'tclip' ? 'raw cosine similarity' : 'the method\'s map values');

  // ------------------------------------------------------------------------------------------------ mount
  let mounts = 0;

  function mount(root, page, options) {
    options = options || {};
    const id = `tclip${++mounts}${Math.random().toString(36).slice(2, 7)}`;
    const turbo = hexBytes(page.turbo);
    const state = {image: 0, item: null, preview: null, kind: 'heatmap', scale: 'shared', opacity: 0.6,
                   view: page.view === 'compare' ? 'compare' : 'single', panel: 0};
    let entry = null;
    let token = 0;      // the latest render: older renders drop their results
    let loading = 0;    // the latest image load
    let pointerAt = null;  // the pointer's last position in the window (client pixels); null: not over the window
    root.textContent = '';
    root.classList.add('tclip-x');

    // Static parts: header, image navigation, prompts, controls, stage.
    const run = page.run || {};
    const head = el('header', {class: 'tclip-head'},
                    el('h1', {text: page.title}),
                    el('div', {class: 'tclip-run'}));
    const links = el('nav', {class: 'tclip-links'});
    head.append(links);
    const imageNav = el('div', {class: 'tclip-images'});
    const prompts = el('div', {class: 'tclip-prompts'});
    const controls = el('div', {class: 'tclip-controls'});
    const tabs = el('div', {class: 'tclip-tabs', role: 'tablist'});
    const stage = el('div', {class: 'tclip-stage'});
    const help = el('p', {class: 'tclip-help', text: (options.keys === 'document'
      ? '← / → step through the words, ↑ / ↓ through the images'
      : 'Click here, then ← / → step through the words') + ' (on a control, the arrow keys change that control); '
      + 'hover a word to preview its map.'});
    root.append(head, imageNav, prompts, controls, tabs, stage, help);
    if (run.method) {
      head.querySelector('.tclip-run').append(
        el('span', {text: `model ${page.model || '?'} · input ${run.input_protocol} · `}),
        el('details', {}, el('summary', {text: 'settings'}),
           el('pre', {text: JSON.stringify(run.settings, null, 1)})));
    }

    function radios(name, legend, choices, current, onChange) {
      const group = el('fieldset', {class: 'tclip-group'}, el('legend', {text: legend}));
      for (const [value, label] of choices) {
        const input = el('input', {type: 'radio', name: `${id}-${name}`, value, checked: value === current,
                                   'data-control': name,
                                   onchange: () => onChange(value)});
        group.append(el('label', {}, input, ` ${label}`));
      }
      return group;
    }
    const opacityOut = el('output', {text: `${Math.round(state.opacity * 100)} %`});
    const opacity = el('input', {type: 'range', min: 0, max: 100, value: Math.round(state.opacity * 100),
                                 'data-control': 'opacity', 'aria-label': 'map opacity'});
    opacity.addEventListener('input', () => {
      state.opacity = opacity.value / 100;
      opacityOut.textContent = `${opacity.value} %`;
      root.querySelectorAll('canvas.tclip-map').forEach((c) => { c.style.opacity = state.opacity; });
    });
    const kindGroup = radios('kind', 'Map', [['heatmap', 'aggregated map'], ['soft', 'soft map (GMM, τ)']],
                             state.kind, (v) => { state.kind = v; render(); });
    const viewGroup = radios('view', 'View', [['single', 'one method'], ['compare', 'compare methods']], state.view,
                             (v) => { state.view = v; build(); });
    controls.append(
      kindGroup,
      radios('scale', 'Colour scale', [['shared', 'shared across words'], ['map', 'per map']], state.scale,
             (v) => { state.scale = v; render(); }),
      el('fieldset', {class: 'tclip-group'}, el('legend', {text: 'Opacity'}), opacity, opacityOut),
      viewGroup);

    // Offered only where the image has it: a soft map (a baseline has none), several methods to compare.
    function fitControls() {
      const choose = (group, value) => group.querySelectorAll('input').forEach((input) => {
        input.checked = input.value === value;
      });
      kindGroup.hidden = !entry.panels.some((panel) => panel.has_soft);
      if (kindGroup.hidden) choose(kindGroup, state.kind = 'heatmap');
      viewGroup.hidden = entry.panels.length < 2;
      if (viewGroup.hidden) choose(viewGroup, state.view = 'single');
    }

    // Image navigation (several images).
    const select = el('select', {'aria-label': 'image', onchange: () => showImage(Number(select.value))});
    page.images.forEach((info, i) => select.append(el('option', {value: i, text: `${i + 1}. ${info.title || info.name}`})));
    if (page.images.length > 1) {
      imageNav.append(el('button', {type: 'button', text: '◀', title: 'previous image (↑)',
                                    onclick: () => showImage(state.image - 1)}),
                      select,
                      el('button', {type: 'button', text: '▶', title: 'next image (↓)',
                                    onclick: () => showImage(state.image + 1)}),
                      el('span', {class: 'tclip-count', text: `${page.images.length} images`}));
    }

    function showImage(index) {
      if (index < 0 || index >= page.images.length) return;
      state.image = index;
      select.value = index;
      const mine = ++loading;
      // Nothing of the image shown before stays while this one loads, nor if it fails to; its renders stop.
      entry = null;
      ++token;
      delete root.dataset.rendered;
      for (const part of [prompts, links, tabs, stage]) part.textContent = '';
      stage.append(el('p', {class: 'tclip-wait', text: 'Loading…'}));
      loadEntry(page.images[index]).then((loaded) => {
        if (mine !== loading) return;
        entry = loaded;
        // The images of a run share its prompts: the word shown stays, where this image has its map.
        const list = items(entry);
        const main = entry.panels[0];
        const first = list.find((it) => it.key === state.item && main.maps[it.key])
          || list.find((it) => main.maps[it.key]) || list[0];
        state.item = first ? first.key : null;
        state.panel = Math.min(state.panel, entry.panels.length - 1);
        fitControls();
        buildPrompts();
        build();
      }).catch((error) => {
        if (mine !== loading) return;
        stage.textContent = '';
        stage.append(el('p', {class: 'tclip-error', text: error.message}));
      });
    }

    function buildPrompts() {
      prompts.textContent = '';
      links.textContent = '';
      for (const link of entry.links || []) {
        links.append(el('a', {href: link.href, target: '_blank', rel: 'noopener',
                              download: link.href.startsWith('data:') ? 'result.json' : null, text: link.text}));
      }
      entry.prompts.forEach((p, i) => {
        const line = el('div', {class: 'tclip-prompt', dir: 'auto'});  // a right-to-left prompt reads so
        // Its own direction, so that the line's (dir auto) is the prompt's first letter's, not this label's.
        if (entry.prompts.length > 1) {
          line.append(el('span', {class: 'tclip-pnum', dir: 'ltr', text: `prompt ${i + 1}`}));
        }
        // Spans count code points (Python's str), JavaScript strings UTF-16 units: slice the code points.
        const chars = Array.from(p.prompt);
        const text = (start, end) => chars.slice(start, end).join('');
        // A prompt cut to fit the model's context (--truncate) is mapped up to p.cut; the rest is marked so.
        const mapped = p.cut === null || p.cut === undefined ? chars.length : p.cut;
        const partly = p.partly === null || p.partly === undefined ? mapped : p.partly;  // mapped by some texts
        const cutOff = mapped < chars.length
          ? el('span', {class: 'tclip-cut', title: 'cut off to fit the model\'s context (--truncate): not mapped'},
               el('s', {text: text(mapped)}), el('span', {class: 'tclip-cut-note', text: ' cut off: not mapped'}))
          : null;
        let at = 0;
        p.words.forEach((w, j) => {
          if (w.span[0] > at) line.append(text(at, w.span[0]));
          line.append(wordButton(`p${i}w${j}`, text(w.span[0], w.span[1]), `the word “${w.text}”`));
          at = w.span[1];
        });
        if (!p.words.length) {
          line.append(wordButton(`p${i}`, text(0, partly) || '…', 'the whole prompt'));
          if (partly < mapped) {
            line.append(el('span', {class: 'tclip-cut tclip-partly',
                                    title: 'cut off inside some of the method\'s template texts (--truncate): ' +
                                           'mapped by the others'},
                           el('u', {text: text(partly, mapped)}),
                           el('span', {class: 'tclip-cut-note', text: ' cut off in some templates'})));
          }
        }
        else if (at < mapped) line.append(text(at, mapped));
        if (cutOff) line.append(cutOff);
        if (p.words.length) {
          line.append(' ', wordButton(`p${i}`, 'whole prompt', `the whole prompt “${text(0, mapped)}”`,
                                      'tclip-phrase'));
        }
        prompts.append(line);
      });
    }

    function wordButton(key, text, title, extra) {
      return el('button', {type: 'button', class: `tclip-word ${extra || ''}`, 'data-key': key, title,
                           text,
                           onclick: () => select_(key),
                           onmouseenter: () => { state.preview = key; render(); },
                           onmouseleave: () => { state.preview = null; render(); }});
    }

    function select_(key) {
      state.item = key;
      state.preview = null;
      render();
    }

    // The stage: one big card (single view, with method tabs) or one card per method (compare view).
    let cards = [];

    function build() {
      if (!entry) return;
      stage.textContent = '';
      tabs.textContent = '';
      cards = [];
      stage.classList.toggle('tclip-compare', state.view === 'compare');
      if (state.view === 'single') {
        if (entry.panels.length > 1) {
          entry.panels.forEach((panel, i) => tabs.append(el('button', {
            type: 'button', role: 'tab', class: 'tclip-tab', 'aria-selected': String(i === state.panel),
            text: panel.label, onclick: () => { state.panel = i; build(); }})));
        }
        cards.push(card(state.panel, true));
      } else {
        entry.panels.forEach((_, i) => cards.push(card(i, false)));
      }
      cards.forEach((c) => stage.append(c.node));
      render();
    }

    function card(panelIndex, big) {
      const panel = entry.panels[panelIndex];
      const photo = el('img', {class: 'tclip-photo', alt: entry.title, src: entry.photo, draggable: 'false'});
      const canvas = el('canvas', {class: 'tclip-map'});
      canvas.style.opacity = state.opacity;
      const box = el('div', {class: 'tclip-box'});
      const viewer = el('div', {class: 'tclip-viewer'}, photo, canvas, box);
      // At most 75 % of the window's height: a tall image is narrowed, not stretched past the screen.
      viewer.style.maxWidth = `calc(75vh * ${entry.size_hw[1] / entry.size_hw[0]})`;
      const missing = el('div', {class: 'tclip-missing'});
      const field = (name) => el('td', {'data-field': name});
      const fields = {shows: el('p', {class: 'tclip-shows', 'data-field': 'shows'})};
      const rows = [['tau', 'τ (GMM split)'], ['fallback', 'GMM fallback'],
                    ['box', 'Box x1, y1, x2, y2'], ['range', 'Map range'], ['scale', 'Colour scale'],
                    ['pointer', 'Pointer x, y: value']];
      const table = el('table', {class: 'tclip-info'});
      for (const [name, label] of rows) {
        fields[name] = field(name);
        table.append(el('tr', {}, el('th', {text: label}), fields[name]));
      }
      const bar = colourBar();
      const title = el('h2', {class: 'tclip-label', text: panel.label});
      // A baseline takes the image in its own way (its input protocol), which may not be the run's of the header.
      const input = panel.run.input_protocol !== run.input_protocol
        ? el('p', {class: 'tclip-input', text: `input ${panel.run.input_protocol}`}) : null;
      const note = panel.note ? el('p', {class: 'tclip-note', text: panel.note}) : null;
      const side = el('div', {class: 'tclip-side'}, bar.node, table, note);
      const node = el('section', {class: big ? 'tclip-card tclip-big' : 'tclip-card', 'data-panel': panelIndex},
                      title, input, fields.shows,
                      el('div', {class: 'tclip-card-body'}, el('div', {class: 'tclip-view-col'}, viewer, missing),
                         side));
      const c = {node, panel, panelIndex, viewer, canvas, box, fields, bar, missing, current: null};
      const follow = (event) => { pointerAt = {x: event.clientX, y: event.clientY}; readout(c); };
      viewer.addEventListener('mousemove', follow);
      viewer.addEventListener('mouseleave', follow);  // where it went: off the image
      return c;
    }

    function colourBar() {
      const strip = el('canvas', {class: 'tclip-strip', width: 256, height: 1});
      const ctx = strip.getContext('2d');
      const image = ctx.createImageData(256, 1);
      for (let i = 0; i < 256; i++) {
        image.data.set([turbo[3 * i], turbo[3 * i + 1], turbo[3 * i + 2], 255], 4 * i);
      }
      ctx.putImageData(image, 0, 0);
      const tau = el('div', {class: 'tclip-tau'}, el('span', {text: 'τ'}));
      const ticks = el('div', {class: 'tclip-ticks'}, el('span', {'data-field': 'scale-low'}),
                       el('span', {'data-field': 'scale-mid'}), el('span', {'data-field': 'scale-high'}));
      const caption = el('div', {class: 'tclip-bar-caption'});
      const node = el('div', {class: 'tclip-bar'}, el('div', {class: 'tclip-strip-wrap'}, strip, tau), ticks, caption);
      return {node, tau, ticks, caption};
    }

    // The value under the pointer, from where the pointer is now: a scroll, a resize or a render under a still
    // pointer moves the image or changes its map without a mousemove, so those recompute it too. '—' where the
    // pointer is not over the image (or something lies on top of it there).
    function readout(c) {
      const cur = c.current;
      const at = pointerAt;
      const rect = c.viewer.getBoundingClientRect();
      const fx = at ? (at.x - rect.left) / rect.width : -1;
      const fy = at ? (at.y - rect.top) / rect.height : -1;
      const over = at && fx >= 0 && fy >= 0 && fx < 1 && fy < 1
        && c.viewer.contains(document.elementFromPoint(at.x, at.y));
      const say = (text, title) => {
        c.fields.pointer.textContent = text;
        c.fields.pointer.title = title || '';
      };
      if (!cur || !over) {
        say('—');
        return;
      }
      const [height, width] = entry.size_hw;
      const x = Math.floor(fx * width);
      const y = Math.floor(fy * height);
      // A pixel the crop cut off has the map's minimum as a fill, not a value the model gave it.
      const [x1, y1, x2, y2] = c.panel.covered;
      if (x < x1 || y < y1 || x >= x2 || y >= y2) {
        say(`${x}, ${y}: not seen (cut off by the crop)`);
        return;
      }
      const {w, h} = cur.decoded;
      const mx = Math.min(w - 1, Math.floor(fx * w));
      const my = Math.min(h - 1, Math.floor(fy * h));
      const q = cur.decoded.q[my * w + mx];
      const value = cur.range[0] + (q / 255) * (cur.range[1] - cur.range[0]);
      if (w === width && h === height) {  // a value per pixel
        say(`${x}, ${y}: ≈ ${fmt(value)}`);
        return;
      }
      // A map stored shrunk has a value per cell: the mean over the photo's pixels the cell covers, said as such.
      const across = cellPixels(mx, w, width);
      const down = cellPixels(my, h, height);
      const span = (p) => (p.first === p.last ? `${p.first}` : `${p.first}–${p.last}`);
      const mean = across.even && down.even ? 'mean' : 'weighted mean';
      const title = `The map is stored at ${w} × ${h} pixels: its value here is the mean over the photo's pixels `
        + 'its cell covers, a pixel the cell covers in part weighted by that part.';
      // A cell across the crop's edge mixes the map's values with the fill outside it: a number that is neither.
      if (across.first < x1 || down.first < y1 || across.last >= x2 || down.last >= y2) {
        say(`${span(across)}, ${span(down)}: part not seen (cut off by the crop); ${mean} with its fill ≈ `
            + `${fmt(value)}`, `${title} The crop cut off some of these pixels: the map holds its minimum there `
            + 'as a fill, not a value the model gave them, and this mean counts it.');
        return;
      }
      say(`${span(across)}, ${span(down)}: ${mean} ≈ ${fmt(value)}`, title);
    }

    function render() {
      if (!entry) return;
      const key = state.preview || state.item;
      root.dataset.item = state.item || '';
      root.querySelectorAll('.tclip-word').forEach((b) => {
        b.classList.toggle('tclip-on', b.dataset.key === state.item);
        b.setAttribute('aria-pressed', String(b.dataset.key === state.item));
      });
      const mine = ++token;
      Promise.all(cards.map((c) => renderCard(c, key, mine))).then(() => {
        if (mine === token) root.dataset.rendered = `${state.image}:${key}:${state.kind}:${state.scale}:${state.view}`;
      }).catch((error) => { console.error(error); });
    }

    async function renderCard(c, key, mine) {
      const panel = c.panel;
      const m = panel.maps[key];
      if (!m) {
        c.current = null;
        c.canvas.hidden = true;
        c.box.hidden = true;
        c.missing.textContent = panel.per_word || key.indexOf('w') < 0
          ? 'no map for this item' : `${panel.label} has no per-word map and its word-alone maps were not computed`;
        for (const f of Object.values(c.fields)) f.textContent = '—';
        c.bar.node.hidden = true;
        return;
      }
      const kind = state.kind === 'soft' && m.soft ? 'soft' : 'heatmap';
      const source = m[kind];
      const range = source.range;
      const scale = state.scale === 'shared' ? sharedScale(panel, kind) : range;
      const decoded = await decode(entry, source.blob);
      if (mine !== token) return;
      paint(c.canvas, decoded, range, scale, turbo);
      c.current = {decoded, range};
      c.canvas.hidden = false;
      c.canvas.dataset.map = `${c.panelIndex}:${key}:${kind}`;
      c.missing.textContent = state.kind === 'soft' && !m.soft ? 'no soft map for this method: its map is shown' : '';
      // The box, in the image's pixels (exclusive end); a whole-image box is drawn inset.
      const [height, width] = entry.size_hw;
      const [x1, y1, x2, y2] = m.box;
      c.box.hidden = false;
      c.box.classList.toggle('tclip-whole', !!m.whole_image);
      Object.assign(c.box.style, m.whole_image ? {left: '', top: '', width: '', height: ''} : {
        left: `${(100 * x1) / width}%`, top: `${(100 * y1) / height}%`,
        width: `${(100 * (x2 - x1)) / width}%`, height: `${(100 * (y2 - y1)) / height}%`});
      c.box.title = `box ${x1}, ${y1}, ${x2}, ${y2}`;
      // Numbers, as text.
      c.fields.shows.textContent = kind === 'soft' ? `soft map of ${m.shows}` : m.shows;
      c.fields.tau.textContent = m.tau === null ? '— (no GMM: not a TCLIP map)' : fmt(m.tau);
      c.fields.tau.dataset.value = m.tau === null ? '' : String(m.tau);
      c.fields.fallback.textContent = m.fallback === null ? (m.tau === null ? '—' : 'none') : m.fallback;
      c.fields.fallback.classList.toggle('tclip-warn', m.fallback !== null);
      c.fields.box.textContent = `${x1}, ${y1}, ${x2}, ${y2}${m.whole_image ? ' (whole image)' : ''}`;
      c.fields.box.dataset.value = JSON.stringify(m.box);
      c.fields.range.textContent = `${fmt(range[0])} … ${fmt(range[1])}`;
      c.fields.scale.textContent = `${fmt(scale[0])} … ${fmt(scale[1])} (${state.scale === 'shared'
        ? 'shared across this method\'s words' : 'this map\'s range'})`;
      readout(c);  // the new map's value under a pointer that stays where it was
      // The colour bar: the scale's ends and middle, and τ on it (the aggregated map's units).
      const bar = c.bar;
      bar.node.hidden = false;
      const [low, high] = scale;
      const spans = bar.ticks.querySelectorAll('span');
      spans[0].textContent = fmt(low);
      spans[1].textContent = fmt((low + high) / 2);
      spans[2].textContent = fmt(high);
      const showTau = m.tau !== null && kind === 'heatmap' && high > low;
      bar.tau.hidden = !showTau;
      if (showTau) {
        const at = Math.max(0, Math.min(1, (m.tau - low) / (high - low)));
        bar.tau.style.left = `${100 * at}%`;
        bar.tau.title = `τ = ${fmt(m.tau)}`;
      }
      bar.caption.textContent = `${kind === 'soft' ? 'soft map' : 'map'} values (${valueName(panel)})`;
    }

    function step(delta) {
      if (!entry) return;
      const list = items(entry);
      const at = list.findIndex((it) => it.key === state.item);
      const next = list[Math.max(0, Math.min(list.length - 1, at + delta))];
      if (next) {
        select_(next.key);
        const button = root.querySelector(`.tclip-word[data-key="${next.key}"]`);
        if (!button) return;
        if (options.keys !== 'document') button.focus({preventScroll: true});
        reveal(button);
      }
    }

    // Scrolls the prompt list (capped in height) to show a word, and nothing else: the page (a notebook's, or one
    // scrolled down to the map) stays where the reader put it, as scrollIntoView would not leave it.
    function reveal(button) {
      const list = prompts.getBoundingClientRect();
      const shown = button.getBoundingClientRect();
      if (shown.top < list.top) prompts.scrollTop -= list.top - shown.top;
      else if (shown.bottom > list.bottom) prompts.scrollTop += shown.bottom - list.bottom;
    }

    function onKey(event) {
      if (event.altKey || event.ctrlKey || event.metaKey) return;
      const target = event.target;
      // A control keeps its own arrow keys: the only way to change a radio or the image list without a mouse.
      if (target && ['INPUT', 'SELECT', 'TEXTAREA'].includes(target.tagName)) return;
      if (event.key === 'ArrowRight' || event.key === 'ArrowLeft') {
        step(event.key === 'ArrowRight' ? 1 : -1);
        event.preventDefault();
      } else if ((event.key === 'ArrowDown' || event.key === 'ArrowUp') && page.images.length > 1
                 && options.keys === 'document') {
        showImage(state.image + (event.key === 'ArrowDown' ? 1 : -1));
        event.preventDefault();
      }
    }
    (options.keys === 'document' ? document : root).addEventListener('keydown', onKey);

    // The window's events that move the image under a still pointer (any scroll: the page's, or a notebook's
    // output area; a resize) or tell where the pointer is. They outlive this explorer where its output is removed
    // from a notebook's page: once it was attached and is no longer, they are taken off.
    let attached = false;
    function alive() {
      if (root.isConnected) return (attached = true);
      if (attached) windowEvents.forEach(([type, f]) => window.removeEventListener(type, f, true));
      return false;
    }
    function readouts() {
      if (alive()) cards.forEach(readout);
    }
    const windowEvents = [
      ['mousemove', (event) => { if (alive()) pointerAt = {x: event.clientX, y: event.clientY}; }],
      ['mouseout', (event) => { if (!event.relatedTarget) { pointerAt = null; readouts(); } }],  // off the window
      ['scroll', readouts],
      ['resize', readouts]];
    windowEvents.forEach(([type, f]) => window.addEventListener(type, f, {capture: true, passive: true}));

    showImage(0);
    return {state, step, showImage};
  }

  window.TCLIPExplorer = {mount, register, registry, waiting, fmt, version: 1};
})();
