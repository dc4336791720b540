"""The terminal simulator against a real box: real model, real photos through a folder camera,
gpiozero mock pins driven by the simulator's keys, a real store. The drawn line is read as a
user would read it."""

import re
import time

import pytest

from edge import commands as C
from edge.image import list_images
from edge.sim import Terminal
from test_box import Rig, wait_for


class SimRig(Rig):
    """A running box with the terminal listening as one of its outputs, as `edge run` has it."""

    def attach(self, box):
        box.gestures.clear_all_hold = 3.0     # the countdown in whole seconds, in a short test
        self.term = Terminal(box, box.panel, box.camera.camera)
        box.outputs.append(self.term)

    def cell(self, key):
        """The drawn cell of the class on key `key`: (name, samples, REC shown, LED char)."""
        m = re.search(rf"\[{key} (\S+) (\d+)( REC)?(?: ([#.]))?\]", self.term.line(80))
        assert m, self.term.line(80)
        return m.group(1), int(m.group(2)), bool(m.group(3)), m.group(4)

    def samples(self, name):
        return next(c["samples"] for c in self.box.state()["classes"] if c["name"] == name)

    def hold(self, key, until, timeout=30):
        """Press a key (the button goes down), wait for `until`, press it again (released)."""
        self.term.key(key)
        assert wait_for(until, timeout), self.term.line(80)
        self.term.key(key)


@pytest.fixture
def sim(tmp_path, engine, mock_factory, clothing):
    r = SimRig(tmp_path, engine, mock_factory)
    r.show(list_images(clothing / "train" / "shoes")[:12])
    assert wait_for(lambda: r.box.frames > 0 and r.box.fault is None, 15)
    yield r
    if r.thread.is_alive():
        r.stop()


def test_counts_recording_blink_and_renamed_names_are_drawn(sim):
    t = sim.term
    assert wait_for(lambda: t.line(80).startswith("[1 A 0 #]") or t.line(80).startswith("[1 A 0 .]"))
    t.key("1")
    assert wait_for(lambda: sim.cell(1)[2] and sim.cell(1)[1] >= 2), t.line(80)
    lamps = set()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:      # the recorded class's LED blinks: the line shows both
        lamps.add(sim.cell(1)[3])
        time.sleep(0.02)
    t.key("1")
    assert lamps == {"#", "."}, lamps
    assert wait_for(lambda: sim.box.recording is None and not sim.cell(1)[2], 5)
    assert wait_for(lambda: sim.cell(1)[1] == sim.samples("A"), 5), (t.line(80), sim.box.state())
    assert sim.cell(2) == ("B", 0, False, ".")

    replies = []
    sim.send("rename", {"from": "A", "to": "Shoes"}, replies.append)
    assert wait_for(lambda: replies) and replies[0]["ok"], replies
    assert wait_for(lambda: sim.cell(1)[0] == "Shoes", 5), t.line(80)
    assert "renamed A to Shoes" in t.notes()
    before = sim.cell(1)[1]
    sim.hold("1", lambda: sim.cell(1)[1] >= before + 2)     # the renamed class keeps its key
    assert wait_for(lambda: sim.cell(1)[1] == sim.samples("Shoes"), 5)
    assert sim.cell(2)[1] == 0


def test_undo_and_clear_get_a_line_above_the_status_line(sim, clothing, capsys):
    t = sim.term
    sim.hold("1", lambda: sim.samples("A") >= 3)
    sim.show(list_images(clothing / "train" / "hat")[:12])
    sim.hold("2", lambda: sim.samples("B") >= 3)
    assert wait_for(lambda: sim.box.recording is None, 5)
    t.notes()
    b = sim.samples("B")
    t.key("f")
    time.sleep(0.1)
    t.key("f")                                  # a tap: undo B's burst
    assert wait_for(lambda: sim.cell(2)[1] == 0, 5), t.line(80)
    assert wait_for(lambda: t._notes, 5)
    t._draw()
    drawn = capsys.readouterr().err
    note = f"undo: forgot the last {b} pictures of B"
    assert drawn.startswith(f"\r\x1b[K{note}\n\r\x1b[K[1 A "), repr(drawn)   # the note, then the line

    t.key("f")                                  # function held + the class key: clear A
    assert wait_for(lambda: "f: clear all in" in t.line(80), 5), t.line(80)
    t.key("1")
    assert wait_for(lambda: sim.cell(1)[1] == 0, 5), t.line(80)
    assert wait_for(lambda: "f held" in t.line(80), 5), t.line(80)   # used: no countdown any more
    t.key("1")
    t.key("f")
    assert wait_for(lambda: "f held" not in t.line(80), 5)
    assert t.notes() == ["cleared A: it has no pictures now"]


def test_holding_the_function_key_counts_down_then_clears_all(sim):
    t = sim.term
    sim.hold("1", lambda: sim.samples("A") >= 3)
    assert wait_for(lambda: sim.box.recording is None, 5)
    t.notes()
    t.key("f")
    seen = []
    while not seen or seen[-1] != "f held":
        m = re.search(r"f: clear all in \ds|f held", t.line(80))
        if m and (not seen or seen[-1] != m.group(0)):
            seen.append(m.group(0))
        assert len(seen) < 6 and sim.thread.is_alive(), seen
        time.sleep(0.02)
    assert seen == ["f: clear all in 3s", "f: clear all in 2s", "f: clear all in 1s", "f held"], seen
    assert wait_for(lambda: sim.cell(1)[1] == 0, 5), t.line(80)
    t.key("f")
    assert t.notes() == ["cleared all classes: the box knows nothing now"]
    assert wait_for(lambda: "f held" not in t.line(80) and "f:" not in t.line(80), 5)


def test_s_holds_one_picture_and_n_p_step_it(sim, clothing):
    t, cam = sim.term, sim.box.camera.camera
    assert wait_for(lambda: cam.shown is not None)
    t.key("s")
    shown = cam.shown
    assert wait_for(lambda: re.search(r"cam camera \d+/12 still", t.line(80)), 5), t.line(80)
    time.sleep(0.3)
    assert cam.shown == shown                   # the same picture, frame after frame
    number = int(re.search(r"(\d+)/12 still", t.line(80)).group(1))
    t.key("n")
    assert wait_for(lambda: f"{number % 12 + 1}/12 still" in t.line(80), 5), t.line(80)
    t.key("p")
    t.key("p")
    assert wait_for(lambda: f"{(number - 2) % 12 + 1}/12 still" in t.line(80), 5), t.line(80)
    t.key("s")                                  # play on
    assert wait_for(lambda: "still" not in t.line(80), 5)
    assert wait_for(lambda: cam.shown != shown, 5)


def test_the_line_fits_80_columns_and_shortens_names_first(sim):
    t = sim.term
    replies = []
    sim.send("rename", {"from": "A", "to": "a very long class name here"}, replies.append)
    sim.send("classes", {"add": "taught over the web"}, replies.append)
    assert wait_for(lambda: len(replies) == 2) and all(r["ok"] for r in replies), replies
    t.key("f")
    assert wait_for(lambda: "clear all in" in t.line(80), 5)
    line = t.line(80)
    t.key("f")
    assert len(line) < 80, line                 # names shortened, the camera left out for it
    assert line.startswith("[1 a very~ 0 .] [2 B 0 .] [- taught~ 0] | sees unknown | "
                           "f: clear all in "), line
    assert wait_for(lambda: "f:" not in t.line(80), 5)
    assert t.line(80) == "[1 a very long~ 0 .] [2 B 0 .] [- taught over~ 0] | sees unknown | cam camera"
    wide = t.line(200)
    assert "[1 a very long class name here 0" in wide and "status #" in wide
    assert all(len(row) < 80 for row in t.help().splitlines())
    t.key("f")
    assert wait_for(lambda: "clear all in" in t.line(80), 5)
    narrow = t.line(60)                         # narrower still: the countdown stays
    t.key("f")
    assert len(narrow) < 60 and re.search(r" \| f: clear all in \ds$", narrow), narrow


def test_the_keys_work_again_after_ctrl_z_and_fg(sim, monkeypatch):
    """After Ctrl-Z and `fg` the shell had left the terminal in line mode: keys waited for Enter
    while a held class went on recording."""
    import os
    import pty
    import signal
    import termios
    master, slave = pty.openpty()
    with open(slave, "r", closefd=False) as tty_in:
        monkeypatch.setattr("sys.stdin", tty_in)
        sim.term.start()
        try:
            assert not termios.tcgetattr(slave)[3] & termios.ICANON, "keys one at a time"
            termios.tcsetattr(slave, termios.TCSADRAIN, sim.term._saved)      # what the shell does at fg
            assert termios.tcgetattr(slave)[3] & termios.ICANON
            os.kill(os.getpid(), signal.SIGCONT)                              # what fg sends
            assert wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON, 5), "keys one at a time again"
            os.write(master, b"1")
            assert wait_for(lambda: sim.cell(1)[2], 10), sim.term.line(80)    # A records at once, no Enter
            os.write(master, b"1")
        finally:
            sim.term.close()
            os.close(master)
            os.close(slave)
    assert signal.getsignal(signal.SIGCONT) == signal.SIG_DFL
