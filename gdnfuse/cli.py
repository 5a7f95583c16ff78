"""``gdnfuse`` command line: a thin typer layer over :mod:`gdnfuse.convert` and friends.

Exit codes: 0 success; 1 a verification check failed; 2 bad input or usage (one line on
stderr naming the file and tensor), including an interrupted run (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from gdnfuse.errors import GdnfuseError, Interrupted
from gdnfuse.executor import ExecuteOptions
from gdnfuse.layout import Layout
from gdnfuse.render import (
    engine_table,
    err,
    human,
    out,
    progress,
    shown,
    shown_summary,
    steps,
    summary_table,
    warn_misreaders,
    warn_skipped,
    warn_text_only,
    warn_unservable,
)

app = typer.Typer(
    help="Fuse Qwen3.5 Gated DeltaNet input projections (in_proj_qkv/z/b/a -> in_proj_qkvz/ba) "
    "offline, bit for bit, at disk speed; and verify the result.\n\n"
    "Exit codes: 0 ok, 1 a check failed, 2 bad input or usage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

LayoutOpt = Annotated[
    Layout | None,
    typer.Option(
        "--layout",
        help="qwen3-next (default): per key-head group, what Qwen3-Next loaders expect "
        "(TP-invariant). tp-blocked: each TP rank's rows contiguous as q|k|v|z, for "
        "pre-sharded loaders. With --engine, leave it out.",
    ),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="Write what this engine serves correctly: vllm, sglang, trtllm, transformers, "
        "mlx, llama.cpp (or refuse, saying why). Without it, a Qwen3.5-named output is "
        "stamped so that no engine loads it (none reads the layout record); see `inspect`.",
    ),
]
TextOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--text-only",
        help="Accept a text-only output of a vision-language source: Qwen3-Next outputs "
        "(every --engine, --arch qwen3-next) have no vision tower, so without this flag such a "
        "source is refused rather than silently losing images. Its image and video processor "
        "configs are left out too.",
    ),
]
TpOpt = Annotated[
    int, typer.Option("--tp", min=1, help="Tensor-parallel size; must divide linear_num_key_heads.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _fail(e: GdnfuseError | str) -> typer.Exit:
    # Text, not markup: paths and tensor names may contain [brackets].
    text = e.for_cli() if isinstance(e, GdnfuseError) else e
    err.print(Text.assemble(("error: ", "bold red"), text), highlight=False, soft_wrap=True)
    return typer.Exit(2)


@contextmanager
def _errors():
    try:
        yield
    except GdnfuseError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:  # e.g. during a download, before anything was written
        raise _fail("interrupted") from None


def _resolve(source: str, revision: str | None, cache_dir: Path | None, token: str | None,
             headers_only: bool, out: Path | None = None,
             ) -> tuple[Path, dict[str, Any] | None]:  # fmt: skip
    """A local directory, or a Hub repo id fetched into the Hugging Face cache (``out``: check
    before downloading that the download plus the output fit on disk)."""
    if not _is_hub_source(source):
        return Path(source), None
    from gdnfuse import hub

    return hub.fetch(source, revision=revision, cache_dir=cache_dir, token=token,
                     headers_only=headers_only, out=out)  # fmt: skip


def _is_hub_source(source: str) -> bool:
    from gdnfuse.convert import is_hub_source

    return is_hub_source(source)


RevisionOpt = Annotated[
    str | None, typer.Option(help="Hub revision (branch, tag or commit) of a repo-id SOURCE.")
]
CacheOpt = Annotated[Path | None, typer.Option(help="Hugging Face cache directory.")]
TokenOpt = Annotated[
    str | None, typer.Option(help="Hugging Face token (default: HF_TOKEN or the saved login).")
]


@app.command()
def inspect(
    source: Annotated[str, typer.Argument(help="Model directory or Hub repo id (org/name).")],
    layout: LayoutOpt = None,
    tp: TpOpt = 1,
    engine: EngineOpt = None,
    text_only: TextOnlyOpt = False,
    against: Annotated[
        Path | None,
        typer.Option(help="For a fused SOURCE: its split source. The fused rows' order is "
                     "found against it (reading the first GDN layer's bytes) and the verdicts "
                     "follow from it, as `gdnfuse verify --against` finds it."),
    ] = None,
    json_out: JsonOpt = False,
    revision: RevisionOpt = None,
    cache_dir: CacheOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show what a conversion would change, and which engines load what, without converting.

    For a split Qwen3.5 source: GDN layers found, valid --tp values, bytes rewritten vs
    copied or linked, and for each engine what `convert --engine E` would write (or why it
    refuses). For any checkpoint (a source, a gdnfuse output, a fused one from elsewhere):
    per engine, whether it loads it correctly, refuses it, or would load it and compute
    something else, with the engine version that knowledge was read from. Reads only
    config.json, the index and the safetensors headers (for a Hub repo: HTTP range reads).
    """
    from gdnfuse import engines, loaders
    from gdnfuse.arch import Arch
    from gdnfuse.convert import plan_source

    with _errors():
        path, record = _resolve(source, revision, cache_dir, token, headers_only=True)
        facts = loaders.read_facts(path)
        summary: dict[str, Any] = {}
        if against is not None and facts.fused:
            if record is not None:
                raise GdnfuseError("--against reads the fused rows' bytes: download the repo "
                                   "(or convert it) and inspect the local folder")  # fmt: skip
            rows, summary["rows"] = _rows_found(path, against)
            facts = loaders.read_facts(path, rows=rows)
        writes: dict[str, str] = {}
        cannot = None
        if not facts.fused:
            try:
                summary = plan_source(path, layout, tp, record, engine=engine,
                                      text_only=text_only).summary()  # fmt: skip
            except GdnfuseError as e:
                try:  # the options are wrong (exit 2), or no conversion of it is possible
                    plan_source(path, record_source=record)
                except GdnfuseError as why:  # readable, not convertible: the verdicts stand
                    cannot = why.for_cli()
                    summary = {"convert": f"cannot convert: {cannot}"}
                else:
                    raise e from None
            vision = summary.get("vision_tower_tensors", 0)
            for spec in engines.ENGINES:
                if cannot is not None:
                    writes[spec.name] = "refused: gdnfuse cannot convert this checkpoint"
                    continue
                try:
                    target = engines.choose(spec, facts)
                except GdnfuseError as e:
                    writes[spec.name] = f"refused: {e.for_cli()}"
                    continue
                writes[spec.name] = str(target)
                if vision and target.arch is Arch.QWEN3_NEXT:
                    writes[spec.name] = (f"with --text-only: {target}, no vision tower "
                                         f"({vision} tensors left out); without: refused")
        found = loaders.to_json(engines.judge_all(facts))
        for name, entry in found.items():
            if writes:
                entry["convert_engine_writes"] = writes[name]
        summary.pop("loaded_by", None)  # the plan's (its output's); inspect answers for the input
        summary["engines"] = found
    if json_out:
        print(json.dumps(summary))
        return
    rest = {k: v for k, v in summary.items() if k != "engines"}
    if rest:
        out.print(summary_table(f"gdnfuse inspect {source}", rest), soft_wrap=True)
    out.print(engine_table(f"engines loading {source} as it is", found), soft_wrap=True)
    if cannot is not None:
        err.print(Text.assemble(("note: ", "bold yellow"), f"cannot convert: {cannot}"),
                  soft_wrap=True)  # fmt: skip


def _rows_found(path: Path, against: Path) -> tuple[Any, str]:
    """The fused rows' order found against the split source (verify's own detection)."""
    from gdnfuse.checkpoint import open_checkpoint
    from gdnfuse.engines import NO_KNOWN_ORDER, Rows
    from gdnfuse.verify.exact import candidate_layouts, detect_layout, layout_name
    from gdnfuse.verify.structure import open_fused

    ck = open_fused(path)
    found = detect_layout(ck, open_checkpoint(against))
    if isinstance(found, str):
        raise GdnfuseError(found, path=str(path))
    if found is None:
        tried = ", ".join(layout_name(*c) for c in candidate_layouts(ck.model.dims))
        return NO_KNOWN_ORDER, f"none of {tried}: found against {against}"
    return Rows(*found), f"{layout_name(*found)}: found against {against}"


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="Model directory or Hub repo id (org/name).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory (new).")],
    tp: TpOpt = 1,
    layout: LayoutOpt = None,
    engine: EngineOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the full plan; write nothing.")
    ] = False,
    link: Annotated[
        bool,
        typer.Option(
            "--link/--copy",
            help="Hard-link shards without GDN tensors instead of copying them (same "
            "filesystem only). Default --copy: the output shares no inode with the source.",
        ),
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Files written in parallel.")] = min(
        4, os.cpu_count() or 1
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted run (same options), reusing done files.")
    ] = False,
    checksum: Annotated[
        bool, typer.Option(help="Record sha256 of every output file in the manifest.")
    ] = False,
    fsync: Annotated[bool, typer.Option(help="fsync each file before it is renamed.")] = False,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="qwen3.5: keep the Qwen3.5 architecture (only the GDN tensors change). "
            "qwen3-next: write a text-only Qwen3NextForCausalLM checkpoint (vision tower left "
            "out, experts per expert) that any Qwen3-Next engine loads; needs --layout "
            "qwen3-next.",
        ),
    ] = None,
    text_only: TextOnlyOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables.")] = False,
    json_out: JsonOpt = False,
    revision: RevisionOpt = None,
    cache_dir: CacheOpt = None,
    token: TokenOpt = None,
    overlap: Annotated[
        bool,
        typer.Option(
            "--overlap",
            help="Hub repo id SOURCE: plan from the headers, then write each output file as "
            "soon as its shards are downloaded (same cache, same output) instead of after the "
            "whole download.",
        ),
    ] = False,
) -> None:
    """Convert a Qwen3.5 checkpoint into one with fused in_proj_qkvz / in_proj_ba.

    Every other tensor is copied byte for byte; the fused tensors are exact row
    permutations. The layout, tp and source are recorded in config.json ("gdnfuse") and
    in each rewritten shard's __metadata__.
    """
    from gdnfuse.convert import plan_source
    from gdnfuse.convert import run as run_conversion

    with _errors():
        if overwrite and resume:
            raise GdnfuseError("--overwrite and --resume exclude each other")
        fetch = None
        record: dict[str, Any] | None
        if overlap and not dry_run and _is_hub_source(source):
            from gdnfuse import hub

            path, record, fetch = hub.fetch_overlapped(source, revision=revision,
                                                       cache_dir=cache_dir, token=token,
                                                       out=out_dir)  # fmt: skip
        else:
            path, record = _resolve(source, revision, cache_dir, token, headers_only=dry_run,
                                    out=None if dry_run else out_dir)  # fmt: skip
        options = ExecuteOptions(workers=workers, link=link, resume=resume, overwrite=overwrite,
                                 checksum=checksum, fsync=fsync)  # fmt: skip
        if dry_run:
            from gdnfuse.convert import preflight

            cplan = plan_source(path, layout, tp, record, arch, engine, text_only=text_only)
            # the checks a real run makes first; a disk too small is a warning here: the plan
            # is what tells how big a disk to get
            short = preflight(cplan, path, out_dir, options, dry_run=True).short
            summary = {**cplan.summary(), "dry_run": True, "free_space_short_bytes": short}
            found = summary["engines"]
            if json_out:  # the shape of `convert --json`, plus the record and every file
                print(json.dumps({**summary, "record": cplan.record,
                                  "files": cplan.plan.to_json()}))  # fmt: skip
            elif not quiet:
                out.print(summary_table(f"plan for {out_dir} (dry run)", shown_summary(summary)),
                          soft_wrap=True)  # fmt: skip
                table = Table("output file", "size", "how")
                for f in cplan.plan.files:
                    how = f.how + ("/link" if f.whole_source else "")
                    if f.how == "rewrite":
                        n = len(f.extents)
                        how = f"rewrite (from {n} source byte range{'s' if n != 1 else ''})"
                    table.add_row(Text(shown(f.name)), human(f.size), how)
                out.print(table)
                out.print(engine_table(f"engines loading {out_dir} once written", found),
                          soft_wrap=True)
            if short:
                err.print(Text.assemble(("warning: ", "bold yellow"),
                                        f"not enough free space for this plan at {out_dir}: "
                                        f"{human(short)} more needed"),
                          soft_wrap=True)  # fmt: skip
            if not json_out:
                warn_text_only(summary)
            return
        show = not quiet and not json_out and err.is_terminal
        with progress(show) as (set_total, advance), _sigterm_interrupts():
            try:
                result = run_conversion(
                    path, out_dir, options, layout=layout, tp=tp,
                    progress=advance, on_plan=lambda p: set_total(p.plan.total_bytes),
                    record_source=record, arch=arch,
                    fetch=fetch, engine=engine, text_only=text_only,
                )  # fmt: skip
            except KeyboardInterrupt:
                again = ["gdnfuse", "convert", source, "--out", str(out_dir), "--resume"]
                for flag, value, default in (
                    ("--tp", tp, 1), ("--layout", layout, None), ("--engine", engine, None),
                    ("--arch", arch, None), ("--revision", revision, None),
                    ("--cache-dir", cache_dir, None),
                ):  # fmt: skip
                    if value != default:
                        again += [flag, str(value)]
                again += [f for f, on in (("--link", link), ("--checksum", checksum),
                                          ("--text-only", text_only)) if on]  # fmt: skip
                raise Interrupted(
                    "interrupted; nothing in the output looks complete. Finish with: "
                    + shlex.join(again)
                ) from None
    summary = result.summary()
    found, loaded_by = summary["engines"], summary["loaded_by"]
    if json_out:
        print(json.dumps(summary))
    elif not quiet:
        out.print(summary_table(f"converted {source} -> {out_dir}", shown_summary(summary)),
                  soft_wrap=True)  # fmt: skip
        out.print(engine_table(f"engines loading {out_dir}", found), soft_wrap=True)
    warn_skipped(result.summary())
    warn_text_only(result.summary())
    warn_misreaders(found)
    warn_unservable(loaded_by)


@contextmanager
def _sigterm_interrupts():
    """Treat SIGTERM (batch schedulers, ``kill``) like Ctrl-C: clean up, then say how to resume."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="Converted checkpoint directory.")],
    against: Annotated[
        Path | None,
        typer.Option(help="The unconverted source: un-fuse and compare every byte exactly."),
    ] = None,
    tp: Annotated[
        int | None,
        typer.Option(
            "--tp",
            min=1,
            help="Consumer tensor-parallel size for the numeric check "
            "(default: the recorded tp). tp-blocked serves only its recorded tp.",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="GDN layers for the numeric check: decoder layer numbers, e.g. 0,1,2 or 0-7, "
            "and mtp.0 (or mtp) for multi-token-prediction layers (default: every GDN layer)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    report_path: Annotated[
        Path | None, typer.Option("--report", help="Also write the report as JSON to this file.")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Also write JUnit XML (for CI) to this file.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the verdict and any failure.")
    ] = False,
    numeric: Annotated[
        bool, typer.Option("--numeric/--no-numeric", help="Run the float64 reference forward.")
    ] = True,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, or cuda: also run each layer in bf16 with the engines' kind of kernels "
            "(fla / Triton), fused vs split and both vs float64; with --tp N and N GPUs, one "
            "process per GPU (NCCL), each reading only its slice. Needs --against."
        ),
    ] = "cpu",
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="Also run --against and the output in this engine and require the same "
            "result: vllm (greedy tokens and logits of 32+-token prompts), sglang (every "
            "rank's parameters and buffers, RoPE tables included; loading only), transformers "
            "or mlx (float32 logits). The engine runs in GDNFUSE_<ENGINE>_PYTHON, else "
            "GDNFUSE_ENGINE_PYTHON, else this Python if it has it. --tp sets vLLM's and "
            "sglang's tensor-parallel size. Exit 2 when the engine cannot load the source here.",
        ),
    ] = None,
) -> None:
    """Prove a converted checkpoint right: structure, exact bytes, reference forward, and
    with --engine what the engine computes.

    Structure of every shard, index and layout record; with --against, the fused rows' order
    found against the source and every byte compared (fused tensors un-fused); a float64
    reference forward of each GDN layer, split vs fused per TP rank. Exit 0 when every check
    passed, 1 when one failed, 2 for bad input or an engine that cannot load the source here.
    """
    from gdnfuse.verify import verify as run_verify

    with _errors():
        numbers = _layer_numbers(layers) if layers is not None else None
        with steps(err.is_terminal and not quiet and not json_out) as step:
            report = run_verify(checkpoint, against=against, tp=tp, layers=numbers,
                                numeric=numeric, device=device, engine=engine,
                                progress=step)  # fmt: skip
        for path, text in (
            (report_path, lambda: json.dumps(report.to_json(), indent=2) + "\n"),
            (junit, lambda: report.to_junit() + "\n"),
        ):
            if path is not None:
                try:
                    path.write_text(text())
                except OSError as e:
                    raise GdnfuseError(f"cannot write: {e.strerror or e}", path=str(path)) from None
    if json_out:
        print(json.dumps(report.to_json()))
    elif quiet:
        lines = report.lines()
        print("\n".join([lines[0], *(ln for ln in lines[1:] if ln.startswith("FAIL"))]))
    elif out.is_terminal:
        out.print(report.table())
    else:  # a CI log: one plain line per check, never wrapped into table cells
        print("\n".join(report.lines()))
    raise typer.Exit(0 if report.ok else 1)


def _layer_numbers(spec: str) -> list[int | str]:
    """``0,1,5-7,mtp.0`` -> ``[0, 1, 5, 6, 7, "mtp.0"]`` (``mtp``: every mtp layer)."""
    numbers: list[int | str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "mtp" or (part.startswith("mtp.") and part[4:].isdigit()):
            numbers.append(part)
            continue
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            raise GdnfuseError(f"--layers {spec!r}: expected numbers like 0,1,2 or 0-7, or mtp.0")
        numbers += range(int(lo), int(hi) + 1) if dash else [int(lo)]
    if not numbers:
        raise GdnfuseError(f"--layers {spec!r}: no layer numbers")
    return numbers


@app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where to write the example (default: a temporary folder, removed "
                     "afterwards unless --keep)."),
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the example files (and say where).")] = False,
    tp: TpOpt = 2,
) -> None:
    """Convert and verify a built-in example checkpoint, then say what to try next.

    Writes a small Qwen3.5-shaped vision-language checkpoint (nk=4, nv=12: r=3; RoPE base 1e7,
    MTP and a vision tower, as released), converts it with --tp 2 in both layouts and for
    transformers (--engine transformers --text-only), verifies each against the source, and
    prints the commands it ran so you can paste them.
    """
    import shutil

    from gdnfuse.convert import convert as run_convert
    from gdnfuse.synthetic import write_checkpoint

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gdnfuse-demo-"))
    status = 0
    try:
        with _errors():
            src = write_checkpoint(root / "qwen3.5-tiny", "tiny", shard_bytes=200_000,
                                   dtype="BF16")  # fmt: skip
            out.print(Text.assemble("wrote example checkpoint ", (str(src), "bold")))
            for name, flags in (("fused", []), ("fused-tp-blocked", ["--layout", "tp-blocked"]),
                                ("fused-transformers", ["--engine", "transformers",
                                                        "--text-only"])):  # fmt: skip
                dst = root / name
                given = " ".join(["--tp", str(tp), *flags, "--overwrite"])
                out.print(Text(f"\n$ gdnfuse convert {src} --out {dst} {given}", style="bold"),
                          soft_wrap=True)  # fmt: skip
                kw = dict(zip(flags[0::2], flags[1::2], strict=False))
                result = run_convert(src, dst, tp=tp, layout=kw.get("--layout"),
                                     engine=kw.get("--engine"), overwrite=True,
                                     text_only="--text-only" in flags)  # fmt: skip
                out.print(summary_table(f"converted {src.name} -> {dst.name}",
                                         shown_summary(result.summary())), soft_wrap=True)
                out.print(Text(f"$ gdnfuse verify {dst} --against {src}", style="bold"),
                          soft_wrap=True)  # fmt: skip
                status |= _demo_verify(dst, src, tp)
        verdict = "all conversions verified" if status == 0 else "a verification FAILED"
        out.print(Text(f"\ndemo: {verdict}.", style="bold green" if status == 0 else "bold red"))
        out.print("Next, on a real model (reads headers only):  gdnfuse inspect Qwen/Qwen3.5-27B",
                  soft_wrap=True)  # fmt: skip
        out.print("then:  gdnfuse convert Qwen/Qwen3.5-35B-A3B --out ./q35-vllm --engine vllm "
                  "--text-only --tp 2   (or serve the source: vLLM and sglang fuse at load)",
                  soft_wrap=True)  # fmt: skip
    finally:
        if keep or workdir:
            out.print(f"example files kept in {root}", soft_wrap=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    raise typer.Exit(status)


def _demo_verify(dst: Path, src: Path, tp: int) -> int:
    try:
        from gdnfuse.verify import verify as run_verify

        report = run_verify(dst, against=src, tp=tp)
    except GdnfuseError as e:  # verify needs torch; the converter does not
        out.print(Text(f"verify skipped: {e.for_cli()}", style="yellow"))
        return 0
    out.print(report.table() if out.is_terminal else Text("\n".join(report.lines())),
              soft_wrap=True)  # fmt: skip
    return 0 if report.ok else 1


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (must be new or empty).")],
    preset: Annotated[
        str,
        typer.Option(help="Model shape: tiny, qwen3.5-0.8b, qwen3.5-9b, qwen3.5-27b, "
                     "qwen3.5-35b-a3b, qwen3.5-397b-a17b."),
    ] = "tiny",
    layers: Annotated[
        int | None, typer.Option(min=1, help="Number of decoder layers (default: the preset's).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="BF16, F16 or F32.")] = "BF16",
    shard_size: Annotated[
        str, typer.Option(help="Largest shard, e.g. 500MB, 5GB (as save_pretrained).")
    ] = "5GB",
    seed: Annotated[int, typer.Option(help="Random seed of the (finite) weights.")] = 0,
    vocab: Annotated[
        int | None,
        typer.Option(min=1, help="Vocabulary size (default: the preset's, 248320 for the real "
                     "shapes). With few layers the embeddings and lm_head dominate: --vocab "
                     "32768 makes them 7.6x smaller."),
    ] = None,
) -> None:
    """Write a Qwen3.5-shaped checkpoint with random weights, as released: real key names,
    vision tower, MTP layer, shards, index, config (RoPE base 1e7, M-RoPE) and side files,
    for trying gdnfuse (and benchmarking it) without downloading.

    Example: gdnfuse synth ./q35-27b-4l --preset qwen3.5-27b --layers 4 --vocab 32768
    """
    from dataclasses import replace

    from gdnfuse.synthetic import PRESETS, checkpoint_bytes, embedding_bytes, write_checkpoint

    with _errors():
        if preset not in PRESETS:
            raise GdnfuseError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if dtype not in ("BF16", "F16", "F32"):
            raise GdnfuseError(f"--dtype {dtype!r}: choose BF16, F16 or F32")
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
        size = shard_size.upper().strip()
        number, unit = size[:-2], size[-2:]
        if unit not in units or not number.replace(".", "", 1).isdigit():
            raise GdnfuseError(f"--shard-size {shard_size!r}: expected e.g. 500MB or 5GB")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise GdnfuseError("directory is not empty", path=str(out_dir))
        # fast: random bytes at disk speed (finite values), as the benchmarks use
        shard_bytes = int(float(number) * units[unit])
        shape = replace(PRESETS[preset], layers=layers or PRESETS[preset].layers,
                        vocab=vocab or PRESETS[preset].vocab)  # fmt: skip
        total, emb = checkpoint_bytes(shape, dtype), embedding_bytes(shape, dtype)
        note = (f"; embeddings and lm_head are {human(emb)} of it (--vocab makes them smaller)"
                if emb > total / 3 else "")  # fmt: skip
        err.print(f"writing {human(total)} ({preset}, {shape.layers} layers, vocabulary "
                  f"{shape.vocab}){note}", soft_wrap=True)  # fmt: skip
        with progress(err.is_terminal, "writing") as (set_total, advance):
            set_total(total)
            done = [0]

            def wrote(now: int, _all: int) -> None:
                if advance is not None:
                    advance(now - done[0])
                done[0] = now

            path = write_checkpoint(out_dir, shape, dtype=dtype, seed=seed,
                                    shard_bytes=shard_bytes, fast=True, progress=wrote)  # fmt: skip
    written = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    out.print(f"wrote {human(written)} ({preset}, {shape.layers} layers) to {path}",
              soft_wrap=True)  # fmt: skip


def _version(value: bool) -> None:
    if value:
        from gdnfuse import __version__

        print(f"gdnfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Fuse Qwen3.5 GDN projections offline, bit for bit, and verify the result."""


def main() -> None:
    """Entry point: usage errors are one line too (``error: ...``, exit 2), not click's block."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except TyperException as e:  # click's usage errors (typer vendors click)
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `gdnfuse` alone: the help, as it is
            print(e.format_message())
            sys.exit(getattr(e, "exit_code", 2))
        message = " ".join(e.format_message().replace("Value error, ", "").split())
        ctx = getattr(e, "ctx", None)
        hint = f" (see: gdnfuse {ctx.info_name} --help)" if ctx and ctx.parent else ""
        err.print(Text.assemble(("error: ", "bold red"), message + hint), highlight=False,
                  soft_wrap=True)  # fmt: skip
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:  # Ctrl-C outside a command's own handling
        err.print(Text.assemble(("error: ", "bold red"), "interrupted"), soft_wrap=True)
        sys.exit(2)
    except BrokenPipeError:  # `gdnfuse ... | head`
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
