"""Table 8 models: parameter counts (torch-uncertainty 0.13.0, shared/PEER.md), output layout, BatchEnsemble
layers against an explicit per-estimator computation, eval-mode repetition, the registry and the eager twin."""

import pytest
import torch
import torch.nn.functional as F

import pe_kernels
from pe_kernels.models import TABLE8_MODELS, eager_twin, get_model
from pe_kernels.models.deep_ensembles import deep_ensembles
from pe_kernels.models.mimo import mimo_batch_format
from pe_kernels.models.resnet import ResNet, resnet
from pe_kernels.nn import BatchConv2d, BatchLinear

NAMES = ("single", "pe-2-4-1", "pe-2-4-2", "de", "mimo", "batchensemble")
PEER_PARAMETERS = {"single": 23_705_252, "pe-2-4-1": 23_965_200, "pe-2-4-2": 14_921_232, "de": 94_821_008,
                   "mimo": 24_351_696, "batchensemble": 24_016_492}
B, CLASSES = 2, 100


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from threads; one thread keeps a busy 2-core machine from oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: get_model(name).build(CLASSES) for name in NAMES}


def _x(batch=B, size=16):
    return torch.randn(batch, 3, size, size)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_torch_uncertainty(models, name):
    assert _num_params(models[name]) == PEER_PARAMETERS[name]
    assert get_model(name).num_parameters == PEER_PARAMETERS[name]


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_per_sample_rows(models, name):
    """(M*B, classes), and in eval row m*B + b only depends on sample b (equal to a batch of that sample)."""
    model, m = models[name].eval(), get_model(name).num_estimators
    x = _x()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (m * B, CLASSES)
        for b in range(B):
            alone = model(x[b:b + 1])
            torch.testing.assert_close(out[b::B], alone, rtol=1e-4, atol=1e-5)


def _shift_estimator_head(model, name, k, delta):
    """Add `delta` to estimator k's classifier bias only."""
    with torch.no_grad():
        if name == "de":
            model.core_models[k].linear.bias.add_(delta)
        elif name == "batchensemble":
            model.linear.bias[k].add_(delta)  # BatchLinear bias (M, classes)
        else:
            model.linear.bias.view(4, -1)[k].add_(delta)  # PackedLinear / MIMO head: estimator-major outputs


@pytest.mark.parametrize("name", [n for n in NAMES if n != "single"])
def test_row_block_m_is_estimator_m(models, name):
    model, k = models[name].eval(), 2
    x = _x()
    with torch.no_grad():
        before = model(x)
        _shift_estimator_head(model, name, k, 1.0)
        after = model(x)
        _shift_estimator_head(model, name, k, -1.0)
    changed = (after - before).abs().amax(dim=1) > 1e-3
    expected = torch.zeros(4 * B, dtype=torch.bool)
    expected[k * B:(k + 1) * B] = True
    assert torch.equal(changed, expected)


def test_deep_ensembles_rows_are_the_submodels(models):
    model = models["de"].eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
        for m, member in enumerate(model.core_models):
            torch.testing.assert_close(out[m * B:(m + 1) * B], member(x))
    assert not torch.equal(model.core_models[0].linear.weight, model.core_models[1].linear.weight)


def test_deep_ensembles_wrapper_argument_rules():
    base = torch.nn.Linear(3, 2)
    assert deep_ensembles(base, num_estimators=3).num_estimators == 3
    with pytest.raises(ValueError, match="num_estimators must be specified"):
        deep_ensembles(base)
    with pytest.raises(ValueError, match="at least 2"):
        deep_ensembles([base], num_estimators=1)
    with pytest.raises(ValueError, match="must be None"):
        deep_ensembles([base, torch.nn.Linear(3, 2)], num_estimators=2)
    with pytest.raises(ValueError, match="empty"):
        deep_ensembles([])


def test_mimo_eval_repeats_the_input(models):
    """Eval: every estimator sees x; row m*B + b = logits[b, m-th class slice] of ResNet(x stacked M times)."""
    model = models["mimo"].eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
        logits = ResNet.forward(model, x.repeat(1, 4, 1, 1))
    torch.testing.assert_close(out, logits.view(B, 4, CLASSES).transpose(0, 1).reshape(4 * B, CLASSES))


def test_mimo_training_takes_m_batches(models):
    model = models["mimo"].train()
    x = _x(4 * B)
    with torch.no_grad():
        out = model(x)
        logits = ResNet.forward(model, x.view(4, B, 3, 16, 16).transpose(0, 1).reshape(B, 12, 16, 16))
    assert out.shape == (4 * B, CLASSES)
    torch.testing.assert_close(out, logits.view(B, 4, CLASSES).transpose(0, 1).reshape(4 * B, CLASSES),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_estimators"):
        model(_x(3))
    model.eval()


def test_batchensemble_repeats_the_batch_in_train_and_eval(models):
    model = models["batchensemble"]
    x = _x()
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            assert model(x).shape == (4 * B, CLASSES)
    model.eval()
    with torch.no_grad():  # eval: the four row blocks are the four estimators on the same images
        out = model(x).view(4, B, CLASSES)
    assert not torch.allclose(out[0], out[1])


def _explicit_conv(layer, x):
    """torch-uncertainty's layout: b = B // M per estimator, the `extra` samples reuse rows 0.. of the expansion."""
    n, m = x.shape[0], layer.num_estimators
    b = n // m
    estimator = [i // b for i in range(m * b)]
    estimator += estimator[:n - m * b]
    rows = []
    for i, e in enumerate(estimator):
        y = F.conv2d(x[i:i + 1] * layer.r_group[e].view(1, -1, 1, 1), layer.conv.weight, None, layer.conv.stride,
                     layer.conv.padding, layer.conv.dilation, layer.conv.groups)
        y = y * layer.s_group[e].view(1, -1, 1, 1)
        if layer.bias is not None:
            y = y + layer.bias[e].view(1, -1, 1, 1)
        rows.append(y)
    return torch.cat(rows)


@pytest.mark.parametrize("batch", [6, 7, 8])
@pytest.mark.parametrize("stride,groups,bias", [(1, 1, True), (2, 2, False)])
def test_batch_conv2d_matches_per_estimator_computation(batch, stride, groups, bias):
    layer = BatchConv2d(4, 6, 3, num_estimators=3, stride=stride, padding=1, groups=groups, bias=bias)
    x = torch.randn(batch, 4, 5, 5)
    expected = _explicit_conv(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.forward_eager(x), expected, rtol=1e-5, atol=1e-5)


def test_batch_conv2d_gradients_match_eager():
    layer = BatchConv2d(4, 6, 3, num_estimators=2, padding=1)
    x = torch.randn(4, 4, 5, 5, requires_grad=True)
    grads = []
    for forward in (layer.forward, layer.forward_eager):
        layer.zero_grad()
        x.grad = None
        (forward(x) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batch_layers_torch_uncertainty_parameters():
    torch.manual_seed(0)
    conv = BatchConv2d(64, 128, 3, num_estimators=4)
    assert sorted(n for n, _ in conv.named_parameters()) == ["bias", "conv.weight", "r_group", "s_group"]
    assert conv.conv.bias is None and conv.r_group.shape == (4, 64) and conv.s_group.shape == (4, 128)
    assert conv.bias.shape == (4, 128)
    rs = torch.cat([conv.r_group.flatten(), conv.s_group.flatten()])
    assert abs(rs.mean().item() - 1.0) < 0.05 and abs(rs.std().item() - 0.5) < 0.05
    bound = 1 / (64 * 9) ** 0.5
    assert conv.bias.abs().max().item() <= bound
    linear = BatchLinear(8, 5, num_estimators=4, bias=False)
    assert sorted(n for n, _ in linear.named_parameters()) == ["linear.weight", "r_group", "s_group"]
    with pytest.raises(ValueError, match="at least 4 samples"):
        conv(torch.randn(3, 64, 4, 4))


@pytest.mark.parametrize("batch", [4, 5])
def test_batch_linear_matches_per_estimator_computation(batch):
    layer = BatchLinear(8, 5, num_estimators=2)
    x = torch.randn(batch, 8)
    b = batch // 2
    estimator = [i // b for i in range(2 * b)]
    estimator += estimator[:batch - 2 * b]
    expected = torch.stack([(x[i] * layer.r_group[e]) @ layer.linear.weight.T * layer.s_group[e] + layer.bias[e]
                            for i, e in enumerate(estimator)])
    torch.testing.assert_close(layer(x), expected)


def test_registry_batches_and_paper_rows():
    assert tuple(TABLE8_MODELS) == NAMES
    x, y = _x(), torch.randint(0, CLASSES, (B,))
    for name in NAMES:
        entry = get_model(name)
        inputs, targets = entry.format_batch(x, y)
        if name == "single":
            assert inputs is x and targets is y
        elif name == "mimo":
            assert inputs.shape == (4 * B, 3, 16, 16) and targets.shape == (4 * B,)
            for i in range(4 * B):  # every copy keeps its label
                j = next(j for j in range(B) if torch.equal(x[j], inputs[i]))
                assert targets[i] == y[j]
        else:
            assert inputs is x and torch.equal(targets, y.repeat(4))
    paper = get_model("pe-2-4-1").paper
    assert (paper.f32_train_s_per_epoch, paper.f32_infer_images_per_s, paper.f16_train_s_per_epoch,
            paper.f16_infer_images_per_s) == (179.50, 1381, 51.20, 3406)
    assert get_model("single").paper.value("infer", "f16") == 5718
    assert "RTX 3090" in paper.source
    with pytest.raises(ValueError, match="unknown Table 8 model"):
        get_model("resnet")


def test_mimo_batch_format_rho():
    x, y = torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6)
    inputs, targets = mimo_batch_format(x, y, num_estimators=3, rho=1.0)
    order = targets.view(3, 6)
    assert torch.equal(order[0], order[1]) and torch.equal(order[0], order[2])  # rho=1: one shared order
    assert sorted(order[0].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="rho"):
        mimo_batch_format(x, y, 3, rho=1.5)


@pytest.mark.parametrize("name", NAMES)
def test_eager_twin_is_stock_pytorch_and_equal(name):
    """Same outputs and running statistics as the fused model; never calls a pe_kernels op."""
    torch.manual_seed(1)
    fused = get_model(name).build(CLASSES)
    twin = eager_twin(fused)
    assert twin.state_dict().keys() == fused.state_dict().keys()
    for training in (True, False):
        fused.train(training)
        twin.train(training)
        x = _x(4 * B if training and name == "mimo" else B)  # MIMO trains on M*B inputs
        with torch.no_grad():
            expected = fused(x)
            with pe_kernels.use_backend("cuda"):  # CPU tensors: any pe_kernels op would raise, GPU or not
                out = twin(x)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)
    for (key, a), b in zip(fused.state_dict().items(), twin.state_dict().values()):
        if "running" in key:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(pe_kernels.BackendUnavailableError), torch.no_grad(), pe_kernels.use_backend("cuda"):
        fused(x)


def test_resnet_builder_parameter_count_of_mimo_core():
    # MIMO is a standard ResNet with 12 inputs and 400 outputs, conv biases on (torch-uncertainty's default)
    assert _num_params(resnet(12, 400, 50, conv_bias=True, style="cifar")) == PEER_PARAMETERS["mimo"]
