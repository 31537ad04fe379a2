"""``miu-unlearn``: group-robust unlearning of a safetensors checkpoint from the shell.

A thin click layer: each command parses its options, calls one library
function (:func:`miu_hooks.cli.inputs.prepare` then
:func:`miu_hooks.cli.run.execute`, or :func:`miu_hooks.demo.run_demo`) and
formats the result. Only click and the standard library are imported at
start-up, so ``--help`` and ``--version`` answer without importing torch; the
inputs are checked before torch is imported, so bad input fails fast.

Errors print one line on stderr and exit with the code of their type
(:mod:`miu_hooks.cli.errors`); ``MIU_HOOKS_DEBUG=1`` shows tracebacks of
unexpected errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import click

from miu_hooks import __version__
from miu_hooks.cli.errors import Interrupted, NothingToForget, exit_code, exit_code_table
from miu_hooks.cli.options import (
    SETTINGS_NOTE,
    SectionOption,
    given_settings,
    option_names,
    settings_options_decorator,
)
from miu_hooks.errors import ConfigError, MIUError

__all__ = ["build_config", "cli", "main"]

EPILOG = f"""\b
Examples:
  miu-unlearn demo
  miu-unlearn -m vit/ -d train.safetensors -f forget.csv --test test.safetensors -o out/
  miu-unlearn -m model.safetensors --arch mypkg.models:build -d data.csv -f ids.csv
  miu-unlearn -m out/ -d train.safetensors -f more-ids.csv -o out2/   # a later request

\b
Inputs: --model is a save_pretrained folder (config.json + model.safetensors), its
model.safetensors, or a bare safetensors file with --arch. --data/--test/--val are
a .safetensors file (inputs, labels, groups[, ids]), a .csv manifest
(path,label,group[,id]; images resized to --image-size, RGB, mean=std=0.5) or a
datasets save_to_disk folder (needs 'datasets'; FOLDER:split picks a DatasetDict's
split). Ids are integers. Forget ids (header required, --id-column) match the data's
ids, else row numbers (from 0, a CSV's header not counted); duplicate ids are an error.
Output --out: model.safetensors, config.json, report.json, report.md, groups.png,
ledger.json (the original model's path and sha256, the data's sha256, every request
so far) and forgotten.csv (every id forgotten so far).
An interrupted run keeps .<out>.partial/ beside it; --resume continues it.

\b
Repeated requests: when --model is an earlier output, the run forgets every id of
its ledger plus the new ones (retain = data minus all of them; REWEIGHT, where the
method uses it, targets the whole data's mixture) and calibrates MIU against the
ledger's ORIGINAL model (--original PATH if it moved; its sha256 must match). --data
must be the same data (sha256). A request whose ids were all forgotten before exits 0
and writes nothing.

\b
Exit codes:
{exit_code_table()}
"""


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` so cleanup runs as for Ctrl-C."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (e.g. some test runners)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Group(click.Group):
    """A click group that maps library errors to one stderr line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except NothingToForget as done:  # an outcome, not an error: exit 0, nothing written
            if ctx.params.get("as_json"):
                click.echo(json.dumps({"nothing_to_do": True, "message": done.message}))
            click.echo(f"miu-unlearn: {_one_line(done.message)}", err=True)
            return None
        except KeyboardInterrupt as exc:
            resume = ctx.meta.get("miu_resume_hint", "")
            why = str(exc) or "Ctrl-C"  # a plain KeyboardInterrupt has no message
            click.echo(f"miu-unlearn: interrupted ({why}){resume}", err=True)
            raise click.exceptions.Exit(exit_code(exc)) from None
        except MIUError as exc:
            click.echo(f"miu-unlearn: error: {_one_line(exc)}", err=True)
            raise click.exceptions.Exit(exit_code(exc)) from None
        except ImportError as exc:
            click.echo(f"miu-unlearn: missing dependency: {_one_line(exc)}", err=True)
            raise click.exceptions.Exit(15) from None
        except Exception as exc:
            if os.environ.get("MIU_HOOKS_DEBUG"):
                raise
            click.echo(
                f"miu-unlearn: internal error: {type(exc).__name__}: {_one_line(exc)} "
                "(set MIU_HOOKS_DEBUG=1 for the traceback)",
                err=True,
            )
            raise click.exceptions.Exit(1) from None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the options in sections (inputs, method, settings by class, data, other)."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and isinstance(param, click.Option):
                section = getattr(param, "section", _OTHER)
                sections.setdefault(section, []).append(record)
        sections[_OTHER] = sections.pop(_OTHER, [])  # -V and -h join the other options, last
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)
                if title == _METHOD:
                    formatter.write_paragraph()
                    formatter.write_text(SETTINGS_NOTE)
        self.format_commands(ctx, formatter)


_METHOD, _OTHER = "Method", "Other options"


def image_workers() -> int:
    """Default ``--num-workers`` for image data: up to 4, leaving one core to the main process."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def build_config(ctx: click.Context, path: str | None, method: str) -> Any:
    """The resolved config of ``--method`` (what runs, as recorded in the outputs).

    The settings given on the command line (generated options, and ``--num-workers``)
    override those of ``--config``; only given ones are passed, so the class's defaults
    fill the rest. A setting the method's class does not have is refused with a
    :class:`ConfigError` (exit 2) naming the option and the class that has it.
    """
    from miu_hooks.methods import config_class, resolve_run

    base: dict[str, Any] = {}
    if path is not None:
        try:
            base = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from exc
        if not isinstance(base, dict):
            raise click.BadParameter("must hold a JSON object", param_hint="--config")
    cls = config_class(method)
    known = {f.name for f in dataclasses.fields(cls)}
    given = given_settings(ctx)
    names = option_names(ctx)
    for name, value in given.items():
        if name not in known:
            why = _unknown_setting(cls, name, value)
            raise ConfigError(f"{names[name]} is not a setting of --method {method}: {why}")
    base.update(given)
    if ctx.params["num_workers"] is not None:  # hand-written: its default depends on the data
        base["num_workers"] = ctx.params["num_workers"]
    if base.get("max_grad_norm") == 0:  # --max-grad-norm 0: no clipping
        base["max_grad_norm"] = None
    return resolve_run(method, cls.from_dict(base)).config


def _unknown_setting(cls: Any, name: str, value: Any) -> str:
    """The library's message for a setting ``cls`` does not have (which class has it)."""
    try:
        cls(**{name: value})
    except ConfigError as exc:
        return str(exc)
    return f"{cls.__name__} has no {name}"  # pragma: no cover (only called for unknown names)


def _references(values: Sequence[str]) -> dict[str, str]:
    refs: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            name = Path(value).stem if Path(value).suffix else Path(value).name
        if not name or not path or name in refs or name in ("original", "unlearned"):
            raise click.BadParameter(
                f"{value!r}: use NAME=PATH with a new name", param_hint="--reference"
            )
        refs[name] = path
    return refs


def _ints(value: str | None, hint: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()] if value else []
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use comma-separated integers", param_hint=hint
        ) from None


def _check_method_and_device(method: str, device: str) -> None:
    from miu_hooks.methods import available_methods
    from miu_hooks.runtime import resolve_device

    if method not in available_methods():
        raise click.BadParameter(
            f"{method!r} is not one of {', '.join(available_methods())}", param_hint="--method"
        )
    try:
        resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(_one_line(exc), param_hint="--device") from None


def _print_counts(prep: Any, log: Any) -> None:
    width = max(len(n) for n in prep.group_names)
    log(f"{'group':<{width}}  in data  forget  retain")
    for g, (n, f, r) in prep.plan.counts.items():
        log(f"{prep.group_names[g]:<{width}}  {n:>7}  {f:>6}  {r:>6}")


def _log_request(prep: Any, log: Any) -> None:
    request = prep.request
    if request is not None and request.continued:
        log(
            f"request {len(request.ledger) + 1}: {len(request.new_ids)} new of "
            f"{len(request.request.ids)} ids, {len(request.ledger.forgotten)} forgotten before; "
            f"calibrating against the original model {request.original.weights}"
        )


def _print_result(report: dict[str, Any], as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if quiet:
        return
    from miu_hooks.cli.report import guard_summary, per_group_markdown

    click.echo(f"Per-group accuracy ({report['evaluated_on']} set):")
    click.echo(per_group_markdown(report["models"], report["groups"]["names"]))
    for ref, gaps in report.get("gaps", {}).get("unlearned", {}).items():
        click.echo(f"Avg. Gap {ref}: {gaps['avg_gap']:.2f}   ToW: {gaps['tow']:.2f}")
    click.echo(guard_summary(report.get("guard")))
    click.echo(f"Report: {Path(report['output']) / 'report.md'}")


def _opt(*names: str, **kw: Any) -> Any:
    return click.option(*names, cls=SectionOption, show_default=kw.pop("show_default", True), **kw)


_input_opt = functools.partial(_opt, section="Inputs and output")
_method_opt = functools.partial(_opt, section=_METHOD)
_data_opt = functools.partial(_opt, section="Data")
_PATH = click.Path(dir_okay=True, path_type=str)


@click.group(
    cls=_Group,
    invoke_without_command=True,
    no_args_is_help=True,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="miu-unlearn")
@_input_opt("-m", "--model", type=_PATH, show_default=False, help="Checkpoint file or folder.")
@_input_opt("-d", "--data", type=_PATH, show_default=False, help="Training data D (see below).")
@_input_opt("-f", "--forget", type=_PATH, show_default=False, help="CSV of ids to forget.")
@_input_opt(
    "-o", "--out", type=_PATH, show_default=False, help="Output folder [./<model>-<method>]."
)
@_input_opt("--arch", help="package.module:factory (or file.py:factory) building the model.")
@_input_opt("--test", type=_PATH, help="Test set: TA, EO, GA, per-group accuracy, MIA.")
@_input_opt(
    "--val",
    type=_PATH,
    help="Held-out set for MIA (default: the test set) and the collapse guard (default: a "
    "slice of the retain set kept out of training).",
)
@_input_opt("--reference", multiple=True, help="[NAME=]PATH of a retrained model (Gap, ToW).")
@_input_opt("--original", type=_PATH, help="Where the ledger's original model lies now (moved).")
@_input_opt("--resume", is_flag=True, help="Continue the interrupted run of --out.")
@_input_opt("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_method_opt("--method", default="miu", help="Method; `miu-unlearn methods` lists them.")
@_method_opt(
    "--config", "config_file", type=_PATH, help="JSON of the method's config fields (options win)."
)
@settings_options_decorator()
@_data_opt(
    "--num-workers",
    type=int,
    help="DataLoader worker processes [images: up to 4 (decoding off the main thread); else 0].",
)
@_data_opt("--feature-module", help="Dotted name of the classification head.")
@_data_opt("--id-column", default="id", help="Id column of the forget CSV.")
@_data_opt(
    "--input-key",
    help="Inputs tensor/column [.safetensors: inputs | .csv: path | folder: image, img, "
    "pixel_values or inputs].",
)
@_data_opt("--label-key", help="Label tensor/column [labels | label | label or labels].")
@_data_opt("--group-key", help="Group tensor/column [groups | group | group or groups].")
@_data_opt("--id-key", help="Id tensor/column [ids | id | id or ids].")
@_data_opt(
    "--split",
    help="Split of a datasets DatasetDict folder given as --data [train]; FOLDER:split names "
    "the split of any folder (--test: test, --val: validation by default).",
)
@_data_opt("--image-size", type=int, help="Image side [config.json image_size, else 224].")
@_data_opt("--group-names", help="Comma-separated group names, by group id.")
@_data_opt("--num-groups", type=int, help="|G| [max group id + 1].")
@_data_opt("--forget-groups", help="Group ids for EO/GA, comma-separated [most-forgotten group].")
@_opt("--threads", type=int, help="torch CPU threads.")
@_opt("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
@_opt("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@click.pass_context
def cli(ctx: click.Context, **opts: Any) -> None:
    """Unlearn the samples listed in --forget from --model, group-robustly (REWEIGHT + MIU)."""
    if ctx.invoked_subcommand is not None:
        return
    for name in ("model", "data", "forget"):
        if not opts[name]:
            raise click.UsageError(f"Missing option '--{name}'.")
    if opts["reference"] and not opts["test"]:
        raise click.UsageError("--reference needs --test (Gap and ToW use test metrics)")
    method = opts["method"]
    config = build_config(ctx, opts["config_file"], method)
    model_name = Path(opts["model"]).resolve()
    model_name = model_name.parent if model_name.name == "model.safetensors" else model_name
    out = opts["out"] or f"{model_name.stem}-{method}"
    from miu_hooks.cli.data_index import Columns, is_text
    from miu_hooks.cli.inputs import prepare, work_dir
    from miu_hooks.cli.report import Console

    console = Console(quiet=opts["quiet"])
    prep = prepare(
        model=opts["model"],
        data=opts["data"],
        forget=opts["forget"],
        out=out,
        arch=opts["arch"],
        id_column=opts["id_column"],
        test=opts["test"],
        val=opts["val"],
        references=_references(opts["reference"]),
        columns=Columns(opts["input_key"], opts["label_key"], opts["group_key"], opts["id_key"]),
        split=opts["split"],
        num_groups=opts["num_groups"],
        num_sensitive=config.num_sensitive,
        group_names=[n.strip() for n in opts["group_names"].split(",")]
        if opts["group_names"]
        else (),
        forget_groups=_ints(opts["forget_groups"], "--forget-groups"),
        overwrite=opts["overwrite"],
        original=opts["original"],
    )
    images = prep.data.kind != "tensors" and not is_text(prep.data)
    if opts["num_workers"] is None and images and not config.num_workers:
        config = config.replace(num_workers=image_workers())  # decode images in workers
    _log_request(prep, console.log)
    console.log(f"forgetting {len(prep.plan.forget)} of {len(prep.data)} samples:")
    _print_counts(prep, console.log)
    console.log("EO and GA refer to group(s) " + ", ".join(map(str, prep.forget_groups)))
    forget_epochs = getattr(config, "forget_epochs", None)
    if forget_epochs is not None and forget_epochs > config.epochs:
        console.log(
            f"note: forget epochs ({forget_epochs}) exceed epochs ({config.epochs}): every "
            f"epoch has a forget pass, {config.epochs} in all"
        )
    _check_method_and_device(method, config.device)
    ctx.meta["miu_resume_hint"] = (
        f"; finished work is kept in {work_dir(prep.out)}: rerun with --resume to continue"
    )
    from miu_hooks.cli.run import execute

    result = execute(
        prep,
        config=config,
        method=method,
        feature_module=opts["feature_module"],
        image_size=opts["image_size"],
        threads=opts["threads"],
        resume=opts["resume"],
        console=console,
    )
    for note in result.notes:
        console.log(f"note: {note}")
    _print_result(result.report, opts["as_json"], opts["quiet"])


@cli.command()
@_opt("--quick", is_flag=True, envvar="MIU_HOOKS_DEMO_QUICK", help="Tiny settings (tests, CI).")
@_opt("-o", "--out", type=_PATH, help="Report folder [<cache>/demo-<hash>/report].")
@_opt("--threads", type=int, default=1, help="torch CPU threads.")
@_opt("--retrain-cache/--no-retrain-cache", default=False, help="Reuse cached retrained models.")
@_opt("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
@_opt("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def demo(
    quick: bool, out: str | None, threads: int, retrain_cache: bool, quiet: bool, as_json: bool
) -> None:
    """Run the embedded Colored-Digits demo (cache: $MIU_HOOKS_CACHE or ~/.cache/miu_hooks)."""
    from miu_hooks.cli.report import Console
    from miu_hooks.demo import run_demo

    result = run_demo(
        quick=quick,
        out=out,
        threads=threads,
        reuse_retrain=retrain_cache,
        console=Console(quiet=quiet),
    )
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    elif not quiet:
        click.echo(result.summary)


@cli.command()
def methods() -> None:
    """List the methods: name, settings class, and whether REWEIGHT runs (imports torch)."""
    from miu_hooks.methods import describe_methods

    rows = describe_methods()
    width = max(len(name) for name, _, _ in rows)
    click.echo("\n".join(f"{name:<{width}}  {cls:<14}  {what}" for name, cls, what in rows))


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        miu-unlearn, version ...
        0
    """
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="miu-unlearn")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
