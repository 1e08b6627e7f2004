"""The one interface every merge method implements, and the registry that names them.

A method works on named tensors and never on a whole model: the engine gives it a
:class:`MergeContext` (the base checkpoint, opened lazily, and the names to merge) and then one
expert checkpoint per :meth:`MergeMethod.step`. The method owns ``buffer``, one tensor per merged
name (the merged weights, unless ``buffer_is_output`` is false), and reads base and expert tensors
one at a time, so what stays resident is the buffer plus a few tensors.

A method that needs every expert's task vector to compute a merged tensor (Iso-CTS, WUDI) derives
from :class:`AllAtOnceMethod` instead (``continual = False``): the engine checks each expert as it
arrives, then calls :meth:`AllAtOnceMethod.merge_all` once with every expert, which reads, per
merged name, θ0 and that one tensor of each expert and hands them to
:meth:`AllAtOnceMethod.merge_tensor`.
"""

from __future__ import annotations

import difflib
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hf_merge.errors import NotContinualError, UsageError
from hf_merge.io.checkpoint import Checkpoint, TensorSpec, faulted_empty
from hf_merge.merging.distributed import Executor


@dataclass(frozen=True)
class Parameter:
    """One hyperparameter as a method declares it: the CLI, the recipe, ``--help``, the card and
    the README read these declarations, so a method is one file.

    Attributes:
        name: The key in ``parameters:`` of a recipe and in ``--param NAME=VALUE``.
        default: The value when the recipe leaves it unset (the reference implementation's).
        help: One line for ``--help`` and the README's method table.
        type: ``float``, ``int``, ``bool`` or ``str``; an int is accepted where a float is declared.
        minimum, maximum: Inclusive bounds of a number (``None``: unbounded on that side).
        exclusive_minimum: ``minimum`` itself is refused (a fraction in (0, 1]).
        choices: The allowed values of a ``str`` (or any) parameter; empty: any value of ``type``.
        flags: Named CLI flags besides ``--param`` (``("--scaling", "--lambda")``); a flag that
            several methods declare sets whichever parameter the chosen method gives it.
        tune_grid: The candidates ``--tune`` tries for this parameter; empty: never tuned.
    """

    name: str
    default: Any
    help: str
    type: type = float
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[Any, ...] = ()
    flags: tuple[str, ...] = ()
    tune_grid: tuple[float, ...] = ()

    def check(self, value: Any, method: str) -> Any:
        """``value`` converted to the declared type; :class:`UsageError` (one line naming the
        parameter, what is allowed and the method) when it is of the wrong type or out of range."""
        where = f"method '{method}': parameter '{self.name}'"
        if self.type is bool:
            if not isinstance(value, bool):
                raise UsageError(f"{where} must be true or false, got {_short(value)}")
            return value
        if self.type in (int, float):
            number_types = (int,) if self.type is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, number_types) or value != value:
                kind = "an integer" if self.type is int else "a number"
                raise UsageError(f"{where} must be {kind}{self._range_text()}, got {_short(value)}")
            too_low = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum)
            too_high = self.maximum is not None and value > self.maximum
            if too_low or too_high:
                raise UsageError(f"{where} must be{self._range_text()}, got {_short(value)}")
            value = self.type(value)
        elif self.type is str and not isinstance(value, str):
            raise UsageError(f"{where} must be a string, got {_short(value)}")
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"{where} must be one of {allowed}, got {_short(value)}")
        return value

    def _range_text(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f" in {'(' if self.exclusive_minimum or self.minimum is None else '['}{low}, {high}{']' if self.maximum is not None else ')'}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class MergeContext:
    """What a method needs to know about the merge it takes part in.

    Attributes:
        base: θ0, opened lazily.
        names: The merged tensor names, sorted (every pass uses this order).
        linear_names: Those of ``names`` that are 2-D weights of an ``nn.Linear``.
        executor: Device for the math and the processes sharing the work.
        compute_dtype: Precision of the arithmetic (float32; float64 for exactness checks).
    """

    base: Checkpoint
    names: list[str]
    linear_names: frozenset[str] = field(default_factory=frozenset)
    executor: Executor = field(default_factory=Executor.local)
    compute_dtype: torch.dtype = torch.float32


class MergeMethod(ABC):
    """A merge method: ``init(context)``, then ``step(expert)`` per expert, ``finalize()``.

    Subclasses declare themselves (``name``, ``display_name``, ``paper``, ``summary``,
    ``continual``, ``reads_data`` and ``parameters``) and implement :meth:`_step`;
    ``state_dict()`` / ``load_state_dict()`` carry the method's scalars between runs. ``defaults``
    is derived from ``parameters``.
    """

    name: ClassVar[str]
    #: How the card and ``--help`` name the method ("Task Arithmetic").
    display_name: ClassVar[str] = ""
    #: The paper's link (arXiv abstract page; OpenReview's where the paper is not on arXiv).
    paper: ClassVar[str] = ""
    #: One line for the README's method table and ``--help``.
    summary: ClassVar[str] = ""
    #: How the model card titles the method ("OPCM (orthogonal projection-based continual
    #: merging)"); empty: ``display_name``.
    card_title: ClassVar[str] = ""
    #: The model card's paragraph: what the method does, with its citation (Markdown); empty:
    #: ``summary`` and a link to ``paper``.
    description: ClassVar[str] = ""
    #: True when each step needs only the previous result (and state of bounded size): ``add`` and
    #: the watcher can continue such a merge. False: the method needs every expert at once.
    continual: ClassVar[bool] = True
    #: True when the method reads data (images) besides the weights.
    reads_data: ClassVar[bool] = False
    #: Every hyperparameter, declared.
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    #: ``{parameter: default}``, derived from ``parameters``.
    defaults: ClassVar[dict[str, Any]] = {}
    #: False when ``buffer`` holds something else than the merged weights (MagMax keeps the
    #: largest task vector); such buffers are saved next to the state and :meth:`output` derives
    #: the weights from them.
    buffer_is_output: ClassVar[bool] = True
    #: The parameter that only scales the output (a
    #: :class:`~hf_merge.merging.methods.scaled_output.ScaledOutputMethod`'s); ``None``: none does.
    scaled_output: ClassVar[str | None] = None
    #: Default of the engine's ``checkpoint_every``: write the output after every N-th step. 1 where
    #: a step costs far more than writing a model (OPCM's decompositions, TIES's selection), so
    #: writing each step is cheap insurance; larger where a step is cheaper than the write itself.
    checkpoint_every: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {p.name: p.default for p in cls.parameters}

    @classmethod
    def parameter(cls, name: str) -> Parameter:
        """The declaration of parameter ``name``; :class:`UsageError` (with the closest name) if none."""
        for declared in cls.parameters:
            if declared.name == name:
                return declared
        known = [p.name for p in cls.parameters]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        listing = ", ".join(known) or "none"
        raise UsageError(f"method '{cls.name}' has no parameter {_short(name)}{hint}; its parameters: {listing}")

    @classmethod
    def check_parameters(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value: ``values`` checked against the declarations, defaults for the
        rest. Raises :class:`UsageError` on an unknown name, a wrong type or a value out of range."""
        checked = dict(cls.defaults)
        for name, value in values.items():
            checked[name] = cls.parameter(name).check(value, cls.name)
        return checked

    def __init__(self, **hyperparameters: Any):
        self.hyperparameters: dict[str, Any] = self.check_parameters(hyperparameters)
        self.validate()
        self.step_count = 0
        self.buffer: dict[str, torch.Tensor] = {}
        self._context: MergeContext | None = None
        #: Set by the engine while a step that will be written runs: called with each merged name
        #: whose output is final for the step, so it can be written while the step goes on.
        self.ready: Callable[[str], None] | None = None

    @property
    def context(self) -> MergeContext:
        """The merge this method takes part in (set by :meth:`init`)."""
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__}.init(context) must run before the method is used")
        return self._context

    def validate(self) -> None:
        """Checks across parameters that their declarations cannot express; :class:`UsageError`."""
        return None  # a hook: most methods have no such checks

    # -- the interface -------------------------------------------------------------------------
    def init(self, context: MergeContext) -> None:
        """Start from θ0: the buffer holds a copy of every merged base tensor."""
        self._context = context
        self.buffer = {name: self._initial_buffer(name) for name in context.names}

    def step(self, expert: Checkpoint) -> dict[str, float]:
        """Merge one more expert into the buffer; returns metrics worth logging (λ_t, norms, ...)."""
        self.step_count += 1
        return self._step(expert)

    def finalize(self) -> None:
        """Complete the merged weights after the last step (continual methods: nothing to do)."""
        return None

    def output(self, name: str) -> torch.Tensor:
        """The merged tensor ``name`` in the base checkpoint's dtype."""
        return self.buffer[name]

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state besides the buffer (the step count and the method's own scalars)."""
        return {"step": self.step_count, **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any], buffer: Mapping[str, torch.Tensor]) -> None:
        """Restore a saved state; ``buffer`` is the saved merged weights (or state tensors)."""
        self.step_count = int(state["step"])
        self._load_extra_state(state)
        missing = [n for n in self.context.names if n not in buffer]
        if missing:
            raise KeyError(missing[0])
        self.buffer = {name: buffer[name] for name in self.context.names}

    # -- for subclasses -----------------------------------------------------------------------
    @abstractmethod
    def _step(self, expert: Checkpoint) -> dict[str, float]: ...

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None  # methods without scalars of their own keep nothing

    def _initial_buffer(self, name: str) -> torch.Tensor:
        return self.context.base.get(name)

    def _unfilled_buffer(self, name: str) -> torch.Tensor:
        """An ``_initial_buffer`` for methods whose step 1 overwrites every tensor (M_1 = θ_1):
        reading θ0 into it would be wasted."""
        base = self.context.base
        return faulted_empty(base.shape(name), base.dtype(name))

    def _set_from(self, checkpoint: Checkpoint, name: str) -> None:
        """Set buffer tensor ``name`` to ``checkpoint``'s, read straight into it when the dtypes
        match (else through scratch memory)."""
        target = self.buffer[name]
        if checkpoint.dtype(name) == target.dtype and target.is_contiguous():
            checkpoint.get(name, out=target)
        else:
            self._assign(name, read_scratch(checkpoint, name, 0))

    def _math(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor moved to the compute device and precision."""
        return tensor.to(self.context.executor.device, self.context.compute_dtype)

    def _stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A computed tensor back on CPU in the base checkpoint's dtype."""
        return tensor.to("cpu", self.context.base.dtype(name))

    def _done(self, name: str) -> None:
        """``name``'s output is final for this step (nothing in the step changes it any more)."""
        if self.ready is not None:
            self.ready(name)

    def _assign(self, name: str, value: torch.Tensor) -> None:
        """Set buffer tensor ``name`` to ``value`` inside the buffer's own storage (converting dtype
        and device), so the buffer never moves: tensors replaced one by one would leave holes in
        the heap that stay resident, and fresh allocations cost a page fault per 4 KiB."""
        target = self.buffer[name]
        if value is not target:
            target.copy_(value)


class AllAtOnceMethod(MergeMethod):
    """A method whose merged tensor depends on every expert's task vector at once.

    The engine resolves, downloads and checks each expert as it arrives (as for a continual step),
    then calls :meth:`merge_all` once with every expert. For each merged name it reads θ0 and that
    tensor of every expert, so what is resident is the output buffer plus one tensor per expert,
    never whole expert models; subclasses implement :meth:`merge_tensor`. A merge made this way
    cannot be continued (``add``, the watcher): a new expert changes every merged tensor.
    """

    continual = False

    def init(self, context: MergeContext) -> None:
        """Start with an empty buffer: :meth:`merge_all` fills it name by name."""
        self._context = context
        self.buffer = {}

    def merge_all(self, experts: Sequence[Checkpoint]) -> dict[str, float]:
        """Merge every expert at once into the buffer (one merged tensor per name, each marked
        final with :meth:`_done` as it is computed); returns metrics worth logging."""
        if not experts:
            raise UsageError(f"method '{self.name}' needs at least one expert")
        self.check_expert_count(len(experts))
        self.step_count = len(experts)
        base = self.context.base
        for name in self.context.names:
            theta0 = base.get(name)
            thetas = [expert.get(name) for expert in experts]
            if all(torch.equal(theta, theta0) for theta in thetas):
                # every task vector is zero: each method's result is θ0 itself, kept bit-exact
                self.buffer[name] = theta0
            else:
                thetas = [self._math(theta) for theta in thetas]  # each read goes as it is converted
                self.buffer[name] = self._stored(name, self.merge_tensor(name, self._math(theta0), thetas))
            del thetas  # before the next name's reads: one tensor per expert resident
            self._done(name)
        return {}

    def check_expert_count(self, count: int) -> None:
        """Refuse, before any tensor is merged, a number of experts the method cannot merge;
        :class:`UsageError` (one line)."""

    @abstractmethod
    def merge_tensor(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The merged tensor ``name`` from θ0 (``base``) and every expert's tensor, all on the
        compute device in the compute precision; the engine stores it in the base's dtype. The
        expert tensors are the method's own: it may change them in place (into task vectors)."""

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        raise NotContinualError(
            f"method '{self.name}' merges every expert at once and cannot add one expert to a merge; "
            "re-run `hf-merge merge` with all experts"
        )


def total(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ of same-shape tensors, in a fresh tensor."""
    result = tensors[0].clone()
    for tensor in tensors[1:]:
        result += tensor
    return result


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.slots: list[torch.Tensor] = []


_SCRATCH = _Scratch()


def read_scratch(checkpoint: Checkpoint, name: str, slot: int) -> torch.Tensor:
    """``checkpoint.get(name)`` read into this thread's reusable memory ``slot``: valid until this
    thread reads into the same slot again, so a step that only looks at a tensor before the next
    read costs no page faults of fresh memory (a fresh 350 MB read took 2.5x as long as a reused one)."""
    shape, dtype = checkpoint.shape(name), checkpoint.dtype(name)
    nbytes = TensorSpec(name, shape, dtype).nbytes
    slots = _SCRATCH.slots
    while len(slots) <= slot:
        slots.append(torch.empty(0, dtype=torch.uint8))
    if slots[slot].numel() < nbytes:
        slots[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return checkpoint.get(name, out=slots[slot][:nbytes].view(dtype).view(shape))


def release_scratch() -> None:
    """Free this thread's scratch memory (a worker thread's goes with the thread)."""
    _SCRATCH.slots = []


_RUN = 1024  # elements per float32 partial sum in squared_norm


def squared_norm(tensor: torch.Tensor) -> float:
    """‖x‖²: float32 sums over runs of 1024 elements (exact to ~1e-7 each), added up in float64, so
    whole-model norms neither lose precision nor depend on the order of tensors.

    A float64 copy of every tensor would cost ten times as much; a single float32 dot product
    over millions of squares drifts by 1e-5.
    """
    flat = tensor.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    whole = flat.numel() - flat.numel() % _RUN
    parts = [flat[:whole].view(-1, _RUN), flat[whole:].view(1, -1)]
    total = sum(float(torch.linalg.vector_norm(p, dim=1).double().square().sum()) for p in parts if p.numel())
    if math.isinf(total) and bool(torch.isfinite(flat).all()):  # squares beyond float32's range
        flat = flat.double()
        total = float(torch.dot(flat, flat))
    return total
