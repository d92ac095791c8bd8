// The search page's filters: per head (from GET /tags), each label with its count and three
// toggles (+ must have, or any of, − must not have), the active filters as chips, the minimum
// tag score and the number of results. `refreshTags()` refetches the counts (after a training).
import { api } from "./api.js";
import { $, $$, clamp, el } from "./dom.js";
import { DEFAULT_K, FILTER_KINDS, filterCount, state } from "./search-state.js";

const FACET_VISIBLE = 12; // labels shown per head before "Show all"
const MODES = {
  tag: { symbol: "+", verb: "Include", chip: "+" },
  any_tag: { symbol: "or", verb: "Any of", chip: "any" },
  not_tag: { symbol: "−", verb: "Exclude", chip: "not" },
};

let tagCounts = null;
let onChange = () => {};

export async function refreshTags() {
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
  const heads = Object.keys(tagCounts || {}).sort((a, b) => (a === "imagenet") - (b === "imagenet") || a.localeCompare(b));
  if (!heads.length) {
    root.replaceChildren(el("p", { className: "muted", text: "No tags yet: index images or train a head." }));
    return;
  }
  // A head whose group was opened, or whose label search holds text, stays that way.
  const before = new Map($$(".facet", root).map((d) => [d.dataset.head, { open: d.open, find: $(".facet-find", d)?.value || "", all: d.dataset.all }]));
  root.replaceChildren(...heads.map((head) => facetGroup(head, before.get(head))));
  syncFacetButtons();
}

function facetGroup(head, before) {
  const labels = Object.entries(tagCounts[head]).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const many = labels.length > FACET_VISIBLE;
  const open = before ? before.open : !many || termActive(head);
  const details = el("details", { className: "facet", open, dataset: { head, all: before?.all || "" } });
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
    find.value = before?.find || "";
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
      el("li", { className: "facet-row", dataset: { term, label: label.toLowerCase(), count } }, [
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
    const showAll = () => (details.dataset.all === "1" ? "Show fewer labels" : `Show all ${labels.length} labels`);
    const more = el("button", {
      type: "button",
      className: "link-button facet-all",
      "aria-expanded": String(details.dataset.all === "1"),
      text: showAll(),
    });
    more.addEventListener("click", () => {
      const all = details.dataset.all !== "1";
      details.dataset.all = all ? "1" : "";
      more.setAttribute("aria-expanded", String(all));
      more.textContent = showAll();
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

export function syncFacetButtons() {
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
  onChange();
}

export function renderActiveFilters() {
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
      onChange();
    },
  });
  root.replaceChildren(el("ul", { className: "chips", "aria-label": "Active filters" }, chips), clear);
}

export function syncControls() {
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

// `changed({ replace })` runs the search again once the filters changed.
export function initFacets(changed) {
  onChange = changed;
  const slider = $("#min-score");
  let sliderTimer = null;
  slider.addEventListener("input", () => {
    $("#min-score-value").textContent = Number(slider.value).toFixed(2);
    clearTimeout(sliderTimer);
    sliderTimer = setTimeout(() => {
      state.minScore = clamp(Number(slider.value), 0, 1);
      onChange({ replace: true });
      for (const details of $$(".facet")) applyFacetVisibility(details);
    }, 250);
  });
  $("#k").addEventListener("change", (event) => {
    state.k = Number.parseInt(event.target.value, 10) || DEFAULT_K;
    onChange();
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
}
