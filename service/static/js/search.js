// The search page: a query (an upload, an indexed image, or several examples in the tray), the
// filters, and the grid of results with their scores and tags. Each result can be opened, searched
// by ("More like this"), or marked as an example to look like ("Like") or not ("Unlike").
import { api } from "./api.js";
import { $, basename, el, fmtBytes, fmtScore, plural } from "./dom.js";
import { altText, closeDetail, initDetail, openDetail } from "./detail.js";
import { badgeText, groupUrl } from "./duplicates.js";
import { initFacets, refreshTags, renderActiveFilters, syncControls, syncFacetButtons } from "./facets.js";
import { setImage, setThumbnail } from "./images.js";
import { currentView, go, registerView, setSearchUrl, showView } from "./router.js";
import { openSaveAsTag } from "./head-form.js";
import {
  clearFile,
  clearLikeFiles,
  examplesParams,
  exampleSide,
  filterCount,
  filterParams,
  hasExamples,
  readSearchParams,
  searchUrl,
  state,
  toggleExample,
} from "./search-state.js";
import { initTray, rememberName, renderTray } from "./tray.js";

const resultsEl = () => $("#results");
let searchSeq = 0;
let queryMetaFor = null;
let refocus = null; // after a re-rank: { index, side } of the toggle that was pressed

function setStatus(text, isError = false) {
  const status = $("#search-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function setSearchState(value) {
  document.body.dataset.search = value; // "idle", "loading", "done" or "error" (also handy for tests)
}

// The request for the search the state describes, or null when there is nothing to search by.
function pendingSearch() {
  if (hasExamples()) {
    $("#query").hidden = true;
    const params = examplesParams();
    if (!state.likeFiles.length) return api(`/search?${params}`, { method: "POST" });
    const form = new FormData();
    for (const { file } of state.likeFiles) form.append("file", file, file.name || "pasted-image");
    return api(`/search?${params}`, { method: "POST", body: form });
  }
  const params = filterParams();
  params.set("k", String(state.k));
  if (state.similar) {
    showQueryForId(state.similar);
    return api(`/images/${state.similar}/similar?${params}`);
  }
  if (state.file) {
    showQueryForFile();
    const form = new FormData();
    form.append("file", state.file, state.file.name || "pasted-image");
    return api(`/search?${params}`, { method: "POST", body: form });
  }
  return null;
}

async function runSearch() {
  const seq = ++searchSeq;
  renderActiveFilters();
  syncFacetButtons();
  renderTray();
  const pending = pendingSearch();
  if (!pending) {
    $("#query").hidden = true;
    resultsEl().replaceChildren();
    setStatus("Choose, drop or paste an image to see the indexed images that look like it.");
    setSearchState("idle");
    return;
  }
  setSearchState("loading");
  resultsEl().setAttribute("aria-busy", "true");
  setStatus(hasExamples() ? "Re-ranking by the examples…" : "Searching…");
  try {
    const data = await pending;
    if (seq !== searchSeq) return;
    renderResults(data);
    setSearchState("done");
  } catch (error) {
    if (seq !== searchSeq) return;
    resultsEl().replaceChildren();
    setStatus(error.status === 404 && state.similar ? `Image ${state.similar} is not in the index.` : error.message, true);
    setSearchState("error");
  } finally {
    if (seq === searchSeq) resultsEl().removeAttribute("aria-busy");
  }
}

function renderResults(data) {
  const results = data.results || [];
  for (const result of results) rememberName(result.id, result.path);
  resultsEl().replaceChildren(...results.map((result, i) => resultCard(result, i)));
  restoreFocus();
  const filtered = filterCount() > 0;
  if (!results.length) {
    setStatus(filtered ? "No indexed image matches these filters." : "The index holds no other image.");
    return;
  }
  const count = plural(results.length, "result");
  const took = typeof data.took_ms === "number" ? ` in ${Math.round(data.took_ms)} ms` : "";
  const by = hasExamples() ? `, ranked by ${plural(state.like.length + state.likeFiles.length + state.unlike.length, "example")} (${state.strategy === "best_score" ? "best match" : "average"})` : "";
  setStatus(`${count}${took}${by}${filtered ? ", filtered" : ""}.`);
}

// A pressed toggle's card leaves the grid (examples are not results): the focus goes to the
// same toggle of the card that now takes its place.
function restoreFocus() {
  if (!refocus) return;
  const { index, side } = refocus;
  refocus = null;
  const cards = resultsEl().children;
  if (!cards.length) return $("#tray-heading").focus();
  const card = cards[Math.min(index, cards.length - 1)];
  card.querySelector(`.example-toggle[data-side="${side}"]`)?.focus();
}

function tagSummary(tags, limit) {
  const list = el("ul", { className: "tags" });
  const shown = (tags || []).slice().sort((a, b) => b.score - a.score);
  for (const tag of shown.slice(0, limit)) {
    list.append(
      el("li", { className: `tag${tag.score < state.minScore ? " tag-weak" : ""}`, title: `${tag.head}: ${tag.label} (score ${fmtScore(tag.score)})` }, [
        el("span", { className: "tag-label", text: tag.label }),
        el("span", { className: "tag-score", text: tag.score.toFixed(2) }),
      ]),
    );
  }
  if (shown.length > limit) list.append(el("li", { className: "tag tag-more", text: `+${shown.length - limit}` }));
  return list;
}

function badgeTitle(badge) {
  return badge === "copy" ? "A resized or re-encoded copy of the query image" : "The query image itself";
}

function exampleToggles(result, name, index) {
  const side = exampleSide(result.id);
  const toggle = (which, symbol, text, label, title) =>
    el("button", {
      type: "button",
      className: `example-toggle toggle-${which}`,
      "aria-pressed": String(side === which),
      "aria-label": `${label} ${name}`,
      title,
      dataset: { side: which },
      onclick: () => {
        refocus = { index, side: which };
        toggleExample(result.id, which);
        examplesChanged();
      },
    }, [el("span", { "aria-hidden": "true", text: symbol }), ` ${text}`]);
  return el("span", { className: "example-toggles", role: "group", "aria-label": `Use ${name} as an example` }, [
    toggle("like", "+", "Like", "Like (more like this):", "More like this: add to the examples to look like"),
    toggle("unlike", "−", "Unlike", "Unlike (less like this):", "Less like this: add to the examples to move away from"),
  ]);
}

function resultCard(result, index) {
  const name = basename(result.path);
  // Near-duplicates (resized or re-encoded copies of the query) come first; the server marks them.
  const badge = result.score >= 0.9999 && !hasExamples() ? "same image" : result.near_duplicate ? "copy" : null;
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
    el("span", { className: "score", title: hasExamples() && state.strategy === "best_score" ? "Best-match score" : "Cosine similarity", text: fmtScore(result.score) }),
    el("span", { className: "name", title: result.path, text: name }),
  ]);
  const more = el("button", {
    type: "button",
    className: "link-button more",
    "aria-label": `More like this: ${name}`,
    title: "Search by this image alone",
    text: "More like this",
    onclick: () => moreLikeThis(result.id),
  });
  return el("li", { className: "card", dataset: { id: result.id, score: result.score } }, [
    open,
    el("div", { className: "card-body" }, [
      meta,
      duplicatesBadge(result, name),
      tagSummary(result.tags, 4),
      more,
      exampleToggles(result, name, index),
    ]),
  ]);
}

// The result's own duplicate group (the server says which, if any): a link to it in the duplicates view.
function duplicatesBadge(result, name) {
  const group = result.duplicates;
  if (!group) return null;
  const kind = { identical: "identical files", copy: "copies", near: "near-duplicates" }[group.tier];
  return el("a", {
    className: "dup-badge", // not .badge: that one is the query-copy mark on the thumbnail
    href: groupUrl(result.id, group.tier),
    "data-nav": "",
    title: `${name} is one of ${group.size} ${kind}: open the group`,
    text: badgeText(group),
  });
}

function toSearchView() {
  if (currentView() !== "search") showView("search");
}

function pushSearch({ replace = false } = {}) {
  go(searchUrl(), { replace });
  setSearchUrl(searchUrl());
  runSearch();
}

function moreLikeThis(id) {
  closeDetail();
  clearFile();
  clearLikeFiles();
  state.like = [];
  state.unlike = [];
  state.similar = String(id);
  toSearchView();
  pushSearch();
  window.scrollTo({ top: 0 });
  $("#query").focus({ preventScroll: true });
}

function examplesChanged() {
  pushSearch();
}

function showQueryForFile() {
  const img = $("#query-img");
  img.dataset.src = "";
  img.onerror = null;
  img.src = state.fileUrl;
  img.alt = `Your query image: ${state.file.name || "pasted image"}`;
  $("#query-caption").textContent = `Your image: ${state.file.name || "pasted image"} (${fmtBytes(state.file.size)})`;
  $("#query-open").hidden = true;
  $("#query").hidden = false;
}

function showQueryForId(id) {
  const img = $("#query-img");
  if (img.dataset.src !== `/images/${id}/thumbnail`) setImage(img, `/images/${id}/thumbnail`);
  $("#query-open").hidden = false;
  $("#query").hidden = false;
  if (queryMetaFor === id) return;
  queryMetaFor = id;
  img.alt = `Query image ${id}`;
  $("#query-caption").textContent = `More like image ${id}`;
  api(`/images/${id}`).then(
    (meta) => {
      if (state.similar !== id) return;
      rememberName(id, meta.path);
      img.alt = `Query image: ${basename(meta.path)}`;
      $("#query-caption").textContent = `More like ${basename(meta.path)}`;
    },
    () => {},
  );
}

// A new image to search by: it replaces the query and the examples.
function startUpload(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image.`, true);
    return;
  }
  clearFile();
  clearLikeFiles();
  state.like = [];
  state.unlike = [];
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  state.similar = null;
  queryMetaFor = null;
  toSearchView();
  pushSearch();
}

function clearQuery() {
  clearFile();
  state.similar = null;
  queryMetaFor = null;
  pushSearch();
  $("#file-input").focus();
}

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

function wireUploads() {
  $("#file-input").addEventListener("change", (event) => {
    const file = event.target.files && event.target.files[0];
    if (file) startUpload(file);
  });
  const dropzone = $("#dropzone");
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (currentView() !== "search") return;
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
    if (currentView() === "search") startUpload(imageFrom(event.dataTransfer));
  });
  document.addEventListener("paste", (event) => {
    const file = imageFrom(event.clipboardData);
    if (file && file.type.startsWith("image/")) {
      event.preventDefault();
      startUpload(file);
    }
  });
}

export function initSearch() {
  wireUploads();
  $("#query-clear").addEventListener("click", clearQuery);
  $("#query-open").addEventListener("click", () => state.similar && openDetail(state.similar, null));
  initFacets(({ replace = false } = {}) => pushSearch({ replace }));
  initTray({ changed: examplesChanged, saveAsTag: () => openSaveAsTag(state.like, state.unlike, state.likeFiles.length) });
  initDetail(moreLikeThis);
  registerView("search", {
    title: () => "lookalike",
    enter: (params) => {
      readSearchParams(params);
      setSearchUrl(location.pathname + location.search);
      syncControls();
      runSearch();
    },
  });
  refreshTags();
}
