// pathloop review UI: one image at a time, keyboard only. No build step, no external code.
// The rater token lives in sessionStorage (this tab only) and is sent as a bearer token.
"use strict";

const TOKEN_KEY = "pathloop.rater_token";
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  meta: null, // ReviewMetaResponse
  cur: null, // NextResponse
  verdict: null, // true / false / null (not chosen)
  failed: new Set(), // criterion keys
  subtype: null,
  undoStack: [], // image ids labelled in this session, newest last
  busy: false,
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
  if (err.status === 401) {
    signOut(`Signed out: ${err.message}`);
  } else {
    say(err.message || String(err));
  }
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
  $("signin").hidden = true;
  $("main").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = `${state.meta.rater} · ${state.meta.round_name} (round ${state.meta.round_id})`;
  say("");
  setBusy(false);
  await show(null); // resume at the first image without a label
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

// ------------------------------------------------------------------ showing an image

async function show(imageId) {
  setBusy(true);
  try {
    const q = imageId ? `?image_id=${encodeURIComponent(imageId)}` : "";
    state.cur = await api("GET", `v1/review/next${q}`);
    const lab = state.cur.label;
    state.verdict = lab ? lab.plausible : null;
    state.failed = new Set(lab ? lab.failed_criteria : []);
    state.subtype = lab ? lab.subtype : null;
    render();
  } catch (err) {
    failed(err);
  } finally {
    setBusy(false);
  }
}

function render() {
  const c = state.cur;
  $("progress").textContent = `${c.done} / ${c.total} labelled`;
  const none = c.image_id === null;
  $("figure").hidden = none;
  $("done").hidden = !none;
  $("panel").hidden = none;
  $("real").hidden = none;
  $("figure").dataset.imageId = c.image_id || "";
  if (none) return;
  $("image").src = `data:image/png;base64,${c.image_b64}`;
  $("position").textContent = `image ${c.position + 1} of ${c.total} · ${c.image_id}`;
  $("class-name").textContent = `${c.class_name} (${c.class_code})`;
  $("class-desc").textContent = c.description || "";
  $("status").textContent = c.label
    ? `Your saved label: ${c.label.plausible ? "plausible" : "implausible"} (revision ${c.label.revision})`
    : "Not labelled yet";
  renderChoices();
  renderReal(c.real_examples);
}

function renderChoices() {
  const v = $("verdict");
  const saved = state.cur.label && state.cur.label.plausible === state.verdict;
  v.textContent = state.verdict === null ? "No verdict yet: P or I"
    : (state.verdict ? "Plausible" : "Implausible") + (saved ? "" : " (not saved yet: Enter saves)");
  v.className = state.verdict === null ? "" : state.verdict ? "plausible" : "implausible";
  const list = $("criteria");
  list.replaceChildren(
    ...state.meta.criteria.map((cr) => {
      const li = document.createElement("li");
      li.dataset.key = cr.key;
      li.className = state.failed.has(cr.key) ? "on" : "";
      li.innerHTML = `<kbd></kbd> <span></span>`;
      li.querySelector("kbd").textContent = cr.hotkey;
      li.querySelector("span").textContent = cr.text + (state.failed.has(cr.key) ? " — failed" : "");
      return li;
    }),
  );
  const subs = state.cur.subtypes || [];
  $("subtype-box").hidden = subs.length === 0;
  $("subtypes").replaceChildren(
    ...subs.map((s) => {
      const li = document.createElement("li");
      li.className = state.subtype === s.subtype ? "on" : "";
      li.innerHTML = `<kbd></kbd> <span></span>`;
      li.querySelector("kbd").textContent = s.key;
      li.querySelector("span").textContent = s.subtype;
      return li;
    }),
  );
}

function renderReal(examples) {
  const strip = $("real-strip");
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

// ------------------------------------------------------------------ actions

async function submit(plausible) {
  const c = state.cur;
  if (!c || !c.image_id) return;
  const body = {
    image_id: c.image_id,
    plausible,
    // "Plausible" means every criterion passes, so only an implausible label carries criteria.
    failed_criteria: plausible ? [] : state.meta.criteria.map((cr) => cr.key).filter((k) => state.failed.has(k)),
    subtype: state.subtype,
    comment: "",
  };
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
    say(resp.label ? "Undone: the previous label is back." : "Undone: the image has no label now.", "info");
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
  if (!s) return false;
  state.subtype = state.subtype === s.subtype ? null : s.subtype;
  renderChoices();
  return true;
}

function onKey(ev) {
  if (!state.meta || ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (state.busy) {
    ev.preventDefault();
    return;
  }
  const key = ev.key.length === 1 ? ev.key.toUpperCase() : ev.key;
  const c = state.cur;
  const hasImage = c && c.image_id;
  let handled = true;
  if (key === "P" && hasImage) submit(true);
  else if (key === "I" && hasImage) submit(false);
  else if (key === "Enter" && hasImage) {
    if (state.verdict === null) say("Choose a verdict first: P plausible or I implausible.", "info");
    else submit(state.verdict);
  } else if (key === "U") undo();
  else if (key === "ArrowLeft") {
    if (c && c.prev_id) show(c.prev_id);
    else if (!hasImage && state.undoStack.length) show(state.undoStack[state.undoStack.length - 1]);
  } else if (key === "ArrowRight" && c && c.next_id) show(c.next_id);
  else if (/^[1-7]$/.test(key) && hasImage) toggleCriterion(Number(key) - 1);
  else if (/^[A-Z]$/.test(key) && hasImage) handled = chooseSubtype(key);
  else handled = false;
  if (handled) ev.preventDefault();
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
document.addEventListener("keydown", onKey);

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved);
else showSignIn("");
