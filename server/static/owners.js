/* The data owners' page of SILO: trace a text, sign in with an owner token, remove
 * documents (preview, then confirm), and look up a removal's receipt.
 *
 * Plain JavaScript and fetch against the server's own JSON API (the /v1/silo/ routes, the
 * gRPC messages as JSON with proto field names). Everything the server returns is data,
 * never markup: it is put on the page with textContent and createElement only, so a
 * document's text, owner or license cannot run script here.
 */
"use strict";

// The owner token lives in this variable only: not in the URL, not in any storage, so it
// is gone when the tab reloads or closes.
let token = "";
let who = null; // the whoami reply while signed in
let found = new Map(); // doc_id -> its source record, from the last trace
let modelInfo = null; // GET /v1/silo/info, fetched once

const $ = (id) => document.getElementById(id);

// Plain words before the server's own message, by HTTP status.
const STATUS_WORDS = {
  400: "The request was not accepted",
  401: "Sign in first (or the token is no longer valid)",
  403: "Not allowed",
  404: "Not found",
  409: "This cannot be done now",
  413: "That is too much for one request",
  429: "The server is busy; try again in a moment",
  503: "The server cannot do this right now",
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API; returns the JSON reply or throws an ApiError carrying `error.message`. */
async function api(method, path, body, withToken) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (withToken && token) headers.Authorization = "Bearer " + token;
  let resp;
  try {
    // a relative path: the page also works behind a proxy that serves it under a prefix
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, "Could not reach the server (" + e.message + ").");
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const message = data && data.error && data.error.message ? data.error.message : resp.statusText;
    throw new ApiError(resp.status, message || "HTTP " + resp.status);
  }
  return data;
}

// ------------------------------------------------------------------ small DOM helpers

/** An element with text content (never HTML) and optional attributes. */
function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

/** A <dl> of [term, value] pairs; a value may be a string or a node. */
function pairs(rows, attrs) {
  const dl = el("dl", null, attrs);
  for (const [term, value] of rows) {
    dl.append(el("dt", term));
    const dd = el("dd");
    if (value instanceof Node) dd.append(value);
    else dd.textContent = String(value);
    dl.append(dd);
  }
  return dl;
}

function errorNode(err) {
  const words = STATUS_WORDS[err.status];
  const p = el("p", words ? words + ": " + err.message : err.message, { class: "error", role: "alert" });
  if (err.status) p.dataset.status = String(err.status);
  return p;
}

function show(region, ...nodes) {
  region.replaceChildren(...nodes);
  region.removeAttribute("aria-busy");
}

function busy(region, message) {
  region.setAttribute("aria-busy", "true");
  region.replaceChildren(el("p", message, { class: "hint" }));
}

const yesNo = (b) => (b ? "yes" : "no");
const plural = (n, one, many) => n + " " + (Number(n) === 1 ? one : many);

/** A document's provenance in one line. */
function describeDoc(d) {
  const parts = [];
  if (d.source) parts.push("source " + d.source);
  parts.push("license " + (d.license || "none given"));
  if (d.tier) parts.push("tier " + d.tier);
  parts.push("owner " + (d.owner || "unknown"));
  return parts.join(", ");
}

// ------------------------------------------------------------------ 1. trace

/** The pasted text with the found spans in <mark>: offsets are the server's character
 * (code point) offsets, so the text is indexed by code points, not UTF-16 units. */
function highlighted(text, spans) {
  const chars = Array.from(text);
  const covered = new Array(chars.length).fill(false);
  for (const s of spans) {
    let start = Number(s.start_char);
    let end = Number(s.end_char);
    if (chars.slice(start, end).join("") !== s.text) {
      // offsets that do not fit this text (another normalisation): find the span itself
      const at = chars.join("").indexOf(s.text);
      if (at < 0) continue;
      start = Array.from(chars.join("").slice(0, at)).length;
      end = start + Array.from(s.text).length;
    }
    for (let i = Math.max(0, start); i < Math.min(end, chars.length); i++) covered[i] = true;
  }
  const out = el("p", null, { class: "traced-text", id: "trace-highlight" });
  let i = 0;
  while (i < chars.length) {
    let j = i;
    while (j < chars.length && covered[j] === covered[i]) j++;
    const piece = chars.slice(i, j).join("");
    out.append(covered[i] ? el("mark", piece) : document.createTextNode(piece));
    i = j;
  }
  return out;
}

async function onTrace(event) {
  event.preventDefault();
  const region = $("trace-results");
  const text = $("trace-text").value;
  if (!text.trim()) {
    show(region, el("p", "Paste some text first.", { class: "error", role: "alert" }));
    return;
  }
  busy(region, "Checking…");
  let reply;
  try {
    reply = await api("POST", "v1/silo/trace", { text, max_documents: 10 });
  } catch (err) {
    show(region, errorNode(err));
    return;
  }
  const spans = reply.spans || [];
  const nodes = [el("p", "Checked " + plural(reply.tokens, "token", "tokens") + ".", { id: "trace-tokens" })];
  found = new Map();
  if (spans.length === 0) {
    nodes.push(el("p", "No part of this text was found verbatim in the datastore.", { id: "trace-none" }));
  } else {
    nodes.push(el("p", plural(spans.length, "part", "parts") + " of this text " +
      (spans.length === 1 ? "was" : "were") + " found verbatim (highlighted):"));
    nodes.push(highlighted(text, spans));
    nodes.push(el("h3", "Where each part comes from"));
    const list = el("ol", null, { id: "span-list" });
    for (const s of spans) {
      const item = el("li", null, { class: "span" });
      item.append(el("blockquote", s.text));
      const docs = s.documents || [];
      item.append(el("p", "Found " + plural(s.count, "time", "times") + " in the datastore" +
        (docs.length ? "; " + (docs.length < Number(s.count) ? "some of " : "") + "the documents:" : ".")));
      const ul = el("ul", null, { class: "docs" });
      for (const d of docs) {
        const li = el("li", null, { class: "doc" });
        li.append(el("code", d.doc_id), document.createTextNode(": " + describeDoc(d)));
        ul.append(li);
        if (!found.has(d.doc_id)) found.set(d.doc_id, d);
      }
      if (docs.length) item.append(ul);
      list.append(item);
    }
    nodes.push(list);
  }
  // the other half: was this text in the model's training data? (its training record)
  try {
    const audit = await api("POST", "v1/silo/audit", { text });
    nodes.push(el("h3", "And the model's weights?"));
    nodes.push(el("p", audit.statement, { id: "audit-statement" }));
  } catch (err) {
    nodes.push(errorNode(err));
  }
  show(region, ...nodes);
  renderDocChoices();
}

/** Checkboxes (`doc-<id>`) for the documents of the last trace; checked ones stay checked. */
function renderDocChoices() {
  const box = $("doc-list");
  const checked = new Set(selectedFromBoxes());
  const nodes = [];
  if (found.size === 0) {
    nodes.push(el("p", "None yet: check a text first, or type document ids below.",
      { id: "doc-list-empty", class: "hint" }));
  }
  for (const [id, d] of found) {
    const row = el("div", null, { class: "choice" });
    const input = el("input", null, { type: "checkbox", id: "doc-" + id, value: id });
    input.checked = checked.has(id);
    const mine = who && who.kind === "owner" && d.owner === who.owner;
    const label = el("label", null, { for: "doc-" + id });
    label.append(el("code", id), document.createTextNode(" (" + describeDoc(d) + ")" + (mine ? ": yours" : "")));
    row.append(input, label);
    nodes.push(row);
  }
  box.replaceChildren(...nodes);
}

function selectedFromBoxes() {
  return Array.from(document.querySelectorAll('#doc-list input[type="checkbox"]:checked'), (b) => b.value);
}

/** The checked documents and the typed ids, each once, in order. */
function selectedIds() {
  const typed = $("doc-ids").value.split(/[\s,]+/).filter(Boolean);
  return Array.from(new Set([...selectedFromBoxes(), ...typed]));
}

// ------------------------------------------------------------------ 2. sign in

async function onSignIn(event) {
  event.preventDefault();
  const given = $("token").value.trim();
  const out = $("who");
  if (!given) {
    show(out, el("span", "Type your owner token first.", { class: "error", role: "alert" }));
    return;
  }
  busy(out, "Checking the token…");
  const before = token;
  token = given;
  let reply;
  try {
    reply = await api("GET", "v1/silo/whoami", undefined, true);
  } catch (err) {
    token = before;
    show(out, errorNode(err));
    return;
  }
  if (reply.kind !== "owner" && reply.kind !== "admin") {
    token = before; // keep a previous valid sign-in, if any
    const p = el("span", "That token was not accepted: it is not an owner token of this server. " +
      (before ? "You are still signed in as before." : "You are not signed in."),
      { class: "error", role: "alert", id: "sign-in-error" });
    show(out, p);
    return;
  }
  who = reply;
  $("token").value = ""; // the field keeps no copy; the token is in memory only
  $("sign-out").hidden = false;
  show(out, el("span", reply.kind === "admin" ? "Signed in as the administrator." : "Signed in as owner " +
    reply.owner + ".", { class: "ok" }));
  renderDocChoices();
}

function onSignOut() {
  token = "";
  who = null;
  $("sign-out").hidden = true;
  show($("who"), el("span", "Signed out. Not signed in."));
  renderDocChoices();
  $("token").focus();
}

// ------------------------------------------------------------------ 3. remove

async function optOut(dryRun) {
  const region = $("optout-results");
  const ids = selectedIds();
  if (ids.length === 0) {
    show(region, el("p", "Select a document (or type its id) first.", { class: "error", role: "alert" }));
    return;
  }
  if (!token) {
    show(region, el("p", "Sign in with your owner token first (section 2).", { class: "error", role: "alert" }));
    return;
  }
  busy(region, dryRun ? "Working out what would be removed…" : "Removing…");
  const body = { doc_ids: { ids }, dry_run: dryRun };
  const reason = $("reason").value.trim();
  if (reason) body.reason = reason;
  let reply;
  try {
    reply = await api("POST", "v1/silo/optout", body, true);
  } catch (err) {
    show(region, errorNode(err));
    return;
  }
  const docs = reply.removed_doc_ids || [];
  const list = el("ul", null, { class: "docs", id: dryRun ? "preview-docs" : "removed-docs" });
  for (const id of docs) {
    const li = el("li");
    li.append(el("code", id));
    list.append(li);
  }
  if (dryRun) {
    show(region,
      el("h3", "Preview: nothing has been removed yet"),
      el("p", "This would remove " + plural(docs.length, "document", "documents") + " (" +
        plural(reply.removed_entries, "datastore entry", "datastore entries") + "):", { id: "preview-summary" }),
      list,
      el("p", "To remove them, choose “Confirm removal”.", { class: "hint" }));
    return;
  }
  const receipt = el("div", null, { id: "receipt", class: "receipt", tabindex: "-1" });
  receipt.append(
    el("h3", "Removed: your receipt"),
    pairs([["Receipt id", el("code", reply.receipt_id, { id: "receipt-id" })],
      ["Logged at", el("span", localTime(reply.logged_at), { id: "receipt-time" })]]),
    el("p", "Keep this receipt id: it is your proof of the removal, and section 4 looks it up.",
      { class: "keep" }),
    el("p", "Removed " + plural(docs.length, "document", "documents") + " (" +
      plural(reply.removed_entries, "datastore entry", "datastore entries") + "):"),
    list);
  show(region, receipt);
  $("status-receipt").value = reply.receipt_id;
  receipt.focus(); // move keyboard and screen-reader users to the receipt
}

/** The server's timestamp, with the reader's local time when it parses. */
function localTime(stamp) {
  const t = new Date(stamp);
  return isNaN(t.getTime()) ? stamp : stamp + " (your time: " + t.toLocaleString() + ")";
}

// ------------------------------------------------------------------ 4. receipt status

async function loadModelInfo() {
  if (modelInfo === null) modelInfo = await api("GET", "v1/silo/info");
  return modelInfo;
}

/** What the model's weights were trained on: removal from the datastore cannot reach them. */
function weightsSection(status, info) {
  const box = el("section", null, { id: "weights", "aria-labelledby": "weights-heading" });
  box.append(el("h3", "Weights", { id: "weights-heading" }));
  if (info) {
    const tiers = info.trained_tiers || [];
    box.append(pairs([
      ["Model", info.model || "(unnamed)"],
      ["Trained on the tiers", tiers.length ? tiers.join(", ") : "(not recorded)"],
      ["Trained on restricted text", yesNo(info.trained_on_restricted)],
    ], { id: "weights-info" }));
    box.append(el("p", info.trained_on_restricted
      ? "Warning: this model's weights were trained on restricted text. Removing a document from the " +
        "datastore does not remove what the weights may have learnt from it."
      : "Restricted documents are used only through the datastore, never in training, so a removed " +
        "document is gone from what the model can quote.", { class: info.trained_on_restricted ? "error" : "" }));
  } else {
    box.append(el("p", "The model's training record could not be read.", { class: "error" }));
  }
  if (status.weights && typeof status.weights === "object") {
    // the served model's training record, checked for these documents by id and by text
    const w = status.weights;
    const trained = (w.trained_doc_ids || []).concat(w.trained_text_doc_ids || []);
    box.append(el("h4", "These documents and the weights"));
    box.append(el("p", w.statement || "", { id: "weights-statement", class: trained.length ? "error" : "" }));
    box.append(pairs([
      ["Training record of the model", w.has_record ? "yes: checked exactly" : "none (an outside checkpoint)"],
      ["Trained on, by document id", (w.trained_doc_ids || []).join(", ") || "none"],
      ["Trained on, by text", (w.trained_text_doc_ids || []).join(", ") || "none"],
    ], { id: "receipt-weights" }));
  }
  return box;
}

async function onStatus(event) {
  event.preventDefault();
  const region = $("status-results");
  const receiptId = $("status-receipt").value.trim();
  if (!receiptId) {
    show(region, el("p", "Type a receipt id first.", { class: "error", role: "alert" }));
    return;
  }
  busy(region, "Looking it up…");
  let status;
  let info = null;
  try {
    status = await api("POST", "v1/silo/optout/status", { receipt_id: receiptId }, true);
  } catch (err) {
    show(region, errorNode(err));
    return;
  }
  try {
    info = await loadModelInfo();
  } catch (err) {
    info = null;
  }
  const nodes = [el("h3", status.removed ? "Removed" : "Not removed", { id: "status-summary" })];
  const values = status.values_redacted ? "(shown only to whoever made the removal)"
    : (status.values || []).join(", ") || "—";
  nodes.push(pairs([
    ["Receipt id", el("code", status.receipt_id || receiptId)],
    ["Removed", yesNo(status.removed)],
    ["Logged (in the opt-out log, checksum verified)", yesNo(status.logged)],
    ["Tombstoned (excluded from retrieval in every store)", yesNo(status.tombstoned)],
    ["Compacted (physically deleted from every store)", yesNo(status.compacted)],
    ["Logged at", status.logged_at ? localTime(status.logged_at) : "—"],
    ["Removed by", (status.by || "—") + (values !== "—" ? ": " + values : "")],
    ["Made by", status.made_by || "—"],
    ["Documents", (status.removed_doc_ids || []).join(", ") || "—"],
  ], { id: "status-fields" }));
  const stores = status.stores || [];
  nodes.push(el("h3", "Proof in each store"));
  if (stores.length === 0) {
    nodes.push(el("p", "No open store holds these documents."));
  } else {
    const list = el("ul", null, { id: "store-proofs", class: "stores" });
    for (const s of stores) {
      const item = el("li");
      item.append(el("strong", s.store), pairs([
        ["Documents", (s.doc_ids || []).join(", ") || "—"],
        ["Tombstoned", yesNo(s.tombstoned)],
        ["Compacted", yesNo(s.compacted)],
        ["Entries still retrievable", String(s.live_entries)],
      ]));
      list.append(item);
    }
    nodes.push(list);
  }
  nodes.push(weightsSection(status, info));
  show(region, ...nodes);
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("trace-form").addEventListener("submit", onTrace);
  // Ctrl+Enter (or ⌘+Enter) in the textarea checks the text; Enter alone is a new line
  $("trace-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("trace-form").requestSubmit();
  });
  $("sign-in-form").addEventListener("submit", onSignIn);
  $("sign-out").addEventListener("click", onSignOut);
  $("remove-form").addEventListener("submit", (e) => {
    e.preventDefault();
    optOut(true);
  });
  $("confirm").addEventListener("click", () => optOut(false));
  $("status-form").addEventListener("submit", onStatus);
  document.body.classList.add("ready"); // tests wait for this
});
