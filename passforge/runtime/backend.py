"""passforge as a ``torch.compile`` backend: dynamo's graphs, through a pipeline, back to the caller.

    model = torch.compile(model, backend="passforge",
                          options={"pipeline": "quantize(scheme=w8),fuse-attention", "inductor": True})

The backend is registered through the ``torch_dynamo_backends`` entry point, so ``backend="passforge"``
works after ``pip install`` with no import.

Inference graphs (grad disabled, or no input requiring grad) become the IR every other door produces:

1. dynamo hands over a torch-level graph whose parameters and buffers are inputs (dynamo inlines modules);
   they are bound back as named attributes (``layers.0.attention.wq.weight``, from dynamo's source for each
   input), so passes see constant weights under their module names — the backend *freezes* the weights, as
   inductor's ``freezing=True`` does: weights changed after compiling need ``torch._dynamo.reset()``;
2. ``torch.export`` (non-strict, itself AOT autograd's functionalising tracer) lowers it to ATen with
   ``meta["val"]``; size arguments dynamo made symbolic are recomputed from the tensors they came from, and
   those dims are exported as dynamic, so ``dynamic=True`` keeps one graph for all lengths;
3. inputs the graph writes into (an HF static KV cache) are cloned inside the exported function and returned,
   so the captured graph is functional; the backend copies the results back into the caller's tensors;
4. the pipeline runs with the verifier (a pass that breaks the graph is rolled back and named; with
   ``on_error="skip"``, the default here, compilation carries on without it);
5. the result runs on passforge's runtime or, with ``inductor=True``, is handed to inductor: passforge's
   passes plus inductor's code generation (passforge's custom ops run as extern kernels, except the int8
   activation linears on CPU, which reach inductor as the ATen ops they run so it fuses around them).

Graph breaks give several graphs, each compiled on its own; a new shape dynamo recompiles for is one more
call to the backend. Training graphs (grad enabled and an input requiring grad) go through AOT autograd's
forward/backward split instead; no passforge pass handles a backward graph yet, so the pipeline is skipped
for them with a warning naming its passes, and the graphs run as AOT autograd (or inductor) compiles them.

Calibration-driven passes (``smooth-quant``, ``gptq``, ``quantize(scheme=w8a8-static)``) take
``options["calib_data"]`` (a token file or an int64 tensor), or else calibrate on the first
``calibration_calls`` real calls: those run unoptimized while their inputs are recorded, then the pipeline
runs once on them and later calls run the optimized graph.

``options["cache_dir"]`` keeps optimized graphs on disk under :func:`cache_key`: a hash of the captured
graph, its weights, the pipeline and the source code of every pass in it (and the passforge and torch
versions), so editing a pass or the pipeline, or changing the model, misses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from passforge.ir.capture import CaptureError, explain_export_failure, from_exported_program
from passforge.ir.graph import copy_graph_module, get_attr, set_tensor_attr, tensor_attrs
from passforge.ir.serialize import load_graph, save_graph
from passforge.passes.base import Context, Pass
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import OnError, PassManager, PipelineResult
from passforge.passes.spec import parse_pipeline
from passforge.runtime.allocator import keep_freed_memory
from passforge.runtime.executor import direct_cpu_calls
from passforge.runtime.inductor import computes_on_cpu, inductor_compile


class BackendError(ValueError):
    """The backend's options are wrong; the message says which and what is accepted."""


@dataclass(frozen=True)
class BackendOptions:
    """``torch.compile(..., backend="passforge", options={...})``: every key is a field here."""

    pipeline: str = "cleanup"
    inductor: bool = False  # hand the optimized graph to inductor for code generation
    on_error: OnError = "skip"  # a failing pass is rolled back; "stop" raises instead
    verify: bool = True  # run the verifier after every pass
    # token ids for calibration-driven passes: a .json / .safetensors file, or a list of ints (not a tensor:
    # torch.compile compares option dicts with ==, which a tensor cannot answer)
    calib_data: str | os.PathLike[str] | list[int] | tuple[int, ...] | None = None
    calibration_calls: int = 8  # without calib_data: calibrate on this many real calls first
    cache_dir: str | os.PathLike[str] | None = None  # keep optimized graphs on disk (see cache_key)
    keep_freed_memory: bool = True  # on CPU, glibc keeps freed memory for reuse (runtime/allocator.py)

    @classmethod
    def from_mapping(cls, options: Mapping[str, object] | None) -> BackendOptions:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BackendError(
                f"torch.compile(backend='passforge'): unknown option(s) {', '.join(unknown)}; "
                f"the options are {', '.join(sorted(known))}"
            )
        for key in ("inductor", "verify", "keep_freed_memory"):
            if key in options and not isinstance(options[key], bool):
                raise BackendError(f"options['{key}'] must be True or False, got {options[key]!r}")
        made = cls(**options)
        if made.on_error not in ("stop", "skip"):
            raise BackendError(f"options['on_error'] must be 'stop' or 'skip', got {made.on_error!r}")
        if not isinstance(made.calibration_calls, int) or made.calibration_calls < 1:
            raise BackendError(f"options['calibration_calls'] must be an int >= 1, got {made.calibration_calls!r}")
        _check_calib_data(made.calib_data)
        try:
            parse_pipeline(made.pipeline)
        except Exception as exc:
            raise BackendError(f"options['pipeline']: {exc}") from exc
        return made


def _check_calib_data(data: object) -> None:
    if data is None:
        return
    if isinstance(data, torch.Tensor):
        raise BackendError(
            "options['calib_data']: pass token ids as a list of ints (tensor.tolist()) or a .json/.safetensors "
            "file, not a tensor — torch.compile compares option dicts with ==, which a tensor cannot answer"
        )
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(t, int) and t >= 0 for t in data):
            raise BackendError("options['calib_data']: a list of token ids must be non-empty non-negative ints")
        return
    path = Path(data)
    if path.suffix not in (".json", ".safetensors") or not path.is_file():
        raise BackendError(
            f"options['calib_data']: {path} is not a .json or .safetensors file of token ids (text needs a "
            "tokenizer the backend does not have: tokenize it first)"
        )


def passforge_backend(
    gm: fx.GraphModule, example_inputs: Sequence[object], *, options: Mapping[str, object] | None = None,
    mode: str | None = None,
) -> Callable[..., object]:
    """The ``torch_dynamo_backends`` entry point: compile one dynamo graph (see the module docstring).

    ``mode`` (inductor's ``reduce-overhead`` etc., which HF's ``CompileConfig`` passes by default) is not used.
    """
    opts = BackendOptions.from_mapping(options)
    if _is_training(example_inputs):
        return _compile_training(gm, example_inputs, opts)
    return CompiledGraph(gm, example_inputs, opts)


def _is_training(example_inputs: Sequence[object]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def _compile_training(gm: fx.GraphModule, example_inputs: Sequence[object], opts: BackendOptions) -> Callable:
    names = [p.spec for p in parse_pipeline(opts.pipeline)]
    if names:
        warnings.warn(
            f"passforge backend: a training graph (grad enabled, an input requires grad): the pipeline "
            f"{', '.join(names)} is skipped for it — passforge's passes work on frozen-weight inference graphs; "
            "compile under torch.no_grad() (or torch.inference_mode()) to optimize it",
            stacklevel=2,
        )
    if opts.inductor:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs))
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def run_as_is(graph: fx.GraphModule, _: Sequence[object]) -> Callable:
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=run_as_is, bw_compiler=run_as_is)(gm, example_inputs)


# --- binding dynamo's inputs: weights, tensors, sizes -------------------------------------------------------

_KEY = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(\w+)|\[(\d+)\]")
_ROOT = re.compile(r"^([GL])\['([^']*)'\]")


def _source_text(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    text = grapharg.source.name if grapharg is not None else ""
    return text() if callable(text) else text


def _source_name(node: fx.Node) -> str:
    """``L['self']._modules['layers']._modules['0']._parameters['weight']`` → ``layers.0.weight``; another root
    keeps its name (``L['m1']._parameters['weight']`` → ``m1.weight``, a global list ``G['blocks'][1]...`` →
    ``blocks.1...``), so two modules' weights never share a name."""
    return _dotted(_source_text(node)) or str(node.target)


def _dotted(text: str) -> str:
    """A dynamo source or module path as a qualified name (``L['self'].lm_head`` → ``lm_head``); '' if none."""
    root = _ROOT.match(text)
    if root is None:
        return ""
    keys = [a or b or c for a, b, c in _KEY.findall(text[root.end():])]
    if root.group(2) != "self":
        keys.insert(0, root.group(2))
    return ".".join(keys)


_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[['\"]?([^\]'\"]+)['\"]?\]")


def _module_path(text: str) -> str:
    """A module path from ``nn_module_stack`` (``L['self'].layers[0].mlp``, ``L['self'].heads.lm-head``) as a
    qualified name (``layers.0.mlp``, ``heads.lm-head``): module names are anything but a dot."""
    root = _ROOT.match(text)
    if root is None:
        return ""
    keys = [a or b for a, b in _PATH_PART.findall(text[root.end():])]
    return ".".join(([] if root.group(2) == "self" else [root.group(2)]) + keys)


def _tied_linear_names(gm: fx.GraphModule, binding: _Binding) -> dict[str, str]:
    """``{bound name: the name its linear calls it}`` for each weight that is the weight of exactly one
    linear, in a module other than the one it is bound under: a tied weight (an embedding shared with the LM
    head) reaches dynamo once, under the first module's name, and the head's linear then reads it as
    ``emb.weight``. :func:`_untie` gives that read the head's own name, as ``capture`` does, so name selections
    (``quantize(skip=lm_head*)``) see the layer."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    taken = set(binding.weights.values())
    names = {}
    for i, name in binding.weights.items():
        linears = [u for u in placeholders[i].users if u.target in _LINEARS and len(u.args) > 1
                   and u.args[1] is placeholders[i]]
        stack = list((linears[0].meta.get("nn_module_stack") or {}).values()) if len(linears) == 1 else []
        owner = stack[-1] if stack else None  # (path, module type) of the module the linear runs in
        if not (owner and isinstance(owner[1], type) and issubclass(owner[1], torch.nn.Linear)):
            continue  # F.linear in some other module's forward: no name of its own to give
        module = _module_path(owner[0])
        if module and f"{module}.weight" != name and f"{module}.weight" not in taken:
            names[name] = f"{module}.weight"
    claimed = Counter(names.values())
    return {name: alias for name, alias in names.items() if claimed[alias] == 1}


def _untie(captured: fx.GraphModule, names: dict[str, str]) -> None:
    """The one linear reading a tied weight reads it under its own module's name (the same tensor)."""
    for node in list(captured.graph.find_nodes(op="get_attr")):
        name = str(node.target).removeprefix("weights.")
        linears = [u for u in node.users if u.target is torch.ops.aten.linear.default and u.args[1] is node]
        if name not in names or len(linears) != 1:
            continue
        alias = f"weights.{names[name]}"
        set_tensor_attr(captured, alias, get_attr(captured, str(node.target)))
        with captured.graph.inserting_after(node):
            read = captured.graph.get_attr(alias)
        read.meta = dict(node.meta)
        linears[0].replace_input_with(node, read)
        if not node.users:  # the head alone in this graph: the first name is no longer read here
            captured.graph.erase_node(node)
    captured.recompile()


def _is_weight(node: fx.Node, value: torch.Tensor) -> bool:
    """A module's parameter or buffer (which dynamo guards as module state), or a float attribute of a module
    dynamo turned into a 0-d tensor under ``dynamic=True`` (``norm.eps``, read with ``.item()``). Other
    tensors — the caller's arguments, globals, attributes of plain objects — stay inputs: dynamo does not
    recompile when they change, so freezing them would go stale."""
    text = _source_text(node)
    if "._parameters[" in text or "._buffers[" in text:
        return True
    module_attribute = "._modules[" in text or text.startswith("L['self']")
    return module_attribute and value.dim() == 0 and bool(node.users) and all(
        u.op == "call_method" and u.target == "item" for u in node.users
    )


@dataclass
class _Binding:
    """How the exported function's tensor inputs map onto dynamo's placeholders."""

    weights: dict[int, str]  # placeholder index → attribute name
    tensors: list[int]  # placeholder indices passed through as user inputs (in order)
    sizes: dict[int, tuple[int, int]]  # SymInt placeholder index → (position in `tensors`, dim)
    mutated: list[int] = dataclasses.field(default_factory=list)  # indices into `tensors` the graph writes into

    def user_args(self, args: Sequence[object]) -> list[torch.Tensor]:
        return [args[i] for i in self.tensors]  # type: ignore[misc]


def _bind(gm: fx.GraphModule, example_inputs: Sequence[object], keep_inputs: frozenset[int] = frozenset()) -> _Binding:
    """Sort dynamo's placeholders into frozen weights, tensor inputs and sizes; ``keep_inputs`` are weights the
    graph writes into (a step counter), which stay inputs so the caller's tensor sees the writes."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    weights: dict[int, str] = {}
    tensors: list[int] = []
    symbolic: dict[int, fx.Node] = {}
    taken: dict[str, int] = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor):
            if i not in keep_inputs and _is_weight(node, value):
                name = stem = _source_name(node)
                while name in taken:  # never let one weight replace another under the same name
                    name = f"{stem}_{len(taken)}"
                taken[name] = i
                weights[i] = name
            else:
                tensors.append(i)
        elif isinstance(value, (int, torch.SymInt)):
            symbolic[i] = node
        else:
            raise BackendError(
                f"passforge backend: dynamo input {node.target} is a {type(value).__name__}; only tensors and "
                "sizes are supported"
            )
    sizes = {i: _size_origin(node, placeholders, tensors) for i, node in symbolic.items()}
    for i in weights:
        _inline_scalar(placeholders[i], example_inputs[i])
    return _Binding(weights, tensors, sizes)


def _inline_scalar(node: fx.Node, value: torch.Tensor) -> None:
    """A frozen 0-d tensor dynamo only reads with ``.item()`` (an unspecialised float attribute such as
    ``norm.eps``) becomes the Python number it holds: exported as a tensor, ``.item()`` would be a
    data-dependent value torch.export cannot trace."""
    if value.dim() != 0 or not node.users or any(u.op != "call_method" or u.target != "item" for u in node.users):
        return
    number = value.item()
    for item in list(node.users):
        for user in list(item.users):
            user.args = fx.node.map_aggregate(user.args, lambda a, item=item: number if a is item else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a, item=item: number if a is item else a)
        item.graph.erase_node(item)
    node.graph.owning_module.recompile()


def _size_origin(node: fx.Node, placeholders: list[fx.Node], tensors: list[int]) -> tuple[int, int]:
    """Which tensor input's dim a dynamo size argument is (its source is ``L['x'].size()[0]``)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    base, index = getattr(source, "base", None), getattr(source, "idx", None)
    is_size = getattr(getattr(source, "prop", None), "name", None) == "SIZE"
    if is_size and base is not None and index is not None:
        base_name = base.name() if callable(base.name) else base.name
        for position, i in enumerate(tensors):
            arg = placeholders[i].meta.get("grapharg")
            name = arg.source.name if arg is not None else None
            if (name() if callable(name) else name) == base_name:
                return position, int(index)
    raise BackendError(
        f"passforge backend: the dynamic integer {node.target} ({_source_text(node) or 'no source'}) is not the "
        "size of a tensor the graph receives; compile with dynamic=False, or pass the tensor it measures"
    )


class _Frozen(torch.nn.Module):
    """dynamo's graph as a module of its user tensors, with the weights as named parameters/buffers."""

    def __init__(self, gm: fx.GraphModule, binding: _Binding, example_inputs: Sequence[object]) -> None:
        super().__init__()
        self.graph_fn = gm
        self.binding = binding
        self.slots: dict[int, str] = {}
        for i, name in binding.weights.items():
            holder, leaf = self._holder(name)
            value = example_inputs[i]
            if isinstance(value, torch.nn.Parameter):
                holder.register_parameter(leaf, value)
            else:
                holder.register_buffer(leaf, value)
            self.slots[i] = name
        self.count = len(example_inputs)

    def _holder(self, name: str) -> tuple[torch.nn.Module, str]:
        *path, leaf = ["weights", *name.split(".")]
        module: torch.nn.Module = self
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        return module, leaf

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.binding
        tensors = tuple(t.clone() if k in b.mutated else t for k, t in enumerate(tensors))
        args: list[object] = [None] * self.count
        for i, name in self.slots.items():
            args[i] = get_attr(self, f"weights.{name}")
        for position, i in enumerate(b.tensors):
            args[i] = tensors[position]
        for i, (position, dim) in b.sizes.items():
            args[i] = tensors[position].size(dim)
        out = self.graph_fn(*args)
        return (*out, *(tensors[k] for k in b.mutated))


def _dynamic_dims(gm: fx.GraphModule, binding: _Binding) -> tuple[dict[int, object] | None, ...] | None:
    """The dims dynamo made symbolic, as torch.export Dims (AUTO: export names and relates them)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    spec: list[dict[int, object] | None] = []
    for i in binding.tensors:
        value = placeholders[i].meta.get("example_value")
        shape = getattr(value, "shape", ())
        dims = {d: torch.export.Dim.AUTO for d, size in enumerate(shape) if not isinstance(size, int)}
        spec.append(dims or None)
    return (tuple(spec),) if any(spec) else None  # one entry: forward(*tensors) takes them as varargs


# --- compiling and running one graph -------------------------------------------------------------------------

_COMPILED: list[weakref.ReferenceType[CompiledGraph]] = []


def compiled_graphs() -> list[CompiledGraph]:
    """The graphs this process compiled that are still alive, oldest first: each has ``captured``, and once
    it has run, ``graph`` (the optimized graph) and ``result`` (the pipeline's per-pass records)."""
    alive = [graph for ref in _COMPILED if (graph := ref()) is not None]
    _COMPILED[:] = [weakref.ref(graph) for graph in alive]
    return alive



def _capture(gm: fx.GraphModule, example_inputs: Sequence[object]) -> tuple[_Binding, fx.GraphModule, object]:
    """dynamo's graph as passforge IR. Which inputs the graph writes into comes from torch.export's own
    signature (every spelling of an in-place write: ``add_``, ``+=``, ``out=``, ``x[i] = v``...): if there are
    any, the function is exported again with those inputs cloned inside and returned, so the IR is functional.
    A weight written into (a step counter buffer) becomes an input again, so the caller's tensor sees it."""
    binding = _bind(gm, example_inputs)
    program = _export(gm, binding, example_inputs)
    signature = program.graph_signature
    written = set(signature.user_inputs_to_mutate.values())
    written_weights = {f"weights.{name}" for name in binding.weights.values()} & set(
        signature.buffers_to_mutate.values()
    )
    if written or written_weights:
        keep = frozenset(i for i, name in binding.weights.items() if f"weights.{name}" in written_weights)
        names = list(signature.user_inputs)
        written_positions = {binding.tensors[names.index(name)] for name in written}
        binding = _bind(gm, example_inputs, keep_inputs=keep)
        binding.mutated = [k for k, i in enumerate(binding.tensors) if i in written_positions | keep]
        program = _export(gm, binding, example_inputs)
    with warnings.catch_warnings(), torch._guards.tracing(None), torch._guards.compile_context(None):
        warnings.simplefilter("ignore")
        captured = from_exported_program(program, name="torch.compile graph", decomposed=True)
    _untie(captured, _tied_linear_names(gm, binding))
    return binding, captured, _dynamic_dims(gm, binding)


def _export(gm: fx.GraphModule, binding: _Binding, example_inputs: Sequence[object]) -> torch.export.ExportedProgram:
    module = _Frozen(gm, binding, example_inputs)
    # export traces afresh: outside dynamo's tracing context, whose guards would leak into the graph
    with (
        torch.no_grad(), torch._guards.tracing(None), torch._guards.compile_context(None),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(
                module, tuple(binding.user_args(example_inputs)), dynamic_shapes=_dynamic_dims(gm, binding),
                strict=False,
            )
            return program.run_decompositions({})  # functional: the writes show in the signature
        except Exception as exc:
            raise CaptureError(explain_export_failure("torch.compile graph", exc)) from exc


def _settings(opts: BackendOptions) -> str:
    """What besides the graph and the passes decides the optimized graph: calibration data, verification."""
    calib = opts.calib_data
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = hashlib.sha256(Path(calib).read_bytes()).hexdigest()
    digest = hashlib.sha256(repr(calib).encode()).hexdigest()
    return f"calib={digest} calls={opts.calibration_calls} verify={opts.verify} on_error={opts.on_error}"


def _flat(dims: tuple[tuple[dict[int, object] | None, ...]] | None) -> tuple[dict[int, object] | None, ...] | None:
    """The captured dims for re-exporting the optimized graph, which takes its inputs flat, not as varargs."""
    return dims[0] if dims else None


def _inductor_runner(graph: fx.GraphModule) -> Callable[..., Sequence[torch.Tensor]]:
    """inductor's builds of ``graph``, one per distinct input shape: ``torch._inductor.compile`` specialises on
    the example's sizes, and dynamo sends a dynamic graph every length."""
    builds: dict[tuple[object, ...], Callable[..., Sequence[torch.Tensor]]] = {}

    def run(*inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        build = builds.get(key)
        if build is None:
            build = builds[key] = inductor_compile(graph, list(inputs))
        return build(*inputs)

    return run


class CompiledGraph:
    """What the backend returns for one inference graph: ``compiled(*dynamo_args) -> outputs``.

    Compilation is lazy: the first call (or the first ``calibration_calls`` calls, for a pipeline that
    calibrates without ``calib_data``) runs the captured graph while the pipeline waits for real inputs.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], opts: BackendOptions) -> None:
        self.opts = opts
        self.binding, self.captured, self.dynamic_dims = _capture(gm, example_inputs)
        self.passes: list[Pass] = parse_pipeline(opts.pipeline)
        self.key = cache_key(self.captured, self.passes, _settings(opts)) if opts.cache_dir else None
        self.cached = Path(opts.cache_dir) / f"{self.key}.pt2" if opts.cache_dir else None
        self.cache_hit = False
        # calib_data is token windows: a graph without a (batch, seq) int64 input (one after a graph break)
        # calibrates on its own first calls instead
        self.token_windows = opts.calib_data is not None and any(
            getattr(v, "dtype", None) == torch.long and v.dim() == 2 for v in self.binding.user_args(example_inputs)
        )
        needs_data = any(p.needs_calibration for p in self.passes) and not self.token_windows
        self.calibrating = needs_data and not (self.cached is not None and self.cached.is_file())
        self.recorded: list[tuple[torch.Tensor, ...]] = []
        self.result: PipelineResult | None = None
        self.graph: fx.GraphModule | None = None  # the optimized graph, once compiled
        self.runnable: Callable[..., Sequence[torch.Tensor]] | None = None  # what runs it (derived, or inductor's)
        _COMPILED.append(weakref.ref(self))

    def __call__(self, *args: object) -> list[torch.Tensor]:
        user = self.binding.user_args(args)
        if self.runnable is None:
            if self.calibrating and len(self.recorded) + 1 < self.opts.calibration_calls:
                self.recorded.append(tuple(t.detach().clone() for t in user))
                return self._finish(user, self.captured(*user))
            if self.calibrating:
                self.recorded.append(tuple(t.detach().clone() for t in user))
            self._compile(user)
        return self._finish(user, _run_graph(self.runnable, user))

    def _finish(self, user: list[torch.Tensor], outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Write the new values of mutated inputs back into the caller's tensors; return the real outputs."""
        mutated = self.binding.mutated
        if not mutated:
            return list(outputs)
        real, updates = list(outputs[: len(outputs) - len(mutated)]), outputs[len(outputs) - len(mutated):]
        for k, new in zip(mutated, updates):
            if new.data_ptr() != user[k].data_ptr():
                user[k].copy_(new)
        return real

    def _compile(self, user: list[torch.Tensor]) -> None:
        graph = self._load_cached()
        self.cache_hit = graph is not None
        if graph is None:
            graph = self._optimize(tuple(user))
            self._save_cached(graph, user)
        self.graph = graph
        if self.opts.keep_freed_memory and _all_on_cpu(graph, user):
            keep_freed_memory()
        if self.opts.inductor and self.dynamic_dims:
            self.runnable = _inductor_runner(graph)
        elif self.opts.inductor:
            self.runnable = inductor_compile(graph, user)
        else:
            from passforge.kernels.ops import CPU_KERNELS

            runnable = _donate_updates(graph, len(self.binding.mutated))
            on_cpu = computes_on_cpu(graph, CPU_KERNELS)  # then called directly, as passforge's Executor runs it
            self.runnable = direct_cpu_calls(runnable) if on_cpu else runnable
        self.recorded.clear()

    def _load_cached(self) -> fx.GraphModule | None:
        if self.cached is None or not self.cached.is_file():
            return None
        try:
            return load_graph(self.cached)
        except Exception as exc:  # noqa: BLE001 - a bad cache entry costs a recompile, never the user's call
            warnings.warn(f"passforge backend: cache entry {self.cached} unreadable ({exc}); recompiling", stacklevel=3)
            return None

    def _save_cached(self, graph: fx.GraphModule, user: list[torch.Tensor]) -> None:
        if self.cached is None:
            return
        try:
            self.cached.parent.mkdir(parents=True, exist_ok=True)
            save_graph(graph, self.cached, tuple(user), dynamic_shapes=_flat(self.dynamic_dims))
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: warn and run uncached
            warnings.warn(f"passforge backend: could not cache the optimized graph ({exc})", stacklevel=3)

    def _optimize(self, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
        ctx = Context(example_inputs=example, device=example[0].device if example else torch.device("cpu"))
        if self.token_windows:
            ctx.calib_tokens = _tokens(self.opts.calib_data)
        elif self.recorded:
            ctx.calib_inputs = list(self.recorded)
        hooks = [VerifyHook()] if self.opts.verify else []
        manager = PassManager(self.passes, hooks=hooks, on_error=self.opts.on_error)
        with torch.no_grad():
            self.result = manager.run(self.captured, ctx)
        for record in self.result.records:
            if record.status != "ok":
                warnings.warn(
                    f"passforge backend: pass '{record.spec}' was {record.status.replace('_', ' ')}: {record.error}",
                    stacklevel=2,
                )
        return self.result.graph


_IN_PLACE = {
    torch.ops.aten.index_copy.default: torch.ops.aten.index_copy_.default,
    torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default,
}


def _donate_updates(graph: fx.GraphModule, count: int) -> fx.GraphModule:
    """For running only: a copy of ``graph`` whose trailing ``count`` outputs (new values of inputs the
    caller's code writes into, such as an HF static cache) are written into those inputs in place::

        %c = aten.clone(%cache)                     %u = aten.index_copy_(%cache, 2, %pos, %k)
        %u = aten.index_copy(%c, 2, %pos, %k)   →   ...
        return (..., %u)                            return (..., %u)        # %u is %cache: no copy back

    Applied per output when the clone is the input's only reader and the update the clone's only reader,
    so no node sees the old value after the write; the others keep the clone and are copied back."""
    if not count:
        return graph
    donated = copy_graph_module(graph)
    output = next(n for n in donated.graph.nodes if n.op == "output")
    changed = False
    for update in output.args[0][-count:]:
        in_place = _IN_PLACE.get(getattr(update, "target", None))
        clone = update.args[0] if in_place is not None else None
        if (
            isinstance(clone, fx.Node) and clone.target is torch.ops.aten.clone.default and len(clone.users) == 1
            and isinstance(clone.args[0], fx.Node) and clone.args[0].op == "placeholder"
            and len(clone.args[0].users) == 1
        ):
            update.target = in_place
            update.args = (clone.args[0], *update.args[1:])
            donated.graph.erase_node(clone)
            changed = True
    if not changed:
        return graph
    donated.recompile()
    return donated


def _all_on_cpu(graph: fx.GraphModule, user: list[torch.Tensor]) -> bool:
    """Whether the graph's inputs and weights are all on the CPU (and it has some)."""
    return ({t.device.type for t in user} | {t.device.type for _, t in tensor_attrs(graph)}) == {"cpu"}


def _run_graph(graph: Callable[..., Sequence[torch.Tensor]], inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    with torch.no_grad():
        return graph(*inputs)


def _tokens(data: str | os.PathLike[str] | Sequence[int]) -> torch.Tensor:
    if isinstance(data, (list, tuple)):
        return torch.tensor(data, dtype=torch.long)
    from passforge.models.registry import ModelSource, read_tokens

    return read_tokens(data, ModelSource("torch.compile graph", None, (), is_lm=False))


# --- the cache key ------------------------------------------------------------------------------------------


def cache_key(graph: fx.GraphModule, passes: Sequence[Pass], settings: str = "") -> str:
    """A hash of everything an optimized graph depends on: the captured code and input types, the weights'
    bytes, the pipeline's spec, the source files of every pass in it, the passforge and torch versions, and
    ``settings`` (the backend's calibration data and verification options)."""
    from passforge import __version__

    digest = hashlib.sha256()
    digest.update(f"passforge {__version__} torch {torch.__version__}\n{settings}\n".encode())
    digest.update(graph.code.encode())
    for node in graph.graph.find_nodes(op="placeholder"):
        digest.update(repr(node.meta.get("val")).encode())
    for name, tensor in tensor_attrs(graph):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    for pass_ in passes:
        digest.update(f"{pass_.spec}\n".encode())
        for path in sorted(_source_files(type(pass_))):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:32]


def _source_files(cls: type) -> set[str]:
    """The files defining a pass class and its passforge bases (a helper module it imports is not seen: a
    pass in a package, e.g. quantize/, counts the package's files)."""
    files: set[str] = set()
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is None or not klass.__module__.startswith("passforge"):
            continue
        path = inspect.getsourcefile(module)
        if path is None:
            continue
        folder = Path(path).parent
        if folder.name != "passes":  # a pass family's package: any of its files may change the result
            files.update(str(p) for p in folder.glob("*.py"))
        files.add(path)
    return files


