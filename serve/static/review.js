// pathloop review UI: one item at a time; every action is a button (mouse) with a key.
// No build step, no external code. The rater token lives in sessionStorage (this tab only) and is
// sent as a bearer token. The round's mode (plausibility, blinded, pairwise) picks the question.
"use strict";

const TOKEN_KEY = "pathloop.rater_token";
const $ = (id) => document.getElementById(id);
const FRAME_PX = 384; // side of the image frame (CSS --frame): an image fills it at zoom 1
const ZOOMS = [1, 1.5, 2, 3, 4, 6, 8];
const PAN_STEP = 48; // px per Shift+arrow
const QUESTIONS = {
  plausibility: "Is this a plausible cell of its class?",
  blinded: "Is this a real cell or a synthetic one?",
  pairwise: "Which cell of this class is the more plausible?",
};
const ANSWER_TEXT = {
  unsure: "unsure",
  skip: "skipped",
  real: "real",
  synthetic: "synthetic",
  a: "left more plausible",
  b: "right more plausible",
  both: "equally plausible",
  neither: "neither plausible",
};

const state = {
  token: null,
  meta: null, // ReviewMetaResponse
  cur: null, // NextResponse
  verdict: null, // true / false / null (not chosen): plausibility rounds
  failed: new Set(), // criterion keys
  subtype: null,
  undoStack: [], // item ids answered in this session, newest last
  busy: false,
  zoom: 1,
  panX: 0,
  panY: 0,
};

// ------------------------------------------------------------------ messages and HTTP

function say(text, kind = "error") {
  const el = $("msg");
  el.textContent = text;
  el.className = kind === "info" ? "info" : "";
  el.hidden = !text;
}

function setBusy(on) {
  state.busy = on;
  document.body.dataset.busy = on ? "1" : "0";
}

class HttpError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new HttpError(0, `cannot reach the server (${err.message}); check the connection and retry`);
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const detail = typeof data.detail === "string" ? data.detail : `HTTP ${resp.status}`;
    throw new HttpError(resp.status, detail);
  }
  return data;
}

function failed(err) {
  if (err.status === 401) signOut(`Signed out: ${err.message}`);
  else say(err.message || String(err));
}

// ------------------------------------------------------------------ sign in / out

async function signIn(token) {
  state.token = token;
  setBusy(true);
  try {
    state.meta = await api("GET", "v1/review/meta");
  } catch (err) {
    state.token = null;
    setBusy(false);
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(err.status === 401 ? "That token was not accepted; check it and try again." : err.message);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  const mode = state.meta.mode;
  document.body.dataset.mode = mode;
  for (const el of document.querySelectorAll("[data-mode]")) {
    if (el !== document.body) el.hidden = !el.dataset.mode.split(" ").includes(mode);
  }
  $("question").textContent = QUESTIONS[mode];
  $("criteria-hint").textContent = state.meta.require_criteria
    ? "(click, or keys 1–7; implausible needs at least one)"
    : "(click, or keys 1–7; then I)";
  $("signin").hidden = true;
  $("main").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = `${state.meta.rater} · ${state.meta.round_name} (round ${state.meta.round_id})`;
  say("");
  setBusy(false);
  await show(null); // resume at the first item without an answer
}

function showSignIn(message) {
  $("main").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("who").textContent = "";
  $("progress").textContent = "";
  say(message || "");
  $("token").value = "";
  $("token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  Object.assign(state, { token: null, meta: null, cur: null, undoStack: [] });
  setBusy(false);
  showSignIn(message);
}

// ------------------------------------------------------------------ showing an item

async function show(imageId) {
  setBusy(true);
  try {
    const q = imageId ? `?image_id=${encodeURIComponent(imageId)}` : "";
    state.cur = await api("GET", `v1/review/next${q}`);
    const lab = state.cur.label;
    state.verdict = lab ? lab.plausible : null;
    state.failed = new Set(lab ? lab.failed_criteria : []);
    state.subtype = lab ? lab.subtype : null;
    $("comment").value = lab ? lab.comment : "";
    render();
  } catch (err) {
    failed(err);
  } finally {
    setBusy(false);
  }
}

function labelText(lab) {
  if (lab.answer) return ANSWER_TEXT[lab.answer];
  return lab.plausible ? "plausible" : "implausible";
}

function render() {
  const c = state.cur;
  $("progress").textContent = `${c.done} / ${c.total} done` + (c.skipped ? ` · ${c.skipped} skipped` : "");
  renderClassProgress(c);
  const none = c.image_id === null;
  for (const id of ["figures", "panel", "real", "toolbar", "size-note", "position"]) $(id).hidden = none;
  $("done").hidden = !none;
  $("figure").dataset.imageId = c.image_id || "";
  if (none) return;
  const pair = state.meta.mode === "pairwise";
  setImage($("image"), c.image_b64);
  if (pair) setImage($("image-b"), c.image_b_b64);
  $("caption-a").textContent = pair ? "Left (A)" : "";
  $("caption-b").textContent = pair ? "Right (B)" : "";
  $("position").textContent = `item ${c.position + 1} of ${c.total} · ${c.image_id}`;
  $("class-name").textContent = `${c.class_name} (${c.class_code})`;
  $("class-desc").textContent = c.description || "";
  $("status").textContent = c.label
    ? `Your saved answer: ${labelText(c.label)} (revision ${c.label.revision})`
    : "Not answered yet";
  applyView();
  renderChoices();
  renderReal(c.real_examples);
}

function setImage(img, b64) {
  img.onload = sizeNote;
  img.src = `data:image/png;base64,${b64}`;
}

function sizeNote() {
  // The true size: a 32 px cell fills the 384 px frame, so it is drawn 12 times larger.
  const img = $("image");
  if (!img.naturalWidth) return;
  const scale = (FRAME_PX / img.naturalWidth) * state.zoom;
  $("size-note").textContent =
    `Image ${img.naturalWidth} × ${img.naturalHeight} px, shown ${+scale.toFixed(1)}× ` +
    "enlarged (each pixel a square: nearest neighbour, no smoothing).";
}

function renderClassProgress(c) {
  const rows = (c.class_progress || []).map((p) => {
    const tr = document.createElement("tr");
    if (p.name === c.class_name) tr.className = "current";
    else if (p.done === p.total) tr.className = "complete";
    tr.innerHTML = "<td></td><td class='n'></td>";
    tr.cells[0].textContent = `${p.name} (${p.code})`;
    tr.cells[1].textContent = `${p.done} / ${p.total}`;
    return tr;
  });
  $("class-progress").tBodies[0].replaceChildren(...rows);
}

function renderChoices() {
  const v = $("verdict");
  const lab = state.cur.label;
  for (const b of document.querySelectorAll(".answers button")) b.classList.remove("chosen");
  if (state.meta.mode === "plausibility") {
    const saved = lab && !lab.answer && lab.plausible === state.verdict;
    v.textContent = state.verdict === null ? "No verdict yet: P or I"
      : (state.verdict ? "Plausible" : "Implausible") + (saved ? "" : " (not saved yet: Enter saves)");
    v.className = state.verdict === null ? "" : state.verdict ? "plausible" : "implausible";
    if (state.verdict !== null) {
      const which = state.verdict ? "plausible" : "implausible";
      document.querySelector(`[data-action="verdict:${which}"]`).classList.add("chosen");
    }
  } else {
    v.textContent = "";
    v.className = "";
  }
  if (lab && lab.answer) document.querySelector(`[data-action="answer:${lab.answer}"]`).classList.add("chosen");
  $("criteria").replaceChildren(
    ...state.meta.criteria.map((cr, i) => {
      const on = state.failed.has(cr.key);
      return listButton(cr.hotkey, cr.text + (on ? " — failed" : ""), `crit:${i}`, on);
    }),
  );
  const subs = state.cur.subtypes || [];
  $("subtype-box").hidden = subs.length === 0;
  $("subtypes").replaceChildren(
    ...subs.map((s) => listButton(s.key, s.subtype, `sub:${s.key}`, state.subtype === s.subtype)),
  );
}

function listButton(key, text, action, on) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = on ? "on" : "";
  b.dataset.action = action;
  b.dataset.key = key;
  b.innerHTML = "<kbd></kbd> <span></span>";
  b.querySelector("kbd").textContent = key;
  b.querySelector("span").textContent = text;
  li.append(b);
  return li;
}

function renderReal(examples) {
  const strip = $("real-strip");
  $("real").hidden = state.meta.mode === "blinded"; // real examples would give the answer away
  if (!examples.length) {
    const p = document.createElement("span");
    p.className = "none";
    p.textContent = "No real examples configured for this class.";
    strip.replaceChildren(p);
    return;
  }
  strip.replaceChildren(
    ...examples.map((b64, i) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${b64}`;
      img.alt = `real example ${i + 1}`;
      return img;
    }),
  );
}

// ------------------------------------------------------------------ zoom, pan, contrast

function applyView() {
  const room = (FRAME_PX * (state.zoom - 1)) / 2; // how far the image may move each way
  state.panX = Math.max(-room, Math.min(room, state.panX));
  state.panY = Math.max(-room, Math.min(room, state.panY));
  const t = `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
  for (const img of [$("image"), $("image-b")]) img.style.transform = t; // pairs move together
  $("zoom-level").textContent = `${state.zoom}×`;
  sizeNote();
}

function zoomBy(step) {
  const i = ZOOMS.indexOf(state.zoom) + step;
  if (i < 0 || i >= ZOOMS.length) return;
  const ratio = ZOOMS[i] / state.zoom; // keep the centre of the view where it is
  state.zoom = ZOOMS[i];
  state.panX *= ratio;
  state.panY *= ratio;
  applyView();
}

function fitView() {
  Object.assign(state, { zoom: 1, panX: 0, panY: 0 });
  applyView();
}

function pan(dx, dy) {
  state.panX += dx;
  state.panY += dy;
  applyView();
}

function toggleContrast() {
  const on = document.body.classList.toggle("contrast");
  $("contrast").setAttribute("aria-pressed", on ? "true" : "false");
}

function wireFrame(frame) {
  let last = null;
  frame.addEventListener("pointerdown", (ev) => {
    last = [ev.clientX, ev.clientY];
    frame.setPointerCapture(ev.pointerId);
    frame.classList.add("dragging");
  });
  frame.addEventListener("pointermove", (ev) => {
    if (!last) return;
    pan(ev.clientX - last[0], ev.clientY - last[1]);
    last = [ev.clientX, ev.clientY];
  });
  const stop = () => {
    last = null;
    frame.classList.remove("dragging");
  };
  frame.addEventListener("pointerup", stop);
  frame.addEventListener("pointercancel", stop);
  frame.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    zoomBy(ev.deltaY < 0 ? 1 : -1);
  }, { passive: false });
}

// ------------------------------------------------------------------ answering

async function submit(body) {
  const c = state.cur;
  if (!c || !c.image_id) return;
  body = { image_id: c.image_id, failed_criteria: [], subtype: state.subtype, comment: $("comment").value.trim(), ...body };
  setBusy(true);
  try {
    const resp = await api("POST", "v1/review/labels", body);
    state.undoStack.push(c.image_id);
    say("");
    setBusy(false);
    await show(resp.next_id);
  } catch (err) {
    setBusy(false);
    failed(err);
  }
}

function submitVerdict(plausible) {
  // "Plausible" means every criterion passes, so only an implausible label carries criteria.
  const crit = plausible ? [] : state.meta.criteria.map((cr) => cr.key).filter((k) => state.failed.has(k));
  if (!plausible && state.meta.require_criteria && !crit.length) {
    state.verdict = false;
    renderChoices();
    say("This round asks which criteria fail: choose at least one (click it, or keys 1–7), then I.", "info");
    return;
  }
  submit({ plausible, failed_criteria: crit });
}

function submitAnswer(answer) {
  submit({ answer, subtype: state.meta.mode === "plausibility" ? state.subtype : null });
}

async function undo() {
  const c = state.cur;
  const target = state.undoStack.length ? state.undoStack.pop() : c && c.label ? c.image_id : null;
  if (!target) {
    say("Nothing to undo.", "info");
    return;
  }
  setBusy(true);
  try {
    const resp = await api("POST", "v1/review/undo", { image_id: target });
    say(resp.label ? "Undone: the previous answer is back." : "Undone: the item has no answer now.", "info");
    setBusy(false);
    await show(target);
  } catch (err) {
    setBusy(false);
    failed(err);
  }
}

function toggleCriterion(index) {
  const cr = state.meta.criteria[index];
  if (!cr) return;
  if (state.failed.has(cr.key)) state.failed.delete(cr.key);
  else state.failed.add(cr.key);
  if (state.failed.size) state.verdict = false; // a failed criterion makes it implausible
  renderChoices();
}

function chooseSubtype(letter) {
  const s = (state.cur.subtypes || []).find((x) => x.key === letter);
  if (!s) return;
  state.subtype = state.subtype === s.subtype ? null : s.subtype;
  renderChoices();
}

function save() {
  if (state.meta.mode !== "plausibility") {
    const lab = state.cur.label;
    if (lab && lab.answer) submitAnswer(lab.answer); // e.g. to save an edited comment
    else say("Choose an answer first (the buttons, or their keys).", "info");
  } else if (state.verdict === null) say("Choose a verdict first: P plausible or I implausible.", "info");
  else submitVerdict(state.verdict);
}

// ------------------------------------------------------------------ one path for mouse and keys

function run(action) {
  if ($("msg").className === "info") say(""); // a note lasts until the next action
  const c = state.cur;
  const item = c && c.image_id;
  const [verb, arg] = action.split(":");
  if (verb === "zoom-in") zoomBy(1);
  else if (verb === "zoom-out") zoomBy(-1);
  else if (verb === "zoom-fit") fitView();
  else if (verb === "contrast") toggleContrast();
  else if (verb === "undo") undo();
  else if (verb === "prev") {
    // From the end screen: the last item answered here, else the round's last item.
    if (!item && state.undoStack.length) show(state.undoStack[state.undoStack.length - 1]);
    else if (c && c.prev_id) show(c.prev_id);
  } else if (verb === "next" && c && c.next_id) show(c.next_id);
  else if (!item) return;
  else if (verb === "verdict") submitVerdict(arg === "plausible");
  else if (verb === "answer") submitAnswer(arg);
  else if (verb === "save") save();
  else if (verb === "crit") toggleCriterion(Number(arg));
  else if (verb === "sub") chooseSubtype(arg);
}

function visibleButton(key) {
  for (const b of document.querySelectorAll("#main [data-key]")) {
    if (b.dataset.key === key && b.offsetParent !== null) return b;
  }
  return null;
}

function onKey(ev) {
  if (!state.meta || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.target.tagName === "TEXTAREA") {
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  if (ev.target.tagName === "INPUT") return;
  if (state.busy) {
    ev.preventDefault();
    return;
  }
  const arrows = { ArrowLeft: [1, 0], ArrowRight: [-1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] };
  if (ev.shiftKey && arrows[ev.key]) {
    pan(arrows[ev.key][0] * PAN_STEP, arrows[ev.key][1] * PAN_STEP); // move the view that way
    ev.preventDefault();
    return;
  }
  if (ev.key.toUpperCase() === "C" && state.cur && state.cur.image_id) {
    $("comment").focus();
    ev.preventDefault();
    return;
  }
  const key = ev.key === "=" ? "+" : ev.key.length === 1 ? ev.key.toUpperCase() : ev.key;
  const button = visibleButton(key);
  if (!button) return;
  ev.preventDefault();
  run(button.dataset.action);
}

// ------------------------------------------------------------------ start

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    say("Paste your rater token first.");
    return;
  }
  signIn(token);
});
$("signout").addEventListener("click", () => signOut("Signed out."));
$("main").addEventListener("mousedown", (ev) => {
  if (ev.target.closest("button")) ev.preventDefault(); // keep the keyboard focus on the page
});
$("main").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b || state.busy) return;
  run(b.dataset.action);
});
wireFrame($("frame-a"));
wireFrame($("frame-b"));
document.addEventListener("keydown", onKey);

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved);
else showSignIn("");
