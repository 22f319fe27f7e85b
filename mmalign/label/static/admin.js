// The admin page: progress per project and labeller, agreement, new projects and labellers.
"use strict";

function fmt(x) { return x === null || x === undefined ? "–" : (typeof x === "number" ? String(Math.round(x * 1000) / 1000) : String(x)); }

function row(...cells) { return el("tr", {}, ...cells.map(c => el("td", {}, fmt(c)))); }

async function refresh() {
  const data = await api("GET", "/api/progress");
  const p = [], l = [], c = [];
  for (const [name, r] of Object.entries(data)) {
    p.push(row(name, r.kind, r.counts.queries, r.counts.complete, r.counts.pending, r.counts.cancelled,
               r.fleiss.kappa === null ? null : `${fmt(r.fleiss.kappa)} (${r.fleiss.items} queries × ${r.fleiss.raters})`));
    for (const [who, s] of Object.entries(r.labellers)) {
      l.push(row(name, who, s.answered, s.skipped,
                 s.reference_n ? `${fmt(s.reference_agreement)} (${s.reference_n})` : null));
    }
    for (const k of r.cohen) c.push(row(name, k.labellers.join(" · "), k.shared, k.cohen_kappa));
  }
  document.querySelector("#projects tbody").replaceChildren(...p);
  document.querySelector("#labellers tbody").replaceChildren(...l);
  document.querySelector("#cohen tbody").replaceChildren(...c);
}

async function login() {
  setToken(document.getElementById("token").value.trim());
  try {
    const me = await api("GET", "/api/me");
    if (!me.admin) throw new Error("this token is not the admin token");
    setText("who", me.name);
    document.getElementById("login").hidden = true;
    document.getElementById("dash").hidden = false;
    await refresh();
  } catch (e) { clearToken(); setText("login-error", "Login failed: " + e.message); }
}

async function createProject() {
  try {
    await api("POST", "/api/projects", { name: document.getElementById("p-name").value,
      kind: document.getElementById("p-kind").value, instructions: document.getElementById("p-instr").value,
      answers_per_query: Number(document.getElementById("p-per").value) });
    setText("status", "Project created.");
    await refresh();
  } catch (e) { setText("status", "Not created: " + e.message); }
}

async function createLabeller() {
  try {
    const out = await api("POST", "/api/labellers", { name: document.getElementById("l-name").value });
    setText("l-token", out.token);
    setText("status", `Labeller ${out.name} created; give them the token.`);
  } catch (e) { setText("status", "Not created: " + e.message); }
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-btn").addEventListener("click", login);
  document.getElementById("token").addEventListener("keydown", (e) => { if (e.key === "Enter") login(); });
  document.getElementById("refresh").addEventListener("click", refresh);
  document.getElementById("p-create").addEventListener("click", createProject);
  document.getElementById("l-create").addEventListener("click", createLabeller);
  if (getToken()) { document.getElementById("token").value = getToken(); login(); }
});
