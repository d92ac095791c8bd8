// Views by URL: `/?view=NAME&...` shows one <section class="view"> and hands it the URL's
// parameters; the search page is the default. Every change of view or query is a history entry,
// so Back, Forward and a reload land where the person was.
import { $, $$ } from "./dom.js";

const views = new Map(); // name -> { nav, title(params), enter(params, { focus }), leave() }
let current = null;
let lastSearchUrl = "/";

export function registerView(name, spec) {
  views.set(name, spec);
}

export function currentView() {
  return current;
}

// Where the "Search" link goes: the last search, so coming back from another view restores it.
export function setSearchUrl(url) {
  lastSearchUrl = url;
  for (const link of $$('[data-view-link="search"]')) link.href = url;
}

export function searchUrl() {
  return lastSearchUrl;
}

export function go(url, { replace = false } = {}) {
  if (url === location.pathname + location.search) return;
  history[replace ? "replaceState" : "pushState"](null, "", url);
}

export function navigate(url, { focus = true, replace = false } = {}) {
  go(url, { replace });
  route({ focus });
}

function viewOf(params) {
  const view = params.get("view");
  return view && views.has(view) ? view : "search";
}

export function showView(name, params = new URLSearchParams(location.search), { focus = false } = {}) {
  if (current && current !== name) views.get(current).leave?.();
  current = name;
  const spec = views.get(name);
  for (const [other] of views) $(`#view-${other}`).hidden = other !== name;
  for (const link of $$("nav [data-view-link]")) {
    if (link.dataset.viewLink === (spec.nav || name)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = spec.title(params);
  if (focus) $(`#view-${name} h1`).focus({ preventScroll: false });
}

export function route({ focus = false } = {}) {
  const params = new URLSearchParams(location.search);
  const name = viewOf(params);
  showView(name, params, { focus });
  views.get(name).enter(params, { focus });
}

// Links inside the page (`data-view-link` in the top bar, `data-nav` anywhere) change the view
// without a reload; a middle click or a modifier key keeps the browser's own behaviour.
export function wireLinks() {
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-view-link], a[data-nav]");
    if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    const view = link.dataset.viewLink;
    navigate(view === "search" ? lastSearchUrl : view ? `/?view=${view}` : link.getAttribute("href"));
  });
  window.addEventListener("popstate", () => route());
}
