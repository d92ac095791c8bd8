// What the search page shows, and how it reads from and writes to the URL:
//   /?similar=42&tag=garment:tops&not_tag=imagenet:jersey&min_score=0.5&k=48      one indexed image
//   /?like=12&like=40&unlike=7&strategy=best_score&any_tag=...                     several examples
// An uploaded image (the query, or an example in the tray) lives in memory only: a URL cannot
// hold it, so only the rest of the search survives a reload.
import { clamp, unique } from "./dom.js";

export const DEFAULT_K = 24;
export const FILTER_KINDS = ["tag", "any_tag", "not_tag"];
const STRATEGIES = ["average", "best_score"];
const MAX_EXAMPLES = 50; // of each kind; the server's limit

export const state = {
  similar: null, // id of an indexed image ("More like this"), kept in the URL
  file: null, // an uploaded File as the query: in memory only
  fileUrl: null,
  like: [], // ids of the examples to look like ("more like this"), kept in the URL
  unlike: [], // ids of the examples not to look like ("less like this")
  likeFiles: [], // uploaded examples: [{ file, url }], in memory only
  strategy: "average",
  tag: [],
  any_tag: [],
  not_tag: [],
  minScore: 0,
  k: DEFAULT_K,
};

const ids = (values) => unique(values.filter((v) => /^\d+$/.test(v))).slice(0, MAX_EXAMPLES);

export function readSearchParams(params) {
  const similar = params.get("similar");
  state.similar = similar && /^\d+$/.test(similar) ? similar : null;
  const like = ids(params.getAll("like"));
  const unlike = ids(params.getAll("unlike"));
  const sameExamples =
    like.join() === state.like.join() && unlike.join() === state.unlike.join() && !state.similar && !state.file;
  if (!sameExamples) clearLikeFiles(); // an uploaded example belongs to the tray it was added to
  state.like = like;
  state.unlike = unlike;
  if (state.similar || hasExamples()) clearFile();
  const strategy = params.get("strategy");
  state.strategy = STRATEGIES.includes(strategy) ? strategy : "average";
  for (const kind of FILTER_KINDS) state[kind] = unique(params.getAll(kind).filter(Boolean));
  const minScore = Number.parseFloat(params.get("min_score"));
  state.minScore = Number.isFinite(minScore) ? clamp(minScore, 0, 1) : 0;
  const k = Number.parseInt(params.get("k"), 10);
  state.k = k >= 1 && k <= 1000 ? k : DEFAULT_K;
}

export function hasExamples() {
  return state.like.length + state.unlike.length + state.likeFiles.length > 0;
}

export function filterParams() {
  const params = new URLSearchParams();
  for (const kind of FILTER_KINDS) for (const term of state[kind]) params.append(kind, term);
  if (state.minScore > 0) params.set("min_score", String(Math.round(state.minScore * 100) / 100));
  return params;
}

export function filterCount() {
  return FILTER_KINDS.reduce((n, kind) => n + state[kind].length, 0) + (state.minScore > 0 ? 1 : 0);
}

// The page's own URL for the search it shows.
export function searchUrl() {
  const query = new URLSearchParams();
  if (state.similar) query.set("similar", state.similar);
  for (const id of state.like) query.append("like", id);
  for (const id of state.unlike) query.append("unlike", id);
  if (hasExamples() && state.strategy !== "average") query.set("strategy", state.strategy);
  for (const [name, value] of filterParams()) query.append(name, value);
  if (state.k !== DEFAULT_K) query.set("k", String(state.k));
  const text = query.toString();
  return text ? `/?${text}` : "/";
}

// The API's query string for several examples: POST /search?positive=..&negative=..&strategy=..
export function examplesParams() {
  const params = filterParams();
  for (const id of state.like) params.append("positive", id);
  for (const id of state.unlike) params.append("negative", id);
  params.set("strategy", state.strategy);
  params.set("k", String(state.k));
  return params;
}

export function clearFile() {
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = null;
  state.fileUrl = null;
}

export function clearLikeFiles() {
  for (const { url } of state.likeFiles) URL.revokeObjectURL(url);
  state.likeFiles = [];
}

// The query so far becomes the first example: "more like this one, and like that one too".
function startExamples() {
  if (hasExamples()) return;
  if (state.similar) state.like = [state.similar];
  else if (state.file) {
    state.likeFiles = [{ file: state.file, url: state.fileUrl }];
    state.file = null; // its object URL now belongs to the tray
    state.fileUrl = null;
  }
  state.similar = null;
}

// Mark an indexed image as an example ("like" or "unlike"), or unmark it; one side at a time.
export function toggleExample(id, side) {
  id = String(id);
  startExamples();
  const wasOn = state[side].includes(id);
  state.like = state.like.filter((x) => x !== id);
  state.unlike = state.unlike.filter((x) => x !== id);
  if (!wasOn) state[side] = [...state[side], id].slice(-MAX_EXAMPLES);
}

export function exampleSide(id) {
  id = String(id);
  return state.like.includes(id) ? "like" : state.unlike.includes(id) ? "unlike" : null;
}
