// edge-box.js: Scratch blocks for an edge box, talking to the box's own WebSocket (no broker).
// Served by the box at /scratch/edge-box.js; its default address is the box it came from.
// The box's own Scratch editor (/scratch/) preloads it in the page; see docs/web.md for why an
// editor from the internet cannot reach the box.
(function (Scratch) {
  "use strict";
  const DEFAULT_URL = __EDGE_DEFAULT_WS__;
  const TIMEOUT = 8000;           // ms to find the box
  const ANSWER_TIMEOUT = 70000;   // ms for the box to answer a command
  const NO_PICTURE = 15000;       // ms without a new picture before a teach block lets go (at least
                                  // 3 times the longest gap between its pictures so far); less than
                                  // the box's own end of such a recording (rules.RECORD_IDLE_SECONDS,
                                  // 4 gaps), so the block lets go first and says why
  const STOP_WAIT = 5000;         // ms for the recording to end once a teach block let go

  // Class names compare the way the box compares them (edge/rules.py: Python's str.casefold(),
  // after trimming what the user typed). Lower, upper, then lower case again folds every letter a
  // class name may hold, in Unicode's composed form (NFC, as the box keeps names), as casefold does (ß and ẞ to ss, ﬁ to fi, Cherokee, İ), once the final
  // sigma is made σ and the dotless ı is kept out of it (casefold keeps ı apart from I and i).
  // Checked against Python's casefold for every Unicode letter and digit (Node 20, Python 3.11);
  // a browser or Python of another Unicode version may differ on letters new in that version.
  const fold = (name) => String(name).normalize("NFC").trim().split("\u0131")
    .map((part) => part.toLowerCase().toUpperCase().toLowerCase()).join("\u0131").replace(/\u03c2/g, "\u03c3");

  // A count as the user gave it: a number when it reads as one, else the text itself, so that the
  // box judges it with its own rule (edge/rules.py) and the block shows the box's answer.
  const asGiven = (value) => {
    if (typeof value === "number") return Number.isFinite(value) ? value : String(value);
    const text = String(value).trim(), n = Number(text);
    return text !== "" && Number.isFinite(n) ? n : String(value);
  };

  class EdgeBox {
    constructor(runtime) {
      this.runtime = runtime;
      this.ws = null;
      this.forget();
      this.problem = "not connected yet";
      this.result = "";
      this.nextId = 1;
      this.pending = new Map();
      this.teaching = new Set();      // teach blocks waiting for their recording to end
      this.stops = 0;                 // times the project was stopped
      // The stop sign lets go of a teach block's recording, as releasing its button would.
      if (runtime && typeof runtime.on === "function") {
        runtime.on("PROJECT_STOP_ALL", () => {
          this.stops++;
          for (const t of [...this.teaching]) t.letGo("the project was stopped", true);
        });
      }
    }

    // While not connected the blocks report nothing from a box: no label, no scores, no pictures
    // (the reporters check the connection too: a closing one is no longer "connected").
    forget() {
      this.label = "";
      this.confidence = 0;
      this.scores = {};
      this.classes = [];
    }

    getInfo() {
      const S = Scratch.ArgumentType.STRING, N = Scratch.ArgumentType.NUMBER;
      return {
        id: "edgebox",
        name: "edge box",
        color1: "#2563eb",
        blocks: [
          { opcode: "connect", blockType: Scratch.BlockType.COMMAND, text: "connect to box [URL] PIN [PIN]",
            arguments: { URL: { type: S, defaultValue: DEFAULT_URL }, PIN: { type: S, defaultValue: "" } } },
          { opcode: "isConnected", blockType: Scratch.BlockType.BOOLEAN, text: "connected?" },
          { opcode: "getProblem", blockType: Scratch.BlockType.REPORTER, text: "connection problem" },
          "---",
          { opcode: "getLabel", blockType: Scratch.BlockType.REPORTER, text: "label" },
          { opcode: "getConfidence", blockType: Scratch.BlockType.REPORTER, text: "confidence" },
          { opcode: "getScore", blockType: Scratch.BlockType.REPORTER, text: "score of [CLASS]",
            arguments: { CLASS: { type: S, defaultValue: "A" } } },
          { opcode: "whenLabel", blockType: Scratch.BlockType.HAT, text: "when label is [LABEL]",
            isEdgeActivated: true, arguments: { LABEL: { type: S, defaultValue: "A" } } },
          { opcode: "isLabel", blockType: Scratch.BlockType.BOOLEAN, text: "label is [LABEL]?",
            arguments: { LABEL: { type: S, defaultValue: "A" } } },
          "---",
          { opcode: "teach", blockType: Scratch.BlockType.COMMAND, text: "teach [CLASS] with [COUNT] pictures",
            arguments: { CLASS: { type: S, defaultValue: "A" }, COUNT: { type: N, defaultValue: 10 } } },
          { opcode: "samples", blockType: Scratch.BlockType.REPORTER, text: "pictures of [CLASS]",
            arguments: { CLASS: { type: S, defaultValue: "A" } } },
          { opcode: "undo", blockType: Scratch.BlockType.COMMAND, text: "undo last teaching" },
          { opcode: "clear", blockType: Scratch.BlockType.COMMAND, text: "forget [CLASS]",
            arguments: { CLASS: { type: S, defaultValue: "A" } } },
          { opcode: "getResult", blockType: Scratch.BlockType.REPORTER, text: "last answer" },
        ],
      };
    }

    // --- the link ----------------------------------------------------------------------------

    connect(args) {
      const url = String(args.URL || DEFAULT_URL).trim();
      const pin = String(args.PIN || "").trim();
      this.url = url;
      if (this.ws) { this.ws.onclose = null; this.ws.close(); this.ws = null; }
      this.failAll("reconnecting");
      this.forget();
      this.problem = "connecting…";
      return new Promise((resolve) => {
        let ws;
        try { ws = new WebSocket(url); } catch (e) { this.problem = `bad box address ${url}`; resolve(); return; }
        let settled = false, opened = false;
        const done = (problem) => { if (!settled) { settled = true; this.problem = problem; clearTimeout(timer); resolve(); } };
        const timer = setTimeout(() => { done(`box not found at ${url}`); try { ws.close(); } catch (e) { /* closed */ } }, TIMEOUT);
        ws.onerror = () => done(`box not found at ${url}`);
        ws.onclose = () => {
          if (this.ws === ws) {
            this.ws = null; this.failAll("lost the box"); this.forget();
            if (opened && settled) this.problem = `lost the box at ${url}`;
          }
          done(`box not found at ${url}`);
        };
        ws.onmessage = (ev) => {
          if (typeof ev.data !== "string") return;
          let m;
          try { m = JSON.parse(ev.data); } catch (e) { return; }
          if (m.type === "hello") {
            opened = true;
            if (pin) ws.send(JSON.stringify({ type: "login", pin }));
            else done(m.pin_required ? "this box needs a PIN to teach it" : "");
          } else if (m.type === "login") {
            done(m.ok ? "" : m.error || "wrong PIN");
          }
          this.receive(m);
        };
        this.ws = ws;
      });
    }

    receive(m) {
      if (m.type === "decision") {
        this.label = m.label; this.confidence = m.confidence; this.scores = m.scores || {};
      } else if (m.type === "state") {
        this.classes = m.state.classes || [];
      } else if (m.type === "event" && m.event === "sample_added") {
        const c = this.classes.find((c) => c.name === m.class);
        if (c) c.samples = m.samples;
        for (const t of [...this.teaching]) if (t.key === fold(m.class)) t.sample();
      } else if (m.type === "event" && m.event === "recording_stopped") {
        for (const t of [...this.teaching]) if (t.key === fold(m.class)) t.stopped(m);
      } else if (m.type === "result") {
        const answer = this.pending.get(m.id);
        if (answer) { this.pending.delete(m.id); answer(m); }
      }
    }

    failAll(error) {
      for (const answer of [...this.pending.values()]) answer({ ok: false, error });
      this.pending.clear();
      for (const t of [...this.teaching]) t.finish(`${error} while teaching ${t.cls}`);
    }

    // Send a command; onAnswer gets the box's answer (or why there is none) as soon as it comes.
    request(action, body, onAnswer) {
      if (!this.ws || this.ws.readyState !== 1) {
        onAnswer({ ok: false, error: "not connected: use the connect block first" });
        return;
      }
      const id = this.nextId++;
      const timer = setTimeout(() => {
        if (this.pending.delete(id)) onAnswer({ ok: false, error: "the box did not answer" });
      }, ANSWER_TIMEOUT);
      this.pending.set(id, (m) => { clearTimeout(timer); onAnswer(m); });
      this.ws.send(JSON.stringify({ action, body, id }));
    }

    answered(m) {
      this.result = m.ok ? "ok" : m.error || "refused";
      if (!m.ok && /PIN/.test(this.result)) this.problem = this.result;
    }

    send(action, body) {
      return new Promise((resolve) => this.request(action, body, (m) => { this.answered(m); resolve(); }));
    }

    // A teach block, once the box started its recording: like a hand on the class's button, it
    // waits until the recording ends (recording_stopped: count reached, or ended by something
    // else), and lets go (record/stop of that class) when no new picture came for a while or the
    // project is stopped. Losing the box ends the wait too (the box stops a lost page's recording).
    waitForRecording(cls, count, resolve) {
      const t = { key: fold(cls), cls, count, added: 0, window: NO_PICTURE, last: Date.now(), timer: null,
                  why: null };    // why: set once the block let go
      const arm = (ms, then) => { clearTimeout(t.timer); t.timer = setTimeout(then, ms); };
      const short = (name, added, why) => `stopped teaching ${name} after ${added} of ${count} pictures: ${why}`;
      t.finish = (result) => {
        if (!this.teaching.delete(t)) return;
        clearTimeout(t.timer); this.result = result; resolve();
      };
      t.sample = () => {
        const now = Date.now();
        t.window = Math.max(t.window, 3 * (now - t.last));
        t.last = now; t.added++;
        if (!t.why) arm(t.window, () => t.letGo(`no new picture for ${Math.round(t.window / 1000)} s`));
      };
      t.stopped = (m) => {
        const added = typeof m.added === "number" ? m.added : t.added;
        if (t.why) t.finish(short(m.class, added, t.why));
        else if (added >= count) t.finish("ok");
        else t.finish(`teaching ${m.class} ended after ${added} of ${count} pictures `
                      + "(something else ended the recording)");
      };
      t.letGo = (why, now) => {
        if (t.why) return;
        t.why = why;
        if (this.isConnected()) this.ws.send(JSON.stringify({ action: "record/stop", body: { class: cls } }));
        if (now) t.finish(short(cls, t.added, why));
        else arm(STOP_WAIT, () => t.finish(short(cls, t.added, why)));
      };
      this.teaching.add(t);
      arm(t.window, () => t.letGo(`no new picture for ${Math.round(t.window / 1000)} s`));
      return t;
    }

    // --- blocks ------------------------------------------------------------------------------

    isConnected() { return !!this.ws && this.ws.readyState === 1; }
    // a socket already closing, before its close event: lost, as `connected?` already says
    getProblem() {
      return !this.problem && this.ws && this.ws.readyState > 1 ? `lost the box at ${this.url}` : this.problem;
    }
    // What the box said, only while connected: a box that is gone (or closing) has no answer.
    getLabel() { return this.isConnected() ? this.label : ""; }
    getConfidence() { return this.isConnected() ? Math.round(this.confidence * 100) / 100 : 0; }
    getScore(args) {
      const want = fold(args.CLASS);
      const name = this.isConnected() ? Object.keys(this.scores).find((n) => fold(n) === want) : undefined;
      return name === undefined ? 0 : Math.round(this.scores[name] * 100) / 100;
    }
    whenLabel(args) { return this.isLabel(args); }
    isLabel(args) { const label = this.getLabel(); return label !== "" && fold(label) === fold(args.LABEL); }
    getResult() { return this.result; }
    samples(args) {
      const want = fold(args.CLASS);
      const c = this.isConnected() ? this.classes.find((c) => fold(c.name) === want) : undefined;
      return c ? c.samples : 0;
    }
    teach(args) {
      const cls = String(args.CLASS), count = asGiven(args.COUNT), stops = this.stops;
      return new Promise((resolve) => {
        this.request("record", { class: cls, count }, (m) => {
          this.answered(m);
          if (!m.ok) { resolve(); return; }
          const t = this.waitForRecording(cls, count, resolve);   // accepted: a whole number
          if (this.stops !== stops) t.letGo("the project was stopped", true);   // while the box answered
        });
      });
    }
    undo() { return this.send("undo", {}); }
    clear(args) { return this.send("clear", { class: String(args.CLASS) }); }
  }

  Scratch.extensions.register(new EdgeBox(Scratch.vm && Scratch.vm.runtime));
})(Scratch);
