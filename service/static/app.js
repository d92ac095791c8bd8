// lookalike's web page: search by an image or by several examples, filter by tags, browse
// neighbours, teach heads by example, review duplicate groups, and see the heads and the index
// status. Plain JavaScript modules (service/static/js/) against the HTTP API of the same server;
// no framework, no build step, no network beyond this origin.
import { setKey, getKey } from "./js/api.js";
import { $ } from "./js/dom.js";
import { initDuplicates } from "./js/duplicates.js";
import { initHeadEditor } from "./js/head-editor.js";
import { initHeadForm } from "./js/head-form.js";
import { initHeads } from "./js/heads.js";
import { forgetBlobs } from "./js/images.js";
import { route, wireLinks } from "./js/router.js";
import { initSearch } from "./js/search.js";
import { initStatus } from "./js/status.js";

setKey(getKey());
$("#forget-key").addEventListener("click", () => {
  setKey("");
  forgetBlobs();
});
initHeadForm();
initSearch();
initHeads();
initHeadEditor();
initDuplicates();
initStatus();
wireLinks();
route();
