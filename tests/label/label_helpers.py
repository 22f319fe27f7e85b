"""Small builders shared by the labelling tests: images, projects of each kind, a live server."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# Debian's chromium (never a browser downloaded by Playwright), headless, no background traffic
CHROMIUM = os.environ.get("MMALIGN_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]
SHOTS = os.environ.get("MMALIGN_LABEL_SCREENSHOTS", "")  # folder for screenshots of each view (docs/guide/img)

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def png_b64(color: tuple[int, int, int], size: int = 48, shape: str = "square") -> dict[str, str]:
    """A coloured square or circle on white, as an upload."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"png_base64": base64.b64encode(buf.getvalue()).decode()}


def clip_frames(seed: int, t: int = 12, size: int = 48) -> list:
    """A dot that moves towards (even seed) or away from (odd seed) a green target."""
    frames = np.full((t, size, size, 3), 235, dtype=np.uint8)
    frames[:, size // 2 - 3: size // 2 + 3, size - 9: size - 3] = (40, 170, 60)
    for k in range(t):
        x = 4 + (k if seed % 2 == 0 else t - 1 - k) * (size - 16) // t
        frames[k, size // 2 - 3: size // 2 + 3, x: x + 6] = (200, 40, 40)
    return frames.tolist()


def query_items(kind: str, n: int = 1, payload_text: str = "") -> list[dict[str, Any]]:
    items = []
    for i in range(n):
        if kind == "text":
            content = {"prompt": f"Describe the picture {i}. {payload_text}", "images": [png_b64((200, 30, 30), 96)],
                       "chosen": f"A red square on a plain background {payload_text}",
                       "rejected": f"A blue circle on a plain background {payload_text}"}
        elif kind == "image":
            content = {"caption": f"a red square {i} {payload_text}", "chosen_image": png_b64((220, 20, 20)),
                       "rejected_image": png_b64((20, 20, 220), shape="circle")}
        else:
            content = {"frames_first": clip_frames(2 * i), "frames_second": clip_frames(2 * i + 1)}
        items.append({"external_id": f"{kind}-{i}", "content": content})
    return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The app on uvicorn in a thread of this process (for the browser tests)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_app(folder: Path, db_url: str, **settings: Any) -> tuple[Any, Any, str, str]:
    """``(app, store, admin_token, labeller_token)`` over a fresh database."""
    from mmalign.label.app import AppSettings, create_app, ensure_admin
    from mmalign.label.store import Store

    store = Store(db_url)
    admin = "admin-token-" + "x" * 20
    ensure_admin(store, admin, folder)
    labeller = store.add_labeller("alice")
    return create_app(store, AppSettings(folder=folder, **settings)), store, admin, labeller


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def iter_kinds() -> Iterator[str]:
    yield from ("clip", "image", "text")
