// Loads the Scratch extension a running box serves into the real scratch-vm and runs a Scratch
// program with its blocks against that box; prints one JSON line with what the program saw.
// Usage: node edge_box_extension.js http://127.0.0.1:PORT/ PIN [SCENARIO] [BOX_PID SIGNAL | CASES_FILE]
// SCENARIO (default "basic"): a wrong address, a wrong PIN, then the right one; read the label,
// teach with a block, wait for the box to recognise what it was taught. The others are the
// program of one test of tests/test_scratch_blocks.py each (see `scenarios` below).
// EDGE_BOX_JS=file loads the extension from that file instead of the box (to run a scenario with
// another version of it, e.g. the last committed one).
"use strict";
const fs = require("fs");
const VirtualMachine = require("scratch-vm");
const { loadExtension, Program } = require("../scratch_program.js");
global.WebSocket = require("ws");    // what a browser has built in

const [base, pin, scenario = "basic", boxPid, signal = "SIGKILL"] = process.argv.slice(2);
const wsUrl = base.replace(/^http/, "ws") + "ws";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A second client of the box, as another page or Scratch project would be: send one command and
// return its answer.
function ask(action, body) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl);
    const timer = setTimeout(() => { ws.close(); reject(new Error(`no answer to ${action}`)); }, 10000);
    ws.onerror = (e) => { clearTimeout(timer); reject(new Error(`second client: ${e.message || e}`)); };
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.type === "hello") ws.send(JSON.stringify({ type: "login", pin }));
      else if (m.type === "login") ws.send(JSON.stringify({ action, body, id: "second" }));
      else if (m.type === "result" && m.id === "second") { clearTimeout(timer); ws.close(); resolve(m); }
    };
  });
}

// Calls `then` once the stage variable `phase` says `value` (the program is at that point).
function when(vm, value, then) {
  const poll = setInterval(() => {
    const stage = vm.runtime.getTargetForStage();
    const phase = stage && stage.lookupVariableByNameAndType("phase", "");
    if (phase && phase.value === value) { clearInterval(poll); then(); }
  }, 20);
}

// Each scenario adds its blocks to the program p and returns { vars, during?, after? }: during(vm,
// report) runs alongside the program, after(report) once it has ended (still connected).
const scenarios = {
  basic(p, defaultUrl) {
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
    return {
      vars: ["wrong_address", "wrong_pin", "connected", "problem", "label", "before", "teach_result", "after",
             "label_after"],
      after(report) {
        report.before = Number(report.before); report.after = Number(report.after);
        report.connected = report.connected === true || report.connected === "true";
        report.examples_before = report.before;
        report.examples_after = report.after;
      },
    };
  },

  // Two teach blocks in a row: each teaches its own count (the first is not cut short).
  teach_twice(p) {
    connect(p);
    p.stmt("edgebox_teach", { CLASS: p.text("a"), COUNT: [1, [4, "10"]] });
    p.setVar("result_a", p.reporter("edgebox_getResult"));
    p.setVar("a_after_first", p.reporter("edgebox_samples", { CLASS: p.text("A") }));
    p.stmt("edgebox_teach", { CLASS: p.text("B"), COUNT: [1, [4, "10"]] });
    p.setVar("result_b", p.reporter("edgebox_getResult"));
    p.stmt("control_wait", { DURATION: [1, [5, "1"]] });
    p.setVar("a", p.reporter("edgebox_samples", { CLASS: p.text("A") }));
    p.setVar("b", p.reporter("edgebox_samples", { CLASS: p.text("B") }));
    return {
      vars: ["result_a", "a_after_first", "result_b", "a", "b"],
      async after(report) { report.box = (await ask("state", {})).state; },
    };
  },

  // Counts the box's rule refuses, as typed (numbers and texts), then a count typed as text.
  counts(p) {
    connect(p);
    const given = { zero: [4, "0"], minus_five: [4, "-5"], abc: [10, "abc"], huge: [4, "9999"], half: [4, "2.5"],
                    empty: [10, ""] };
    for (const [name, value] of Object.entries(given)) {
      p.stmt("edgebox_teach", { CLASS: p.text("B"), COUNT: [1, value] });
      p.setVar(name, p.reporter("edgebox_getResult"));
    }
    p.setVar("b_refused", p.reporter("edgebox_samples", { CLASS: p.text("B") }));
    p.stmt("edgebox_teach", { CLASS: p.text("B"), COUNT: [1, [10, " 3 "]] });
    p.setVar("three", p.reporter("edgebox_getResult"));
    p.stmt("control_wait", { DURATION: [1, [5, "0.5"]] });
    p.setVar("b_three", p.reporter("edgebox_samples", { CLASS: p.text("B") }));
    return { vars: [...Object.keys(given), "b_refused", "three", "b_three"] };
  },

  // The label blocks with the class name typed in another case, and a "when label is" hat.
  label_case(p) {
    connect(p);
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "8"]] });
    p.waitUntil(p.reporter("edgebox_isLabel", { LABEL: p.text("A") }));
    p.setVar("label", p.reporter("edgebox_getLabel"));
    p.setVar("is_a", p.reporter("edgebox_isLabel", { LABEL: p.text("a") }));
    p.setVar("is_a_spaced", p.reporter("edgebox_isLabel", { LABEL: p.text(" a ") }));
    p.setVar("is_b", p.reporter("edgebox_isLabel", { LABEL: p.text("b") }));
    p.setVar("score_A", p.reporter("edgebox_getScore", { CLASS: p.text("A") }));
    p.setVar("score_a", p.reporter("edgebox_getScore", { CLASS: p.text("a") }));
    p.setVar("pictures_a", p.reporter("edgebox_samples", { CLASS: p.text("a") }));
    p.stmt("control_wait", { DURATION: [1, [5, "0.5"]] });
    hatScript(p, "a", "hat_a");
    return { vars: ["label", "is_a", "is_a_spaced", "is_b", "score_A", "score_a", "pictures_a", "hat_a"] };
  },

  // The box is lost while a teach block waits (SIGKILL: a power cut or a pulled cable, with no
  // recording_stopped first; SIGTERM: the box stops): the block ends, and the reporters stop saying
  // what the box said last.
  lose_box(p) {
    connect(p);
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "8"]] });
    p.waitUntil(p.reporter("edgebox_isLabel", { LABEL: p.text("A") }));
    p.setVar("label_before", p.reporter("edgebox_getLabel"));
    p.setVar("confidence_before", p.reporter("edgebox_getConfidence"));
    setText(p, "phase", "teaching");
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "500"]] });
    p.setVar("teach_result", p.reporter("edgebox_getResult"));
    p.waitUntil(p.reporter("operator_not", { OPERAND: [2, p.reporter("edgebox_isConnected")] }));
    p.setVar("connected", p.reporter("edgebox_isConnected"));
    p.setVar("label", p.reporter("edgebox_getLabel"));
    p.setVar("is_a", p.reporter("edgebox_isLabel", { LABEL: p.text("A") }));
    p.setVar("confidence", p.reporter("edgebox_getConfidence"));
    p.setVar("score_a", p.reporter("edgebox_getScore", { CLASS: p.text("A") }));
    p.setVar("pictures_a", p.reporter("edgebox_samples", { CLASS: p.text("A") }));
    p.setVar("problem", p.reporter("edgebox_getProblem"));
    return {
      vars: ["label_before", "confidence_before", "phase", "teach_result", "connected", "label", "is_a",
             "confidence", "score_a", "pictures_a", "problem"],
      during(vm, report) {
        when(vm, "teaching", async () => {
          await sleep(1500);
          report.box_stopped_at = Date.now();
          process.kill(Number(boxPid), signal);
        });
      },
    };
  },

  // Another client ends the recording a teach block waits for: the block ends and says so.
  ended_elsewhere(p) {
    connect(p);
    setText(p, "phase", "teaching");
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "500"]] });
    p.setVar("teach_result", p.reporter("edgebox_getResult"));
    p.setVar("pictures_a", p.reporter("edgebox_samples", { CLASS: p.text("A") }));
    return {
      vars: ["phase", "teach_result", "pictures_a"],
      during(vm, report) {
        when(vm, "teaching", async () => {
          await sleep(2000);
          report.stopped_at = Date.now();
          report.stop_answer = await ask("record/stop", {});
        });
      },
      async after(report) { report.ended_at = Date.now(); report.box = (await ask("state", {})).state; },
    };
  },

  // No picture comes (the camera shows nothing): the teach block lets go instead of waiting forever.
  no_picture(p) {
    connect(p);
    setText(p, "phase", "teaching");
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "5"]] });
    p.setVar("teach_result", p.reporter("edgebox_getResult"));
    return {
      vars: ["phase", "teach_result"],
      during(vm, report) { when(vm, "teaching", () => { report.started_at = Date.now(); }); },
      async after(report) {
        report.waited = (Date.now() - report.started_at) / 1000;
        report.box = (await ask("state", {})).state;
      },
    };
  },

  // Class names compared by the label blocks, for the cases in the JSON file given as BOX_PID's
  // argument ([label, typed] pairs): each label given to the connected extension as the box's
  // decision message (all in one go, so no decision of the box comes in between), then asked.
  casefold(p, defaultUrl, extension) {
    connect(p);
    return {
      vars: [],
      after(report) {
        // per case two letters: is the label that? does its score answer? ("t" yes, "f" no)
        report.answers = JSON.parse(fs.readFileSync(boxPid, "utf8")).map(([label, typed]) => {
          extension.receive({ type: "decision", label, confidence: 0.5, scores: { [label]: 0.75 } });
          const is = extension.isLabel({ LABEL: typed }), scored = extension.getScore({ CLASS: typed }) === 0.75;
          return (is ? "t" : "f") + (scored ? "t" : "f");
        }).join("");
        report.connected_after = extension.isConnected();
      },
    };
  },

  // The stop sign while a teach block waits lets go of the recording, as releasing a button would.
  stop_sign(p) {
    connect(p);
    setText(p, "phase", "teaching");
    p.stmt("edgebox_teach", { CLASS: p.text("A"), COUNT: [1, [4, "500"]] });
    p.stmt("control_wait", { DURATION: [1, [5, "5"]] });   // still running when stopped, had it not waited
    return {
      vars: ["phase"],
      during(vm, report) {
        when(vm, "teaching", async () => {
          await sleep(1500);
          report.recording_before_stop = (await ask("state", {})).state.recording;
          vm.stopAll();
        });
      },
      async after(report) { await sleep(1000); report.box = (await ask("state", {})).state; },
    };
  },
};

function connect(p) {
  p.stmt("edgebox_connect", { URL: p.text(wsUrl), PIN: p.text(pin) });
  p.setVar("connected_at_start", p.reporter("edgebox_isConnected"));
  p.setVar("problem_at_start", p.reporter("edgebox_getProblem"));
}

// set [variable] to [value], a text.
function setText(p, variable, value) {
  p.stmt("data_setvariableto", { VALUE: p.text(value) }, { VARIABLE: [variable, `v_${variable}`] });
}

// A second script: when label is [label] -> set variable to "yes".
function hatScript(p, label, variable) {
  const set = p.reporter("data_setvariableto", { VALUE: p.text("yes") }, { VARIABLE: [variable, `v_${variable}`] });
  const hat = `hat_${variable}`;
  p.blocks[hat] = { opcode: "edgebox_whenLabel", next: set, parent: null, inputs: { LABEL: p.text(label) },
                    fields: {}, shadow: false, topLevel: true, x: 0, y: 400 };
  p.blocks[set].parent = hat;
}

async function main() {
  const source = process.env.EDGE_BOX_JS
    ? fs.readFileSync(process.env.EDGE_BOX_JS, "utf8").replace("__EDGE_DEFAULT_WS__", JSON.stringify(wsUrl))
    : await (await fetch(new URL("scratch/edge-box.js", base))).text();
  const vm = new VirtualMachine();
  const { extension, info } = await loadExtension(VirtualMachine, vm, source);
  const defaultUrl = info.blocks.find((b) => b.opcode === "connect").arguments.URL.defaultValue;

  const make = scenarios[scenario];
  if (!make) throw new Error(`no scenario ${scenario} (known: ${Object.keys(scenarios).join(", ")})`);
  const p = new Program();
  const plan = make(p, defaultUrl, extension);
  const vars = [...new Set([...plan.vars, "connected_at_start", "problem_at_start"])];
  const report = { default_url: defaultUrl, scenario };
  if (plan.during) plan.during(vm, report);
  const { finished, seconds, stage } = await p.run(vm, info.id, vars, 90000);
  report.finished = finished;
  report.seconds = seconds;
  for (const v of vars) report[v] = stage.lookupVariableByNameAndType(v, "").value;
  if (plan.after) await plan.after(report);
  vm.stopAll();
  if (extension.ws) extension.ws.close();
  process.stdout.write(JSON.stringify(report) + "\n", () => process.exit(report.finished ? 0 : 1));
}

main().catch((e) => { console.error(e && e.stack || e); process.exit(2); });
