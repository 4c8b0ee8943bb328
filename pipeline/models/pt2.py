"""Load a ``torch.export`` program (``.pt2``) without running anything from the file.

``torch.export.load`` is not safe on a file from someone else. Measured on torch 2.13, a
crafted archive runs code while it is loaded, or on the program's first call, through:

* pickles: weights or constants marked ``use_pickle``, ``opaque_obj_*`` constants, the
  sample inputs every archive carries, legacy ``data/*/model.pt`` files, any second
  ``models/*.json``, and torch 2.7's zip layout, all unpickled with ``weights_only=False``;
* AOTInductor members: a shared library is ``dlopen``-ed, or a compiler command taken from
  the archive is run;
* the program's JSON: ``expr_str`` goes to ``sympy.sympify`` (``eval``), ``guards_code`` is
  ``exec``-ed, pytree specs import modules, and names and string constants are pasted
  unescaped into the Python source that FX generates and ``exec``-s.

So this loader never calls ``torch.export.load``. It reads the archive into memory with
torch's own zip reader and accepts only what a plain ``torch.export.save`` writes: the
member names of one program; tensors from raw bytes (a pickled tensor only through the
``weights_only`` unpickler); symbolic expressions and guards that parse to arithmetic over
whitelisted names; identifier-like strings everywhere else. Then torch's deserializer
builds the program from those already-decoded parts. Anything else is refused with the
reason. It relies on the archive layout (version "0") and deserializer of torch 2.13; on
another torch it refuses rather than guesses.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
from typing import Any

import torch

from ..errors import ModelError, first_line
from ..io import fs

# Every member torch.export.save writes for one plain program (paths below the archive's root).
_MEMBER = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/model_weights_config\.json"
    r"|data/constants/model_constants_config\.json|data/sample_inputs/model\.pt"
    r"|data/weights/weight_\d+|data/constants/tensor_\d+|extra/[\x20-\x7e]+"
)
# Identifiers, dotted op names, versions: nothing that could close a quote in generated code.
_SAFE_STRING = re.compile(r"[\w.+#-]*", re.ASCII)
_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u3, ...: symbolic sizes
_SYMPY_CALLS = frozenset(
    "Symbol Integer Float Rational Mul Add Pow Max Min Abs Mod floor ceiling Eq Ne Lt Le Gt Ge "
    "And Or Not Piecewise ExprCondPair StrictLessThan StrictGreaterThan LessThan GreaterThan "
    "Equality Unequality BooleanTrue BooleanFalse".split()
)
_GUARD_NAMES = frozenset(
    "L math torch max min abs round IsNonOverlappingAndDenseIndicator "
    "cast_symbool_to_symint_guardless".split()
)
_GUARD_ATTRIBUTES = frozenset(
    "size stride storage_offset floor ceil trunc inf nan isnan sin cos tan asin acos atan sinh "
    "cosh tanh sym_float _sym_sqrt".split()
)
_ARITHMETIC = (
    ast.Expression, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
    ast.Compare, ast.BoolOp, ast.IfExp, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


class UnsafeArchive(ValueError):
    """The archive holds something this loader will not run or unpickle."""


def load_program(path: str) -> Any:
    """The ``torch.export.ExportedProgram`` in ``path``; ModelError naming what was refused."""
    try:
        return _load(path)
    except UnsafeArchive as exc:
        raise ModelError(
            f"model.path: {path}: refused to load this torch.export program: {exc}; only what a "
            f"plain torch.export.save writes is accepted (no pickled objects, AOTInductor code or "
            f"executable expressions)"
        ) from None


def _load(path: str) -> Any:
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader
    except ImportError:
        raise UnsafeArchive(
            f"this torch ({torch.__version__}) lacks the archive reader it was checked against (2.13)"
        ) from None
    data = fs.read_bytes(path)
    if not data.startswith(b"PK\x03\x04"):
        raise UnsafeArchive("not a zip archive")
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
        version = reader.read_string("archive_version")
    except Exception as exc:
        raise UnsafeArchive(f"not a readable .pt2 archive ({first_line(exc)})") from None
    if version != "0" or len(set(names)) != len(names):
        raise UnsafeArchive(f"archive version {version!r} (expected '0') or duplicate members")
    for name in names:
        if not _MEMBER.fullmatch(name):
            raise UnsafeArchive(f"unexpected member {name!r}")
    try:
        program_json = reader.read_bytes("models/model.json")
        check_program_json(json.loads(program_json))
        state = _tensors(reader, "weights", "weight_", parameters=True)
        constants = _tensors(reader, "constants", "tensor_", parameters=False)
        raw = reader.read_bytes("data/sample_inputs/model.pt")
        examples = torch.load(io.BytesIO(raw), weights_only=True) if raw else None
    except UnsafeArchive:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise UnsafeArchive(f"a pickled object that weights_only loading refuses{what}") from None
    except Exception as exc:  # missing members, malformed JSON
        raise UnsafeArchive(f"{type(exc).__name__}: {first_line(exc)}") from None
    if examples is not None and not (
        isinstance(examples, tuple) and len(examples) == 2
        and isinstance(examples[0], tuple) and isinstance(examples[1], dict)
    ):  # fmt: skip
        raise UnsafeArchive("its sample inputs are not (args, kwargs)")
    try:
        program = _bytes_to_dataclass(schema.ExportedProgram, program_json)
        return ExportedProgramDeserializer().deserialize(program, state, constants, examples)
    except Exception as exc:
        raise UnsafeArchive(f"cannot rebuild the program ({first_line(exc)})") from None


def _tensors(reader: Any, kind: str, prefix: str, parameters: bool) -> dict[str, torch.Tensor]:
    """Weights or constants from raw bytes, by the archive's config (no pickle but weights_only)."""
    from torch._export.serde.serialize import (
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )
    from torch.export.pt2_archive._package import _build_file_map, _load_payload_config

    folder = f"data/{kind}/"
    config = _load_payload_config(reader, f"{folder}model_{kind}_config.json")
    names = set(reader.get_file_names())
    for fqn, meta in config.config.items():
        check_program_json(fqn)
        if not re.fullmatch(prefix + r"\d+", meta.path_name) or folder + meta.path_name not in names:
            raise UnsafeArchive(f"{kind} entry {fqn!r} points at {meta.path_name!r}")
    raw = _build_file_map(reader, config, folder)  # raw bytes; skips use_pickle entries
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        if meta.use_pickle:  # a tensor subclass: only through the weights_only unpickler
            value = torch.load(io.BytesIO(reader.read_bytes(folder + meta.path_name)), weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise UnsafeArchive(f"{kind} entry {fqn!r} is not a tensor")
            out[fqn] = value
            continue
        tm = meta.tensor_meta
        assert tm is not None  # _build_file_map refused a non-pickled entry without one
        tensor = torch.as_strided(
            raw[meta.path_name],
            deserialize_size(tm.sizes),
            deserialize_stride(tm.strides),
            deserialize_storage_offset(tm.storage_offset),
        )
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=tm.requires_grad) if parameters and meta.is_param else tensor
    return out


def check_program_json(node: Any, key: str | None = None) -> None:
    """Refuse any part of the program's JSON that torch would evaluate or paste into code."""
    if key == "metadata":  # free text (stack traces), never compiled
        return
    if key == "expr_str":  # sympy.sympify(expr_str) is eval
        _check_expression(node, _SYMPY_CALLS, frozenset(), attributes_allowed=False)
        return
    if key == "guards_code":  # exec-ed by ExportedProgram.module()
        for guard in node:
            _check_expression(guard, _GUARD_NAMES, _GUARD_ATTRIBUTES, attributes_allowed=True)
        return
    if key == "range_constraints" and isinstance(node, dict):  # keys name sizes, e.g. "4*s39"
        for name, bounds in node.items():
            _check_expression(name, _SYMPY_CALLS, frozenset(), attributes_allowed=False)
            check_program_json(bounds)
        return
    if key in ("in_spec", "out_spec", "context") and isinstance(node, str):
        if "__enum__" in node or "defaultdict" in node:  # pytree hooks that import modules
            raise UnsafeArchive(f"a pytree spec that imports modules: {node[:80]!r}")
        check_program_json(json.loads(node))  # its keys end up in generated code
        return
    if isinstance(node, dict):
        call_argument = "arg" in node and "kind" in node  # FX writes these out with repr()
        for k, v in node.items():
            check_program_json(k)
            literal = call_argument and k == "arg" and isinstance(v, dict) and set(v) <= {"as_string", "as_strings"}
            if not literal:
                check_program_json(v, k)
    elif isinstance(node, list):
        for v in node:
            check_program_json(v, key)
    elif isinstance(node, str) and not _SAFE_STRING.fullmatch(node):
        raise UnsafeArchive(f"a string that could become code: {node[:80]!r}")


def _check_expression(source: Any, names: frozenset[str], attributes: frozenset[str], attributes_allowed: bool) -> None:
    """Arithmetic and comparisons over whitelisted names, attributes and calls only."""
    if not isinstance(source, str):
        raise UnsafeArchive(f"an expression that is not text: {source!r:.80}")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        raise UnsafeArchive(f"an unparsable expression {source[:80]!r}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, _ARITHMETIC) or (attributes_allowed and isinstance(node, (ast.Subscript, ast.Attribute)))
        if isinstance(node, ast.Name):
            ok = node.id in names or _SYMBOL.fullmatch(node.id) is not None
        elif isinstance(node, ast.Attribute):
            ok = ok and node.attr in attributes
        elif isinstance(node, ast.Constant):
            value = node.value
            ok = value is None or isinstance(value, (bool, int, float)) or (
                isinstance(value, str) and re.fullmatch(r"\w+", value) is not None
            )
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, (ast.Name, ast.Attribute))
        if not ok:
            raise UnsafeArchive(f"{type(node).__name__} in the expression {source[:80]!r}")
