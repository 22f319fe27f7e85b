// Shared by the labeller and admin pages: token handling, API calls, media as blob URLs.
// Everything that came from a model or a data file is put into the page with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "mmalign-label-token";

function getToken() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function setToken(t) { sessionStorage.setItem(TOKEN_KEY, t); }
function clearToken() { sessionStorage.removeItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const opts = { method, headers: { "Authorization": "Bearer " + getToken() } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || res.statusText);
  return data;
}

const blobCache = new Map();
async function mediaUrl(project, name) {
  const key = project + "/" + name;
  if (blobCache.has(key)) return blobCache.get(key);
  const res = await fetch("/media/" + encodeURIComponent(project) + "/" + encodeURIComponent(name),
                          { headers: { "Authorization": "Bearer " + getToken() } });
  if (!res.ok) throw new ApiError(res.status, "media " + name + ": " + res.statusText);
  const url = URL.createObjectURL(await res.blob());
  if (blobCache.size > 64) {
    for (const [k, u] of blobCache) { URL.revokeObjectURL(u); blobCache.delete(k); break; }
  }
  blobCache.set(key, url);
  return url;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(typeof c === "string" ? document.createTextNode(c) : c);
  return node;
}

function setText(id, text) { document.getElementById(id).textContent = text; }
