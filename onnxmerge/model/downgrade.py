"""A merged model for an older runtime: its default-domain opset (and the IR version that goes with
it) taken down to `--target-opset`, checked against the model as merged; and which onnxruntime
release is the oldest that runs a model (`onnxmerge inspect`).

onnx's version converter has no down-adapters for many operators whose newer version only added
something (Reshape 14: `allowzero`; BatchNormalization 15: more input types; Relu / Add 14: more
integer types). So a model goes down in one of two ways, the first that passes onnx's full check at
the target opset:
1. relabelled: the nodes kept as they are, the opset import lowered, and attributes the old version
   lacks dropped where they hold the default of the version that added them (training_mode=0). The
   checker validates every node against the target opset's schema (attributes, input counts, types
   by inference), so a node that uses something the old version lacks (an `allowzero=1`, the `axes`
   input of Pad 18) fails it;
2. converted by onnx's version converter (which rewrites nodes where it has adapters).
Either way the result must compute the model's outputs to 1e-5 in onnxruntime on seeded random
inputs, or it is refused. Operators that did not exist at the target opset are refused first, by
name. Nodes of other domains (ai.onnxmerge) keep their domain's version.
"""

from __future__ import annotations

import re

import onnx
from onnx import helper, numpy_helper, version_converter

from onnxmerge.errors import MergeError, UsageError, first_line

DEFAULT_DOMAINS = ("", "ai.onnx")
TOLERANCE = 1e-5  # relative: the same operators on the same weights
# onnxruntime releases, the ai.onnx opset each implements and the IR version it reads (onnxruntime's
# docs/reference/compatibility.md, up to 1.18); a release runs models of that opset and IR or lower
ORT_RELEASES = [("1.0", 11, 6), ("1.3", 12, 7), ("1.6", 13, 7), ("1.8", 14, 7), ("1.9", 15, 8), ("1.11", 16, 8),
                ("1.12", 17, 8), ("1.14", 18, 8), ("1.15", 19, 8), ("1.16", 19, 9), ("1.17", 20, 9),
                ("1.18", 21, 10)]


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def custom_domains(model: onnx.ModelProto) -> dict[str, int]:
    """The other domains the model imports, with their versions."""
    return {o.domain: o.version for o in model.opset_import if o.domain not in DEFAULT_DOMAINS}


def oldest_onnxruntime(model: onnx.ModelProto) -> str:
    """The oldest onnxruntime release that runs `model`'s opset and IR version (custom domains aside)."""
    opset, ir = default_opset(model), model.ir_version
    for release, max_opset, max_ir in ORT_RELEASES:
        if opset <= max_opset and ir <= max_ir:
            return release
    return f"newer than {ORT_RELEASES[-1][0]} (opset {opset}, IR {ir})"


def versions(model: onnx.ModelProto) -> dict:
    """What a runtime needs to load `model`: opset, IR version, custom domains, the oldest onnxruntime."""
    return {"opset": default_opset(model), "ir_version": model.ir_version, "custom_domains": custom_domains(model),
            "oldest_onnxruntime": oldest_onnxruntime(model)}


def to_opset(model: onnx.ModelProto, target: int, where: str, compare=None) -> tuple[onnx.ModelProto, dict]:
    """`model` at default-domain opset `target` and the lowest IR version that opset needs, and the
    record of the conversion ({opset, ir_version, how, max_rel_diff}). `compare(a, b)`: the largest
    relative output difference of two models (onnxmerge passes it in: it runs native nodes too).
    A one-line MergeError naming the blocking operators where the model cannot go there."""
    source = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not 7 <= target <= newest:
        raise UsageError(f"--target-opset {target}: give an opset from 7 (the oldest onnxruntime runs) to {newest}")
    if target >= source:
        return model, {"opset": source, "ir_version": model.ir_version, "how": "unchanged (already at or below)"}
    missing = sorted({f"{n.op_type} (from opset {_since(n.op_type, source)})" for n in model.graph.node
                      if n.domain in DEFAULT_DOMAINS and _since(n.op_type, target) is None})
    if missing:
        raise MergeError(f"{where}: cannot go down to opset {target}: operators newer than it: {', '.join(missing)}")
    ir = min(model.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", target)]))
    errors = []
    for how, convert in (("relabelled", _relabel), ("converted by onnx's version converter", _convert)):
        try:
            out = convert(model, target)
            out.ir_version = ir
            onnx.checker.check_model(out, full_check=True)
        except Exception as e:  # the checker and the converter raise several types, with C++ messages
            errors.append(re.sub(r"^\S+\.(?:cc|h|cpp):\d+: \w+: ", "", first_line(e))[:160])
            continue
        diff = float(compare(model, out)) if compare else 0.0
        if not diff <= TOLERANCE:
            errors.append(f"{how}, its outputs differ by {diff:.3g} (relative)")
            continue
        return out, {"opset": target, "ir_version": ir, "how": how, "max_rel_diff": diff}
    changed = _changed(model, source, target)
    raise MergeError(f"{where}: cannot go down to opset {target}; operators whose definition changed since: "
                     f"{', '.join(changed) or 'none'} ({'; '.join(errors)})")


def _since(op: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, opset).since_version
    except onnx.defs.SchemaError:
        return None


def _changed(model: onnx.ModelProto, source: int, target: int) -> list[str]:
    return sorted({f"{n.op_type} ({_since(n.op_type, target)} -> {_since(n.op_type, source)})" for n in model.graph.node
                   if n.domain in DEFAULT_DOMAINS and _since(n.op_type, target) != _since(n.op_type, source)})


def _relabel(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The opset import lowered, and each attribute that the target's schema lacks dropped where it
    holds the default of the schema that added it (BatchNormalization's training_mode=0, Reshape's
    allowzero=0: the old version's only behaviour); a Split's constant sizes input (opset 13, as
    the tasks' fused branches write it) becomes the attribute of older versions. Anything else is
    left for the checker to refuse."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    source = default_opset(model)
    for o in out.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            o.version = target
    constants = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.domain not in DEFAULT_DOMAINS or _since(node.op_type, target) == _since(node.op_type, source):
            continue
        if node.op_type == "Split" and target < 13 and len(node.input) == 2 and node.input[1] in constants:
            # Split 13 took its sizes as an input, earlier versions as the attribute `split`
            sizes = numpy_helper.to_array(constants[node.input[1]]).tolist()
            del node.input[1]
            node.attribute.append(helper.make_attribute("split", sizes))
        old, new = onnx.defs.get_schema(node.op_type, target), onnx.defs.get_schema(node.op_type, source)
        keep = [a for a in node.attribute if a.name in old.attributes or not _is_default(a, new.attributes.get(a.name))]
        del node.attribute[:]
        node.attribute.extend(keep)
    return out


def _is_default(attr: onnx.AttributeProto, spec) -> bool:
    """Whether `attr` holds its schema's documented default value."""
    if spec is None or not spec.default_value.name:
        return False
    return helper.get_attribute_value(attr) == helper.get_attribute_value(spec.default_value)


def _convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    return version_converter.convert_version(model, target)
