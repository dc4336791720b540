"""The Scratch blocks the box serves (edge/static/scratch/edge-box.js), run in npm's real
scratch-vm under Node against a real box (`edge run`, simulated pins, folder camera, real model):
a teach block waits for its recording like a hand on the button, counts are judged by the box,
class names compare like the box compares them, and a lost box leaves no stale answer.

Each test runs one scenario of tests/node/edge_box_extension.js. EDGE_BOX_JS=<file> runs them
with another version of the extension (e.g. `git show HEAD:edge/static/scratch/edge-box.js`).
"""

import json
import re
import subprocess
import time
import unicodedata
import urllib.request

import pytest

from edge import commands, rules
from edge.commands import CommandInvalid
from test_web import NODE_DIR, _node_ready, daemons, photos  # noqa: F401 (daemons: the fixture, test_web's)

PIN = "2468"


def scenario(box, name, *extra, timeout=180):
    """Run one scenario of the node script against the box; its report."""
    node = _node_ready()
    done = subprocess.run([node, str(NODE_DIR / "edge_box_extension.js"), box.url, PIN, name, *map(str, extra)],
                          capture_output=True, text=True, timeout=timeout, cwd=NODE_DIR)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finished"], f"the Scratch program did not end: {report}"
    assert report["connected_at_start"] is True and report["problem_at_start"] == "", report
    return report


def box_on(daemons, clothing, kind="hat"):
    box = daemons(pin=PIN)
    box.show(photos(clothing, kind) if kind else [])
    return box.start()


def count_refusal(count):
    """What the box answers to a record command with this count (its one rule, edge/rules.py)."""
    with pytest.raises(CommandInvalid) as refused:
        commands.parse("record", {"class": "B", "count": count})
    return str(refused.value)


def test_two_teach_blocks_in_a_row_each_teach_their_count(daemons, clothing):
    """`teach [a] with 10` then `teach [B] with 10`: the first block waits until its recording
    ended (a teach block used to return when recording began, and the next one cut it short:
    A=1, B=10)."""
    box = box_on(daemons, clothing)
    report = scenario(box, "teach_twice")
    assert report["result_a"] == "ok" and report["result_b"] == "ok", report
    assert report["a_after_first"] == 10, f"the first block returned before its 10 pictures: {report}"
    assert (report["a"], report["b"]) == (10, 10), report
    assert report["box"]["recording"] is None


def test_counts_are_judged_by_the_box_not_changed(daemons, clothing):
    """0, -5, abc, 9999, 2.5 and nothing are refused with the box's own line (they used to be
    taught as 1 or 500 pictures with 'ok'); a count typed as text is taken as the number."""
    box = box_on(daemons, clothing)
    report = scenario(box, "counts")
    refusal = count_refusal(0)
    assert refusal == f"'count' must be a whole number from 1 to {rules.MAX_RECORD_COUNT}"
    for name, given in [("zero", 0), ("minus_five", -5), ("abc", "abc"), ("huge", 9999), ("half", 2.5),
                        ("empty", "")]:
        assert report[name] == count_refusal(given), (name, report)
    assert report["b_refused"] == 0, "a refused count teaches nothing"
    assert report["three"] == "ok" and report["b_three"] == 3, report
    with urllib.request.urlopen(box.url + "scratch/edge-box.js", timeout=10) as r:
        source = r.read().decode()
    assert not re.search(rf"\b{rules.MAX_RECORD_COUNT}\b", source), \
        "the extension repeats the box's largest count; the box says it in its refusal"


def test_label_blocks_match_class_names_like_the_box(daemons, clothing):
    """The box's class is "A"; `label is [a]?`, `score of [a]` and `when label is [a]` match it,
    as `teach [a]` and `pictures of [a]` do (they used to be false and 0)."""
    box = box_on(daemons, clothing)
    report = scenario(box, "label_case")
    assert report["label"] == "A", report
    assert report["is_a"] is True and report["is_a_spaced"] is True and report["is_b"] is False, report
    assert report["score_A"] > 0 and report["score_a"] == report["score_A"], report
    assert report["pictures_a"] == 8, report
    assert report["hat_a"] == "yes", "when label is [a] did not start"


def test_class_names_compare_like_python_casefold(daemons, clothing, tmp_path):
    """The extension's comparison against the box's (rules.find_class: strip, NFC, casefold) for
    every letter and digit a class name may hold, each in lower, upper, title and casefolded form,
    and a few whole names: each given to the connected extension as the box's decision message,
    then asked with `label is [..]?` and `score of [..]`."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c).isalnum()
             and unicodedata.category(chr(c))[0] in "LN"]
    cases = set()
    for c in chars:
        for typed in {c.lower(), c.upper(), c.title(), c.casefold(), c.swapcase(), c.lower().upper().lower()}:
            cases.add(("x" + c + "x", "X" + typed + "X"))
    cases |= {("Straße", "STRASSE"), ("STRASSE", "straße"), ("ẞ", "ss"), ("ΟΔΟΣ", "οδοσ"), ("ΟΔΟΣ", "οδος"),
              ("Σα", "ςα"), ("ı", "I"), ("ı", "i"), ("Iı", "ii"), ("İ", "i̇"), ("İ", "i"), ("ﬁsh", "FISH"),
              ("Ꭰ", "ꭰ"), ("Kelvin", "\u212aelvin"), ("ſun", "Sun"), ("A", " a "), ("B", "b "), ("A", "B"),
              ("caf\u00e9", "CAFE\u0301"), ("caf\u00e9", "cafe")}      # an accent typed as its own character
    cases = sorted(cases)
    nfc = lambda text: unicodedata.normalize("NFC", text)
    expected = [nfc(label).casefold() == nfc(typed.strip()).casefold() for label, typed in cases]
    assert sum(expected) > len(cases) // 2
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    report = scenario(box_on(daemons, clothing), "casefold", cases_file)
    assert report["connected_after"] is True
    answers = report["answers"]
    assert len(answers) == 2 * len(cases)
    got = [answers[i:i + 2] for i in range(0, len(answers), 2)]   # "tt": label is, and its score
    wrong = [(label, typed, want, g) for (label, typed), want, g in zip(cases, expected, got)
             if g != ("tt" if want else "ff")]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from the box, e.g. {wrong[:10]}"


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM"])
def test_losing_the_box_ends_the_teach_block_and_the_stale_answer(daemons, clothing, signal):
    """The box is lost while `teach [A] with 500` waits, killed (a power cut, a pulled cable: no
    recording_stopped comes) or stopped (it ends the recording, then closes): the block ends saying
    so, and label, `label is [A]?`, confidence, score and pictures no longer report what the box
    said last (they used to stay "A", true and 0.38)."""
    box = box_on(daemons, clothing)
    report = scenario(box, "lose_box", box.proc.pid, signal)
    assert report["label_before"] == "A" and report["confidence_before"] > 0, report
    assert report["connected"] is False
    assert (report["label"], report["is_a"], report["confidence"], report["score_a"], report["pictures_a"]) \
        == ("", False, 0, 0, 0), report
    assert report["problem"] == f"lost the box at ws://127.0.0.1:{box.port}/ws", report
    if signal == "SIGKILL":
        assert report["teach_result"] == "lost the box while teaching A", report
    else:
        assert re.fullmatch(r"teaching A ended after \d+ of 500 pictures \(something else ended the recording\)"
                            r"|lost the box while teaching A", report["teach_result"]), report


def test_a_teach_block_ends_when_something_else_ends_its_recording(daemons, clothing):
    """Another client sends record/stop while `teach [A] with 500` waits: the block ends at once
    and says how many pictures it got."""
    box = box_on(daemons, clothing)
    report = scenario(box, "ended_elsewhere")
    added = report["pictures_a"]
    assert report["teach_result"] == \
        f"teaching A ended after {added} of 500 pictures (something else ended the recording)", report
    assert report["stop_answer"]["ok"] is True, report
    assert 3 <= added < 500, report
    assert report["ended_at"] - report["stopped_at"] < 5000, "the block waited on after the recording ended"
    assert report["box"]["recording"] is None


def test_a_teach_block_lets_go_when_no_picture_comes(daemons, clothing):
    """The camera shows nothing: `teach [A] with 5` does not wait forever; after 15 s without a
    picture it stops the recording it started (as releasing a button would) and says why."""
    box = box_on(daemons, clothing, kind=None)
    report = scenario(box, "no_picture")
    assert report["teach_result"] == "stopped teaching A after 0 of 5 pictures: no new picture for 15 s", report
    assert 14 <= report["waited"] < 30, report
    assert report["box"]["recording"] is None, "the box goes on recording after the block gave up"


def test_the_stop_sign_lets_go_of_a_teach_blocks_recording(daemons, clothing):
    """Stopping the project while `teach [A] with 500` waits stops that recording on the box."""
    box = box_on(daemons, clothing)
    started = time.monotonic()
    report = scenario(box, "stop_sign")
    assert report["recording_before_stop"] == "A", report
    assert report["box"]["recording"] is None, "the box went on recording after the project stopped"
    assert time.monotonic() - started < 60
