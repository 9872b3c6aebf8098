"""The peers the benchmarks race against are the networks they claim to be."""

from __future__ import annotations

import math

import torch

from benchmarks.pretrain_step import peer_model
from mae.models import create_model

PRESET = "mae_vit_tiny_patch4_32"


def test_hf_peer_starts_from_the_official_initialisation():
    """transformers 5.x leaves ViTMAE's frozen sin-cos tables at zero, a model without
    positions whose loss stalls; the peer must carry the same tables as ours and the
    official code, with a Xavier patch projection, or the races measure a broken peer."""
    ours = create_model(PRESET)
    peer = peer_model(ours.cfg)
    embeddings = peer.vit.embeddings

    assert torch.allclose(embeddings.position_embeddings, ours.pos_embed, atol=1e-6)
    assert torch.allclose(peer.decoder.decoder_pos_embed, ours.decoder_pos_embed, atol=1e-6)
    assert not embeddings.position_embeddings.requires_grad and not peer.decoder.decoder_pos_embed.requires_grad

    w = embeddings.patch_embeddings.projection.weight.flatten(1)
    xavier_std = math.sqrt(2.0 / sum(w.shape))
    assert abs(w.std().item() / xavier_std - 1) < 0.1
    for token in (embeddings.cls_token, peer.decoder.mask_token):
        assert 0.015 < token.std().item() < 0.025
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
