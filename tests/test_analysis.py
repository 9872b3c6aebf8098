"""The encoder analyses (the ViT paper's Figure 7) and reconstructions: the computations on
hand-made inputs, every file written for a tiny real run in each accepted source format,
and the one-line answers to bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from mae.analysis import (
    attention_probabilities, filter_components, mean_distance, mixing_weights, patch_distances,
    portable_description, position_similarity, prefix_share,
)  # fmt: skip
from mae.models import create_model
from mae.models.mae_vit import Attention, PatchMlp, encoder_only
from pipelines import analyze as analyze_cli
from pipelines import reconstruct as reconstruct_cli

ROOT = Path(__file__).resolve().parents[1]
SHARD = "shards/cifar10/test-000000.tar"
ATTENTION_FILES = {"attention_distance.png", "class_token_attention.png", "position_similarity.png",
                   "patch_embedding_components.png"}  # fmt: skip
FEEDFORWARD_FILES = {"mixing_distance.png", "class_token_mixing.png", "position_similarity.png",
                     "patch_embedding_components.png", "reconstructions.png"}  # fmt: skip


# -- the computations, on hand-made inputs


def test_patch_distances_are_pixels_between_centres():
    d = patch_distances(3, 4)  # 3 x 3 grid of 4-pixel patches, row-major
    assert d[0, 1] == 4 and d[0, 3] == 4 and d[0, 4] == pytest.approx(4 * math.sqrt(2))
    assert d[0, 8] == pytest.approx(4 * math.sqrt(8)) and torch.all(d.diagonal() == 0)


def test_identity_attention_has_distance_zero():
    weights = torch.eye(1 + 9).expand(2, 3, 10, 10)  # every token attends to itself only
    assert torch.all(mean_distance(weights, patch_distances(3, 4), prefix=1) == 0)


def test_uniform_attention_gives_the_mean_over_the_grid():
    # 2 x 2 grid of 4-pixel patches: from any patch the others lie at 0, 4, 4 and 4 * sqrt(2) pixels
    by_hand = (0 + 4 + 4 + 4 * math.sqrt(2)) / 4
    over_patches = torch.full((1, 2, 4, 4), 1 / 4)
    assert mean_distance(over_patches, patch_distances(2, 4), prefix=0) == pytest.approx(by_hand)
    # uniform over the class token too: its fifth of the weight counts as distance 0
    over_all = torch.full((1, 2, 5, 5), 1 / 5)
    assert mean_distance(over_all, patch_distances(2, 4), prefix=1) == pytest.approx(by_hand * 4 / 5)
    assert prefix_share(over_all, prefix=1) == pytest.approx(1 / 5)


@pytest.mark.parametrize("make", [lambda: Attention(32, 4), lambda: timm.models.vision_transformer.Attention(32, 4, qkv_bias=True)])
def test_attention_probabilities_are_the_ones_the_module_uses(make):
    """Recomputed from qkv, they reproduce the module's own (fused) output."""
    torch.manual_seed(0)
    attn = make().eval()
    x = torch.randn(2, 7, 32)
    probs = attention_probabilities(attn, x)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 7))
    v = attn.qkv(x).reshape(2, 7, 3, 4, 8)[:, :, 2].transpose(1, 2)  # [B, heads, N, head_dim]
    by_hand = attn.proj((probs @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(by_hand, attn(x), atol=1e-5)


def test_mixing_weights_of_a_linear_token_mixer_are_its_normalised_matrix():
    """A mixer y[:, :, c] = M x[:, :, c] has the Jacobian M in every channel."""
    torch.manual_seed(0)
    M = torch.randn(5, 5)

    class Linear(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ij,bjc->bic", M, x)

    w = mixing_weights(Linear(), torch.randn(3, 5, 8))
    expected = M.abs() / M.abs().sum(-1, keepdim=True)
    assert torch.allclose(w, expected.expand(3, 5, 5), atol=1e-6)
    identity = mixing_weights(torch.nn.Identity(), torch.randn(2, 5, 8))[:, None]
    assert torch.all(mean_distance(identity, patch_distances(2, 4), prefix=1) == 0)


def test_mixing_weights_of_the_patch_mlp_are_its_jacobian_channel_by_channel():
    torch.manual_seed(0)
    mlp = PatchMlp(5).eval()
    x = torch.randn(2, 5, 3)
    w = mixing_weights(mlp, x)
    for b in range(2):
        jacobians = [torch.autograd.functional.jacobian(lambda v: mlp(v[None, :, None])[0, :, 0], x[b, :, c])
                     for c in range(3)]  # fmt: skip
        expected = torch.stack(jacobians).abs().mean(0)
        assert torch.allclose(w[b], expected / expected.sum(-1, keepdim=True), atol=1e-6)


def test_similarity_grid_of_a_hand_built_table():
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1]], dtype=torch.float64)
    assert torch.allclose(position_similarity(table), expected)


def test_principal_components_of_a_rank_one_filter_bank():
    torch.manual_seed(0)
    f = torch.randn(3, 4, 4)
    bank = torch.randn(16, 1, 1, 1) * f  # every filter a multiple of f
    comps, ratio = filter_components(bank, 5)
    unit = (f / f.norm()).double()
    unit = unit * unit.flatten()[unit.abs().argmax()].sign()  # signed: largest entry positive
    assert torch.allclose(comps[0], unit, atol=1e-6)
    assert ratio[0] == pytest.approx(1.0) and torch.all(ratio[1:] < 1e-12)
    assert comps.shape == (5, 3, 4, 4) and torch.allclose(comps.flatten(1).norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_recorded_description_keeps_only_the_last_name_of_each_given_path():
    described = portable_description("timm model vit_tiny_patch16_224 with weights /home/me/runs/pt/encoder.safetensors",
                                     "vit_tiny_patch16_224", "/home/me/runs/pt/encoder.safetensors")  # fmt: skip
    assert described == "timm model vit_tiny_patch16_224 with weights encoder.safetensors"
    run_given = portable_description("pretraining run /home/me/runs/pt (ckpt-00000008)", "/home/me/runs/pt/", None)
    assert run_given == "pretraining run pt (ckpt-00000008)"


# -- a tiny real run, in every accepted format


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Real pretraining runs (2 blocks, a few steps) of the attention and the feed-forward
    encoder, and a fine-tuning run from the first."""
    base = tmp_path_factory.mktemp("runs")
    common = [f"data.train={SHARD}", "data.val=", "epochs=1", "batch_size=64", "data.num_workers=1",
              "progress=false"]  # fmt: skip
    proc = run("pipelines.pretrain", f"output_dir={base / 'pt'}", "model_overrides.depth=2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("pipelines.finetune", f"output_dir={base / 'ft'}", f"pretrained={base / 'pt'}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("pipelines.pretrain", f"output_dir={base / 'pt-ff'}", "model_overrides.depth=2",
               "model_overrides.mixer=feedforward", "mask_sampling=block", *common)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base


@pytest.fixture(scope="module")
def images(tmp_path_factory, real_jpegs) -> list[Path]:
    """Real CIFAR images: three 32 x 32 and one enlarged to 48 x 40."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, data in enumerate([jpegs[0] for jpegs in real_jpegs.values()][:3]):
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(data)
    big = folder / "big.png"
    Image.open(paths[0]).resize((48, 40)).save(big)
    return [*paths, big]


def analyze(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "analysis"
    assert analyze_cli.main([*args, "--out", str(out), "--images", "12", "--maps", "3", "--device", "cpu"]) == 0
    numbers = json.loads((out / "analysis.json").read_text())
    assert {p.name for p in out.iterdir()} == set(numbers["files"]) | {"analysis.json"}
    for name in numbers["files"]:
        assert Image.open(out / name).size[0] > 32
    return numbers


def check_encoder_numbers(numbers: dict, depth: int = 2) -> None:
    assert numbers["mixer"] == "attention" and (numbers["img_size"], numbers["patch_size"], numbers["grid"]) == (32, 4, 8)
    distance = numbers["mean_attention_distance"]
    assert len(distance) == depth and all(len(heads) == 3 for heads in distance)
    assert all(0 < d < 4 * 7 * math.sqrt(2) for heads in distance for d in heads)  # within the grid's diagonal
    assert len(numbers["class_token_attention"]) == 3  # --maps images x heads x 8 x 8
    assert torch.tensor(numbers["class_token_attention"]).shape == (3, 3, 8, 8)
    assert len(numbers["patch_embedding_explained_variance"]) == 28


def test_untrained_model_in_the_released_format_runs_both_tools(tmp_path, images, capsys):
    """The tools without a training run (the fast tier): a released-format file with its decoder
    gives every picture and a reconstruction, and analysis.json names the file, not its folder."""
    torch.manual_seed(0)
    released = tmp_path / "released.pth"
    torch.save({"model": create_model("mae_vit_tiny_patch4_32", depth=2).state_dict()}, released)
    numbers = analyze(tmp_path, str(released), *map(str, images))
    check_encoder_numbers(numbers)
    assert set(numbers["files"]) == ATTENTION_FILES | {"reconstructions.png"}
    assert "released.pth" in numbers["source"] and str(tmp_path) not in numbers["source"]
    out = tmp_path / "rec.png"
    code = reconstruct_cli.main([str(released), str(images[0]), "--mask-ratio", "0.75", "--out", str(out),
                                 "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size[0] > 3 * 96


@pytest.mark.slow
def test_pretraining_run_gives_every_picture(tiny_run, tmp_path):
    numbers = analyze(tmp_path, str(tiny_run / "pt"))
    assert numbers["source"].startswith("pretraining run pt (ckpt-") and str(tiny_run) not in numbers["source"]
    assert set(numbers["files"]) == ATTENTION_FILES | {"reconstructions.png"}
    check_encoder_numbers(numbers)
    # every sampling at every default ratio it can give (grid keeps one patch per 2 x 2 cell: 75% only)
    expected = {f"{ratio}% {sampling}" for ratio in (50, 75, 90) for sampling in ("random", "block")} | {"75% grid"}
    assert set(numbers["reconstruction_loss"]) == expected
    # the similarity grid is that of the run's own position table, [row][col][row][col]
    table = load_file(str(tiny_run / "pt" / "encoder.safetensors"))["pos_embed"][0, 1:]
    sim = torch.tensor(numbers["position_similarity"], dtype=torch.float64)
    assert torch.allclose(sim[2, 5].flatten(), position_similarity(table)[2 * 8 + 5], atol=1e-5)


@pytest.mark.slow
def test_every_other_source_format(tiny_run, tmp_path, images):
    pt = tiny_run / "pt"
    checkpoint = sorted((pt / "checkpoints").iterdir())[-1]
    released = tmp_path / "released.pth"  # the official release's layout: {'model': state_dict}
    torch.save({"model": load_file(str(checkpoint / "model.safetensors"))}, released)
    released_encoder = tmp_path / "released-encoder.pth"  # as the official mae_pretrain_*.pth: no decoder
    torch.save({"model": encoder_only(load_file(str(checkpoint / "model.safetensors")))}, released_encoder)
    with_decoder = {"checkpoint folder": [str(checkpoint)], "released .pth": [str(released)]}
    encoder_only_sources = {
        "released encoder-only .pth": [str(released_encoder)],
        "encoder file": [str(pt / "encoder.safetensors")],
        "timm name with weights": ["vit_tiny_patch16_224", "--weights", str(pt / "encoder.safetensors")],
        "fine-tuning run": [str(tiny_run / "ft")],
    }
    for kind, args in {**with_decoder, **encoder_only_sources}.items():
        numbers = analyze(tmp_path / kind, *args, *map(str, images))
        check_encoder_numbers(numbers)
        assert numbers["images"] == 4, kind  # the files given
        expected = ATTENTION_FILES | ({"reconstructions.png"} if kind in with_decoder else set())
        assert set(numbers["files"]) == expected, kind


@pytest.mark.slow
def test_feedforward_run_gives_mixing_in_place_of_attention(tiny_run, tmp_path, images):
    numbers = analyze(tmp_path, str(tiny_run / "pt-ff"), "--mask-ratio", "0.5", "0.75")
    assert set(numbers["files"]) == FEEDFORWARD_FILES and numbers["mixer"] == "feedforward"
    distance = numbers["mean_mixing_distance"]  # one per block, in pixels, on the attention's scale
    assert len(distance) == 2 and all(0 < d < 4 * 7 * math.sqrt(2) for d in distance)
    assert "mean_attention_distance" not in numbers and "class_token_attention" not in numbers
    assert torch.tensor(numbers["class_token_mixing"]).shape == (3, 8, 8)  # how strongly each patch feeds the cls token
    assert set(numbers["reconstruction_loss"]) == {"50% random", "75% random", "50% block", "75% block", "75% grid"}
    # the encoder file alone is the timm vit_ff model
    numbers = analyze(tmp_path / "encoder", str(tiny_run / "pt-ff" / "encoder.safetensors"), *map(str, images))
    assert set(numbers["files"]) == FEEDFORWARD_FILES - {"reconstructions.png"}


@pytest.mark.slow
def test_encoder_only_analyses_need_no_images(tiny_run, tmp_path):
    numbers = analyze(tmp_path, str(tiny_run / "pt"), "--only", "position", "filters", "--data", "no/such/shards")
    assert set(numbers["files"]) == {"position_similarity.png", "patch_embedding_components.png"}
    assert numbers["images"] == 0


@pytest.mark.slow
def test_reconstruct_writes_one_picture_of_every_ratio(tiny_run, tmp_path, images, capsys):
    out = tmp_path / "rec.png"
    code = reconstruct_cli.main([str(tiny_run / "pt"), *map(str, images), "--mask-ratio", "0.5", "0.9",
                                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "big.png is 48x40, the model takes 32x32: resized" in captured.err  # said, not silent
    assert "50% random: loss" in captured.out and "90% random: loss" in captured.out
    width, height = Image.open(out).size
    assert width > 5 * 96 and height > 4 * 96  # original + 2 x (input, output) columns, one row per image


# -- bad input: one line, exit 2, no traceback


@pytest.fixture(scope="module")
def not_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "notes.pth"
    path.write_text("not a checkpoint")
    return path


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("pipelines.reconstruct", ["{pt}/encoder.safetensors", "{img}", "--out", "{tmp}/r.png"],
         "has no decoder (an encoder only), so it cannot reconstruct"),
        ("pipelines.analyze", ["{pt}/encoder.safetensors", "--only", "reconstructions", "--out", "{tmp}/a"],
         "has no decoder"),
        ("pipelines.analyze", ["{pt}", "--only", "mixing-maps", "--out", "{tmp}/a"],
         "mixes tokens with attention, not a feed-forward layer across patches"),
        ("pipelines.analyze", ["{pt}-ff", "--only", "attention-maps", "--out", "{tmp}/a"],
         "mixes tokens with a feed-forward layer across patches, not attention; ask for mixing-distance"),
        ("pipelines.reconstruct", ["{pt}", "{img}", "--mask-sampling", "grid", "--mask-ratio", "0.5", "--out", "{tmp}/r.png"],
         "--mask-sampling grid: keeps one patch per 2 x 2 cell: it needs mask_ratio=0.75"),
        ("pipelines.analyze", ["no/such/run", "--out", "{tmp}/a"], "no/such/run: no such file or folder"),
        ("pipelines.analyze", ["{tmp}", "--out", "{tmp}/a"], "neither config.yaml (a run) nor state.pt"),
        ("pipelines.analyze", ["{bad}", "--out", "{tmp}/a"], "not a weights file torch or safetensors can read"),
        ("pipelines.analyze", ["vit_tiny_patch16_224", "--out", "{tmp}/a"], "give its weights with --weights"),
        ("pipelines.reconstruct", ["{pt}", "{bad}", "--out", "{tmp}/r.png"], "notes.pth: not an image"),
        ("pipelines.reconstruct", ["{pt}", "{img}", "--mask-ratio", "1.5", "--out", "{tmp}/r.png"],
         "--mask-ratio 1.5: a mask ratio is the fraction hidden, in [0, 1)"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_bad_input_gets_one_line(tiny_run, images, not_weights, tmp_path, module, args, message):
    fill = dict(pt=tiny_run / "pt", img=images[0], tmp=tmp_path, bad=not_weights)
    proc = run(module, *(a.format(**fill) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line
