"""``av2ts bench predict``: ``av2ts predict`` end to end on CPU, on clips it makes itself.

Speed: a 60 s 1280x720 25 fps clip with sound (``media.synthesize_clip``), the ``av2ts-r50`` preset with random
weights and its Siam encoder (maskiges generated beside the clip, one per sampled frame), default settings (1 mask
per second, T = 5, batch 1, fp32). Reported: windows per second, milliseconds per window, and the share of the
prediction time spent outside the network (probe, audio, frame decoding the model had to wait for, mask writing).
The time per window is also given as a ratio to a ResNet-50 trunk on 5 frames at 224 px, timed in the same
subprocess before and after (``bench.model.baseline_resnet50``), so figures from a busy machine still compare.
Frames are decoded by a background thread while the network runs, so only the waits count. Target: at most 15 %.

Memory: the ``av2ts-tiny`` preset (a 10-minute clip with r50 would take most of an hour here; the streaming code
is the same for every model) on 640x360 clips of 30 s and 10 minutes. Peak RSS of the Python process
(``memory.peak_rss_mib``; the ffmpeg decoder's own memory does not depend on the length). Target: the 10-minute peak at
most 1.2x the 30 s peak.

Every measurement runs in a fresh Python subprocess, so peaks and warm caches do not leak between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from av2ts_cli import media, predict, sampling
from av2ts_cli.bench.model import baseline_resnet50
from av2ts_cli.config import get_preset
from av2ts_cli.console import console, make_progress
from av2ts_cli.data.images import write_png
from av2ts_cli.memory import peak_rss_mib
from av2ts_cli.model import build_model
from av2ts_cli.predictor import make_predictor
from av2ts_cli.runs import SUMMARY_FILE

SHARE_TARGET = 0.15
RSS_TARGET = 1.2
SPEED_CASE = {"preset": "av2ts-r50", "seconds": 60, "size": (1280, 720), "fps": 25}
MEMORY_CASES = ({"preset": "av2ts-tiny", "seconds": 30, "size": (640, 360), "fps": 25},
                {"preset": "av2ts-tiny", "seconds": 600, "size": (640, 360), "fps": 25})
QUICK_SPEED = {"preset": "av2ts-tiny", "seconds": 6, "size": (320, 180), "fps": 25}
QUICK_MEMORY = ({"preset": "av2ts-tiny", "seconds": 5, "size": (160, 90), "fps": 25},
                {"preset": "av2ts-tiny", "seconds": 20, "size": (160, 90), "fps": 25})


def run(quick: bool = False, threads: int | None = None, progress: bool = True) -> dict:
    """Make the clips, run the measuring subprocesses; returns the report (see the module docstring)."""
    speed_case, memory_cases = (QUICK_SPEED, QUICK_MEMORY) if quick else (SPEED_CASE, MEMORY_CASES)
    report = {"cpus": os.cpu_count(), "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
              "ffmpeg_version": media.tool_version(media.find_ffmpeg()), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="av2ts-bench-predict-") as folder, \
            make_progress(transient=True) as bar:
        task = bar.add_task("bench predict", total=2 + 2 * len(memory_cases), visible=progress)
        clips = {}
        for case in (speed_case, *memory_cases):
            key = _clip_key(case)
            if key not in clips:
                bar.update(task, description=f"making a {case['seconds']} s {case['size'][0]}x{case['size'][1]} clip")
                clips[key] = media.synthesize_clip(Path(folder) / f"{key}.mp4", case["seconds"], case["size"],
                                                   case["fps"])
            bar.advance(task)
        bar.update(task, description=f"predict: {speed_case['preset']} on the {speed_case['seconds']} s clip")
        speed = _in_subprocess({**speed_case, "clip": str(clips[_clip_key(speed_case)]), "work": folder,
                                "threads": threads, "baseline": True})
        speed["share_target"] = SHARE_TARGET
        speed["share_ok"] = speed["outside_model_share"] <= SHARE_TARGET
        report["speed"] = speed
        bar.advance(task)
        runs = []
        for case in memory_cases:
            bar.update(task, description=f"peak memory: {case['preset']} on the {case['seconds']} s clip")
            runs.append(_in_subprocess({**case, "clip": str(clips[_clip_key(case)]), "work": folder,
                                        "threads": threads}))
            bar.advance(task)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    report["memory"] = {"runs": runs, "rss_ratio": round(ratio, 3), "rss_target": RSS_TARGET,
                        "rss_ok": ratio <= RSS_TARGET}
    return report


def _clip_key(case: dict) -> str:
    width, height = case["size"]
    return f"clip-{case['seconds']}s-{width}x{height}-{case['fps']}fps"


def _in_subprocess(case: dict) -> dict:
    worker = subprocess.run([sys.executable, "-m", "av2ts_cli.bench.predict", json.dumps(case)],
                            capture_output=True, text=True)
    if worker.returncode != 0:
        raise RuntimeError(f"bench worker failed: {worker.stderr.strip()[-800:]}")
    return json.loads(worker.stdout.strip().splitlines()[-1])


def _worker(case: dict) -> dict:
    """In a fresh interpreter: build the preset (random weights), predict the clip, report from its summary."""
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    cfg = get_preset(case["preset"])
    model = build_model(cfg)
    predictor = make_predictor(model, cfg, ["background", "sounding object"], case["preset"], device="cpu")
    clip = Path(case["clip"])
    work = Path(tempfile.mkdtemp(dir=case["work"]))
    maskiges = None
    if cfg.siam:  # one maskige per sampled frame (coloured blocks, the look of Semantic-SAM masks)
        maskiges = work / "maskiges"
        folder = maskiges / clip.stem
        rng = np.random.default_rng(0)
        for index in range(sampling.sampled_seconds(case["seconds"])):
            blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            write_png(folder / f"{index:06d}.png", np.kron(blocks, np.ones((56, 56, 1), np.uint8)))
    options = predict.PredictOptions(out=work / "run", maskiges=maskiges, progress=False)
    baselines = [baseline_resnet50(repeats=3)] if case.get("baseline") else []
    started = time.perf_counter()
    result = predict.run([clip], options, predictor=predictor).videos[0]
    elapsed = time.perf_counter() - started
    baselines += [baseline_resnet50(repeats=3)] if case.get("baseline") else []
    summary = json.loads((Path(result.folder) / SUMMARY_FILE).read_text())
    timings = summary["timings"]
    predict_s = timings["predict_s"]
    model_s = timings["model_s"]
    report = {
        "preset": case["preset"], "siam": cfg.siam, "input_size": cfg.input_size,
        "clip": f"{case['seconds']} s {case['size'][0]}x{case['size'][1]} {case['fps']} fps",
        "seconds": case["seconds"], "windows": summary["windows"], "frames": summary["sampling"]["frames"],
        "predict_s": predict_s, "run_s": round(elapsed, 3),
        "windows_per_s": round(summary["windows"] / predict_s, 3),
        "ms_per_window": timings["ms_per_window"],
        "model_s": model_s, "waiting_s": timings.get("waiting_s", 0.0), "writing_s": timings.get("writing_s", 0.0),
        "audio_s": timings.get("audio_s", 0.0), "decode_s": timings.get("decode_s", 0.0),
        "outside_model_s": round(predict_s - model_s, 3),
        "outside_model_share": round((predict_s - model_s) / predict_s, 4),
        # the Python process alone: a child's ru_maxrss also counts the parent's pages it maps between fork and exec
        "peak_rss_mb": round(peak_rss_mib(), 1),
    }
    if baselines:  # a ResNet-50 trunk on 5 frames at 224 px, before and after: the machine's speed in this run
        baseline_ms = 1000 * sum(baselines) / len(baselines)
        report["baseline_resnet50_ms"] = round(baseline_ms, 1)
        report["window_vs_baseline"] = round(timings["ms_per_window"] / baseline_ms, 2)
    return report


def print_report(report: dict) -> None:
    speed = report["speed"]
    verdict = "[green]ok[/green]" if speed["share_ok"] else "[red]over target[/red]"
    console.print(f"predict on CPU ({report['threads']} threads): {speed['preset']} (Siam {speed['siam']}, "
                  f"{speed['input_size']} px) on a {speed['clip']} clip: {speed['windows']} windows in "
                  f"{speed['predict_s']:.1f} s = {speed['windows_per_s']:.3f} windows/s, "
                  f"{speed['ms_per_window']:.0f} ms per window = {speed['window_vs_baseline']:.1f}x a ResNet-50 trunk "
                  f"on the same 5 frames ({speed['baseline_resnet50_ms']:.0f} ms, measured before and after)")
    console.print(f"outside the network: {speed['outside_model_s']:.2f} s = {100 * speed['outside_model_share']:.1f} % "
                  f"(target <= {100 * speed['share_target']:.0f} %) {verdict}; work done beside it: decode "
                  f"{speed['decode_s']:.2f} s, audio {speed['audio_s']:.2f} s, writing {speed['writing_s']:.2f} s, "
                  f"waiting for frames {speed['waiting_s']:.2f} s")
    table = Table(title="peak memory against video length", title_justify="left")
    for column in ("preset", "clip", "windows", "ms/window", "peak RSS"):
        table.add_column(column, justify="right")
    for run in report["memory"]["runs"]:
        table.add_row(run["preset"], run["clip"], str(run["windows"]), f"{run['ms_per_window']:.0f}",
                      f"{run['peak_rss_mb']:.0f} MB")
    console.print(table)
    memory = report["memory"]
    verdict = "[green]ok[/green]" if memory["rss_ok"] else "[red]over target[/red]"
    console.print(f"peak RSS ratio longest/shortest: {memory['rss_ratio']:.2f} (target <= {memory['rss_target']}) "
                  f"{verdict}")


if __name__ == "__main__":  # the measuring subprocess: python -m av2ts_cli.bench.predict '{"preset": ...}'
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
