// edge-box.js: Scratch blocks for an edge box, talking to the box's own WebSocket (no broker).
// Served by the box at /scratch/edge-box.js; its default address is the box it came from.
// The box's own Scratch editor (/scratch/) preloads it in the page; see docs/web.md for why an
// editor from the internet cannot reach the box.
(function (Scratch) {
  "use strict";
  const DEFAULT_URL = __EDGE_DEFAULT_WS__;
  const TIMEOUT = 8000;

  class EdgeBox {
    constructor(runtime) {
      this.runtime = runtime;
      this.ws = null;
      this.label = "unknown";
      this.confidence = 0;
      this.scores = {};
      this.classes = [];
      this.problem = "not connected yet";
      this.result = "";
      this.nextId = 1;
      this.pending = new Map();
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
      if (this.ws) { this.ws.onclose = null; this.ws.close(); this.ws = null; }
      this.failAll("reconnecting");
      this.problem = "connecting…";
      return new Promise((resolve) => {
        let ws;
        try { ws = new WebSocket(url); } catch (e) { this.problem = `bad box address ${url}`; resolve(); return; }
        let settled = false, opened = false;
        const done = (problem) => { if (!settled) { settled = true; this.problem = problem; clearTimeout(timer); resolve(); } };
        const timer = setTimeout(() => { done(`box not found at ${url}`); try { ws.close(); } catch (e) { /* closed */ } }, TIMEOUT);
        ws.onerror = () => done(`box not found at ${url}`);
        ws.onclose = () => {
          if (this.ws === ws) { this.ws = null; this.failAll("lost the box"); if (opened && settled) this.problem = `lost the box at ${url}`; }
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
      } else if (m.type === "result") {
        const resolve = this.pending.get(m.id);
        if (resolve) { this.pending.delete(m.id); resolve(m); }
      }
    }

    failAll(error) {
      for (const resolve of this.pending.values()) resolve({ ok: false, error });
      this.pending.clear();
    }

    send(action, body) {
      return new Promise((resolve) => {
        if (!this.ws || this.ws.readyState !== 1) {
          this.result = "not connected: use the connect block first";
          resolve(); return;
        }
        const id = this.nextId++;
        const timer = setTimeout(() => { this.pending.delete(id); this.result = "the box did not answer"; resolve(); }, 70000);
        this.pending.set(id, (m) => {
          clearTimeout(timer);
          this.result = m.ok ? "ok" : m.error || "refused";
          if (!m.ok && /PIN/.test(this.result)) this.problem = this.result;
          resolve();
        });
        this.ws.send(JSON.stringify({ action, body, id }));
      });
    }

    // --- blocks ------------------------------------------------------------------------------

    isConnected() { return !!this.ws && this.ws.readyState === 1; }
    getProblem() { return this.problem; }
    getLabel() { return this.label; }
    getConfidence() { return Math.round(this.confidence * 100) / 100; }
    getScore(args) { const s = this.scores[String(args.CLASS)]; return s === undefined ? 0 : Math.round(s * 100) / 100; }
    whenLabel(args) { return this.label === String(args.LABEL); }
    isLabel(args) { return this.label === String(args.LABEL); }
    getResult() { return this.result; }
    samples(args) {
      const want = String(args.CLASS).toLowerCase();
      const c = this.classes.find((c) => c.name.toLowerCase() === want);
      return c ? c.samples : 0;
    }
    teach(args) {
      const count = Math.max(1, Math.min(500, Math.round(Number(args.COUNT) || 1)));
      return this.send("record", { class: String(args.CLASS), count });
    }
    undo() { return this.send("undo", {}); }
    clear(args) { return this.send("clear", { class: String(args.CLASS) }); }
  }

  Scratch.extensions.register(new EdgeBox(Scratch.vm && Scratch.vm.runtime));
})(Scratch);
