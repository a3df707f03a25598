"""av2ts_cli/maskiges/render.py on hand-built masks: the area order and its ties, overlaps (the smaller mask wins),
the palette colours, the 224 nearest resize, zero masks, the 255 cap, and the AVSS fit for train and val."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from av2ts_cli.maskiges.render import (
    ADE20K_PALETTE,
    MAX_ID,
    fit_avss,
    id_map,
    maskige_rgb,
    palette_image,
    write_maskige,
)

GREY, FIRST, SECOND = (120, 120, 120), (180, 120, 120), (6, 230, 230)  # ADE20K colours 0, 1, 2


def _combo_id_map(masks: np.ndarray) -> np.ndarray:
    """The reference's recipe as its spec states it, written forward: smallest first, each mask fills only the
    pixels that are still 0 with rank + 1 (kept independent of render.py's largest-first painting)."""
    masks = masks.astype(np.int64)
    order = np.argsort(masks.sum(axis=(1, 2)), kind="stable")
    m = np.zeros(masks.shape[1:], np.int64)
    for rank, k in enumerate(order):
        m = np.where(m == 0, masks[k] * (rank + 1), m)
    return m


def _rect(h, w, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_ids_follow_ascending_area_and_ties_keep_file_order():
    a = _rect(6, 6, 0, 0, 2, 2)  # 4 px
    b = _rect(6, 6, 3, 0, 4, 2)  # 2 px
    c = _rect(6, 6, 0, 3, 2, 5)  # 4 px, a tie with a, later in the file
    ids = id_map(np.stack([a, b, c]))
    assert ids[b].tolist() == [1, 1]
    assert set(ids[a].tolist()) == {2} and set(ids[c].tolist()) == {3}
    assert (ids[~(a | b | c)] == 0).all()
    swapped = id_map(np.stack([c, b, a]))  # the tie resolves the other way when the file order does
    assert set(swapped[c].tolist()) == {2} and set(swapped[a].tolist()) == {3}


def test_the_smaller_mask_wins_where_masks_overlap():
    big = _rect(8, 8, 0, 0, 8, 6)
    small = _rect(8, 8, 2, 2, 4, 4)
    middle = _rect(8, 8, 1, 1, 6, 5)
    ids = id_map(np.stack([big, small, middle]).astype(np.uint8))  # 0/1 uint8 as COMBO's files hold
    assert (ids[small] == 1).all()
    assert (ids[middle & ~small] == 2).all()
    assert (ids[big & ~middle] == 3).all()
    assert (ids[:, 6:] == 0).all()


def test_matches_the_reference_recipe_on_random_overlapping_masks():
    rng = np.random.default_rng(3)
    for n in (1, 5, 40):
        masks = rng.random((n, 37, 23)) < rng.uniform(0.05, 0.6, size=(n, 1, 1))
        assert id_map(masks).tolist() == _combo_id_map(masks).tolist()


def test_palette_colours_in_the_written_png(tmp_path):
    masks = np.stack([_rect(224, 224, 0, 0, 10, 10), _rect(224, 224, 100, 100, 200, 200)])
    path = write_maskige(tmp_path / "f_mask_color.png", masks)
    image = Image.open(path)
    assert image.mode == "P" and image.size == (224, 224)
    rgb = np.asarray(image.convert("RGB"))
    assert tuple(rgb[0, 0]) == FIRST and tuple(rgb[150, 150]) == SECOND and tuple(rgb[50, 220]) == GREY
    assert ADE20K_PALETTE.shape == (150, 3) and tuple(ADE20K_PALETTE[3]) == (80, 50, 50)
    assert tuple(ADE20K_PALETTE[149]) == (92, 0, 255)
    assert not list(tmp_path.glob(".*partial*"))


def test_resize_to_224_is_nearest_neighbour():
    # a 448 x 448 checkerboard of 2 x 2 blocks: nearest keeps one pixel per block, so the result is the 224 x 224
    # checkerboard of single pixels, with no blended colour
    small = (np.indices((224, 224)).sum(axis=0) % 2).astype(bool)
    board = np.kron(small, np.ones((2, 2), bool))
    rgb = maskige_rgb(np.stack([board]))
    assert rgb.shape == (224, 224, 3)
    assert (rgb[small] == FIRST).all() and (rgb[~small] == GREY).all()
    odd = maskige_rgb(np.stack([_rect(61, 97, 5, 7, 40, 50)]))  # any frame size ends at 224 x 224
    colours = {tuple(c) for c in odd.reshape(-1, 3)}
    assert odd.shape == (224, 224, 3) and colours == {GREY, FIRST}


def test_zero_masks_give_an_all_background_maskige():
    for masks in (np.zeros((0, 30, 40), bool), np.zeros((1, 30, 40), np.float64)):  # COMBO's "nothing found"
        rgb = maskige_rgb(masks)
        assert rgb.shape == (224, 224, 3) and (rgb == GREY).all()


def test_more_masks_than_ids_are_capped_at_255_never_wrapped():
    # 300 disjoint masks of areas 1..300 in a 1-pixel-high strip: rank k has area k + 1
    sizes = np.arange(1, 301)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    masks = np.zeros((300, 1, int(edges[-1])), bool)
    for k in range(300):
        masks[k, 0, edges[k]:edges[k + 1]] = True
    ids = id_map(masks[::-1])  # file order reversed: the ranks come from the areas
    for k in range(300):
        assert set(ids[masks[k]].tolist()) == {min(k + 1, MAX_ID)}, k
    assert (ids > 0).all()  # COMBO's uint8 cast would have turned rank 255 into background
    rgb = np.asarray(palette_image(ids, size=None).convert("RGB"))[0]
    assert tuple(rgb[edges[148]]) == tuple(ADE20K_PALETTE[149])  # id 149, the last palette colour
    assert (rgb[edges[149]:] == 0).all()  # ids 150..255: no palette entry, black, as in COMBO's files


def test_bad_masks_are_value_errors():
    with pytest.raises(ValueError, match="shape"):
        id_map(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="value 255"):
        id_map(np.full((1, 4, 4), 255, np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        id_map(np.zeros((1, 2, 2), dtype=object))


def test_avss_fit_train_crops_the_centre_and_val_squashes():
    # a 448 x 224 (w x h) frame in three stripes: widths 112, 224, 112
    left, middle = _rect(224, 448, 0, 0, 224, 112), _rect(224, 448, 0, 112, 224, 336)
    masks = np.stack([left, middle])  # left (smaller) id 1, middle id 2, right background
    train = maskige_rgb(masks, "avss", train=True)
    val = maskige_rgb(masks, "avss", train=False)
    assert train.shape == val.shape == (224, 224, 3)
    assert (train == SECOND).all()  # short side already 224: the centre 224 columns are the middle stripe
    assert (val[:, :56] == FIRST).all() and (val[:, 56:168] == SECOND).all() and (val[:, 168:] == GREY).all()
    tall = fit_avss(palette_image(id_map(masks.transpose(0, 2, 1)), size=None), train=True)  # 224 x 448
    assert tall.mode == "RGB" and tall.size == (224, 224)
    assert (np.asarray(tall) == SECOND).all()
    big = fit_avss(palette_image(id_map(np.stack([_rect(720, 1280, 0, 0, 720, 40)])), size=None), train=True)
    # 1280 x 720 -> 398 x 224 (int truncation), crop from round(87.0) = 87: the 40 px left band falls outside
    assert big.size == (224, 224) and (np.asarray(big) == GREY).all()


@pytest.mark.parametrize(("family", "subset", "name", "input_side", "size"), [
    ("combo", "s4", "square-224", 224, 224), ("combo", "ms3", "square-224", 224, 224),
    ("av2ts", "s4", "square-224", 224, 224), ("av2ts", "ms3", "square-224", 224, 224),
    ("combo", "avss", "source-224", None, 224), ("av2ts", "avss", "source-224", None, 224),
    ("vct", "s4", "source-384", None, 384), ("vct", "avss", "source-384", None, 384)])
def test_the_geometry_follows_the_maskiges_the_model_trained_on(family, subset, name, input_side, size):
    from av2ts_cli.maskiges.render import geometry_for

    geometry = geometry_for(family, subset)
    assert (geometry.name, geometry.input_side, geometry.size) == (name, input_side, size)
    described = geometry.describe()
    assert described["name"] == name and str(size) in described["maskige"]
    assert ("squashed to 224x224" in described["generator_input"]) is (input_side == 224)


def test_a_vct_maskige_is_the_source_size_id_map_resized_to_384_nearest():
    from av2ts_cli.maskiges.render import id_map, maskige_image, palette_image

    rng = np.random.default_rng(3)
    masks = rng.random((4, 90, 160)) > 0.6
    image = maskige_image(masks, "s4", size=384)
    assert image.size == (384, 384) and image.mode == "P"
    expected = Image.fromarray(id_map(masks)).resize((384, 384), Image.NEAREST)  # vct.md section 1: PIL NEAREST
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    assert np.array_equal(np.asarray(maskige_image(masks, "s4")), np.asarray(palette_image(id_map(masks))))
