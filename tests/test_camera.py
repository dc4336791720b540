"""Camera sources: the folder camera (demos, tests), the ISP frame size, clear errors."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from edge.camera import CameraError, FolderCamera, Picamera2Camera, WebcamCamera, isp_size, make_camera
from edge.image import list_images


def test_folder_camera_loops_and_follows_the_folder(tmp_path, clothing):
    hats = list_images(clothing / "test" / "hat")[:2]
    for p in hats:
        shutil.copy(p, tmp_path / p.name)
    cam = FolderCamera(tmp_path, fps=200)
    cam.open()
    frames = [cam.read() for _ in range(4)]
    assert all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in frames)
    assert np.array_equal(frames[0], frames[2]) and not np.array_equal(frames[0], frames[1])
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(CameraError, match="no images"):
        cam.read()


def test_folder_of_folders_is_a_set_of_scenes(clothing):
    cam = FolderCamera(clothing / "test", fps=200)
    assert [s.name for s in cam.scenes()][:2] == ["dress", "hat"]
    assert cam.current_folder().name == "dress"
    assert cam.next_scene() == "hat"
    assert cam.next_scene(-2) == "t-shirt"
    assert cam.read().shape[2] == 3


def test_still_holds_one_picture_and_steps_on_request(tmp_path, clothing):
    """The simulator's `s` and, while still, `n`/`p`: one picture held, stepped, then played on."""
    hats = list_images(clothing / "test" / "hat")[:3]
    for i, p in enumerate(hats):
        shutil.copy(p, tmp_path / f"{i}{p.suffix}")
    names = sorted(p.name for p in tmp_path.iterdir())
    cam = FolderCamera(tmp_path, fps=200)
    cam.read()
    cam.read()
    assert cam.shown.name == names[1]
    cam.set_still(True)
    held = [cam.read() for _ in range(3)]
    assert cam.shown.name == names[1] and all(np.array_equal(held[0], f) for f in held)
    cam.step_picture(1)
    cam.read()
    assert cam.shown.name == names[2] and cam.still and cam.shown_at == (3, 3)
    cam.step_picture(1)                 # past the end: round to the first
    cam.read()
    assert cam.shown.name == names[0]
    cam.step_picture(-1)
    cam.read()
    assert cam.shown.name == names[2]
    cam.set_still(False)                # play on from the held picture
    assert [(cam.read(), cam.shown.name)[1] for _ in range(2)] == [names[0], names[1]]


def test_broken_image_is_a_camera_error_not_a_crash(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    cam = FolderCamera(tmp_path, fps=200)
    with pytest.raises(CameraError, match="unreadable"):
        cam.read()
    with pytest.raises(CameraError, match="not found"):
        FolderCamera(tmp_path / "missing").open()


def test_isp_frame_covers_the_model_input_and_no_more():
    assert isp_size(640, 480, 224) == (320, 224)
    assert isp_size(1920, 1080, 160) == (288, 160)
    assert isp_size(320, 240, 224) == (320, 224)
    w, h = isp_size(1296, 972, 128)
    assert min(w, h) >= 128 and w % 32 == 0 and h % 16 == 0


def test_missing_hardware_libraries_are_clear_errors():
    with pytest.raises(CameraError, match="python3-picamera2"):
        Picamera2Camera(640, 480, 10).open()
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(CameraError, match="webcam"):
            WebcamCamera(0, 640, 480, 10).open()


def test_auto_falls_back_to_the_folder_off_a_pi(tmp_path):
    cfg = SimpleNamespace(source="auto", folder=None, device=0, width=640, height=480, fps=10.0)
    cam = make_camera(cfg, demo_folder=tmp_path)
    assert isinstance(cam, FolderCamera) and cam.folder == tmp_path
    with pytest.raises(CameraError, match="camera.folder"):
        make_camera(SimpleNamespace(**{**cfg.__dict__, "source": "folder"}))
