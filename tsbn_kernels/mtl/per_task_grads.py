"""Per-task gradients G [T, P] of the shared parameters.

One backward (DESIGN.md §3): in the replicated batch, with task-specific norms as the only layers that mix
samples, task t's loss depends on block t of every shared layer's input and output alone. So one
torch.autograd.grad of Σ_t L_t with respect to the *outputs* of the shared Conv/Linear layers (not their
weights) yields every block's output gradient, and each layer's weight gradient splits exactly into T
per-block gradients: a weight-gradient convolution per block or one grouped over the blocks (or a batched
matmul), the same FLOPs as the one summed weight gradient it replaces. They are written straight into the rows
of G.

Fallback (any model): T autograd passes, one per task loss.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .. import reference, validation
from ..context import current_task_ids
from ..modules import TSLayerNorm, _TSBatchNorm
from . import attention

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LOOKALIKES = (nn.modules.conv._ConvNd, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclasses.dataclass(frozen=True, eq=False)
class _Piece:
    """What one recorded call multiplies, of the parameters it splits: rows [offset, offset + rows) of a weight
    (all of a Linear's or Conv's; a q/k/v slice of nn.MultiheadAttention's in_proj_weight) with the same rows of
    a bias, or a bias alone (bias_k, bias_v: one vector per sample). weight/bias None: not split (frozen, absent).
    batch_dim: the input's batch dimension (1: a seq-first transformer's feed-forward Linear on [L, B, E])."""
    name: str
    kind: str                      # "linear", "conv" or "bias"
    owner: nn.Module               # the captured layer it belongs to
    weight: Tensor | None
    bias: Tensor | None
    offset: int = 0                # the first of the weight's rows used
    bias_offset: int = 0           # the first of the bias' (q/k/v_proj_weight: a weight each, one in_proj_bias)
    batch_dim: int = 0

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)


def _attention_params(mha: nn.MultiheadAttention) -> list[Tensor]:
    """The trainable parameters of an nn.MultiheadAttention in G's column order."""
    params = [mha.in_proj_weight, mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.in_proj_bias,
              mha.bias_k, mha.bias_v, mha.out_proj.weight, mha.out_proj.bias]
    return [p for p in params if p is not None and p.requires_grad]


def _weight_grad_fn(conv: nn.Module):
    """torch.nn.grad's weight-gradient function for a Conv1d/2d/3d."""
    return getattr(torch.nn.grad, f"conv{conv.weight.dim() - 2}d_weight")


# The captures whose `with` block is running, innermost last: replicate() reports to the innermost one.
_active: list["OneBackward"] = []
# Models whose per-task split was checked against a backward of a weighted sum of the losses (OneBackward.gradients).
_split_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def replicate(x: Tensor, num_tasks: int) -> Tensor:
    """x repeated num_tasks times along dim 0 (task-major blocks): the replicated batch from the part of a model
    that runs once on the N input samples (DESIGN.md §1: the layers before the first task-specific norm).

    Outside a OneBackward capture this is ``x.repeat(num_tasks, 1, ...)``. Inside one, it marks the point after
    which every layer sees the replicated batch: the parameters used before it (a stem convolution, a ViT's
    position embedding and class token) get their per-task gradients from the gradient of each task's block of
    the result, so the shared part before the replication need not run T times."""
    out = x.repeat(num_tasks, *([1] * (x.dim() - 1)))
    if _active:
        _active[-1]._record_replication(out)
    return out


def unique(items: Iterable) -> list:
    """The items in order, each object once (by identity: tensors compare elementwise)."""
    return list({id(item): item for item in items}.values())


def _stack_losses(losses: Tensor | Sequence[Tensor]) -> Tensor:
    stacked = losses if isinstance(losses, Tensor) else torch.stack(list(losses))
    if stacked.dim() != 1 or stacked.numel() < 1:
        raise ValueError(f"losses must be T scalars (one per task), got shape {tuple(stacked.shape)}")
    return stacked


def autograd_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """G [T, P] by T autograd passes (any model). P = the params' numels, concatenated in order."""
    return _autograd_gradients(losses, params)[0]


def _autograd_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> tuple[Tensor, set[int]]:
    """(G, the ids of the params any loss reaches)."""
    losses = _stack_losses(losses)
    params = list(params)
    total = sum(p.numel() for p in params)
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    G = torch.zeros(losses.shape[0], total, dtype=dtype, device=params[0].device)
    reached = set()
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            if g is not None:
                G[t, offset:offset + p.numel()] = g.reshape(-1)
                reached.add(id(p))
            offset += p.numel()
    return G, reached


class OneBackward:
    """Records the shared Conv/Linear layers of a replicated-batch forward, then gives all T per-task gradients
    of their parameters from one backward pass.

        with OneBackward(model, num_tasks) as capture:
            losses = task_losses(model(x.repeat(T, ...)))
        G, other_grads = capture.gradients(losses, other_params)   # G: [T, P] over capture.params

    ``capture.params`` lists the parameters in G's column order (weights then biases of each layer, in
    module order, each once). Parameters in ``other_params`` (task-specific ones) get their ordinary gradient of
    Σ losses. Per-sample task ids (``tk.task_ids(ids)`` or ``task_ids=`` of the task-specific norms) work too:
    each layer's weight gradient is then split by the ids the norms used instead of by blocks. The part of the
    model that runs once before ``mtl.replicate`` (a stem; pass raw parameters used there, such as a position
    embedding, as ``before_replication``) gets exact per-task gradients from the replicated tensor's blocks.

    The split is exact only when the captured layers run on the batch the task-specific norms see and nothing
    else mixes samples of different tasks; what breaks that raises a ValueError naming the layer instead of
    giving wrong gradients: a captured layer that ran on another batch (a stem run once and replicated without
    mtl.replicate, a per-task head), a BatchNorm with batch statistics over the tasks' samples, a captured
    layer whose weight got a gradient without its forward being called (``F.linear(x, layer.weight)``).
    ``nn.MultiheadAttention`` is captured as one unit (see ``mtl.attention``): its in-projections, out_proj and
    bias_k/bias_v are split by task as well. Batch-first layouts only: a Linear's input splits along dim 0, a
    layer run on k·batch rows must hold each sample's k rows together (``[B, k, ...]`` flattened, not ``torch.cat`` of k
    batches). The first ``gradients`` call of each model checks the whole split against one more backward of a
    weighted sum of the losses (Σ_t c_t·G_t must equal its gradient), which catches any other mixing.
    """

    def __init__(self, model: nn.Module, num_tasks: int, modules: Iterable[nn.Module] | None = None,
                 before_replication: Iterable[Tensor] = ()):
        self.num_tasks = num_tasks
        self._names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        candidates = list(modules) if modules is not None else list(model.modules())
        if modules is not None:
            # Layers of the kinds it splits' families that it does not (transposed convolutions, embeddings):
            # listed, they were dropped silently. Containers and norms in the list stay harmless.
            unsplittable = [m for m in candidates if isinstance(m, _LOOKALIKES) and not isinstance(m, _SUPPORTED)]
            if unsplittable:
                raise ValueError(f"OneBackward splits nn.Linear and nn.Conv1d/2d/3d weight gradients by task; "
                                 f"modules= holds {[type(m).__name__ for m in unsplittable]}, which it cannot "
                                 "split (their gradients would be missing): leave them out and pass their "
                                 "parameters as task_params if task-specific, or use mtl.autograd_gradients")
        # nn.MultiheadAttention: its forward is replaced by attention.mha_forward for the capture (its
        # projections are recorded there, out_proj included, so out_proj is not captured as a Linear of its own).
        self.attention = unique(m for m in candidates if isinstance(m, nn.MultiheadAttention) and _attention_params(m))
        for m in self.attention:
            why = attention.unsupported(m)
            if why is not None:
                raise ValueError(f"OneBackward cannot split the gradients of {self._name(m)}: {why}. "
                                 "Leave it out of `modules=` (its parameters then get the summed gradient as "
                                 "task_params) or use mtl.autograd_gradients")
        in_attention = {id(m.out_proj) for m in self.attention}
        self.modules = unique(m for m in candidates                       # each once: a hook per call site
                              if isinstance(m, _SUPPORTED) and m.weight.requires_grad and id(m) not in in_attention)
        for m in self.modules:
            if not isinstance(m, nn.Linear) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
                raise ValueError(f"OneBackward supports convolutions with numeric zero padding; {m} has "
                                 f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
        if not self.modules and not self.attention:
            raise ValueError("OneBackward found no Conv/Linear layer with trainable weights to split by task")
        # The feed-forward Linears of a seq-first (batch_first=False) nn.Transformer*Layer run on [L, B, E]: their
        # batch dimension is 1. A task-specific norm there would split the sequence into task blocks instead.
        seq_first = [m for m in model.modules() if isinstance(m, _TRANSFORMER_LAYERS) and not m.self_attn.batch_first]
        batch_dims = {id(lin): 1 for m in seq_first for lin in (m.linear1, m.linear2)}
        self._seq_first_norms = {id(n): self._name(m) for m in seq_first for n in m.modules()
                                 if isinstance(n, (_TSBatchNorm, TSLayerNorm))}
        self._pieces = {id(m): _Piece(self._name(m), "linear" if isinstance(m, nn.Linear) else "conv",
                                      m, m.weight, m.bias if m.bias is not None and m.bias.requires_grad else None,
                                      batch_dim=batch_dims.get(id(m), 0)) for m in self.modules}
        # Every layer whose parameters G holds, with them in column order (module order, each parameter once).
        captured = {id(m) for m in (*self.modules, *self.attention)}
        self._units = unique(m for m in candidates if id(m) in captured)
        self._unit_params = {id(m): (_attention_params(m) if isinstance(m, nn.MultiheadAttention) else
                                     [p for p in (m.weight, m.bias) if p is not None and p.requires_grad])
                             for m in self._units}
        # Tied weights (one Parameter in two layers) get one column range, into which both layers' parts add.
        # before_replication: parameters used before mtl.replicate other than the captured layers' (a ViT's
        # position embedding and class token); their per-task gradients come from the replicated blocks too.
        self._extra_pre = [p for p in before_replication if p.requires_grad]
        self.params = unique(p for p in [*(q for m in self._units for q in self._unit_params[id(m)]),
                                         *self._extra_pre] if p.requires_grad)
        # (replicated tensor's gradient edge, its rows, records before it)
        self._replications: list[tuple[torch.autograd.graph.GradientEdge, int, int]] = []
        self._tolerance = 0.0           # of the split check, from the precision the recorded layers ran in
        self.model = model
        self._task_norms = [m for m in model.modules() if isinstance(m, (_TSBatchNorm, TSLayerNorm))]
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # (what it multiplies, its input (batch first; None for a bias alone), the gradient edge of its output: the
        # output as the layer made it, even when the model then changes it in place, as nn.ReLU(inplace=True)
        # does, and its rows (samples, or k rows of each sample))
        self._records: list[tuple[_Piece, Tensor | None, torch.autograd.graph.GradientEdge, int]] = []
        self._attention_pieces: dict[tuple[int, str], _Piece] = {}
        self._norm_calls: list[tuple[nn.Module, int, Tensor | None]] = []
        self._batch_stat_calls: list[tuple[nn.Module, int]] = []
        self._handles = []
        self.reached: set[int] = set()  # ids of the params the last gradients() found the losses to reach

    def _reset(self) -> None:
        """Forget what a forward recorded."""
        self._records, self._norm_calls, self._batch_stat_calls, self._replications = [], [], [], []
        self._tolerance = 0.0

    def __enter__(self) -> "OneBackward":
        _active.append(self)
        self._reset()
        self._handles = [m.register_forward_hook(self._record) for m in self.modules]
        self._handles += [m.register_forward_pre_hook(self._record_task_norm, with_kwargs=True)
                          for m in self._task_norms]
        self._handles += [m.register_forward_pre_hook(self._record_batch_norm) for m in self._batch_norms]
        # A hook on a transformer layer turns its fused inference path (torch._transformer_encoder_layer_fwd, which
        # uses every weight inside one op) off, whatever requires grad: the layer then calls its submodules.
        self._handles += [m.register_forward_pre_hook(_keep_off_fast_path) for m in self.model.modules()
                          if isinstance(m, _TRANSFORMER_LAYERS)]
        self._replaced = []
        try:
            for m in self.attention:
                if "forward" in vars(m):
                    raise ValueError(f"{self._name(m)}: {attention.unsupported(m)} (another OneBackward capture of "
                                     "it already running?)")
                m.forward = functools.partial(self._attention_forward, m)
                self._replaced.append(m)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._replaced:
            del m.forward
        self._replaced = []

    @torch.compiler.disable
    def _record_replication(self, out: Tensor) -> None:
        # The layers recorded so far ran before the replication (on the N samples).
        self._note_precision(out)
        self._replications.append((torch.autograd.graph.get_gradient_edge(out), out.shape[0], len(self._records)))

    def _note_precision(self, out: Tensor) -> None:
        # The precision a layer ran in (autocast's dtype, else its output's) bounds how exactly per-task gradients
        # computed apart add up to one computed whole; float32 on CUDA may be TF32 (10-bit mantissa, as fp16).
        device = out.device.type
        precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out.dtype
        tf32 = device == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        if precision == torch.float32 and tf32:
            precision = torch.float16
        tolerance = {torch.bfloat16: 5e-2, torch.float16: 1e-2}.get(precision, 1e-4)
        self._tolerance = max(self._tolerance, tolerance)

    def _name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def _owner(self, param: Tensor) -> nn.Module:
        """The captured layer that holds ``param`` (its weight or bias, an attention's projection)."""
        return next(m for m in self._units if any(param is p for p in self._unit_params[id(m)]))

    def _owner_name(self, param: Tensor) -> str:
        return self._name(self._owner(param))

    # Never traced: inside a torch.compile'd model a traced hook would record tensors that the graph hands out as
    # extra outputs, cut off from the autograd path to the losses (every per-task gradient silently zero). Disabled,
    # the hook splits the graph there and records the real output.
    @torch.compiler.disable
    def _record(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._append(self._pieces[id(module)], inputs[0], output)

    def _append(self, piece: _Piece, x: Tensor | None, output: Tensor) -> None:
        if not output.requires_grad:
            raise ValueError(f"the output of {piece.name} does not require grad; OneBackward needs the "
                             "shared layers to be trainable and their forward recorded by autograd (not under "
                             "torch.no_grad, nor inside a reentrant torch.utils.checkpoint: use use_reentrant=False); "
                             "a layer run under torch.no_grad on purpose (a frozen teacher) does not belong in the "
                             "capture: leave it out of `modules=` or set its requires_grad=False")
        if piece.batch_dim and output.dim() <= piece.batch_dim + 1:
            raise ValueError(f"{piece.name} (of a batch_first=False transformer layer) ran on an unbatched "
                             f"{output.dim()}-D input: there is no batch dimension to split by task")
        self._note_precision(output)
        rows = output.shape[piece.batch_dim]
        self._records.append((piece, None if x is None else x.detach(), torch.autograd.graph.get_gradient_edge(output),
                              rows))

    def _attention_piece(self, mha: nn.Module, label: str, weight: Tensor | None, bias: Tensor | None,
                         offset: int, bias_offset: int, kind: str = "linear") -> _Piece | None:
        key = (id(mha), label)
        piece = self._attention_pieces.get(key)
        if piece is None:
            weight = weight if weight is not None and weight.requires_grad else None
            bias = bias if bias is not None and bias.requires_grad else None
            piece = _Piece(f"{self._name(mha)}.{label}", kind, mha, weight, bias, offset, bias_offset)
            self._attention_pieces[key] = piece
        return piece if piece.params else None

    def _project(self, mha, label, x, weight, w_start, bias, b_start, rows):
        """attention.mha_forward's projections: computed as plain_project does, recorded for the split."""
        out = attention.plain_project(mha, label, x, weight, w_start, bias, b_start, rows)
        piece = self._attention_piece(mha, label, weight, bias, w_start, b_start)
        if piece is not None:
            self._append(piece, x, out)
        return out

    def _extend(self, mha, label, param, batch):
        """bias_k / bias_v, one copy per sample: each sample's copy gets that sample's gradient."""
        out = attention.plain_extend(mha, label, param, batch)
        piece = self._attention_piece(mha, label, None, param, 0, 0, kind="bias")
        if piece is not None:
            self._append(piece, None, out)
        return out

    # Run eagerly under torch.compile (as the hooks: traced, what it records would be cut off from the losses).
    @torch.compiler.disable
    def _attention_forward(self, mha: nn.MultiheadAttention, *args, **kwargs):
        attention.check_once(mha, args, kwargs)
        return attention.mha_forward(mha, *args, **kwargs, project=self._project, extend=self._extend)

    @torch.compiler.disable
    def _record_task_norm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) in self._seq_first_norms:
            raise ValueError(f"{self._name(module)} is a task-specific norm inside "
                             f"{self._seq_first_norms[id(module)]}, a batch_first=False transformer layer: its "
                             "input is [sequence, batch, ...], so it would split the sequence (dim 0) into task "
                             "blocks; build the layer with batch_first=True")
        ids = kwargs.get("task_ids", args[1] if len(args) > 1 else None)
        self._norm_calls.append((module, args[0].shape[0], current_task_ids() if ids is None else ids))

    @torch.compiler.disable
    def _record_batch_norm(self, module: nn.Module, args: tuple) -> None:
        if module.training or module.running_mean is None:     # nn.BatchNorm's rule for using batch statistics
            self._batch_stat_calls.append((module, args[0].shape[0]))

    def _task_layout(self) -> tuple[int, Tensor | None]:
        """The batch the task-specific norms normalized (rows) and its per-sample task ids (None: T blocks)."""
        if not self._norm_calls:       # no task-specific norm: the widest captured layer ran on the whole batch
            return max(rows for *_, rows in self._records), None
        rows = {n for _, n, _ in self._norm_calls}
        if len(rows) > 1:
            raise ValueError(f"the task-specific norms normalized batches of {sorted(rows)} rows in one forward; "
                             "OneBackward needs every norm on the same (replicated) batch")
        ids = [ids for _, _, ids in self._norm_calls]
        if any(i is None for i in ids) and not all(i is None for i in ids):
            raise ValueError("some task-specific norms ran with per-sample task_ids and others in task-major "
                             "blocks; OneBackward needs one task layout for the whole forward")
        first = ids[0]
        if first is not None and any(i is not first and not torch.equal(i, first) for i in ids[1:]):
            raise ValueError("the task-specific norms ran with different task_ids in one forward; OneBackward "
                             "needs one task layout for the whole forward")
        return rows.pop(), first

    def _before_replication(self, batch: int, ids: Tensor | None) -> set[int]:
        """Indices of the records of layers that ran before mtl.replicate."""
        if not self._replications:
            return set()
        if len(self._replications) > 1:
            raise ValueError(f"mtl.replicate ran {len(self._replications)} times in one captured forward; "
                             "OneBackward needs one replication point")
        if ids is not None:
            raise ValueError("mtl.replicate builds task-major blocks; it cannot be combined with per-sample task_ids")
        _, rows, recorded_before = self._replications[0]
        if rows != batch:
            raise ValueError(f"mtl.replicate produced {rows} rows but the task-specific norms normalized {batch}")
        return set(range(recorded_before))

    def _check_layout(self, batch: int, ids: Tensor | None, before: set[int] = frozenset()) -> None:
        for i, (piece, _, _, n) in enumerate(self._records):
            if i in before:
                continue
            if n % batch:
                raise ValueError(f"{piece.name} ran on {n} rows, not on the batch of {batch} rows "
                                 "that the task-specific norms normalize (nor on a multiple of it): its weight "
                                 "gradient cannot be split by task. Leave layers that run before the batch is "
                                 "replicated, or per task (heads), out of `modules=` and pass their parameters as "
                                 "other_params")
        if ids is None and batch % self.num_tasks:
            raise ValueError(f"the batch of {batch} rows is not divisible into {self.num_tasks} task blocks; run "
                             "every shared layer on the replicated batch, or pass per-sample task ids")
        for module, rows in self._batch_stat_calls:
            if rows >= batch:
                raise ValueError(f"{self._name(module)} ({type(module).__name__}) normalizes with statistics over "
                                 f"{rows} rows that hold several tasks' samples, so each task's loss depends on the "
                                 "other tasks' samples and one backward cannot split the gradients by task. "
                                 "Convert it (tk.convert_batchnorm), put it in eval mode, or use "
                                 "mtl.autograd_gradients")

    def _task_sizes(self, ids: Tensor) -> tuple[int, ...]:
        """Samples per task, to split the rows: the counts the norms' validation read on the host for this very
        ids tensor (so no second synchronisation), else read here."""
        sizes = validation._checked_counts.get(ids, self.num_tasks)
        return sizes if sizes is not None else tuple(reference.samples_per_task(ids, self.num_tasks).tolist())

    def gradients(self, losses: Tensor | Sequence[Tensor], other_params: Sequence[Tensor] = (), *,
                  every_parameter: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """(G [T, P] of ``params``, the plain gradients of the summed losses for ``other_params``) from one
        backward. ``every_parameter``: also refuse (once per model) a trainable parameter of the model that the
        losses reach and that is in neither — backward_aggregated's step would give it no gradient."""
        losses = _stack_losses(losses)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(f"got {losses.shape[0]} losses for {self.num_tasks} tasks")
        if not self._records:
            raise RuntimeError("no forward was recorded: compute the losses inside `with capture:`")
        batch, ids = self._task_layout()
        before = self._before_replication(batch, ids)
        self._check_layout(batch, ids, before)
        records = [r for i, r in enumerate(self._records) if i not in before]
        pre_params = unique(p for p in [*(q for i, (piece, *_) in enumerate(self._records) if i in before
                                          for q in piece.params), *self._extra_pre] if p.requires_grad)
        if self._extra_pre and not self._replications:
            raise ValueError("OneBackward was given before_replication parameters but the forward did not "
                             "replicate the batch with mtl.replicate")
        replicated = [self._replications[0][0]] if pre_params else []
        edges = [edge for _, _, edge, _ in records]
        other_params = list(other_params)
        # A captured layer whose forward never ran may still own weights the forward used (functionally, as
        # F.linear(x, layer.weight), or a fused op bypassing nn.MultiheadAttention's forward): asking autograd for
        # them tells an unused layer (no gradient, zero columns are right) from one whose split would be missing.
        recorded = {id(piece.owner) for piece, *_ in self._records}
        unrecorded = unique(p for m in self._units if id(m) not in recorded for p in self._unit_params[id(m)])
        check = self.model not in _split_checked
        # every_parameter (a training step that gives every parameter its gradient), once per model with the split
        # check: a trainable parameter the losses reach that is neither split here nor one of other_params would
        # get no gradient at all, and the step would leave it as it is without a word.
        known = {id(p) for p in (*self.params, *other_params, *unrecorded)}
        unassigned = [(name, p) for name, p in self.model.named_parameters()
                      if every_parameter and check and p.requires_grad and id(p) not in known]
        if every_parameter and check:
            _refuse_outside_parameters(losses, known | {id(p) for p in self.model.parameters()})
        layout = {}
        offset = 0
        for p in self.params:
            layout[id(p)] = (offset, p.numel())
            offset += p.numel()
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in self.params))
        G = torch.zeros(self.num_tasks, offset, dtype=dtype, device=self.params[0].device)
        orders: dict[int, tuple[Tensor, list[int]]] = {}
        # Which params the losses reach (as backward() would give them a .grad at all): of a layer whose output
        # feeds no loss, the zero columns of G are no gradient.
        self.reached = set()

        def split(record, dy: Tensor) -> None:
            piece, x, _, n = record
            self.reached.update(id(q) for q in piece.params)
            if piece.batch_dim:
                x, dy = x.transpose(0, piece.batch_dim), dy.transpose(0, piece.batch_dim)
            if ids is None:
                weight_grads, bias_grads = _per_block_grads(piece, x, dy, self.num_tasks)
            else:
                repeats = n // batch
                if repeats not in orders:
                    row_ids = ids if repeats == 1 else ids.repeat_interleave(repeats)
                    orders[repeats] = (torch.argsort(row_ids, stable=True),
                                       [k * repeats for k in self._task_sizes(ids)])
                weight_grads, bias_grads = _per_task_grads_by_rows(piece, x, dy, *orders[repeats])
            for param, part, first in ((piece.weight, weight_grads, piece.offset),
                                       (piece.bias, bias_grads, piece.bias_offset)):
                if param is not None:   # rows [first, first + rows) of param: a contiguous range of its elements
                    part = part.reshape(self.num_tasks, -1)
                    start = layout[id(param)][0] + first * (param.numel() // param.shape[0])
                    G[:, start:start + part.shape[1]] += part.to(G.dtype)

        # A layer's output gradient is split as the backward reaches it (a hook on the node that made the output),
        # so that it is freed as in an ordinary backward instead of being held with every other layer's until the
        # backward ends. That works for the layers whose node lies above another recorded one (the backward must
        # run it to go on); the others (the lowest, a projection of parameters alone) are asked of autograd.grad.
        hooked = _above_another(edges)
        asked = [i for i in range(len(edges)) if i not in hooked]
        by_node: dict[torch.autograd.graph.Node, list[int]] = {}
        for i in hooked:
            by_node.setdefault(edges[i].node, []).append(i)

        def prehook(grad_outputs, indices):
            for i in indices:
                dy = grad_outputs[edges[i].output_nr]
                if dy is not None:
                    split(records[i], dy)

        inputs = [edges[i] for i in asked] + other_params + unrecorded + [p for _, p in unassigned] + replicated
        handles = [node.register_prehook(functools.partial(prehook, indices=indices))
                   for node, indices in by_node.items()]
        try:
            try:
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True,
                                            retain_graph=bool(pre_params) or check)
            except RuntimeError as exc:
                # A torch.compile'd backward that donates its buffers refuses to keep the graph (the check's second
                # backward needs it); it raises before it runs, so the graph is intact for one plain pass.
                if not check or pre_params or "donated buffer" not in str(exc):
                    raise
                warnings.warn("OneBackward cannot check its per-task split against a second backward of this "
                              "model: its compiled backward donates buffers (torch._functorch.config.donated_buffer "
                              "= False allows the check)", stacklevel=2)
                _split_checked.add(self.model)
                check = False
                # The nodes above the compiled one ran, and their hooks split into G, before it refused.
                G.zero_()
                self.reached = set()
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        finally:
            for handle in handles:       # the split check's backwards, and any later one, run without them
                handle.remove()
        out_grads = grads[:len(asked)]
        other_grads = list(grads[len(asked):len(asked) + len(other_params)])
        unrecorded_grads = grads[len(asked) + len(other_params):len(asked) + len(other_params) + len(unrecorded)]
        unassigned_reached = [name for (name, _), g in
                              zip(unassigned, grads[len(grads) - len(replicated) - len(unassigned):]) if g is not None]
        if unassigned_reached:
            raise ValueError(f"parameters {unassigned_reached} reach the losses but are neither split by task here "
                             "(their layers are not among the captured modules, or are of a kind OneBackward cannot "
                             "split) nor passed as other/task parameters: they would get no gradient. Pass the "
                             "task-specific ones (heads, task-specific norm weights) as task_params, capture the "
                             "shared layers, or set requires_grad=False on what is frozen")
        for p, g in zip(unrecorded, unrecorded_grads):
            if g is not None:
                owner = self._owner(p)
                if isinstance(owner, nn.MultiheadAttention):
                    raise ValueError(f"{self._name(owner)}'s parameters got a gradient but it never ran through "
                                     "OneBackward's recorded forward (its weights were used by something else: "
                                     "F.multi_head_attention_forward or a fused op called with them directly, or a "
                                     "torch.compile graph made before the capture and not recompiled); its per-task "
                                     "split is unknown. Call the module itself, leave it out of `modules=`, or use "
                                     "mtl.autograd_gradients")
                raise ValueError(f"{self._owner_name(p)}'s parameters got a gradient but its forward was never "
                                 "called (its weight is used directly, as F.linear(x, layer.weight)); its per-task "
                                 "split is unknown. Call the layer itself, leave it out of `modules=`, or use "
                                 "mtl.autograd_gradients")
        for i, dy in zip(asked, out_grads):
            if dy is not None:
                split(records[i], dy)
        if pre_params and grads[-1] is not None:
            self._per_task_grads_before_replication(G, layout, grads[-1], pre_params, retain_graph=check)
        if check:
            self._check_split(G, layout, losses, set(map(id, pre_params)))
        self._reset()
        return G, other_grads

    def _per_task_grads_before_replication(self, G: Tensor, layout: dict, grad: Tensor, params: list[Tensor],
                                           retain_graph: bool) -> None:
        """Rows of G for the parameters used before mtl.replicate: task t's gradient is the backward of block t of
        the replicated tensor's gradient alone, through the part that ran once (T backward passes over it)."""
        replicated = self._replications[0][0]
        T = self.num_tasks
        rows = grad.shape[0] // T
        for t in range(T):
            block = torch.zeros_like(grad)
            block[t * rows:(t + 1) * rows] = grad[t * rows:(t + 1) * rows]
            for p, g in zip(params, torch.autograd.grad(replicated, params, block, allow_unused=True,
                                                        retain_graph=retain_graph or t < T - 1)):
                if g is not None:
                    self.reached.add(id(p))
                    start, size = layout[id(p)]
                    G[t, start:start + size] += g.reshape(-1).to(G.dtype)

    def _check_split(self, G: Tensor, layout: dict, losses: Tensor, before_replication: set[int]) -> None:
        """Once per model (host syncs, one more backward; a training loop makes a new capture each step): Σ_t c_t·G_t
        must be the gradient of Σ_t c_t·L_t, with weights c whose neighbours differ in sign. Every column of G is
        a sum over rows (samples) of per-row parts; the split holds iff each row's part comes from the task it is
        assigned to, and a row that feeds other tasks' losses (a layer mixing samples of different tasks, rows in
        another order than the split assumes) makes the two differ."""
        T = self.num_tasks
        t = torch.arange(T, device=losses.device)
        c = (1 - 2 * (t % 2)) * (1 + t / T)                 # +1, −(1 + 1/T), +(1 + 2/T), ...
        # The graph is kept for one more backward, which only a failing comparison runs (the rounding floor below).
        want = torch.autograd.grad((losses * c.to(losses.dtype)).sum(), self.params, allow_unused=True,
                                   retain_graph=True)
        floor = None
        # In norms against the size of the terms Σ_t |c_t|·|G_t| (the signs of c cancel much of the sum), at the
        # precision the forward ran in; a parameter whose gradients are all rounding next to the largest (a bias
        # under a norm: ~0) says nothing.
        columns = [G[:, start:start + size] for start, size in (layout[id(p)] for p in self.params)]
        terms = [float(c.abs().to(G.dtype) @ g.norm(dim=1)) for g in columns]
        largest = max(terms, default=0.0)
        if not all(map(math.isfinite, terms)) or any(w is not None and not bool(torch.isfinite(w).all()) for w in want):
            return   # an overflowed step (float16 under a loss scale) says nothing; the next one is checked
        if largest == 0.0 and all(w is None or not bool(w.any()) for w in want):
            return   # no gradient at all (zero-initialised heads): nothing was compared, so the next step is checked
        compared = 0
        for i, (p, g, w, size) in enumerate(zip(self.params, columns, want, terms)):
            got = c.to(G.dtype) @ g
            w = torch.zeros_like(got) if w is None else w.reshape(-1).to(got.dtype)
            if size < 1e-2 * largest and float(w.norm()) < 1e-2 * largest:
                continue
            mismatch = float((got - w).norm())
            if mismatch > self._tolerance * max(size, float(w.norm())):
                # A gradient that is rounding through and through (a loss constant up to rounding, as the sum of
                # a norm's output) differs between any two ways of computing it by about its own size. The
                # rounding floor of this backward: the same gradient for weights scaled by 4/3 (not a power of
                # two, so every operation rounds anew), against 4/3 of the first.
                if floor is None:
                    again = torch.autograd.grad((losses * (c * 4 / 3).to(losses.dtype)).sum(), self.params,
                                                allow_unused=True)
                    floor = [0.0 if a is None else float((a.reshape(-1).to(got.dtype)
                                                          - 4 / 3 * (0 if b is None else b.reshape(-1).to(got.dtype))
                                                          ).norm()) for a, b in zip(again, want)]
                if mismatch <= 64 * floor[i]:
                    continue       # rounding: this parameter says nothing
                if id(p) in before_replication:
                    name = next((n for n, q in self.model.named_parameters() if q is p), "outside the model")
                    raise ValueError("a parameter used before mtl.replicate also reaches the losses another way "
                                     f"({name}, shape {tuple(p.shape)}): its gradient does not split by task "
                                     "block; use the replicated tensor alone after mtl.replicate")
                raise ValueError(f"the per-task gradients of {self._owner_name(p)} do not split by task: rows of its "
                                 "output feed other tasks' losses than the rows' own (something mixes samples of "
                                 "different tasks, or the rows are not in task-major blocks of whole samples — "
                                 "e.g. torch.cat of two batches along dim 0). Use mtl.autograd_gradients")
            compared += 1
        if compared:            # else every gradient was rounding: nothing was checked, so the next step is
            _split_checked.add(self.model)


def _above_another(edges: Sequence[torch.autograd.graph.GradientEdge]) -> set[int]:
    """Indices of the edges whose node reaches another edge's node through the backward graph: a backward asked for
    that one must run theirs. One walk over the nodes below the edges, each node once."""
    targets = {edge.node for edge in edges}
    reaches: dict[torch.autograd.graph.Node, bool] = {}   # node -> whether a target lies strictly below it
    for root in targets:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in reaches:
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            if expanded:
                reaches[node] = any(child in targets or reaches[child] for child in children)
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches)
    return {i for i, edge in enumerate(edges) if reaches[edge.node]}


def _refuse_outside_parameters(losses: Tensor, known: set[int]) -> None:
    """Raise when an nn.Parameter that is not the model's (nor split, nor passed) reaches the losses: backward()
    would give it a gradient, backward_aggregated none (a learned loss weighting's log-variances multiplied into
    the losses, a second model's layer). Found by walking the losses' autograd graph to its leaves, once per model."""
    if losses.grad_fn is None:
        return
    seen, stack, outside = set(), [losses.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)          # AccumulateGrad: the leaf tensor it accumulates into
        if leaf is not None:
            if isinstance(leaf, nn.Parameter) and leaf.requires_grad and id(leaf) not in known:
                outside.append(leaf)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    if outside:
        shapes = ", ".join(str(tuple(p.shape)) for p in outside[:5]) + (f" and {len(outside) - 5} more"
                                                                         if len(outside) > 5 else "")
        raise ValueError(f"{len(outside)} parameter(s) outside the captured model reach the losses (shapes "
                         f"{shapes}): backward_aggregated would give them no gradient. Pass them in task_params "
                         "(e.g. a learned loss weighting's parameters), or detach what should not be trained")


# Per-block weight-gradient work (multiply-adds) from which one convolution per block beats one grouped convolution
# over all blocks. Measured on the CPU (oneDNN): the loop is 1.2–4× faster at 2e8–6e8 (ResNet layers, 8 rows a
# block) and costs ~0.2 ms a call, so at T=40 blocks of 1e6–5e6 the grouped form is up to 5× faster.
LOOP_MIN_BLOCK_MACS = 5e7


def _per_block_grads(piece: _Piece, x: Tensor | None, dy: Tensor, T: int) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients of each of the T task blocks: [T, *weight.shape], [T, out] (None: not split).

    Computed in the dtype the layer ran in, which its output gradient has: under autocast the ordinary backward
    forms the weight gradient from the cast input in that dtype too (and at its speed), then widens it.
    Convolutions: one weight-gradient convolution per block on the block's rows (views, nothing copied) when a
    block holds enough work, else one grouped convolution over the blocks set side by side in channels (a
    transposed copy of x and dy, one call)."""
    if piece.kind == "bias":                # one copy of the bias per row: [B, ..., E]
        return None, dy.reshape(T, -1, dy.shape[-1]).sum(dim=1)
    rows = x.shape[0] // T
    x = x.to(dy.dtype)
    if piece.kind == "linear":
        xb = x.reshape(T, -1, x.shape[-1])
        gb = dy.reshape(T, -1, dy.shape[-1])
        return (None if piece.weight is None else torch.bmm(gb.transpose(1, 2), xb),
                None if piece.bias is None else gb.sum(dim=1))
    module = piece.owner
    # Splitting the batch dimension into [T, rows] is a view in every memory format.
    blocks_x, blocks_dy = x.reshape(T, rows, *x.shape[1:]), dy.reshape(T, rows, *dy.shape[1:])
    bias = None if piece.bias is None else blocks_dy.sum(dim=(1, *range(3, blocks_dy.dim())))
    weight_grad_fn = _weight_grad_fn(module)
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if rows * math.prod(dy.shape[2:]) * module.weight.numel() >= LOOP_MIN_BLOCK_MACS:
        return torch.stack([weight_grad_fn(blocks_x[t], module.weight.shape, blocks_dy[t], groups=module.groups,
                                           **conv) for t in range(T)]), bias
    # The T blocks become T·groups groups of one convolution: [rows, T·C, *spatial] ⊛ [rows, T·O, *spatial].
    xg = blocks_x.transpose(0, 1).reshape(rows, T * x.shape[1], *x.shape[2:])
    gg = blocks_dy.transpose(0, 1).reshape(rows, T * dy.shape[1], *dy.shape[2:])
    grouped_shape = (T * module.weight.shape[0], *module.weight.shape[1:])
    wg = weight_grad_fn(xg, grouped_shape, gg, groups=module.groups * T, **conv)
    return wg.reshape(T, *module.weight.shape), bias


def _per_task_grads_by_rows(piece: _Piece, x: Tensor | None, dy: Tensor, order: Tensor, counts: list[int]
                            ) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients of each task from per-sample task ids: the rows gathered task by task (``order``
    sorts them by task, ``counts`` are the task sizes, some possibly 0), one weight gradient per task."""
    dy = dy.index_select(0, order)
    if piece.kind == "bias":
        return None, torch.stack([gt.reshape(-1, gt.shape[-1]).sum(dim=0) for gt in dy.split(counts)])
    x = x.to(dy.dtype).index_select(0, order)
    weights, biases = [], []
    for xt, gt in zip(x.split(counts), dy.split(counts)):
        if piece.kind == "linear":
            xt, gt = xt.reshape(-1, xt.shape[-1]), gt.reshape(-1, gt.shape[-1])
            weights.append(gt.transpose(0, 1) @ xt)
            biases.append(gt.sum(dim=0))
            continue
        module = piece.owner
        biases.append(gt.sum(dim=(0, *range(2, gt.dim()))))
        if gt.shape[0] == 0:
            weights.append(module.weight.new_zeros(module.weight.shape, dtype=dy.dtype))
            continue
        weights.append(_weight_grad_fn(module)(xt, module.weight.shape, gt, stride=module.stride,
                                               padding=module.padding, dilation=module.dilation,
                                               groups=module.groups))
    return (None if piece.weight is None else torch.stack(weights),
            None if piece.bias is None else torch.stack(biases))


def _keep_off_fast_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook: its presence keeps an nn.TransformerEncoderLayer off its fused inference path."""
