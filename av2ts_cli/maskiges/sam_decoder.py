"""SAM's mask decoder for a grid of single-point prompts on one image, computed as the arithmetic requires: the same
masks and IoU scores as ``transformers``' ``SamModel`` (its weights, read from its modules), at a fraction of the
time on a CPU.

Why: the stock decoder copies the image embedding (64 x 64 x 256) once per point, adds the positional embedding to
every copy before every attention, and projects every copy with the same weights in the first layer, where all the
copies are still equal. Profiled with random ViT-B weights, 64 points, 2 threads: copies, additions, layer norms and
GELU took 12.0 of 24.0 s; products and convolutions 11.4 s. Here

- the first layer's tokens-to-image attention reads the one image embedding (its keys and values are the same for
  every point), all points' tokens as one batch of queries;
- the later tokens-to-image attentions, where each point has its own image side, never form its keys and values:
  each head's query goes through the key projection instead (T rows, not N) and the attention-weighted image
  through the value projection (``_tokens_to_each_image``);
- the image-to-tokens attention applies the output projection to each head's values before the attention weights
  (A (V W_o) instead of (A V) W_o: 7 tokens instead of 4,096 image positions per product);
- the positional embedding enters through its projection, computed once per image (W (x + p) = W x + W p);
- only the upscaling and the second layer's image side run per point, as they must.

Arithmetic per point: about 1.0 GMAC instead of 1.75 (0.4 of it the upscaling). The small token-side modules
(self-attention, MLPs, the IoU head, the hypernetworks) are ``transformers``' own, called as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C / heads]."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


class _Projected:
    """The image side of one SamAttention, projected once: ``key`` = (x + pe) W_k + b_k, ``value`` = x W_v + b_v,
    ``query`` = (x + pe) W_q + b_q of the image-to-tokens attention that follows, each [B, N, internal] (views of
    one product; the positional terms, ``terms[id(to_image)]`` [1, N, 3 x internal], added in place). With
    ``queries_only``, ``query`` alone (key and value None)."""

    def __init__(self, image: torch.Tensor, terms: dict, to_image: nn.Module, queries_only: bool = False):
        added, weight = terms[id(to_image)]
        internal = to_image.k_proj.weight.shape[0]
        if queries_only:
            added, weight = added[..., 2 * internal:], weight[2 * internal:]
        projected = image @ weight.T  # one product: [B, N, internal or 3 x internal]
        projected += added
        self.query = projected[..., -internal:]
        self.key = self.value = None
        if not queries_only:
            self.key, self.value = projected[..., :internal], projected[..., internal:2 * internal]


class PointDecoder:
    """``decode(embeddings, points, labels)`` of a ``transformers`` SamModel (model_type "sam"; SAM-HQ and SAM 2
    have other decoders and keep the stock path)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder = model.mask_decoder
        self.transformer = self.decoder.transformer
        self._pe_cache: tuple | None = None

    def _image_side(self, embeddings: torch.Tensor):
        """The per-image inputs: image [1, N, C] (embedding + no-mask embedding) and, for every projection that
        reads the positional embedding, pe W + b [1, N, internal] (cached: the embedding is the model's)."""
        prompt = self.model.prompt_encoder
        image = (embeddings + prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        if self._pe_cache is None or self._pe_cache[0] != (image.dtype, image.device):
            pe = self.model.get_image_wide_positional_embeddings().flatten(2).transpose(1, 2).to(image.dtype)
            pairs = [(layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)
                     for layer in self.transformer.layers]
            pairs.append((self.transformer.final_attn_token_to_image, None))
            terms = {}
            for to_image, to_tokens in pairs:
                parts = [(to_image.k_proj, True), (to_image.v_proj, False)]
                parts += [(to_tokens.q_proj, True)] if to_tokens is not None else []
                added = [torch.nn.functional.linear(pe, p.weight, p.bias) if with_pe
                         else p.bias.expand(*pe.shape[:-1], -1) for p, with_pe in parts]
                terms[id(to_image)] = (torch.cat(added, -1), torch.cat([p.weight for p, _ in parts]))
            self._pe_cache = ((image.dtype, image.device), terms)
        return image, self._pe_cache[1]

    def decode(self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, multimask: bool = True):
        """embeddings: float [1, C, h, w] (the image encoder's output); points: float [1, P, 1, 2] in the model's
        input coordinates; labels: int [1, P, 1] -> (low-resolution mask logits [1, P, M, 4h, 4w], IoU scores
        [1, P, M]), M = 3 with ``multimask`` (the three proposals) or 1; as ``SamModel(image_embeddings=...,
        input_points=..., input_labels=...)``'s ``pred_masks`` and ``iou_scores``."""
        decoder, transformer = self.decoder, self.transformer
        image, pe_terms = self._image_side(embeddings)
        sparse, _ = self.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                              input_masks=None)  # [1, P, 2, C]
        count = sparse.shape[1]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])  # [1 + masks, C]
        prompt = torch.cat([output_tokens.expand(1, count, -1, -1).to(sparse.dtype), sparse], 2)  # [1, P, T, C]
        queries, keys = prompt, image
        for index, layer in enumerate(transformer.layers):
            queries, keys = self._layer(layer, queries, keys, prompt, pe_terms, first=index == 0)
        final = transformer.final_attn_token_to_image
        queries = transformer.layer_norm_final_attn(
            queries + self._tokens_to_each_image(final, queries + prompt, keys, pe_terms))
        return self._masks(queries, keys, count, embeddings.shape[-2:], multimask)

    def _layer(self, layer: nn.Module, queries, keys, prompt, pe_terms: dict, first: bool):
        """One two-way block. queries: [1, P, T, C] tokens; keys: [B, N, C] image (B = 1 before the first block
        has mixed in each point's tokens, P after); prompt: [1, P, T, C] the tokens' positional embedding."""
        if first:  # the block skips the positional embedding and the residual of its self-attention
            queries = layer.self_attn(query=queries, key=queries, value=queries)[0]
        else:
            with_pe = queries + prompt
            queries = queries + layer.self_attn(query=with_pe, key=with_pe, value=queries)[0]
        queries = layer.layer_norm1(queries)
        to_image, to_tokens = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if keys.shape[0] == 1:  # the one image embedding: its keys and values once for every point
            side = _Projected(keys, pe_terms, to_image)
            attended, image_query = self._tokens_to_image(to_image, queries + prompt, side), side.query
        else:
            attended = self._tokens_to_each_image(to_image, queries + prompt, keys, pe_terms)
            image_query = _Projected(keys, pe_terms, to_image, queries_only=True).query
        queries = layer.layer_norm2(queries + attended)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        with_pe = (queries + prompt)[0]  # [P, T, C]
        keys = self._image_to_tokens(to_tokens, image_query, with_pe, queries[0], keys)
        return queries, layer.layer_norm4(keys)

    @staticmethod
    def _tokens_to_image(attention: nn.Module, tokens, side: _Projected):
        """tokens: [1, P, T, C] queries (with their positional embedding) -> [1, P, T, C] attention output over the
        one image's keys and values ([1, N, internal]: the same for every point, one batch of P x T queries)."""
        heads = attention.num_attention_heads
        _, count, length, _ = tokens.shape
        query = torch.nn.functional.linear(tokens, attention.q_proj.weight, attention.q_proj.bias)
        out = torch.nn.functional.scaled_dot_product_attention(
            _split_heads(query.reshape(1, count * length, -1), heads), _split_heads(side.key, heads),
            _split_heads(side.value, heads), scale=attention.scaling)  # [1, heads, P x T, d]
        out = out.transpose(1, 2).reshape(1, count, length, -1)
        return attention.out_proj(out)

    @staticmethod
    def _tokens_to_each_image(attention: nn.Module, tokens, image, terms: dict):
        """tokens: [1, P, T, C] queries (with their positional embedding); image: [P, N, C] each point's own image
        side -> [1, P, T, C], the attention output over its keys (x + pe) W_k + b_k and values x W_v + b_v.

        Those are never formed (2 x N x C x internal multiply-adds a point, the largest products of the decoder):
        each head's query goes through W_k instead (q_h W_k,h: T rows, not N) and meets the image, the positional
        part of the scores comes from pe W_k (``terms``, once per image) per head, and the attention-weighted image
        goes through W_v after the weights (A (x W_v) = (A x) W_v; b_v added once, as each row of A sums to 1).
        b_k rides along in the positional term: its share of a query's scores is one constant over the image
        positions, which the softmax ignores. At 64 points (2 threads, fp32) the products of the second block's
        image side and of the final attention took 0.46 s instead of 0.87 s."""
        heads = attention.num_attention_heads
        _, count, length, width = tokens.shape
        positions = image.shape[1]
        internal = attention.q_proj.weight.shape[0]
        depth = internal // heads
        query = torch.nn.functional.linear(tokens[0], attention.q_proj.weight, attention.q_proj.bias)
        query = (query * attention.scaling).reshape(count, length, heads, depth)  # [P, T, H, d]
        absorbed = query.permute(0, 2, 1, 3) @ attention.k_proj.weight.reshape(heads, depth, width)  # [P, H, T, C]
        scores = absorbed.reshape(count, heads * length, width) @ image.transpose(1, 2)  # [P, H x T, N]
        positional_key = terms[id(attention)][0][0, :, :internal]  # pe W_k + b_k, [N, internal]
        positional = query.permute(2, 0, 1, 3).reshape(heads, count * length, depth) @ \
            positional_key.reshape(positions, heads, depth).permute(1, 2, 0)  # [H, P x T, N]
        scores.view(count, heads, length, positions).add_(positional.view(heads, count, length, positions)
                                                          .transpose(0, 1))
        weights = torch.softmax(scores, -1)
        mixed = (weights @ image).reshape(count, heads, length, width)  # [P, H, T, C]
        values = mixed @ attention.v_proj.weight.reshape(heads, depth, width).transpose(1, 2)  # [P, H, T, d]
        values = values.transpose(1, 2).reshape(count, length, internal) + attention.v_proj.bias
        return attention.out_proj(values)[None]

    @staticmethod
    def _image_to_tokens(attention: nn.Module, image_query, tokens_key, tokens_value, residual):
        """image_query: [B, N, internal] (projected); tokens_key (with the positional embedding), tokens_value:
        [P, T, C]; residual: [B, N, C] -> residual + the attention output, [P, N, C].

        The output projection goes onto each head's values before the weights (A (V W_o): T rows, not N); the
        scores of all heads come from one product with the heads' keys on a block diagonal ([P, heads x T, heads
        x d] x [d', N]: 8x the arithmetic of per-head products, which needed a copy of the strided image queries
        that took longer); they are normalised over T as [P, heads, T, N] (a softmax over a last axis of 7 took 6x
        as long). The output bias enters through the values: each head's weights sum to 1 over T."""
        heads = attention.num_attention_heads
        key = _split_heads(torch.nn.functional.linear(tokens_key, attention.k_proj.weight, attention.k_proj.bias),
                           heads)  # [P, heads, T, d]
        value = _split_heads(torch.nn.functional.linear(tokens_value, attention.v_proj.weight,
                                                        attention.v_proj.bias), heads)
        count, _, length, depth = value.shape
        diagonal = key.new_zeros(count, heads, length, heads, depth)
        index = torch.arange(heads)
        diagonal[:, index, :, index, :] = key.permute(1, 0, 2, 3) * attention.scaling
        diagonal = diagonal.reshape(count, heads * length, heads * depth)
        query = image_query[0] if image_query.shape[0] == 1 else image_query  # [N, internal] or [P, N, internal]
        scores = diagonal @ query.transpose(-1, -2)  # [P, heads x T, N]
        weights = torch.softmax(scores.reshape(count, heads, length, -1), -2).reshape(count, heads * length, -1)
        out_weight = attention.out_proj.weight.T.reshape(heads, depth, -1)  # [heads, d, C]
        projected = (value @ out_weight).reshape(count, heads * length, -1) + attention.out_proj.bias / heads
        if residual.shape[0] == count:  # each point's own image side (a fresh tensor, not read after this): in place
            return residual.baddbmm_(weights.transpose(1, 2), projected)
        return torch.baddbmm(residual.expand(count, -1, -1), weights.transpose(1, 2), projected)  # [P, N, C]

    def _masks(self, queries, keys, count: int, size, multimask: bool):
        """queries: [1, P, T, C], keys: [P, N, C] -> (logits [1, P, M, 4h, 4w], IoU [1, P, M])."""
        decoder = self.decoder
        # channels-last all the way (keys are [P, h x w, C] already): the transposed convolutions ran 2x as fast
        # as on the stock layout, and the layer norm over channels reads a contiguous last axis, not a permuted
        # copy (as matrix products on 2x2 blocks they were no faster)
        grid = keys.reshape(count, *size, -1).permute(0, 3, 1, 2)  # [P, C, h, w], channels-last strides
        upscaled = decoder.upscale_conv1(grid).permute(0, 2, 3, 1)  # [P, 2h, 2w, C/4]
        norm = decoder.upscale_layer_norm
        upscaled = torch.nn.functional.layer_norm(upscaled, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        upscaled = decoder.activation(upscaled).permute(0, 3, 1, 2)
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled))  # [P, C/8, 4h, 4w], channels-last
        chosen = slice(1, None) if multimask else slice(0, 1)
        hyper = torch.stack([mlp(queries[0, :, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                            1)[:, chosen]  # [P, M, C/8]
        height, width = upscaled.shape[-2:]
        pixels = upscaled.permute(0, 2, 3, 1).reshape(count, height * width, -1)  # a view: channels-last
        logits = (hyper @ pixels.transpose(1, 2)).reshape(1, count, -1, height, width)
        iou = decoder.iou_prediction_head(queries[:, :, 0])  # [1, P, masks]
        return logits, iou[:, :, chosen]
