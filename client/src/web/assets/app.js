// Huddle's local page. It talks only to the `huddle web` process that
// served it; that process holds the keys and does the cryptography.
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  me: null,
  groups: [],
  current: null,
  shown: new Set(),
  lastSeq: 0,
  firstSeq: 0,
  uploads: new Map(),
};

// ---- helpers ------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) throw new Error((data && data.error) || text.trim() || r.statusText);
  return data;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function size(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${u[i]}`;
}

function time(ms) {
  const d = new Date(ms);
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
}

function duration(s) {
  if (!isFinite(s)) return '…';
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

let toastTimer = null;
function toast(msg) {
  const t = $('toast');
  t.textContent = msg;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 6000);
}

async function attempt(f) {
  try { return await f(); } catch (e) { toast(e.message); return undefined; }
}

// ---- groups -------------------------------------------------------------

async function loadGroups() {
  state.groups = await api('GET', '/api/groups');
  renderGroups();
}

function renderGroups() {
  const list = $('groups');
  list.replaceChildren();
  const current = state.groups.filter((g) => g.state === 'active' || g.state === 'leaving');
  const gone = state.groups.filter((g) => !(g.state === 'active' || g.state === 'leaving'));
  for (const g of [...current, ...gone]) {
    const li = el('li');
    li.dataset.group = g.group;
    li.tabIndex = 0;
    if (g.group === state.current) li.classList.add('current');
    if (!current.includes(g)) li.classList.add('gone');
    li.append(el('span', 'name', g.name || g.group.slice(0, 8)));
    li.append(el('span', 'unread', g.unread ? String(g.unread) : ''));
    const last = g.last ? `${g.last.own ? 'you' : g.last.from}: ${g.last.text || g.last.name || g.last.line}` : `${g.members} member(s) · ${g.state}`;
    li.append(el('span', 'last', last));
    li.addEventListener('click', () => openGroup(g.group));
    li.addEventListener('keydown', (e) => { if (e.key === 'Enter') openGroup(g.group); });
    list.append(li);
  }
  syncComposer();
}

// Only an active group takes messages and membership changes.
function syncComposer() {
  const g = currentGroup();
  const active = !!g && g.state === 'active';
  for (const b of ['show-members', 'leave', 'text', 'send']) $(b).disabled = !active;
}

function currentGroup() {
  return state.groups.find((g) => g.group === state.current);
}

async function openGroup(id) {
  state.current = id;
  state.shown.clear();
  state.lastSeq = 0;
  $('app').classList.add('in-chat');
  const g = currentGroup();
  $('chat-name').textContent = g ? (g.name || id.slice(0, 8)) : id.slice(0, 8);
  const active = g && g.state === 'active';
  $('messages').replaceChildren();
  renderGroups();
  const data = await attempt(() => api('GET', `/api/groups/${id}/messages?limit=${PAGE}`));
  if (!data || state.current !== id) return;
  for (const ev of data.events) appendEvent(ev);
  state.firstSeq = data.events.length ? data.events[0].seq : 0;
  if (data.events.length === PAGE) $('messages').prepend(earlierButton());
  renderUploads();
  markRead();
  if (!$('members').hidden) showMembers();
  if (active) $('text').focus();
}

// History comes a page at a time; older pages on request.
const PAGE = 200;

function earlierButton() {
  const li = el('li', 'note');
  const b = el('button', '', 'Show earlier messages');
  b.type = 'button';
  b.id = 'earlier';
  b.onclick = async () => {
    const id = state.current;
    const data = await attempt(() => api('GET', `/api/groups/${id}/messages?limit=${PAGE}&before=${state.firstSeq}`));
    if (!data || state.current !== id) return;
    const list = $('messages');
    const from = list.scrollHeight - list.scrollTop;
    li.remove();
    const older = data.events.filter((ev) => !state.shown.has(eventKey(ev)));
    for (const ev of older) state.shown.add(eventKey(ev));
    list.prepend(...older.map(renderEvent));
    if (data.events.length) state.firstSeq = data.events[0].seq;
    if (data.events.length === PAGE) list.prepend(earlierButton());
    list.scrollTop = list.scrollHeight - from;
  };
  li.append(b);
  return li;
}

function markRead() {
  const g = currentGroup();
  if (!g || !state.lastSeq) return;
  g.unread = 0;
  renderGroups();
  api('POST', `/api/groups/${g.group}/read`, { seq: state.lastSeq }).catch(() => {});
}

// ---- messages -----------------------------------------------------------

function eventKey(ev) {
  return `${ev.group}/${ev.seq}/${ev.type}/${ev.media_id || ''}/${ev.line}`;
}

function appendEvent(ev) {
  const key = eventKey(ev);
  if (state.shown.has(key)) return;
  state.shown.add(key);
  state.lastSeq = Math.max(state.lastSeq, ev.seq);
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(renderEvent(ev));
  if (atBottom || ev.own) list.scrollTop = list.scrollHeight;
}

function renderEvent(ev) {
  if (ev.type !== 'text' && ev.type !== 'media') {
    const warn = ev.type === 'key_changed' || ev.type === 'fork_detected' || ev.type === 'error';
    const li = el('li', warn ? 'note warning' : 'note', `${ev.line} · ${time(ev.timestamp_ms)}`);
    li.dataset.type = ev.type;
    return li;
  }
  const li = el('li', ev.own ? 'msg own' : 'msg');
  li.dataset.seq = ev.seq;
  li.dataset.type = ev.type;
  const meta = el('div', 'meta');
  meta.append(el('span', 'from', ev.own ? 'you' : ev.from), el('time', '', time(ev.timestamp_ms)));
  li.append(meta);
  if (ev.type === 'text') {
    li.append(el('div', 'body', ev.text));
  } else {
    li.append(renderMedia(ev));
    if (ev.text) li.append(el('div', 'body', ev.text));
  }
  return li;
}

// Pictures: the preview that came inside the message at once, the full
// picture (checked chunk by chunk by the local engine) once it is in view.
const fullLoader = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    fullLoader.unobserve(e.target);
    const img = e.target;
    const full = new Image();
    full.onload = () => {
      img.src = full.src;
      img.classList.remove('preview');
      img.classList.add('full');
    };
    full.onerror = () => { img.title = 'the full picture could not be fetched'; };
    full.src = img.dataset.full;
  }
});

function renderMedia(ev) {
  const src = `/api/media/${ev.media_id}`;
  const mime = (ev.mime || '').toLowerCase();
  if (/^image\/(png|jpeg|gif|webp)$/.test(mime)) {
    const img = el('img', 'preview');
    img.alt = ev.name;
    img.dataset.full = src;
    img.dataset.media = ev.media_id;
    img.src = `${src}/preview`;
    img.onerror = () => { if (img.classList.contains('preview')) img.removeAttribute('src'); };
    img.addEventListener('click', () => view(img.dataset.full));
    fullLoader.observe(img);
    return img;
  }
  if (/^video\/(mp4|webm|ogg)$/.test(mime)) {
    const v = el('video');
    v.controls = true;
    v.preload = 'metadata';
    v.src = src;
    v.dataset.media = ev.media_id;
    return v;
  }
  if (/^audio\//.test(mime)) {
    const a = el('audio');
    a.controls = true;
    a.preload = 'none';
    a.src = src;
    return a;
  }
  const a = el('a', 'file', `${ev.name} (${size(ev.size)})`);
  a.href = `${src}?download=1`;
  a.download = ev.name;
  return a;
}

function view(src) {
  $('viewer-img').src = src;
  $('viewer').hidden = false;
}

async function sendText() {
  const box = $('text');
  const text = box.value;
  if (!text.trim() || !state.current) return;
  box.disabled = true;
  const ev = await attempt(() => api('POST', `/api/groups/${state.current}/messages`, { text }));
  box.disabled = false;
  if (ev) {
    box.value = '';
    grow();
    if (ev.group === state.current) appendEvent(ev);
  }
  box.focus();
}

function grow() {
  const box = $('text');
  box.style.height = 'auto';
  box.style.height = `${box.scrollHeight}px`;
}

// ---- files --------------------------------------------------------------

function sendFiles(files) {
  if (!state.current) return;
  for (const f of files) sendFile(state.current, f);
}

function sendFile(group, file) {
  const local = `local-${Math.random().toString(36).slice(2)}`;
  state.uploads.set(local, { id: local, group, name: file.name, size: file.size, state: 'handing_over', sent: 0 });
  renderUploads();
  const xhr = new XMLHttpRequest();
  xhr.open('POST', `/api/groups/${group}/files?name=${encodeURIComponent(file.name)}`);
  xhr.upload.onprogress = (e) => {
    const u = state.uploads.get(local);
    if (u) { u.sent = e.loaded; renderUploads(); }
  };
  xhr.onload = () => {
    state.uploads.delete(local);
    let data = null;
    try { data = JSON.parse(xhr.responseText); } catch (_) { data = null; }
    if (xhr.status !== 200 || !data) {
      toast((data && data.error) || `the file could not be handed over (${xhr.status})`);
    } else if (!state.uploads.has(data.upload)) {
      state.uploads.set(data.upload, { id: data.upload, group, name: file.name, size: data.size, state: 'queued', sent: 0 });
    }
    renderUploads();
  };
  xhr.onerror = () => {
    state.uploads.delete(local);
    renderUploads();
    toast(`${file.name} could not be handed over`);
  };
  state.uploads.get(local).xhr = xhr;
  xhr.send(file);
}

function onUpload(m) {
  if (m.state === 'done' || m.state === 'dropped') {
    state.uploads.delete(m.id);
  } else {
    const u = state.uploads.get(m.id) || {};
    const now = Date.now();
    state.uploads.set(m.id, { ...u, ...m, at: now });
  }
  renderUploads();
}

function renderUploads() {
  const list = $('uploads');
  list.replaceChildren();
  for (const u of state.uploads.values()) {
    if (u.group !== state.current) continue;
    const li = el('li');
    li.dataset.upload = u.id;
    li.dataset.state = u.state;
    const bar = el('progress');
    bar.max = u.size || 1;
    bar.value = u.sent || 0;
    let what;
    if (u.state === 'handing_over') what = `preparing ${size(u.sent || 0)} of ${size(u.size)}`;
    else if (u.state === 'sending') {
      const left = u.rate > 0 ? (u.size - u.sent) / u.rate : Infinity;
      what = `${size(u.sent || 0)} of ${size(u.size)} · ${size(u.rate || 0)}/s · ${duration(left)} left`;
    } else if (u.state === 'failed') what = `failed: ${u.error}`;
    else what = u.state;
    li.append(el('span', '', u.name), bar, el('span', 'what', what));
    if (u.state === 'handing_over') {
      const b = el('button', '', 'Cancel');
      b.type = 'button';
      b.onclick = () => { if (u.xhr) u.xhr.abort(); state.uploads.delete(u.id); renderUploads(); };
      li.append(b);
    } else if (u.state === 'sending' || u.state === 'queued') {
      const b = el('button', '', 'Pause');
      b.type = 'button';
      b.onclick = () => attempt(() => api('DELETE', `/api/uploads/${u.id}`));
      li.append(b);
    } else {
      const r = el('button', '', 'Resume');
      r.type = 'button';
      r.onclick = () => attempt(() => api('POST', `/api/uploads/${u.id}/resume`));
      const d = el('button', '', 'Discard');
      d.type = 'button';
      d.onclick = () => attempt(() => api('DELETE', `/api/uploads/${u.id}`));
      li.append(r, d);
    }
    list.append(li);
  }
}

async function loadUploads() {
  const list = await attempt(() => api('GET', '/api/uploads'));
  if (!list) return;
  for (const u of list) state.uploads.set(u.id, u);
  renderUploads();
}

// ---- members ------------------------------------------------------------

async function showMembers() {
  const g = currentGroup();
  if (!g) return;
  $('members').hidden = false;
  const data = await attempt(() => api('GET', `/api/groups/${g.group}/members`));
  if (!data || state.current !== g.group) return;
  const list = $('member-list');
  list.replaceChildren();
  $('add-member').hidden = !data.may_add;
  for (const m of data.members) {
    const li = el('li');
    li.dataset.user = m.user;
    const who = el('div', 'who');
    const name = el('span');
    name.append(el('strong', '', m.user), el('span', 'role', ` ${m.role} · ${m.devices} device(s)`));
    who.append(name);
    if (m.may_remove) {
      const b = el('button', '', 'Remove');
      b.type = 'button';
      b.onclick = async () => {
        if (!confirm(`Remove ${m.user} from ${g.name}? They will not read what is sent from now on.`)) return;
        if (await attempt(() => api('DELETE', `/api/groups/${g.group}/members/${encodeURIComponent(m.user)}`))) showMembers();
      };
      who.append(b);
    }
    li.append(who);
    for (const k of m.keys) {
      li.append(el('code', '', `${k.principal}: ${k.fingerprint}`));
      if (k.changed) li.append(el('div', 'changed', `⚠ ${k.principal}'s key differs from the one first seen: check it with them before you trust it`));
    }
    list.append(li);
  }
}

// ---- live events --------------------------------------------------------

function setLink(m) {
  const l = $('link');
  l.className = `link ${m.state}`;
  l.textContent = m.state === 'connected' ? 'connected'
    : m.state === 'lost' ? `reconnecting in ${m.retry_in_s} s…` : 'connecting…';
  l.title = m.reason || m.server || '';
}

let groupsRefresh = null;
function refreshGroupsSoon() {
  clearTimeout(groupsRefresh);
  groupsRefresh = setTimeout(() => attempt(loadGroups), 150);
}

function listen() {
  const es = new EventSource('/api/events');
  es.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.kind === 'event') {
      const ev = m.event;
      if (ev.type === 'listening' || ev.type === 'error' && !ev.group) return;
      if (ev.group === state.current) {
        appendEvent(ev);
        if (document.visibilityState === 'visible') markRead();
      }
      refreshGroupsSoon();
    } else if (m.kind === 'link') {
      setLink(m);
    } else if (m.kind === 'upload') {
      onUpload(m);
    } else if (m.kind === 'groups') {
      refreshGroupsSoon();
    } else if (m.kind === 'resync') {
      refreshGroupsSoon();
      if (state.current) openGroup(state.current);
    }
  };
  es.onerror = () => setLink({ state: 'lost', retry_in_s: 3, reason: 'the local huddle web process does not answer' });
}

// ---- start --------------------------------------------------------------

function wire() {
  $('composer').addEventListener('submit', (e) => { e.preventDefault(); sendText(); });
  $('text').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendText(); }
  });
  $('text').addEventListener('input', grow);
  $('file-input').addEventListener('change', (e) => { sendFiles(e.target.files); e.target.value = ''; });
  $('new-group').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('new-group-name').value.trim();
    if (!name) return;
    const r = await attempt(() => api('POST', '/api/groups', { name }));
    if (r) { $('new-group-name').value = ''; await loadGroups(); openGroup(r.group); }
  });
  $('show-members').addEventListener('click', showMembers);
  $('close-members').addEventListener('click', () => { $('members').hidden = true; });
  $('add-member').addEventListener('submit', async (e) => {
    e.preventDefault();
    const users = $('add-name').value.split(',').map((s) => s.trim()).filter(Boolean);
    if (!users.length || !state.current) return;
    if (await attempt(() => api('POST', `/api/groups/${state.current}/members`, { users }))) {
      $('add-name').value = '';
      showMembers();
    }
  });
  $('leave').addEventListener('click', async () => {
    const g = currentGroup();
    if (!g || !confirm(`Leave ${g.name}? You will not read what is sent from now on.`)) return;
    if (await attempt(() => api('POST', `/api/groups/${g.group}/leave`))) loadGroups().then(() => openGroup(g.group));
  });
  $('back').addEventListener('click', () => { $('app').classList.remove('in-chat'); });
  $('viewer').addEventListener('click', () => { $('viewer').hidden = true; });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { $('viewer').hidden = true; $('members').hidden = true; }
  });
  document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible') markRead(); });
  const chat = $('chat');
  let depth = 0;
  chat.addEventListener('dragenter', (e) => { e.preventDefault(); depth++; if (state.current) $('drop').hidden = false; });
  chat.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); if (!depth) $('drop').hidden = true; });
  chat.addEventListener('dragover', (e) => e.preventDefault());
  chat.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    $('drop').hidden = true;
    sendFiles(e.dataTransfer.files);
  });
}

async function start() {
  wire();
  const me = await attempt(() => api('GET', '/api/me'));
  if (!me) return;
  state.me = me;
  $('me-name').textContent = me.principal;
  $('me-name').title = `your key's fingerprint: ${me.fingerprint}`;
  setLink(me.link);
  listen();
  await attempt(loadGroups);
  await loadUploads();
}

start();
