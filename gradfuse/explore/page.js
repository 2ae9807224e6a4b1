// gradfuse explore: draws the precomputed layouts of the payload as SVG and links everything.
// No library, no network: the payload holds the graphs, the layouts and the reports.
"use strict";
const D = JSON.parse(document.getElementById("payload").textContent);
const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const mb = (b) => b >= 1e6 ? (b / 1e6).toFixed(2) + " MB" : b >= 1e3 ? (b / 1e3).toFixed(1) + " kB" : b + " B";
const views = {};
for (const v of D.views) {
  v.byValue = new Map();
  v.users = new Map();
  v.nodes.forEach((n, i) => {
    v.byValue.set(n.v, i);
    for (const o of n.outs || []) v.byValue.set(o, i);
  });
  v.nodes.forEach((n, i) => {
    for (const x of n.i || []) {
      const p = v.byValue.get(x);
      if (p === undefined) continue;
      if (!v.users.has(p)) v.users.set(p, []);
      v.users.get(p).push(i);
    }
  });
  views[v.key] = v;
}
const savedSet = new Set(D.saved.map((s) => s.v));
const S = {view: D.views[0].key, group: "", open: [], selected: null, itemEls: new Map(), box: null};

// ---------- drawing ----------
function itemKey(view, i) {
  // the key of the drawn item that shows node i in the current layout: the node, or the
  // collapsed box of its ancestor just off the expanded path
  const g = view.nodes[i].g;
  if (S.open.includes(g)) return "n" + i;  // in a kernel drawn over its box
  const path = view.groups[S.group].chain;
  const chain = g ? view.groups[g].chain : [];
  let m = 0;
  while (m < path.length && m < chain.length && chain[m] === path[m]) m++;
  return m === chain.length ? "n" + i : "g" + chain[m];
}

function show(viewKey, group) {
  const view = views[viewKey];
  group = group in view.groups ? group : "";
  let L = view.layouts[group];
  if (L.inset !== undefined) {  // a kernel: its ops over its box, with the kernels already open over that layout
    const same = viewKey === S.view && S.open.length && view.layouts[S.open[0]].inset === L.inset;
    S.open = (same ? S.open.filter((k) => k !== group) : []).concat([group]);
    L = view.layouts[L.inset];
  } else S.open = [];
  S.view = viewKey;
  S.group = group;
  const svg = $("canvas");
  const parts = [];
  drawLayout(view, L, parts, 0, 0, "");
  S.shown = L.items.length;
  S.open.forEach((k, j) => {
    const inset = view.layouts[k], box = L.items.find(([kind, ref]) => kind === "g" && ref === k);
    const ox = box[2] - inset.w / 2, oy = box[3] + box[5] / 2 + 16;
    parts.push(`<rect class="inset" data-g="${esc(k)}" x="${ox - 12}" y="${oy - 12}" width="${inset.w + 24}" height="${inset.h + 24}" rx="8"/>`);
    drawLayout(view, inset, parts, ox, oy, "i" + j + "-");
    S.shown += inset.items.length;
  });
  svg.innerHTML = `<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto">` +
    `<path d="M0,0L8,4L0,8z" fill="#98a2ad"/></marker></defs><g id="scene">${parts.join("")}</g>`;
  S.itemEls = new Map();
  for (const el of svg.querySelectorAll("g.item")) {
    S.itemEls.set(el.dataset.v !== undefined ? "n" + view.byValue.get(el.dataset.v) : "g" + el.dataset.g, el);
  }
  S.layout = L;
  fit(false);
  if (S.open.length) centerOn(S.itemEls.get("g" + S.group));
  crumbs();
  for (const b of $("views").children) b.classList.toggle("on", b.dataset.key === viewKey);
}

function drawLayout(view, L, parts, ox, oy, tag) {
  for (const [a, b, pts] of L.edges) {
    let d = "M" + pts[0] + "," + pts[1];
    for (let k = 2; k < pts.length; k += 2) d += "L" + pts[k] + "," + pts[k + 1];
    const back = pts[pts.length - 1] < pts[1] ? " back" : "";
    parts.push(`<path class="edge${back}" data-a="${tag}${a}" data-b="${tag}${b}" d="${d}" transform="translate(${ox},${oy})" marker-end="url(#arrow)"/>`);
  }
  L.items.forEach(([kind, ref, x, y, w, h], k) => {
    let cls, label, sub, attr;
    if (kind === "n") {
      const n = view.nodes[ref];
      const arg = ["input", "param", "state"].includes(n.o);
      cls = "item node " + (arg ? "arg" : n.st);
      label = n.o; sub = "%" + n.v; attr = `data-v="${esc(n.v)}"`;
    } else {
      const g = view.groups[ref];
      cls = "item group" + (ref.startsWith("k:") ? " kernel" : "");
      label = g.label; sub = g.sub || ""; attr = `data-g="${esc(ref)}"`;
    }
    const fit = (s) => s.length > 34 ? s.slice(0, 33) + "…" : s;
    parts.push(`<g class="${cls}" data-k="${tag}${k}" ${attr} transform="translate(${ox + x - w / 2},${oy + y - h / 2})">` +
      `<rect width="${w}" height="${h}" rx="${kind === "n" ? 4 : 7}"/>` +
      `<text x="8" y="${h / 2 - 2}">${esc(fit(label))}</text><text class="sub" x="8" y="${h / 2 + 10}">${esc(fit(sub))}</text>` +
      `<title>${esc(kind === "n" ? view.nodes[ref].ir : label + " — " + sub)}</title></g>`);
  });
}

function crumbs() {
  const view = views[S.view];
  const chain = view.groups[S.group].chain;
  let h = `<a data-open="">${esc(view.groups[""].label)}</a>`;
  for (const g of chain) h += ` › <a data-open="${esc(g)}">${esc(view.groups[g].label)}</a>`;
  $("crumbs").innerHTML = h + ` <span class="muted">(${view.title}; ${S.shown} shown)</span>`;
  for (const a of $("crumbs").querySelectorAll("a")) a.onclick = () => { show(S.view, a.dataset.open); reselect(); };
}

function setBox(x, y, w, h) {
  S.box = [x, y, w, h];
  $("canvas").setAttribute("viewBox", `${x} ${y} ${w} ${h}`);
}
function fit(all) {
  // the whole layout, unless that makes its text too small to read (all: the whole layout anyway):
  // then the top of it at a readable scale, to pan and zoom from
  const L = S.layout, r = $("canvas").getBoundingClientRect();
  const pad = 30, w = Math.max(L.w + 2 * pad, 200), h = Math.max(L.h + 2 * pad, 150);
  const pw = r.width || 800, ph = r.height || 500, aspect = pw / ph;
  let bw = w, bh = h;
  if (bw / bh < aspect) bw = bh * aspect; else bh = bw / aspect;
  const minW = pw * 0.9;  // never magnify past ~1:1 on small graphs
  if (bw < minW) { bh *= minW / bw; bw = minW; }
  const maxW = pw / 0.55;
  if (!all && bw > maxW) {
    bh *= maxW / bw; bw = maxW;
    setBox(L.w / 2 - bw / 2, -pad, bw, bh);
    return;
  }
  setBox(L.w / 2 - bw / 2, L.h / 2 - bh / 2, bw, bh);
}
function centre(el) {
  const t = el.transform.baseVal.consolidate().matrix, r = el.querySelector("rect");
  return [t.e + r.width.baseVal.value / 2, t.f + r.height.baseVal.value / 2];
}
function centerOn(el, other) {
  // bring el (and other, the node it links to, where both fit) into sight at a readable scale
  let [cx, cy] = centre(el);
  const [x, y, w, h] = S.box, px = $("canvas").getBoundingClientRect().width || 800;
  const nw = Math.min(w, 1.2 * px), nh = h * nw / w;
  if (other) {
    const [ox, oy] = centre(other);
    if (Math.abs(ox - cx) < nw * 0.8 && Math.abs(oy - cy) < nh * 0.8) { cx = (cx + ox) / 2; cy = (cy + oy) / 2; }
  }
  if (other || cx < x || cx > x + w || cy < y || cy > y + h || w > 1.6 * px) {  // out of sight, or too small to read
    setBox(cx - nw / 2, cy - nh / 2, nw, nh);
  }
}

// pan and zoom
(function () {
  const svg = $("canvas");
  let drag = null;
  svg.addEventListener("mousedown", (e) => { drag = {x: e.clientX, y: e.clientY, box: S.box.slice(), moved: false}; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const r = svg.getBoundingClientRect(), s = drag.box[2] / r.width;
    const dx = (e.clientX - drag.x) * s, dy = (e.clientY - drag.y) * s;
    if (Math.abs(dx) + Math.abs(dy) > 2 * s) drag.moved = true;
    setBox(drag.box[0] - dx, drag.box[1] - dy, drag.box[2], drag.box[3]);
  });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = svg.getBoundingClientRect(), [x, y, w, h] = S.box;
    const f = e.deltaY > 0 ? 1.15 : 1 / 1.15;
    const px = x + (e.clientX - r.left) / r.width * w, py = y + (e.clientY - r.top) / r.height * h;
    setBox(px - (px - x) * f, py - (py - y) * f, w * f, h * f);
  }, {passive: false});
  svg.addEventListener("click", (e) => {
    if (drag && drag.moved) return;
    const el = e.target.closest("g.item");
    if (!el) return;
    if (el.dataset.g !== undefined && S.open.includes(el.dataset.g) && S.open.length > 1) {  // close that kernel
      S.open = S.open.filter((k) => k !== el.dataset.g);
      openGroup(S.open.pop());
    } else if (el.dataset.g !== undefined) openGroup(el.dataset.g);
    else selectNode(S.view, views[S.view].byValue.get(el.dataset.v));
  });
  $("fit").onclick = (e) => { e.preventDefault(); fit(true); };
})();

// ---------- selection and links ----------
function clearMarks() {
  for (const el of $("canvas").querySelectorAll(".sel,.fwd,.rel,.hit")) el.classList.remove("sel", "fwd", "rel", "hit");
}
function mark(view, i, cls) {
  if (i === undefined || i === null) return null;
  const el = S.itemEls.get(itemKey(view, i));
  if (el) el.classList.add(cls);
  return el;
}
function vlink(name, viewKey) {
  return `<a class="v" data-view="${viewKey || S.view}" data-value="${esc(name)}">%${esc(name)}</a>`;
}
function wireLinks(root) {
  for (const a of root.querySelectorAll("a.v[data-value]")) a.onclick = () => goValue(a.dataset.value, a.dataset.view);
  for (const a of root.querySelectorAll("a.v[data-kernel]")) a.onclick = () => openGroup("k:" + a.dataset.kernel, "kernels");
  for (const a of root.querySelectorAll("a.v[data-group]")) a.onclick = () => openGroup(a.dataset.group, a.dataset.view);
}

function selectNode(viewKey, i) {
  if (i === undefined) return;
  const view = views[viewKey];
  if (S.view !== viewKey) show(viewKey, view.nodes[i].g);
  S.selected = {view: viewKey, node: i};
  clearMarks();
  const el = mark(view, i, "sel");
  const n = view.nodes[i];
  for (const x of n.i || []) mark(view, view.byValue.get(x), "rel");
  for (const u of view.users.get(i) || []) mark(view, u, "rel");
  const fwd = n.f !== undefined ? view.byValue.get(n.f) : undefined;
  const fel = fwd !== undefined ? mark(view, fwd, "fwd") : null;
  if (el) centerOn(el, fel);
  details(view, i, fwd);
  const hash = "#" + (viewKey === firstView(n.v) ? "" : viewKey + "/") + "%" + n.v;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}
function reselect() {
  const s = S.selected;
  if (s && s.view === S.view && s.node !== undefined) {
    clearMarks();
    const view = views[s.view];
    mark(view, s.node, "sel");
    const f = view.nodes[s.node].f;
    if (f !== undefined) mark(view, view.byValue.get(f), "fwd");
  }
}

function details(view, i, fwd) {
  const n = view.nodes[i];
  let h = `<h2>%${esc(n.v)}: ${esc(n.t)}</h2><pre>${esc(n.ir)}</pre><table class="kv">`;
  h += `<tr><td>op</td><td><code>${esc(n.o)}</code> · ${esc(n.st)}</td></tr>`;
  const layer = n.sc ? "s:" + n.sc : n.g.startsWith("s:") ? n.g : null;  // an update: its parameter's layer
  if (layer) h += `<tr><td>layer</td><td><a class="v" data-view="${view.key}" data-group="${esc(layer)}">@${esc(layer.slice(2))}</a></td></tr>`;
  if (n.k) h += `<tr><td>kernel</td><td><a class="v" data-kernel="${esc(n.k)}">${esc(n.k)}</a></td></tr>`;
  h += `<tr><td>size</td><td>${mb(n.b)} at N=${D.batch}</td></tr></table>`;
  if (n.note) {
    const rule = n.note.indexOf(": ") >= 0 ? n.note.slice(n.note.indexOf(": ") + 2) : n.note;
    const head = n.note.indexOf(": ") >= 0 ? n.note.slice(0, n.note.indexOf(": ")) : "";
    h += `<h3>rule</h3><div class="rule"><code>${esc(head)}</code><br>${esc(rule)}</div>`;
  }
  if (fwd !== undefined) {
    const f = view.nodes[fwd];
    const what = n.st === "update" ? "updates" : (n.note || "").startsWith("accumulate") ? "sums the gradient parts of" : "differentiates";
    h += `<h3>${what}</h3>${vlink(f.v, view.key)} = <code>${esc(f.o)}</code>` +
      (f.loc ? ` <span class="muted">${esc(f.loc)}</span>` : "");
  }
  if (n.loc) {
    const [file, line] = [n.loc.slice(0, n.loc.lastIndexOf(":")), n.loc.slice(n.loc.lastIndexOf(":") + 1)];
    const text = (D.sources[file] || {})[line];
    h += `<h3>model source</h3><div class="srcline">${esc(n.loc)}${text ? "<br>" + esc(text) : ""}</div>`;
  }
  if (n.st === "forward") {
    const b = views.backward;
    if (b) {
      const g = b.byValue.get("grad." + n.v);
      h += `<h3>gradient</h3>` + (g !== undefined ? vlink("grad." + n.v, "backward") + ` <span class="muted">${esc(b.nodes[g].t)}</span>`
        : `<span class="muted">none (no gradient flows through it)</span>`);
      h += `<h3>saved for the backward</h3>` + (savedSet.has(n.v) ? `yes: ${mb(n.b)} at N=${D.batch} kept from the forward`
        : `<span class="muted">no</span>`);
    }
  }
  if ((n.i || []).length) h += `<h3>operands</h3>` + n.i.map((x) => vlink(x, view.key)).join(", ");
  const us = view.users.get(i) || [];
  if (us.length) h += `<h3>used by</h3>` + us.map((u) => vlink(view.nodes[u].v, view.key)).join(", ");
  const others = D.views.filter((v) => v.key !== view.key && v.byValue.has(n.v));
  if (others.length) h += `<h3>in other views</h3>` + others.map((v) => vlink(n.v, v.key) + ` <span class="muted">(${v.key})</span>`).join(" · ");
  $("details").innerHTML = h;
  wireLinks($("details"));
}

function openGroup(gid, viewKey) {
  viewKey = viewKey || S.view;
  const view = views[viewKey];
  if (!(gid in view.groups)) return;
  show(viewKey, gid);
  S.selected = {view: viewKey, group: gid};
  if (gid.startsWith("k:")) kernelDetails(gid.slice(2));
  else groupDetails(view, gid);
  if (location.hash !== "#" + viewKey + "/" + gid) history.replaceState(null, "", "#" + viewKey + "/" + gid);
}

function groupDetails(view, gid) {
  const g = view.groups[gid];
  const inside = view.nodes.map((n, i) => i).filter((i) => {
    const c = view.nodes[i].g ? view.groups[view.nodes[i].g].chain : [];
    return !view.nodes[i].h && (gid === "" || c.includes(gid));
  });
  const stages = {};
  for (const i of inside) stages[view.nodes[i].st] = (stages[view.nodes[i].st] || 0) + 1;
  let h = `<h2>${esc(g.label)}</h2><p>${inside.length} nodes: ` +
    Object.entries(stages).map(([k, v]) => `${v} ${k}`).join(", ") + `</p>`;
  const kernels = [...new Set(inside.map((i) => view.nodes[i].k).filter((k) => k))];
  if (kernels.length) h += `<h3>kernels</h3>` + kernels.map((k) => `<a class="v" data-kernel="${k}">${k}</a>`).join(" ");
  h += `<h3>nodes</h3>` + inside.slice(0, 400).map((i) => vlink(view.nodes[i].v, view.key) + ` <code>${esc(view.nodes[i].o)}</code>`).join("<br>");
  $("details").innerHTML = h;
  wireLinks($("details"));
}

function markStep(k, name) {
  // the kernel's step in the memory timeline, when that chart is shown
  const line = $("memstep");
  if (!line || k.step === null || k.step === undefined) return;
  const M = D.memory, sx = (1100 - 70 - 20) / Math.max(M.steps.length, 1), x = 70 + (k.step + 0.5) * sx;
  line.setAttribute("x1", x); line.setAttribute("x2", x); line.setAttribute("visibility", "visible");
  const label = $("memsteplabel");
  label.setAttribute("x", x + 4); label.textContent = `${name}: step ${k.step}`;
}

function kernelDetails(name) {
  const k = D.kernels[name];
  if (!k) return;
  markStep(k, name);
  const hue = (j) => `hsl(${(j * 67) % 360},70%,55%)`;
  let h = `<h2>kernel ${esc(name)} <span class="muted">[${esc(k.kind)}]</span></h2>`;
  h += `<p>reads ${mb(k.br)}, writes ${mb(k.bw)} at N=${D.batch}; step ${k.step} of ${D.memory.steps.length} in the memory plan</p>`;
  h += `<h3>ops</h3><div class="ops">` + k.ops.map((v, j) =>
    `<span style="border-left:5px solid ${hue(j)}" data-op="${j}" data-value="${esc(v)}">%${esc(v)}</span>`).join("") + `</div>`;
  h += `<h3>memory plan: what it writes</h3><table class="kv">` + k.writes.map((w) =>
    `<tr><td>${vlink(w.v, "kernels")}</td><td>${esc(w.kind)}${w.of && w.of !== w.v ? " of %" + esc(w.of) : ""}, ${mb(w.b)}` +
    (w.off !== null ? `, offset ${w.off.toLocaleString()}` : "") + `, live steps ${w.first}..${w.last}</td></tr>`).join("") + `</table>`;
  if (k.rejected.length) {
    h += `<h3>not fused (${k.rejected.length})</h3>` + k.rejected.map((r) =>
      `<div>${vlink(r.p, "kernels")} (${esc(r.po)}) → ${vlink(r.c, "kernels")} (${esc(r.co)}): ${esc(r.why)}</div>`).join("");
  } else h += `<h3>not fused</h3><span class="muted">every producer→consumer pair of its ops is fused</span>`;
  h += `<h3>generated source</h3>` + (k.fn && k.fn !== name ? `<p class="muted">the function <code>${esc(k.fn)}</code> of the module (codegen numbers kernels in schedule order)</p>` : "") +
    `<div class="src" id="ksrc">` + k.src.map((line, j) => {
    const m = k.marks[j];
    return `<div data-op="${m}" style="border-left-color:${m >= 0 ? hue(m) : "transparent"}">${esc(line) || " "}</div>`;
  }).join("") + `</div>`;
  $("details").innerHTML = h;
  wireLinks($("details"));
  for (const sp of $("details").querySelectorAll(".ops span")) {
    sp.onmouseenter = () => { for (const d of $("ksrc").children) d.classList.toggle("hot", d.dataset.op === sp.dataset.op); };
    sp.onclick = () => {
      const view = views.kernels, i = view.byValue.get(sp.dataset.value);
      clearMarks(); mark(view, i, "sel");
      for (const d of $("ksrc").children) d.classList.toggle("hot", d.dataset.op === sp.dataset.op);
    };
  }
}

function firstView(name) {
  for (const v of D.views) if (v.byValue.has(name)) return v.key;
  return null;
}
function goValue(name, viewKey) {
  viewKey = viewKey && views[viewKey] && views[viewKey].byValue.has(name) ? viewKey : firstView(name);
  if (!viewKey) return false;
  const view = views[viewKey], i = view.byValue.get(name);
  show(viewKey, view.nodes[i].h ? S.group : view.nodes[i].g);
  selectNode(viewKey, i);
  return true;
}
function fromHash() {
  let h = location.hash.slice(1);
  try { h = decodeURIComponent(h); } catch (e) { /* a literal %, as in #%grad.fc1 */ }
  if (!h) return false;
  let viewKey = null;
  const slash = h.indexOf("/");
  if (slash > 0 && views[h.slice(0, slash)]) { viewKey = h.slice(0, slash); h = h.slice(slash + 1); }
  if (h.startsWith("%")) return goValue(h.slice(1), viewKey);
  const v = views[viewKey || S.view];
  if (h in v.groups) { openGroup(h, v.key); return true; }
  if (views[h]) { show(h, ""); return true; }
  return goValue(h, viewKey);
}

// ---------- search ----------
$("search").addEventListener("input", () => {
  const q = $("search").value.trim().toLowerCase().replace(/^%/, "");
  const box = $("results");
  if (!q) { box.hidden = true; return; }
  const hits = [];
  for (const v of D.views) {
    v.nodes.forEach((n, i) => {
      if (hits.length >= 60) return;
      const text = n.loc ? ((D.sources[n.loc.slice(0, n.loc.lastIndexOf(":"))] || {})[n.loc.slice(n.loc.lastIndexOf(":") + 1)] || "") : "";
      if (n.v.toLowerCase().includes(q) || n.o.toLowerCase() === q || (n.loc && n.loc.toLowerCase().includes(q)) ||
          text.toLowerCase().includes(q)) hits.push([v.key, i, text]);
    });
  }
  box.innerHTML = hits.map(([k, i, text]) => {
    const n = views[k].nodes[i];
    return `<div data-view="${k}" data-i="${i}">[${k}] %${esc(n.v)} = ${esc(n.o)} <span class="muted">${esc(n.loc || "")} ${esc(text)}</span></div>`;
  }).join("") || `<div class="muted">nothing matches</div>`;
  box.hidden = false;
  for (const d of box.querySelectorAll("div[data-view]")) d.onclick = () => {
    box.hidden = true;
    goValue(views[d.dataset.view].nodes[+d.dataset.i].v, d.dataset.view);
  };
});
$("search").addEventListener("keydown", (e) => {
  if (e.key === "Enter") { const d = $("results").querySelector("div[data-view]"); if (d) d.click(); }
  if (e.key === "Escape") $("results").hidden = true;
});

// ---------- charts ----------
function bars(rows, opts) {
  // rows: [label, value, tooltip, onclick-data, color]
  const W = 900, rowH = 16, left = opts.left || 260, max = Math.max(...rows.map((r) => r[1]), 1e-30);
  let s = `<svg width="${W}" height="${rows.length * rowH + 30}" xmlns="${SVGNS}">`;
  rows.forEach(([label, value, tip, data, color], k) => {
    const w = opts.log ? Math.max(2, (Math.log10(value) - opts.lo) / (opts.hi - opts.lo) * (W - left - 120)) : value / max * (W - left - 120);
    s += `<g class="bar" ${data} style="cursor:pointer"><text x="${left - 6}" y="${k * rowH + 12}" text-anchor="end">${esc(label)}</text>` +
      `<rect x="${left}" y="${k * rowH + 2}" width="${Math.max(w, 1)}" height="${rowH - 4}" fill="${color || "#5b8fd0"}"/>` +
      `<text x="${left + Math.max(w, 1) + 4}" y="${k * rowH + 12}">${esc(tip)}</text></g>`;
  });
  return s + `</svg>`;
}

function memoryChart() {
  const M = D.memory, n = M.steps.length, W = 1100, H = 300, left = 70, top = 20;
  const ymax = Math.max(M.peak, ...M.live, 1);
  const sx = (W - left - 20) / Math.max(n, 1), sy = (H - top - 30) / ymax;
  let s = `<p>${M.buffers.length} buffers in a ${mb(M.peak)} arena at N=${D.batch} (${esc(M.schedule)}); ` +
    `max-live lower bound ${mb(M.bound)}; without reuse ${mb(M.no_reuse)}. x: schedule step, y: arena offset. Click a buffer.</p>`;
  s += `<svg width="${W}" height="${H}" xmlns="${SVGNS}" id="memsvg">`;
  s += `<line x1="${left}" x2="${W - 20}" y1="${top + (ymax - M.peak) * sy}" y2="${top + (ymax - M.peak) * sy}" stroke="#c00" stroke-dasharray="5 3"/>` +
    `<text x="${left + 4}" y="${top + (ymax - M.peak) * sy - 4}" fill="#c00">arena peak ${mb(M.peak)}</text>`;
  M.buffers.forEach((b, k) => {
    const x = left + Math.max(b.f, 0) * sx, w = Math.max((b.l - Math.max(b.f, 0) + 1) * sx, 1.5);
    const y = top + (ymax - b.o - b.b) * sy, h = Math.max(b.b * sy, 1);
    s += `<rect class="buf" data-value="${esc(b.v)}" x="${x}" y="${y}" width="${w}" height="${h}" fill="hsl(${(k * 47) % 360},55%,65%)" stroke="#334" stroke-width=".3">` +
      `<title>%${esc(b.v)} ${esc(b.t)} ${mb(b.b)} @${b.o.toLocaleString()}, live ${b.f}..${b.l}${b.vals.length > 1 ? "; shared by " + b.vals.map((v) => "%" + v).join(", ") : ""}</title></rect>`;
  });
  let d = "";
  M.live.forEach((v, k) => { d += (k ? "L" : "M") + (left + (k + 0.5) * sx) + "," + (top + (ymax - v) * sy); });
  s += `<path d="${d}" fill="none" stroke="#111" stroke-width="1.3"/>`;
  const px = left + (M.peak_step + 0.5) * sx, py = top + (ymax - M.live[M.peak_step]) * sy;
  s += `<circle cx="${px}" cy="${py}" r="4" fill="#c00"/><text x="${px + 6}" y="${py + 12}">peak live ${mb(M.live[M.peak_step] || 0)} at step ${M.peak_step} (${esc(M.steps[M.peak_step] || "")})</text>`;
  s += `<line id="memstep" x1="0" x2="0" y1="${top}" y2="${H - 30}" stroke="#6c4a93" stroke-width="2" visibility="hidden"/>` +
    `<text id="memsteplabel" y="${top + 12}" fill="#6c4a93"></text>`;
  s += `<text x="${left}" y="${H - 8}">step 0</text><text x="${W - 20}" y="${H - 8}" text-anchor="end">step ${n - 1}</text>`;
  s += `<text x="4" y="${top + 10}">${mb(ymax)}</text><text x="4" y="${H - 30}">0</text></svg>`;
  s += `<details><summary>memory plan as text</summary><pre>${esc(M.text)}</pre></details>`;
  return s;
}

const CHARTS = {
  "memory plan": memoryChart,
  "saved for backward": () => {
    if (!D.saved.length) return `<p class="muted">no backward: the model has no loss</p>`;
    const rows = D.saved.slice().sort((a, b) => b.b - a.b);
    const total = rows.reduce((a, r) => a + r.b, 0);
    return `<p>${rows.length} forward values the backward reads: ${mb(total)} at N=${D.batch}. Click a bar.</p>` +
      bars(rows.map((r) => ["%" + r.v, r.b, `${mb(r.b)}  ${r.t}`, `data-value="${esc(r.v)}" data-view="backward"`]), {});
  },
  "gradient health": () => {
    if (!D.health) return `<p class="muted">made without --gradcheck: run <code>gradfuse explore MODEL --gradcheck</code></p>`;
    const vals = D.health.map((r) => Math.max(r.norm, 1e-30));
    const lo = Math.floor(Math.log10(Math.min(...vals))) - 1, hi = Math.ceil(Math.log10(Math.max(...vals)));
    const checks = (D.gradcheck || []).map((r) => `<tr><td>${vlink(r.name, "backward")}</td><td>[${r.shape.join(",")}]</td>` +
      `<td>${r.err === null ? "-" : r.err.toExponential(2)}</td><td>${r.noise === null ? "-" : r.noise.toExponential(1)}</td>` +
      `<td>${esc(r.verdict)}</td></tr>`).join("");
    return `<p>‖∂L/∂(layer output)‖ over a batch of 64, forward order (log scale); flagged: red.</p>` +
      bars(D.health.map((r) => ["%" + r.layer, Math.max(r.norm, 1e-30), `${r.norm.toExponential(2)} ${r.flag}`,
        `data-value="${esc(r.layer)}" data-view="forward"`, r.flag ? "#d04040" : "#5b8fd0"]), {log: true, lo, hi}) +
      (checks ? `<p>each parameter's gradient (backward graph, float64) against finite differences, as <code>gradfuse gradcheck</code>:</p>` +
        `<table class="kv mono"><tr><td>parameter</td><td>shape</td><td>rel. error</td><td>FD noise</td><td>verdict</td></tr>${checks}</table>` : "");
  },
  "kernel times": () => {
    if (!D.profile) return `<p class="muted">made without --profile: run <code>gradfuse explore MODEL --profile</code></p>`;
    const rows = Object.entries(D.profile.ms).sort((a, b) => b[1] - a[1]);
    const total = rows.reduce((a, r) => a + r[1], 0);
    return `<p>median of ${D.profile.steps} timed steps at N=${D.batch}, kernel by kernel: ${total.toFixed(3)} ms in all. Click a bar.</p>` +
      bars(rows.map(([k, ms]) => [`${k} [${D.kernels[k] ? D.kernels[k].kind : ""}]`, ms, `${ms.toFixed(4)} ms  ${D.kernels[k] ? D.kernels[k].ops.slice(0, 4).map((v) => "%" + v).join(" ") : ""}`,
        `data-kernel="${esc(k)}"`]), {left: 160});
  },
  "fusion report": () => `<p>${D.fusion.before} kernels before fusion → ${D.fusion.after}; memory traffic ${mb(D.fusion.bytes_before)} → ${mb(D.fusion.bytes_after)} ` +
    `(${D.fusion.pairs} producer→consumer pairs fused)</p><pre>${esc(D.fusion.text)}</pre>`,
  "generated module": () => `<pre>${esc(D.module)}</pre>`,
};
function chart(name) {
  $("chart").innerHTML = CHARTS[name]();
  for (const b of $("chart-tabs").children) b.classList.toggle("on", b.textContent === name);
  for (const el of $("chart").querySelectorAll("[data-value]")) el.onclick = () => goValue(el.dataset.value, el.dataset.view || "kernels");
  for (const el of $("chart").querySelectorAll("[data-kernel]")) el.onclick = () => openGroup("k:" + el.dataset.kernel, "kernels");
  const sel = S.selected;
  if (sel && sel.group && sel.group.startsWith("k:") && D.kernels[sel.group.slice(2)]) markStep(D.kernels[sel.group.slice(2)], sel.group.slice(2));
}

// ---------- start ----------
$("views").innerHTML = D.views.map((v) => `<button data-key="${v.key}" title="${esc(v.title)}">${esc(v.key)}</button>`).join("");
for (const b of $("views").children) b.onclick = () => { show(b.dataset.key, ""); history.replaceState(null, "", "#" + b.dataset.key); };
$("chart-tabs").innerHTML = Object.keys(CHARTS).map((k) => `<button>${esc(k)}</button>`).join("");
for (const b of $("chart-tabs").children) b.onclick = () => chart(b.textContent);
$("meta").textContent = `${D.origin} · N=${D.batch}` + (D.command ? ` · ${D.command}` : "");
window.addEventListener("hashchange", fromHash);
window.addEventListener("resize", () => fit(false));
show(D.views[0].key, "");
if (!fromHash()) show(D.views.find((v) => v.key === "backward") ? "backward" : D.views[0].key, "");
chart("memory plan");
window.gradfuseExplore = {payload: D, show, selectNode, goValue, openGroup, state: S};
