// The labeller page: one query at a time, answered with a click or a key; every answer carries a
// client-generated submission id, so a retried submit (network error, reload) is stored once.
"use strict";

let project = null;
let current = null;      // {query_id, kind, payload, submission_id, shown_at}
let sending = false;
let answeredCount = 0;

function show(id) {
  for (const s of ["login", "pick", "task", "done"]) document.getElementById(s).hidden = s !== id;
}

function runsNode(runs) {  // an answer with its differing phrases highlighted (all text nodes)
  const p = el("p", { class: "answer-text" });
  for (const [text, changed] of runs) p.append(changed ? el("mark", {}, text) : document.createTextNode(text));
  return p;
}

async function itemNode(kind, item) {  // built off-page, then swapped in whole (no half-drawn or doubled items)
  if (kind === "text") return runsNode(item.runs || [[item.text, false]]);
  if (kind === "image") {
    const img = el("img", { alt: "" });
    img.src = await mediaUrl(project.name, item.image);
    return img;
  }
  const v = el("video", { muted: "", loop: "", playsinline: "", preload: "auto" });
  v.muted = true;
  v.src = await mediaUrl(project.name, item.video);
  return v;
}

function videos() { return Array.from(document.querySelectorAll("#task video")); }

function syncVideos() {  // the right clip follows the left one: same time, same play state, both looping
  const [a, b] = videos();
  if (!a || !b) return;
  const play = () => { a.currentTime = 0; b.currentTime = 0; a.play().catch(() => {}); b.play().catch(() => {}); };
  a.addEventListener("seeked", () => { if (Math.abs(b.currentTime - a.currentTime) > 0.05) b.currentTime = a.currentTime; });
  a.addEventListener("timeupdate", () => { if (Math.abs(b.currentTime - a.currentTime) > 0.15) b.currentTime = a.currentTime; });
  a.addEventListener("play", () => b.play().catch(() => {}));
  a.addEventListener("pause", () => b.pause());
  let started = false;  // start both from 0 once both can play (either may be ready before we listen)
  const tryStart = () => { if (!started && a.readyState >= 3 && b.readyState >= 3) { started = true; play(); } };
  for (const v of [a, b]) v.addEventListener("canplay", tryStart);
  tryStart();
}

function togglePlay() {
  const [a] = videos();
  if (!a) return;
  if (a.paused) a.play().catch(() => {}); else a.pause();
}

function restart() { for (const v of videos()) v.currentTime = 0; }

let loadGeneration = 0;  // a newer loadNext (a double click on "Check again") makes older ones stop

async function loadNext() {
  const gen = ++loadGeneration;
  setText("status", "Loading…");
  let data;
  try { data = await api("GET", "/api/projects/" + encodeURIComponent(project.name) + "/next"); }
  catch (e) { if (gen === loadGeneration) setText("status", "Could not load a query: " + e.message); return; }
  if (gen !== loadGeneration) return;
  if (!data.query) { current = null; show("done"); setText("status", ""); return; }
  const q = data.query;
  const context = [];
  if (q.kind === "text") {
    context.push(el("p", { class: "prompt", id: "prompt" }, q.payload.prompt || ""));
    for (const name of q.payload.images || []) {
      const img = el("img", { alt: "", class: "prompt-image" });
      img.src = await mediaUrl(project.name, name);
      context.push(img);
    }
  } else if (q.kind === "image") {
    context.push(el("p", { class: "caption", id: "caption" }, q.payload.caption || ""));
  }
  const left = await itemNode(q.kind, q.payload.left);
  const right = await itemNode(q.kind, q.payload.right);
  if (gen !== loadGeneration) return;
  document.getElementById("context").replaceChildren(...context);
  document.getElementById("left-item").replaceChildren(left);
  document.getElementById("right-item").replaceChildren(right);
  current = { ...q, submission_id: crypto.randomUUID(), shown_at: performance.now() };
  document.getElementById("clip-controls").hidden = q.kind !== "clip";
  if (q.kind === "clip") syncVideos();
  document.getElementById("comment").value = "";
  document.body.dataset.queryId = String(q.query_id);
  show("task");
  setText("status", answeredCount ? `Saved. ${answeredCount} answered in this session.` : "");
}

async function answer(choice) {
  if (!current || sending) return;
  sending = true;
  const body = { submission_id: current.submission_id, query_id: current.query_id, choice,
                 comment: document.getElementById("comment").value,
                 seconds: (performance.now() - current.shown_at) / 1000 };
  for (let attempt = 0; ; attempt++) {  // retry with the same submission id until the server acknowledges
    try {
      await api("POST", "/api/answers", body);
      break;
    } catch (e) {
      if (e.status === 409) {  // already stored, or the lease ran out and the query went to someone else
        sending = false; await loadNext(); setText("status", "Not saved: " + e.message); return;
      }
      if (e.status && e.status < 500 && e.status !== 429) {
        setText("status", "Not saved: " + e.message); sending = false; return;
      }
      setText("status", `Saving failed (${e.message}); retrying…`);
      await new Promise(r => setTimeout(r, Math.min(8000, 250 * 2 ** attempt)));
    }
  }
  answeredCount++;
  sending = false;
  await loadNext();
}

document.addEventListener("keydown", (ev) => {
  if (!current || ev.target.tagName === "TEXTAREA" || ev.target.tagName === "INPUT") return;
  const keys = { "1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right",
                 "3": "equal", "=": "equal", "0": "skip", "s": "skip" };
  if (keys[ev.key]) { ev.preventDefault(); answer(keys[ev.key]); }
  else if (ev.key === " ") { ev.preventDefault(); togglePlay(); }
  else if (ev.key === "r") { restart(); }
});

async function login() {
  setToken(document.getElementById("token").value.trim());
  try {
    const me = await api("GET", "/api/me");
    setText("who", me.name);
    const projects = await api("GET", "/api/projects");
    const sel = document.getElementById("project");
    sel.replaceChildren(...projects.map(p => el("option", { value: p.name }, `${p.name} (${p.kind}, ${p.pending} pending)`)));
    sel._projects = projects;
    show("pick");
    setText("login-error", "");
  } catch (e) {
    clearToken();
    setText("login-error", "Login failed: " + e.message);
  }
}

function pick() {
  const sel = document.getElementById("project");
  project = sel._projects.find(p => p.name === sel.value);
  setText("instructions", project.instructions || "Which one is better?");
  loadNext();
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-btn").addEventListener("click", login);
  document.getElementById("token").addEventListener("keydown", (e) => { if (e.key === "Enter") login(); });
  document.getElementById("pick-btn").addEventListener("click", pick);
  document.getElementById("again").addEventListener("click", loadNext);
  document.getElementById("play").addEventListener("click", togglePlay);
  document.getElementById("restart").addEventListener("click", restart);
  for (const b of document.querySelectorAll(".answers button")) {
    b.addEventListener("click", () => answer(b.dataset.choice));
  }
  if (getToken()) { document.getElementById("token").value = getToken(); login(); }
});
