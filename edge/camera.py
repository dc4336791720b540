"""Camera sources behind one small interface: open, read a frame, close.

Hardware libraries are imported inside the source that needs them, so `import edge` works on a
laptop. Every source returns RGB uint8 arrays (H, W, 3); the engine crops and resizes them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from edge.image import ImageError, list_images, load_image, shrink_frame

log = logging.getLogger(__name__)


BACKOFF = (0.5, 10.0)   # seconds: first retry, longest wait between retries


class CameraError(RuntimeError):
    """The camera cannot deliver frames right now (unplugged, busy, missing library)."""


class Camera:
    """A frame source. `read()` blocks until the next frame is due and returns it.

    `read()` may return None for "no frame yet" (a network source between frames); it raises
    CameraError when the device failed, and ImageError for one unusable frame.
    """

    name = "camera"

    def open(self) -> None:
        """Acquire the device; raise CameraError when it is not there."""

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device; safe to call twice."""


class Pacer:
    """Keeps a source at a fixed frame rate without drifting."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps
        self._next = time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next + self.period, time.monotonic() - self.period)


class FolderCamera(Camera):
    """Shows the images in a folder in name order, looping, at `fps`.

    The folder is listed again for every frame, so a demo or a test changes what the camera
    "sees" by changing the folder's contents. A folder of folders is a set of scenes: the camera
    shows one scene at a time and `next_scene()` moves on (the simulator's keys do). `still`
    holds the picture shown last (a photo held up to the camera); `step_picture()` moves it on.
    Images are decoded reduced to near `model_size` (a folder of 4000x3000 phone photos costs
    a few hundred kB per picture, not 36 MB), and the cache of decoded frames is bounded in bytes.
    """

    name = "folder"
    CACHE_BYTES = 32 << 20

    def __init__(self, folder: Path, fps: float = 10.0, model_size: int = 224):
        self.folder = Path(folder)
        self.pacer = Pacer(fps)
        self.model_size = model_size
        self.scene = 0
        self.still = False              # True: show the same picture until stepped or resumed
        self.shown: Optional[Path] = None   # the picture read last
        self.shown_at = (0, 0)          # its place in its folder: (number from 1, pictures there)
        self._index = 0                 # position of the next picture in the current folder
        self._last = 0                  # position of the picture read last
        self._cache: dict = {}
        self._cached_bytes = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise CameraError(f"camera folder not found: {self.folder}")

    def scenes(self) -> list:
        """Subfolders holding images, when the folder itself holds none."""
        try:
            if list_images(self.folder):
                return []
            return sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

    def next_scene(self, step: int = 1) -> str:
        scenes = self.scenes()
        if not scenes:
            return self.folder.name
        self.scene = (self.scene + step) % len(scenes)
        return scenes[self.scene].name

    def set_still(self, still: bool) -> None:
        """Hold the picture shown last (True), or play the folder on from the held one (False)."""
        if still and not self.still:
            self._index = self._last
        elif self.still and not still:
            self._index += 1
        self.still = still

    def step_picture(self, step: int = 1) -> None:
        """Hold the next (or, step -1, previous) picture still; steps add up between frames."""
        self.set_still(True)
        self._index += step

    def current_folder(self) -> Path:
        scenes = self.scenes()
        return scenes[self.scene % len(scenes)] if scenes else self.folder

    def read(self) -> np.ndarray:
        self.pacer.wait()
        folder = self.current_folder()
        try:
            files = list_images(folder)
        except OSError as exc:
            raise CameraError(f"camera folder unreadable: {exc}") from None
        if not files:
            raise CameraError(f"no images in camera folder {folder}")
        position = self._index
        path = files[position % len(files)]
        self._last, self.shown, self.shown_at = position, path, (position % len(files) + 1, len(files))
        if not self.still:
            self._index = position + 1
        try:
            stat = path.stat()
            key = (path, stat.st_mtime_ns, stat.st_size)
            frame = self._cache.get(key)
            if frame is None:
                frame = np.asarray(load_image(path, min_side=self.model_size))
                if self._cached_bytes + frame.nbytes > self.CACHE_BYTES:
                    self._cache.clear()
                    self._cached_bytes = 0
                self._cache[key] = frame
                self._cached_bytes += frame.nbytes
            return frame
        except (OSError, ImageError) as exc:
            raise CameraError(f"camera folder image unreadable: {exc}") from None


class Picamera2Camera(Camera):
    """The Raspberry Pi camera through picamera2 (apt's python3-picamera2).

    The ISP scales to a small frame near the model size (`isp_size`), so no full-resolution frame
    is ever copied into Python. Format "BGR888" is picamera2's name for arrays in R, G, B order.
    """

    name = "picamera2"

    def __init__(self, width: int, height: int, fps: float, model_size: int = 224):
        self.size = isp_size(int(width), int(height), model_size)
        self.fps = fps
        self._cam = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore
        except ImportError:
            raise CameraError("picamera2 is not installed (sudo apt install python3-picamera2, "
                              "and a venv made with --system-site-packages)") from None
        try:
            cam = Picamera2()
            config = cam.create_video_configuration(
                main={"size": self.size, "format": "BGR888"},
                controls={"FrameRate": float(self.fps)}, buffer_count=2)
            cam.align_configuration(config)  # the ISP wants aligned widths
            cam.configure(config)
            cam.start()
        except Exception as exc:  # libcamera raises many types; all mean "no camera now"
            raise CameraError(f"Pi camera unavailable: {exc}") from None
        self._cam = cam

    def read(self) -> np.ndarray:
        if self._cam is None:
            raise CameraError("Pi camera is not open")
        try:
            return self._cam.capture_array("main")
        except Exception as exc:
            raise CameraError(f"Pi camera read failed: {exc}") from None

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
                cam.close()
            except Exception as exc:
                log.debug("closing Pi camera: %s", exc)


class WebcamCamera(Camera):
    """A USB webcam through OpenCV (the `webcam` extra).

    It asks the camera for the smallest frame of the configured aspect ratio that covers the
    model input (as the Pi camera path does); a camera that only offers larger modes still
    sends larger frames, which are then box-averaged down before anything else touches them.
    """

    name = "webcam"

    def __init__(self, device: int, width: int, height: int, fps: float, model_size: int = 224):
        self.device, self.width, self.height, self.fps = device, width, height, fps
        self.model_size = model_size
        self.size = isp_size(int(width), int(height), model_size)
        self._cap = None

    def open(self) -> None:
        try:
            import cv2  # type: ignore
        except ImportError:
            raise CameraError("OpenCV is not installed: pip install 'edge[webcam]'") from None
        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            raise CameraError(f"no webcam at index {self.device}")
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        self._cap = cap

    def read(self) -> np.ndarray:
        import cv2  # type: ignore
        ok, frame = (False, None) if self._cap is None else self._cap.read()
        if not ok or frame is None:
            raise CameraError(f"webcam {self.device} returned no frame")
        return cv2.cvtColor(shrink_frame(frame, self.model_size), cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


def isp_size(width: int, height: int, model_size: int) -> tuple:
    """The smallest frame of the configured aspect ratio whose short side still covers the model
    input (width a multiple of 32, height of 16): the ISP scales for free, Python does not."""
    scale = min(1.0, model_size / min(width, height))
    w = max(32, int(-(-width * scale // 32)) * 32)
    h = max(16, int(-(-height * scale // 16)) * 16)
    return w, h


def webcam_present(device: int = 0) -> bool:
    """True when OpenCV is installed and a video device node exists for the index."""
    try:
        import cv2  # type: ignore  # noqa: F401
    except ImportError:
        return False
    return Path(f"/dev/video{device}").exists()


class Retrying:
    """A camera that heals: opened on demand; after a failure it is closed and tried again after
    an exponential backoff, so a loose cable costs a blink code, not a restart.

    `read()` returns a frame or None (nothing new, or waiting to retry); ImageError (one unusable
    frame) passes through. `fault` is the current problem in words, or None; `news()` hands out
    the failures worth telling (the first, then every 20th) so a flapping camera does not flood
    the log.
    """

    def __init__(self, camera: Camera, backoff=BACKOFF):
        self.camera = camera
        self.backoff = backoff
        self.fault: Optional[str] = None
        self.failures = 0
        self._open = False
        self._retry_at = 0.0
        self._news: list = []

    @property
    def name(self) -> str:
        return self.camera.name

    def read(self) -> Optional[np.ndarray]:
        if not self._open:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self.camera.open()
                self._open = True
            except CameraError as exc:
                self.failed(str(exc))
                return None
        try:
            frame = self.camera.read()
        except CameraError as exc:
            self.failed(str(exc))
            return None
        if frame is not None and self.failures:
            log.info("camera is back after %d failed attempts", self.failures)
            self.failures, self.fault = 0, None
        return frame

    def failed(self, message: str) -> None:
        """The camera (or a frame it sent) failed: close it and retry after the backoff."""
        self.failures += 1
        delay = min(self.backoff[0] * 2 ** (self.failures - 1), self.backoff[1])
        if self.failures == 1 or self.failures % 20 == 0:
            self._news.append(f"{message} (retrying in {delay:.1f}s)")
        try:
            self.camera.close()
        except Exception as exc:  # a broken device must not stop the retrying
            log.debug("closing %s: %s", self.camera.name, exc)
        self._open = False
        self._retry_at = time.monotonic() + delay
        self.fault = message

    def retry_in(self) -> float:
        """Seconds until the next attempt (0 while the camera is open)."""
        return 0.0 if self._open else max(0.0, self._retry_at - time.monotonic())

    def news(self) -> list:
        out, self._news = self._news, []
        return out

    def close(self) -> None:
        self._open = False
        self.camera.close()


def picamera_present() -> bool:
    try:
        import picamera2  # type: ignore  # noqa: F401
    except ImportError:
        return False
    return True


def make_camera(cfg, demo_folder: Optional[Path] = None, model_size: int = 224) -> Camera:
    """The source the config asks for; `auto` picks Pi camera, else webcam, else the folder."""
    source = cfg.source
    if source == "auto":
        if picamera_present():
            source = "picamera2"
        elif webcam_present(cfg.device):
            source = "webcam"
        else:
            source = "folder"
    if source == "picamera2":
        return Picamera2Camera(cfg.width, cfg.height, cfg.fps, model_size)
    if source == "webcam":
        return WebcamCamera(cfg.device, cfg.width, cfg.height, cfg.fps, model_size)
    if source == "folder":
        folder = cfg.folder or demo_folder
        if folder is None:
            raise CameraError("camera.source is folder but camera.folder is not set")
        return FolderCamera(folder, cfg.fps, model_size)
    raise CameraError(f"camera source {source!r} is not available here")
