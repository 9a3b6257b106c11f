"""Real: fused HPU kernels. Only FusedSDPA is imported without a fallback (by optimum-habana's
`gaudi_fused_sdpa_attention` integration, at import time); the rest are optional there."""

import torch


class FusedSDPA:
    """Real: Habana's fused (flash) scaled-dot-product attention; it takes fewer key/value heads than query heads
    (grouped-query attention), which optimum-habana's Llama relies on. Stand-in: torch's SDPA with the same inputs
    and ``enable_gqa``; the HPU-only options (softmax mode, recompute, valid lengths, padding side) change speed and
    memory, not values."""

    @staticmethod
    def apply(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, softmax_mode="None",
              recompute_mode=False, valid_sequence_lengths=None, padding_side="left"):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=key.shape[-3] != query.shape[-3])
