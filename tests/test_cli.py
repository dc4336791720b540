"""The `edge` command as users run it: a real subprocess, real photos, real model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge.cli import main
from edge.image import list_images
from mqtt_broker import wait_until


def wait_for(predicate, timeout) -> bool:
    try:
        return bool(wait_until(predicate, timeout, 0.1))
    except AssertionError:
        return False


def edge(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_embed_prints_a_summary_per_image(clothing):
    files = list_images(clothing / "test" / "hat")[:2]
    out = edge("embed", *files)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("dim=1280" in line for line in lines)


def test_embed_writes_npy(clothing, tmp_path):
    photo = list_images(clothing / "test" / "hat")[0]
    assert main(["embed", str(photo), "--npy", str(tmp_path)]) == 0
    vec = np.load(tmp_path / (photo.stem + ".npy"))
    assert vec.shape == (1280,) and np.isfinite(vec).all()


def test_embed_bad_image_is_one_line_and_others_still_done(clothing, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    good = list_images(clothing / "test" / "hat")[0]
    out = edge("embed", bad, good)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "broken.jpg" in out.stderr
    assert "dim=1280" in out.stdout


def test_bad_model_is_one_line_error(tmp_path, clothing):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"junk")
    out = edge("embed", "--model", model, list_images(clothing / "test" / "hat")[0])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "m.tflite" in out.stderr


def test_eval_json_on_clothing(clothing):
    out = edge("eval", clothing, "--shots", 5, "--trials", 3, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"accuracy", "per_class", "shots", "trials"} <= set(result)
    assert result["shots"] == 5 and result["trials"] == 3
    assert set(result["per_class"]) == {p.name for p in (clothing / "train").iterdir() if p.is_dir()}
    assert 0.45 < result["accuracy"] <= 1.0  # chance is 0.10; the model reaches ~0.65


def test_eval_flat_folder_of_classes(clothing, tmp_path):
    """A plain folder of class folders: shots drawn from each class, the rest tested."""
    for cls in ("hat", "shoes"):
        (tmp_path / cls).mkdir()
        for p in list_images(clothing / "train" / cls)[:8]:
            (tmp_path / cls / p.name).symlink_to(p)
    out = edge("eval", tmp_path, "--shots", 3, "--trials", 2, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["test_images"] == 10 and result["accuracy"] > 0.7


def test_eval_refuses_a_folder_without_classes(tmp_path):
    out = edge("eval", tmp_path)
    assert out.returncode == 1 and "two class folders" in out.stderr and "Traceback" not in out.stderr


def test_bench_reports_ratios():
    out = edge("bench", "--runs", 20, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("int8_invoke_ms", "float32_invoke_ms", "int8_over_float32",
                "preprocess_over_int8_invoke", "rss_after_load_mb", "head_5000_in_loop_ms"):
        assert result[key] > 0
    # the head's cost per frame in the loop, over the invoke: what a Pi owner compares with 0.1
    assert isinstance(result["head_5000_in_loop_over_int8_invoke"], float)
    # The thread count it really used: all cores the process may run on (model.threads: null).
    assert result["threads"] == len(os.sched_getaffinity(0))
    assert result["cpu"] and result["int8_flags"]
    one = edge("bench", "--runs", 5, "--json", "--threads", 1)
    assert one.returncode == 0 and json.loads(one.stdout)["threads"] == 1


def test_no_command_prints_help():
    out = edge()
    assert out.returncode == 2 and "embed" in out.stdout


@pytest.mark.parametrize("argv", [["eval"], ["embed"], ["nope"]])
def test_usage_errors_exit_2(argv):
    assert edge(*argv).returncode == 2


@pytest.mark.parametrize("option, value", [
    ("--shots", 0), ("--shots", -3), ("--trials", 0), ("--k", 0), ("--burst", 0), ("--seed", -1),
    ("--nothing-shots", 0), ("--classes", -1), ("--holdout-classes", -1), ("--threads", 0),
    ("--shots", "ten"), ("--threshold", "high"), ("--threshold", 2)])
def test_eval_refuses_a_bad_number_in_one_line(tmp_path, option, value):
    """`edge eval DIR --shots 0` used to run and print nan curves and accuracy 0.000; every
    numeric option is checked as it is parsed: one line naming the option, exit code 2."""
    out = edge("eval", tmp_path, option, value, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edge eval: error: argument {option}: "), out.stderr
    assert repr(str(value)) in lines[0] or f"got {value}" in lines[0]


def test_eval_open_set_figures(clothing, calibration):
    out = edge("eval", clothing, "--shots", 5, "--trials", 2, "--json",
               "--unknown", calibration / "registry-photos", "--holdout-classes", 2)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("unknown_rate", "known_accuracy", "holdout_unknown_rate", "baseline_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert r["unknown_images"] == 63 and r["holdout_classes"] == 2
    assert len(r["per_class"]) == 10  # every class is trained in some trial
    assert r["unknown_rate"] > 0.5  # landscapes and wallpapers are not clothes
    assert r["known_accuracy"] <= r["accuracy"] + 1e-9  # the gate can only cost known accuracy


def _snapshot(folder):
    import hashlib
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_reference_without_out_writes_into_the_current_folder_never_models(calibration, tmp_path):
    """`edge reference DIR` once overwrote the shipped model's reference mean: without --out it
    writes into the current folder, refuses to overwrite a file there, and refuses models/."""
    from edge.engine import DEFAULT_MODEL, MODELS_DIR, load_spread, reference_path, spread_path
    from edge.head import SPREAD_RANK
    before = _snapshot(MODELS_DIR)

    def reference(cwd):
        return subprocess.run([sys.executable, "-m", "edge", "reference", str(calibration / "registry-photos")],
                              capture_output=True, text=True, timeout=300, cwd=cwd)

    out = reference(tmp_path)
    assert out.returncode == 0, out.stderr
    written = tmp_path / reference_path(DEFAULT_MODEL).name
    spread = tmp_path / spread_path(DEFAULT_MODEL).name
    assert f"wrote {written} and {spread} from " in out.stdout and str(reference_path(DEFAULT_MODEL)) in out.stdout
    mean = np.load(written)
    assert mean.shape == (1280,) and mean.dtype == np.float32 and np.isfinite(mean).all()
    assert load_spread(DEFAULT_MODEL, 1280, spread).shape == (SPREAD_RANK, 1280)
    assert sorted(tmp_path.iterdir()) == sorted([written, spread])
    assert _snapshot(MODELS_DIR) == before

    kept = written.read_bytes()
    again = reference(tmp_path)                 # never overwrites without being asked
    assert again.returncode == 1 and "exists already" in again.stderr and "--out" in again.stderr
    assert again.stderr.strip().count("\n") == 0 and written.read_bytes() == kept   # one line, no model loaded
    written.unlink()                            # the spread prior alone is not overwritten either
    again = reference(tmp_path)
    assert again.returncode == 1 and f"{spread} exists already" in again.stderr and not written.exists()
    inside = reference(MODELS_DIR)              # run from models/ itself: refused before any work
    assert inside.returncode == 1 and "is in models/" in inside.stderr, inside.stderr
    assert _snapshot(MODELS_DIR) == before


def test_eval_with_a_bad_reference_file_says_so_in_one_line(clothing, tmp_path):
    """`edge eval --reference FILE` with a missing file, a text file or a mean of the wrong size:
    one error line and exit status, never a traceback."""
    text, short = tmp_path / "notes.npy", tmp_path / "short.npy"
    text.write_text("not an array\n")
    np.save(short, np.zeros(5, np.float32))
    for path, says, code in ((tmp_path / "none.npy", "no such file", 1), (text, "unreadable reference mean", 1),
                             (short, "not a reference mean for this model", 1)):
        out = subprocess.run([sys.executable, "-m", "edge", "eval", str(clothing), "--reference", str(path),
                              "--trials", "1"], capture_output=True, text=True, timeout=300)
        errors = [line for line in out.stderr.splitlines() if line.startswith("edge: error:")]
        assert out.returncode == code and len(errors) == 1 and says in errors[0], out.stderr
        assert "Traceback" not in out.stderr


def test_check_config_prints_every_error_one_line_each_in_file_order(tmp_path):
    """Six bad settings in five sections, not in the order the config is read: six lines, in the
    order of the file, each with the real prefix, exit 2, and nothing on stdout."""
    config = tmp_path / "box.yaml"
    config.write_text("web:\n  port: 0\n"
                      "camera:\n  fps: fast\n"
                      "classes:\n  - name: A\n    button: GPIO99\n  - name: unknown\n"
                      "colour: blue\n"
                      "model:\n  kernels: quick\n")
    out = edge("check-config", config)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert [line.split(": ")[3] for line in lines] == [
        "web.port", "camera.fps", "classes[0].button", "classes[1].name", "unknown key 'colour' (known",
        "model.kernels"], lines
    assert all(line.startswith("edge: error: box.yaml: ") for line in lines), lines
    assert lines[1] == "edge: error: box.yaml: camera.fps: expected a number between 1 and 120, got 'fast'"


def test_export_and_import_while_the_box_runs_say_how_to_stop_it(daemons, clothing, tmp_path):
    """The running daemon holds the store's lock: `edge export` / `edge import` refuse in one line
    that says how to stop it, and write nothing; with the daemon stopped both work."""
    from faults_daemon import daemon_config
    config = daemon_config(tmp_path / "box", 1, "edge/cli", source="folder",
                           camera_folder=clothing / "test" / "hat", mqtt={"enabled": False})
    exported = tmp_path / "knowledge.edge"

    def running():
        daemon = daemons(config).start()
        assert wait_for(lambda: "camera folder, classes shoes, hat" in daemon.log() or not daemon.alive, 60)
        assert daemon.alive, daemon.log()
        return daemon

    def refused(*args):
        out = edge(*args, "--config", config)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and out.stdout == "", out
        assert lines[-1].startswith("edge: error: store ") and "in use by another edge process" in lines[-1]
        assert lines[-1].endswith("(is the box running? stop it first: sudo systemctl stop edge)"), lines
        assert "Traceback" not in out.stderr

    daemon = running()
    refused("export", exported)
    assert not exported.exists()
    assert daemon.stop() == 0
    out = edge("export", exported, "--config", config)
    assert out.returncode == 0 and exported.is_file(), out.stderr

    daemon = running()
    refused("import", exported)
    assert "imported" not in daemon.log()
    assert daemon.stop() == 0
    out = edge("import", exported, "--config", config)
    assert out.returncode == 0 and out.stdout.startswith("imported 0 samples"), out
