// Loads docs/mqtt.md's TurboWarp extension (the file given) into the real scratch-vm and runs a
// Scratch program with its blocks against a real broker over WebSockets: a wrong address, a wrong
// password, a box name no box has, then the block's default box name; read the label, teach a
// class with a block, wait until the box recognises it, send a command with the default payload.
// Usage: node scratch_mqtt.js EXTENSION.js ws://127.0.0.1:PORT USER PASSWORD   (prints one JSON line)
"use strict";
const fs = require("fs");
const VirtualMachine = require("scratch-vm");
const { loadExtension, Program } = require("../scratch_program.js");
global.WebSocket = require("ws");    // what a browser has built in

const [file, url, user, password] = process.argv.slice(2);

async function main() {
  const vm = new VirtualMachine();
  const { info } = await loadExtension(VirtualMachine, vm, fs.readFileSync(file, "utf8"));
  const defaults = Object.fromEntries(info.blocks.filter((b) => b.arguments).map((b) =>
    [b.opcode, Object.fromEntries(Object.entries(b.arguments).map(([k, a]) => [k, a.defaultValue]))]));

  const vars = ["wrong_address", "wrong_password", "connected_wrong_password", "wrong_box", "connected",
                "problem", "box", "label", "teach_label", "result", "bad_count"];
  const p = new Program();
  const text = (v) => p.text(v);
  const connect = (u, box, pass) => p.stmt("edgebox_connect", { URL: text(u), BOX: text(box), USER: text(user), PASS: text(pass) });

  connect("ws://127.0.0.1:1", defaults.connect.BOX, password);
  p.setVar("wrong_address", p.reporter("edgebox_getProblem"));
  connect(url, defaults.connect.BOX, password + "-wrong");
  p.setVar("wrong_password", p.reporter("edgebox_getProblem"));
  p.setVar("connected_wrong_password", p.reporter("edgebox_isConnected"));
  connect(url, "edge", password);
  p.setVar("wrong_box", p.reporter("edgebox_getProblem"));
  connect(url, defaults.connect.BOX, password);
  p.setVar("connected", p.reporter("edgebox_isConnected"));
  p.setVar("problem", p.reporter("edgebox_getProblem"));
  p.setVar("box", p.reporter("edgebox_getBox"));
  p.stmt("control_wait", { DURATION: [1, [5, "0.5"]] });
  p.setVar("label", p.reporter("edgebox_getLabel"));
  p.stmt("edgebox_teach", { CLASS: text("A"), COUNT: [1, [4, "6"]] });
  p.waitUntil(p.reporter("operator_equals", { OPERAND1: [3, p.reporter("edgebox_getLabel"), [10, ""]], OPERAND2: text("A") }));
  p.setVar("teach_label", p.reporter("edgebox_getLabel"));
  p.stmt("edgebox_command", { ACTION: text(defaults.command.ACTION), PAYLOAD: text(defaults.command.PAYLOAD) });
  p.waitUntil(p.reporter("operator_contains", { STRING1: [3, p.reporter("edgebox_getResult"), [10, ""]], STRING2: text("undo") }));
  p.setVar("result", p.reporter("edgebox_getResult"));
  // a count the box cannot take is sent as typed and refused (Math.round made "abc" null: 3 s of recording)
  p.stmt("edgebox_teach", { CLASS: text("A"), COUNT: [1, [4, "abc"]] });
  p.waitUntil(p.reporter("operator_contains", { STRING1: [3, p.reporter("edgebox_getResult"), [10, ""]], STRING2: text("count") }));
  p.setVar("bad_count", p.reporter("edgebox_getResult"));

  const { finished, seconds, stage } = await p.run(vm, info.id, vars, 90000);
  const report = { defaults, finished, seconds };
  for (const v of vars) report[v] = stage.variables[`v_${v}`].value;
  console.log(JSON.stringify(report));
  vm.runtime.quit();
  process.exit(0);
}

main().catch((e) => { console.error(e && e.stack || String(e)); process.exit(1); });
