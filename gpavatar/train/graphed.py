"""A training step replayed from CUDA graphs, and a detector of host syncs.

Eager, a training step of the paper preset launches a few thousand kernels, each paying Python,
dispatcher and launch costs on the host; where the host is slower than the device, the device
waits.  :class:`GraphedTrainStep` captures the whole step -- ``forward_train`` -> loss ->
``backward`` -> Adam -- as one CUDA graph per branch of the step's coin (all sources with MTA /
first source only) and replays it: one launch per step.

What makes the step capturable (nothing in it reads a tensor on the host):

* the coin is drawn before the replay (:meth:`GPAvatar.draw_single_source`, from the same
  generator as ``forward_train``: the same draws as the eager step) and picks the graph;
* value checks are skipped while a stream is captured (``ops._validation.checking_values``);
* the face-box crop of the loss is a fixed-shape linear map (``losses.crop_box``);
* checkpoints do not save RNG states (``recompute.deterministic_checkpoint``);
* the random draws of the step (sampling jitter, StyleGAN noise) come from ``generator``, which
  is registered with each graph: a replay advances it as the eager step would;
* Adam is fused and capturable (``torch.optim.Adam(..., fused=True, capturable=True)``: its step
  counts live on the device); a non-finite loss sets its ``found_inf``
  inside the graph, so the update is skipped (the parameters, moments and step counts stay) and
  the caller raises after the replay, as the eager trainer raises before its update.

Before a capture, ``warmup`` eager steps run on a side stream (cuDNN / Triton autotuning, Adam's
state) and everything they changed is put back (parameters and buffers, Adam's state, the
generator), so a graphed run makes the same updates as an eager one with a fused Adam, up to float
rounding.  Hyperparameters are baked into a graph: when a group's lr, betas, eps or weight decay
changes (a scheduler milestone, a resumed run), the graphs are captured again.  Inputs of another
shape get their own graph.  Single process only (DDP's hooks are not captured).

:func:`host_syncs` lists the operations of a block that read device values on the host (what a
capture refuses); the tests run it on the CPU over a whole step.

Each parameter's AccumulateGrad node is made on the capture stream and held
(:meth:`CudaGraphs.hold_accumulators`), after :func:`held_accumulators` checked that nothing else
keeps an older one alive (it would run on its own stream and break the capture).

Status: everything around the capture is tested on the CPU (:class:`EagerGraphs`: replayed steps
equal eager steps bit for bit).  The CUDA capture failed in its one GPU run so far (an H100, torch
2.11: a stale AccumulateGrad node, see above); the changes since are untested on a GPU:
``tests/test_graphed.py``'s CUDA cases and bench_train's ``+graph`` rows are the check.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpavatar.ops._validation import values_unchecked

__all__ = ["GraphedTrainStep", "CudaGraphs", "EagerGraphs", "host_syncs", "graphs_supported", "held_accumulators"]

# Operators that read a tensor's values on the host (or whose output shape depends on them).
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                      "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose", "repeat_interleave"})
INPUT_NAMES = ("images", "points", "transform", "target", "bbox")


def _caller() -> str:
    """file:line of the innermost gpavatar frame (outside this module) on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "gpavatar" in frame.filename and not frame.filename.endswith("graphed.py"):
            return f"{frame.filename.rsplit('gpavatar', 1)[-1].lstrip('/')}:{frame.lineno}"
    return "?"


class _SyncRecorder(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.found.append(f"{name} at {_caller()}")
        elif name in ("lift_fresh", "lift_fresh_copy"):
            # torch.tensor(data) / new_tensor: on a GPU, a copy from pageable host memory that
            # synchronizes the stream (refused while a graph is captured)
            self.found.append(f"tensor from host data at {_caller()}")
        elif name == "index" and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.found.append(f"index by a boolean mask at {_caller()}")
        elif name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device") or args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.found.append(f"copy to the host at {_caller()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs() -> Iterator[list[str]]:
    """Records, in the list it yields, each operation of the block that needs a tensor's values on
    the host (``item``, ``bool(t)``, ``tolist``, ``nonzero``, boolean-mask indexing, copies from a
    device to the CPU, ...) or makes a tensor from host data (``torch.tensor(...)``: a synchronous
    copy to a GPU), as ``"name at file:line"``.  On the CPU it finds the same calls that
    would sync on a GPU (except device-to-host copies, which it sees only there)."""
    found: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str, method):
        def recorded(self, *args, **kwargs):
            found.append(f"{name} at {_caller()}")
            return method(self, *args, **kwargs)
        return recorded

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        with _SyncRecorder(found):
            yield found
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def graphs_supported() -> Optional[str]:
    """None when this torch and machine can capture a training step, else why not."""
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register a generator with a CUDA graph (torch >= 2.6 can)"
    return None


class _Captured:
    def __init__(self, replay: Callable[[], dict[str, torch.Tensor]], inputs: dict[str, torch.Tensor],
                 grads: list[torch.Tensor]):
        # The graphs share one memory pool and replay in any order: what a graph writes and later
        # reads within a replay is its own; its gradients are held here so that a later capture
        # (which first sets .grad to None) cannot take their memory.
        self.replay, self.inputs, self.grads = replay, inputs, grads


def _stale_override_available() -> bool:
    """Whether this torch can redirect stale autograd streams into a capture (newer than 2.11)."""
    return hasattr(torch.autograd.graph, "set_override_stale_capture_stream") and hasattr(
        torch._C, "_override_stale_capture_stream")


@contextlib.contextmanager
def _stale_streams_overridden() -> Iterator[None]:
    """Where torch has it (``torch.autograd.graph.set_override_stale_capture_stream``, newer than
    2.11), autograd nodes holding a non-capturing stream from before a capture run on the capture's
    stream inside the block instead of failing it; elsewhere nothing.  The process's setting is
    restored."""
    if not _stale_override_available():
        yield
        return
    setter = torch.autograd.graph.set_override_stale_capture_stream
    saved = bool(torch._C._override_stale_capture_stream())
    setter(True)
    try:
        yield
    finally:
        setter(saved)


def _accumulator(p: torch.Tensor):
    """The AccumulateGrad node of leaf p (made now, on the current stream, if none is alive)."""
    with torch.enable_grad():
        return p.view_as(p).grad_fn.next_functions[0][0]


_PROBE, _OWNER = "gpavatar_probe", "gpavatar_capture_owner"


def held_accumulators(named: Iterable[tuple[str, torch.Tensor]], owner: Optional[object] = None) -> list[str]:
    """The names of the parameters whose AccumulateGrad node something keeps alive (a tensor of an
    earlier step still holding its autograd graph, a DDP reducer, ...), except nodes tagged with
    ``owner`` by :meth:`CudaGraphs.hold_accumulators`.  Autograd runs such a node on the stream it
    was made on, so one made outside the capture stream breaks a capture.  Found by tagging each
    node, dropping this function's references and looking again: a node nobody else held is made
    anew without the tag."""
    params = [(name, p) for name, p in named if p.requires_grad and p.is_leaf]
    token = object()
    for _, p in params:
        _accumulator(p).metadata[_PROBE] = token
    gc.collect()
    held = []
    for name, p in params:
        metadata = _accumulator(p).metadata
        if metadata.pop(_PROBE, None) is token and (owner is None or metadata.get(_OWNER) is not owner):
            held.append(name)
    return held


class CudaGraphs:
    """How :class:`GraphedTrainStep` warms up and captures on a GPU: warm-up steps on a side
    stream, then ``fn`` captured into a CUDA graph (one memory pool per instance, shared by its
    graphs) with ``generator`` registered; the replay returns the graph's static outputs.
    (:class:`EagerGraphs` is the same protocol without a GPU, for tests.)"""

    def __init__(self):
        self.pool = None
        self.stream: Optional[torch.cuda.Stream] = None  # the warm-ups' and the captures' stream
        self.owner = object()  # the tag of the AccumulateGrad nodes this instance holds
        self.accumulators: list = []

    def hold_accumulators(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Called on the capture stream before the warm-ups: makes and holds each parameter's
        AccumulateGrad node there (so the warm-ups and captures use nodes of this stream, as DDP's
        reducer holds its own), after checking that no node made elsewhere is kept alive by someone
        else.  Such a node would run on its own stream inside the capture and fail it ("operation
        would make the legacy stream depend on a capturing blocking stream"); torch newer than 2.11
        redirects it (``set_override_stale_capture_stream``, on during captures), older ones get a
        RuntimeError naming the parameters instead of that CUDA error."""
        named = [(name, p) for name, p in named if p.requires_grad and p.is_leaf]
        stale = held_accumulators(named, self.owner)
        if stale and not _stale_override_available():
            shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            raise RuntimeError(
                f"cannot capture the training step in a CUDA graph: the gradient accumulators of {shown} are "
                "kept alive from before (most often by a tensor of an earlier step that still holds its autograd "
                "graph: a loss or an output that was not detached; or by DDP), and autograd would run them on the "
                f"stream they were made on (torch {torch.__version__} cannot redirect them into a capture).  Drop "
                "those references (or detach them) before the first graphed step")
        # the held nodes stay referenced until the new list is made: a second capture reuses them
        nodes = [_accumulator(p) for _, p in named]
        for node in nodes:
            node.metadata[_OWNER] = self.owner
        self.accumulators = nodes

    @contextlib.contextmanager
    def warmup_stream(self, device: torch.device) -> Iterator[None]:
        # Autograd runs each parameter's AccumulateGrad on the stream it was made on; one that outlives
        # its step (the last H100 run's captures failed on such a node: "operation would make the legacy
        # stream depend on a capturing blocking stream") must not tie another stream into the capture.
        # So the garbage of earlier steps is collected first, the warm-ups run on the stream the
        # captures use, and GraphedTrainStep has hold_accumulators make and hold the nodes there.
        gc.collect()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            torch.cuda.current_stream(device).wait_stream(side)

    def capture(self, fn: Callable[[], dict[str, torch.Tensor]], generator: torch.Generator
                ) -> Callable[[], dict[str, torch.Tensor]]:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        before = generator.get_state()
        gc.collect()  # the warm-ups' graphs caught in reference cycles (torch no longer collects here)
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory meanwhile
        with _stale_streams_overridden(), \
                torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        generator.set_state(before)  # a capture runs nothing: the first replay draws what eager would

        def replay() -> dict[str, torch.Tensor]:
            graph.replay()
            return out

        return replay


class EagerGraphs:
    """The :class:`CudaGraphs` protocol run eagerly: "capturing" records ``fn`` and each replay
    calls it.  It exercises everything around the capture (warm-up and its undoing, one graph per
    coin and shape, recapture on new hyperparameters, the skipped update) on any device."""

    def warmup_stream(self, device: torch.device):
        return contextlib.nullcontext()

    def hold_accumulators(self, named) -> None:
        pass

    def capture(self, fn, generator):
        return fn


class GraphedTrainStep:
    """Replays ``step_module(images, points, transform, generator, single_source=...)`` -> ``loss``
    -> backward -> ``optimizer.step()`` from CUDA graphs (see the module docstring).

    Args:
        step_module: a module whose forward takes ``(images, points, transform, generator,
            single_source=bool)`` and returns ``forward_train``'s dict (the trainer's ``_TrainStep``)
        loss: the loss module (``GPAvatarLoss``): ``loss(out, target, bbox)`` -> dict with ``total``
        optimizer: a ``torch.optim.Adam`` with ``fused=True, capturable=True`` over the parameters
        generator: the generator of the step's random draws, on the parameters' device (CUDA)
        amp: "bf16" runs forward and loss under bf16 autocast (weight cache off), None in fp32
        warmup: eager steps before each capture (undone afterwards)
        graphs: :class:`CudaGraphs` (default; needs a GPU) or :class:`EagerGraphs` (tests)

    Calling it with a step's inputs and the coin returns the static dict of loss terms (0-d
    tensors, overwritten by the next call): read them before calling again.  The update is
    skipped when ``total`` is not finite (check it after the call).
    """

    def __init__(self, step_module: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, *, amp: Optional[str] = None, warmup: int = 2,
                 graphs: Optional[CudaGraphs | EagerGraphs] = None):
        if not isinstance(optimizer, torch.optim.Adam) or not all(g.get("fused") and g.get("capturable")
                                                                   for g in optimizer.param_groups):
            raise ValueError("GraphedTrainStep needs torch.optim.Adam(..., fused=True, capturable=True): a step "
                             "is captured only when capturable, and the fused update can be skipped inside the "
                             "graph when the loss is not finite")
        devices = {p.device for g in optimizer.param_groups for p in g["params"]}
        if devices != {generator.device}:
            raise ValueError(f"generator must be on the parameters' device {sorted(map(str, devices))}, "
                             f"got one on {generator.device}")
        if amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
        if graphs is None:
            why = graphs_supported() or (None if generator.device.type == "cuda" else
                                         f"CUDA graphs need CUDA parameters, got {generator.device}")
            if why:
                raise RuntimeError(why)
            graphs = CudaGraphs()
        self.step_module, self.loss, self.optimizer, self.generator = step_module, loss, optimizer, generator
        self.amp, self.warmup, self.graphs = amp, int(warmup), graphs
        self._graphs: dict[Any, _Captured] = {}
        self._hyper: Any = None
        self.captures = 0  # graphs captured so far (a recapture after a hyperparameter change counts)

    def reset(self) -> None:
        """Drop the graphs (after the optimizer's state or the parameters were replaced, e.g. by a
        checkpoint load): the next call captures again."""
        self._graphs.clear()
        self._hyper = None
        if isinstance(self.graphs, CudaGraphs):
            self.graphs = CudaGraphs()  # a fresh pool: the old graphs' memory goes with them

    def _hyperparameters(self) -> tuple:
        return tuple((g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in self.optimizer.param_groups)

    def prepare(self, images: torch.Tensor, points: torch.Tensor, transform: torch.Tensor, target: torch.Tensor,
                bbox: torch.Tensor, *, single_source: bool) -> _Captured:
        """The graph for these inputs' shapes, this coin and the current hyperparameters, captured
        now if there is none (the state is left as it was: a capture that fails changes nothing)."""
        inputs = dict(zip(INPUT_NAMES, (images, points, transform, target, bbox)))
        hyper = self._hyperparameters()
        if hyper != self._hyper:
            self.reset()
            self._hyper = hyper
        key = (bool(single_source),) + tuple((tuple(t.shape), t.dtype) for t in inputs.values())
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs, bool(single_source))
        return captured

    def __call__(self, images: torch.Tensor, points: torch.Tensor, transform: torch.Tensor, target: torch.Tensor,
                 bbox: torch.Tensor, *, single_source: bool) -> dict[str, torch.Tensor]:
        captured = self.prepare(images, points, transform, target, bbox, single_source=single_source)
        return self.replay(captured, images, points, transform, target, bbox)

    @staticmethod
    def replay(captured: _Captured, images: torch.Tensor, points: torch.Tensor, transform: torch.Tensor,
               target: torch.Tensor, bbox: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step from the graph ``prepare`` returned for these inputs: they are copied into its
        static inputs, then it replays (the update)."""
        for name, t in zip(INPUT_NAMES, (images, points, transform, target, bbox)):
            captured.inputs[name].copy_(t, non_blocking=True)
        return captured.replay()

    # -- one eager or captured step ----------------------------------------------------------------
    def _step(self, x: dict[str, torch.Tensor], single: bool) -> dict[str, torch.Tensor]:
        device_type = x["images"].device.type
        with values_unchecked(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp == "bf16",
                                                 cache_enabled=False):
            out = self.step_module(x["images"], x["points"], x["transform"], self.generator, single_source=single)
            terms = self.loss(out, x["target"], x["bbox"])
        total = terms["total"]
        # 0-d, as the fused Adam takes it (GradScaler's form): 1 skips the update and the step count
        found_inf = (~torch.isfinite(total.detach())).to(torch.float32)
        total.backward()
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        return {k: v.detach() for k, v in terms.items()}

    def _capture(self, inputs: dict[str, torch.Tensor], single: bool) -> _Captured:
        static = {name: t.detach().clone() for name, t in inputs.items()}
        undo = self._snapshot()
        try:
            with self.graphs.warmup_stream(static["images"].device), warnings.catch_warnings():
                self.graphs.hold_accumulators(self._named_parameters())
                # a capturable optimizer warns once when it steps outside a capture: these steps are undone
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(self.warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step(static, single)
        finally:  # also when a warm-up step raises: the state is the step's start
            undo()
        self.optimizer.zero_grad(set_to_none=True)

        def step() -> dict[str, torch.Tensor]:
            self.optimizer.zero_grad(set_to_none=True)  # captured: no kernel; eager: the step's own grads
            return self._step(static, single)

        replay = self.graphs.capture(step, self.generator)
        self.captures += 1
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return _Captured(replay, static, grads)

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The step module's and the loss's parameters (each once), by name."""
        seen, named = set(), []
        for prefix, module in (("", self.step_module), ("loss.", self.loss)):
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((prefix + name, p))
        return named

    def _snapshot(self):
        """A function that puts back what warm-up steps change: the parameters and buffers of the
        step module and the loss, Adam's state (state made by the warm-up is zeroed: Adam's fresh
        state) and the generator."""
        modules = (self.step_module, self.loss)
        tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        values = [t.detach().clone() for t in tensors]
        state = {id(p): {k: v.detach().clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                 for p, s in self.optimizer.state.items()}
        rng = self.generator.get_state()

        def undo() -> None:
            with torch.no_grad():
                for t, v in zip(tensors, values):
                    t.copy_(v)
                for p, s in self.optimizer.state.items():
                    kept = state.get(id(p))
                    for k, v in s.items():
                        if isinstance(v, torch.Tensor):
                            v.copy_(kept[k]) if kept is not None and k in kept else v.zero_()
            self.generator.set_state(rng)

        return undo
