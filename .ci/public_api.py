#!/usr/bin/env python3
"""Lists the crate's public API from rustdoc's JSON output, one item a line.

Usage: public_api.py target/doc/tower_channels.json > public-api.txt

Walks from the crate root through public modules and re-exports (what a
user can name), and prints each item with its signature: functions and
methods with their parameters, generics and bounds, struct fields, enum
variants, trait items, constants, and the trait impls that are written in
the source (not auto traits or blanket impls). Lines are sorted, so a diff
of two listings shows exactly what changed. Reads rustdoc JSON format 57
(Rust 1.95); other versions may differ in details, so the format version is
checked.
"""
import json
import sys

FORMAT = 57

d = json.load(open(sys.argv[1]))
if d.get("format_version") != FORMAT:
    sys.exit(f"rustdoc JSON format {d.get('format_version')}, this script reads {FORMAT}")
idx = d["index"]
paths = d["paths"]


public_paths = {}


def name_of(pid, written):
    if str(pid) in public_paths:
        return public_paths[str(pid)]
    p = paths.get(str(pid))
    return "::".join(p["path"]) if p else written


def args(a):
    if not a:
        return ""
    if "angle_bracketed" in a:
        ab = a["angle_bracketed"]
        out = [generic_arg(x) for x in ab["args"]]
        for c in ab.get("constraints", []):
            b = c["binding"]
            rhs = ty(b["equality"]["type"]) if "equality" in b and "type" in b["equality"] else (
                bounds(b["constraint"]) if "constraint" in b else "?")
            out.append(f"{c['name']}{args(c.get('args'))} = {rhs}" if "equality" in b else f"{c['name']}: {rhs}")
        return "<" + ", ".join(out) + ">" if out else ""
    if "parenthesized" in a:
        p = a["parenthesized"]
        s = "(" + ", ".join(ty(t) for t in p["inputs"]) + ")"
        return s + (f" -> {ty(p['output'])}" if p.get("output") else "")
    return ""


def generic_arg(x):
    if "type" in x:
        return ty(x["type"])
    if "lifetime" in x:
        return x["lifetime"]
    if "const" in x:
        return x["const"].get("expr", "?")
    return "_"


def path(p):
    return name_of(p["id"], p["path"]) + args(p.get("args"))


def bound(b):
    if "trait_bound" in b:
        tb = b["trait_bound"]
        hr = ""
        if tb.get("generic_params"):
            hr = "for<" + ", ".join(g["name"] for g in tb["generic_params"]) + "> "
        mod = {"maybe": "?", "maybe_const": "~const "}.get(tb.get("modifier"), "")
        return hr + mod + path(tb["trait"])
    if "outlives" in b:
        return b["outlives"]
    return "use<..>"


def bounds(bs):
    return " + ".join(bound(b) for b in bs)


def ty(t):
    if t is None:
        return "()"
    k, v = next(iter(t.items()))
    if k == "resolved_path":
        return path(v)
    if k == "generic" or k == "primitive":
        return v
    if k == "borrowed_ref":
        lt = v["lifetime"] + " " if v.get("lifetime") else ""
        return "&" + lt + ("mut " if v["is_mutable"] else "") + ty(v["type"])
    if k == "raw_pointer":
        return ("*mut " if v["is_mutable"] else "*const ") + ty(v["type"])
    if k == "tuple":
        return "(" + ", ".join(ty(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if k == "slice":
        return "[" + ty(v) + "]"
    if k == "array":
        return f"[{ty(v['type'])}; {v['len']}]"
    if k == "impl_trait":
        return "impl " + bounds(v)
    if k == "dyn_trait":
        parts = [path(x["trait"]) for x in v["traits"]]
        if v.get("lifetime"):
            parts.append(v["lifetime"])
        return "dyn " + " + ".join(parts)
    if k == "qualified_path":
        tr = f" as {path(v['trait'])}" if v.get("trait") else ""
        return f"<{ty(v['self_type'])}{tr}>::{v['name']}{args(v.get('args'))}"
    if k == "function_pointer":
        return "fn(" + ", ".join(ty(x[1]) for x in v["sig"]["inputs"]) + ")" + (
            f" -> {ty(v['sig']['output'])}" if v["sig"].get("output") else "")
    if k == "infer":
        return "_"
    return k


def generics(g):
    params = []
    for p in g["params"]:
        kind = p["kind"]
        if "lifetime" in kind:
            o = kind["lifetime"].get("outlives") or []
            params.append(p["name"] + (": " + " + ".join(o) if o else ""))
        elif "type" in kind:
            if kind["type"].get("is_synthetic"):
                continue
            b = kind["type"]["bounds"]
            params.append(p["name"] + (": " + bounds(b) if b else ""))
        elif "const" in kind:
            params.append(f"const {p['name']}: {ty(kind['const']['type'])}")
    head = "<" + ", ".join(params) + ">" if params else ""
    preds = []
    for w in g.get("where_predicates", []):
        if "bound_predicate" in w:
            bp = w["bound_predicate"]
            preds.append(f"{ty(bp['type'])}: {bounds(bp['bounds'])}")
        elif "lifetime_predicate" in w:
            lp = w["lifetime_predicate"]
            preds.append(f"{lp['lifetime']}: {' + '.join(lp['outlives'])}")
        elif "eq_predicate" in w:
            preds.append(f"{ty(w['eq_predicate']['lhs'])} = ...")
    return head, (" where " + ", ".join(preds) if preds else "")


def fn_sig(name, f):
    head, where = generics(f["generics"])
    h = f["header"]
    quals = ("const " if h.get("is_const") else "") + ("async " if h.get("is_async") else "") + (
        "unsafe " if h.get("is_unsafe") else "")
    ins = []
    for n, t in f["sig"]["inputs"]:
        if n == "self":
            ins.append({"&Self": "&self", "&mut Self": "&mut self", "Self": "self"}.get(ty(t), "self: " + ty(t)))
        else:
            ins.append(f"{n}: {ty(t)}")
    out = f" -> {ty(f['sig']['output'])}" if f["sig"].get("output") else ""
    return f"{quals}fn {name}{head}({', '.join(ins)}){out}{where}"


lines = set()
seen = set()


def emit(s):
    lines.add(s)


def visit(i, prefix):
    i = str(i)
    if i in seen or i not in idx:
        return
    it = idx[i]
    k = next(iter(it["inner"]))
    if k == "use":
        u = it["inner"]["use"]
        if u.get("id") is None:
            emit(f"pub use {u['source']} in {prefix}")
            return
        tgt = str(u["id"])
        if tgt not in idx or idx[tgt]["crate_id"] != 0:
            emit(f"pub use {u['source']} as {prefix}::{u['name']}")
            return
        if u.get("is_glob"):
            visit(tgt, prefix)
        else:
            # a re-export under a name of its own
            seen.discard(tgt)
            visit_named(tgt, prefix, u["name"])
        return
    if it["crate_id"] != 0:
        return
    visit_named(i, prefix, it.get("name"))


def visit_named(i, prefix, name):
    if i in seen:
        return
    seen.add(i)
    it = idx[i]
    k = next(iter(it["inner"]))
    v = it["inner"][k]
    p = f"{prefix}::{name}" if prefix and name else (name or prefix)
    public_paths.setdefault(i, p)
    dep = " #[deprecated]" if it.get("deprecation") else ""
    if k == "module":
        emit(f"mod {p}{dep}")
        for c in v["items"]:
            visit(c, p)
        return
    if k == "function":
        emit(f"{fn_sig(p, v)}{dep}")
    elif k == "struct":
        head, where = generics(v["generics"])
        emit(f"struct {p}{head}{where}{dep}")
        kind = v["kind"]
        if "plain" in kind:
            for f in kind["plain"]["fields"]:
                fi = idx.get(str(f))
                if fi and fi["visibility"] == "public":
                    emit(f"field {p}::{fi['name']}: {ty(fi['inner']['struct_field'])}")
        elif "tuple" in kind:
            for n, f in enumerate(kind["tuple"]):
                fi = idx.get(str(f)) if f is not None else None
                if fi and fi["visibility"] == "public":
                    emit(f"field {p}::{n}: {ty(fi['inner']['struct_field'])}")
        impls(p, v["impls"])
    elif k == "enum":
        head, where = generics(v["generics"])
        emit(f"enum {p}{head}{where}{dep}")
        for var in v["variants"]:
            vi = idx[str(var)]
            vk = vi["inner"]["variant"]["kind"]
            if vk == "plain":
                emit(f"variant {p}::{vi['name']}")
            elif "tuple" in vk:
                tys = [ty(idx[str(f)]["inner"]["struct_field"]) for f in vk["tuple"] if f is not None]
                emit(f"variant {p}::{vi['name']}({', '.join(tys)})")
            else:
                fs = [f"{idx[str(f)]['name']}: {ty(idx[str(f)]['inner']['struct_field'])}" for f in vk["struct"]["fields"]]
                emit(f"variant {p}::{vi['name']} {{ {', '.join(fs)} }}")
        impls(p, v["impls"])
    elif k == "trait":
        head, where = generics(v["generics"])
        sup = ": " + bounds(v["bounds"]) if v["bounds"] else ""
        emit(f"trait {p}{head}{sup}{where}{dep}")
        for m in v["items"]:
            mi = idx[str(m)]
            mk = next(iter(mi["inner"]))
            if mk == "function":
                emit(f"trait-{fn_sig(p + '::' + mi['name'], mi['inner']['function'])}")
            elif mk == "assoc_type":
                b = mi["inner"]["assoc_type"]["bounds"]
                emit(f"trait-type {p}::{mi['name']}" + (": " + bounds(b) if b else ""))
            elif mk == "assoc_const":
                emit(f"trait-const {p}::{mi['name']}: {ty(mi['inner']['assoc_const']['type'])}")
    elif k == "constant":
        emit(f"const {p}: {ty(v['type'])}{dep}")
    elif k == "static":
        emit(f"static {p}: {ty(v['type'])}{dep}")
    elif k == "type_alias":
        head, where = generics(v["generics"])
        emit(f"type {p}{head} = {ty(v['type'])}{where}{dep}")
    elif k == "macro":
        emit(f"macro {p}")
    else:
        emit(f"{k} {p}")


def impls(p, ids):
    for imp in ids:
        im = idx[str(imp)]["inner"]["impl"]
        if im.get("is_synthetic") or im.get("blanket_impl") or im["trait"] and im["trait"]["path"].endswith("StructuralPartialEq"):
            continue
        head, where = generics(im["generics"])
        if im["trait"] is None:
            for m in im["items"]:
                mi = idx.get(str(m))
                if mi and mi["visibility"] == "public":
                    mk = next(iter(mi["inner"]))
                    dep = " #[deprecated]" if mi.get("deprecation") else ""
                    if mk == "function":
                        emit(f"{fn_sig(p + '::' + mi['name'], mi['inner']['function'])}{dep}")
                    elif mk == "assoc_const":
                        emit(f"const {p}::{mi['name']}: {ty(mi['inner']['assoc_const']['type'])}")
        else:
            emit(f"impl{head} {path(im['trait'])} for {ty(im['for'])}{where}")


# Twice: the first walk learns where each item is public, so that the
# second names types by their public paths, not by private module paths.
visit(d["root"], "")
seen.clear()
lines.clear()
visit(d["root"], "")
for line in sorted(lines):
    print(line)
