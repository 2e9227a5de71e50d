"""Probes: exact feature-reuse matrices, gradient-flow coverage, FLOPs against torchvision's
published figures, and end-to-end runs logged to MLflow."""

from __future__ import annotations

import copy
import io
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from densenet_exp import record
from densenet_exp.analysis import results
from densenet_exp.measures import gradients
from densenet_exp.training.classifier import ImageClassifier
from densenet_exp.models import CifarResNet, DenseNet, build_model, densenet121
from densenet_exp.probes import (
    PROBES,
    ConvergenceProbe,
    FeatureReuseProbe,
    GradientFlowProbe,
    SizeCostProbe,
    build_probes,
    count_flops,
    count_parameters,
    feature_reuse,
    feature_reuse_summary,
    gradient_flow,
)

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

CONF = Path(__file__).resolve().parents[1] / "conf" / "probes"
MODELS = CONF.parent / "model"
ALL_ON = {name: True for name in PROBES} | {"size_cost_infer_repeats": 2}
SIZE_COST_KEYS = {
    "params",
    "macs_per_image",
    "flops_per_image",
    "peak_memory_mb",
    "memory/activations_mb",
    "memory/train_step_mb",
    "train_images_per_s",
    "infer_images_per_s",
    "epoch_time_s",
}
GRADIENT_KEYS = {f"grad/{what}_{phase}" for what in ("early_rel", "early_over_late") for phase in ("init", "epoch1")}
GRADIENT_ARTIFACTS = {"gradient_flow/relative_grads.csv", "gradient_flow/relative_grads.png"}
REUSE_ARTIFACTS = {"feature_reuse/heatmap.png", "feature_reuse/matrices.json", "feature_reuse/matrices_init.json"}
REUSE_KEYS = {
    "reuse_early_share",
    "reuse_transition_on_block_input",
    "reuse_on_transition_output",
    "reuse_classifier_late_share",
}
CONVERGENCE_KEYS = {f"{what}_to_{pct}pct" for what in ("epochs", "seconds") for pct in (50, 90, 95, 99)}
PROBE_KEYS = SIZE_COST_KEYS | GRADIENT_KEYS | REUSE_KEYS | CONVERGENCE_KEYS


def tiny_densenet(bottleneck: bool = True) -> DenseNet:
    # Block 1: input 4 maps, layers read 4, 6; transition reads 8 -> 4. Block 2: layers read 4, 6, 8;
    # the classifier reads 10.
    return DenseNet(
        growth_rate=2,
        block_config=(2, 3),
        num_init_features=4,
        bn_size=2,
        bottleneck=bottleneck,
        stem="cifar",
        num_classes=3,
        in_channels=1,
    )


def TinyClassifier(model: nn.Module, lr: float = 0.05) -> ImageClassifier:
    """The harness's own LightningModule around a tiny model."""
    return ImageClassifier(model, num_classes=model_outputs(model), optim={"name": "sgd", "lr": lr, "momentum": 0.0,
                                                                                 "nesterov": False, "weight_decay": 0.0,
                                                                                 "scheduler": "constant"})


def model_outputs(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    return DataLoader(data, batch_size=4)


def fit(model: nn.Module, callbacks: list, logger, root: Path, lr: float = 0.05) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(TinyClassifier(model, lr), loader(), loader())
    return trainer


# ---------------------------------------------------------------- feature reuse, by hand


def set_weights_to_minus_channel_index(model: DenseNet) -> None:
    """Every weight reading input map c is -(c + 1): the L1 norm per map is (c + 1) times the
    number of weights reading it (outputs x kernel taps)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                channel = torch.arange(1, m.weight.shape[1] + 1, dtype=m.weight.dtype)
                m.weight.copy_(-channel.view(1, -1, *[1] * (m.weight.dim() - 2)).expand_as(m.weight))


@pytest.mark.parametrize("bottleneck", [True, False])
def test_feature_reuse_matches_hand_computation(bottleneck):
    model = tiny_densenet(bottleneck)
    set_weights_to_minus_channel_index(model)
    # Weights per input map: first conv 1x1 with bn_size*k = 4 outputs, or 3x3 with k = 2
    # outputs; transition 1x1 with 4 outputs; classifier 3 outputs.
    layer = 4 if bottleneck else 2 * 9
    transition, classifier = 4, 3
    nan = math.nan
    # Mean of (c + 1) over a source's maps: block input 0..3 -> 2.5; then 4..5 -> 5.5;
    # 6..7 -> 7.5; 8..9 -> 9.5.
    block1 = [
        [2.5 * layer, 2.5 * layer, 2.5 * transition],
        [nan, 5.5 * layer, 5.5 * transition],
        [nan, nan, 7.5 * transition],
    ]
    block2 = [
        [2.5 * layer, 2.5 * layer, 2.5 * layer, 2.5 * classifier],
        [nan, 5.5 * layer, 5.5 * layer, 5.5 * classifier],
        [nan, nan, 7.5 * layer, 7.5 * classifier],
        [nan, nan, nan, 9.5 * classifier],
    ]
    matrices = feature_reuse(model)
    assert [m.shape for m in matrices] == [(3, 3), (4, 4)]
    np.testing.assert_allclose(matrices[0], block1, equal_nan=True)
    np.testing.assert_allclose(matrices[1], block2, equal_nan=True)

    summary = feature_reuse_summary(matrices)
    # Last layers: block 1 layer 2 reads 2.5 and 5.5 (per `layer`), block 2 layer 3 reads 2.5, 5.5, 7.5.
    assert summary["reuse_early_share"] == pytest.approx((2.5 / 8 + 2.5 / 15.5) / 2)
    assert summary["reuse_transition_on_block_input"] == pytest.approx(2.5 / 15.5)
    assert summary["reuse_on_transition_output"] == pytest.approx((2.5 / 8 + 2.5 / 15.5) / 2)
    # Later half of block 2's four sources: the outputs of layers 2 and 3.
    assert summary["reuse_classifier_late_share"] == pytest.approx((7.5 + 9.5) / 25)


def test_feature_reuse_takes_abs_and_each_output_into_account():
    model = tiny_densenet()
    set_weights_to_minus_channel_index(model)
    with torch.no_grad():
        model.features.denseblock1.denselayer2.conv1.weight[0, 4:6] = 3.0  # was -5, -6 in output 0
    # Source 1 of layer 2: maps 4 and 5 have L1 norms 3 + 3 * 5 and 3 + 3 * 6 over 4 outputs.
    assert feature_reuse(model)[0][1, 1] == pytest.approx((18 + 21) / 2)


def assert_same_matrices(got, expected) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)  # exactly, NaN where a source cannot feed a target


def test_feature_reuse_probe_records_the_matrices_before_the_first_update(tmp_path):
    model = tiny_densenet()
    before = feature_reuse(copy.deepcopy(model))
    probe = FeatureReuseProbe()
    fit(model, [probe], logger=False, root=tmp_path)  # 6 SGD steps
    assert_same_matrices(probe.init, before)
    assert not np.allclose(feature_reuse(model)[0], before[0], equal_nan=True)  # training moved the weights


def test_with_a_zero_learning_rate_the_trained_and_init_matrices_are_identical(tmp_path):
    model = tiny_densenet()
    probe = FeatureReuseProbe()
    fit(model, [probe], logger=False, root=tmp_path, lr=0.0)  # steps run, no weight moves
    assert_same_matrices(feature_reuse(model), probe.init)


def test_init_matrices_survive_a_checkpoint_and_a_resumed_run_never_records_trained_weights_as_init():
    model = tiny_densenet()
    probe = FeatureReuseProbe()
    probe.on_train_start(SimpleNamespace(global_step=0), SimpleNamespace(model=model))
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)  # as Lightning keeps a callback's state in a checkpoint
    restored = FeatureReuseProbe()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert_same_matrices(restored.init, probe.init)
    # Resumed after step 4 from a checkpoint without init matrices: none, rather than trained ones.
    late = FeatureReuseProbe()
    late.on_train_start(SimpleNamespace(global_step=4), SimpleNamespace(model=model))
    assert late.init is None


# ---------------------------------------------------------------- gradient flow, FLOPs, config


def test_gradient_flow_records_every_layer_at_init_and_after_epoch_one(tmp_path):
    model = tiny_densenet()
    probe = GradientFlowProbe()
    fit(model, [probe], logger=False, root=tmp_path)  # 2 epochs of 3 steps
    table = probe.table()
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert table.groupby("phase")["step"].first().to_dict() == {"init": 0, "epoch1": 3}
    for _, records in table.groupby("phase"):
        assert records.layer.tolist() == expected
        assert records.depth.tolist() == list(range(len(expected)))
        assert records.relative_depth.iloc[0] == 0 and records.relative_depth.iloc[-1] == 1
    assert table.kind.iloc[-1] == "Linear" and table.layer.iloc[-1] == "classifier"
    assert (table.grad_norm > 0).all()
    np.testing.assert_allclose(table.relative_grad, table.grad_norm / table.weight_norm)
    layer = ["bottleneck", "body"]  # DenseNet-B: a 1x1 then a 3x3 conv per dense layer
    assert table[table.phase == "init"].role.tolist() == ["stem", *layer * 2, "transition", *layer * 3, "classifier"]
    summary = gradient_flow.summarize(table)
    # Five body convs (the 3x3 of each dense layer) at positions 0, 1/4, 1/2, 3/4, 1: the first two are
    # early, the last two late; stem, bottlenecks, transition and classifier take no part.
    body = table[(table.phase == "init") & (table.layer.str.endswith("conv2"))].relative_grad.to_numpy()
    assert len(body) == 5
    assert summary["grad/early_rel_init"] == pytest.approx(body[:2].mean())
    assert summary["grad/early_over_late_init"] == pytest.approx(body[:2].mean() / body[3:].mean())


def test_gradient_flow_of_a_deep_plain_net_is_distorted_by_orders_of_magnitude_at_initialization():
    """The paper's premise, on real models at initialization: in a 110-layer net without shortcuts
    the early layers' relative gradient is orders of magnitude away from the late layers'. With
    batch norm it explodes rather than vanishes (cf. Yang et al. 2019, "A mean field theory of
    batch normalization"); a DenseNet's and a ResNet's stay within an order of magnitude."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    decades = {}
    for name in ("plain110", "resnet110", "densenet_small"):
        cfg = OmegaConf.to_container(OmegaConf.load(MODELS / f"{name}.yaml"))
        model = build_model({**cfg, "in_channels": 1, "num_classes": 10} | ({"stem": "cifar"} if "stem" in cfg else {}))
        nn.functional.cross_entropy(model(x), y).backward()
        table = gradient_flow.relative_gradients(gradient_flow.weighted_layers(model), "init", 0)
        decades[name] = abs(math.log10(gradient_flow.summarize(table)["grad/early_over_late_init"]))
    assert decades["plain110"] > 3
    assert decades["densenet_small"] < 1 and decades["resnet110"] < 1


# Each model family of densenet_exp.models: what its layers are (stem, body, bottleneck, transition,
# shortcut, classifier), counted by hand from the architecture.
ROLE_MODELS = {
    "DenseNet-B (blocks 2, 3)": (lambda: tiny_densenet(True),
                                 {"stem": 1, "bottleneck": 5, "body": 5, "transition": 1, "classifier": 1}),
    "DenseNet (blocks 2, 3)": (lambda: tiny_densenet(False), {"stem": 1, "body": 5, "transition": 1, "classifier": 1}),
    "densenet_cifar L=10": (lambda: build_model({"arch": "densenet_cifar", "depth": 10, "growth_rate": 2}),
                            {"stem": 1, "bottleneck": 3, "body": 3, "transition": 2, "classifier": 1}),
    "densenet121": (densenet121, {"stem": 1, "bottleneck": 58, "body": 58, "transition": 3, "classifier": 1}),
    "resnet_cifar 8": (lambda: build_model({"arch": "resnet_cifar", "depth": 8}),
                       {"stem": 1, "body": 6, "classifier": 1}),
    "plain_cifar 8": (lambda: build_model({"arch": "plain_cifar", "depth": 8}),
                      {"stem": 1, "body": 6, "classifier": 1}),
    "resnet18 (cifar stem)": (lambda: build_model({"arch": "resnet18", "num_classes": 3, "stem": "cifar"}),
                              {"stem": 1, "body": 16, "shortcut": 3, "classifier": 1}),
    "resnet50": (lambda: build_model({"arch": "resnet50", "num_classes": 3}),
                 {"stem": 1, "bottleneck": 32, "body": 16, "shortcut": 4, "classifier": 1}),
}


@pytest.fixture(scope="module", params=list(ROLE_MODELS))
def model_with_roles(request):
    build, counts = ROLE_MODELS[request.param]
    model = build()
    return model, gradient_flow.weighted_layers(model), counts


def test_every_layer_of_each_model_family_has_exactly_one_role_and_the_body_is_its_3x3_convs(model_with_roles):
    model, layers, counts = model_with_roles
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m for _, m, _ in layers] == weighted  # each layer once, in forward order
    assert Counter(role for _, _, role in layers) == counts
    assert {role for _, _, role in layers} <= set(record.LAYER_ROLES)
    assert layers[0][2] == "stem" and layers[-1][2] == "classifier"
    for name, module, role in layers:
        if role == record.BODY_ROLE:
            assert module.kernel_size == (3, 3), name
        if role in ("bottleneck", "transition", "shortcut"):
            assert module.kernel_size == (1, 1), name


def test_roles_read_from_layer_names_agree_with_the_module_structure(model_with_roles):
    """Files written before the probe recorded roles get theirs from the names (results.py, no torch)."""
    _, layers, _ = model_with_roles
    names, kinds = [n for n, _, _ in layers], [type(m).__name__ for _, m, _ in layers]
    assert gradients.roles_from_layer_names(names, kinds) == [role for _, _, role in layers]


def test_a_conv_no_rule_covers_is_named_rather_than_guessed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(gradient_flow.UnknownLayerRole, match=r"^1: a conv outside every block"):
        gradient_flow.layer_roles(model)


def test_old_rows_get_roles_and_the_summary_compares_the_body_convs_only():
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=3, in_channels=1)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4) % 3).backward()
    table = gradient_flow.relative_gradients(gradient_flow.weighted_layers(model), "init", 0)
    old = table.drop(columns="role")  # as relative_grads.csv was written before roles
    pd.testing.assert_frame_equal(gradients.assign_roles(old)[list(record.RELATIVE_GRADS_COLUMNS)], table,
                                  check_dtype=False)
    body = gradients.body_layers(old)
    assert body["layer"].tolist() == [n for n in table["layer"] if n.startswith("layer")]  # 6 convs of 3 blocks
    assert body["body_depth"].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1])
    grads = body["relative_grad"].to_numpy()
    summary = gradient_flow.summarize(table)  # the probe's scalars: positions <= 0.25 and >= 0.75
    assert summary == gradients.body_gradient_summary(old)
    assert summary["grad/early_rel_init"] == pytest.approx(grads[:2].mean())
    assert summary["grad/early_over_late_init"] == pytest.approx(grads[:2].mean() / grads[-2:].mean())


def test_flops_match_torchvision_published_macs():
    # torchvision's model docs: densenet121 2.83 GMACs, resnet50 4.09 GMACs at 224x224.
    densenet = count_flops(densenet121(), (3, 224, 224))
    assert densenet["flops"] == 2 * densenet["macs"]
    assert densenet["macs"] / 1e9 == pytest.approx(2.83, rel=0.02)
    assert count_flops(torchvision.models.resnet50(), (1, 3, 224, 224))["macs"] / 1e9 == pytest.approx(4.09, rel=0.02)
    assert count_parameters(densenet121()) == 7_978_856


def test_count_flops_restores_module_modes():
    model = tiny_densenet().train()
    model.features.norm3.eval()  # e.g. a frozen BN
    count_flops(model, (1, 8, 8))
    assert model.training and model.features.denseblock1.training and not model.features.norm3.training


def test_build_probes_from_config_group():
    built = {name: build_probes(OmegaConf.load(CONF / f"{name}.yaml")) for name in ("all", "default", "none")}
    assert [type(p) for p in built["all"]] == [SizeCostProbe, GradientFlowProbe, FeatureReuseProbe, ConvergenceProbe]
    assert len(built["default"]) == 4 and built["none"] == []
    assert build_probes(None) == [] and build_probes({}) == []
    (probe,) = build_probes({"size_cost": True, "size_cost_warmup_steps": 7, "gradient_flow": False})
    assert isinstance(probe, SizeCostProbe) and probe.warmup_steps == 7


def test_build_probes_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"probes\.gradient_flow_every=50 .*size_cost_warmup_steps"):
        build_probes({"gradient_flow": True, "gradient_flow_every": 50})
    with pytest.raises(ValueError, match=r"probes\.size_cost='yes'"):
        build_probes({"size_cost": "yes"})
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        build_probes({"size_cost": True, "size_cost_warmup_steps": -1})


# ---------------------------------------------------------------- end to end, through MLflow


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return root, f"sqlite:///{root}/mlflow.db"


def run_logged(model: nn.Module, probes_cfg: dict, tracking, tmp_path) -> tuple[mlflow.MlflowClient, str]:
    root, uri = tracking
    logger = MLFlowLogger(experiment_name="t", tracking_uri=uri, artifact_location=str(root / "artifacts"))
    fit(model, build_probes(probes_cfg), logger, tmp_path)
    return mlflow.MlflowClient(uri), logger.run_id


def artifacts(client: mlflow.MlflowClient, run_id: str) -> set[str]:
    return {f.path for top in client.list_artifacts(run_id) for f in client.list_artifacts(run_id, top.path)}


def test_densenet_run_logs_every_probe(tracking, tmp_path):
    model = tiny_densenet()
    before = feature_reuse(copy.deepcopy(model))
    client, run_id = run_logged(model, ALL_ON, tracking, tmp_path)
    metrics = client.get_run(run_id).data.metrics
    assert PROBE_KEYS <= metrics.keys()
    assert metrics["params"] == count_parameters(model)
    assert metrics["macs_per_image"] == count_flops(model, (1, 8, 8))["macs"] > 0
    assert metrics["epochs_to_99pct"] <= 2 and metrics["seconds_to_99pct"] > 0
    assert len(client.get_metric_history(run_id, "epoch_time_s")) == 2
    assert artifacts(client, run_id) == GRADIENT_ARTIFACTS | REUSE_ARTIFACTS
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "downloaded")))
    table = pd.read_csv(local / "gradient_flow" / "relative_grads.csv")
    assert list(table.columns) == list(record.RELATIVE_GRADS_COLUMNS)
    assert table.phase.unique().tolist() == ["init", "epoch1"]
    assert set(table.role) == {"stem", "bottleneck", "body", "transition", "classifier"}
    saved = json.loads((local / "feature_reuse" / "matrices.json").read_text())
    np.testing.assert_allclose(np.array(saved[1], dtype=float), feature_reuse(model)[1], equal_nan=True)
    assert saved[0][2][0] is None  # layer 1 cannot read layer 2
    at_init = json.loads((local / "feature_reuse" / "matrices_init.json").read_text())
    for block, expected in zip(at_init, before):
        np.testing.assert_array_equal(np.array(block, dtype=float), expected)


def test_probes_off_log_none_of_their_keys(tracking, tmp_path):
    client, run_id = run_logged(tiny_densenet(), dict.fromkeys(PROBES, False), tracking, tmp_path)
    metrics = client.get_run(run_id).data.metrics
    assert "val/acc" in metrics and not PROBE_KEYS & metrics.keys()
    assert artifacts(client, run_id) == set()


def test_resnet_run_logs_size_cost_and_gradients_but_no_feature_reuse(tracking, tmp_path):
    client, run_id = run_logged(CifarResNet(8, num_classes=3, in_channels=1), ALL_ON, tracking, tmp_path)
    metrics = client.get_run(run_id).data.metrics
    assert SIZE_COST_KEYS | GRADIENT_KEYS | CONVERGENCE_KEYS <= metrics.keys()
    assert not REUSE_KEYS & metrics.keys()
    assert artifacts(client, run_id) == GRADIENT_ARTIFACTS


@pytest.mark.slow  # a process of the harness (start-up of torch, Lightning and MLflow): about 20 s
def test_a_tiny_densenet_run_of_the_harness_logs_both_matrices_and_layer_roles(store, tmp_path):
    result = store.run("experiment=smoke", "data=synthetic", "trainer.max_epochs=1", "data.train_size=64",
                       "data.val_size=32", "data.test_size=32", "data.batch_size=16", "probes=none",
                       "probes.gradient_flow=true", "probes.feature_reuse=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    client = store.client()
    assert artifacts(client, run.info.run_id) >= {record.RELATIVE_GRADS, record.FEATURE_REUSE_MATRICES,
                                                  record.FEATURE_REUSE_MATRICES_INIT}
    uri_runs = pd.DataFrame({"run_id": [run.info.run_id]})
    trained = results.feature_reuse_matrices(uri_runs, store.uri)[run.info.run_id]
    init = results.feature_reuse_matrices(uri_runs, store.uri, record.FEATURE_REUSE_MATRICES_INIT)[run.info.run_id]
    assert [m.shape for m in init] == [m.shape for m in trained] == [(3, 3)] * 3  # densenet_tiny: blocks of 2
    assert not np.allclose(init[0], trained[0], equal_nan=True)
    local = client.download_artifacts(run.info.run_id, record.RELATIVE_GRADS, str(tmp_path))
    table = pd.read_csv(local)
    assert list(table.columns) == list(record.RELATIVE_GRADS_COLUMNS) and table["role"].notna().all()
    assert (table["role"] == record.BODY_ROLE).sum() == 6  # one 3x3 conv per dense layer, phase init only


# ---------------------------------------------------------------- training-step memory


class Recorder(L.pytorch.loggers.Logger):
    """A logger that keeps every metric it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def saved_bytes_of_one_forward(model: nn.Module, batch_size: int) -> int:
    """Bytes saved for backward by one training forward and loss, each storage once, parameters
    excluded: what SizeCostProbe must report as activations, computed outside Lightning."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, y = next(iter(loader()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(TinyClassifier(model).train()(x[:batch_size]), y[:batch_size])
    del loss
    return sum(storages.values())


def test_train_step_memory_is_saved_tensors_plus_model_state_whatever_ran_before(tmp_path):
    """Three jobs in one process: the same model reads the same figure first and third, and it
    matches saved_tensors_hooks bytes plus parameters, gradients and SGD's momentum-free state."""
    figures = []
    for model in (tiny_densenet(), CifarResNet(8, num_classes=3, in_channels=1), tiny_densenet()):
        recorder = Recorder()
        fit(model, [SizeCostProbe(warmup_steps=0, infer_repeats=1)], recorder, tmp_path)
        figures.append(recorder.metrics)
    assert figures[0]["memory/train_step_mb"] == figures[2]["memory/train_step_mb"]
    assert figures[0]["memory/train_step_mb"] != figures[1]["memory/train_step_mb"]
    model = tiny_densenet()
    expected_saved = saved_bytes_of_one_forward(model, batch_size=4)
    param_bytes = sum(p.nbytes for p in model.parameters())
    mib = 2**20
    assert figures[0]["memory/activations_mb"] == pytest.approx(expected_saved / mib, rel=0.01)
    # SGD without momentum keeps no state: parameters + gradients.
    assert figures[0]["memory/train_step_mb"] == pytest.approx((expected_saved + 2 * param_bytes) / mib, rel=0.01)
    # Each implementation on copies: the plain one is the step this run trained (the loss aside);
    # memory-efficient mode saves less; a ResNet has one implementation.
    assert figures[0]["memory/train_step_mb_plain"] == pytest.approx(figures[0]["memory/train_step_mb"], rel=0.01)
    assert figures[0]["memory/train_step_mb_memory_efficient"] < 0.9 * figures[0]["memory/train_step_mb_plain"]
    assert "memory/train_step_mb_memory_efficient" not in figures[1] and "memory/train_step_mb_plain" in figures[1]


def test_train_step_memory_counts_optimizer_state(tmp_path):
    recorders = []
    for momentum in (0.0, 0.9):
        model, recorder = tiny_densenet(), Recorder()
        trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=recorder,
                            callbacks=[SizeCostProbe(warmup_steps=0, infer_repeats=1)], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            default_root_dir=tmp_path)
        optim = {"name": "sgd", "lr": 0.05, "momentum": momentum, "nesterov": False, "weight_decay": 0.0,
                 "scheduler": "constant"}
        module = ImageClassifier(model, num_classes=3, optim=optim)
        trainer.fit(module, loader())
        recorders.append(recorder.metrics)
    # A momentum buffer per parameter: exactly the parameters' bytes more.
    param_mb = sum(p.nbytes for p in tiny_densenet().parameters()) / 2**20
    assert recorders[1]["memory/train_step_mb"] - recorders[0]["memory/train_step_mb"] == pytest.approx(param_mb)
