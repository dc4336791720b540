"""Soak test: the real daemon for a long time with frames, commands and broker restarts.

    .venv/bin/python benchmarks/soak.py --minutes 30            # the published run
    .venv/bin/python benchmarks/soak.py --minutes 2 --restart-every 0.5   # a quick look

What runs: `python -m edge run --simulate --no-keys` with `camera.source: mqtt` against a real
mosquitto on a free port (tests/mqtt_broker.py). A sender publishes real photos to camera/frame
and waits for each one's answer (a prediction, a sample_added event or an error event) before the
next; every few seconds a command goes in (state, threshold, record with a count, undo, clear of a
class, and invalid ones), every tenth frame is garbage; the broker is killed and started again
every --restart-every minutes. Every 10 s the daemon's resident memory (VmRSS) and thread count are
sampled from /proc.

Pass (exit 0) when: the daemon is alive at the end and exits 0 on SIGTERM; resident memory is flat
(the mean of the last fifth of the samples is at most --rss-slack MiB above the mean of the first
fifth after warm-up); the thread count never changes after warm-up; every frame sent outside a
restart window (10 s after a restart began) was answered; every garbage frame and every invalid
command got its error answer; the log holds no traceback. A JSON summary is printed (and written to
--json).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from faults_daemon import EdgeDaemon, daemon_config  # noqa: E402
from mqtt_broker import Broker, Watcher  # noqa: E402

PREFIX = "edge/soak"


def photos() -> list:
    import os
    root = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets")) / "clothing-small" / "train"
    files = sorted((root / "shoes").glob("*.jpg"))[:10] + sorted((root / "hat").glob("*.jpg"))[:10]
    if not files:
        sys.exit(f"no photos under {root} (set EDGE_DATASETS)")
    return [f.read_bytes() for f in files]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--restart-every", type=float, default=3.0, help="minutes between broker restarts")
    p.add_argument("--fps", type=float, default=5.0, help="frames per second sent (at most)")
    p.add_argument("--rss-slack", type=float, default=8.0, help="MiB of RSS growth still called flat")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before memory is judged")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    broker = Broker(tmp / "broker").start()
    config = daemon_config(tmp, broker.port, PREFIX, mqtt={"client_id": "edge-soak"},
                           capture={"max_per_class": 200})
    daemon = EdgeDaemon(config, tmp / "daemon.log")
    frames = photos()
    rng = random.Random(5)
    w = None
    samples = []            # (seconds since start, rss KiB, threads)
    sent = answered = unanswered = garbage = garbage_answered = garbage_wrong = 0
    commands = bad_commands = bad_answered = restarts = lost_answers = 0
    restart_windows = []    # (start, end) monotonic
    lock = threading.Lock()
    stop = threading.Event()
    start = time.monotonic()
    deadline = start + args.minutes * 60

    def in_restart_window(t0: float, t1: float) -> bool:
        with lock:
            return any(a - 1 <= t1 and t0 <= b for a, b in restart_windows)

    def sample_loop():
        while not stop.wait(10):
            try:
                samples.append((round(time.monotonic() - start, 1), daemon.kib("VmRSS"), daemon.threads()))
            except (OSError, KeyError):
                pass

    def broker_loop():
        nonlocal restarts
        while not stop.wait(args.restart_every * 60):
            t = time.monotonic()
            broker.stop()
            time.sleep(rng.uniform(0.5, 5.0))
            broker.start()
            restarts += 1
            with lock:
                restart_windows.append((t, time.monotonic() + 10))

    try:
        w = Watcher(broker, topics=(f"{PREFIX}/#",))
        daemon.start()
        w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online", timeout=120)
        threads = [threading.Thread(target=sample_loop, daemon=True),
                   threading.Thread(target=broker_loop, daemon=True)]
        for t in threads:
            t.start()
        i = 0
        next_command = time.monotonic() + 2
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            is_garbage = i % 10 == 9
            payload = rng.choice([b"not an image", b"\xff\xd8\xff" + bytes(200)]) if is_garbage else frames[i % len(frames)]
            mark = w.mark()
            info = w.client.publish(f"{PREFIX}/camera/frame", payload, qos=1)
            sent += 1
            garbage += is_garbage

            def answer():
                for m in w.messages[mark:]:
                    if m.topic == f"{PREFIX}/prediction":
                        return "ok"
                    if m.topic == f"{PREFIX}/event":
                        e = json.loads(m.payload)
                        if e["event"] == "sample_added":
                            return "ok"
                        if e["event"] == "error" and e["source"] in ("frame", "camera"):
                            return "error"
                return None

            got = None
            end = time.monotonic() + 5
            while time.monotonic() < end and got is None:
                time.sleep(0.01)
                got = answer()
            if got is not None:
                answered += 1
                garbage_answered += is_garbage and got == "error"
                garbage_wrong += is_garbage and got != "error"
            elif not in_restart_window(t0, time.monotonic()) and info.is_published():
                unanswered += 1
                print(f"unanswered frame {i} at {time.monotonic() - start:.0f}s", file=sys.stderr)
            if time.monotonic() >= next_command:
                action, payload, valid = rng.choice([
                    ("state", b"", True), ("threshold", b"0.4", True), ("threshold", b"auto", True),
                    ("record", b'{"class": "shoes", "count": 3}', True), ("undo", b"", None),
                    ("clear", b"hat", True), ("record", b'{"class": "hat", "count": 2}', True),
                    ("record", b"nosuch", False), ("threshold", b"7", False), ("rename", b"x", False)])
                m, t_cmd = w.mark(), time.monotonic()
                w.client.publish(f"{PREFIX}/cmd/{action}", payload, qos=1)
                commands += 1
                bad_commands += valid is False
                try:
                    r = json.loads(w.wait(f"{PREFIX}/cmd/result", after=m, timeout=5).payload)
                    bad_answered += valid is False and r["ok"] is False
                except AssertionError:
                    if in_restart_window(t_cmd, time.monotonic()):
                        bad_commands -= valid is False   # lost with the broker: not the box's fault
                    elif valid is not False:
                        lost_answers += 1                # (a missing refusal shows in the counts above)
                        print(f"unanswered command {action} at {time.monotonic() - start:.0f}s", file=sys.stderr)
                next_command = time.monotonic() + rng.uniform(1, 5)
            i += 1
            time.sleep(max(0.0, 1 / args.fps - (time.monotonic() - t0)))
            if len(w.messages) > 20000:          # keep the watcher's memory flat too
                with w._cond:
                    del w.messages[:10000]
        alive = daemon.alive
        stop.set()
        code = daemon.stop(60)
    finally:
        stop.set()
        if w is not None:
            w.close()
        daemon.close()
        broker.stop()

    log = daemon.log()
    judged = [s for s in samples if s[0] >= args.warmup] or samples
    fifth = max(1, len(judged) // 5)
    rss_first = statistics.mean(s[1] for s in judged[:fifth]) / 1024
    rss_last = statistics.mean(s[1] for s in judged[-fifth:]) / 1024
    thread_counts = sorted({s[2] for s in judged})
    summary = {
        "minutes": args.minutes, "broker_restarts": restarts, "frames_sent": sent, "frames_answered": answered,
        "frames_unanswered_outside_restarts": unanswered, "garbage_frames": garbage,
        "garbage_frames_refused": garbage_answered, "garbage_frames_accepted": garbage_wrong,
        "command_answers_missing_outside_restarts": lost_answers, "commands": commands, "invalid_commands": bad_commands,
        "invalid_commands_refused": bad_answered, "rss_mib_first": round(rss_first, 1),
        "rss_mib_last": round(rss_last, 1), "rss_mib_max": round(max(s[1] for s in samples) / 1024, 1),
        "threads": thread_counts, "samples": len(samples), "exit_code": code, "alive_at_end": alive,
        "tracebacks": log.count("Traceback"), "log": str(daemon.log_path),
    }
    summary["pass"] = bool(alive and code == 0 and rss_last - rss_first <= args.rss_slack
                           and len(thread_counts) == 1 and unanswered == 0 and garbage_wrong == 0 and lost_answers == 0
                           and bad_answered == bad_commands and summary["tracebacks"] == 0)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
