"""Maskiges made by av2ts: class-agnostic masks -> the Siam encoder's palette pictures (COMBO's recipe).

- ``render``: masks (N, H, W) -> the area-ranked id map -> an ADE20K-palette PNG, fitted as each subset expects;
- ``sources``: COMBO's step-1 output (``<frame stem>_mask.npy`` files) read and checked;
- ``generate``: automatic masks from a SAM-family model of ``transformers`` (a dependency of av2ts);
- ``dataset``: ``pre_SAM_mask/`` of an AVSBench-layout dataset, resumable, sharded under torchrun;
- ``video``: the maskiges of the frames ``predict`` samples from a video.
"""
