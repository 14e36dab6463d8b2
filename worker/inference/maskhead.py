"""DETR-panoptic with its mask head run a chunk of queries at a time.

The public DETR export computes the mask head for all its queries (100) in one batch at a
quarter of the input's size: about 2 GB of activations at 800x1066, which onnxruntime's arena
keeps for the life of the worker. The head treats each query on its own (its convolutions
and group norms see one query's planes at a time), so the same graph run on a slice of the
queries gives those queries' masks. ``ChunkedDetr`` cuts the model file in two at load time:

- the *trunk*: everything that does not depend on a query, i.e. the backbone, the
  transformer, ``logits`` and ``pred_boxes``, and the image-level parts of the mask head
  (the FPN adapters, the keys of the attention map), run once per image;
- the *head*: the nodes that depend on the decoder's per-query states, run on ``chunk``
  queries at a time, their ``pred_masks`` joined in query order.

Which tensors carry the queries is read off one small probe inference of the whole model,
which also checks the cut: the chunked model must give the whole model's outputs, or the
worker loads the file as it is and says why. Nothing about the file is assumed beyond its
output names (``logits``, ``pred_masks``).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MASKS = "pred_masks"
LOGITS = "logits"
PROBE_SIZE = (96, 128)  # height, width: small, so the probe costs little, and no side is Q


class CannotChunk(Exception):
    """The model's mask head cannot be cut from it; the message says why."""


@dataclass
class Cut:
    trunk: bytes  # serialized models
    head: bytes
    queries: list[str]  # head inputs whose axis 1 is the query axis
    shared: list[str]  # head inputs computed once per image


def _ancestors(graph: onnx.GraphProto, names: Iterable[str]) -> set[int]:
    """Indexes of the nodes ``names`` depend on."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    seen: set[str] = set()
    nodes: set[int] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        i = producer.get(name)
        if i is not None and i not in nodes:
            nodes.add(i)
            stack.extend(_reads(graph.node[i]))
    return nodes


def _reads(node: onnx.NodeProto) -> list[str]:
    """The names ``node`` reads: its inputs, and the outer names its subgraphs (If, Loop) use."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names.extend(sorted(_outer_names(sub)))
    return names


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    inner |= {i.name for i in graph.input}
    return {i for n in graph.node for i in n.input if i and i not in inner}


def _inputs_of(nodes: Sequence[onnx.NodeProto], constants: set[str]) -> list[str]:
    """Names ``nodes`` read that none of them make and that are no initializer, in order."""
    made = {o for n in nodes for o in n.output}
    names: list[str] = []
    for node in nodes:
        for name in _reads(node):
            if name and name not in made and name not in constants and name not in names:
                names.append(name)
    return names


def _serialized_with_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> bytes:
    """``model`` serialized with ``outputs`` as its outputs (no copy of its weights)."""
    saved = []
    for declared in model.graph.output:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(declared)
        saved.append(copy)
    known = {o.name: o for o in saved}
    del model.graph.output[:]
    model.graph.output.extend(known.get(n) or helper.make_empty_tensor_value_info(n) for n in outputs)
    try:
        return model.SerializeToString()
    finally:
        del model.graph.output[:]
        model.graph.output.extend(saved)


def head_nodes(model: onnx.ModelProto) -> tuple[list[int], list[str]]:
    """The nodes only ``pred_masks`` needs, and the names they read from the rest."""
    graph = model.graph
    others = [o.name for o in graph.output if o.name != MASKS]
    if MASKS not in {o.name for o in graph.output} or LOGITS not in others:
        raise CannotChunk(f"the model has no {MASKS!r} and {LOGITS!r} outputs")
    only_masks = sorted(_ancestors(graph, [MASKS]) - _ancestors(graph, others))
    constants = {i.name for i in graph.initializer}
    return only_masks, _inputs_of([graph.node[i] for i in only_masks], constants)


def cut(
    model: onnx.ModelProto,
    only_masks: Sequence[int],
    queries: Sequence[str],
    dtypes: dict[str, np.dtype],
    num_queries: int,
) -> Cut:
    """Split ``model`` so that the nodes of ``only_masks`` (``head_nodes``) depending on
    ``queries`` (tensors with the query axis at 1) form the head and everything else the
    trunk; ``dtypes`` has the type of each tensor that crosses the cut. ``model`` becomes
    the trunk (its weights are moved, not copied: a worker should not hold the model three
    times while it loads)."""
    graph = model.graph
    # what carries the queries: the query tensors, and the count of queries where the
    # tracer baked it into the head (a Tile by [1, 100, 1, 1, 1], a Reshape to 100 planes)
    tainted = set(queries) | {
        node.output[0] for i in only_masks if (node := graph.node[i]).op_type == "Constant"
        and _holds_count(_constant_value(node), num_queries)
    } | {t.name for t in graph.initializer if _holds_count(numpy_helper.to_array(t), num_queries)}
    per_query: list[int] = []
    for i in only_masks:  # graph.node is in topological order
        node = graph.node[i]
        if tainted.intersection(_reads(node)):
            per_query.append(i)
            tainted.update(o for o in node.output if o)
    if not per_query:
        raise CannotChunk("no node of the mask head reads the per-query tensors")
    # the head's own constants go with it (one may hold the query count to be freed)
    read = {name for i in per_query for name in _reads(graph.node[i])}
    per_query += [i for i in only_masks if graph.node[i].op_type == "Constant"
                  and set(graph.node[i].output) & read]  # fmt: skip
    per_query = sorted(set(per_query))
    constants = {t.name for t in graph.initializer}
    head_inputs = _inputs_of([graph.node[i] for i in per_query], constants)
    shared = [name for name in head_inputs if name not in queries]

    head = onnx.ModelProto(
        ir_version=model.ir_version, producer_name="segq", opset_import=model.opset_import
    )
    head.graph.name = f"{graph.name or 'detr'} mask head"
    head.graph.node.extend(graph.node[i] for i in per_query)
    for name in head_inputs:
        if name not in dtypes:
            raise CannotChunk(f"the probe did not see {name!r}, an input of the mask head")
        elem = helper.np_dtype_to_tensor_dtype(dtypes[name])
        head.graph.input.append(helper.make_tensor_value_info(name, elem, None))
    masks = next(o for o in graph.output if o.name == MASKS)  # its declared query count goes
    head.graph.output.append(helper.make_tensor_value_info(MASKS, masks.type.tensor_type.elem_type, None))
    read = {name for node in head.graph.node for name in _reads(node)}
    head.graph.initializer.extend(t for t in graph.initializer if t.name in read)
    free_query_count(head, num_queries, queries[0])

    trunk_outputs = [o.name for o in graph.output if o.name != MASKS]
    trunk_outputs += [n for n in head_inputs if n not in trunk_outputs]
    kept = []
    in_head = set(per_query)
    for i, node in enumerate(graph.node):
        if i not in in_head:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            kept.append(copy)
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused(graph)
    trunk = _serialized_with_outputs(model, trunk_outputs)
    return Cut(trunk=trunk, head=head.SerializeToString(), queries=list(queries), shared=shared)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Initializers no node reads (the other part's weights)."""
    used = {name for n in graph.node for name in _reads(n)}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    del graph.value_info[:]  # shapes of the whole model; each part infers its own


def _constant_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return None if value is None else numpy_helper.to_array(value)


def _holds_count(values: Optional[np.ndarray], num_queries: int) -> bool:
    """An int64 shape-like constant (a scalar or a short vector) with the query count in it."""
    return (
        values is not None and values.dtype == np.int64 and values.ndim <= 1
        and values.size <= 8 and num_queries in values.ravel()
    )  # fmt: skip


def free_query_count(head: onnx.ModelProto, num_queries: int, query: str) -> int:
    """Replace the query count baked into the head's int64 constants (a reshape to
    ``[batch, 100, h, w]``, a tile by 100) with the count of the chunk being run, read from
    the shape of ``query``. Returns how many values were replaced."""
    graph = head.graph
    count_name = "segq_chunk_queries"
    replaced = 0
    new_nodes: list[onnx.NodeProto] = []
    initializers = {t.name: t for t in graph.initializer}

    def patched(name: str, values: Optional[np.ndarray]) -> Optional[list[onnx.NodeProto]]:
        if not _holds_count(values, num_queries):
            return None
        parts = []
        nodes = []
        for k, v in enumerate(values.ravel().tolist()):
            if v == num_queries:
                parts.append(count_name)
            else:
                const = f"{name}_segq_part{k}"
                nodes.append(helper.make_node("Constant", [], [const],
                                              value=numpy_helper.from_array(np.array([v], np.int64))))
                parts.append(const)
        if values.ndim == 0:
            nodes.append(helper.make_node("Squeeze", [count_name], [name]))
        else:
            nodes.append(helper.make_node("Concat", parts, [name], axis=0))
        return nodes

    for node in list(graph.node):
        if node.op_type != "Constant":
            new_nodes.append(node)
            continue
        replacement = patched(node.output[0], _constant_value(node))
        if replacement is None:
            new_nodes.append(node)
        else:
            new_nodes.extend(replacement)
            replaced += 1
    for name, tensor in initializers.items():
        replacement = patched(name, numpy_helper.to_array(tensor))
        if replacement is not None:
            graph.initializer.remove(tensor)
            new_nodes[:0] = replacement
            replaced += 1
    if replaced:
        axis = numpy_helper.from_array(np.array([1], np.int64))
        new_nodes[:0] = [  # Shape(query)[1:2], in ops every opset has
            helper.make_node("Shape", [query], [f"{count_name}_shape"]),
            helper.make_node("Constant", [], [f"{count_name}_axis"], value=axis),
            helper.make_node("Gather", [f"{count_name}_shape", f"{count_name}_axis"], [count_name]),
        ]
    del graph.node[:]
    graph.node.extend(_topological(new_nodes, {i.name for i in graph.input}
                                   | {t.name for t in graph.initializer}))
    return replaced


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ready = set(available) | {""}
    ordered: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for node in pending:
            if ready.issuperset(_reads(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise CannotChunk("the mask head's nodes cannot be ordered after the cut")
        pending = rest
    return ordered


class ChunkedDetr:
    """A DETR-panoptic file served as trunk + chunked mask head, with ``InferenceSession``'s
    ``run``, ``get_inputs``, ``get_outputs`` and ``get_providers``, so the pipeline is the
    same whichever it holds. Build it with ``load_chunked``."""

    def __init__(self, trunk: ort.InferenceSession, head: ort.InferenceSession, *,
                 queries: list[str], shared: list[str], chunk: int) -> None:  # fmt: skip
        self.trunk, self.head, self.chunk = trunk, head, chunk
        self.queries, self.shared = queries, shared
        self._trunk_outputs = [o.name for o in trunk.get_outputs()]
        self._masks_output = [o for o in head.get_outputs() if o.name == MASKS]

    def get_inputs(self) -> list[Any]:
        return self.trunk.get_inputs()

    def get_outputs(self) -> list[Any]:
        declared = [o for o in self.trunk.get_outputs() if o.name not in self.queries + self.shared]
        return declared + self._masks_output

    def get_providers(self) -> list[str]:
        return self.trunk.get_providers()

    def run(self, output_names: Optional[Sequence[str]], feeds: dict[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:  # fmt: skip
        names = list(output_names or [o.name for o in self.get_outputs()])
        values = dict(zip(self._trunk_outputs, self.trunk.run(self._trunk_outputs, feeds, run_options)))
        if MASKS in names:
            values[MASKS] = self.masks(values, run_options)
        return [values[name] for name in names]

    def masks(self, values: dict[str, np.ndarray], run_options: Any = None) -> np.ndarray:
        """``pred_masks`` for every query, ``chunk`` queries per head run."""
        total = values[self.queries[0]].shape[1]
        parts = []
        for start in range(0, total, self.chunk):
            feeds = {name: values[name] for name in self.shared}
            feeds.update({name: values[name][:, start:start + self.chunk] for name in self.queries})
            parts.append(self.head.run([MASKS], feeds, run_options)[0])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def load_chunked(
    path: Path,
    make_session: Callable[[bytes], ort.InferenceSession],
    *,
    chunk: int,
    probe_feeds: Optional[dict[str, np.ndarray]] = None,
) -> ChunkedDetr:
    """The DETR file ``path`` cut in two (see the module's docstring), the cut checked on one
    small probe image. ``make_session(model_bytes)`` makes a session with the worker's
    options. Raises ``CannotChunk`` when the cut is impossible or its outputs differ in any
    bit from the whole model's."""
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001  not ONNX: the whole-file load says it the usual way
        raise CannotChunk(f"onnx cannot read the file: {str(e).splitlines()[0][:200]}") from None
    only_masks, boundary = head_nodes(model)
    # every tensor a cut may cross: what the mask head reads, and what its nodes make
    made = [o for i in only_masks for o in model.graph.node[i].output if o]
    crossing = boundary + [name for name in made if name != MASKS]
    outputs = [o.name for o in model.graph.output]
    probe = make_session(_serialized_with_outputs(model, outputs + crossing))
    feeds = probe_feeds or _probe_feeds(probe)
    expected = dict(zip(outputs + crossing, probe.run(outputs + crossing, feeds)))
    del probe
    num_queries = int(expected[LOGITS].shape[1])
    queries = [
        name for name in boundary
        if expected[name].dtype.kind == "f" and expected[name].ndim >= 2
        and expected[name].shape[1] == num_queries and expected[name].shape[0] == 1
    ]  # fmt: skip
    if not queries:
        raise CannotChunk(f"no input of the mask head has {num_queries} queries on its axis 1")
    dtypes = {name: value.dtype for name, value in expected.items()}
    parts = cut(model, only_masks, queries, dtypes, num_queries)
    del model
    try:
        trunk = make_session(parts.trunk)
        parts.trunk = b""
        head = make_session(parts.head)
        chunked = ChunkedDetr(trunk, head, queries=parts.queries, shared=parts.shared,
                              chunk=chunk)  # fmt: skip
        got = dict(zip(outputs, chunked.run(outputs, feeds)))
    except Exception as e:  # noqa: BLE001  onnxruntime's untyped errors: the cut did not hold
        raise CannotChunk(f"the cut model fails on the probe: {str(e).splitlines()[0][:300]}") from None
    finally:
        _give_back_freed_memory()
    for name in outputs:
        if got[name].shape != expected[name].shape or not np.array_equal(got[name], expected[name]):
            diff = (np.abs(got[name] - expected[name]).max()
                    if got[name].shape == expected[name].shape else "shape")  # fmt: skip
            raise CannotChunk(f"the cut model's {name} differs from the whole model's ({diff})")
    return chunked


def _give_back_freed_memory() -> None:
    """Return the heap freed by the model copies of the load to the system (glibc keeps
    freed small blocks otherwise, and the worker's RSS would carry them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _probe_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """A small random image (and a pixel mask of ones) for ``session``'s inputs."""
    from worker.inference.sessions import input_shape

    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name == "pixel_values":
            feeds[spec.name] = rng.standard_normal((1, 3, *PROBE_SIZE), dtype=np.float32)
        else:  # pixel_mask: fixed [1, 64, 64] in the public export, else the image's size
            feeds[spec.name] = np.ones(input_shape(session, spec.name, (1, *PROBE_SIZE)), np.int64)
    return feeds
