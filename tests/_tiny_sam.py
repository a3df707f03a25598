"""Tiny randomly initialised SAM and SAM-HQ models built from transformers' own config classes (64 px input,
2 ViT blocks of width 32: ~80 k parameters, saved in ~0.3 MB), a tiny SAM 2 (Hiera of 5 blocks, 128 px input),
and the Hugging Face cache layout to serve one as hf://owner/repo offline. Used by the maskiges tests; the real
transformers model code runs on them."""

from __future__ import annotations

from pathlib import Path

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIDE = 64  # model input side (the processor resizes the longest edge to it)
SIDE2 = 128  # the tiny SAM 2's input side (its processor squashes the frame to the square)


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


def save_tiny_sam2(folder: Path, seed: int = 0) -> Path:
    """A tiny Sam2Model (Hiera of 5 blocks, 128 px square input, decoder width 32) and its Sam2ImageProcessor,
    written by save_pretrained into ``folder``."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    hiera = T.Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, image_size=[SIDE2, SIDE2], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],  # not a stage's first block
        window_positional_embedding_background_size=[4, 4])
    vision = T.Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                                backbone_feature_sizes=[[SIDE2 // 4] * 2, [SIDE2 // 8] * 2, [SIDE2 // 16] * 2],
                                fpn_hidden_size=32)
    return _save_square_model(folder, "Sam2", vision)


def save_tiny_edgetam(folder: Path, seed: int = 0, channels: tuple[int, ...] = (512, 256, 128, 64)) -> Path:
    """A tiny EdgeTamModel (timm's resnet10t, random, as its image encoder: EdgeTAM's RepViT is a timm model too;
    128 px square input, decoder width 32) and a Sam2ImageProcessor, written by save_pretrained into ``folder``.
    ``channels``: the neck's idea of the encoder's channels (another than resnet10t's makes a model that loads but
    cannot run)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    backbone = T.TimmWrapperConfig(architecture="resnet10t",
                                   model_args={"features_only": True, "out_indices": [1, 2, 3, 4]})
    vision = T.EdgeTamVisionConfig(backbone_config=backbone, backbone_channel_list=list(channels),
                                   backbone_feature_sizes=[[SIDE2 // 4] * 2, [SIDE2 // 8] * 2, [SIDE2 // 16] * 2],
                                   fpn_hidden_size=32)
    return _save_square_model(folder, "EdgeTam", vision)


def _save_square_model(folder: Path, prefix: str, vision) -> Path:
    """``{prefix}Model`` (Sam2 or EdgeTam) on ``vision``, with a prompt encoder and decoder of width 32, and a
    Sam2ImageProcessor of the SIDE2 square, written by save_pretrained into ``folder``."""
    import transformers as T

    prompt = getattr(T, f"{prefix}PromptEncoderConfig")(hidden_size=32, image_size=SIDE2, patch_size=16,
                                                        mask_input_channels=4)
    decoder = getattr(T, f"{prefix}MaskDecoderConfig")(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                      iou_head_hidden_dim=32)
    config = getattr(T, f"{prefix}Config")(vision_config=vision, prompt_encoder_config=prompt,
                                           mask_decoder_config=decoder)
    model = getattr(T, f"{prefix}Model")(config).eval()
    processor = T.Sam2ImageProcessor(size={"height": SIDE2, "width": SIDE2},
                                     mask_size={"height": SIDE2 // 4, "width": SIDE2 // 4})
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
