"""Tables for the terminal (rich) and for BENCHMARKS.md, from run.py's results.

BENCHMARKS.md is shared: this module rewrites only the generated blocks (between
``<!-- bench:SIZE:begin -->`` and ``<!-- bench:SIZE:end -->``) inside its own three sections
(``## Seed recipe``, ``## HF → BF16 GGUF``, ``## Floor``). Text outside the markers — the analysis of
why a target is missed — and every other section are kept as they are.
"""
from __future__ import annotations

import re
from pathlib import Path

SECTIONS = {"merge": "## Seed recipe", "convert": "## HF → BF16 GGUF", "floor": "## Floor"}
INTRO = """# Benchmarks

ggmerge against the tools users chain today (mergekit, llama.cpp's convert_hf_to_gguf.py, llama.cpp's
quantizer), on the same machine, in the same run, with the same inputs. Models are deterministic
Mistral-architecture stand-ins for the seed's eight models (tools/bench/make_models.py). Each number
is the median of N runs; every tool runs as its own child process (tools/bench/launch.py). Ratios are
ggmerge / anchor (lower is better) and pass / floor.
"""
PASS_TITLE = {"merge": "seed recipe (merge)", "merge_multi": "seed recipe, one process",
              "outputs": "seed → HF + Q8_0 + Q6_K + Q4_K_M", "outputs_steps": "the same, vs ggmerge's two steps",
              "convert": "HF → BF16 GGUF", "q4_k_m": "BF16 → Q4_K_M",
              "q6_k": "BF16 → Q6_K"}
TARGETS = {  # pass → (metric, limit) for ggmerge / anchor
    "merge": [("wall", 0.33), ("cpu", 0.5), ("maxrss", 0.5), ("rss_anon", 0.5)],
    "merge_multi": [("wall", 0.33), ("cpu", 0.5), ("maxrss", 0.5), ("rss_anon", 0.5)],
    "outputs": [("wall", 0.25)],
    "convert": [("wall", 1.0)],
    "q4_k_m": [("wall", 1.0)],
}
FLOOR_LIMIT = {"merge": 5.0, "merge_multi": 5.0, "outputs": 5.0, "outputs_steps": 5.0}  # others: 2×
SHORT = {("merge", "anchor"): "mergekit (7 runs)", ("merge_multi", "anchor"): "mergekit-multi",
         ("outputs", "anchor"): "mergekit-multi + convert + 3 × quantize",
         ("outputs_steps", "anchor"): "ggmerge build + 3 × quantize",
         ("outputs", "ggmerge"): "ggmerge build --gguf", ("outputs_steps", "ggmerge"): "ggmerge build --gguf", ("convert", "anchor"): "convert_hf_to_gguf.py",
         "anchor": "llama.cpp", "ggmerge": "ggmerge", "floor": "floor"}


def _sec(x) -> str:
    return "—" if x is None else f"{x:.2f} s"


def _bytes(x) -> str:
    if x is None:
        return "—"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def _count(x) -> str:
    if x is None:
        return "—"
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _med(pas: dict, tool: str) -> dict | None:
    t = pas.get(tool) or {}
    return t.get("median")


def rows(results: dict) -> list[list[str]]:
    """One row per pass and tool: the numbers both renderers show."""
    out = []
    for name, pas in results["passes"].items():
        a, f = _med(pas, "anchor"), _med(pas, "floor")
        for tool in ("anchor", "ggmerge", "floor"):
            t = pas.get(tool)
            if not t:
                continue
            m = t.get("median")
            label = SHORT.get((name, tool)) or SHORT.get(tool) or t.get("name", tool)
            if m is None:
                err = (t.get("error") or "failed").strip().splitlines()
                out.append([PASS_TITLE.get(name, name), label, "FAILED", err[-1][:90] if err else "", "", "", "", "",
                            "", "", ""])
                continue
            vs = _fmt_ratio(_ratio(m["wall"], a["wall"])) if (tool == "ggmerge" and a) else ""
            vs_rss = (f'{_fmt_ratio(_ratio(m["maxrss"], a["maxrss"]))} '
                      f'({_fmt_ratio(_ratio(m.get("rss_anon"), a.get("rss_anon")))})') if (tool == "ggmerge" and a) else ""
            vs_floor = _fmt_ratio(_ratio(m["wall"], f["wall"])) if (tool != "floor" and f) else ""
            out.append([PASS_TITLE.get(name, name), label, _sec(m["wall"]), _sec(m["cpu"]),
                        f'{_bytes(m["maxrss"])} ({_bytes(m.get("rss_anon"))})',
                        f"{_bytes(m['rchar'])} / {_bytes(m['wchar'])}", _count(m.get("minflt")), vs, vs_rss,
                        vs_floor, f"{m['load']:.1f}"])
    return out


HEAD = ["pass", "tool", "wall", "CPU", "peak RSS (anon)", "read / written", "page faults", "wall vs anchor",
        "RSS vs anchor (anon)", "wall vs floor", "load"]


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ggmerge benchmarks — size {results['size']} ({results['params'] / 1e6:.0f}M params), "
                    f"median of {results['runs']} runs")
    for h in HEAD:
        t.add_column(h, justify="left" if h in ("pass", "tool") else "right")
    for r in rows(results):
        t.add_row(*r)
    con = Console(width=max(Console().width, 150))
    con.print(t)
    for line in verdicts(results):
        con.print(line)


def verdicts(results: dict) -> list[str]:
    """The issue-6 targets, each 'met' or 'missed by …'."""
    out = []
    for name, pas in results["passes"].items():
        a, g, f = _med(pas, "anchor"), _med(pas, "ggmerge"), _med(pas, "floor")
        for metric, limit in TARGETS.get(name, []):
            r = _ratio(g and g[metric], a and a[metric])
            out.append(_verdict(f"{PASS_TITLE[name]}: ggmerge {metric} ≤ {limit}× anchor", r, limit))
        if name.startswith("q4_k"):
            ident = pas.get("identity")
            if ident is None:
                out.append(f"- {PASS_TITLE[name]}: identical tensor bytes — not checked (an output is missing)")
            else:
                out.append(f"- {PASS_TITLE[name]}: identical tensor bytes — "
                           + ("**met**" if ident["same_bytes"] else
                              f"**missed**: {ident['n_differ']} of {ident['tensors']} tensors differ"))
        r = _ratio(g and g["wall"], f and f["wall"])
        lim = FLOOR_LIMIT.get(name, 2.0)
        out.append(_verdict(f"{PASS_TITLE.get(name, name)}: ggmerge wall ≤ {lim:g}× floor", r, lim))
    return out


def _verdict(what: str, r, limit) -> str:
    if r is None:
        return f"- {what} — not measured (a run failed)"
    if r <= limit:
        return f"- {what} — **met** ({r:.2f}×)"
    return f"- {what} — **missed** ({r:.2f}×, {r / limit:.2f}× over the target)"


# ------------------------------------------------------------------------------------------- markdown

def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def _conditions(results: dict, passes: list[str]) -> str:
    m = results["machine"]
    loads = [r["load"] for p in passes for t in ("anchor", "ggmerge", "floor")
             for r in (results["passes"].get(p, {}).get(t) or {}).get("runs", [])]
    span = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    metas = [results["passes"][p].get("meta", {}) for p in passes if p in results["passes"]]
    when = sorted({x.get("started", "?")[:16] for x in metas})
    runs = sorted({str(x.get("runs", "?")) for x in metas})
    cmds = sorted({x.get("cmdline", "?") for x in metas})
    return (f"Size `{results['size']}` ({results['params'] / 1e6:.0f}M parameters per model), median of "
            f"{'/'.join(runs)} runs, measured {', '.join(when)}; {m['cpus']} CPUs, {m['mem'] / 2**30:.0f} GiB "
            f"RAM, 1-min load average during the runs {span} (the machine is shared with other jobs, so wall "
            f"times are noisy: CPU time is the steadier comparison). Page cache warm (inputs were just "
            f"written or read). Read / written: bytes through read()/write() calls — memory-mapped reads "
            f"are not counted (mergekit and llama.cpp map their inputs). Peak RSS counts mapped file pages "
            f"too; (anon) is the sampled peak of anonymous memory.\n\nReproduce: " + ", ".join(f"`{c}`" for c in cmds))


def _commands(results: dict, passes: list[str]) -> str:
    out = []
    for p in passes:
        for tool in ("anchor", "ggmerge"):
            t = results["passes"].get(p, {}).get(tool)
            if t:
                out.append(f"# {PASS_TITLE[p]} — {t.get('name', tool)}\n{t['cmd']}")
    return "```sh\n" + "\n".join(out) + "\n```"


def _block_merge(results: dict) -> str | None:
    pas = results["passes"].get("merge")
    names = [n for n in ("merge", "merge_multi", "outputs", "outputs_steps") if n in results["passes"]]
    if not names:
        return None
    both = {n: results["passes"][n] for n in names}
    body = [r for r in rows({**results, "passes": both})]
    parts = [_conditions(results, names), _md_table(HEAD, body)]
    pas = pas or {}
    sm = (pas.get("anchor") or {}).get("stage_median")
    if sm:
        parts.append("mergekit, per run (each writes its model to disk and the next reads it back):\n\n" + _md_table(
            ["mergekit-yaml run", "wall", "CPU", "peak RSS (anon)", "read / written"],
            [[n, _sec(m["wall"]), _sec(m["cpu"]), f'{_bytes(m["maxrss"])} ({_bytes(m.get("rss_anon"))})',
              f"{_bytes(m['rchar'])} / {_bytes(m['wchar'])}"]
             for n, m in sm.items()]))
    io = pas.get("io", {})
    parts.append(f"Inputs: 8 models, {_bytes(io.get('in'))} of safetensors; output {_bytes(io.get('out'))}.")
    parts.append("\n".join(v for v in verdicts({**results, "passes": both})))
    parts.append(_commands(results, names))
    return "\n\n".join(parts)


def _block_convert(results: dict) -> str | None:
    pas = results["passes"].get("convert")
    if not pas:
        return None
    parts = [_conditions(results, ["convert"]), _md_table(HEAD, rows({**results, "passes": {"convert": pas}}))]
    ident = pas.get("identity")
    if ident:
        parts.append(f"Tensor bytes vs llama.cpp's file: {ident['identical']} of {ident['tensors']} identical"
                     + (f"; differ: {ident['differ']}" if ident["n_differ"] else "")
                     + (f"; metadata keys that differ: {', '.join(ident['kv_differ'])}" if ident["kv_differ"] else ""))
    parts.append("\n".join(verdicts({**results, "passes": {"convert": pas}})))
    parts.append(_commands(results, ["convert"]))
    return "\n\n".join(parts)


def _block_floor(results: dict) -> str | None:
    body = []
    for name, pas in results["passes"].items():
        f, a, g = _med(pas, "floor"), _med(pas, "anchor"), _med(pas, "ggmerge")
        io = pas.get("io", {})
        if not f:
            continue
        ident = pas.get("identity")
        same = "" if ident is None or name in ("merge",) else ("yes" if ident["same_bytes"] else
                                                                f"no ({ident['n_differ']} tensors differ)")
        body.append([PASS_TITLE.get(name, name), _bytes(io.get("in")), _bytes(io.get("out")), _sec(f["wall"]),
                     _sec(a and a["wall"]), _fmt_ratio(_ratio(a and a["wall"], f["wall"])),
                     _sec(g and g["wall"]), _fmt_ratio(_ratio(g and g["wall"], f["wall"])),
                     _fmt_ratio(_ratio(g and g["wall"], a and a["wall"])), same])
    if not body:
        return None
    passes = list(results["passes"])
    head = ["pass", "read", "written", "floor", "anchor", "anchor / floor", "ggmerge", "ggmerge / floor",
            "ggmerge / anchor", "same bytes as llama.cpp"]
    note = ("Floor: `tools/bench/floor.py` reads every input byte once (readinto + sum) and writes as "
            "many bytes as the pass's output, nothing else.")
    return "\n\n".join([_conditions(results, passes), _md_table(head, body), note])


def blocks(results: dict) -> dict[str, str]:
    out = {}
    for key, fn in (("merge", _block_merge), ("convert", _block_convert), ("floor", _block_floor)):
        b = fn(results)
        if b is not None:
            out[SECTIONS[key]] = b
    return out


def update_benchmarks(path: Path, results: dict) -> None:
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = INTRO
    size = results["size"]
    for heading, body in blocks(results).items():
        text = _put_block(text, heading, size, body)
    path.write_text(text.rstrip("\n") + "\n")


def _put_block(text: str, heading: str, size: str, body: str) -> str:
    begin = f"<!-- bench:{size}:begin (generated by tools/bench/run.py; edit outside these markers) -->"
    end = f"<!-- bench:{size}:end -->"
    block = f"{begin}\n### Size `{size}`\n\n{body}\n{end}"
    m = re.search(rf"^{re.escape(heading)}[ \t]*$", text, flags=re.MULTILINE)
    if not m:
        return text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    nxt = re.search(r"^## ", text[m.end():], flags=re.MULTILINE)
    sec_end = m.end() + (nxt.start() if nxt else len(text) - m.end())
    section = text[m.end():sec_end]
    pat = re.compile(rf"<!-- bench:{re.escape(size)}:begin.*?<!-- bench:{re.escape(size)}:end -->", flags=re.DOTALL)
    if pat.search(section):
        section = pat.sub(lambda _: block, section)
    else:
        section = section.rstrip("\n") + f"\n\n{block}\n\n"
    if not section.startswith("\n"):
        section = "\n" + section
    return text[:m.end()] + section + text[sec_end:]
