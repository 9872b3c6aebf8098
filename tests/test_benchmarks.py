"""The peers the benchmarks race against are the networks they claim to be."""

from __future__ import annotations

import math

import torch

from benchmarks import ablation_table
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


def test_ablation_table_writes_placeholders_for_this_machines_folders(tmp_path):
    """A reader elsewhere must be able to paste the table's commands: OUT and DATA, not our folders."""
    out, data = tmp_path / "abl" / "out", tmp_path / "abl" / "data"
    (out / "baseline" / "lp_cls").mkdir(parents=True)
    (out / "baseline" / "lp_cls" / "results.json").write_text('{"top1": 41.5, "knn_top1": 30.25}\n')
    command = (f"python -m pipelines.linprobe pretrained={out}/baseline/pt output_dir={out}/baseline/lp_cls "
               f"data.train='{data}/train-{{000000..000003}}.tar' data.val={data}/val-000000.tar")
    (out / "runs.tsv").write_text(f"baseline\tlp_cls\t42\t{command}\n")
    text = ablation_table.section(out, "bash benchmarks/ablations_cifar10.sh DATA OUT", {str(out): "OUT", f"{data}/": "DATA"})
    assert str(tmp_path) not in text and "41.50" in text
    assert ("python -m pipelines.linprobe pretrained=OUT/baseline/pt output_dir=OUT/baseline/lp_cls "
            "data.train='DATA/train-{000000..000003}.tar' data.val=DATA/val-000000.tar") in text
    assert ablation_table.with_placeholders("output_dir=out/x", {"out": "OUT"}) == "output_dir=OUT/x"
