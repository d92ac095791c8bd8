// Training a head and changing its current version, with progress. Small collections answer
// when done (200); large ones answer 202 at once and re-tag in the background, and the page
// polls GET /heads/{name}/training until the work is done or failed.
import { ApiError, errorMessage, headUrl, request } from "./api.js";
import { $, fmtNumber } from "./dom.js";
import { refreshTags } from "./facets.js";

const POLL_MS = 500;
let token = 0; // a newer job, or leaving the editor, stops an older poll

function show(state, text, progress = null) {
  const root = $("#view-head");
  root.dataset.training = state; // "", "running", "done" or "failed" (the tests read it too)
  const bar = $("#head-progress-bar");
  bar.hidden = state !== "running";
  if (progress && progress.total > 0) {
    bar.max = progress.total;
    bar.value = progress.done;
  } else {
    bar.removeAttribute("value"); // indeterminate: training itself, before the re-tagging
  }
  $("#head-progress-text").textContent = text;
  $("#head-progress").classList.toggle("error", state === "failed");
}

export function clearProgress() {
  token += 1;
  show("", "");
}

function progressText(job) {
  const { done, total } = job.progress || {};
  const what = job.action === "train" ? "Training" : `Making version ${job.action.split(" ")[1]} current`;
  if (!total) return `${what}…`;
  return `${what}: re-tagged ${fmtNumber(done)} of ${fmtNumber(total)} images.`;
}

function finishedText(job) {
  const { done, total } = job.progress || {};
  const tagged = total ? ` Re-tagged ${fmtNumber(done)} of ${fmtNumber(total)} images.` : "";
  return `${job.action === "train" ? "Trained" : `Version ${job.action.split(" ")[1]} is current`}.${tagged}`;
}

// Follows the job to its end even when the person left the editor meanwhile (the search page's
// filters still get the new tags); only the editor that started it shows its progress.
async function poll(name, mine) {
  for (;;) {
    const response = await request(headUrl(name, "/training"));
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    const job = await response.json();
    const shown = mine === token;
    if (job.state === "done") {
      refreshTags();
      if (!shown) return null;
      show("done", finishedText(job), job.progress);
      return job.report;
    }
    if (job.state === "failed") {
      if (!shown) return null;
      throw new ApiError(422, job.error || "The training failed.");
    }
    if (shown) show("running", progressText(job), job.progress);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// POST `path` and follow it to the end; resolves with the report (null if superseded).
async function run(name, path, startText) {
  const mine = ++token;
  show("running", startText);
  try {
    const response = await request(headUrl(name, path), { method: "POST" });
    if (response.status === 200) {
      refreshTags(); // the search page's filters show the new tags without a reload
      if (mine !== token) return null;
      const report = await response.json();
      show("done", doneText(report));
      return report;
    }
    if (response.status === 202) return await poll(name, mine);
    const message = await errorMessage(response);
    if (response.status === 409) {
      // One is running already (another tab, or before a reload): follow it instead.
      const report = await poll(name, mine).catch((error) => {
        throw error.status === 404 ? new ApiError(409, message) : error;
      });
      return report;
    }
    throw new ApiError(response.status, message);
  } catch (error) {
    if (mine === token) show("failed", error.message);
    throw error;
  }
}

function doneText(report) {
  if (typeof report.version === "number") return `Version ${report.version} is current. Re-tagged ${fmtNumber(report.tagged)} images.`;
  const seconds = report.seconds?.total;
  return `Trained on ${fmtNumber(report.examples)} examples${typeof seconds === "number" ? ` in ${seconds.toFixed(1)} s` : ""}; ${fmtNumber(report.tagged)} tags written.`;
}

export function train(name, examples) {
  return run(name, "/train", `Training on ${fmtNumber(examples)} examples…`);
}

export function activate(name, number) {
  return run(name, `/versions/${number}/activate`, `Making version ${number} current…`);
}
