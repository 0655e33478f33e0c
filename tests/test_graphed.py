"""The training step as CUDA graphs (gpavatar.train.graphed): on the CPU, that a whole step reads
nothing on the host once value checks are off (what a capture needs) and that the detector finds
what it should; on a GPU, that replayed steps make the eager steps' updates, skip non-finite ones
and capture again when a hyperparameter changes."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from gpavatar.model import GPAvatar
from gpavatar.ops._validation import check_coordinates, checking_values, values_unchecked
from gpavatar.train.graphed import EagerGraphs, GraphedTrainStep, graphs_supported, host_syncs
from gpavatar.train.losses import GPAvatarLoss
from gpavatar.train.trainer import TrainConfig, _TrainStep

SMALL = dict(render_size=8, n_coarse=6, n_fine=6)


def _setup(device: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPAvatar("tiny", **SMALL, **overrides).train()
    loss = GPAvatarLoss(crop_size=32, seed=seed).to(device)
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = dict(images=torch.rand(1, 2, 3, c.image_size, c.image_size, generator=g).to(device),
             points=(torch.rand(1, c.num_points, 3, generator=g) - 0.5).to(device),
             transform=torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -9]]], device=device),
             target=torch.rand(1, 3, c.output_size, c.output_size, generator=g).to(device),
             bbox=torch.tensor([[0.25, 0.2, 0.75, 0.8]], device=device))
    return model, loss, x


# ------------------------------------------------------------------------------ CPU

def test_host_syncs_finds_reads_and_nothing_else():
    t = torch.arange(6.0)
    with host_syncs() as syncs:
        y = (t * 2).sum() + t.mean()
        (t + 1)[t > 2.0]  # boolean mask: nonzero underneath
    assert len(syncs) == 1 and "boolean mask" in syncs[0]
    with host_syncs() as syncs:
        float(y)
        bool(t[0] > 0)
        t.tolist()
        t.nonzero()
    assert [s.split(" at ")[0] for s in syncs] == ["_local_scalar_dense", "_local_scalar_dense", "tolist", "nonzero"]
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the patch is gone


def test_values_unchecked_skips_value_checks_only():
    bad = torch.tensor([[float("nan"), 0.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        check_coordinates(bad, "coords")
    with values_unchecked():
        assert not checking_values()
        check_coordinates(bad, "coords")  # skipped
        with values_unchecked():
            pass
        assert not checking_values()  # nested blocks restore the outer one
    assert checking_values()


@pytest.mark.parametrize("single", [False, True])
def test_a_whole_training_step_reads_nothing_on_the_host(single):
    """forward_train (coin given) + GPAvatarLoss + backward: no host sync once value checks are off
    (the model's input checks are the only reads, and the detector sees them when they run)."""
    model, loss, x = _setup("cpu")
    step = _TrainStep(model)
    g = torch.Generator().manual_seed(1)
    with host_syncs() as checked:
        step(x["images"], x["points"], x["transform"], g, single_source=single)
    assert checked, "the input value checks read on the host: the detector must see them"
    with values_unchecked(), host_syncs() as syncs:
        out = step(x["images"], x["points"], x["transform"], g, single_source=single)
        total = loss(out, x["target"], x["bbox"])["total"]
        total.backward()
    assert syncs == []
    assert out["single_source"] is single


def test_the_coin_drawn_before_the_step_gives_the_same_step():
    model, _, x = _setup("cpu", single_source_prob=0.5)
    outs = []
    for given in (False, True):
        g = torch.Generator().manual_seed(7)
        single = model.draw_single_source(g) if given else None
        outs.append(model.forward_train(x["images"], x["points"], x["transform"], generator=g, single_source=single))
    assert outs[0]["single_source"] == outs[1]["single_source"]
    assert torch.equal(outs[0]["image"], outs[1]["image"])


def test_checkpoints_do_not_read_the_rng_state(monkeypatch):
    """The field and MTA checkpoints draw nothing random: they must not save RNG states (reading
    a CUDA generator's state is refused while a graph is captured)."""
    model, loss, x = _setup("cpu")
    model.nerf_mlp.checkpoint_layers = True

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint read the RNG state")

    monkeypatch.setattr(torch, "get_rng_state", refuse)
    out = model.forward_train(x["images"], x["points"], x["transform"], generator=torch.Generator().manual_seed(0),
                              single_source=False)
    loss(out, x["target"], x["bbox"])["total"].backward()


def test_graphs_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "CUDA" in graphs_supported()
    model, loss, _ = _setup("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedTrainStep(_TrainStep(model), loss, _adam(model), torch.Generator())
    with pytest.raises(ValueError, match="cuda_graph must be a bool"):
        TrainConfig(cuda_graph=1)


def test_stale_stream_override_is_scoped(monkeypatch):
    """The capture's override of stale autograd streams (where torch has it) is on inside the block
    only and restores the process's setting; without the API the block does nothing."""
    from gpavatar.train import graphed

    getter = getattr(torch._C, "_override_stale_capture_stream", None)
    if getter is not None and hasattr(torch.autograd.graph, "set_override_stale_capture_stream"):
        for start in (False, True):
            torch.autograd.graph.set_override_stale_capture_stream(start)
            try:
                with graphed._stale_streams_overridden():
                    assert getter() is True
                assert getter() is start
            finally:
                torch.autograd.graph.set_override_stale_capture_stream(False)
    monkeypatch.delattr(torch.autograd.graph, "set_override_stale_capture_stream", raising=False)
    with graphed._stale_streams_overridden():
        pass


def test_trainer_refuses_cuda_graph_on_the_cpu(tmp_path):
    from gpavatar.train.trainer import Trainer

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="CUDA"):
        Trainer(GPAvatar("tiny", **SMALL), One(), tmp_path, TrainConfig(batch_size=1, cuda_graph=True), device="cpu")


ARGS = ("images", "points", "transform", "target", "bbox")


def _adam(model, lr=1e-4):
    return torch.optim.Adam(model.param_groups(lr), lr=lr, betas=(0.0, 0.99), fused=True, capturable=True)


def _eager_reference(model, loss, x, singles, seed=3):
    """The plain steps GraphedTrainStep stands for (fused capturable Adam, coin given)."""
    opt = _adam(model)
    g = torch.Generator(x["images"].device).manual_seed(seed)
    totals = []
    for single in singles:
        out = model.forward_train(x["images"], x["points"], x["transform"], generator=g, single_source=single)
        total = loss(out, x["target"], x["bbox"])["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        totals.append(total.detach())
    return torch.stack(totals), opt


GRAPH_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def _graphs(device):
    """EagerGraphs on the CPU (everything around the capture, run eagerly), CUDA graphs on a GPU."""
    return EagerGraphs() if device == "cpu" else None


def _same(got, want, device, msg=""):
    if device == "cpu":  # the same ops in the same order: the same bits
        assert torch.equal(got, want), msg
    else:  # the same draws (the generator is registered with the graph); atomics may reorder sums
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=msg)


@pytest.mark.parametrize("device", GRAPH_DEVICES)
def test_graphed_steps_make_the_eager_updates(device):
    """The warm-up steps are undone completely (parameters, Adam's state, the generator), so the
    replayed steps are the eager ones (bit for bit with EagerGraphs); one graph per coin."""
    singles = [False, True, False]
    model, loss, x = _setup(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    want, want_opt = _eager_reference(model, loss, x, singles)
    want_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)
    opt = _adam(model)
    step = GraphedTrainStep(_TrainStep(model), loss, opt, torch.Generator(device).manual_seed(3),
                            graphs=_graphs(device))
    got = torch.stack([step(*(x[k] for k in ARGS), single_source=s)["total"].clone() for s in singles])
    assert step.captures == 2  # one per coin
    _same(got, want, device)
    for k, v in model.state_dict().items():
        _same(v, want_state[k], device, k)
    for p, q in zip(opt.state.values(), want_opt.state.values()):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            _same(p[k], q[k], device, k)


@pytest.mark.parametrize("device", GRAPH_DEVICES)
def test_graphed_step_skips_a_non_finite_update_and_recaptures_on_new_hyperparameters(device):
    model, loss, x = _setup(device)
    opt = _adam(model)
    step = GraphedTrainStep(_TrainStep(model), loss, opt, torch.Generator(device).manual_seed(0),
                            graphs=_graphs(device))
    step(*(x[k] for k in ARGS), single_source=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: t.clone() for k, t in st.items()} for st in opt.state.values()]
    bad = dict(x, target=torch.full_like(x["target"], float("nan")))
    assert not torch.isfinite(step(*(bad[k] for k in ARGS), single_source=False)["total"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for st, kept in zip(opt.state.values(), moments):
        assert all(torch.equal(st[k], kept[k]) for k in kept)
    assert step.captures == 1
    for group in opt.param_groups:
        group["lr"] *= 0.2
    step(*(x[k] for k in ARGS), single_source=False)
    assert step.captures == 2  # baked-in hyperparameters: captured again
    small = {k: x[k] for k in ARGS}
    small["target"] = torch.rand(1, 3, 32, 32, device=device)
    with pytest.raises(ValueError):  # another shape is another graph; this one the loss refuses
        step(*(small[k] for k in ARGS), single_source=False)
    assert step.captures == 2


def test_graphed_step_arguments():
    model, loss, _ = _setup("cpu")
    with pytest.raises(ValueError, match="fused=True, capturable=True"):
        GraphedTrainStep(_TrainStep(model), loss, torch.optim.Adam(model.parameters(), fused=True), torch.Generator())
    with pytest.raises(ValueError, match="amp"):
        GraphedTrainStep(_TrainStep(model), loss, _adam(model), torch.Generator(), amp="fp16", graphs=EagerGraphs())


def test_trainer_graphed_path_logs_what_the_eager_path_logs(tmp_path):
    """Trainer._graphed_step (coin on the host, one replay, scheduler, step count) on the CPU with
    EagerGraphs gives the eager trainer's losses, with the same fused capturable Adam."""
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import make_synthetic_dataset
    from gpavatar.train.trainer import Trainer

    root = tmp_path / "synth"
    make_synthetic_dataset(root, n_identities=2, frames_per_identity=4, size=64, samples=1)
    logs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        data = OfficialDataset(root, "train", n_sources=2, resize=64, flame=dataset_flame(str(root), 5.0), seed=0)
        t = Trainer(GPAvatar("tiny", **SMALL), data, tmp_path / f"run{graphed}",
                    TrainConfig(steps=3, batch_size=2, log_every=1, save_every=10), device="cpu")
        t.optimizer = torch.optim.Adam(t.model.param_groups(1e-4), lr=1e-4, betas=(0.0, 0.99), fused=True,
                                       capturable=True)
        t.scheduler = torch.optim.lr_scheduler.MultiStepLR(t.optimizer, [2], gamma=0.5)
        if graphed:
            t.graphed = GraphedTrainStep(t.step_module, t.loss, t.optimizer, t.generator, graphs=EagerGraphs())
        t.fit(progress=False)
        logs.append((tmp_path / f"run{graphed}" / "log.jsonl").read_text().splitlines())
        if graphed:
            assert t.graphed.captures >= 2  # the lr milestone at step 2 captured again
    drop = lambda line: {k: v for k, v in __import__("json").loads(line).items() if k != "s_per_step"}  # noqa: E731
    assert [drop(a) for a in logs[0]] == [drop(b) for b in logs[1]]


# ------------------------------------------------------------------------------ GPU

@pytest.mark.cuda
@requires_cuda
def test_trainer_with_cuda_graph_trains_saves_and_resumes(tmp_path):
    """The trainer's --cuda-graph path with a DataLoader (pinned memory): steps run from the graphs,
    the loss is finite, a checkpoint saved mid-run resumes (the graphs are captured again)."""
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import make_synthetic_dataset
    from gpavatar.train.trainer import Trainer

    root = tmp_path / "synth"
    make_synthetic_dataset(root, n_identities=2, frames_per_identity=4, size=64, samples=1)

    def make(out, steps):
        torch.manual_seed(0)
        data = OfficialDataset(root, "train", n_sources=2, resize=64, flame=dataset_flame(str(root), 5.0), seed=0)
        config = TrainConfig(steps=steps, batch_size=2, log_every=1, save_every=2, cuda_graph=True)
        return Trainer(GPAvatar("tiny", **SMALL), data, out, config, device="cuda")

    t = make(tmp_path / "run", 3)
    last = t.fit(progress=False)
    assert t.step == 3 and t.graphed.captures >= 1
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    resumed = make(tmp_path / "run", 4)
    assert resumed.load()
    resumed.fit(progress=False)
    assert resumed.step == 4 and resumed.graphed.captures >= 1


def test_a_resumed_trainer_keeps_its_own_adam(tmp_path):
    """A checkpoint of a run with the fused capturable Adam (--cuda-graph) resumes in an eager
    trainer with that trainer's Adam (step counts back on the host), and the other way round."""
    from gpavatar.data.official import OfficialDataset, dataset_flame
    from gpavatar.data.synthetic import make_synthetic_dataset
    from gpavatar.train.trainer import Trainer

    root = tmp_path / "synth"
    make_synthetic_dataset(root, n_identities=2, frames_per_identity=4, size=64, samples=1)
    data = OfficialDataset(root, "train", n_sources=2, resize=64, flame=dataset_flame(str(root), 5.0), seed=0)
    config = TrainConfig(steps=1, batch_size=2, save_every=1)
    first = Trainer(GPAvatar("tiny", **SMALL), data, tmp_path / "a", config, device="cpu")
    first.optimizer = torch.optim.Adam(first.model.param_groups(1e-4), lr=1e-4, fused=True, capturable=True)
    first.scheduler = torch.optim.lr_scheduler.MultiStepLR(first.optimizer, [5])
    first.fit(progress=False)
    eager = Trainer(GPAvatar("tiny", **SMALL), data, tmp_path / "a", TrainConfig(steps=2, batch_size=2), device="cpu")
    assert eager.load()
    group = eager.optimizer.param_groups[0]
    assert group["fused"] and not group["capturable"]  # adam_implementation's eager CPU Adam
    assert all(st["step"].device.type == "cpu" and float(st["step"]) == 1 for st in eager.optimizer.state.values())
    eager.fit(progress=False)
    assert eager.step == 2


def test_held_accumulators_finds_the_nodes_someone_keeps():
    """A parameter's AccumulateGrad node is reported while a tensor holding its graph lives, not
    after a step (nothing of a step outlives it) nor once that tensor is gone; nodes tagged with an
    owner by CudaGraphs.hold_accumulators are left out for that owner."""
    from gpavatar.train.graphed import held_accumulators

    model, loss, x = _setup("cpu")
    named = list(model.named_parameters())
    assert held_accumulators(named) == []
    step = GraphedTrainStep(_TrainStep(model), loss, _adam(model), torch.Generator().manual_seed(0),
                            graphs=EagerGraphs())
    step(*(x[k] for k in ARGS), single_source=False)
    assert held_accumulators(named) == []
    name, p = next((n, p) for n, p in named if p.requires_grad)
    kept = p * 2  # an output that was not detached
    assert held_accumulators(named) == [name]
    del kept
    assert held_accumulators(named) == []
    frozen = [("frozen", torch.zeros(3))]
    assert held_accumulators(frozen) == []


def test_cuda_graphs_hold_the_accumulators_and_refuse_stale_ones(monkeypatch):
    """hold_accumulators (no GPU needed): without torch's stale-stream override, a node kept alive
    from before is a RuntimeError naming the parameter (instead of the capture's CUDA error); with
    it, the capture may go on.  The nodes it makes are held (for the warm-ups and captures) and are
    its own at the next capture."""
    from gpavatar.train import graphed

    model, _, _ = _setup("cpu")
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    graphs = graphed.CudaGraphs()
    graphs.hold_accumulators(named)
    assert len(graphs.accumulators) == len(trainable)
    assert graphed.held_accumulators(named) == trainable  # held by graphs
    assert graphed.held_accumulators(named, graphs.owner) == []
    monkeypatch.delattr(torch.autograd.graph, "set_override_stale_capture_stream", raising=False)
    graphs.hold_accumulators(named)  # its own nodes: fine
    other = graphed.CudaGraphs()
    with pytest.raises(RuntimeError, match=f"accumulators of {trainable[0]}, .* and {len(trainable) - 5} more"):
        other.hold_accumulators(named)
    del graphs
    other.hold_accumulators(named)  # once the old holder is gone
    assert graphed.held_accumulators(named, other.owner) == []
    monkeypatch.setattr(torch.autograd.graph, "set_override_stale_capture_stream", lambda on: None, raising=False)
    monkeypatch.setattr(torch._C, "_override_stale_capture_stream", lambda: False, raising=False)
    graphed.CudaGraphs().hold_accumulators(named)  # torch redirects stale nodes: no error


def test_a_second_hold_keeps_the_held_nodes():
    """A second capture's hold_accumulators reuses the nodes the first one made (they stay referenced
    until the new list is made), so nothing is made again on another stream."""
    from gpavatar.train import graphed

    model, _, _ = _setup("cpu")
    graphs = graphed.CudaGraphs()
    graphs.hold_accumulators(model.named_parameters())
    first = list(graphs.accumulators)
    graphs.hold_accumulators(model.named_parameters())
    assert len(first) > 0 and all(a is b for a, b in zip(first, graphs.accumulators))
