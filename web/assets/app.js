// The Agora page, over the gateway's WebSocket (docs/WEB.md): groups (join, leave, history
// with scroll-back, live entries, sending with the ack shown), direct messages with unread
// counts and presence, and attachments. Every text from the network is put in the page as
// text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 50; // history entries per page
// The session's CSRF token (the gateway puts it in the page): sent with every POST.
const CSRF = document.querySelector('meta[name="agora-csrf"]')?.content ?? "";

let socket = null;
let pending = []; // resolvers of the requests in flight, in order
let current = null; // {kind: "group" | "dm", name}
let me = null;
const groups = new Map(); // name -> {li, lastSeq, oldest, followed, unread}
const people = new Map(); // name -> {li, presence}
const dms = new Map(); // peer -> [{n?, from, to, text, time, state?}]
const unreadDm = new Map(); // peer -> Set of n
const seenDm = new Set(); // mailbox numbers shown or counted
const readDm = new Set(); // mailbox numbers read
let ackedDm = 0; // mailbox numbers up to this are acked

function status(text) {
  $("status").textContent = text;
}

// A random (version 4) UUID from the browser's CSPRNG, so that a retried send is stored once.
function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function call(request) {
  return new Promise((resolve) => {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      resolve({ ok: false, op: request.op, error: "offline", message: "not connected" });
      return;
    }
    pending.push(resolve);
    socket.send(JSON.stringify(request));
  });
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function bodyText(body) {
  if (body === null || body === undefined) return "";
  return typeof body === "string" ? body : JSON.stringify(body);
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024;
    i += 1;
  }
  return `${i ? bytes.toFixed(1) : bytes} ${units[i]}`;
}

const INLINE = ["image/png", "image/jpeg", "image/gif", "image/webp"];

// One group log entry as a line.
function entryLine(group, entry) {
  const line = el("div", "message");
  line.dataset.seq = entry.seq;
  line.dataset.id = entry.id;
  const sender = el("span", "sender", `${entry.sender}: `);
  line.append(sender);
  if (entry.kind !== "message") {
    line.classList.add("event");
    sender.textContent = `${entry.sender} `;
    line.append(el("span", "text", entry.kind === "join" ? "joined" : entry.kind === "leave" ? "left" : entry.kind));
  } else {
    line.append(el("span", "text", bodyText(entry.body)));
  }
  if (entry.attachment) {
    const a = entry.attachment;
    const url = `/files/${encodeURIComponent(group)}/${entry.seq}`;
    const link = el("a", "file", `${a.name} (${size(a.size)}, ${a.media_type})`);
    link.href = url;
    link.download = a.name;
    line.append(" ", link);
    if (INLINE.includes(a.media_type)) {
      const img = el("img");
      img.src = url;
      img.alt = a.name;
      img.loading = "lazy";
      line.append(img);
    }
  }
  line.append(el("span", "state", `#${entry.seq}`));
  line.title = entry.time;
  return line;
}

function atBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// An entry of `group`, shown once: a pending line of ours becomes it, a known seq is skipped.
function showEntry(group, entry) {
  const g = groups.get(group);
  if (!g) return;
  if (entry.seq > g.lastSeq) g.lastSeq = entry.seq;
  if (!current || current.kind !== "group" || current.name !== group) {
    if (entry.kind === "message" && entry.sender !== me) {
      g.unread += 1;
      g.li.querySelector(".unread").textContent = String(g.unread);
    }
    return;
  }
  const log = $("log");
  if (log.querySelector(`.message[data-seq="${entry.seq}"]`)) return;
  const stick = atBottom();
  const line = entryLine(group, entry);
  const mine = log.querySelector(`.message.pending[data-id="${entry.id}"]`);
  if (mine) mine.replaceWith(line);
  else {
    // In seq order: before the first line with a higher seq, else at the end (before our
    // lines still pending).
    const later = [...log.querySelectorAll(".message[data-seq]")].find(
      (m) => Number(m.dataset.seq) > entry.seq,
    );
    const firstPending = log.querySelector(".message.pending");
    log.insertBefore(line, later || firstPending || null);
  }
  if (stick) scrollDown();
}

// Events pushed by the gateway.
function pushed(message) {
  switch (message.event) {
    case "entry":
      showEntry(message.group, message.entry);
      break;
    case "dm":
      receiveDm(message.dm);
      break;
    case "error":
      status(`${message.group}: ${message.message}`);
      if (message.fatal) {
        const g = groups.get(message.group);
        if (g) g.followed = false;
      }
      break;
    default:
      break;
  }
}

function select(kind, name) {
  current = { kind, name };
  document.querySelectorAll("#side li").forEach((li) => {
    const on = (kind === "group" && li.dataset.group === name) || (kind === "dm" && li.dataset.user === name);
    li.classList.toggle("current", on);
  });
  $("title").textContent = kind === "group" ? name : `${name} (direct)`;
  $("log").replaceChildren();
  $("older").hidden = true;
  $("attach").hidden = kind !== "group";
  status("");
}

async function openGroup(name) {
  select("group", name);
  const g = groups.get(name);
  g.unread = 0;
  g.li.querySelector(".unread").textContent = "";
  const reply = await call({ op: "history", group: name, limit: PAGE });
  if (!current || current.name !== name) return;
  if (!reply.ok) {
    status(reply.error === "not_member" ? `${name}: join the group to read it` : `${name}: ${reply.error}: ${reply.message}`);
    return;
  }
  const log = $("log");
  for (const entry of reply.messages) {
    if (!log.querySelector(`.message[data-seq="${entry.seq}"]`)) log.append(entryLine(name, entry));
  }
  const last = reply.messages.length ? reply.messages[reply.messages.length - 1].seq : 0;
  g.oldest = reply.messages.length ? reply.messages[0].seq : 1;
  $("older").hidden = g.oldest <= 1;
  g.lastSeq = Math.max(g.lastSeq, last);
  scrollDown();
  // Then live, from where the history ended.
  if (!g.followed) {
    g.followed = true;
    await call({ op: "follow", group: name, after_seq: g.lastSeq });
  }
}

// Scroll-back: the page before the oldest shown.
async function older() {
  if (!current || current.kind !== "group") return;
  const name = current.name;
  const g = groups.get(name);
  if (g.oldest <= 1 || g.loading) return;
  g.loading = true;
  const reply = await call({ op: "history", group: name, before_seq: g.oldest, limit: PAGE });
  g.loading = false;
  if (!reply.ok || !current || current.name !== name) return;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  const log = $("log");
  const first = log.firstChild;
  for (const entry of reply.messages) log.insertBefore(entryLine(name, entry), first);
  if (reply.messages.length) g.oldest = reply.messages[0].seq;
  else g.oldest = 1;
  $("older").hidden = g.oldest <= 1;
  box.scrollTop = box.scrollHeight - fromBottom;
}

async function membership(op, name) {
  const reply = await call({ op, group: name });
  if (!reply.ok) return status(`${op} ${name}: ${reply.error}: ${reply.message}`);
  status(`${op === "join" ? "joined" : "left"} ${name}`);
  if (op === "join" && current && current.name === name) openGroup(name);
}

function groupItem(name) {
  const li = el("li");
  li.dataset.group = name;
  const label = el("span", "name", name);
  label.addEventListener("click", () => openGroup(name));
  const join = el("button", "join", "Join");
  join.type = "button";
  join.addEventListener("click", () => membership("join", name));
  const leave = el("button", "leave", "Leave");
  leave.type = "button";
  leave.addEventListener("click", () => membership("leave", name));
  li.append(label, el("span", "unread"), join, leave);
  return li;
}

async function loadGroups() {
  const reply = await call({ op: "groups" });
  if (!reply.ok) return status(`groups: ${reply.error}: ${reply.message}`);
  const list = $("groups");
  for (const group of reply.groups) {
    if (groups.has(group.name)) continue;
    const li = groupItem(group.name);
    groups.set(group.name, { li, lastSeq: 0, oldest: 1, followed: false, unread: 0 });
    list.append(li);
  }
}

// --- Direct messages and presence ---

function dmLine(m) {
  const line = el("div", "message dm");
  if (m.n !== undefined) line.dataset.n = m.n;
  if (m.id) line.dataset.id = m.id;
  line.append(el("span", "sender", `${m.from}: `), el("span", "text", m.text));
  line.append(el("span", "state", m.state || ""));
  if (m.pending) line.classList.add("pending");
  if (m.time) line.title = m.time;
  return line;
}

function conversation(peer) {
  if (!dms.has(peer)) dms.set(peer, []);
  return dms.get(peer);
}

function personItem(name) {
  const li = el("li");
  li.dataset.user = name;
  const presence = el("span", "presence", "offline");
  const label = el("span", "name", name);
  label.addEventListener("click", () => openDm(name));
  // Blocking refuses their direct messages (PROTOCOL §4.6.2); the button says what it does.
  const block = el("button", "block", "Block");
  block.type = "button";
  block.addEventListener("click", async () => {
    const blocked = li.dataset.blocked === "true";
    const reply = await call({ op: blocked ? "unblock" : "block", name });
    if (reply.ok) setBlocked(name, reply.blocked);
  });
  li.append(presence, label, el("span", "unread"), block);
  return li;
}

function setBlocked(name, blocked) {
  const li = person(name).li;
  li.dataset.blocked = String(blocked);
  const button = li.querySelector("button.block");
  button.textContent = blocked ? "Unblock" : "Block";
  button.title = blocked ? `${name}'s direct messages are refused` : `refuse ${name}'s direct messages`;
}

function person(name) {
  if (!people.has(name)) {
    const li = personItem(name);
    $("people").append(li);
    people.set(name, { li });
  }
  return people.get(name);
}

function setUnread(peer) {
  const count = (unreadDm.get(peer) || new Set()).size;
  person(peer).li.querySelector(".unread").textContent = count ? String(count) : "";
}

function receiveDm(dm) {
  if (seenDm.has(dm.n)) return;
  seenDm.add(dm.n);
  const m = { n: dm.n, id: dm.id, from: dm.from, to: me, text: bodyText(dm.body), time: dm.time };
  conversation(dm.from).push(m);
  if (current && current.kind === "dm" && current.name === dm.from) {
    const stick = atBottom();
    $("log").append(dmLine(m));
    if (stick) scrollDown();
    markRead([dm.n]);
  } else {
    if (!unreadDm.has(dm.from)) unreadDm.set(dm.from, new Set());
    unreadDm.get(dm.from).add(dm.n);
    setUnread(dm.from);
  }
}

// Read messages leave the mailbox: acks are cumulative, so only up to the first unread one.
async function markRead(numbers) {
  numbers.forEach((n) => readDm.add(n));
  let upTo = ackedDm;
  const all = [...seenDm].sort((a, b) => a - b);
  for (const n of all) {
    if (n <= ackedDm) continue;
    if (!readDm.has(n)) break;
    upTo = n;
  }
  if (upTo > ackedDm) {
    ackedDm = upTo;
    await call({ op: "dm_read", up_to: upTo });
  }
}

function openDm(peer) {
  select("dm", peer);
  const list = conversation(peer);
  $("log").replaceChildren(...list.map(dmLine));
  scrollDown();
  const unread = [...(unreadDm.get(peer) || [])];
  unreadDm.delete(peer);
  setUnread(peer);
  if (unread.length) markRead(unread);
}

async function loadPeople() {
  const reply = await call({ op: "users" });
  if (!reply.ok) return;
  for (const user of reply.users) {
    if (user.name === me) continue;
    const p = person(user.name);
    const dot = p.li.querySelector(".presence");
    const presence = user.presence || "offline";
    dot.className = `presence ${presence}`;
    dot.textContent = presence;
    dot.title = presence;
  }
  const blocked = await call({ op: "blocked" });
  if (!blocked.ok) return;
  for (const b of blocked.blocked) {
    if (people.has(b.name)) setBlocked(b.name, true);
  }
}

// --- Sending ---

async function sendText(text) {
  const id = uuid();
  if (current.kind === "group") {
    const group = current.name;
    const line = el("div", "message pending");
    line.dataset.id = id;
    line.append(el("span", "sender", `${me}: `), el("span", "text", text), el("span", "state", "sending…"));
    $("log").append(line);
    scrollDown();
    const reply = await call({ op: "send", group, text, id });
    if (!reply.ok) {
      line.querySelector(".state").textContent = `not sent: ${reply.error}`;
      return status(`not sent: ${reply.error}: ${reply.message}`);
    }
    status(`stored as #${reply.ack.seq}`);
    // The live entry may have replaced the pending line already.
    if (line.isConnected && current && current.name === group) {
      if ($("log").querySelector(`.message[data-seq="${reply.ack.seq}"]`)) line.remove();
      else {
        line.classList.remove("pending");
        line.dataset.seq = reply.ack.seq;
        line.querySelector(".state").textContent = `#${reply.ack.seq}`;
      }
    }
  } else {
    const peer = current.name;
    const m = { id, from: me, to: peer, text, state: "sending…", pending: true };
    conversation(peer).push(m);
    const line = dmLine(m);
    $("log").append(line);
    scrollDown();
    const reply = await call({ op: "dm", to: peer, text, id });
    m.pending = false;
    m.state = reply.ok ? "delivered to the mailbox" : `not sent: ${reply.error}`;
    line.classList.remove("pending");
    line.querySelector(".state").textContent = m.state;
    if (!reply.ok) status(`not sent: ${reply.error}: ${reply.message}`);
  }
}

$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("text");
  if (!current || !input.value) return;
  const text = input.value;
  input.value = "";
  sendText(text);
});

// Attachments: the bytes go over HTTP (the WebSocket carries JSON only); the bar shows the
// upload to the gateway, then the gateway stores it at the node and answers with the ack.
$("file").addEventListener("change", () => {
  const input = $("file");
  const file = input.files[0];
  if (!file || !current || current.kind !== "group") return;
  const group = current.name;
  const caption = $("text").value;
  $("text").value = "";
  const params = new URLSearchParams({ name: file.name, type: file.type || "application/octet-stream" });
  if (caption) params.set("caption", caption);
  const bar = $("progress");
  bar.hidden = false;
  bar.value = 0;
  status(`uploading ${file.name}…`);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/files/${encodeURIComponent(group)}?${params}`);
  xhr.setRequestHeader("X-Agora-CSRF", CSRF);
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) bar.value = e.loaded / e.total;
  });
  xhr.upload.addEventListener("load", () => status(`storing ${file.name}…`));
  xhr.addEventListener("loadend", () => {
    bar.hidden = true;
    input.value = "";
    let reply = null;
    try {
      reply = JSON.parse(xhr.responseText);
    } catch (e) {
      reply = { ok: false, error: `HTTP ${xhr.status}`, message: xhr.statusText };
    }
    if (reply.ok) status(`${file.name} stored as #${reply.ack.seq}`);
    else status(`${file.name} not sent: ${reply.error}: ${reply.message}`);
  });
  xhr.send(file);
});

$("older").addEventListener("click", older);
$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop === 0) older();
});

// --- The connection, and catching up after it drops ---

let retry = 500;

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    if (message.event) return pushed(message);
    const resolve = pending.shift();
    if (resolve) resolve(message);
  });
  socket.addEventListener("open", async () => {
    retry = 500;
    status("");
    const who = await call({ op: "whoami" });
    if (who.ok) {
      me = who.user;
      $("whoami").textContent = me;
      $("signout").hidden = !who.hosted;
    }
    await loadGroups();
    // Groups followed before the drop resume after the last seq shown: nothing is missed.
    for (const [name, g] of groups) {
      if (g.followed) await call({ op: "follow", group: name, after_seq: g.lastSeq });
    }
    const inbox = await call({ op: "inbox" });
    if (inbox.ok) inbox.messages.forEach(receiveDm);
    await loadPeople();
  });
  socket.addEventListener("close", () => {
    const waiting = pending;
    pending = [];
    waiting.forEach((resolve) => resolve({ ok: false, error: "offline", message: "connection lost" }));
    status("connection lost; reconnecting…");
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  });
}

setInterval(() => {
  if (socket && socket.readyState === WebSocket.OPEN) loadPeople();
}, 5000);

connect();
