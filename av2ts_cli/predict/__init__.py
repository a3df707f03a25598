"""``av2ts predict``: videos in; masks, per-frame records, summaries and overlays out.

- ``options.py``: ``PredictOptions``, parsed and checked once before any model loads;
- ``runner.py``: ``run``, a batch of videos (run folder, one lock per video, torchrun's shards, the report);
- ``video.py``: ``predict_video``, one video (bounds, audio, maskiges, the stream into the writers, the summary),
  and ``VideoStream``, its inputs and masks as a stream (also the Python API's ``Model.predict``);
- ``stream.py``: the network's side, ``Predictor`` and ``stream_masks`` (the (frame, mask) stream);
- ``outputs.py``: the stream's consumers (PNG, JSONL, COCO RLE) and "is this video done";
- ``maskiges.py``: the maskiges of a Siam model's video (``--maskiges auto`` or a folder);
- ``masks.py``: a frame's mask at display size, its PNG, COCO RLE and per-frame record.
"""

from av2ts_cli.predict.options import PredictOptions, parse_formats
from av2ts_cli.predict.runner import RunReport, print_report, run
from av2ts_cli.predict.video import VideoResult, predict_video

__all__ = ["PredictOptions", "RunReport", "VideoResult", "parse_formats", "predict_video", "print_report", "run"]
