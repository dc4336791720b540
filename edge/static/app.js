// edge box page. Plain JavaScript, no build step, nothing from the internet.
// One WebSocket to the box: state, decisions, events and the live picture come in; commands go out.
"use strict";

const $ = (id) => document.getElementById(id);
const FAULTS = {
  camera: "The camera is not working. Check its cable; the box keeps trying.",
  model: "The box cannot run its model. It needs a repair (see the logs).",
  storage: "The box cannot save what it learns. What it knew is still used.",
  mqtt: "The MQTT link is down. The box and this page still work.",
};
const SOURCES = { button: "button", web: "this page", mqtt: "MQTT", import: "import", scratch: "Scratch" };

let ws = null;
let nextId = 1;
const pending = new Map();          // request id -> resolve
let state = null;
let decision = null;
let hello = null;
let helloAt = 0;
let pin = sessionStorage.getItem("edge-pin") || "";
let pictureUrl = null;
let retry = 500;
let holding = null;                 // class being taught by this page's button
let holdingTaken = false;           // the box said yes to it
let galleryOldest = null;
let galleryOf = null;              // the class the gallery shows (loaded once a class is chosen)

// --- the link ------------------------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onopen = () => {
    retry = 500;
    setLink(true);
    ws.send(JSON.stringify({ type: "watch", on: !document.hidden }));
    if (pin) ws.send(JSON.stringify({ type: "login", pin }));
  };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? receive(JSON.parse(ev.data)) : showPicture(ev.data));
  ws.onclose = (ev) => {
    setLink(false, ev.code === 1013 ? ev.reason : "");   // 1013: the box has no room for this page
    for (const resolve of pending.values()) resolve({ ok: false, error: "lost the connection to the box" });
    pending.clear();
    letGo();
    decision = null;                  // a box that is gone shows no answer, not its last one
    showDecision();
    if (ev.code === 1013) retry = 8000;   // no room: no use knocking twice a second
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 8000);
  };
}

function setLink(on, why = "") {
  const el = $("link");
  el.textContent = on ? "connected" : why ? `not connected: ${why}` : "not connected";
  el.className = "pill " + (on ? "on" : "off");
  document.body.classList.toggle("offline", !on);
}

function send(action, body = {}) {
  return new Promise((resolve) => {
    if (!ws || ws.readyState !== 1) { resolve({ ok: false, error: "not connected to the box" }); return; }
    const id = nextId++;
    pending.set(id, resolve);
    const message = { action, body, id };
    if (pin) message.pin = pin;
    ws.send(JSON.stringify(message));
  });
}

function receive(m) {
  if (m.type === "hello") { hello = m; helloAt = Date.now(); showHello(); }
  else if (m.type === "state") { state = m.state; showState(); }
  else if (m.type === "decision") { decision = m; showDecision(); }
  else if (m.type === "event") onEvent(m);
  else if (m.type === "login") {
    say("pin-msg", m.ok ? "unlocked" : m.error, m.ok);
    if (!m.ok) { pin = ""; sessionStorage.removeItem("edge-pin"); }
  } else if (m.type === "result") {
    const resolve = pending.get(m.id);
    if (resolve) { pending.delete(m.id); resolve(m); }
    else if (!m.ok && m.error) say("teach-msg", m.error, false);
  }
}

function say(id, text, ok) {
  const el = $(id);
  el.textContent = text || "";
  el.className = "msg " + (ok ? "ok" : "bad");
}

async function act(action, body, msgId = "teach-msg", done = "") {
  const r = await send(action, body);
  if (!r.ok) {
    say(msgId, r.error || "refused", false);
    if (state) showState();           // a refused checkbox or slider shows the box's value again
  } else say(msgId, done, true);      // and an old message does not stay beside new numbers
  return r;
}

// --- what the box says ---------------------------------------------------------------------------

function showHello() {
  $("box-name").textContent = "edge box " + hello.device_id;
  $("about-name").textContent = hello.device_id;
  $("about-version").textContent = hello.version;
  $("about-scratch").href = hello.extension;
  $("pin-bar").hidden = !hello.pin_required;
  document.title = "edge box " + hello.device_id;
  showUptime();
}

function showUptime() {
  if (!hello) return;
  const s = Math.round(hello.uptime + (Date.now() - helloAt) / 1000);
  const h = Math.floor(s / 3600), min = Math.floor((s % 3600) / 60);
  $("about-uptime").textContent = h ? `${h} h ${min} min` : min ? `${min} min` : `${s} s`;
}

function showState() {
  $("about-model").textContent = state.model || "";
  const fault = $("fault");
  fault.hidden = !state.fault;
  fault.textContent = state.fault ? (FAULTS[state.fault] || `Problem: ${state.fault}`) : "";
  const rec = $("recording");
  rec.hidden = !state.recording;
  rec.textContent = state.recording ? `● learning “${state.recording}”…` : "";
  if (holding && holdingTaken && state.recording !== holding) {
    const name = holding;             // ended by the box: 30 s at most, or another page or program
    stopTeach();
    say("teach-msg", `the box stopped learning “${name}”; let go and hold again to teach more`, false);
  }
  showClasses();
  showThreshold();
  showLeds();
  showScores();
  fillGallerySelect();
  scheduleHints();
}

function showDecision() {
  const label = $("label");
  label.textContent = decision ? decision.label : "not connected";
  label.classList.toggle("unknown", !decision || decision.label === "unknown");
  showLeds();
  showScores();
}

function onEvent(e) {
  if (e.event === "sample_added" && state) {
    const c = state.classes.find((c) => c.name === e.class);
    if (c) { c.samples = e.samples; const el = classCard(e.class); if (el) el.querySelector(".count").textContent = countText(c.samples); }
    scheduleGallery(e.class);
    scheduleHints();
  } else if (e.event === "error") {
    say("teach-msg", e.message, false);
  } else if (["burst_undone", "class_cleared", "all_cleared", "class_renamed", "recording_stopped", "sample_deleted", "burst_deleted", "imported"].includes(e.event)) {
    scheduleGallery();
  }
}

function showPicture(blob) {
  const url = URL.createObjectURL(blob);
  const img = $("picture");
  img.onload = () => { if (pictureUrl && pictureUrl !== url) URL.revokeObjectURL(pictureUrl); pictureUrl = url; };
  img.src = url;
  img.hidden = false;
  img.dataset.frames = String(Number(img.dataset.frames || 0) + 1);
  $("no-picture").hidden = true;
}

function showLeds() {
  if (!state) return;
  const leds = $("leds");
  leds.textContent = "";
  for (const c of state.classes) {
    if (!c.led) continue;
    const lit = !state.recording && decision && decision.label === c.name && !c.nothing;
    const el = document.createElement("span");
    el.className = "led" + (lit ? " lit" : "") + (state.recording === c.name ? " rec" : "");
    el.dataset.cls = c.name;
    el.append(document.createElement("i"), c.name);
    leds.append(el);
  }
  const status = document.createElement("span");
  status.className = "led" + (state.fault ? " rec" : " ok");
  status.id = "led-status";
  status.append(document.createElement("i"), state.fault ? `status: ${state.fault}` : "status: ok");
  leds.append(status);
}

function showScores() {
  if (!state) return;
  const box = $("scores");
  box.textContent = "";
  const scores = (decision && decision.scores) || {};
  const th = Number(state.threshold_value);
  for (const c of state.classes) {
    const s = scores[c.name];
    const row = document.createElement("div");
    row.className = "score";
    row.dataset.cls = c.name;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill" + (decision && decision.label === c.name ? " win" : "");
    fill.style.width = `${Math.max(0, Math.min(1, s || 0)) * 100}%`;
    const mark = document.createElement("div");
    mark.className = "mark";
    mark.title = "needed to be sure";
    mark.style.left = `calc(${Math.max(0, Math.min(1, th)) * 100}% - 1px)`;
    bar.append(fill, mark);
    const value = document.createElement("span");
    value.textContent = s === undefined ? "–" : s.toFixed(2);
    row.append(name, bar, value);
    box.append(row);
  }
}

// --- teach ---------------------------------------------------------------------------------------

const countText = (n) => `${n} picture${n === 1 ? "" : "s"}`;   // the word the hints use too
const classCard = (name) => [...document.querySelectorAll(".class")].find((el) => el.dataset.cls === name);

function showClasses() {
  const box = $("classes");
  const names = state.classes.map((c) => c.name).join("\n");
  if (box.dataset.names !== names) {     // rebuild only when the classes change (keeps a held button)
    box.dataset.names = names;
    box.textContent = "";
    for (const c of state.classes) box.append(makeClassCard(c));
  }
  for (const c of state.classes) {
    const el = classCard(c.name);
    if (holding === c.name) holdLook(el.querySelector(".hold"));
    el.querySelector(".count").textContent = countText(c.samples);
    el.classList.toggle("is-rec", state.recording === c.name);
    el.querySelector(".nothing").checked = !!c.nothing;
    el.querySelector(".remove").hidden = !!c.led || !!c.button;
  }
}

function makeClassCard(c) {
  const el = document.createElement("div");
  el.className = "class";
  el.dataset.cls = c.name;
  el.innerHTML = `<div class="title"><span class="name"></span><span class="count"></span></div>
    <button type="button" class="hold">Hold to teach</button>
    <div class="tools">
      <button type="button" class="rename">Rename</button>
      <button type="button" class="clear">Clear</button>
      <button type="button" class="remove">Remove</button>
    </div>
    <label class="muted"><input type="checkbox" class="nothing"> this means “nothing”</label>`;
  el.querySelector(".name").textContent = c.name;
  const hold = el.querySelector(".hold");
  hold.setAttribute("aria-label", `hold to teach ${c.name}`);
  hold.addEventListener("pointerdown", (ev) => { ev.preventDefault(); hold.setPointerCapture(ev.pointerId); startTeach(c.name, hold); });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) hold.addEventListener(type, stopTeach);
  hold.addEventListener("keydown", (ev) => { if ((ev.key === " " || ev.key === "Enter") && !ev.repeat) { ev.preventDefault(); startTeach(c.name, hold); } });
  hold.addEventListener("contextmenu", (ev) => ev.preventDefault());
  el.querySelector(".rename").onclick = () => renameClass(c.name);
  el.querySelector(".clear").onclick = async () => {
    if (await confirmBox(`Forget every picture of “${c.name}”?`)) act("clear", { class: c.name }, "teach-msg", `“${c.name}” is empty now`);
  };
  el.querySelector(".remove").onclick = async () => {
    if (await confirmBox(`Remove the class “${c.name}” and its pictures?`)) act("classes", { remove: c.name });
  };
  el.querySelector(".nothing").onchange = (ev) => act("nothing", { class: c.name, nothing: ev.target.checked });
  return el;
}

function startTeach(name, button) {
  if (holding) return;
  holding = name;
  holdingTaken = false;
  holdLook(button);
  send("record", { class: name, seconds: 30 }).then((r) => {
    if (holding !== name) return;     // let go (or ended) before the box answered
    if (r.ok) { holdingTaken = true; say("teach-msg", "", true); return; }
    letGo();                          // refused: nothing to stop later
    say("teach-msg", r.error, false);
  });
}

function stopTeach() {
  if (!holding) return;
  const name = holding;
  letGo();
  // only the class this page records: what Scratch or MQTT took over meanwhile goes on
  send("record/stop", { class: name }).then((r) => { if (!r.ok && !r.error.startsWith("not recording")) say("teach-msg", r.error, false); });
}

function letGo() {                  // this page teaches nothing now
  holding = null;
  document.querySelectorAll(".hold.down").forEach(resetHold);
}

function holdLook(button) {
  button.classList.add("down");
  button.textContent = "Teaching… let go to stop";
}

function resetHold(button) {
  button.classList.remove("down");
  button.textContent = "Hold to teach";
}

async function renameClass(old) {
  const dlg = $("rename");
  $("rename-old").textContent = old;
  $("rename-name").value = old;
  dlg.returnValue = "";
  dlg.showModal();
  await new Promise((r) => dlg.addEventListener("close", r, { once: true }));
  const name = $("rename-name").value.trim();
  if (dlg.returnValue === "yes" && name && name !== old) act("rename", { from: old, to: name }, "teach-msg", `renamed to “${name}”`);
}

function confirmBox(text) {
  const dlg = $("confirm");
  $("confirm-text").textContent = text;
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((r) => dlg.addEventListener("close", () => r(dlg.returnValue === "yes"), { once: true }));
}

function showThreshold() {
  const auto = state.threshold === "auto";
  $("th-auto").checked = auto;
  const slider = $("th-slider");
  if (document.activeElement !== slider) slider.value = String(state.threshold_value);
  $("th-value").textContent = Number(state.threshold_value).toFixed(2) + (auto ? " (automatic)" : "");
}

// --- what it learned -----------------------------------------------------------------------------

let hintsTimer = null;
function scheduleHints() {
  clearTimeout(hintsTimer);
  hintsTimer = setTimeout(async () => {
    const r = await send("hints");
    const list = $("hints");
    list.textContent = "";
    for (const h of (r.ok && r.hints) || []) {
      const li = document.createElement("li");
      li.textContent = h;
      list.append(li);
    }
  }, 700);
}

function fillGallerySelect() {
  const sel = $("gallery-class");
  const names = state.classes.map((c) => c.name);
  const keep = names.includes(sel.value) ? sel.value : names[0];
  if ([...sel.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    sel.textContent = "";
    for (const n of names) { const o = document.createElement("option"); o.value = o.textContent = n; sel.append(o); }
  }
  if (keep !== undefined && (sel.value !== keep || galleryOf !== keep)) { sel.value = keep; loadGallery(); }
  const c = state.classes.find((c) => c.name === sel.value);
  $("gallery-count").textContent = c ? countText(c.samples) : "";
}

let galleryTimer = null;
function scheduleGallery(cls) {
  if (cls && cls !== $("gallery-class").value) return;
  clearTimeout(galleryTimer);
  galleryTimer = setTimeout(() => loadGallery(), 800);
}

async function loadGallery(older = false) {
  const cls = $("gallery-class").value;
  if (!cls) return;
  galleryOf = cls;
  const body = { class: cls, limit: 40 };
  if (older && galleryOldest) body.before = galleryOldest;
  const r = await send("samples", body);
  const box = $("gallery");
  if (!older) { box.textContent = ""; galleryOldest = null; }
  if (!r.ok) { say("teach-msg", r.error, false); return; }
  const samples = r.samples || [];
  $("gallery-more").hidden = samples.length < body.limit;
  if (!samples.length && !older) { box.innerHTML = '<p class="muted">No pictures yet.</p>'; return; }
  galleryOldest = samples.length ? samples[samples.length - 1].id : galleryOldest;
  let group = null;
  const imgs = new Map();
  for (const s of samples) {                           // newest first, one box per burst
    if (!group || group.dataset.burst !== String(s.burst)) {
      group = document.createElement("div");
      group.className = "burst";
      group.dataset.burst = String(s.burst);
      const head = document.createElement("div");
      head.className = "head";
      const when = new Date(s.ts * 1000).toLocaleString();
      head.append(`taught ${when} by ${SOURCES[s.source] || s.source}`);
      if (s.burst !== null && s.burst !== undefined) {
        const del = document.createElement("button");
        del.type = "button";
        del.className = "del-burst";
        del.textContent = "Delete this teaching";
        del.onclick = async () => { if (await confirmBox("Delete all pictures of this teaching?")) { await act("burst/delete", { burst: s.burst }); loadGallery(); } };
        head.append(del);
      }
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      group.append(head, thumbs);
      box.append(group);
    }
    const t = document.createElement("div");
    t.className = "thumb";
    t.dataset.id = String(s.id);
    const img = document.createElement("img");
    img.alt = s.thumbnail === false ? "no picture kept" : `picture ${s.id}`;
    if (s.thumbnail === false) t.classList.add("none");
    const del = document.createElement("button");
    del.type = "button";
    del.className = "del-sample";
    del.title = "delete this picture";
    del.textContent = "✕";
    del.onclick = async () => { const r2 = await act("sample/delete", { sample: s.id }); if (r2.ok) t.remove(); };
    t.append(img, del);
    group.querySelector(".thumbs").append(t);
    imgs.set(s.id, img);
  }
  const ids = [...imgs.keys()];
  for (let i = 0; i < ids.length; i += 50) {
    const tr = await send("thumbnails", { ids: ids.slice(i, i + 50) });
    for (const [id, b64] of Object.entries((tr.ok && tr.thumbnails) || {})) {
      const img = imgs.get(Number(id));
      if (img && b64) img.src = "data:image/jpeg;base64," + b64;
    }
  }
}

// --- move and keep -------------------------------------------------------------------------------

async function exportFile() {
  say("keep-msg", "preparing the file…", true);
  const r = await fetch("/api/export", { method: "POST", headers: pin ? { "X-Edge-Pin": pin } : {} });
  if (!r.ok) { say("keep-msg", (await r.json().catch(() => ({}))).error || `export failed (${r.status})`, false); return; }
  const name = (/filename="([^"]+)"/.exec(r.headers.get("Content-Disposition") || "") || [])[1] || "edge.edge";
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  say("keep-msg", `downloaded ${name}`, true);
}

async function importFile(ev) {
  ev.preventDefault();
  const file = $("import-file").files[0];
  if (!file) { say("keep-msg", "choose an export file first", false); return; }
  if (!(await confirmBox(`Replace what the box knows with “${file.name}”?`))) return;
  say("keep-msg", "loading…", true);
  const headers = { "Content-Type": "application/octet-stream" };
  if (pin) headers["X-Edge-Pin"] = pin;
  const r = await fetch("/api/import", { method: "POST", headers, body: file });
  const j = await r.json().catch(() => ({ ok: false, error: `import failed (${r.status})` }));
  say("keep-msg", j.ok ? j.message || "loaded: the box knows what the file taught" : j.error, j.ok);
  if (j.ok) scheduleGallery();
}

// --- page wiring ---------------------------------------------------------------------------------

$("pin-go").onclick = () => {
  pin = $("pin").value.trim();
  sessionStorage.setItem("edge-pin", pin);
  if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "login", pin }));
};
$("pin").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("pin-go").click(); });
$("undo").onclick = () => act("undo", {}, "teach-msg", "undone");
$("clear-all").onclick = async () => {
  if (await confirmBox("Forget EVERYTHING the box learned? This cannot be undone.")) act("clear", { all: true }, "teach-msg", "the box forgot everything");
};
$("add-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const name = $("add-name").value.trim();
  if (!name) return;
  const r = await act("classes", { add: name }, "teach-msg", `added “${name}”`);
  if (r.ok) $("add-name").value = "";
};
$("th-auto").onchange = (ev) => {
  if (ev.target.checked) act("threshold", { value: "auto" });
  else act("threshold", { value: Number($("th-slider").value) });
};
$("th-slider").oninput = (ev) => { $("th-value").textContent = Number(ev.target.value).toFixed(2); };
$("th-slider").onchange = (ev) => act("threshold", { value: Number(ev.target.value) });
$("gallery-class").onchange = () => { fillGallerySelect(); loadGallery(); };
$("gallery-more").onclick = () => loadGallery(true);
$("export").onclick = exportFile;
$("import-form").onsubmit = importFile;
$("big-toggle").onclick = () => document.body.classList.toggle("big");
document.addEventListener("visibilitychange", () => {
  if (document.hidden) stopTeach();
  if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "watch", on: !document.hidden }));
});
window.addEventListener("pagehide", stopTeach);
document.addEventListener("keyup", (ev) => { if (ev.key === " " || ev.key === "Enter") stopTeach(); });
window.addEventListener("blur", stopTeach);
setInterval(showUptime, 10000);
connect();
