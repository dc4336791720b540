// A Scratch program for the real scratch-vm, built block by block, shared by the tests' Node
// scripts (tests/node, tests/node-mqtt). It needs no package itself: each script passes the
// scratch-vm it installed.
"use strict";

// Register an unsandboxed extension (what TurboWarp, or the box's own editor page, does): the
// source runs with the Scratch global holding the VM's own types. Returns { extension, info }.
async function loadExtension(VirtualMachine, vm, source) {
  let extension = null;
  const Scratch = { ArgumentType: VirtualMachine.ArgumentType, BlockType: VirtualMachine.BlockType, vm,
                    extensions: { unsandboxed: true, register: (e) => { extension = e; } } };
  new Function("Scratch", source)(Scratch);
  if (!extension) throw new Error("the extension did not register");
  const info = extension.getInfo();
  const service = vm.extensionManager._registerInternalExtension(extension);
  vm.extensionManager._loadedExtensions.set(info.id, service);
  await new Promise((r) => setTimeout(r, 50));    // primitives register asynchronously
  return { extension, info };
}

// One green-flag script on the stage: stmt() appends a block to it, reporter() makes a block
// that an input holds, setVar() stores a reporter's value in a stage variable.
class Program {
  constructor() { this.blocks = {}; this.chain = []; this.n = 0; }
  text(v) { return [1, [10, String(v)]]; }
  reporter(opcode, inputs = {}, fields = {}) {
    const b = `b${this.n++}`;
    this.blocks[b] = { opcode, next: null, parent: null, inputs, fields, shadow: false, topLevel: false };
    return b;
  }
  stmt(opcode, inputs = {}, fields = {}) { const b = this.reporter(opcode, inputs, fields); this.chain.push(b); return b; }
  setVar(name, reporter) {
    return this.stmt("data_setvariableto", { VALUE: [3, reporter, [10, ""]] }, { VARIABLE: [name, `v_${name}`] });
  }
  waitUntil(condition) {
    const b = this.stmt("control_wait_until", {});
    this.blocks[b].inputs.CONDITION = [2, condition];
    return b;
  }

  // Load as a project with the given stage variables, run until every script ends (or
  // timeoutMs); returns { finished, seconds, stage }.
  async run(vm, extensionId, vars, timeoutMs) {
    const { blocks, chain } = this;
    const hat = `b${this.n++}`;
    blocks[hat] = { opcode: "event_whenflagclicked", next: chain[0], parent: null, inputs: {}, fields: {},
                    shadow: false, topLevel: true, x: 0, y: 0 };
    chain.forEach((b, i) => { blocks[b].parent = i ? chain[i - 1] : hat; blocks[b].next = chain[i + 1] || null; });
    for (const [key, b] of Object.entries(blocks)) {   // reporters' parents
      for (const input of Object.values(b.inputs)) if (input[0] !== 1 && blocks[input[1]]) blocks[input[1]].parent = key;
    }
    const project = {
      targets: [{ isStage: true, name: "Stage", variables: Object.fromEntries(vars.map((v) => [`v_${v}`, [v, ""]])),
                  lists: {}, broadcasts: {}, blocks, comments: {}, currentCostume: 0,
                  costumes: [{ name: "backdrop1", dataFormat: "svg", assetId: "cd21514d0531fdffb22204e0ec5ed84a",
                               md5ext: "cd21514d0531fdffb22204e0ec5ed84a.svg", rotationCenterX: 240, rotationCenterY: 180 }],
                  sounds: [], volume: 100, layerOrder: 0, tempo: 60, videoTransparency: 50, videoState: "on",
                  textToSpeechLanguage: null }],
      monitors: [], extensions: [extensionId], meta: { semver: "3.0.0", vm: "0.2.0", agent: "edge test" },
    };
    await vm.loadProject(JSON.stringify(project));
    vm.start();
    vm.greenFlag();
    const started = Date.now();
    await new Promise((r) => setTimeout(r, 200));
    while (vm.runtime.threads.length && Date.now() - started < timeoutMs) await new Promise((r) => setTimeout(r, 100));
    return { finished: vm.runtime.threads.length === 0, seconds: (Date.now() - started) / 1000,
             stage: vm.runtime.getTargetForStage() };
  }
}

module.exports = { loadExtension, Program };
