// lookalike's web page: search by image, filter by tags, browse neighbours, heads and index status.
// Plain JavaScript against the HTTP API of the same server; no framework, no build step, no network
// beyond this origin. When the server wants an API key (401), the page asks for one, keeps it in
// sessionStorage and sends it as `Authorization: Bearer ...`; images then load as blob: URLs.
"use strict";

(() => {
  const KEY_STORAGE = "lookalike.apiKey";
  const DEFAULT_K = 24;
  const FACET_VISIBLE = 12; // labels shown per head before "Show all"
  const DETAIL_SIMILAR_K = 8;
  const FILTER_KINDS = ["tag", "any_tag", "not_tag"];
  const MODES = {
    tag: { symbol: "+", verb: "Include", chip: "+" },
    any_tag: { symbol: "or", verb: "Any of", chip: "any" },
    not_tag: { symbol: "−", verb: "Exclude", chip: "not" },
  };
  const PLOTS = {
    "loss.png": "Training and validation loss per epoch",
    "confusion_matrix.png": "Confusion matrix on the validation split",
    "precision_recall.png": "Precision–recall curve",
  };
  const METRIC_NAMES = {
    n: "Examples evaluated",
    split: "Evaluated on",
    positive: "Positive label",
    threshold: "Threshold",
    accuracy: "Accuracy",
    balanced_accuracy: "Balanced accuracy",
    chance_accuracy: "Chance accuracy",
    precision: "Precision",
    recall: "Recall",
    f1: "F1",
    macro_f1: "Macro F1",
    micro_f1: "Micro F1",
    roc_auc: "ROC AUC",
    map: "mAP",
    chance_map: "Chance mAP",
    folds: "Folds",
  };

  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  // -- small helpers -----------------------------------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
      else if (value === true) node.setAttribute(name, "");
      else node.setAttribute(name, String(value));
    }
    for (const child of [].concat(children)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const basename = (path) => String(path).split(/[\\/]/).pop() || String(path);
  const unique = (items) => Array.from(new Set(items));
  const clamp = (value, lo, hi) => Math.min(hi, Math.max(lo, value));
  const fmtScore = (score) => (typeof score === "number" ? score.toFixed(3) : "–");

  function fmtNumber(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return value === null || value === undefined ? "–" : String(value);
    return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(3);
  }

  function fmtBytes(bytes) {
    if (typeof bytes !== "number") return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
  }

  function fmtDate(text) {
    const date = new Date(text);
    return Number.isNaN(date.getTime()) ? String(text) : date.toLocaleString();
  }

  function humanise(key) {
    if (METRIC_NAMES[key]) return METRIC_NAMES[key];
    const words = String(key).replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  // -- API key and requests ----------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function getKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function setKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled: the key lives as long as this page */
    }
    $("#forget-key").hidden = !key;
  }

  let keyPrompt = null;

  function askForKey(message) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve, reject) => {
      const dialog = $("#key-dialog");
      const form = $("#key-form");
      const input = $("#key-input");
      $("#key-error").textContent = message || "";
      input.value = "";
      const finish = (accepted) => {
        form.removeEventListener("submit", onSubmit);
        $("#key-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) dialog.close();
        keyPrompt = null;
        if (accepted) resolve();
        else reject(new ApiError(401, "This server needs an API key."));
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) {
          $("#key-error").textContent = "Enter a key.";
          return;
        }
        setKey(key);
        finish(true);
      };
      const onCancel = (event) => {
        event.preventDefault();
        finish(false);
      };
      form.addEventListener("submit", onSubmit);
      $("#key-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      input.focus();
    });
    return keyPrompt;
  }

  // fetch() with the stored key; on 401 ask for a key and try again.
  async function request(url, options = {}) {
    for (;;) {
      const key = getKey();
      const headers = new Headers(options.headers || {});
      if (key) headers.set("Authorization", `Bearer ${key}`);
      let response;
      try {
        response = await fetch(url, { ...options, headers });
      } catch {
        throw new ApiError(0, "The server cannot be reached.");
      }
      if (response.status !== 401) return response;
      if (getKey() === key) {
        // This key (or none) was refused: a refused key is not kept, even while the prompt is open.
        if (key) setKey("");
        await askForKey(key ? "That key was not accepted; enter another one." : "");
      } else if (keyPrompt) {
        // Another request found the same key refused and is already asking for a new one.
        await keyPrompt;
      }
      // Otherwise another request has already replaced the key this one was refused with.
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    } catch {
      /* not JSON */
    }
    return `${response.status} ${response.statusText}`.trim();
  }

  async function api(url, options) {
    const response = await request(url, options);
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response.json();
  }

  // Images: a plain URL without a key; with one, fetched with the header and shown as a blob: URL.
  const blobCache = new Map(); // url -> Promise<object URL>, least recently used first
  const BLOB_CACHE_SIZE = 400;

  function cachedBlob(url) {
    let promise = blobCache.get(url);
    if (promise) {
      blobCache.delete(url);
      blobCache.set(url, promise);
      return promise;
    }
    promise = fetchBlob(url);
    promise.catch(() => blobCache.delete(url));
    blobCache.set(url, promise);
    while (blobCache.size > BLOB_CACHE_SIZE) {
      const [oldest, old] = blobCache.entries().next().value;
      blobCache.delete(oldest);
      old.then((objectUrl) => URL.revokeObjectURL(objectUrl), () => {});
    }
    return promise;
  }

  async function fetchBlob(url) {
    const response = await request(url);
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return URL.createObjectURL(await response.blob());
  }

  // cache=false: large originals, one at a time; the previous blob of that <img> is released.
  // A thumbnail that cannot be shown (an imported row whose file lives on another host, a file
  // deleted since indexing) leaves a labelled tile instead of a blank square.
  const NO_FILE_NOTE = "Imported: the file is on another host";

  function markBroken(img, note = "No preview") {
    img.classList.add("broken");
    if (img.parentElement) {
      img.parentElement.classList.add("no-preview");
      img.parentElement.dataset.note = note;
    }
  }

  // Search results say which rows have no file here; asking for their thumbnails would only 404.
  function setThumbnail(img, result) {
    if (result.has_file === false) {
      img.dataset.src = "";
      img.removeAttribute("src");
      queueMicrotask(() => markBroken(img, NO_FILE_NOTE)); // once the card holds it
    } else {
      setImage(img, `/images/${result.id}/thumbnail`);
    }
  }

  function setImage(img, url, { cache = true } = {}) {
    img.dataset.src = url;
    img.classList.remove("broken");
    img.parentElement?.classList.remove("no-preview");
    if (img.dataset.ownBlob) {
      URL.revokeObjectURL(img.dataset.ownBlob);
      delete img.dataset.ownBlob;
    }
    const viaBlob = () => {
      const promise = cache ? cachedBlob(url) : fetchBlob(url);
      promise.then(
        (objectUrl) => {
          if (img.dataset.src !== url) {
            if (!cache) URL.revokeObjectURL(objectUrl);
            return;
          }
          if (!cache) img.dataset.ownBlob = objectUrl;
          img.src = objectUrl;
        },
        () => markBroken(img),
      );
    };
    if (getKey()) {
      img.onerror = () => markBroken(img);
      viaBlob();
    } else {
      // Without a key a refused image is retried through request(), which asks for one.
      img.onerror = () => {
        img.onerror = () => markBroken(img);
        if (img.dataset.src === url) viaBlob();
      };
      img.src = url;
    }
  }

  // -- state and URL -----------------------------------------------------------------------------

  const state = {
    view: "search",
    similar: null, // id of an indexed image ("more like this"), kept in the URL
    file: null, // an uploaded File: in memory only, the URL keeps just the filters
    fileUrl: null,
    tag: [],
    any_tag: [],
    not_tag: [],
    minScore: 0,
    k: DEFAULT_K,
  };
  let lastSearchUrl = "/";

  function readUrl() {
    const params = new URLSearchParams(location.search);
    const view = params.get("view");
    state.view = view === "heads" || view === "status" ? view : "search";
    if (state.view !== "search") return;
    const similar = params.get("similar");
    state.similar = similar && /^\d+$/.test(similar) ? similar : null;
    if (state.similar) clearFile();
    for (const kind of FILTER_KINDS) state[kind] = unique(params.getAll(kind).filter(Boolean));
    const minScore = Number.parseFloat(params.get("min_score"));
    state.minScore = Number.isFinite(minScore) ? clamp(minScore, 0, 1) : 0;
    const k = Number.parseInt(params.get("k"), 10);
    state.k = k >= 1 && k <= 1000 ? k : DEFAULT_K;
  }

  function filterParams() {
    const params = new URLSearchParams();
    for (const kind of FILTER_KINDS) for (const term of state[kind]) params.append(kind, term);
    if (state.minScore > 0) params.set("min_score", String(Math.round(state.minScore * 100) / 100));
    return params;
  }

  function searchUrl() {
    const params = filterParams();
    if (state.k !== DEFAULT_K) params.set("k", String(state.k));
    if (state.similar) {
      const withId = new URLSearchParams([["similar", state.similar], ...params]);
      return `/?${withId}`;
    }
    const query = params.toString();
    return query ? `/?${query}` : "/";
  }

  function go(url, { replace = false } = {}) {
    if (url === location.pathname + location.search) return;
    history[replace ? "replaceState" : "pushState"](null, "", url);
  }

  function filterCount() {
    return FILTER_KINDS.reduce((n, kind) => n + state[kind].length, 0) + (state.minScore > 0 ? 1 : 0);
  }

  function clearFile() {
    if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
    state.file = null;
    state.fileUrl = null;
  }

  // -- views -------------------------------------------------------------------------------------

  function showView(view, { focus = false } = {}) {
    for (const name of ["search", "heads", "status"]) $(`#view-${name}`).hidden = name !== view;
    for (const link of $$("nav [data-view-link]")) {
      if (link.dataset.viewLink === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    $('nav [data-view-link="search"]').href = lastSearchUrl;
    $('.brand[data-view-link="search"]').href = lastSearchUrl;
    document.title = { search: "lookalike", heads: "Heads · lookalike", status: "Index status · lookalike" }[view];
    if (focus) $(`#${view}-heading`).focus({ preventScroll: false });
  }

  function route({ focus = false } = {}) {
    readUrl();
    showView(state.view, { focus });
    if (state.view === "search") {
      lastSearchUrl = location.pathname + location.search;
      $('nav [data-view-link="search"]').href = lastSearchUrl;
      syncControls();
      runSearch();
    } else if (state.view === "heads") {
      renderHeads();
    } else {
      renderStatus();
    }
  }

  // -- search ------------------------------------------------------------------------------------

  const resultsEl = () => $("#results");
  let searchSeq = 0;

  function setStatus(text, isError = false) {
    const status = $("#search-status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function setSearchState(value) {
    document.body.dataset.search = value; // "idle", "loading", "done" or "error" (also handy for tests)
  }

  async function runSearch() {
    const seq = ++searchSeq;
    renderActiveFilters();
    syncFacetButtons();
    const params = filterParams();
    params.set("k", String(state.k));
    let pending;
    if (state.similar) {
      showQueryForId(state.similar);
      pending = api(`/images/${state.similar}/similar?${params}`);
    } else if (state.file) {
      showQueryForFile();
      const form = new FormData();
      form.append("file", state.file, state.file.name || "pasted-image");
      pending = api(`/search?${params}`, { method: "POST", body: form });
    } else {
      $("#query").hidden = true;
      resultsEl().replaceChildren();
      setStatus("Choose, drop or paste an image to see the indexed images that look like it.");
      setSearchState("idle");
      return;
    }
    setSearchState("loading");
    resultsEl().setAttribute("aria-busy", "true");
    setStatus("Searching…");
    try {
      const data = await pending;
      if (seq !== searchSeq) return;
      renderResults(data);
      setSearchState("done");
    } catch (error) {
      if (seq !== searchSeq) return;
      resultsEl().replaceChildren();
      setStatus(
        error.status === 404 && state.similar ? `Image ${state.similar} is not in the index.` : error.message,
        true,
      );
      setSearchState("error");
    } finally {
      if (seq === searchSeq) resultsEl().removeAttribute("aria-busy");
    }
  }

  function renderResults(data) {
    const results = data.results || [];
    resultsEl().replaceChildren(...results.map((result) => resultCard(result)));
    const filtered = filterCount() > 0;
    if (!results.length) {
      setStatus(filtered ? "No indexed image matches these filters." : "The index holds no other image.");
      return;
    }
    const count = `${results.length} ${results.length === 1 ? "result" : "results"}`;
    const took = typeof data.took_ms === "number" ? ` in ${Math.round(data.took_ms)} ms` : "";
    setStatus(`${count}${took}${filtered ? ", filtered" : ""}.`);
  }

  function tagSummary(tags, limit) {
    const list = el("ul", { className: "tags" });
    const shown = (tags || []).slice().sort((a, b) => b.score - a.score);
    for (const tag of shown.slice(0, limit)) {
      list.append(
        el(
          "li",
          {
            className: `tag${tag.score < state.minScore ? " tag-weak" : ""}`,
            title: `${tag.head}: ${tag.label} (score ${fmtScore(tag.score)})`,
          },
          [el("span", { className: "tag-label", text: tag.label }), el("span", { className: "tag-score", text: tag.score.toFixed(2) })],
        ),
      );
    }
    if (shown.length > limit) list.append(el("li", { className: "tag tag-more", text: `+${shown.length - limit}` }));
    return list;
  }

  function altText(name, tags) {
    const labels = unique((tags || []).slice().sort((a, b) => b.score - a.score).map((t) => t.label)).slice(0, 3);
    return labels.length ? `${name}, tagged ${labels.join(", ")}` : name;
  }

  function badgeTitle(badge) {
    return badge === "copy" ? "A resized or re-encoded copy of the query image" : "The query image itself";
  }

  function resultCard(result) {
    const name = basename(result.path);
    // Near-duplicates (resized or re-encoded copies of the query) come first; the server marks them.
    const badge = result.score >= 0.9999 ? "same image" : result.near_duplicate ? "copy" : null;
    const img = el("img", { alt: altText(name, result.tags), loading: "lazy", decoding: "async", width: 256, height: 256 });
    setThumbnail(img, result);
    const open = el(
      "button",
      {
        type: "button",
        className: "card-open",
        "aria-label": `${name}, similarity ${fmtScore(result.score)}: open details`,
        onclick: () => openDetail(result.id, result),
      },
      [img, badge ? el("span", { className: "badge", text: badge, title: badgeTitle(badge) }) : null],
    );
    const meta = el("div", { className: "card-meta" }, [
      el("span", { className: "score", title: "Cosine similarity", text: fmtScore(result.score) }),
      el("span", { className: "name", title: result.path, text: name }),
    ]);
    const more = el("button", {
      type: "button",
      className: "link-button more",
      "aria-label": `More like this: ${name}`,
      text: "More like this",
      onclick: () => moreLikeThis(result.id),
    });
    return el("li", { className: "card", dataset: { id: result.id, score: result.score } }, [
      open,
      el("div", { className: "card-body" }, [meta, tagSummary(result.tags, 4), more]),
    ]);
  }

  function moreLikeThis(id) {
    const dialog = $("#detail");
    if (dialog.open) dialog.close();
    clearFile();
    state.similar = String(id);
    if (state.view !== "search") {
      state.view = "search";
      showView("search");
    }
    go(searchUrl());
    lastSearchUrl = searchUrl();
    runSearch();
    window.scrollTo({ top: 0 });
    $("#query").focus({ preventScroll: true });
  }

  function showQueryForFile() {
    const figure = $("#query");
    const img = $("#query-img");
    img.dataset.src = "";
    img.onerror = null;
    img.src = state.fileUrl;
    img.alt = `Your query image: ${state.file.name || "pasted image"}`;
    $("#query-caption").textContent = `Your image: ${state.file.name || "pasted image"} (${fmtBytes(state.file.size)})`;
    $("#query-open").hidden = true;
    figure.hidden = false;
  }

  let queryMetaFor = null;

  function showQueryForId(id) {
    const figure = $("#query");
    const img = $("#query-img");
    if (img.dataset.src !== `/images/${id}/thumbnail`) setImage(img, `/images/${id}/thumbnail`);
    $("#query-open").hidden = false;
    figure.hidden = false;
    if (queryMetaFor === id) return;
    queryMetaFor = id;
    img.alt = `Query image ${id}`;
    $("#query-caption").textContent = `More like image ${id}`;
    api(`/images/${id}`).then(
      (meta) => {
        if (state.similar !== id) return;
        img.alt = `Query image: ${basename(meta.path)}`;
        $("#query-caption").textContent = `More like ${basename(meta.path)}`;
      },
      () => {},
    );
  }

  function startUpload(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`${file.name} is not an image.`, true);
      return;
    }
    clearFile();
    state.file = file;
    state.fileUrl = URL.createObjectURL(file);
    state.similar = null;
    queryMetaFor = null;
    if (state.view !== "search") {
      state.view = "search";
      showView("search");
    }
    go(searchUrl());
    lastSearchUrl = searchUrl();
    runSearch();
  }

  function clearQuery() {
    clearFile();
    state.similar = null;
    queryMetaFor = null;
    go(searchUrl());
    lastSearchUrl = searchUrl();
    runSearch();
    $("#file-input").focus();
  }

  // -- facets ------------------------------------------------------------------------------------

  let tagCounts = null;

  async function loadFacets() {
    const root = $("#facet-heads");
    try {
      tagCounts = await api("/tags");
    } catch (error) {
      root.replaceChildren(el("p", { className: "error", text: `Tags could not be loaded: ${error.message}` }));
      return;
    }
    renderFacets();
  }

  function termActive(head) {
    return FILTER_KINDS.some((kind) => state[kind].some((term) => term.startsWith(`${head}:`)));
  }

  function renderFacets() {
    const root = $("#facet-heads");
    const heads = Object.keys(tagCounts || {}).sort(
      (a, b) => (a === "imagenet") - (b === "imagenet") || a.localeCompare(b),
    );
    if (!heads.length) {
      root.replaceChildren(el("p", { className: "muted", text: "No tags yet: index images or train a head." }));
      return;
    }
    root.replaceChildren(...heads.map((head) => facetGroup(head)));
    syncFacetButtons();
  }

  function facetGroup(head) {
    const labels = Object.entries(tagCounts[head]).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const many = labels.length > FACET_VISIBLE;
    const details = el("details", { className: "facet", open: !many || termActive(head), dataset: { head } });
    details.append(
      el("summary", {}, [
        el("span", { className: "facet-head", text: head }),
        el("span", { className: "count", text: `${labels.length} ${labels.length === 1 ? "label" : "labels"}` }),
      ]),
    );
    if (many) {
      const find = el("input", {
        type: "search",
        className: "facet-find",
        placeholder: "Find a label",
        "aria-label": `Find a label of ${head}`,
      });
      find.addEventListener("input", () => applyFacetVisibility(details));
      details.append(find);
    }
    const list = el("ul", { className: "facet-list", "aria-label": `${head} labels`, "aria-describedby": "facet-hint" });
    for (const [label, count] of labels) {
      const term = `${head}:${label}`;
      const buttons = FILTER_KINDS.map((kind) =>
        el("button", {
          type: "button",
          className: `facet-btn mode-${kind}`,
          tabindex: "-1",
          "aria-pressed": "false",
          "aria-label": `${MODES[kind].verb} ${label} (${head})`,
          title: `${MODES[kind].verb} ${label}`,
          dataset: { kind, term },
          text: MODES[kind].symbol,
        }),
      );
      list.append(
        el("li", { className: "facet-row", dataset: { term, label: label.toLowerCase() } }, [
          el("span", { className: "facet-name" }, [
            el("span", { className: "facet-label", text: label }),
            el("span", { className: "count", text: String(count), "aria-label": `${count} images` }),
          ]),
          el("span", { className: "facet-buttons", role: "group", "aria-label": `${label} (${head})` }, buttons),
        ]),
      );
    }
    details.append(list);
    if (many) {
      const more = el("button", {
        type: "button",
        className: "link-button facet-all",
        "aria-expanded": "false",
        text: `Show all ${labels.length} labels`,
      });
      more.addEventListener("click", () => {
        const all = details.dataset.all !== "1";
        details.dataset.all = all ? "1" : "";
        more.setAttribute("aria-expanded", String(all));
        more.textContent = all ? "Show fewer labels" : `Show all ${labels.length} labels`;
        applyFacetVisibility(details);
      });
      details.append(more);
    }
    applyFacetVisibility(details);
    return details;
  }

  function applyFacetVisibility(details) {
    const find = $(".facet-find", details);
    const query = find ? find.value.trim().toLowerCase() : "";
    const all = details.dataset.all === "1";
    let shown = 0;
    for (const row of $$(".facet-row", details)) {
      const matches = !query || row.dataset.label.includes(query);
      const active = FILTER_KINDS.some((kind) => state[kind].includes(row.dataset.term));
      const visible = matches && (all || query || shown < FACET_VISIBLE || active);
      row.hidden = !visible;
      if (visible) shown += 1;
    }
    const roving = $('.facet-btn[tabindex="0"]', details);
    if (!roving || roving.closest(".facet-row").hidden) {
      if (roving) roving.tabIndex = -1;
      const first = $(".facet-row:not([hidden]) .facet-btn", details);
      if (first) first.tabIndex = 0;
    }
  }

  function syncFacetButtons() {
    for (const button of $$(".facet-btn")) {
      const pressed = state[button.dataset.kind].includes(button.dataset.term);
      button.setAttribute("aria-pressed", String(pressed));
    }
    for (const row of $$(".facet-row")) {
      const kind = FILTER_KINDS.find((k) => state[k].includes(row.dataset.term));
      row.dataset.active = kind || "";
    }
  }

  function toggleFilter(kind, term) {
    const wasOn = state[kind].includes(term);
    for (const k of FILTER_KINDS) state[k] = state[k].filter((t) => t !== term);
    if (!wasOn) state[kind] = [...state[kind], term];
    filtersChanged();
  }

  function filtersChanged({ replace = false } = {}) {
    go(searchUrl(), { replace });
    lastSearchUrl = searchUrl();
    runSearch();
  }

  function renderActiveFilters() {
    const root = $("#active-filters");
    const chips = [];
    for (const kind of FILTER_KINDS) {
      for (const term of state[kind]) {
        chips.push(
          el(
            "li",
            {},
            el(
              "button",
              {
                type: "button",
                className: `chip mode-${kind}`,
                "aria-label": `Remove filter: ${MODES[kind].verb.toLowerCase()} ${term}`,
                onclick: () => toggleFilter(kind, term),
              },
              [el("span", { className: "chip-kind", text: MODES[kind].chip }), ` ${term} `, el("span", { "aria-hidden": "true", text: "×" })],
            ),
          ),
        );
      }
    }
    const count = filterCount();
    $("#filters-count").textContent = count ? `(${count})` : "";
    if (!chips.length) {
      root.replaceChildren();
      return;
    }
    const clear = el("button", {
      type: "button",
      className: "link-button",
      text: "Clear all filters",
      onclick: () => {
        for (const kind of FILTER_KINDS) state[kind] = [];
        state.minScore = 0;
        syncControls();
        filtersChanged();
      },
    });
    root.replaceChildren(el("ul", { className: "chips", "aria-label": "Active filters" }, chips), clear);
  }

  function syncControls() {
    const slider = $("#min-score");
    slider.value = String(state.minScore);
    $("#min-score-value").textContent = state.minScore.toFixed(2);
    const select = $("#k");
    if (!$$("option", select).some((o) => o.value === String(state.k))) {
      select.append(el("option", { value: state.k, text: String(state.k) }));
    }
    select.value = String(state.k);
  }

  // Arrow keys inside a head's label list: one tab stop per list (roving tabindex).
  function onFacetKey(event) {
    const button = event.target.closest(".facet-btn");
    if (!button) return;
    const list = button.closest(".facet-list");
    const rows = $$(".facet-row:not([hidden])", list);
    let row = rows.indexOf(button.closest(".facet-row"));
    let col = FILTER_KINDS.indexOf(button.dataset.kind);
    switch (event.key) {
      case "ArrowDown":
        row += 1;
        break;
      case "ArrowUp":
        row -= 1;
        break;
      case "ArrowRight":
        col += 1;
        break;
      case "ArrowLeft":
        col -= 1;
        break;
      case "Home":
        row = 0;
        break;
      case "End":
        row = rows.length - 1;
        break;
      default:
        return;
    }
    event.preventDefault();
    row = clamp(row, 0, rows.length - 1);
    col = clamp(col, 0, FILTER_KINDS.length - 1);
    focusFacet(list, $$(".facet-btn", rows[row])[col]);
  }

  function focusFacet(list, button) {
    for (const other of $$('.facet-btn[tabindex="0"]', list)) other.tabIndex = -1;
    button.tabIndex = 0;
    button.focus();
  }

  // -- one image ---------------------------------------------------------------------------------

  let detailSeq = 0;
  let detailId = null;

  async function openDetail(id, result) {
    const seq = ++detailSeq;
    detailId = String(id);
    const dialog = $("#detail");
    const name = result ? basename(result.path) : `Image ${id}`;
    $("#detail-title").textContent = name;
    dialog.dataset.id = detailId;
    const img = $("#detail-img");
    img.alt = altText(name, result && result.tags);
    const link = $("#detail-file");
    const figure = img.parentElement;
    const noFile = () => {
      img.dataset.src = "";
      img.removeAttribute("src");
      markBroken(img, NO_FILE_NOTE);
      link.hidden = true;
    };
    figure.classList.remove("no-preview");
    link.hidden = false;
    if (result && result.has_file === false) noFile();
    else setImage(img, `/images/${id}/file`, { cache: false });
    link.href = `/images/${id}/file`;
    $("#detail-meta").replaceChildren(el("dd", { className: "muted", text: "Loading…" }));
    $("#detail-tags").replaceChildren(result ? tagTable(result.tags) : el("p", { className: "muted", text: "Loading…" }));
    $("#detail-similar").replaceChildren();
    if (!dialog.open) dialog.showModal();
    dialog.scrollTop = 0;

    if (getKey() && !link.hidden) {
      // A link cannot carry the header either: point it at the blob once the original is loaded.
      fetchBlob(`/images/${id}/file`).then(
        (objectUrl) => {
          if (seq !== detailSeq) return URL.revokeObjectURL(objectUrl);
          if (link.dataset.blob) URL.revokeObjectURL(link.dataset.blob);
          link.dataset.blob = objectUrl;
          link.href = objectUrl;
        },
        () => {},
      );
    }

    api(`/images/${id}`).then(
      (meta) => {
        if (seq !== detailSeq) return;
        $("#detail-title").textContent = basename(meta.path);
        if (meta.status === "imported" && !link.hidden) noFile();
        if (!result) img.alt = altText(basename(meta.path), meta.tags);
        renderMeta(meta);
        if (!result) {
          $("#detail-tags").replaceChildren(
            Array.isArray(meta.tags) ? tagTable(meta.tags) : el("p", { className: "muted", text: "Tags are shown for search results." }),
          );
        }
      },
      (error) => {
        if (seq === detailSeq) $("#detail-meta").replaceChildren(el("dd", { className: "error", text: error.message }));
      },
    );

    try {
      const data = await api(`/images/${id}/similar?k=${DETAIL_SIMILAR_K}`);
      if (seq !== detailSeq) return;
      $("#detail-similar").replaceChildren(...data.results.map((r) => similarCard(r)));
      if (!data.results.length) $("#detail-similar").append(el("li", { className: "muted", text: "No other image." }));
    } catch (error) {
      if (seq === detailSeq) $("#detail-similar").replaceChildren(el("li", { className: "error", text: error.message }));
    }
  }

  function renderMeta(meta) {
    const rows = [
      ["Id", meta.id],
      ["Path", meta.path],
      ["File size", fmtBytes(meta.size)],
      ["Dimensions", meta.width && meta.height ? `${meta.width} × ${meta.height} px` : "–"],
      ["Format", meta.format || "–"],
      ["Status", meta.status + (meta.error ? `: ${meta.error}` : "")],
      ["Indexed", fmtDate(meta.indexed_at)],
      ["Content hash", meta.content_hash || "–"],
    ];
    $("#detail-meta").replaceChildren(
      ...rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: String(value) })]),
    );
  }

  function tagTable(tags) {
    if (!tags || !tags.length) return el("p", { className: "muted", text: "No tags." });
    const sorted = tags.slice().sort((a, b) => a.head.localeCompare(b.head) || b.score - a.score);
    return el("table", { className: "table tags-table" }, [
      el("thead", {}, el("tr", {}, [el("th", { scope: "col", text: "Head" }), el("th", { scope: "col", text: "Label" }), el("th", { scope: "col", text: "Score" })])),
      el(
        "tbody",
        {},
        sorted.map((tag) =>
          el("tr", {}, [
            el("td", { text: tag.head }),
            el("td", { text: tag.label }),
            el("td", { className: "num" }, [
              el("meter", { min: 0, max: 1, value: tag.score, "aria-hidden": "true" }),
              ` ${fmtScore(tag.score)}`,
            ]),
          ]),
        ),
      ),
    ]);
  }

  function similarCard(result) {
    const name = basename(result.path);
    const img = el("img", { alt: altText(name, result.tags), loading: "lazy", width: 128, height: 128 });
    setThumbnail(img, result);
    return el("li", { className: "card card-small", dataset: { id: result.id } }, [
      el(
        "button",
        {
          type: "button",
          className: "card-open",
          "aria-label": `${name}, similarity ${fmtScore(result.score)}: open details`,
          onclick: () => openDetail(result.id, result),
        },
        [img, el("span", { className: "score", text: fmtScore(result.score) })],
      ),
    ]);
  }

  // -- heads -------------------------------------------------------------------------------------

  let headsSeq = 0;

  async function renderHeads() {
    const seq = ++headsSeq;
    const root = $("#heads-content");
    root.setAttribute("aria-busy", "true");
    try {
      const summaries = await api("/heads");
      const heads = await Promise.all(
        summaries.map((h) => api(`/heads/${encodeURIComponent(h.name)}`).catch((error) => ({ ...h, error: error.message }))),
      );
      if (seq !== headsSeq) return;
      heads.sort((a, b) => a.builtin - b.builtin || a.name.localeCompare(b.name));
      root.replaceChildren(
        ...(heads.length ? heads.map((head) => headCard(head)) : [el("p", { className: "muted", text: "No heads." })]),
      );
    } catch (error) {
      if (seq === headsSeq) root.replaceChildren(el("p", { className: "error", text: error.message }));
    } finally {
      if (seq === headsSeq) root.removeAttribute("aria-busy");
    }
  }

  function keyValues(pairs, className = "meta") {
    return el(
      "dl",
      { className },
      pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]),
    );
  }

  function headCard(head) {
    const report = head.metrics || {};
    const card = el("article", { className: "panel head-card", id: `head-${head.name}`, dataset: { head: head.name } });
    card.append(
      el("h2", {}, [
        head.name,
        " ",
        el("span", { className: "badge badge-type", text: head.type }),
        head.builtin ? el("span", { className: "badge", text: "built-in" }) : null,
      ]),
    );
    if (head.error) {
      card.append(el("p", { className: "error", text: head.error }));
      return card;
    }
    const overview = el("section", { className: "head-section" }, [
      el("h3", { text: "Overview" }),
      keyValues([
        ["Type", head.type],
        ["Labels", String(head.labels.length)],
        ["Created", head.created_at ? fmtDate(head.created_at) : null],
        ["Examples", report.examples !== undefined ? fmtNumber(report.examples) : null],
        ["Minimum confidence", head.type === "multiclass" ? fmtNumber(head.min_confidence) : null],
        ["Dropped labels", report.dropped_labels && report.dropped_labels.length ? report.dropped_labels.join(", ") : null],
      ]),
    ]);
    const sections = [overview, labelsSection(head)];
    if (Array.isArray(report.warnings) && report.warnings.length) {
      // Few examples, unreachable precision targets: what the figures below rest on.
      sections.push(
        el("section", { className: "head-section head-warnings" }, [
          el("h3", { text: "Warnings" }),
          el("ul", {}, report.warnings.map((text) => el("li", { text }))),
        ]),
      );
    }
    if (report.metrics && Object.keys(report.metrics).length) sections.push(...metricsSections(head, report.metrics));
    const training = [
      ["Initial loss", report.initial_loss !== undefined ? fmtNumber(report.initial_loss) : null],
      ["Expected initial loss", report.expected_initial_loss !== undefined ? fmtNumber(report.expected_initial_loss) : null],
      ["Regularisation C", report.regularisation ? `${fmtNumber(report.regularisation.c)} (${report.regularisation.chosen_by})` : null],
      ["Best epoch", typeof report.best_epoch === "number" ? String(report.best_epoch + 1) : null],
      ["Epochs run", report.epochs_run !== undefined ? String(report.epochs_run) : null],
      ["Training time", typeof report.train_seconds === "number" ? `${report.train_seconds.toFixed(2)} s` : null],
    ];
    if (training.some(([, v]) => v !== null)) {
      sections.push(el("section", { className: "head-section" }, [el("h3", { text: "Training" }), keyValues(training)]));
    }
    card.append(el("div", { className: "head-columns" }, sections));
    const plots = (Array.isArray(report.plots) ? report.plots : []).filter((name) => PLOTS[name]);
    if (plots.length) {
      card.append(
        el("h3", { text: "Plots" }),
        el(
          "div",
          { className: "plots" },
          plots.map((file) => {
            const img = el("img", { alt: `${PLOTS[file]} of head ${head.name}`, loading: "lazy" });
            setImage(img, `/heads/${encodeURIComponent(head.name)}/plots/${file}`, { cache: false });
            return el("figure", { className: "plot" }, [img, el("figcaption", { text: PLOTS[file] })]);
          }),
        ),
      );
    }
    return card;
  }

  function labelsSection(head) {
    const section = el("section", { className: "head-section head-labels" }, el("h3", { text: "Labels and thresholds" }));
    const thresholds = head.thresholds || [];
    if (head.labels.length > 40) {
      section.append(
        el("details", {}, [
          el("summary", { text: `${head.labels.length} labels` }),
          el("p", { className: "label-cloud", text: head.labels.join(", ") }),
        ]),
      );
      if (thresholds.length) section.append(el("p", { className: "muted", text: `Thresholds: ${thresholds.map(fmtNumber).join(", ")}` }));
      return section;
    }
    const rows = head.labels.map((label, i) => {
      let role = "";
      let threshold = "–";
      if (head.type === "binary") {
        role = i === head.labels.length - 1 ? "positive" : "negative";
        if (thresholds.length) threshold = i === head.labels.length - 1 ? fmtNumber(thresholds[0]) : `< ${fmtNumber(thresholds[0])}`;
      } else if (thresholds.length === head.labels.length) {
        threshold = fmtNumber(thresholds[i]);
      }
      return el("tr", {}, [
        el("th", { scope: "row", text: label }),
        head.type === "binary" ? el("td", { text: role }) : null,
        el("td", { className: "num", text: threshold }),
      ]);
    });
    section.append(
      el("table", { className: "table" }, [
        el(
          "thead",
          {},
          el("tr", {}, [
            el("th", { scope: "col", text: "Label" }),
            head.type === "binary" ? el("th", { scope: "col", text: "Role" }) : null,
            el("th", { scope: "col", text: head.type === "binary" ? "Score threshold (positive)" : "Threshold" }),
          ]),
        ),
        el("tbody", {}, rows),
      ]),
    );
    return section;
  }

  function fmtMetric(key, value) {
    if (typeof value !== "number") return fmtNumber(value);
    return ["n", "folds", "examples", "positives", "smallest_class"].includes(key) ? fmtNumber(value) : value.toFixed(3);
  }

  // The evaluation as sections: scalar metrics, then the confusion matrix or per-label tables.
  function metricsSections(head, metrics) {
    const scalars = [];
    const extra = [];
    const intervals = metrics.ci95 || {};
    for (const [key, value] of Object.entries(metrics)) {
      if (key === "curves" || key === "ci95") continue;
      if (key === "confusion_matrix" && Array.isArray(value)) {
        extra.push(el("section", { className: "head-section" }, [el("h3", { text: "Confusion matrix" }), confusionTable(head, value)]));
      } else if (value && typeof value === "object" && !Array.isArray(value)) {
        const rows = Object.entries(value).map(([k, v]) =>
          el("tr", {}, [
            el("th", { scope: "row", text: k }),
            el("td", { className: "num", text: typeof v === "object" && v !== null ? JSON.stringify(v) : fmtMetric(key, v) }),
          ]),
        );
        extra.push(
          el("section", { className: "head-section" }, [
            el("h3", { text: humanise(key) }),
            el("table", { className: "table" }, el("tbody", {}, rows)),
          ]),
        );
      } else {
        let text = Array.isArray(value) ? value.map((v) => fmtMetric(key, v)).join(", ") : fmtMetric(key, value);
        const ci = intervals[key];
        if (Array.isArray(ci) && ci.length === 2) text += ` (95% CI ${ci[0].toFixed(3)}–${ci[1].toFixed(3)})`;
        scalars.push([key, text]);
      }
    }
    const table = el("table", { className: "table metrics" }, [
      el(
        "tbody",
        {},
        scalars.map(([key, text]) =>
          el("tr", { dataset: { metric: key } }, [el("th", { scope: "row", text: humanise(key) }), el("td", { className: "num", text })]),
        ),
      ),
    ]);
    return [el("section", { className: "head-section head-metrics" }, [el("h3", { text: "Evaluation" }), table]), ...extra];
  }

  function confusionTable(head, matrix) {
    const labels = matrix.length === head.labels.length ? head.labels : matrix.map((_, i) => String(i));
    return el("table", { className: "table confusion" }, [
      el("caption", { text: "Rows: true label; columns: predicted." }),
      el("thead", {}, el("tr", {}, [el("td"), ...labels.map((label) => el("th", { scope: "col", text: label }))])),
      el(
        "tbody",
        {},
        matrix.map((row, i) =>
          el("tr", {}, [
            el("th", { scope: "row", text: labels[i] }),
            ...row.map((n, j) => el("td", { className: `num${i === j ? " diagonal" : ""}`, text: fmtNumber(n) })),
          ]),
        ),
      ),
    ]);
  }

  // -- index status ------------------------------------------------------------------------------

  let statusSeq = 0;

  async function renderStatus() {
    const seq = ++statusSeq;
    const root = $("#status-content");
    root.setAttribute("aria-busy", "true");
    try {
      const stats = await api("/stats");
      if (seq !== statusSeq) return;
      const images = stats.images || {};
      const index = stats.index || {};
      const counts = el(
        "ul",
        { className: "counts", "aria-label": "Images by status" },
        [
          ["indexed", "Indexed"],
          ...(images.imported ? [["imported", "Imported"]] : []),
          ["failed", "Failed"],
          ["total", "Total"],
        ].map(([key, label]) =>
          el("li", { className: `count-card count-${key}`, dataset: { status: key } }, [
            el("span", { className: "count-value", text: fmtNumber(images[key] ?? 0) }),
            el("span", { className: "count-label", text: label }),
          ]),
        ),
      );
      const facts = keyValues([
        ["Backbone", stats.backbone || "–"],
        ["Embedding dimension", stats.dimension ? String(stats.dimension) : "–"],
        ["Index type", index.type || "–"],
        ["Search", index.exact === false ? "approximate, re-ranked exactly" : "exact"],
        ...(index.exact === false
          ? [
              ["Lists probed", `${fmtNumber(index.nprobe)} of ${fmtNumber(index.nlist)}`],
              ["Measured recall@10", `${Number(index.recall_at_10).toFixed(3)} (target ${index.recall_target}, ${index.recall_queries} sampled queries)`],
              [
                "Waiting for compaction",
                `${fmtNumber(index.growing_segment ?? 0)} added, ${fmtNumber(index.tombstones ?? 0)} removed` +
                  (index.compacting ? " (compacting in the background now)" : ""),
              ],
            ]
          : index.switch_at
            ? [["Approximate from", `${fmtNumber(index.switch_at)} vectors`]]
            : []),
        ["Index memory", fmtBytes(index.memory_bytes)],
        ["Metric", index.metric || "–"],
        ["Vectors", fmtNumber(index.vectors ?? 0)],
        ["Generation", String(index.generation ?? 0)],
        ["Index size", fmtBytes(index.bytes)],
        ["Database size", stats.database_bytes === null || stats.database_bytes === undefined ? "–" : fmtBytes(stats.database_bytes)],
        ["Database", stats.database],
        ["Home folder", stats.home],
      ]);
      const failures = stats.failures || [];
      const failureSection = el("section", { className: "panel", "aria-labelledby": "failures-heading" }, [
        el("h2", { id: "failures-heading", text: `Failures (${fmtNumber(images.failed ?? failures.length)})` }),
        failures.length
          ? el("div", { className: "table-scroll" }, el("table", { className: "table failures" }, [
              el("thead", {}, el("tr", {}, [el("th", { scope: "col", text: "File" }), el("th", { scope: "col", text: "Reason" })])),
              el("tbody", {}, failures.map((f) => el("tr", {}, [el("td", { className: "path", text: f.path }), el("td", { text: f.reason })]))),
            ]))
          : el("p", { className: "muted", text: "No file failed." }),
        failures.length && images.failed > failures.length
          ? el("p", { className: "muted", text: `Showing the first ${failures.length}; \`lookalike stats\` lists them all.` })
          : null,
      ]);
      root.replaceChildren(counts, el("section", { className: "panel" }, [el("h2", { text: "Index" }), facts]), failureSection);
    } catch (error) {
      if (seq === statusSeq) root.replaceChildren(el("p", { className: "error", text: error.message }));
    } finally {
      if (seq === statusSeq) root.removeAttribute("aria-busy");
    }
  }

  // -- wiring ------------------------------------------------------------------------------------

  function imageFrom(dataTransfer) {
    if (!dataTransfer) return null;
    const files = Array.from(dataTransfer.files || []);
    const image = files.find((f) => f.type.startsWith("image/")) || null;
    if (image) return image;
    for (const item of Array.from(dataTransfer.items || [])) {
      if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
    }
    return files[0] || null;
  }

  function wire() {
    setKey(getKey());
    $("#forget-key").addEventListener("click", () => {
      setKey("");
      for (const promise of blobCache.values()) promise.then((u) => URL.revokeObjectURL(u), () => {});
      blobCache.clear();
    });

    for (const link of $$("[data-view-link]")) {
      link.addEventListener("click", (event) => {
        if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
        event.preventDefault();
        const view = link.dataset.viewLink;
        go(view === "search" ? lastSearchUrl : `/?view=${view}`);
        route({ focus: true });
      });
    }
    window.addEventListener("popstate", () => route());

    $("#file-input").addEventListener("change", (event) => {
      const file = event.target.files && event.target.files[0];
      if (file) startUpload(file);
    });
    const dropzone = $("#dropzone");
    let dragDepth = 0;
    document.addEventListener("dragenter", (event) => {
      if (state.view !== "search") return;
      event.preventDefault();
      dragDepth += 1;
      dropzone.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (!dragDepth) dropzone.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => event.preventDefault()); // never navigate to a dropped file
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      dragDepth = 0;
      dropzone.classList.remove("dragging");
      if (state.view === "search") startUpload(imageFrom(event.dataTransfer));
    });
    document.addEventListener("paste", (event) => {
      const file = imageFrom(event.clipboardData);
      if (file && file.type.startsWith("image/")) {
        event.preventDefault();
        startUpload(file);
      }
    });

    $("#query-clear").addEventListener("click", clearQuery);
    $("#query-open").addEventListener("click", () => state.similar && openDetail(state.similar, null));

    const slider = $("#min-score");
    let sliderTimer = null;
    slider.addEventListener("input", () => {
      $("#min-score-value").textContent = Number(slider.value).toFixed(2);
      clearTimeout(sliderTimer);
      sliderTimer = setTimeout(() => {
        state.minScore = clamp(Number(slider.value), 0, 1);
        filtersChanged({ replace: true });
        for (const details of $$(".facet")) applyFacetVisibility(details);
      }, 250);
    });
    $("#k").addEventListener("change", (event) => {
      state.k = Number.parseInt(event.target.value, 10) || DEFAULT_K;
      filtersChanged();
    });

    const facets = $("#facet-heads");
    facets.addEventListener("click", (event) => {
      const button = event.target.closest(".facet-btn");
      if (!button) return;
      focusFacet(button.closest(".facet-list"), button);
      toggleFilter(button.dataset.kind, button.dataset.term);
    });
    facets.addEventListener("keydown", onFacetKey);

    const toggle = $("#filters-toggle");
    toggle.addEventListener("click", () => {
      const open = !$("#facets").classList.contains("open");
      $("#facets").classList.toggle("open", open);
      toggle.setAttribute("aria-expanded", String(open));
    });

    const detail = $("#detail");
    $("#detail-close").addEventListener("click", () => detail.close());
    $("#detail-more").addEventListener("click", () => detailId && moreLikeThis(detailId));
    detail.addEventListener("click", (event) => {
      if (event.target === detail) detail.close(); // a click on the backdrop
    });
    detail.addEventListener("close", () => {
      detailSeq += 1;
      detailId = null;
      const img = $("#detail-img");
      img.dataset.src = "";
      if (img.dataset.ownBlob) {
        URL.revokeObjectURL(img.dataset.ownBlob);
        delete img.dataset.ownBlob;
      }
      img.removeAttribute("src");
      const link = $("#detail-file");
      if (link.dataset.blob) {
        URL.revokeObjectURL(link.dataset.blob);
        delete link.dataset.blob;
      }
    });

    $("#status-refresh").addEventListener("click", renderStatus);
  }

  wire();
  route();
  loadFacets();
})();
