"""The ``ggmerge`` command: parses arguments and dispatches to one library function per verb.

Each verb's flags are exactly the keyword arguments of its function (``build(**vars(args))``), so
everything the CLI does can be done from Python too.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import GGMergeError

EPILOG = """examples:
  ggmerge build                          # run ./ggmerge.yaml, write out/<name>/ (HF bf16)
  ggmerge build --dry-run                # show stages, inputs, tensor count, memory and disk estimates
  ggmerge quantize q4_k_m                # quantize the latest build to out/<name>.Q4_K_M.gguf
  ggmerge convert ./model -o model.gguf --outtype bf16 --chat-template vicuna
  ggmerge convert model.Q4_K_M.gguf -o ./model-hf
  ggmerge inspect out/ninja.Q4_K_M.gguf
  ggmerge verify out/ninja.Q4_K_M.gguf --hf out/ninja
  ggmerge verify out/ninja.Q4_K_M.gguf --ref out/ninja --text-file wiki.txt --chunks 50
  ggmerge imatrix out/ninja --text-file calibration.txt -o ninja.imatrix.gguf
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ggmerge", description="Merge LLMs from a mergekit-style recipe in one streaming pass and "
        "export HF bf16 and llama.cpp GGUF (incl. K-quants).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")

    b = sub.add_parser("build", help="run a merge recipe and write the HF bf16 model",
                       epilog="example: ggmerge build examples/ninja-v1-rp-expressive/ggmerge.yaml --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("recipe", nargs="?", default="ggmerge.yaml", help="recipe file (default: ./ggmerge.yaml)")
    b.add_argument("-o", "--output", help="output folder (default: out/<name>/ beside the recipe)")
    b.add_argument("--dry-run", action="store_true", help="plan only: print stages, inputs and estimates")
    b.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    b.add_argument("--online", dest="offline", action="store_false",
                   help="allow downloading Hub models that are not in the local HF cache")
    b.add_argument("-t", "--threads", type=int, default=None,
                   help="tensors evaluated at once (default: every core); the output is the same for any value")
    b.add_argument("--gguf", metavar="TYPES",
                   help="also write these GGUF files from the same pass, e.g. q4_k_m,q6_k,q8_0 (each the same "
                        "bytes as `ggmerge quantize TYPE` of the HF output); adds to the recipe's ggmerge.gguf")
    b.add_argument("--no-hf", action="store_true", help="write only the GGUF files, not the HF folder")
    b.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix for the --gguf quants (as `ggmerge quantize TYPE --imatrix FILE`)")
    b.add_argument("--hash-inputs", action="store_true",
                   help="record full SHA-256s of input files (default: sampled fingerprints; files in "
                        "the HF cache always have their real SHA-256 for free)")
    b.add_argument("--strict", action="store_true",
                   help="refuse recipe keys and parameters mergekit ignores (default: ignore them with a warning)")

    q = sub.add_parser("quantize", help="write a quantized GGUF (q4_k_m, q6_k, q8_0, ...)",
                       epilog="examples:\n  ggmerge quantize q4_k_m\n  ggmerge quantize Q6_K model.bf16.gguf -o m.Q6_K.gguf"
                              "\n  ggmerge quantize iq4_xs q4_k_m model.bf16.gguf --imatrix imatrix.gguf",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("type", nargs="+", metavar="TYPE",
                   help="llama.cpp file type(s), case-insensitive (e.g. q4_k_m q6_k: all from one read of the "
                        "input); a last argument that is not a type is the INPUT: a BF16/F16/F32 GGUF or an HF "
                        "folder (default: the latest build)")
    q.add_argument("-o", "--output", help="output file (default: <name>.<TYPE>.gguf beside the build); "
                                          "with several types, a folder")
    q.add_argument("--force", action="store_true", help="overwrite an existing output")
    q.add_argument("--recipe", default="ggmerge.yaml", help="recipe whose build to quantize (default: ./ggmerge.yaml)")
    q.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (llama.cpp imatrix .gguf or legacy .dat, e.g. from `ggmerge imatrix` or "
                        "llama-imatrix): imatrix-weighted quants, the same bytes as `llama-quantize --imatrix FILE`; "
                        "needed by Q2_K_S")

    c = sub.add_parser("convert", help="HF folder → GGUF, or GGUF → HF folder",
                       epilog="examples:\n  ggmerge convert ./model -o model.f16.gguf --outtype f16\n"
                              "  ggmerge convert model.gguf -o ./model-hf",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("input", help="HF model folder, or a .gguf file")
    c.add_argument("-o", "--output", required=True, help="output .gguf file, or output folder for GGUF → HF")
    c.add_argument("--outtype", default="bf16", help="GGUF tensor type: f32, f16, bf16, q8_0 (default bf16)")
    c.add_argument("--chat-template", help="'vicuna', or a Jinja file, to set or replace the chat template")
    c.add_argument("--force", action="store_true", help="overwrite an existing output")

    i = sub.add_parser("inspect", help="architecture, vocab, template, special tokens and tensors of a model")
    i.add_argument("path", help="a .gguf file or an HF model folder")
    i.add_argument("--tensors", action="store_true", help="list every tensor")

    v = sub.add_parser("verify", help="compare GGUF files in llama.cpp with the reference model: one prompt, "
                                      "or perplexity / KL divergence over a text file",
                       epilog="examples:\n  ggmerge verify out/m.Q4_K_M.gguf --ref out/m\n"
                              "  ggmerge verify m.Q4_K_M.gguf m.Q6_K.gguf --ref m.F16.gguf --text-file wiki.txt "
                              "--chunks 100 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("gguf", nargs="+", help="GGUF file(s) to check")
    v.add_argument("--ref", "--hf", dest="ref",
                   help="reference: HF model folder or a BF16/F16 GGUF (default: the build the GGUF came from)")
    v.add_argument("--text", help="one-prompt mode: text to score (default: a role-play prompt from the Ninja-v1-RP-expressive model card)")
    v.add_argument("--text-file", help="score this text file like llama-perplexity --kl-divergence: perplexity, "
                                       "ΔPPL, KLD mean/median/p99/max, top-1 agreement")
    v.add_argument("--ctx", type=int, default=512, help="tokens per chunk with --text-file (default 512)")
    v.add_argument("--chunks", type=int, default=None, help="use at most this many chunks (default: all)")
    v.add_argument("--ref-engine", default="auto", choices=("auto", "forward", "llama.cpp"),
                   help="run the reference through ggmerge's layer-wise forward pass (one layer in memory; the "
                        "default for HF folders) or llama.cpp (GGUF references; the default for them)")
    v.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")

    im = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's GGUF format) over a text",
                        epilog="example: ggmerge imatrix out/m --text-file calibration.txt -o m.imatrix.gguf",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("model", help="HF folder, .safetensors, .gguf or Hub id")
    im.add_argument("--text-file", required=True, help="calibration text (UTF-8)")
    im.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    im.add_argument("--chunks", type=int, default=None, help="use at most this many chunks (default: all)")
    im.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default: imatrix.gguf)")
    im.add_argument("--process-output", action="store_true",
                    help="also collect output.weight (llama-imatrix --process-output)")
    im.add_argument("--force", action="store_true", help="overwrite an existing output")

    ch = sub.add_parser("chat", help="one Vicuna-format turn through llama.cpp (a smoke test)")
    ch.add_argument("gguf", help="GGUF file")
    ch.add_argument("message", help="the user message")
    ch.add_argument("--system", default="", help="system prompt")
    ch.add_argument("--max-tokens", type=int, default=64)
    return p


def _dispatch(args: argparse.Namespace):
    kw = {k: v for k, v in vars(args).items() if k not in ("verb", "debug", "quiet")}
    if args.verb == "build":
        from .build import build
        return build(**kw)
    if args.verb == "quantize":
        from .convert.quants.ftypes import parse_ftype
        from .quantize import quantize

        types = kw.pop("type")
        last = types[-1]
        # the last argument is the INPUT when it names a file or folder (or is not a type and looks like a
        # path); otherwise a misspelt type gets the type error, not "no such file"
        if len(types) > 1 or Path(last).exists():
            try:
                parse_ftype(last)
            except GGMergeError:
                if Path(last).exists() or "/" in last or last.lower().endswith(".gguf"):
                    kw["input"] = types.pop()
        return quantize(types[0] if len(types) == 1 else types, **kw)
    if args.verb == "convert":
        from .convert import convert
        return convert(**kw)
    if args.verb == "inspect":
        from .inspect import inspect
        return inspect(**kw)
    if args.verb == "verify":
        from .verify import verify
        return verify(**kw)
    if args.verb == "imatrix":
        from .imatrix.collect import imatrix
        return imatrix(**kw)
    if args.verb == "chat":
        from .chat import chat
        return chat(**kw)
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    from rich.logging import RichHandler
    from .progress import console

    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=args.debug, markup=False)])
    if not args.debug:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py narrates every write at INFO
    try:
        _dispatch(args)
    except GGMergeError as exc:
        if args.debug:
            raise
        print(f"ggmerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("ggmerge: interrupted; no partial output was left at the final path", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"ggmerge: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
