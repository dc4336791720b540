// Loads the Scratch extension a running box serves into the real scratch-vm and runs a Scratch
// program with its blocks: a wrong address, a wrong PIN, then the right one; read the label,
// teach with a block, wait for the box to recognise what it was taught.
// Usage: node edge_box_extension.js http://127.0.0.1:PORT/ PIN   (prints one JSON line)
"use strict";
const VirtualMachine = require("scratch-vm");
const { ArgumentType, BlockType } = VirtualMachine;
global.WebSocket = require("ws");    // what a browser has built in

const [base, pin] = process.argv.slice(2);
const wsUrl = base.replace(/^http/, "ws") + "ws";

async function main() {
  const source = await (await fetch(new URL("scratch/edge-box.js", base))).text();
  const vm = new VirtualMachine();
  let extension = null;
  // What an editor that runs extensions "without sandbox" (TurboWarp, or the box's own editor
  // page) hands the extension: the Scratch global with the VM's own types.
  const Scratch = { ArgumentType, BlockType, vm, extensions: { unsandboxed: true, register: (e) => { extension = e; } } };
  new Function("Scratch", source)(Scratch);
  if (!extension) throw new Error("the extension did not register");
  const info = extension.getInfo();
  const defaultUrl = info.blocks.find((b) => b.opcode === "connect").arguments.URL.defaultValue;
  const service = vm.extensionManager._registerInternalExtension(extension);
  vm.extensionManager._loadedExtensions.set(info.id, service);
  await new Promise((r) => setTimeout(r, 50));    // primitives register asynchronously

  // The program, as a Scratch project: one green-flag script on the stage.
  const vars = ["wrong_address", "wrong_pin", "connected", "problem", "label", "before", "teach_result",
                "after", "label_after"];
  const blocks = {};
  let n = 0;
  const id = () => `b${n++}`;
  const text = (v) => [1, [10, String(v)]];
  const reporter = (opcode, inputs = {}) => { const b = id(); blocks[b] = { opcode, next: null, parent: null, inputs, fields: {}, shadow: false, topLevel: false }; return b; };
  const chain = [];
  const stmt = (opcode, inputs = {}, fields = {}) => { const b = id(); blocks[b] = { opcode, next: null, parent: null, inputs, fields, shadow: false, topLevel: false }; chain.push(b); return b; };
  const setVar = (name, value) => stmt("data_setvariableto", { VALUE: typeof value === "string" && blocks[value] ? [3, value, [10, ""]] : text(value) }, { VARIABLE: [name, `v_${name}`] });

  stmt("edgebox_connect", { URL: text("ws://127.0.0.1:1/ws"), PIN: text(pin) });
  setVar("wrong_address", reporter("edgebox_getProblem"));
  stmt("edgebox_connect", { URL: text(wsUrl), PIN: text("0000") });
  setVar("wrong_pin", reporter("edgebox_getProblem"));
  stmt("edgebox_connect", { URL: text(defaultUrl), PIN: text(pin) });
  setVar("connected", reporter("edgebox_isConnected"));
  setVar("problem", reporter("edgebox_getProblem"));
  stmt("control_wait", { DURATION: [1, [5, "1"]] });
  setVar("label", reporter("edgebox_getLabel"));
  setVar("before", reporter("edgebox_samples", { CLASS: text("A") }));
  stmt("edgebox_teach", { CLASS: text("A"), COUNT: [1, [4, "6"]] });
  setVar("teach_result", reporter("edgebox_getResult"));
  stmt("control_wait", { DURATION: [1, [5, "3"]] });
  setVar("after", reporter("edgebox_samples", { CLASS: text("A") }));
  const until = stmt("control_wait_until", {});
  blocks[until].inputs.CONDITION = [2, reporter("edgebox_isLabel", { LABEL: text("A") })];
  setVar("label_after", reporter("edgebox_getLabel"));

  const hat = id();
  blocks[hat] = { opcode: "event_whenflagclicked", next: chain[0], parent: null, inputs: {}, fields: {}, shadow: false, topLevel: true, x: 0, y: 0 };
  chain.forEach((b, i) => { blocks[b].parent = i ? chain[i - 1] : hat; blocks[b].next = chain[i + 1] || null; });
  for (const [key, b] of Object.entries(blocks)) {   // reporters' parents
    for (const input of Object.values(b.inputs)) if (input[0] !== 1 && blocks[input[1]]) blocks[input[1]].parent = key;
  }
  const project = {
    targets: [{ isStage: true, name: "Stage", variables: Object.fromEntries(vars.map((v) => [`v_${v}`, [v, ""]])),
                lists: {}, broadcasts: {}, blocks, comments: {}, currentCostume: 0,
                costumes: [{ name: "backdrop1", dataFormat: "svg", assetId: "cd21514d0531fdffb22204e0ec5ed84a",
                             md5ext: "cd21514d0531fdffb22204e0ec5ed84a.svg", rotationCenterX: 240, rotationCenterY: 180 }],
                sounds: [], volume: 100, layerOrder: 0, tempo: 60, videoTransparency: 50, videoState: "on", textToSpeechLanguage: null }],
    monitors: [], extensions: [info.id], meta: { semver: "3.0.0", vm: "0.2.0", agent: "edge test" },
  };
  await vm.loadProject(JSON.stringify(project));
  vm.start();
  vm.greenFlag();
  const started = Date.now();
  await new Promise((r) => setTimeout(r, 200));
  while (vm.runtime.threads.length && Date.now() - started < 60000) await new Promise((r) => setTimeout(r, 100));
  const stage = vm.runtime.getTargetForStage();
  const report = { default_url: defaultUrl, finished: vm.runtime.threads.length === 0 };
  for (const v of vars) {
    const value = stage.lookupVariableByNameAndType(v, "").value;
    report[v] = ["before", "after"].includes(v) ? Number(value) : v === "connected" ? value === true || value === "true" : value;
  }
  report.examples_before = report.before;
  report.examples_after = report.after;
  vm.stopAll();
  if (extension.ws) extension.ws.close();
  console.log(JSON.stringify(report));
  process.exit(report.finished ? 0 : 1);
}

main().catch((e) => { console.error(e && e.stack || e); process.exit(2); });
