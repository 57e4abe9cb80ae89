"""order: topological, never worse than the file's order, optimal where it says so."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperion
from fixtures.irregular import random_ir_dag, random_wired
from hyperion.ir import ExecutionMode, Graph
from hyperion.passes import Program
from hyperion.passes.liveness import compute_liveness
from hyperion.passes.memory.plan_memory import lower_bound
from hyperion.passes.ordering.model import build_step_model
from hyperion.passes.ordering.order import OrderPass, base_order, peak_live_bytes, plan_order
from hyperion.passes.ordering.problem import RegionSet
from hyperion.passes.ordering.regions import SearchBudget, decompose
from hyperion.passes.ordering.search import state_key
from tests.conftest import FIXTURE_NAMES, fixture_path
from tests.passes.helpers import program_from_model, program_from_text

MODES = (ExecutionMode.NORMAL, ExecutionMode.MEMORY_OPT)
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
# Two branches that each blow x (64 B) up to 256 B and reduce it to 4 B; the file
# interleaves them, so both 256 B tensors are live at once.
TWO_BRANCHES = f"""{HEADER}
g (float[16] x) => (float[1] y) {{
    a1 = Concat <axis = 0> (x, x, x, x)
    b1 = Concat <axis = 0> (x, x, x, x)
    a2 = ReduceMax <axes = [0], keepdims = 1> (a1)
    b2 = ReduceMax <axes = [0], keepdims = 1> (b1)
    y = Add (a2, b2)
}}"""
SMALL = SearchBudget(quick_states=1, max_states=1, local_states=1, total_states=1, beam_width=1,
                     total_beam_states=1)
dags = st.builds(random_ir_dag, seed=st.integers(0, 10**6), n_nodes=st.integers(1, 8),
                 weights=st.booleans(), constants=st.sampled_from([0.0, 0.3]))


def _is_topological(graph: Graph, order: tuple[str, ...]) -> bool:
    position = {node: i for i, node in enumerate(order)}
    return sorted(order) == sorted(graph.nodes) and all(position[e.src] < position[e.dst] for e in graph.edges())


def _all_topological_orders(graph: Graph) -> Iterator[tuple[str, ...]]:
    """Every topological order of a small graph, by depth-first choice of a ready node."""
    waiting = {node: len(graph.predecessors(node)) for node in graph.nodes}

    def extend(prefix: list[str]) -> Iterator[tuple[str, ...]]:
        if len(prefix) == len(graph.nodes):
            yield tuple(prefix)
            return
        for node in [n for n, count in waiting.items() if count == 0 and n not in prefix]:
            for succ in graph.successors(node):
                waiting[succ] -= 1
            yield from extend([*prefix, node])
            for succ in graph.successors(node):
                waiting[succ] += 1

    yield from extend([])


def _brute_force_optimum(graph: Graph, mode: ExecutionMode) -> int:
    return min(peak_live_bytes(graph, order, mode) for order in _all_topological_orders(graph))


def _outputs_in_order(graph: Graph, order: tuple[str, ...]) -> list[str]:
    return [graph.nodes[node].outputs[0] for node in order]


# -- hand-built ---------------------------------------------------------------------------------
def test_search_beats_a_bad_file_order_on_two_branches() -> None:
    graph = program_from_text(TWO_BRANCHES).graph
    # File order a1 b1 a2 b2 y, by hand: step 1 holds x (64) + a1 (256) + b1 (256) = 576.
    assert peak_live_bytes(graph, graph.file_order(), ExecutionMode.NORMAL) == 576
    result = plan_order(graph, ExecutionMode.NORMAL)
    # Finishing one branch first: x + a1 = 320, x + a1 + a2 = 324, x + a2 + b1 = 324,
    # a2 + b1 + b2 = 264, a2 + b2 + y = 12. Whichever big tensor comes second shares its
    # step with x and a small result, so 324 is the optimum.
    assert result.peak_bytes == 324
    assert result.optimal_peak_bytes == 324
    assert result.file_peak_bytes == 576
    assert _outputs_in_order(graph, result.order) == ["a1", "a2", "b1", "b2", "y"]


def test_the_file_order_wins_ties() -> None:
    program = program_from_text(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        a = Relu(x)
        b = Neg(x)
        y = Add(a, b)
    }}""")
    result = plan_order(program.graph, ExecutionMode.NORMAL)
    assert result.strategy == "file"
    assert result.order == program.graph.file_order()


def test_a_non_topological_file_order_is_repaired() -> None:
    graph = random_ir_dag(3, 6)
    shuffled = Graph([graph.nodes[n] for n in reversed(graph.file_order())], graph.tensors, graph.inputs,
                     graph.outputs)
    assert not _is_topological(shuffled, shuffled.file_order())
    result = plan_order(shuffled, ExecutionMode.MEMORY_OPT)
    assert _is_topological(shuffled, result.order)
    assert result.optimal_peak_bytes == _brute_force_optimum(shuffled, ExecutionMode.MEMORY_OPT)


def test_the_pass_records_its_result_on_the_program() -> None:
    program = program_from_text(TWO_BRANCHES)
    result = OrderPass()(program)
    assert result.modified
    assert program.order == program.order_result.order
    assert program.order_result.optimal_peak_bytes == 324


def test_the_schedule_records_the_proven_optimum() -> None:
    path = fixture_path("demo")
    schedule = hyperion.compile(path, mode="memory_opt", input_shapes={"image": [1, 3, 64, 64]}).schedule
    graph = program_from_model(str(path)).graph
    assert schedule.optimal_peak_bytes == 753664  # below the file order's 786432, see docs/ordering.md
    assert schedule.lower_bound_bytes <= schedule.optimal_peak_bytes <= schedule.peak_bytes
    assert [s.node for s in schedule.steps] != list(graph.file_order())
    data = schedule.to_dict()
    assert hyperion.Schedule.from_dict(data).optimal_peak_bytes == 753664
    del data["optimal_peak_bytes"]  # files written before the field existed still load
    assert hyperion.Schedule.from_dict(data).optimal_peak_bytes is None


def _generated_weights(layers: int) -> str:
    """A chain of MatMuls whose 16 KiB weights ConstantOfShape generates, all generators first."""
    shapes = ", ".join(f"int64[2] s{i} = {{64, 64}}" for i in range(layers))
    generators = "\n".join(f"    w{i} = ConstantOfShape <value = float[1] {{0.5}}> (s{i})" for i in range(layers))
    chain = "\n".join(f"    h{i + 1} = MatMul (h{i}, w{i})" for i in range(layers))
    return f"""{HEADER}
g (float[1, 64] h0) => (float[1, 64] h{layers}) <{shapes}> {{
{generators}
{chain}
}}"""


@pytest.mark.parametrize("mode", MODES)
def test_a_generated_weight_is_made_right_before_its_reader(mode: ExecutionMode) -> None:
    graph = program_from_text(_generated_weights(40)).graph
    result = plan_order(graph, mode)
    # The file makes all 40 weights first (640 KiB live); the optimum holds one at a time.
    assert result.file_peak_bytes > 40 * 16384
    for i in range(40):
        reader = result.order.index(graph.tensors[f"h{i + 1}"].producer)
        assert result.order[reader - 1] == graph.tensors[f"w{i}"].producer
    assert result.optimal_peak_bytes == result.peak_bytes < 2 * 16384 + 1024


@pytest.mark.parametrize("mode", MODES)
def test_the_search_tries_a_generated_weight_only_beside_its_reader(mode: ExecutionMode) -> None:
    # Left free, every generator is ready from the start and each search state expands all
    # of them: a 446-node network with generated weights took 27 million dict lookups.
    graph = program_from_text(_generated_weights(6)).graph
    model = build_step_model(graph, base_order(graph), mode)
    assert all(model.floating()[model.names.index(graph.tensors[f"w{i}"].producer)] for i in range(6))
    regions = RegionSet(model, [range(model.size)])
    problem = regions.problem(0)
    for i in range(1, 6):
        generator = model.names.index(graph.tensors[f"w{i}"].producer)
        previous_layer = model.names.index(graph.tensors[f"h{i}"].producer)
        assert problem.preds[generator] == 1 << previous_layer
        assert generator in problem.succs[previous_layer]


# -- budget, determinism --------------------------------------------------------------------------
def test_past_the_budget_the_heuristic_orders_and_claims_no_optimum() -> None:
    graph = program_from_model(random_wired(16, seed=1)).graph
    exact = plan_order(graph, ExecutionMode.NORMAL)
    cheap = plan_order(graph, ExecutionMode.NORMAL, SMALL)
    assert exact.optimal_peak_bytes is not None and exact.peak_bytes < exact.file_peak_bytes
    assert cheap.optimal_peak_bytes is None
    assert _is_topological(graph, cheap.order)
    assert exact.peak_bytes <= cheap.peak_bytes <= cheap.file_peak_bytes


def test_same_graph_same_order() -> None:
    first = plan_order(program_from_model(random_wired(16, seed=1)).graph, ExecutionMode.MEMORY_OPT)
    again = plan_order(program_from_model(random_wired(16, seed=1)).graph, ExecutionMode.MEMORY_OPT)
    assert first == again


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_get_a_proven_order_no_worse_than_the_file(name: str) -> None:
    graph = program_from_model(str(fixture_path(name))).graph
    for mode in MODES:
        result = plan_order(graph, mode)
        assert _is_topological(graph, result.order)
        assert result.peak_bytes == peak_live_bytes(graph, result.order, mode)
        assert result.peak_bytes <= peak_live_bytes(graph, graph.file_order(), mode)
        assert result.optimal_peak_bytes == result.peak_bytes


def test_repeated_layers_are_cut_into_forced_regions() -> None:
    graph = program_from_model(str(fixture_path("transformer_block"))).graph
    decomposition = decompose(build_step_model(graph, base_order(graph), ExecutionMode.NORMAL))
    assert decomposition.forced
    assert len(decomposition.regions) > 1
    assert sorted(v for region in decomposition.regions for v in region) == list(range(len(graph.nodes)))


# -- properties on random DAGs ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(graph=dags, mode=st.sampled_from(MODES))
def test_order_is_topological_bounded_and_never_worse(graph: Graph, mode: ExecutionMode) -> None:
    result = plan_order(graph, mode)
    assert _is_topological(graph, result.order)
    assert result.peak_bytes == peak_live_bytes(graph, result.order, mode)
    assert result.peak_bytes <= peak_live_bytes(graph, graph.file_order(), mode)
    assert result.peak_bytes <= peak_live_bytes(graph, graph.topological_order(), mode)
    assert result.peak_bytes >= lower_bound(graph, compute_liveness(graph, result.order), mode)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(graph=dags, mode=st.sampled_from(MODES))
def test_exact_search_agrees_with_brute_force(graph: Graph, mode: ExecutionMode) -> None:
    result = plan_order(graph, mode)
    assert result.optimal_peak_bytes == _brute_force_optimum(graph, mode)
    assert result.peak_bytes == result.optimal_peak_bytes


@settings(max_examples=60, deadline=None, derandomize=True)
@given(graph=dags, mode=st.sampled_from(MODES))
def test_regions_alone_claim_only_true_optima(graph: Graph, mode: ExecutionMode) -> None:
    # Without the whole-graph search, a claim rests on the forced cuts and floating nodes.
    result = plan_order(graph, mode, SearchBudget(whole_graph_nodes=0))
    if result.optimal_peak_bytes is not None:
        assert result.optimal_peak_bytes == _brute_force_optimum(graph, mode)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), n_nodes=st.integers(1, 30), mode=st.sampled_from(MODES),
       shuffle=st.randoms(use_true_random=False))
def test_the_step_model_follows_liveness_rules(seed: int, n_nodes: int, mode: ExecutionMode, shuffle) -> None:
    graph = random_ir_dag(seed, n_nodes)
    model = build_step_model(graph, graph.file_order(), mode)
    order = list(graph.topological_order(key=lambda _: shuffle.random()))
    index = {name: i for i, name in enumerate(model.names)}
    assert model.peak([index[n] for n in order]) == peak_live_bytes(graph, tuple(order), mode)


def test_empty_graph() -> None:
    graph = Graph([], {}, (), ())
    result = plan_order(graph, ExecutionMode.NORMAL)
    assert result.order == () and result.peak_bytes == 0
    assert OrderPass()(Program(graph)).program.order == ()


def test_wide_regions_key_states_by_a_uniform_hash() -> None:
    # Python hashes ints modulo 2**61 - 1: {k} and {k + 61} would collide in every dict.
    key = state_key(200)
    assert key is not None
    hashes = {hash(key(1 << k | 1 << (k + 61))) for k in range(100)} | {hash(key(1 << k)) for k in range(200)}
    assert len(hashes) == 300
    assert state_key(61) is None   # up to 61 nodes a state's int hash is the state itself
