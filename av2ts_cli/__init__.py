"""av2ts: audio-visual segmentation of videos with the AV2TS model."""

__version__ = "0.1.0"
