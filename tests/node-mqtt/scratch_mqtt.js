// Loads docs/mqtt.md's TurboWarp extension (the file given) into the real scratch-vm and runs a
// Scratch program with its blocks against a real broker over WebSockets: a wrong address, a wrong
// password, a box name no box has, then the block's default box name; read the label, teach a
// class with a block, wait until the box recognises it, send a command with the default payload.
// Usage: node scratch_mqtt.js EXTENSION.js ws://127.0.0.1:PORT USER PASSWORD   (prints one JSON line)
"use strict";
const fs = require("fs");
const VirtualMachine = require("scratch-vm");
const { ArgumentType, BlockType } = VirtualMachine;
global.WebSocket = require("ws");    // what a browser has built in

const [file, url, user, password] = process.argv.slice(2);

async function main() {
  const vm = new VirtualMachine();
  let extension = null;
  // What TurboWarp hands an extension loaded "without sandbox": the Scratch global with the VM's types.
  const Scratch = { ArgumentType, BlockType, vm, extensions: { unsandboxed: true, register: (e) => { extension = e; } } };
  new Function("Scratch", fs.readFileSync(file, "utf8"))(Scratch);
  if (!extension) throw new Error("the extension did not register");
  const info = extension.getInfo();
  const defaults = Object.fromEntries(info.blocks.filter((b) => b.arguments).map((b) =>
    [b.opcode, Object.fromEntries(Object.entries(b.arguments).map(([k, a]) => [k, a.defaultValue]))]));
  const service = vm.extensionManager._registerInternalExtension(extension);
  vm.extensionManager._loadedExtensions.set(info.id, service);
  await new Promise((r) => setTimeout(r, 50));    // primitives register asynchronously

  const vars = ["wrong_address", "wrong_password", "connected_wrong_password", "wrong_box", "connected",
                "problem", "box", "label", "teach_label", "result"];
  const blocks = {};
  const chain = [];
  let n = 0;
  const id = () => `b${n++}`;
  const text = (v) => [1, [10, String(v)]];
  const add = (opcode, inputs = {}, fields = {}) => {
    const b = id();
    blocks[b] = { opcode, next: null, parent: null, inputs, fields, shadow: false, topLevel: false };
    return b;
  };
  const stmt = (opcode, inputs, fields) => { const b = add(opcode, inputs, fields); chain.push(b); return b; };
  const setVar = (name, reporter) => stmt("data_setvariableto", { VALUE: [3, reporter, [10, ""]] },
                                          { VARIABLE: [name, `v_${name}`] });
  const connect = (u, box, pass) => stmt("edgebox_connect", { URL: text(u), BOX: text(box), USER: text(user), PASS: text(pass) });

  connect("ws://127.0.0.1:1", defaults.connect.BOX, password);
  setVar("wrong_address", add("edgebox_getProblem"));
  connect(url, defaults.connect.BOX, password + "-wrong");
  setVar("wrong_password", add("edgebox_getProblem"));
  setVar("connected_wrong_password", add("edgebox_isConnected"));
  connect(url, "edge", password);
  setVar("wrong_box", add("edgebox_getProblem"));
  connect(url, defaults.connect.BOX, password);
  setVar("connected", add("edgebox_isConnected"));
  setVar("problem", add("edgebox_getProblem"));
  setVar("box", add("edgebox_getBox"));
  stmt("control_wait", { DURATION: [1, [5, "0.5"]] });
  setVar("label", add("edgebox_getLabel"));
  stmt("edgebox_teach", { CLASS: text("A"), COUNT: [1, [4, "6"]] });
  const until = stmt("control_wait_until", {});
  blocks[until].inputs.CONDITION = [2, add("operator_equals", { OPERAND1: [3, add("edgebox_getLabel"), [10, ""]], OPERAND2: text("A") })];
  setVar("teach_label", add("edgebox_getLabel"));
  stmt("edgebox_command", { ACTION: text(defaults.command.ACTION), PAYLOAD: text(defaults.command.PAYLOAD) });
  const answered = stmt("control_wait_until", {});
  blocks[answered].inputs.CONDITION = [2, add("operator_contains", { STRING1: [3, add("edgebox_getResult"), [10, ""]], STRING2: text("undo") })];
  setVar("result", add("edgebox_getResult"));

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
  while (vm.runtime.threads.length && Date.now() - started < 90000) await new Promise((r) => setTimeout(r, 100));
  const stage = vm.runtime.getTargetForStage();
  const report = { defaults, finished: vm.runtime.threads.length === 0, seconds: (Date.now() - started) / 1000 };
  for (const v of vars) report[v] = stage.variables[`v_${v}`].value;
  console.log(JSON.stringify(report));
  vm.runtime.quit();
  process.exit(0);
}

main().catch((e) => { console.error(e && e.stack || String(e)); process.exit(1); });
