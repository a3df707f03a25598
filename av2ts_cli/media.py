"""The only module that runs ffmpeg: probe, decode frames and audio, encode and remux.

Placeholder for issue #2: only the binary resolution exists so far.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from av2ts_cli.errors import MediaError


@functools.cache
def find_ffmpeg() -> str:
    """The ffmpeg binary: ``AV2TS_FFMPEG``, then PATH, then imageio-ffmpeg's bundled binary."""
    env = os.environ.get("AV2TS_FFMPEG")
    if env:
        if not os.path.isfile(env):
            raise MediaError(env, "AV2TS_FFMPEG names no file")
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # imageio-ffmpeg raises RuntimeError when it has no binary for this platform
        raise MediaError("ffmpeg", f"not found on PATH and no bundled binary ({err})") from None


@functools.cache
def find_ffprobe() -> str | None:
    """The ffprobe binary from PATH (imageio-ffmpeg bundles none); None means: parse ``ffmpeg -i`` instead."""
    return shutil.which("ffprobe")


def tool_version(binary: str) -> str:
    """The first line of ``binary -version``, e.g. 'ffmpeg version 5.1.6-0+deb12u1'."""
    out = subprocess.run([binary, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"
