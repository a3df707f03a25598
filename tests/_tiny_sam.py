"""Tiny randomly initialised SAM and SAM-HQ models built from transformers' own config classes (64 px input,
2 ViT blocks of width 32: ~80 k parameters, saved in ~0.3 MB), and the Hugging Face cache layout to serve one as
hf://owner/repo offline. Used by the maskiges tests; the real transformers model code runs on them."""

from __future__ import annotations

from pathlib import Path

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIDE = 64  # model input side (the processor resizes the longest edge to it)


def save_tiny_sam(folder: Path, hq: bool = False, seed: int = 0) -> Path:
    """A tiny SamModel (or SamHQModel) and its SamImageProcessor, written by save_pretrained into ``folder``."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    prefix = "SamHQ" if hq else "Sam"
    vision = getattr(T, f"{prefix}VisionConfig")(
        hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE, patch_size=8,
        window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = getattr(T, f"{prefix}PromptEncoderConfig")(hidden_size=32, image_size=SIDE, patch_size=8,
                                                        mask_input_channels=4)
    decoder_options = dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                           iou_head_hidden_dim=32)
    if hq:
        decoder_options["vit_dim"] = 32
    decoder = getattr(T, f"{prefix}MaskDecoderConfig")(**decoder_options)
    config = getattr(T, f"{prefix}Config")(vision_config=vision, prompt_encoder_config=prompt,
                                           mask_decoder_config=decoder)
    model = getattr(T, f"{prefix}Model")(config).eval()
    processor = T.SamImageProcessor(size={"longest_edge": SIDE}, pad_size={"height": SIDE, "width": SIDE},
                                    mask_size={"longest_edge": SIDE // 4},
                                    mask_pad_size={"height": SIDE // 4, "width": SIDE // 4})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hub_cache_with(model_folder: Path, cache: Path, repo_id: str, commit: str = FAKE_COMMIT) -> Path:
    """Lay ``model_folder``'s files out as huggingface_hub's cache holds a download of ``repo_id`` at ``commit``
    (refs/main -> commit, snapshots/<commit>/<files>); returns the snapshot folder."""
    import shutil

    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in model_folder.iterdir():
        shutil.copy2(path, snapshot / path.name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot
