// "Label next": the images the server suggests labelling (GET /heads/{name}/suggestions), each
// with its reason and one button per label. Keys: 1–9 give the focused suggestion (or the first)
// the Nth label, x skips it. A labelled or skipped suggestion leaves the grid; the next one takes
// the focus, so a person can label a batch from the keyboard alone.
import { api, headUrl } from "./api.js";
import { $, $$, el, isPlainKey, plural } from "./dom.js";
import { openDetail } from "./detail.js";
import { head, labelsAfterClick, labelsInOrder, setLabels } from "./head-state.js";
import { setImage, thumbnailUrl } from "./images.js";
import { currentView } from "./router.js";

const BATCH = 12;
let seq = 0;
let skipped = new Set(); // ids skipped in this visit: not offered again until "More suggestions"

const listEl = () => $("#suggestions");

function say(text, isError = false) {
  const status = $("#suggestions-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

export function clearSuggestions(message = "") {
  seq += 1;
  listEl().replaceChildren();
  say(message);
  $("#suggestions-more").hidden = true;
}

export async function loadSuggestions({ fresh = false } = {}) {
  const mine = ++seq;
  if (fresh) skipped = new Set();
  const list = listEl();
  list.setAttribute("aria-busy", "true");
  say("Finding images worth labelling…");
  try {
    const answer = await api(headUrl(head.name, `/suggestions?n=${Math.min(100, BATCH + skipped.size)}`));
    if (mine !== seq) return;
    const picks = answer.suggestions.filter((s) => !skipped.has(String(s.image_id))).slice(0, BATCH);
    list.replaceChildren(...picks.map((s) => suggestionCard(s)));
    say(picks.length ? `${plural(picks.length, "suggestion")}.` : "Nothing left to suggest: every image is labelled or skipped.");
    $("#suggestions-more").hidden = false;
  } catch (error) {
    if (mine !== seq) return;
    list.replaceChildren();
    say(error.message, true);
  } finally {
    if (mine === seq) list.removeAttribute("aria-busy");
  }
}

export function labelButtons(id, { onLabelled } = {}) {
  const current = head.examples.get(String(id)) || [];
  return labelsInOrder().map((label, i) =>
    el(
      "button",
      {
        type: "button",
        className: "label-btn",
        "aria-label": label,
        "aria-pressed": String(current.includes(label)),
        "aria-keyshortcuts": i < 9 ? String(i + 1) : null,
        title: i < 9 ? `Label “${label}” (key ${i + 1})` : `Label “${label}”`,
        dataset: { label },
        onclick: () => onLabelled(label),
      },
      [i < 9 ? el("kbd", { "aria-hidden": "true", text: String(i + 1) }) : null, ` ${label}`],
    ),
  );
}

function suggestionCard(suggestion) {
  const id = String(suggestion.image_id);
  const img = el("img", { alt: `Image ${id}`, loading: "lazy", decoding: "async", width: 256, height: 256 });
  setImage(img, thumbnailUrl(id));
  const card = el("li", { className: "card suggestion", dataset: { id, reason: suggestion.reason } });
  const buttons = el("div", { className: "label-buttons", role: "group", "aria-label": `Label image ${id}`, dataset: { labels: JSON.stringify(labelsInOrder()) } }, [
    ...labelButtons(id, { onLabelled: (label) => label && labelCard(card, label) }),
    el("button", {
      type: "button",
      className: "button skip-btn",
      "aria-keyshortcuts": "x",
      title: head.type === "multilabel" ? "Done with this image (key x)" : "Skip this image (key x)",
      text: head.type === "multilabel" ? "Next" : "Skip",
      onclick: () => skipCard(card),
    }),
  ]);
  card.append(
    el("button", { type: "button", className: "card-open", "aria-label": `Image ${id}, ${suggestion.reason}: open details`, onclick: () => openDetail(id, null) }, img),
    el("div", { className: "card-body" }, [
      el("span", { className: `badge reason reason-${suggestion.reason.replace(/\s+/g, "-")}`, text: suggestion.reason }),
      el("p", { className: "suggestion-detail", text: suggestion.detail }),
      buttons,
    ]),
  );
  return card;
}

// The card leaves; the focus, if it was in the grid, goes to the card that takes its place.
function removeCard(card, message) {
  const cards = $$(".suggestion", listEl());
  const index = cards.indexOf(card);
  const hadFocus = card.contains(document.activeElement);
  card.remove();
  const rest = $$(".suggestion", listEl());
  say(`${message} ${rest.length ? `${plural(rest.length, "suggestion")} left.` : "Loading more…"}`);
  if (!rest.length) {
    loadSuggestions().then(() => hadFocus && $(".suggestion .card-open", listEl())?.focus());
    if (hadFocus) $("#suggestions-heading").focus();
    return;
  }
  if (hadFocus) $(".card-open", rest[Math.min(index, rest.length - 1)]).focus();
}

async function labelCard(card, label) {
  if (card.dataset.busy) return;
  const id = card.dataset.id;
  const labels = labelsAfterClick(id, label);
  card.dataset.busy = "1";
  card.setAttribute("aria-busy", "true");
  try {
    await setLabels(id, labels);
  } catch (error) {
    say(`Image ${id} could not be labelled: ${error.message}`, true);
    return;
  } finally {
    delete card.dataset.busy;
    card.removeAttribute("aria-busy");
  }
  if (head.type === "multilabel") {
    for (const button of $$(".label-btn", card)) button.setAttribute("aria-pressed", String(labels.includes(button.dataset.label)));
    say(`Image ${id}: ${labels.length ? labels.join(", ") : "no label"}.`);
  } else {
    removeCard(card, `Image ${id} labelled “${label}”.`);
  }
}

function skipCard(card) {
  if (card.dataset.busy) return;
  skipped.add(card.dataset.id);
  removeCard(card, head.type === "multilabel" ? `Done with image ${card.dataset.id}.` : `Skipped image ${card.dataset.id}.`);
}

function onKey(event) {
  if (currentView() !== "head" || !isPlainKey(event) || document.querySelector("dialog[open]")) return;
  const key = event.key.toLowerCase();
  const index = /^[1-9]$/.test(key) ? Number(key) - 1 : null;
  if (index === null && key !== "x") return;
  const card = document.activeElement?.closest?.("#suggestions .suggestion") || $(".suggestion", listEl());
  if (!card) return;
  event.preventDefault();
  if (key === "x") return skipCard(card);
  const label = labelsInOrder()[index];
  if (label) labelCard(card, label);
}

// Re-drawn label buttons after the labels changed (a new label, a first example of the other side).
export function refreshLabelButtons() {
  const labels = JSON.stringify(labelsInOrder());
  for (const card of $$(".suggestion", listEl())) {
    const group = $(".label-buttons", card);
    if (group.dataset.labels === labels) continue; // unchanged: the focus stays where it is
    group.dataset.labels = labels;
    const skip = $(".skip-btn", group);
    group.replaceChildren(...labelButtons(card.dataset.id, { onLabelled: (label) => labelCard(card, label) }), skip);
  }
}

export function initSuggestions() {
  document.addEventListener("keydown", onKey);
  $("#suggestions-more").addEventListener("click", () => loadSuggestions({ fresh: true }));
}
