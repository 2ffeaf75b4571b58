"""Producer models: save/load without pickle, readable errors, and the torchvision zoo from local weights."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from producers.errors import ProducerError
from producers.models.classifiers import (ZOO_ARCHS, build_model, import_torchvision, load_model, resolve_model,
                                          save_model)


def raises_exactly(message: str):
    return pytest.raises(ProducerError, match=f"^{re.escape(message)}$")


def small_cnn(num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    config = {"arch": "small-cnn", "in_channels": 1, "num_classes": num_classes, "image_size": [8, 8],
              "width": 4, "mean": [0.3], "std": [0.4], "dataset": "digits"}
    return build_model(config).eval()


@torch.no_grad()
def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = small_cnn()
    weights, config = save_model(model, tmp_path / "cnn")
    assert (weights.name, config.name) == ("cnn.pt", "cnn.json")
    loaded = load_model(tmp_path / "cnn")
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(model.penultimate(x), loaded.penultimate(x)) and loaded.penultimate(x).shape == (5, 128)
    assert loaded.config == model.config and not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())  # still trainable after loading
    assert torch.equal(resolve_model(str(tmp_path / "cnn"))(x), model(x))


def test_load_model_errors(tmp_path):
    with raises_exactly(f"model file {tmp_path / 'none.pt'} does not exist"):
        load_model(tmp_path / "none")
    save_model(small_cnn(), tmp_path / "cnn")
    (tmp_path / "cnn.json").unlink()
    with raises_exactly(f"model file {tmp_path / 'cnn.json'} does not exist"):
        load_model(tmp_path / "cnn")

    save_model(small_cnn(num_classes=10), tmp_path / "ten")
    save_model(small_cnn(num_classes=3), tmp_path / "three")
    (tmp_path / "ten.json").write_bytes((tmp_path / "three.json").read_bytes())  # config says 3 classes
    with pytest.raises(ProducerError) as info:
        load_model(tmp_path / "ten")
    message = str(info.value)
    assert message.startswith(f"weights in {tmp_path / 'ten.pt'} do not fit the config in {tmp_path / 'ten.json'}: "
                              "Error(s) in loading state_dict for ImageClassifier:")
    assert "size mismatch for net.head.weight" in message

    (tmp_path / "ten.pt").write_bytes(b"garbage, not a state dict")
    with pytest.raises(ProducerError, match=f"^cannot read model {re.escape(str(tmp_path / 'ten'))}: "):
        load_model(tmp_path / "ten")
    (tmp_path / "three.json").write_text("{not json")
    with pytest.raises(ProducerError, match=f"^cannot read model {re.escape(str(tmp_path / 'three'))}: Expecting"):
        load_model(tmp_path / "three")
    (tmp_path / "three.json").write_text('{"arch": "small-cnn"}')
    with raises_exactly(f"config {tmp_path / 'three.json'} lacks the key 'in_channels'"):
        load_model(tmp_path / "three")
    (tmp_path / "three.json").write_text('{"arch": "lenet"}')
    with raises_exactly("unknown model architecture 'lenet'; known: ['small-cnn', 'resnet50', 'vgg16', "
                        "'densenet121']"):
        load_model(tmp_path / "three")


def test_resolve_model_errors(tmp_path):
    stem = tmp_path / "nothing"
    with raises_exactly(f"model '{stem}' is neither a zoo architecture ['resnet50', 'vgg16', 'densenet121'] "
                        f"nor a saved model ({stem}.pt and {stem}.json do not exist)"):
        resolve_model(str(stem))
    save_model(small_cnn(), tmp_path / "cnn")
    with raises_exactly(f"weights w.pth apply only to zoo architectures ['resnet50', 'vgg16', 'densenet121']; "
                        f"'{tmp_path / 'cnn'}' is a saved model with its own weights"):
        resolve_model(str(tmp_path / "cnn"), weights="w.pth")


def test_missing_torchvision_is_a_producer_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails as if absent
    message = "torchvision is not installed; install the `vision` extra: pip install 'logitguard[vision]'"
    with raises_exactly(message):
        resolve_model("resnet50", weights=tmp_path / "resnet50.pth")
    with raises_exactly(message):
        build_model({"arch": "vgg16", "num_classes": 5, "mean": [0.5] * 3, "std": [0.2] * 3})


def test_importing_models_leaves_torchvision_unimported():
    code = "import sys, producers.models.classifiers; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- torchvision zoo, random init at tiny inputs ----------------------------------------------------

@pytest.fixture
def torchvision():
    try:
        return import_torchvision()
    except ProducerError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def one_thread():
    # OpenMP threads spin while they wait: on a small shared CPU two of them make these tiny convolutions
    # tens of times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_zoo_model(arch: str, num_classes: int = 5):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=f"^{arch} has random weights"):
        return resolve_model(arch, num_classes=num_classes)


@pytest.mark.parametrize("arch", ZOO_ARCHS)
@torch.no_grad()
def test_zoo_logits_and_local_weights_round_trip(torchvision, one_thread, tmp_path, arch):
    model = random_zoo_model(arch)
    assert model.config["arch"] == arch and model.config["num_classes"] == 5 and not model.training
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    features = model.penultimate(x)
    width = {"resnet50": 2048, "vgg16": 4096, "densenet121": 1024}[arch]
    assert features.shape == (2, width)

    weights = tmp_path / f"{arch}.pth"
    torch.save(model.net.state_dict(), weights)  # a plain torchvision state dict
    loaded = resolve_model(arch, weights=weights, num_classes=5)
    assert torch.equal(loaded(x), logits) and loaded.config["weights"] == str(weights)
    assert loaded.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


@torch.no_grad()
def test_zoo_model_saved_by_save_model_reloads(torchvision, one_thread, tmp_path):
    model = random_zoo_model("resnet50", num_classes=3)
    save_model(model, tmp_path / "zoo")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(resolve_model(str(tmp_path / "zoo"))(x), model(x))


@torch.no_grad()
def test_densenet_reads_torchvision_published_checkpoints(torchvision, one_thread, tmp_path):
    model = random_zoo_model("densenet121", num_classes=4)
    # torchvision's published DenseNet checkpoints spell "denselayer1.norm1.weight" as "denselayer1.norm.1.weight"
    # and have no BatchNorm num_batches_tracked.
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in model.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    weights = tmp_path / "densenet.pth"
    torch.save(old_style, weights)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(resolve_model("densenet121", weights=weights, num_classes=4)(x), model(x))

    with pytest.raises(ProducerError) as info:
        resolve_model("densenet121", weights=weights, num_classes=7)
    assert str(info.value).startswith(f"weights in {weights} do not fit densenet121 with 7 classes: "
                                      "Error(s) in loading state_dict for DenseNet:")
    assert "size mismatch for classifier.weight" in str(info.value)


def test_zoo_weights_file_errors(torchvision, tmp_path):
    missing = tmp_path / "missing.pth"
    with raises_exactly(f"weights file {missing} does not exist"):
        resolve_model("resnet50", weights=missing)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with raises_exactly(f"weights file {not_a_dict} does not hold a state dict (a mapping of names to tensors)"):
        resolve_model("resnet50", weights=not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ProducerError, match=f"^cannot read weights {re.escape(str(garbage))}: "):
        resolve_model("resnet50", weights=garbage)
