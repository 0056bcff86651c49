// The review page: images scored by the service, thresholds per class tried on them and on the run's test
// scores, saved back; the run's report. Plain JavaScript, no library, nothing from the internet.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const state = { info: null, results: [], tests: [], thresholds: {}, saved: {} };
const $ = (id) => document.getElementById(id);

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
  if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), { status: r.status });
  return body;
}

function fmt(x, digits = 4) { return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(digits); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function status(text) { $("status").textContent = text; }

// -------------------------------------------------------------------------------------------------- thresholds
function thresholdOf(cls) {
  return cls !== null && cls in state.thresholds ? state.thresholds[cls] : null;
}
function decide(r) {  // the decision under the slider's threshold (the service's own when the class has none)
  const t = thresholdOf(r.class);
  return (t === null ? r.decision === "anomalous" : r.score >= t) ? "anomalous" : "normal";
}

function buildThresholds() {
  const body = $("threshold-table").querySelector("tbody");
  body.replaceChildren();
  for (const cls of state.info.classes) {
    const t = state.info.thresholds[cls].threshold;
    state.thresholds[cls] = t;
    state.saved[cls] = t;
    const range = el("input", { type: "range", min: "0", max: "1000", step: "1", "data-class": cls,
                                "aria-label": "threshold of " + cls });
    const value = el("input", { type: "number", class: "value", step: "any", "data-class": cls });
    range.addEventListener("input", () => { setThreshold(cls, fromSlider(cls, +range.value)); });
    value.addEventListener("change", () => { if (+value.value > 0) setThreshold(cls, +value.value); });
    const row = el("tr", { "data-class": cls },
      el("td", { text: cls }), el("td", {}, value), el("td", {}, range),
      el("td", { class: "num flagged" }), el("td", { class: "num test-flagged" }),
      el("td", { class: "num precision" }), el("td", { class: "num recall" }));
    body.append(row);
  }
  updateThresholds();
}

function scoreRange(cls) {  // the slider spans the scores seen of this class and its thresholds
  const s = state.tests.filter((r) => r.class === cls).map((r) => r.score)
    .concat(state.results.filter((r) => r.class === cls).map((r) => r.score),
            [state.saved[cls], state.thresholds[cls]]);
  let lo = Math.min(...s), hi = Math.max(...s);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  return [Math.max(lo - pad, 0), hi + pad];
}
function fromSlider(cls, v) { const [lo, hi] = scoreRange(cls); return lo + (hi - lo) * v / 1000; }
function toSlider(cls, t) { const [lo, hi] = scoreRange(cls); return Math.round(1000 * (t - lo) / (hi - lo)); }

function setThreshold(cls, t) {
  state.thresholds[cls] = t;
  $("saved").textContent = "";
  updateThresholds();
  renderCards();
}

function updateThresholds() {
  for (const row of $("threshold-table").querySelectorAll("tbody tr")) {
    const cls = row.dataset.class, t = state.thresholds[cls];
    row.querySelector("input[type=range]").value = toSlider(cls, t);
    const value = row.querySelector("input.value");
    if (document.activeElement !== value) value.value = t.toPrecision(6);
    const mine = state.results.filter((r) => r.class === cls);
    row.querySelector(".flagged").textContent = `${mine.filter((r) => r.score >= t).length} of ${mine.length}`;
    const tests = state.tests.filter((r) => r.class === cls);
    let flagged = "–", precision = "–", recall = "–";
    if (tests.length) {
      const hit = tests.filter((r) => r.score >= t), tp = hit.filter((r) => r.label === 1).length;
      const positives = tests.filter((r) => r.label === 1).length;
      flagged = `${hit.length} of ${tests.length}`;
      precision = hit.length ? (tp / hit.length).toFixed(3) : "–";
      recall = positives ? (tp / positives).toFixed(3) : "–";
    }
    row.querySelector(".test-flagged").textContent = flagged;
    row.querySelector(".precision").textContent = precision;
    row.querySelector(".recall").textContent = recall;
  }
}

async function saveThresholds() {
  const changed = Object.fromEntries(Object.entries(state.thresholds).filter(([c, t]) => t !== state.saved[c]));
  if (!Object.keys(changed).length) { $("saved").textContent = "no threshold changed"; return; }
  try {
    const answer = await api("thresholds", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify({ thresholds: changed }) });
    for (const [cls, p] of Object.entries(answer.thresholds)) { state.saved[cls] = p.threshold; }
    $("saved").className = "";
    $("saved").textContent = "saved to " + answer.path;
  } catch (e) {
    $("saved").className = "error";
    $("saved").textContent = "not saved: " + e.message;
  }
}

// -------------------------------------------------------------------------------------------------- images
const IMAGE_NAME = /\.(png|jpe?g|tiff?|bmp)$/i;
function imageFiles(list) {
  return Array.from(list).filter((f) => IMAGE_NAME.test(f.name));
}
function reviewFile(name) {  // an image of the service's --review folder
  return fetch(withToken("review_images/" + name.split("/").map(encodeURIComponent).join("/")))
    .then((r) => { if (!r.ok) throw new Error(`cannot read ${name} from the service (${r.status})`); return r.blob(); })
    .then((b) => new File([b], name));
}

async function score(files) {
  const limit = state.info.limits.max_images;
  for (let i = 0; i < files.length; i += limit) {
    const chunk = files.slice(i, i + limit), form = new FormData();
    for (const f of chunk) form.append("image", f, f.webkitRelativePath || f.name);  // a folder's: with its path
    status(`scoring ${Math.min(i + limit, files.length)} of ${files.length} images ...`);
    try {
      const answer = await api("predict?overlay=true", { method: "POST", body: form });
      state.results.push(...answer.images);
    } catch (e) {
      for (const f of chunk) state.results.push({ name: f.name, error: e.message });
    }
    renderCards();
    updateThresholds();
  }
  status(`${state.results.length} images scored`);
}

// A run of pairs (GET /info's `parts`): the service pairs a folder's files by their names (POST /pairs, the rule
// predict.py follows), then each pair is one /predict request, several in flight so that the service batches them.
const PAIR_TEXT = {
  rgbd: { second: "depth (TIFF: xyz or z)", accept: ".tif,.tiff,image/tiff",
          hint: "This run takes pairs, RGB + depth: drop a folder in MVTec 3D-AD's layout (<kind>/rgb/<n>.png beside " +
                "<kind>/xyz/<n>.tiff or <kind>/z/<n>.tiff; the gt/ masks are skipped), or choose one pair below. " +
                "Each pair is scored by the service, decided with its class's threshold." },
  rgbir: { second: "infrared image", accept: "image/png,image/jpeg,image/tiff,image/bmp",
           hint: "This run takes pairs, RGB + infrared: drop a folder in MulSen-AD's layout (.../RGB/.../<n>.png " +
                 "beside .../Infrared/.../<n>.png; the GT/ folders are skipped), or choose one pair below. " +
                 "Each pair is scored by the service, decided with its class's threshold." },
};
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

function setUpPairs(info) {
  const text = PAIR_TEXT[info.modality];
  $("drop-what").textContent = "Drop a folder of pairs here";
  $("pick-files-button").hidden = true;
  $("drop-hint").textContent = text.hint;
  $("second-part").textContent = text.second;
  $("pick-second").accept = text.accept;
  $("pair-form").hidden = false;
  $("cards").classList.add("pairs");
}

async function scorePair(rgb, other) {  // one pair's result, or a card's error; a busy service is asked again
  const [first, second] = state.info.parts, form = new FormData();
  form.append(first, rgb, rgb.name);
  form.append(second, other, other.name);
  for (let attempt = 0; ; attempt++) {
    try {
      return (await api("predict?overlay=true", { method: "POST", body: form })).images[0];
    } catch (e) {
      if (e.status === 503 && attempt < 30) { await sleep(1000); continue; }
      return { name: rgb.name, error: e.message };
    }
  }
}

let renderDue = false;
function renderSoon() {  // results arriving one by one: the cards drawn at most 5 times a second
  if (renderDue) return;
  renderDue = true;
  setTimeout(() => { renderDue = false; renderCards(); updateThresholds(); }, 200);
}

async function scorePairs(items) {  // items: {path, file}, file a File or a function giving one (--review)
  const files = items.filter((i) => IMAGE_NAME.test(i.path)), second = state.info.parts[1];
  let answer;
  try {
    answer = await api("pairs", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify({ files: files.map((i) => i.path) }) });
  } catch (e) {
    status("cannot pair the files: " + e.message);
    return;
  }
  for (const u of answer.unpaired) state.results.push({ name: u.rgb, error: u.error });
  renderCards();
  const n = answer.unpaired.length;
  const missing = n ? `; ${n} RGB image${n > 1 ? "s" : ""} without ${n > 1 ? "their" : "its"} ${second}` : "";
  if (!answer.pairs.length) {
    status(`no pair among the ${files.length} images${missing}: drop a folder in the dataset's layout (see above), ` +
      "or choose one pair");
    return;
  }
  const byPath = new Map(files.map((i) => [i.path, i]));
  const load = async (path) => {
    const f = byPath.get(path).file;
    return f instanceof File ? new File([f], path, { type: f.type }) : f();
  };
  let next = 0, done = 0;
  const worker = async () => {
    while (next < answer.pairs.length) {
      const pair = answer.pairs[next++];
      let result;
      try {
        result = await scorePair(...await Promise.all([load(pair.rgb), load(pair[second])]));
      } catch (e) {
        result = { name: pair.rgb, error: e.message };
      }
      state.results.push(result);
      status(`scoring ${answer.pairs.length} pairs: ${++done} done ...`);
      renderSoon();
    }
  };
  const limits = state.info.limits;
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limits.max_batch, limits.max_queue,
                                                                answer.pairs.length)) }, worker));
  renderCards();
  updateThresholds();
  status(`${answer.pairs.length} pairs scored${missing}`);
}

async function scoreChosenPair(e) {
  e.preventDefault();
  const rgb = $("pick-rgb").files[0], other = $("pick-second").files[0];
  if (!rgb || !other) return;
  status("scoring the pair ...");
  state.results.push(await scorePair(rgb, other));
  renderCards();
  updateThresholds();
  status(`the pair ${rgb.name} scored`);
}

function renderCards() {
  const sort = $("sort").value, decision = $("filter-decision").value, cls = $("filter-class").value;
  let shown = state.results.filter((r) => r.error || ((!decision || decide(r) === decision) &&
                                                      (!cls || r.class === cls)));
  shown.sort(sort === "name" ? (a, b) => a.name.localeCompare(b.name)
    : (a, b) => ((a.score ?? -Infinity) - (b.score ?? -Infinity)) * (sort === "score-asc" ? 1 : -1));
  $("cards").replaceChildren(...shown.map(card));
  const bad = state.results.filter((r) => !r.error && decide(r) === "anomalous").length;
  $("counts").textContent = state.results.length ?
    `${shown.length} shown; ${bad} anomalous, ${state.results.filter((r) => !r.error).length - bad} normal` : "";
  const classes = [...new Set(state.results.map((r) => r.class).filter((c) => c))];
  const select = $("filter-class");
  for (const c of classes) {
    if (![...select.options].some((o) => o.value === c)) select.append(el("option", { value: c, text: c }));
  }
}

function card(r) {
  if (r.error) {
    return el("div", { class: "card" }, el("div", { class: "body" }, el("div", { class: "name", text: r.name }),
                                           el("div", { class: "error", text: r.error })));
  }
  const d = decide(r), t = thresholdOf(r.class) ?? r.threshold;
  const changed = d !== r.decision ? el("span", { class: "muted", text: " (was " + r.decision + ")" }) : "";
  const found = r.class === null ? "all classes" :
    r.class + (r.class_given ? " (given)" : r.class_confidence !== null ? ` (${r.class_confidence.toFixed(2)})` : "");
  const img = el("img", { src: "data:image/png;base64," + r.overlay_png, alt: "overlay of " + r.name });
  return el("div", { class: "card " + d, "data-score": r.score },
    img,
    el("div", { class: "body" },
      el("div", { class: "name", text: r.name }),
      el("div", { class: "line" }, el("span", {}, el("span", { class: "badge " + d, text: d }), changed),
         el("span", { class: "score", text: "score " + fmt(r.score) })),
      el("div", { class: "line muted" }, el("span", { text: "class " + found }),
         el("span", { text: "threshold " + fmt(t) })),
      el("div", { class: "muted", text: r.boxes.length ?
        `${r.boxes.length} region${r.boxes.length > 1 ? "s" : ""}, ${(100 * r.area_share).toFixed(2)} % of the image` : "no region" })));
}

// -------------------------------------------------------------------------------------------------- the report
function renderReport(info) {
  if (info.metrics.length) {
    const cols = Object.keys(info.metrics[0]);
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { text: c })))),
      el("tbody", {}, ...info.metrics.map((m) => el("tr", {}, ...cols.map((c) =>
        el("td", { class: c === "class" ? "" : "num", text: c === "class" ? m[c] : (m[c] === "" ? "–" : fmt(+m[c])) }))))));
    $("metrics").replaceChildren(el("h3", { text: "Metrics (metrics.csv)" }), table);
  } else {
    $("metrics").replaceChildren(el("p", { class: "hint", text: "No metrics.csv in the run folder (no evaluation yet)." }));
  }
  if (info.loss.length > 1) $("loss").replaceChildren(el("h3", { text: "Training loss (log.txt)" }), lossPlot(info.loss));
  const pictures = info.report.map((f) => el("figure", {},
    el("a", { href: withToken("report/" + f), target: "_blank" }, el("img", { src: withToken("report/" + f), alt: f, loading: "lazy" })),
    el("figcaption", { text: f })));
  $("pictures").replaceChildren(...pictures);
  if (pictures.length) $("pictures").before(el("h3", { text: "Curves, galleries of the worst false alarms and misses, heatmaps" }));
}

function lossPlot(points) {
  const W = 520, H = 180, L = 50, B = 24, ns = "http://www.w3.org/2000/svg";
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = (x) => L + (W - L - 10) * (x - x0) / ((x1 - x0) || 1), Y = (y) => 8 + (H - B - 8) * (1 - (y - y0) / ((y1 - y0) || 1));
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    svg.append(e);
  };
  add("polyline", { points: points.map((p) => X(p[0]) + "," + Y(p[1])).join(" "), fill: "none", stroke: "#3d7be0", "stroke-width": 2 });
  add("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#888" });
  add("line", { x1: L, y1: 8, x2: L, y2: H - B, stroke: "#888" });
  add("text", { x: L - 4, y: 14, "text-anchor": "end", "font-size": 11 }, fmt(y1, 3));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 11 }, fmt(y0, 3));
  add("text", { x: L, y: H - 8, "font-size": 11 }, String(x0));
  add("text", { x: W - 10, y: H - 8, "text-anchor": "end", "font-size": 11 }, "iteration " + x1);
  return svg;
}

// -------------------------------------------------------------------------------------------------- start
async function start() {
  try {
    const [info, tests] = await Promise.all([api("info"), api("test_scores")]);
    state.info = info; state.tests = tests;
    $("run-name").textContent = info.run;
    $("run-facts").textContent = `${info.method}, ${info.encoder}, ${info.image_size} → ${info.crop_size} px; ` +
      `classes: ${info.classes.join(", ") || "–"}` + (info.class_finding ? " (found for each image)" : "");
    if (info.parts) setUpPairs(info);
    buildThresholds();
    renderReport(info);
    status(tests.length ? `test set: ${tests.length} scored images` : "no test scores in the run folder");
    const folder = await api("review_images");  // the service's --review folder
    if (folder.length && info.parts) {
      await scorePairs(folder.map((name) => ({ path: name, file: () => reviewFile(name) })));
    } else if (folder.length) {
      await score(await Promise.all(folder.map(reviewFile)));
    }
  } catch (e) {
    status("cannot reach the service: " + e.message);
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const files = [];  // {path: relative to the dropped folder's parent, file}
  const walk = async (entry) => {  // a dropped folder: its images, recursively
    if (entry.isFile) {
      files.push({ path: entry.fullPath.replace(/^\/+/, ""),
                   file: await new Promise((ok, fail) => entry.file(ok, fail)) });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      let batch;
      while ((batch = await new Promise((ok, fail) => reader.readEntries(ok, fail))).length) {
        for (const child of batch) await walk(child);
      }
    }
  };
  const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter((x) => x);
  if (entries.length) { for (const entry of entries) await walk(entry); }
  else files.push(...[...e.dataTransfer.files].map((f) => ({ path: f.name, file: f })));
  if (state.info && state.info.parts) scorePairs(files);
  else score(imageFiles(files.map((i) => i.file)));
});
for (const id of ["pick-files", "pick-folder"]) {
  $(id).addEventListener("change", (e) => {
    const files = [...e.target.files];
    if (state.info && state.info.parts) scorePairs(files.map((f) => ({ path: f.webkitRelativePath || f.name, file: f })));
    else score(imageFiles(files));
    e.target.value = "";
  });
}
$("pair-form").addEventListener("submit", scoreChosenPair);
for (const id of ["sort", "filter-decision", "filter-class"]) $(id).addEventListener("change", renderCards);
$("clear").addEventListener("click", () => { state.results = []; renderCards(); updateThresholds(); });
$("save").addEventListener("click", saveThresholds);
$("reset").addEventListener("click", () => {
  for (const cls of Object.keys(state.saved)) state.thresholds[cls] = state.saved[cls];
  updateThresholds(); renderCards();
});
start();
