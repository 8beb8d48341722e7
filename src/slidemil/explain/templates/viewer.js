// slidemil viewer: Deep Zoom tiles of a slide on one canvas, the heatmap overlay and the top tiles.
// Data come from slides.js (window.SLIDEMIL_VIEWER, written by `slidemil view`). The URL hash picks the
// view: #slide=<id>&top=<k>&alpha=<0..1>. #status (hidden) holds the drawn state as JSON for tests.
"use strict";
(function () {
  const data = window.SLIDEMIL_VIEWER;
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const el = (id) => document.getElementById(id);
  const cache = new Map();
  let slide = null, overlay = null, scale = 1, ox = 0, oy = 0, alpha = data.alpha, show = true;

  function hashParams() {
    const out = {};
    for (const part of location.hash.slice(1).split("&")) {
      const [k, v] = part.split("=");
      if (k) out[k] = decodeURIComponent(v || "");
    }
    return out;
  }

  function image(url) {
    let img = cache.get(url);
    if (!img) {
      img = new Image();
      img.onload = () => { img.ready = true; draw(); };
      img.onerror = () => { img.failed = true; draw(); };
      img.src = url;
      cache.set(url, img);
    }
    return img;
  }

  const topLevel = () => slide.levels - 1;
  // the finest level needed when one full-resolution pixel is `s` screen pixels
  const levelFor = (s) => Math.max(0, Math.min(topLevel(), topLevel() - Math.floor(Math.log2(1 / s))));
  // the level whose whole image fits in one tile: drawn first, under everything, while tiles load
  const coarseLevel = () => Math.max(0, topLevel() - Math.ceil(Math.log2(Math.max(slide.width, slide.height) / slide.tile)));

  function drawLevel(lv, counts) {
    const f = Math.pow(2, topLevel() - lv), t = slide.tile, ov = slide.overlap;
    const lw = Math.ceil(slide.width / f), lh = Math.ceil(slide.height / f);
    const s = scale * f;                                  // screen pixels per pixel of this level
    const c0 = Math.max(0, Math.floor(-ox / s / t)), c1 = Math.min(Math.ceil(lw / t) - 1, Math.floor((canvas.width - ox) / s / t));
    const r0 = Math.max(0, Math.floor(-oy / s / t)), r1 = Math.min(Math.ceil(lh / t) - 1, Math.floor((canvas.height - oy) / s / t));
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const img = image(`${slide.id}_files/${lv}/${c}_${r}.jpeg`);
        if (counts) { counts.wanted++; if (img.ready) counts.loaded++; if (img.failed) counts.failed++; }
        if (!img.ready) continue;
        const x0 = c * t - (c > 0 ? ov : 0), y0 = r * t - (r > 0 ? ov : 0);
        ctx.drawImage(img, ox + x0 * s, oy + y0 * s, img.naturalWidth * s, img.naturalHeight * s);
      }
    }
  }

  function draw() {
    if (!slide) return;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
    const lv = levelFor(scale), counts = { wanted: 0, loaded: 0, failed: 0 };
    drawLevel(coarseLevel(), null);
    drawLevel(lv, counts);
    if (show && overlay.ready) {
      ctx.globalAlpha = alpha;
      ctx.imageSmoothingEnabled = false;                  // one cell per half patch: keep the patches visible
      const cell = slide.overlay_cell * scale;
      ctx.drawImage(overlay, ox, oy, overlay.naturalWidth * cell, overlay.naturalHeight * cell);
      ctx.globalAlpha = 1;
    }
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    ctx.font = "12px system-ui";
    slide.top.forEach((tile, k) => {
      const x = ox + tile.x * scale, y = oy + tile.y * scale, w = tile.size * scale;
      ctx.strokeRect(x, y, w, w);
      ctx.fillText(String(k + 1), x + 2, y + 12);
    });
    if (slide.mpp) el("res").textContent = `${(slide.mpp / scale).toPrecision(3)} µm/px`;
    const ready = counts.loaded === counts.wanted && (overlay.ready || overlay.failed);
    el("status").textContent = JSON.stringify({
      slide: slide.id, level: lv, levels: slide.levels, ...counts, overlay: overlay.ready === true,
      scale, ox, oy, width: canvas.width, height: canvas.height, alpha, ready });
    document.title = `${ready ? "ready" : "loading"}: ${slide.id}`;
  }

  function fit() {
    scale = Math.min(canvas.width / slide.width, canvas.height / slide.height);
    ox = (canvas.width - slide.width * scale) / 2;
    oy = (canvas.height - slide.height * scale) / 2;
  }

  function zoomTo(x, y, w, h) {
    scale = Math.min(canvas.width / w, canvas.height / h) * 0.8;
    ox = canvas.width / 2 - (x + w / 2) * scale;
    oy = canvas.height / 2 - (y + h / 2) * scale;
    draw();
  }

  function zoomAt(mx, my, factor) {
    const fitScale = Math.min(canvas.width / slide.width, canvas.height / slide.height);
    const next = Math.min(4, Math.max(fitScale / 4, scale * factor));
    ox = mx - (mx - ox) * (next / scale);
    oy = my - (my - oy) * (next / scale);
    scale = next;
    draw();
  }

  function load() {
    const p = hashParams();
    slide = data.slides.find((s) => s.id === p.slide) || data.slides[0];
    overlay = image(slide.overlay);
    if (p.alpha !== undefined) alpha = Math.min(1, Math.max(0, Number(p.alpha)));
    el("alpha").value = alpha;
    el("slide").value = slide.id;
    el("scale").textContent = slide.scale_label;
    const list = el("top");
    list.textContent = "";
    slide.top.forEach((tile, k) => {
      const li = document.createElement("li");
      li.textContent = `score ${tile.score.toFixed(3)}`;
      li.onclick = () => zoomTo(tile.x, tile.y, tile.size, tile.size);
      list.appendChild(li);
    });
    canvas.width = canvas.clientWidth;
    canvas.height = canvas.clientHeight;
    fit();
    const tile = p.top !== undefined ? slide.top[Number(p.top)] : undefined;
    if (tile) zoomTo(tile.x, tile.y, tile.size, tile.size); else draw();
  }

  document.title = data.title;
  el("title").textContent = data.title;
  el("bar").style.background = `linear-gradient(to right, ${data.colorbar.join(",")})`;
  for (const s of data.slides) {
    const opt = document.createElement("option");
    opt.value = s.id;
    opt.textContent = s.id;
    el("slide").appendChild(opt);
  }
  el("slide").onchange = () => { location.hash = `slide=${encodeURIComponent(el("slide").value)}`; };
  el("alpha").oninput = () => { alpha = Number(el("alpha").value); draw(); };
  el("show").onchange = () => { show = el("show").checked; draw(); };
  el("zin").onclick = () => zoomAt(canvas.width / 2, canvas.height / 2, 2);
  el("zout").onclick = () => zoomAt(canvas.width / 2, canvas.height / 2, 0.5);
  el("home").onclick = () => { fit(); draw(); };
  canvas.addEventListener("wheel", (e) => { e.preventDefault(); zoomAt(e.offsetX, e.offsetY, Math.exp(-e.deltaY * 0.002)); },
                          { passive: false });
  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX - ox, y: e.clientY - oy }; canvas.style.cursor = "grabbing"; });
  window.addEventListener("mouseup", () => { drag = null; canvas.style.cursor = "grab"; });
  window.addEventListener("mousemove", (e) => { if (drag) { ox = e.clientX - drag.x; oy = e.clientY - drag.y; draw(); } });
  window.addEventListener("resize", () => { canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight; draw(); });
  window.addEventListener("hashchange", load);
  load();
})();
