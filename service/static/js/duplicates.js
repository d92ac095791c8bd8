// The duplicates view: the groups of one tier (identical, copy, near), a page at a time as the
// server pages them, each group side by side with its links' scores and the member the keep rule
// picks (and why). Per group: "Keep this one" on a member, "Not duplicates", "Add to plan". Only
// decisions are stored; files are never moved or deleted from here (see duplicates-plan.js).
import { api, json } from "./api.js";
import { openDetail } from "./detail.js";
import { $, $$, basename, el, fmtBytes, fmtScore, plural } from "./dom.js";
import { clearPlan, downloadPlan, groupKey, inPlan, planGroups, togglePlan } from "./duplicates-plan.js";
import { setThumbnail } from "./images.js";
import { navigate, registerView } from "./router.js";

export const TIERS = ["identical", "copy", "near"];
const TIER_NAMES = { identical: "Identical files", copy: "Copies", near: "Near-duplicates" };
const SCORE_TITLES = {
  identical: "Same content hash: the same bytes",
  copy: "Correlation of the 16×16 pixel signatures (the same frame)",
  near: "Cosine similarity of the embeddings (the same scene)",
};
const PAGE_SIZE = 20;
const DISTINCT_MAX = 200; // the server's limit on one "not duplicates" decision

let seq = 0;
let view = null; // { tier, page, pageSize, resolved, image } from the URL
let refocus = null; // after a group left the list: the index of the group to focus instead

// The view's URL; `changes` override the current state (page back to 1 unless given).
function viewUrl(changes = {}) {
  const next = { ...view, page: 1, ...changes };
  const params = new URLSearchParams({ view: "duplicates", tier: next.tier });
  if (next.image) params.set("image", next.image);
  if (next.resolved) params.set("resolved", "1");
  if (next.page > 1) params.set("page", String(next.page));
  if (next.pageSize !== PAGE_SIZE) params.set("page_size", String(next.pageSize));
  return `/?${params}`;
}

function readParams(params) {
  const int = (name, fallback) => {
    const value = Number.parseInt(params.get(name) || "", 10);
    return Number.isFinite(value) && value >= 1 ? value : fallback;
  };
  const tier = TIERS.includes(params.get("tier")) ? params.get("tier") : "copy";
  const image = /^\d+$/.test(params.get("image") || "") ? params.get("image") : null;
  const resolved = ["1", "true"].includes(params.get("resolved"));
  return { tier, page: int("page", 1), pageSize: Math.min(int("page_size", PAGE_SIZE), 200), resolved, image };
}

// Where a search result's badge leads: that image's group at the badge's tier.
export const groupUrl = (imageId, tier) => `/?view=duplicates&tier=${tier}&image=${imageId}`;

export function badgeText({ tier, size }) {
  if (tier === "identical") return `${size} identical`;
  return tier === "copy" ? `${size} copies` : `near ×${size}`;
}

function setStatus(text, isError = false) {
  const status = $("#dup-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function setState(value) {
  document.body.dataset.duplicates = value; // "loading", "done" or "error" (also handy for tests)
}

function syncControls() {
  for (const link of $$(".dup-tiers a")) {
    link.href = viewUrl({ tier: link.dataset.tier });
    if (link.dataset.tier === view.tier) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("#dup-resolved").checked = view.resolved;
  $("#dup-resolved").disabled = Boolean(view.image); // one image's group is shown resolved or not
  renderPlanBar();
}

function renderPlanBar() {
  const groups = Object.values(planGroups(view.tier));
  const images = new Set(groups.flat()).size;
  $("#dup-plan-count").textContent = groups.length
    ? `Plan (${TIER_NAMES[view.tier].toLowerCase()}): ${plural(groups.length, "group")}, ${plural(images, "image")}`
    : "No group in the plan: “Add to plan” collects groups to download as one plan.";
  $("#dup-plan-download").disabled = !groups.length;
  $("#dup-plan-clear").hidden = !groups.length;
}

async function render() {
  const mine = ++seq;
  const root = $("#dup-groups");
  setState("loading");
  root.setAttribute("aria-busy", "true");
  try {
    let groups;
    let total;
    if (view.image) {
      const data = await api(`/images/${view.image}/duplicates?tier=${view.tier}`);
      groups = data.group ? [data.group] : [];
      total = groups.length;
    } else {
      const params = new URLSearchParams({ tier: view.tier, page: String(view.page), page_size: String(view.pageSize) });
      if (view.resolved) params.set("resolved", "true");
      const data = await api(`/duplicates?${params}`);
      groups = data.groups;
      total = data.total;
    }
    if (mine !== seq) return;
    const pages = Math.max(1, Math.ceil(total / view.pageSize));
    if (!view.image && view.page > pages) {
      // The last groups of the last page were resolved meanwhile: show the page that exists now.
      navigate(viewUrl({ page: pages }), { replace: true, focus: false });
      return;
    }
    root.replaceChildren(...groups.map((group) => groupCard(group)));
    renderSummary(total, pages);
    setState("done");
    restoreFocus();
  } catch (error) {
    if (mine !== seq) return;
    root.replaceChildren();
    $("#dup-pager").hidden = true;
    setStatus(error.status === 404 && view.image ? `Image ${view.image} is not in the index.` : error.message, true);
    setState("error");
  } finally {
    if (mine === seq) root.removeAttribute("aria-busy");
  }
}

function renderSummary(total, pages) {
  const tierName = TIER_NAMES[view.tier].toLowerCase();
  if (view.image) {
    setStatus(total ? `The group of image ${view.image} (${tierName}).` : `Image ${view.image} is in no group of ${tierName}.`);
    $("#dup-groups").prepend(
      el("p", { className: "back" }, el("a", { href: viewUrl({ image: null }), "data-nav": "", text: `All groups of ${tierName}` })),
    );
    $("#dup-pager").hidden = true;
    return;
  }
  const resolved = view.resolved ? ", resolved ones included" : "";
  setStatus(total ? `${plural(total, "group")} of ${tierName}${resolved}, largest first.` : `No group of ${tierName}${resolved}.`);
  $("#dup-pager").hidden = pages <= 1;
  $("#dup-page").textContent = `Page ${view.page} of ${pages}`;
  $("#dup-prev").disabled = view.page <= 1;
  $("#dup-next").disabled = view.page >= pages;
}

// A group that left the list hands the focus to the one now in its place (or to the heading).
function restoreFocus() {
  if (refocus === null) return;
  const index = refocus;
  refocus = null;
  const headings = $$("#dup-groups .dup-group h2");
  (headings[Math.min(index, headings.length - 1)] || $("#duplicates-heading")).focus();
}

function groupCard(group) {
  const key = groupKey(group);
  const headingId = `dup-group-${key}`;
  const names = new Map(group.members.map((m) => [m.id, basename(m.path)]));
  const card = el("article", {
    className: "panel dup-group",
    "aria-labelledby": headingId,
    dataset: { key, tier: group.tier, keep: group.keep },
  });
  const kept = group.members.find((m) => m.id === group.keep);
  card.append(
    el("div", { className: "dup-group-title" }, [
      el("h2", { id: headingId, tabindex: "-1" }, [
        `${TIER_NAMES[group.tier]}: ${plural(group.size, "image")}`,
        group.resolved ? el("span", { className: "badge", text: "resolved", title: "A person chose which one to keep" }) : null,
      ]),
      el("p", { className: "dup-reason" }, [
        "Keeps ",
        el("strong", { title: kept ? kept.path : "", text: names.get(group.keep) || `image ${group.keep}` }),
        ": ",
        el("span", { className: "dup-reason-text", text: group.keep_reason }),
      ]),
    ]),
    el("ul", { className: "dup-members", "aria-label": `Members of ${plural(group.size, "image")}` }, group.members.map((m) => memberCard(card, group, m))),
    linksList(group, names),
    groupActions(card, group),
  );
  return card;
}

function memberCard(card, group, member) {
  const name = basename(member.path);
  const img = el("img", { alt: name, loading: "lazy", decoding: "async", width: 200, height: 200 });
  setThumbnail(img, member);
  const dims = member.width && member.height ? `${member.width} × ${member.height}` : "size unknown";
  const facts = [dims, fmtBytes(member.size), member.format || "format unknown"].join(" · ");
  const choice = member.keep
    ? el("p", { className: "dup-kept", title: group.keep_reason }, [
        el("span", { className: "badge badge-keep", text: group.keep_reason === "chosen by you" ? "Kept: chosen by you" : "Kept" }),
        group.keep_reason === "chosen by you"
          ? el("button", {
              type: "button",
              className: "link-button dup-forget",
              text: "Let the rule decide",
              onclick: () => forgetChoice(card, member),
            })
          : null,
      ])
    : el("button", {
        type: "button",
        className: "button dup-keep",
        "aria-label": `Keep this one: ${name}`,
        text: "Keep this one",
        onclick: () => keepThis(card, member),
      });
  return el("li", { className: `dup-member${member.keep ? " is-kept" : ""}`, dataset: { id: member.id } }, [
    el(
      "button",
      { type: "button", className: "card-open", "aria-label": `${name}: open details`, onclick: () => openDetail(member.id, null) },
      img,
    ),
    el("div", { className: "card-body" }, [
      el("span", { className: "dup-name", title: member.path, text: name }),
      el("span", { className: "dup-path", text: member.path }),
      el("span", { className: "dup-facts", text: facts }),
      choice,
    ]),
  ]);
}

function linksList(group, names) {
  const name = (id) => names.get(id) || `image ${id}`;
  const items = group.links.map((link) =>
    el("li", { dataset: { a: link.a, b: link.b } }, [
      el("span", { className: "dup-link-pair", text: `${name(link.a)} ↔ ${name(link.b)}` }),
      el("span", { className: `badge dup-link-tier tier-${link.tier}`, text: link.tier }),
      el("span", { className: "score", title: SCORE_TITLES[link.tier], text: fmtScore(link.score) }),
    ]),
  );
  // Small groups show their scores right away; a large one keeps them folded.
  return el("details", { className: "dup-links", open: group.links.length <= 6 }, [
    el("summary", { text: `Scores of its ${plural(group.links.length, "link")}` }),
    el("ul", {}, items),
  ]);
}

function groupActions(card, group) {
  const tooMany = group.members.length > DISTINCT_MAX;
  return el("div", { className: "dup-actions" }, [
    el("button", {
      type: "button",
      className: "button dup-distinct",
      disabled: tooMany,
      title: tooMany
        ? `At most ${DISTINCT_MAX} images in one decision: use \`lookalike duplicates distinct\``
        : "These images are not duplicates of one another: the group leaves the list, and stays apart after re-scans",
      text: "Not duplicates",
      onclick: () => notDuplicates(card, group),
    }),
    el("button", {
      type: "button",
      className: "button dup-plan-toggle",
      "aria-pressed": String(inPlan(view.tier, group)),
      title: "Collect this group into the plan to download (its non-kept members would be moved by `apply`)",
      text: "Add to plan",
      onclick: (event) => {
        event.currentTarget.setAttribute("aria-pressed", String(togglePlan(view.tier, group)));
        renderPlanBar();
      },
    }),
  ]);
}

function replaceGroup(card, group, focusId) {
  const fresh = groupCard(group);
  card.replaceWith(fresh);
  fresh.querySelector(`.dup-member[data-id="${focusId}"] .card-open`)?.focus();
}

async function keepThis(card, member) {
  try {
    const group = await api("/duplicates/keep", json("POST", { image_id: member.id, tier: view.tier }));
    replaceGroup(card, group, member.id);
    setStatus(`Keeping ${basename(member.path)}: the group is resolved and leaves the list until a new copy joins it.`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function forgetChoice(card, member) {
  try {
    await api(`/duplicates/keep/${member.id}`, { method: "DELETE" });
    const data = await api(`/images/${member.id}/duplicates?tier=${view.tier}`);
    if (data.group) replaceGroup(card, data.group, member.id);
    setStatus("The keep rule decides again for this group.");
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function notDuplicates(card, group) {
  try {
    await api("/duplicates/distinct", json("POST", { ids: group.members.map((m) => m.id) }));
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  if (inPlan(view.tier, group)) togglePlan(view.tier, group); // nothing left to plan there
  refocus = $$("#dup-groups .dup-group").indexOf(card);
  await render();
  setStatus(`${plural(group.members.length, "image")} marked as not duplicates. ${$("#dup-status").textContent}`);
}

async function download() {
  const button = $("#dup-plan-download");
  button.disabled = true;
  try {
    const { name, plan } = await downloadPlan(view.tier);
    setStatus(
      `Downloaded ${name}: ${plural(plan.remove.length, "file")} would be moved. Nothing has moved yet: ` +
        `\`lookalike duplicates apply ${name} --move-to DIR\` does it, with an undo log.`,
    );
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    renderPlanBar();
  }
}

export function initDuplicates() {
  $("#dup-resolved").addEventListener("change", (event) => navigate(viewUrl({ resolved: event.target.checked }), { focus: false }));
  $("#dup-prev").addEventListener("click", () => navigate(viewUrl({ page: view.page - 1 }), { focus: false }));
  $("#dup-next").addEventListener("click", () => navigate(viewUrl({ page: view.page + 1 }), { focus: false }));
  $("#dup-plan-download").addEventListener("click", download);
  $("#dup-plan-clear").addEventListener("click", () => {
    clearPlan(view.tier);
    for (const toggle of $$("#dup-groups .dup-plan-toggle")) toggle.setAttribute("aria-pressed", "false");
    renderPlanBar();
  });
  // Another tab's "Add to plan" shows here too.
  window.addEventListener("storage", () => view && renderPlanBar());
  registerView("duplicates", {
    title: (params) => `${TIER_NAMES[readParams(params).tier]} · Duplicates · lookalike`,
    enter: (params) => {
      view = readParams(params);
      syncControls();
      render();
    },
  });
}
