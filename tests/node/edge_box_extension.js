// Loads the Scratch extension a running box serves into the real scratch-vm and runs a Scratch
// program with its blocks: a wrong address, a wrong PIN, then the right one; read the label,
// teach with a block, wait for the box to recognise what it was taught.
// Usage: node edge_box_extension.js http://127.0.0.1:PORT/ PIN   (prints one JSON line)
"use strict";
const VirtualMachine = require("scratch-vm");
const { loadExtension, Program } = require("../scratch_program.js");
global.WebSocket = require("ws");    // what a browser has built in

const [base, pin] = process.argv.slice(2);
const wsUrl = base.replace(/^http/, "ws") + "ws";

async function main() {
  const source = await (await fetch(new URL("scratch/edge-box.js", base))).text();
  const vm = new VirtualMachine();
  const { extension, info } = await loadExtension(VirtualMachine, vm, source);
  const defaultUrl = info.blocks.find((b) => b.opcode === "connect").arguments.URL.defaultValue;

  // The program, as a Scratch project: one green-flag script on the stage.
  const vars = ["wrong_address", "wrong_pin", "connected", "problem", "label", "before", "teach_result",
                "after", "label_after"];
  const p = new Program();
  const text = (v) => p.text(v);

  p.stmt("edgebox_connect", { URL: text("ws://127.0.0.1:1/ws"), PIN: text(pin) });
  p.setVar("wrong_address", p.reporter("edgebox_getProblem"));
  p.stmt("edgebox_connect", { URL: text(wsUrl), PIN: text("0000") });
  p.setVar("wrong_pin", p.reporter("edgebox_getProblem"));
  p.stmt("edgebox_connect", { URL: text(defaultUrl), PIN: text(pin) });
  p.setVar("connected", p.reporter("edgebox_isConnected"));
  p.setVar("problem", p.reporter("edgebox_getProblem"));
  p.stmt("control_wait", { DURATION: [1, [5, "1"]] });
  p.setVar("label", p.reporter("edgebox_getLabel"));
  p.setVar("before", p.reporter("edgebox_samples", { CLASS: text("A") }));
  p.stmt("edgebox_teach", { CLASS: text("A"), COUNT: [1, [4, "6"]] });
  p.setVar("teach_result", p.reporter("edgebox_getResult"));
  p.stmt("control_wait", { DURATION: [1, [5, "3"]] });
  p.setVar("after", p.reporter("edgebox_samples", { CLASS: text("A") }));
  p.waitUntil(p.reporter("edgebox_isLabel", { LABEL: text("A") }));
  p.setVar("label_after", p.reporter("edgebox_getLabel"));

  const { finished, stage } = await p.run(vm, info.id, vars, 60000);
  const report = { default_url: defaultUrl, finished };
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
