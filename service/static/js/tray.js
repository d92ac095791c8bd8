// The examples tray above the search grid: the images marked "more like this" and "less like
// this" (thumbnails with remove and move buttons), how to combine them (average or best_score),
// an image to add from disk, and "Save as tag…". Every change re-ranks the grid.
import { api } from "./api.js";
import { $, basename, el, plural } from "./dom.js";
import { setImage, thumbnailUrl } from "./images.js";
import { hasExamples, state, toggleExample } from "./search-state.js";

const names = new Map(); // image id -> file name, from results seen or GET /images/{id}
let onChange = () => {};

export function rememberName(id, path) {
  names.set(String(id), basename(path));
}

function nameOf(id) {
  return names.get(String(id)) || `image ${id}`;
}

const SIDES = {
  like: { list: "#tray-like", verb: "more like", other: "unlike", otherVerb: "less like", empty: "None yet: choose “Like” on a result." },
  unlike: { list: "#tray-unlike", verb: "less like", other: "like", otherVerb: "more like", empty: "None: choose “Unlike” on a result to move away from it." },
};

export function renderTray() {
  const tray = $("#tray");
  tray.hidden = !hasExamples();
  if (tray.hidden) return;
  for (const [side, spec] of Object.entries(SIDES)) {
    const items = state[side].map((id) => trayItem(id, side, spec));
    if (side === "like") items.push(...state.likeFiles.map((entry, i) => fileItem(entry, i)));
    $(spec.list).replaceChildren(...(items.length ? items : [el("li", { className: "tray-empty muted", text: spec.empty })]));
  }
  for (const radio of document.querySelectorAll('#tray input[name="strategy"]')) radio.checked = radio.value === state.strategy;
  const likes = state.like.length + state.likeFiles.length;
  $("#tray-summary").textContent = `${plural(likes, "image")} to look like, ${plural(state.unlike.length, "image")} not to.`;
  $("#tray-save").disabled = state.like.length === 0;
  $("#tray-save").title = state.like.length ? "" : "Mark indexed images “Like” first: they become the tag's examples";
  fetchMissingNames();
}

function trayItem(id, side, spec) {
  const name = nameOf(id);
  const img = el("img", { alt: "", width: 72, height: 72, loading: "lazy" });
  setImage(img, thumbnailUrl(id));
  return el("li", { className: `tray-item tray-${side}`, dataset: { id, side } }, [
    el("span", { className: "tray-thumb" }, img),
    el("span", { className: "tray-name", title: name, text: name }),
    el("span", { className: "tray-buttons" }, [
      el("button", {
        type: "button",
        className: "icon-button small",
        "aria-label": `Move ${name} to ${spec.otherVerb} this`,
        title: `Move to “${spec.otherVerb} this”`,
        text: "⇄",
        onclick: () => change(() => toggleExample(id, spec.other), `.tray-item[data-id="${id}"] button`),
      }),
      el("button", {
        type: "button",
        className: "icon-button small",
        "aria-label": `Remove ${name} from ${spec.verb} this`,
        title: "Remove from the examples",
        text: "×",
        onclick: () => change(() => toggleExample(id, side), "#tray-heading"),
      }),
    ]),
  ]);
}

function fileItem(entry, index) {
  const name = entry.file.name || "pasted image";
  return el("li", { className: "tray-item tray-like tray-file", dataset: { file: index } }, [
    el("span", { className: "tray-thumb" }, el("img", { alt: "", width: 72, height: 72, src: entry.url })),
    el("span", { className: "tray-name", title: `${name} (your image, not indexed)`, text: `${name} (yours)` }),
    el("span", { className: "tray-buttons" }, [
      el("button", {
        type: "button",
        className: "icon-button small",
        "aria-label": `Remove ${name} from more like this`,
        title: "Remove from the examples",
        text: "×",
        onclick: () =>
          change(() => {
            const [gone] = state.likeFiles.splice(index, 1);
            URL.revokeObjectURL(gone.url);
          }, "#tray-heading"),
      }),
    ]),
  ]);
}

// Apply a change, re-rank, and keep the keyboard focus somewhere sensible in the tray.
function change(apply, focusSelector) {
  apply();
  onChange();
  const target = (hasExamples() && $(focusSelector)) || (hasExamples() ? $("#tray-heading") : $("#file-input"));
  target?.focus();
}

async function fetchMissingNames() {
  for (const id of [...state.like, ...state.unlike]) {
    if (names.has(id)) continue;
    names.set(id, `image ${id}`); // asked once
    try {
      const meta = await api(`/images/${id}`);
      rememberName(id, meta.path);
      for (const item of document.querySelectorAll(`.tray-item[data-id="${id}"]`)) {
        // The names in the buttons' labels too; a focused button stays focused.
        const focused = [...item.querySelectorAll("button")].indexOf(document.activeElement);
        const fresh = trayItem(id, item.dataset.side, SIDES[item.dataset.side]);
        item.replaceWith(fresh);
        if (focused >= 0) fresh.querySelectorAll("button")[focused].focus();
      }
    } catch {
      /* the search says what is wrong with an unknown id */
    }
  }
}

// `changed()` re-runs the search; `saveAsTag()` opens the dialog.
export function initTray({ changed, saveAsTag }) {
  onChange = changed;
  for (const radio of document.querySelectorAll('#tray input[name="strategy"]')) {
    radio.addEventListener("change", () => {
      if (!radio.checked) return;
      state.strategy = radio.value;
      onChange();
    });
  }
  $("#tray-file").addEventListener("change", (event) => {
    const file = event.target.files && event.target.files[0];
    event.target.value = "";
    if (!file || (file.type && !file.type.startsWith("image/"))) return;
    state.likeFiles = [...state.likeFiles, { file, url: URL.createObjectURL(file) }];
    onChange();
  });
  $("#tray-clear").addEventListener("click", () =>
    change(() => {
      state.like = [];
      state.unlike = [];
      for (const { url } of state.likeFiles) URL.revokeObjectURL(url);
      state.likeFiles = [];
    }, "#file-input"),
  );
  $("#tray-save").addEventListener("click", saveAsTag);
}
