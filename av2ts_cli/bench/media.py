"""``av2ts bench media``: decode throughput and peak memory of the media layer, on clips it makes itself.

Clips: ffmpeg's moving testsrc2 pattern, 1920x1080 at 25 fps, x264 ultrafast (about 13 Mb/s, a phone video's
bitrate) with a 48 kHz sine, 10 s and 120 s long, written to a temp folder before anything is timed.

For each clip:
- baseline: ffmpeg decodes the whole video stream to null (the decoder alone: no resize, no pipe, no Python);
- sampled: in a fresh Python subprocess (so the peaks of the two clips compare), ``media.iter_frames_at`` takes
  AVSBench's 1-per-second sampling (frame k at k - 1 + 15/16 s) resized to 224x224, as predict does. The subprocess
  reports its own peak RSS and the largest peak RSS of its ffmpeg children; their sum bounds the pair's peak.
Speeds are sampled frames per second, seconds of video per second ("x real time"), and the ratio of the sampled
decode's time to the baseline's, measured in the same run. Encode: ``media.encode_video`` of 1080p frames
(RGB from Python through a pipe), against ffmpeg encoding as many frames of its own test pattern with the same
x264 settings.
Target: the peak RSS for 120 s is within 1.3x of the peak for 10 s (memory does not grow with the video).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from av2ts_cli import media
from av2ts_cli.avsbench import FRAME_OFFSET, frame_time
from av2ts_cli.memory import peak_rss_mib

RSS_TARGET = 1.3
SAMPLE_SIZE = (224, 224)


def run(durations: tuple[float, ...] = (10, 120), size: tuple[int, int] = (1920, 1080), fps: float = 25,
        encode_frames: int = 100, progress: bool = True) -> dict:
    """Make the clips, time and measure them; returns the report (see the module docstring)."""
    from av2ts_cli.console import make_progress  # local: keeps rich out of the measuring worker's peak RSS

    report = {"ffmpeg": media.find_ffmpeg(), "ffmpeg_version": media.tool_version(media.find_ffmpeg()),
              "size": f"{size[0]}x{size[1]}", "fps": fps, "sample_size": f"{SAMPLE_SIZE[0]}x{SAMPLE_SIZE[1]}",
              "clips": [], "rss_target": RSS_TARGET}
    with tempfile.TemporaryDirectory(prefix="av2ts-bench-media-") as folder, \
            make_progress(transient=True) as bar:
        task = bar.add_task("bench media", total=2 * len(durations) + 1, visible=progress)
        clips = []
        for seconds in durations:
            bar.update(task, description=f"making a {seconds:g} s clip")
            clips.append((seconds, media.synthesize_clip(Path(folder) / f"clip-{seconds:g}s.mp4", seconds, size, fps)))
            bar.advance(task)
        for seconds, path in clips:
            bar.update(task, description=f"decoding the {seconds:g} s clip")
            report["clips"].append(_measure_clip(path, seconds))
            bar.advance(task)
        bar.update(task, description="encoding")
        report["encode"] = _measure_encode(Path(folder) / "encoded.mp4", size, fps, encode_frames)
        bar.advance(task)
    peaks = [clip["peak_rss_mb"] for clip in report["clips"]]
    report["rss_ratio"] = round(peaks[-1] / peaks[0], 3)
    report["rss_ok"] = report["rss_ratio"] <= RSS_TARGET
    return report


def _measure_clip(path: Path, seconds: float) -> dict:
    start = time.perf_counter()
    media.decode_discard(path)
    baseline = time.perf_counter() - start
    worker = subprocess.run([sys.executable, "-m", "av2ts_cli.bench.media", str(path), *map(str, SAMPLE_SIZE)],
                            capture_output=True, text=True)
    if worker.returncode != 0:
        raise RuntimeError(f"bench worker failed: {worker.stderr.strip()[-500:]}")
    sampled = json.loads(worker.stdout.strip().splitlines()[-1])
    decode = sampled["decode_s"]
    return {
        "seconds": seconds, "bytes": path.stat().st_size,
        "baseline_decode_s": round(baseline, 3),
        "sampled_frames": sampled["frames"], "sampled_decode_s": round(decode, 3),
        "sampled_frames_per_s": round(sampled["frames"] / decode, 2),
        "x_realtime": round(seconds / decode, 2),
        "ratio_to_baseline": round(decode / baseline, 3),
        "probe_s": round(sampled["probe_s"], 3),
        "peak_rss_python_mb": round(sampled["python_peak_mb"], 1),
        "peak_rss_ffmpeg_mb": round(sampled["ffmpeg_peak_mb"], 1),
        "peak_rss_mb": round(sampled["python_peak_mb"] + sampled["ffmpeg_peak_mb"], 1),
    }


def _measure_encode(out: Path, size: tuple[int, int], fps: float, count: int) -> dict:
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    palette = [np.broadcast_to((ramp + 32 * k) % 256, (height, width, 3)).astype(np.uint8) for k in range(8)]
    start = time.perf_counter()
    media.synthesize_clip(out.with_name("baseline.mp4"), count / fps, size, fps, audio=False, preset=media.X264_PRESET)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    media.encode_video((palette[k % len(palette)] for k in range(count)), out, fps)
    elapsed = time.perf_counter() - start
    return {"frames": count, "size": f"{width}x{height}", "seconds": round(elapsed, 3),
            "frames_per_s": round(count / elapsed, 2), "x_realtime": round(count / fps / elapsed, 2),
            "baseline_s": round(baseline, 3), "ratio_to_baseline": round(elapsed / baseline, 3),
            "preset": media.X264_PRESET, "crf": media.X264_CRF}


def _worker(path: str, width: int, height: int) -> dict:
    """Runs in a fresh interpreter: probe, then stream the 1-per-second samples; peaks from getrusage."""
    start = time.perf_counter()
    info = media.probe(path)
    probed = time.perf_counter()
    times = [frame_time(k) for k in range(int(info.duration - FRAME_OFFSET) + 1)]
    frames = sum(1 for _ in media.iter_frames_at(path, times, (width, height)))
    done = time.perf_counter()
    return {"frames": frames, "probe_s": probed - start, "decode_s": done - probed,
            "python_peak_mb": peak_rss_mib(), "ffmpeg_peak_mb": peak_rss_mib(children=True)}


def print_report(report: dict) -> None:
    from rich.table import Table  # local: as make_progress above

    from av2ts_cli.console import console  # local: rich stays out of the measuring worker's peak memory

    table = Table(title=f"media decode: {report['size']} at {report['fps']:g} fps, 1 frame/s to "
                        f"{report['sample_size']}", title_justify="left")
    for column in ("clip", "decode (base)", "sampled", "frames/s", "x real", "vs base", "peak RSS py+ffmpeg"):
        table.add_column(column, justify="right")
    for clip in report["clips"]:
        rss = f"{clip['peak_rss_python_mb']:.0f} + {clip['peak_rss_ffmpeg_mb']:.0f} = {clip['peak_rss_mb']:.0f} MB"
        table.add_row(f"{clip['seconds']:g} s", f"{clip['baseline_decode_s']:.2f} s",
                      f"{clip['sampled_decode_s']:.2f} s", f"{clip['sampled_frames_per_s']:.1f}",
                      f"{clip['x_realtime']:.1f}x", f"{clip['ratio_to_baseline']:.2f}x", rss)
    console.print(table)
    verdict = "[green]ok[/green]" if report["rss_ok"] else "[red]over target[/red]"
    console.print(f"peak RSS ratio longest/shortest: {report['rss_ratio']:.2f} (target <= {report['rss_target']}) "
                  f"{verdict}")
    encode = report["encode"]
    console.print(f"encode ({encode['size']}, x264 {encode['preset']} crf {encode['crf']}): "
                  f"{encode['frames_per_s']:.1f} frames/s, {encode['x_realtime']:.2f}x real time, "
                  f"{encode['ratio_to_baseline']:.2f}x the time of ffmpeg encoding its own pattern")
    console.print(f"ffmpeg: {report['ffmpeg_version']} ({report['ffmpeg']})")


if __name__ == "__main__":  # the measuring subprocess: python -m av2ts_cli.bench.media PATH WIDTH HEIGHT
    print(json.dumps(_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
