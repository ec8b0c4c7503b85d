"""Subgraph structure: what If/Loop/Scan bodies read from the graphs around them, where each node
sits, and the topological order of every (sub)graph with those outer-scope reads counted.

ONNX Runtime's quantizers re-sort a model's top graph by the inputs its nodes list, and
onnxconverter-common appends the casts it adds at the end. A node that owns a subgraph also
reads, through it, names of the enclosing graph, so it can end up ahead of the node that makes
them: ONNX Runtime still runs such a model, onnx.checker refuses it ("Nodes in a graph must be
topologically sorted"). `sort_model_file` repairs that after every step that writes a model.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from pathlib import Path

import onnx

from core.model import subgraphs


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that `graph` (its subgraphs included) reads without defining them: for a subgraph,
    the names it takes from the enclosing graphs."""
    defined = {i.name for i in graph.input}
    defined.update(t.name for t in graph.initializer)
    defined.update(t.values.name for t in graph.sparse_initializer)
    read = {o.name for o in graph.output}
    for node in graph.node:
        defined.update(node.output)
        read.update(node.input)
        read.update(implicit_inputs(node))
    read.discard("")
    return read - defined


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads through its subgraphs from the graph it sits in (or further out)."""
    names: set[str] = set()
    for _, g in subgraphs(node):
        names |= outer_reads(g)
    return names


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the subgraphs of `graph`'s nodes read from `graph` (or from further out)."""
    read: set[str] = set()
    for node in graph.node:
        read |= implicit_inputs(node)
    return read


def outer_read_producers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of `graph` whose outputs a subgraph of another of its nodes reads."""
    read = subgraph_reads(graph)
    return [node for node in graph.node if read.intersection(node.output)]


def subgraph_nodes(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    """(where, node) for every node inside a subgraph of `graph`, at any depth. `where` names the
    subgraph as `<owner node>.<attribute>`, nested ones joined by ` > ` (e.g. `/If.then_branch`)."""
    for node in graph.node:
        for attr, g in subgraphs(node):
            inner = f"{where} > " if where else ""
            inner += f"{node.name or node.op_type}.{attr}"
            for n in g.node:
                yield inner, n
            yield from subgraph_nodes(g, inner)


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in an order where every node comes after the nodes making what it reads,
    explicitly or through its subgraphs. Names not made by a node of this graph (graph inputs,
    initializers, outer-scope names, empty optional inputs) are available from the start. Stable:
    among the nodes ready at once the earliest one goes first, so a sorted graph keeps its order;
    nodes caught in a cycle (which no order can fix) keep their relative order at the end."""
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer.setdefault(out, i)
    waiting_on: list[int] = []
    readers: list[list[int]] = [[] for _ in graph.node]
    for i, node in enumerate(graph.node):
        deps = {producer[name] for name in (*node.input, *implicit_inputs(node)) if name in producer}
        deps.discard(i)
        waiting_on.append(len(deps))
        for d in deps:
            readers[d].append(i)
    ready = [i for i, n in enumerate(waiting_on) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting_on[r] -= 1
            if waiting_on[r] == 0:
                heapq.heappush(ready, r)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]
    return order


def sort_graph(graph: onnx.GraphProto) -> int:
    """Re-sort `graph` and every subgraph in place (see topological_order). Returns how many
    nodes changed place, over all graphs."""
    order = topological_order(graph)
    moved = sum(1 for pos, i in enumerate(order) if pos != i)
    if moved:
        nodes = []
        for i in order:
            copy = onnx.NodeProto()
            copy.CopyFrom(graph.node[i])
            nodes.append(copy)
        del graph.node[:]
        graph.node.extend(nodes)
    for node in graph.node:
        for _, g in subgraphs(node):
            moved += sort_graph(g)
    return moved


def sort_model_file(path: Path) -> int:
    """Re-sort every graph of the model file at `path`, rewriting it only when a node moved.
    External data stays where it is (only the graph is read and written). Returns the count."""
    model = onnx.load(str(path), load_external_data=False)
    moved = sort_graph(model.graph)
    if moved:
        onnx.save_model(model, str(path))
    return moved
