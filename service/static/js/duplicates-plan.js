// The plan the duplicates view collects: groups chosen with "Add to plan", one set per tier (a
// plan file names one tier), kept in localStorage so that it survives reloads and paging. Only
// member ids are kept; the server works out what to remove when the plan is downloaded, so a
// "Keep this one" made after adding a group is what the plan keeps.
import { api, json } from "./api.js";

const STORAGE = "lookalike.duplicatesPlan";
let memory = {}; // when storage is disabled: the plan lives as long as this page

function load() {
  try {
    const value = JSON.parse(localStorage.getItem(STORAGE) || "{}");
    return value && typeof value === "object" ? value : {};
  } catch {
    return memory;
  }
}

function save(plan) {
  memory = plan;
  try {
    localStorage.setItem(STORAGE, JSON.stringify(plan));
  } catch {
    /* storage disabled or full: kept in memory */
  }
}

// A group is known by its smallest member id: stable while the group keeps that member.
export const groupKey = (group) => String(Math.min(...group.members.map((m) => m.id)));

export function planGroups(tier) {
  return load()[tier] || {};
}

export function inPlan(tier, group) {
  return groupKey(group) in planGroups(tier);
}

export function togglePlan(tier, group) {
  const plan = load();
  const groups = { ...(plan[tier] || {}) };
  const key = groupKey(group);
  if (key in groups) delete groups[key];
  else groups[key] = group.members.map((m) => m.id);
  plan[tier] = groups;
  save(plan);
  return key in groups;
}

export function clearPlan(tier) {
  const plan = load();
  delete plan[tier];
  save(plan);
}

// The plan file `lookalike duplicates apply` reads, from the server (POST /duplicates/plan reads
// only), saved through a temporary link: {"tier", "remove": [...]}.
export async function downloadPlan(tier) {
  const imageIds = Object.values(planGroups(tier)).flat();
  const plan = await api("/duplicates/plan", json("POST", { tier, image_ids: imageIds }));
  const blob = new Blob([JSON.stringify(plan, null, 2) + "\n"], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const name = `lookalike-plan-${tier}.json`;
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000); // the download has started long before
  return { name, plan };
}
