"""order: choose the topological order the steps run in (see :class:`OrderPass`)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import ClassVar

from hyperion.errors import PassError
from hyperion.ir import ExecutionMode, Graph
from hyperion.passes._infra import Pass, PassResult, ensure
from hyperion.passes.liveness import compute_liveness, step_live_bytes
from hyperion.passes.ordering.model import StepModel, build_step_model
from hyperion.passes.ordering.regions import SearchBudget, exact_order, order_by_regions
from hyperion.passes.program import Program


@dataclass(frozen=True)
class OrderResult:
    order: tuple[str, ...]
    peak_bytes: int                   # peak of step_live_bytes for ``order``
    file_peak_bytes: int              # the same for the file's (base) order
    optimal_peak_bytes: int | None    # the proven optimum over all topological orders
    strategy: str                     # the candidate that won: file, topological, greedy, search


@dataclass(frozen=True)
class OrderPass(Pass):
    """Choose the topological order the steps run in, minimising the peak of live bytes.

    Rules:

    1. the result is a topological order of the graph (every producer before its
       consumers) holding every node once;
    2. the objective is the peak of ``step_live_bytes`` (``passes/liveness.py``) at one
       step per segment: live activations and graph inputs still needed, plus every
       weight in the ``normal`` planning mode or the step's own weights otherwise
       (``memory_opt``; streaming plans as ``memory_opt``);
    3. candidates: the ONNX file's order (or, if that is not topological, the
       topological order closest to it), the plain topological order (Kahn's
       algorithm generation by generation), a greedy order (Kahn's algorithm
       preferring the ready node that grows resident bytes least) and the searched
       order -- the base order cut at sequence points into regions
       (``ordering/regions.py``), each region that sets the peak ordered by an exact
       dynamic program over sets of executed nodes (SERENITY, ``ordering/search.py``)
       within a state budget, or past it by beam search and exact re-search of windows
       around the peak (``ordering/local.py``);
    4. the candidate with the lowest peak wins, earlier candidates on ties -- so the
       file's order wins ties and the result is never worse than the file's or the
       plain topological order;
    5. ``optimal_peak_bytes`` is set when the search proved its peak optimal over every
       topological order: the peak equals the largest single step (no order can go
       lower), every cut forced and every region that sets the peak solved exactly, or
       the whole graph solved exactly as one region. The search counts states, not
       seconds, so the same graph always gets the same order.

    Writes ``program.order`` and ``program.order_result``. Postcondition: rule 1.
    """

    name: ClassVar[str] = "order"
    budget: SearchBudget = field(default_factory=SearchBudget)

    def call(self, program: Program) -> PassResult:
        result = plan_order(program.graph, program.planning_mode, self.budget)
        modified = result != program.order_result or result.order != program.order
        program.order = result.order
        program.order_result = result
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        ensure(program.order is not None and program.graph.is_topological_order(program.order), self.name,
               "the order is not topological or misses a node")


def peak_live_bytes(graph: Graph, order: tuple[str, ...], mode: ExecutionMode) -> int:
    return max(step_live_bytes(graph, compute_liveness(graph, order), mode), default=0)


def base_order(graph: Graph) -> tuple[str, ...]:
    """The file's order if it is topological, else the topological order closest to it."""
    file_order = graph.file_order()
    if graph.is_topological_order(file_order):
        return file_order
    return graph.topological_order(key=lambda n: graph.nodes[n].index)


def plan_order(graph: Graph, mode: ExecutionMode, budget: SearchBudget | None = None) -> OrderResult:
    """The lowest-peak candidate order of ``graph`` (see the module docstring)."""
    budget = budget or SearchBudget()
    base = base_order(graph)
    model = build_step_model(graph, base, mode)
    searched = order_by_regions(model, budget)
    proven = searched.optimal or searched.peak <= model.step_lower_bound()
    optimum = model.constant_bytes + searched.peak if proven and base else None
    search_order = searched.order
    # A forced decomposition is never harder than the whole graph: only unforced ones are
    # retried. The whole graph contains every region, so once a region's exact search ran
    # out of states, the same budget over the whole graph would too: skip it.
    if (optimum is None and not searched.forced and not searched.exhausted
            and 0 < model.size <= budget.whole_graph_nodes):
        exact = exact_order(model, searched, budget)
        if exact is not None:
            search_order, optimum = exact[0], model.constant_bytes + exact[1]
    candidates = {
        "file": tuple(range(model.size)),
        "topological": _generations(model),
        "greedy": _greedy(model),
        "search": search_order,
    }
    peaks = {name: model.peak(order) for name, order in candidates.items()}
    strategy = min(peaks, key=peaks.__getitem__)  # the first of the lowest: the file's order on ties
    if optimum is not None and peaks[strategy] != optimum:
        raise PassError(f"order search claims an optimum of {optimum} bytes but its order peaks at "
                        f"{peaks[strategy]}")
    return OrderResult(tuple(base[i] for i in candidates[strategy]), peaks[strategy], peaks["file"], optimum,
                       strategy)


def _generations(model: StepModel) -> tuple[int, ...]:
    """Plain topological order: Kahn's algorithm generation by generation, as networkx's
    ``topological_sort``, each generation in base order."""
    waiting = [len(p) for p in model.preds]
    generation = [v for v in range(model.size) if waiting[v] == 0]
    order: list[int] = []
    while generation:
        order += generation
        following = []
        for v in generation:
            for w in model.succs[v]:
                waiting[w] -= 1
                if waiting[w] == 0:
                    following.append(w)
        generation = sorted(following)
    return tuple(order)


def _greedy(model: StepModel) -> tuple[int, ...]:
    """Greedy over node indices: a node's score is the bytes it keeps minus the bytes of
    the inputs it is the last remaining reader of; ties go to the base order. Scores are
    refreshed lazily (stale heap entries are skipped), so the whole run is O((V+T) log V)."""
    pending = [len(r) for r in model.tensor_readers]
    waiting = [len(p) for p in model.preds]
    done = [False] * model.size

    def score(v: int) -> int:
        return model.kept_bytes[v] - sum(model.tensor_bytes[t] for t in model.reads[v] if pending[t] == 1)

    current = {v: score(v) for v in range(model.size) if waiting[v] == 0}
    heap = [(s, v) for v, s in current.items()]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        s, v = heapq.heappop(heap)
        if done[v] or current.get(v) != s:
            continue
        done[v] = True
        order.append(v)
        for t in model.reads[v]:
            pending[t] -= 1
            if pending[t] == 1:  # its last reader now frees it: that reader's score drops
                last = next(c for c in model.tensor_readers[t] if not done[c])
                if last in current:
                    current[last] = score(last)
                    heapq.heappush(heap, (current[last], last))
        for w in model.succs[v]:
            waiting[w] -= 1
            if waiting[w] == 0:
                current[w] = score(w)
                heapq.heappush(heap, (current[w], w))
    return tuple(order)
