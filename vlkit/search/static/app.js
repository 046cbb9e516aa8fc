// The vlkit search page: text -> images, image -> images or captions (or captions written by the model, when it
// can write them), over the JSON API of vlkit.search.server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), query: $("query"), k: $("k"), button: $("search-button"),
    dropzone: $("dropzone"), file: $("file-input"), error: $("error"), status: $("status"),
    results: $("results"), empty: $("empty-state"), info: $("index-info"),
    preview: $("query-preview"), previewImage: $("preview-image"), previewName: $("preview-name"),
    describe: $("mode-describe"), describeLabel: $("mode-describe-label"), describeHint: $("describe-hint"),
  };
  const state = { info: null, last: null, controller: null, previewUrl: null, heatUrls: [] };

  // ------------------------------------------------------------------ helpers
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  const mode = () => document.querySelector('input[name="mode"]:checked').value;

  async function api(url, options = {}) {
    if (state.controller) state.controller.abort();
    state.controller = new AbortController();
    const response = await fetch(url, { ...options, signal: state.controller.signal });
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      throw new Error((body && body.error) || `the server answered ${response.status} ${response.statusText}`);
    }
    return body;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
    els.results.replaceChildren();
    els.results.removeAttribute("data-mode");
    els.status.textContent = "";
    els.empty.hidden = true;
  }

  function setBusy(busy) {
    document.body.classList.toggle("busy", busy);
    els.results.setAttribute("aria-busy", String(busy));
    els.button.disabled = busy;
  }

  function scoreBar(score) {
    const bar = el("span", { className: "bar" }, [el("span", { className: "bar-fill" })]);
    bar.firstChild.style.setProperty("width", `${Math.max(0, Math.min(1, score)) * 100}%`);
    return bar;
  }

  function thumb(result, alt) {
    return el("img", { src: result.thumbnail, alt, loading: "lazy", decoding: "async", draggable: true,
                       "data-testid": "result-image" });
  }

  function videoBadge(result) {
    // a video found in an index of videos: its thumbnail is the middle frame; say so, with its length
    if (result.media !== "video") return null;
    const seconds = typeof result.duration === "number" ? ` · ${result.duration.toFixed(1)} s` : "";
    return el("p", { className: "media-badge", text: `video${seconds}`, "data-testid": "result-media",
                     title: "a video: the picture is its middle frame" });
  }

  // ------------------------------------------------------------------ "why?"
  async function explanation(id, query) {
    // the heat map of where image `id` matches `query`, as an object URL (kept until the next results)
    const response = await fetch(`/api/explain?${new URLSearchParams({ id, q: query })}`);
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      throw new Error((body && body.error) || `the server answered ${response.status} ${response.statusText}`);
    }
    const blob = await response.blob();
    if (!blob.type.startsWith("image/") || blob.size === 0) throw new Error("the server sent no picture");
    const url = URL.createObjectURL(blob);
    state.heatUrls.push(url);
    return url;
  }

  function placeOver(heat, image) {
    // the heat map covers the centre square of the thumbnail (what the model sees) as the card shows it
    const w = image.naturalWidth, h = image.naturalHeight;
    const side = w && h ? (100 * Math.min(w, h)) / Math.max(w, h) : 100;
    heat.style.setProperty("width", `${side}%`);
    heat.style.setProperty("height", `${side}%`);
    heat.style.setProperty("left", `${(100 - side) / 2}%`);
    heat.style.setProperty("top", `${(100 - side) / 2}%`);
  }

  function whyParts(result, query, image) {
    // "why?": the heat map of what in this image matches the query, laid over the thumbnail (and off again);
    // fetched once per card; an error is written on the card
    const why = el("button", { type: "button", className: "ghost", text: "why?", "aria-pressed": "false",
                               title: "Show where this image matches the query", "data-testid": "explain" });
    const message = el("p", { className: "why-error", role: "alert", hidden: true, "data-testid": "explain-error" });
    let heat = null;  // the heat map's <img>, put beside the thumbnail once it has come
    const show = (on) => {
      heat.hidden = !on;
      why.setAttribute("aria-pressed", String(on));
    };
    why.addEventListener("click", async () => {
      if (why.getAttribute("aria-pressed") === "true") return show(false);
      message.hidden = true;
      if (!heat) {
        why.disabled = true;
        try {
          const picture = el("img", { className: "heat", alt: `where this image matches “${query}”`,
                                      draggable: false, "data-testid": "heat-map" });
          picture.src = await explanation(result.id, query);
          await picture.decode();
          heat = picture;
          image.after(heat);
        } catch (err) {
          message.textContent = `No explanation: ${err.message}`;
          message.hidden = false;
          return;
        } finally {
          why.disabled = false;
        }
      }
      placeOver(heat, image);
      show(true);
    });
    return { why, message };
  }

  // ------------------------------------------------------------------ rendering
  function imageCard(result, rank, query) {
    const captions = (result.captions || []).filter((c) => c !== result.caption);
    const more = captions.length
      ? el("details", { className: "more" }, [
          el("summary", { text: `${captions.length} more caption${captions.length > 1 ? "s" : ""}` }),
          el("ul", {}, captions.map((c) => el("li", { text: c }))),
        ])
      : null;
    const similar = el("button", { type: "button", className: "ghost", text: "Similar",
                                   title: "Find images similar to this one", "data-testid": "find-similar" });
    similar.addEventListener("click", () => searchLikeResult(result));
    const image = thumb(result, result.caption || result.id);
    const explainable = query && !(state.info && state.info.can_explain === false);
    const { why, message } = explainable ? whyParts(result, query, image) : {};
    return el("article", { className: "card", "data-testid": "result-card", dataset: { id: result.id } }, [
      el("div", { className: "thumb" }, [image,
                                         el("span", { className: "rank", text: `#${rank}` })]),
      el("div", { className: "card-body" }, [
        el("div", { className: "score-row" }, [
          el("span", { className: "score", text: result.score.toFixed(3), "data-testid": "result-score" }),
          scoreBar(result.score),
        ]),
        videoBadge(result),
        el("p", { className: "caption", text: result.caption || "(no caption)", "data-testid": "result-caption" }),
        more,
        el("div", { className: "card-foot" }, [el("code", { className: "id", text: result.id, title: result.id }),
                                              why, similar]),
        message,
      ]),
    ]);
  }

  function captionRow(result, rank) {
    return el("li", { className: "caption-row", "data-testid": "caption-result", dataset: { id: result.id } }, [
      el("span", { className: "rank", text: `#${rank}` }),
      thumb(result, result.text),
      el("div", { className: "caption-main" }, [
        el("p", { className: "caption-text", text: result.text, "data-testid": "caption-text" }),
        el("code", { className: "id", text: result.id }),
      ]),
      el("div", { className: "caption-score" }, [
        el("span", { className: "score", text: result.score.toFixed(3), "data-testid": "result-score" }),
        scoreBar(result.score),
      ]),
    ]);
  }

  function writtenRow(result, rank) {
    const score = Math.exp(result.score);  // the geometric mean of the tokens' probabilities
    return el("li", { className: "caption-row written", "data-testid": "written-caption" }, [
      el("span", { className: "rank", text: `#${rank}` }),
      el("div", { className: "caption-main" }, [
        el("p", { className: "caption-text", text: result.caption || "(empty)", "data-testid": "caption-text" }),
      ]),
      el("div", { className: "caption-score", title: "log-probability per token" }, [
        el("span", { className: "score", text: result.score.toFixed(3), "data-testid": "result-score" }),
        scoreBar(score),
      ]),
    ]);
  }

  function renderDescription(body, what) {
    els.error.hidden = true;
    els.empty.hidden = body.captions.length > 0;
    els.results.dataset.mode = "describe";
    els.results.replaceChildren(el("ol", { className: "caption-list" },
                                   body.captions.map((r, i) => writtenRow(r, i + 1))));
    const count = body.captions.length;
    els.status.textContent = `${count} caption${count === 1 ? "" : "s"} written for ${what} · ${body.took_ms} ms`;
  }

  function render(body, what) {
    for (const url of state.heatUrls.splice(0)) URL.revokeObjectURL(url);  // the previous cards' heat maps
    els.error.hidden = true;
    els.empty.hidden = body.results.length > 0;
    const captions = body.mode === "captions";
    els.results.dataset.mode = captions ? "captions" : "images";
    if (captions) {
      els.results.replaceChildren(el("ol", { className: "caption-list" },
                                     body.results.map((r, i) => captionRow(r, i + 1))));
    } else {
      els.results.replaceChildren(...body.results.map((r, i) => imageCard(r, i + 1, body.query)));
    }
    const noun = captions ? "caption" : (state.info && state.info.media === "video" ? "video" : "image");
    const count = body.results.length;
    els.status.textContent = `${count} ${noun}${count === 1 ? "" : "s"} for ${what} · ${body.took_ms} ms`;
  }

  // ------------------------------------------------------------------ searches
  async function searchText() {
    const q = els.query.value;
    const k = els.k.value;
    state.last = { kind: "text" };
    hidePreview();
    const params = new URLSearchParams({ q, k });
    history.replaceState(null, "", q.trim() ? `?${params}` : location.pathname);
    setBusy(true);
    try {
      render(await api(`/api/search?${params}`), `“${q.trim()}”`);
    } catch (err) {
      if (err.name !== "AbortError") showError(err.message);
    } finally {
      setBusy(false);
    }
  }

  async function searchImage(file, label) {
    state.last = { kind: "image", file, label };
    showPreview(file, label);
    const limit = state.info && state.info.max_upload_bytes;
    if (limit && file.size > limit) {
      showError(`the uploaded image is too large (${mib(file.size)}); at most ${mib(limit)}`);
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    setBusy(true);
    try {
      if (mode() === "describe") {
        renderDescription(await api("/api/describe", { method: "POST", body: form }), label);
        return;
      }
      const params = new URLSearchParams({ k: els.k.value, mode: mode() });
      render(await api(`/api/search/image?${params}`, { method: "POST", body: form }), label);
    } catch (err) {
      if (err.name !== "AbortError") showError(err.message);
    } finally {
      setBusy(false);
    }
  }

  async function searchLikeResult(result) {
    try {
      const response = await fetch(result.thumbnail);
      if (!response.ok) throw new Error(`could not load the thumbnail of ${result.id}`);
      const blob = await response.blob();
      const name = result.id.split("/").pop();
      document.querySelector("#mode-images").checked = true;
      await searchImage(new File([blob], name, { type: blob.type }), name);
    } catch (err) {
      showError(err.message);
    }
  }

  function rerun() {
    if (!state.last) return;
    if (state.last.kind === "text") searchText();
    else searchImage(state.last.file, state.last.label);
  }

  function showPreview(file, label) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    els.previewImage.src = state.previewUrl;
    els.previewName.textContent = label;
    els.preview.hidden = false;
  }

  els.previewImage.addEventListener("error", hidePreview);  // not an image: the API's error says so

  function hidePreview() {
    els.preview.hidden = true;
  }

  // ------------------------------------------------------------------ events
  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    searchText();
  });
  els.k.addEventListener("change", rerun);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => { if (state.last && state.last.kind === "image") rerun(); });
  }
  els.file.addEventListener("change", () => {
    const file = els.file.files[0];
    if (file) searchImage(file, file.name);
    els.file.value = "";  // choosing the same file again searches again
  });
  els.dropzone.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && event.target === els.dropzone) {
      event.preventDefault();
      els.file.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    els.dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      els.dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    els.dropzone.addEventListener(type, () => els.dropzone.classList.remove("dragging"));
  }
  els.dropzone.addEventListener("drop", async (event) => {
    event.preventDefault();
    els.dropzone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) return searchImage(file, file.name);
    const url = (event.dataTransfer.getData("text/uri-list") || "").split("\n")[0].trim();
    if (url && new URL(url, location.href).origin === location.origin) {  // a result's thumbnail
      const blob = await (await fetch(url)).blob();
      const name = decodeURIComponent(url.split("/").pop());
      return searchImage(new File([blob], name, { type: blob.type }), name);
    }
    showError("drop an image file");
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      searchImage(file, file.name || "pasted image");
    }
  });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) {
      event.preventDefault();
      els.query.focus();
    }
  });

  // ------------------------------------------------------------------ start
  async function loadInfo() {
    try {
      const response = await fetch("/api/info");
      const info = await response.json();
      if (!response.ok) throw new Error(info.error || `the server answered ${response.status}`);
      state.info = info;
      const rows = info.media === "video" ? `videos (${info.frames} frames each)` : "images";
      const parts = [`${info.images.toLocaleString()} ${rows}`, `${info.captions.toLocaleString()} captions`,
                     `${info.dim}-d`, `model ${info.model_tag}`];
      if (info.query_model_tag !== info.model_tag) parts.push(`queries by ${info.query_model_tag}`);
      els.info.textContent = parts.join(" · ");
      els.info.title = `dataset ${info.dataset}${info.split ? ` (${info.split})` : ""}`;
      for (const option of [...els.k.options]) if (Number(option.value) > info.max_k) option.remove();
      for (const node of [els.describe, els.describeLabel, els.describeHint]) node.hidden = !info.can_describe;
    } catch (err) {
      els.info.textContent = "index information unavailable";
    }
  }

  const params = new URLSearchParams(location.search);
  if (params.has("k") && [...els.k.options].some((o) => o.value === params.get("k"))) els.k.value = params.get("k");
  if (params.get("q")) els.query.value = params.get("q");
  loadInfo().then(() => { if (params.get("q")) searchText(); });  // the cards offer what the server can do
})();
