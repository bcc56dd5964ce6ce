// tower-channels JavaScript client: one ES module, no dependencies.
//
// Connects to a tower-channels route with WebSocket and falls back by itself
// to Server-Sent Events, HTTP-streaming (a fetch body read as a stream) and
// long-polling (the HTTP fallback protocol, v1). Reconnects with jittered
// exponential backoff and resumes from the last stream position it saw, so
// the app sees no gap and no duplicate. Types: tower-channels.d.ts.
//
//   import { connect } from "/tower-channels.js";
//   const conn = connect("/ws/chat/lobby", {
//     onmessage: (data) => console.log(data),
//     onstate: (s) => console.log(s.state, s.transport),
//   });
//   conn.send(JSON.stringify({ message: "hi" }));
//   conn.close();

/** Every transport, in the default order. */
export const TRANSPORTS = Object.freeze(["websocket", "sse", "stream", "poll"]);

const DEFAULTS = {
  transports: TRANSPORTS,
  openTimeout: 5000, // a transport silent this long before it opens is given up
  idleTimeout: 60000, // stream/poll: nothing (not even a ping) this long = dead
  pollTimeout: 40000, // one long-poll request (the server holds it up to 25 s)
  backoffMin: 250,
  backoffMax: 10000,
  maxQueue: 1000, // messages waiting to be sent
  maxFrame: 16 << 20, // bytes of one unfinished stream line
  resume: true,
};

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential from
 * `min`, capped at `max`, with "equal jitter" (a random point in the upper
 * half), so that clients dropped together do not come back together.
 */
export function backoff(attempt, min = DEFAULTS.backoffMin, max = DEFAULTS.backoffMax, random = Math.random) {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(cap / 2 + (random() * cap) / 2);
}

/** A stream position from an event id `<epoch>:<offset>`, else null. */
export function parseId(id) {
  if (typeof id !== "string") return null;
  const i = id.lastIndexOf(":");
  const offset = i > 0 && /^\d+$/.test(id.slice(i + 1)) ? Number(id.slice(i + 1)) : NaN;
  return Number.isSafeInteger(offset) ? { epoch: id.slice(0, i), offset } : null;
}

/** The top-level `offset`/`epoch` of a JSON object text message, else null. */
export function positionOf(text) {
  if (typeof text !== "string" || !text.includes('"offset"')) return null;
  try {
    const v = JSON.parse(text);
    if (v && Number.isSafeInteger(v.offset) && typeof v.epoch === "string" && v.epoch) {
      return { epoch: v.epoch, offset: v.offset };
    }
  } catch {
    // not JSON: no position
  }
  return null;
}

/** Opens a connection: `new Connection(url, options)`. */
export function connect(url, options) {
  return new Connection(url, options);
}

const fromBase64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)).buffer;
const parse = (s) => {
  try {
    return JSON.parse(s);
  } catch {
    return null;
  }
};

/** One logical connection that survives transport drops. */
export class Connection {
  constructor(url, options = {}) {
    const o = { ...DEFAULTS, ...options };
    this.options = o;
    const base = o.base ?? globalThis.location?.href;
    this.url = new URL(url, base);
    this.url.protocol = this.url.protocol.replace(/^ws/, "http");
    const g = globalThis;
    this._ws = o.WebSocket === undefined ? g.WebSocket : o.WebSocket;
    this._es = o.EventSource === undefined ? g.EventSource : o.EventSource;
    this._fetch = o.fetch === undefined ? g.fetch && g.fetch.bind(g) : o.fetch;
    const can = {
      websocket: typeof this._ws === "function",
      sse: typeof this._es === "function",
      stream: typeof this._fetch === "function" && typeof g.TextDecoderStream === "function",
      poll: typeof this._fetch === "function",
    };
    /** The transports this connection may use, in order. */
    this.transports = o.transports.filter((t) => can[t]);
    if (!this.transports.length) throw new Error("tower-channels: no usable transport among " + o.transports);
    this.onmessage = o.onmessage ?? null;
    this.onstate = o.onstate ?? null;
    this.onerror = o.onerror ?? null;
    /** The last stream position seen ({epoch, offset}) or null. */
    this.position = o.position ?? null;
    /** "connecting", "open" or "closed". */
    this.state = "connecting";
    /** The transport in use, being tried, or that closed last. */
    this.transport = null;
    this._queue = [];
    this._attempt = 0; // reconnect attempts since a connection that lasted
    this._pref = 0; // index of the transport that last opened
    this._t = null; // the current attempt or session
    this._timer = null;
    this._closed = false;
    // Callbacks run from the next microtask on, never inside `connect()`:
    // handlers set right after it see every state.
    queueMicrotask(() => this._round());
  }

  /** The WebSocket extensions negotiated ("" on other transports). */
  get extensions() {
    return (this._t && this._t.ws && this._t.ws.extensions) || "";
  }

  /**
   * Sends a text (string) or binary (ArrayBuffer, typed array, Blob)
   * message. Queued while connecting and sent in order once open; on HTTP
   * transports one POST at a time, retried until the server has it. Returns
   * false when closed or the queue is full.
   */
  send(data) {
    if (this._closed || this._queue.length >= this.options.maxQueue) return false;
    this._queue.push(data);
    this._flush();
    return true;
  }

  /** Drops the current transport and reconnects at once, resuming. */
  reconnect() {
    if (this._closed) return;
    this._stop(this._t);
    clearTimeout(this._timer);
    this._attempt = 0;
    this._round();
  }

  /** Closes for good (DELETE of the session on HTTP transports). */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    const t = this.transport;
    this._stop(this._t);
    this._queue = [];
    this._state("closed", { transport: t, code: 1000, reason: "", retryIn: null });
  }

  _state(state, info) {
    this.state = state;
    this.transport = info.transport;
    if (this.onstate) this.onstate({ state, ...info });
  }

  // One round: every transport once, from the one that last worked.
  _round() {
    if (this._closed) return;
    this._tried = 0;
    this._try(this._pref);
  }

  _try(i) {
    const name = this.transports[i];
    const t = { name, i, open: false, ctls: new Set() };
    this._t = t;
    this._state("connecting", { transport: name });
    t.timer = setTimeout(() => this._fail(t), this.options.openTimeout);
    OPEN[name](this, t, this._openUrl(name));
  }

  _openUrl(name) {
    const u = new URL(this.url);
    const p = this.position;
    if (this.options.resume && p) {
      u.searchParams.set("offset", p.offset);
      u.searchParams.set("epoch", p.epoch);
    }
    if (name === "websocket") u.protocol = u.protocol.replace("http", "ws");
    else u.searchParams.set("transport", name);
    return u.href;
  }

  // The route path with `params` (session requests carry no app query).
  _sessionUrl(t, params) {
    const u = new URL(this.url.pathname, this.url);
    u.search = new URLSearchParams({ session: t.session, token: t.token, ...params });
    return u.href;
  }

  // Failed before it opened: the next transport, or a backoff after a round.
  _fail(t) {
    if (t !== this._t) return;
    this._stop(t);
    if (++this._tried < this.transports.length) {
      this._try((t.i + 1) % this.transports.length);
    } else {
      this._retry(t.name, 1006, "no transport could connect");
    }
  }

  _opened(t) {
    if (t !== this._t || t.open) return;
    clearTimeout(t.timer);
    t.open = true;
    t.seq = 1;
    t.postTries = 0;
    t.since = Date.now();
    this._pref = t.i;
    this._state("open", { transport: t.name });
    this._flush();
  }

  // An open transport ended (or a close frame came): reconnect.
  _lost(t, code, reason) {
    if (t !== this._t) return;
    if (!t.open) return this._fail(t);
    this._stop(t);
    // The backoff starts over only after a connection that lasted: one
    // that dies right after opening (a proxy killing it) keeps backing off.
    if (Date.now() - t.since >= this.options.openTimeout) this._attempt = 0;
    this._retry(t.name, code, reason);
  }

  _retry(name, code, reason) {
    const o = this.options;
    const delay = backoff(this._attempt++, o.backoffMin, o.backoffMax);
    this._state("closed", { transport: name, code, reason, retryIn: delay });
    this._timer = setTimeout(() => this._round(), delay);
  }

  _stop(t) {
    if (!t) return;
    if (this._t === t) this._t = null;
    clearTimeout(t.timer);
    clearTimeout(t.idle);
    if (t.ws) {
      t.ws.onopen = t.ws.onmessage = t.ws.onclose = t.ws.onerror = null;
      try {
        t.ws.close(1000);
      } catch {
        // already closed
      }
    }
    if (t.es) t.es.close();
    for (const c of t.ctls) c.abort();
    if (t.session && !t.gone && t.open) {
      t.gone = true;
      this._fetch(this._sessionUrl(t, {}), { method: "DELETE", keepalive: true }).catch(() => {});
    }
  }

  // A message for the app, unless its position is at or before the last one.
  _deliver(t, data, id) {
    if (t !== this._t) return;
    if (this.options.resume) {
      const p = id ? parseId(id) : positionOf(data);
      const last = this.position;
      if (p) {
        if (last && last.epoch === p.epoch && p.offset <= last.offset) return;
        this.position = p;
      }
    }
    if (this.onmessage) this.onmessage(data);
  }

  // A frame of the stream and poll transports.
  _frame(t, f) {
    if (!f || typeof f !== "object") return;
    if (f.type === "open") {
      t.session = f.session;
      t.token = f.token;
      this._opened(t);
    } else if (!t.open) {
      // nothing before open
    } else if (f.type === "text") this._deliver(t, String(f.data), f.id);
    else if (f.type === "binary") this._deliver(t, fromBase64(f.data), null);
    else if (f.type === "close") {
      t.gone = true;
      this._lost(t, f.code ?? 1005, f.reason ?? "");
    }
  }

  // Arms (or re-arms) the stream/poll liveness timer.
  _alive(t) {
    clearTimeout(t.idle);
    if (t !== this._t) return;
    t.idle = setTimeout(() => this._lost(t, 1006, "no data from the server"), this.options.idleTimeout);
  }

  // A fetch aborted when `t` stops (and after `ms` if given). A `body`
  // fetch stays abortable while its body is read; others only until the
  // answer's headers.
  async _request(t, url, init, ms, body = false) {
    const c = new AbortController();
    t.ctls.add(c);
    const timer = ms && setTimeout(() => c.abort(), ms);
    try {
      return await this._fetch(url, { cache: "no-store", ...init, signal: c.signal });
    } catch (e) {
      t.ctls.delete(c);
      throw e;
    } finally {
      clearTimeout(timer);
      if (!body) t.ctls.delete(c);
    }
  }

  _flush() {
    const t = this._t;
    if (!t || !t.open || !this._queue.length) return;
    if (t.ws) {
      while (this._queue.length) t.ws.send(this._queue.shift());
    } else if (!t.posting) {
      this._post(t);
    }
  }

  // POSTs the head of the queue with the session's next seq, one at a time.
  async _post(t) {
    t.posting = true;
    const data = this._queue[0];
    const binary = typeof data !== "string";
    let res = null;
    try {
      res = await this._request(t, this._sessionUrl(t, { seq: t.seq }), {
        method: "POST",
        body: data,
        headers: { "content-type": binary ? "application/octet-stream" : "text/plain;charset=utf-8" },
      });
    } catch {
      // network error: retried below with the same seq
    }
    t.posting = false;
    if (t !== this._t) return; // the next session sends the queue again
    const status = res ? res.status : 0;
    if (res && res.ok) {
      this._queue.shift();
      t.seq++;
      t.postTries = 0;
      this._flush();
    } else if (status === 404 || status === 409) {
      // The session is gone (or closed on a gap): a new one sends the queue.
      t.gone = true;
      this._lost(t, 1006, "session lost (" + status + ")");
    } else if (!res || status === 429 || status >= 500) {
      const o = this.options;
      t.posting = true; // nothing else goes out before the retry
      setTimeout(() => {
        t.posting = false;
        this._flush();
      }, backoff(t.postTries++, o.backoffMin / 2, o.backoffMax / 2));
    } else {
      // 400, 403, 413: this message can never go through; the seq is reused.
      this._queue.shift();
      const reason = await res.text().catch(() => "");
      if (this.onerror) this.onerror({ status, reason, data });
      this._flush();
    }
  }
}

const OPEN = {
  websocket(c, t, url) {
    let ws;
    try {
      ws = new c._ws(url);
    } catch {
      return queueMicrotask(() => c._fail(t));
    }
    t.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => c._opened(t);
    ws.onmessage = (e) => c._deliver(t, e.data, null);
    ws.onclose = (e) => c._lost(t, e.code, e.reason);
    // Before open, an error is the end (some runtimes fire no close then).
    ws.onerror = () => t.open || c._fail(t);
  },

  sse(c, t, url) {
    const es = new c._es(url);
    t.es = es;
    let lastId = "";
    // The server's `open` event has data; EventSource's own has none.
    es.addEventListener("open", (e) => {
      const f = typeof e.data === "string" && parse(e.data);
      if (f) c._frame(t, { ...f, type: "open" });
    });
    // lastEventId carries over to events without an id: only a new one counts.
    es.onmessage = (e) => {
      const id = e.lastEventId !== lastId ? e.lastEventId : null;
      lastId = e.lastEventId;
      c._deliver(t, e.data, id);
    };
    es.addEventListener("binary", (e) => c._deliver(t, fromBase64(e.data), null));
    es.addEventListener("close", (e) => c._frame(t, { ...parse(e.data), type: "close" }));
    // EventSource would reconnect by itself, without our position: stop it.
    es.onerror = () => c._lost(t, 1006, "");
  },

  async stream(c, t, url) {
    try {
      const res = await c._request(t, url, { headers: { accept: "application/x-ndjson" } }, 0, true);
      if (!res.ok || !res.body || !/ndjson/.test(res.headers.get("content-type"))) {
        return c._fail(t);
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      while (t === c._t) {
        c._alive(t);
        const { value, done } = await reader.read();
        if (done || t !== c._t) break;
        buf += value;
        for (let nl; (nl = buf.indexOf("\n")) >= 0; ) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.trim()) c._frame(t, parse(line));
        }
        if (buf.length > c.options.maxFrame) break;
      }
      reader.cancel().catch(() => {});
    } catch {
      // aborted or broken: ends below
    }
    c._lost(t, 1006, "");
  },

  async poll(c, t, url) {
    let errors = 0;
    t.ack = 0;
    for (;;) {
      let frames = null;
      let status = 0;
      try {
        const res = await c._request(t, url, { headers: { accept: "application/json" } }, c.options.pollTimeout);
        status = res.status;
        if (res.ok) frames = await res.json();
      } catch {
        // network error or timeout
      }
      if (t !== c._t) return;
      if (!Array.isArray(frames)) {
        // Before open, or the session is gone: give up; else retry a few times.
        if (!t.open || status === 404 || status === 403 || ++errors > 3) {
          return c._lost(t, 1006, status ? "poll answered " + status : "");
        }
        await new Promise((r) => setTimeout(r, backoff(errors, 250, 2000)));
        if (t !== c._t) return;
        continue;
      }
      errors = 0;
      for (const f of frames) {
        t.ack++;
        c._frame(t, f);
        if (t !== c._t) return;
      }
      if (!t.open) return c._fail(t);
      url = c._sessionUrl(t, { transport: "poll", ack: t.ack });
    }
  },
};
