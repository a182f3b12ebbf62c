"""Model tests: shapes, normalisation, weights, and the retrieval metric on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from embedder import model, train
from embedder.evaluate import recall_at_k


def test_resnet50_embedder_gives_unit_2048_d_embeddings():
    net = model.build("resnet50", num_classes=10).eval()
    with torch.inference_mode():
        out = net.embedder(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 2048)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert isinstance(net.embedder.backbone.fc, torch.nn.Identity)


def test_cosine_head_scores_the_served_embedding():
    net = model.build("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits = net(x)
        emb = net.embedder(x)
    weight = torch.nn.functional.normalize(net.head.weight, dim=1)
    assert torch.allclose(logits, net.head.scale * emb @ weight.T, atol=1e-5)
    assert logits.abs().max() <= net.head.scale + 1e-4


def test_unknown_architecture_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet5'; choose one of resnet18, .*resnet50"):
        model.build("resnet5", num_classes=2)
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--manifest-uri", "x", "--experiment", "e", "--architecture", "vgg16"])


def test_pretrained_weights_initialise_the_backbone(tmp_path):
    source = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = model.build("resnet18", num_classes=3, weights_uri=path.as_uri())
    assert torch.equal(net.embedder.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(net.embedder.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18.pth do not fit ResNet: .*(size mismatch|missing)"):
        model.build("resnet50", num_classes=3, weights_uri=str(path))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="pretrained weights .*nope.pth: no such file"):
        model.build("resnet18", num_classes=3, weights_uri=str(tmp_path / "nope.pth"))


def test_recall_at_k_on_known_neighbours():
    # Five unit vectors at angles A=0.0, B=0.1, C=3.0, D=3.2, E=1.6 (radians). Nearest-first orders:
    # A: B E C D | B: A E C D | C: D E B A | D: C E A B | E: C B A/D
    angles = torch.tensor([0.0, 0.1, 3.0, 3.2, 1.6])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    recalls, queries = recall_at_k(emb, torch.tensor([0, 0, 1, 1, 0]), ks=(1, 2))
    # @1: A->B, B->A, C->D, D->C hit; E->C misses.  @2: E->{C, B} hits.
    assert (queries, recalls[1], recalls[2]) == (5, pytest.approx(0.8), pytest.approx(1.0))
    recalls, queries = recall_at_k(emb, torch.tensor([0, 1, 1, 0, 2]), ks=(1, 3))
    # E's label is unique, so E is not a query. @1 all four miss. @3: B->{A,E,C}, C->{D,E,B}, D->{C,E,A} hit; A misses.
    assert (queries, recalls[1], recalls[3]) == (4, 0.0, pytest.approx(0.75))


def test_recall_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    labels = torch.randint(0, 5, (50,))
    assert recall_at_k(emb, labels, chunk=7) == recall_at_k(emb, labels, chunk=1024)
