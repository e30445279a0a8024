"""The ``capsnet`` command line: each command is a thin adapter over a library function.

Errors the user can fix (config, data, checkpoint, training, export) print a
short message on stderr and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from capsnet.config import C_INT_MAX


def _at_most_c_int(value: int | None) -> int | None:
    """A size torch takes as a C int (the batch size options): refused beyond it, as the option's."""
    if value is not None and value > C_INT_MAX:
        raise typer.BadParameter(f"at most {C_INT_MAX:,}, got {value:,}")
    return value


FLAG = " "  # the metavar of a flag, which takes no value (typer would show <bool>)


class _FlagHelp:
    """``-h/--help`` shown without a value type, as the other flags (typer would show <bool>)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="capsnet",
    help="Capsule networks with EM routing (Hinton, Sabour & Frosst, ICLR 2018): train, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
DEFAULT_OUT_DIR = "weights/em_capsules"

CKPT_HELP = (
    "Checkpoint: 'latest' (newest run, highest step), 'best' (best.pt of the newest run), "
    "a run directory, a .pt file, or a run name under --out-dir (RUN, or a file in it: RUN/best.pt)."
)
OUT_DIR_HELP = "Folder that holds the run directories (logging.out_dir of the training config)."
DEBUG_HELP = "Show the full traceback when something fails."

#: Options that several commands take with the same meaning.
DebugOption = Annotated[bool, typer.Option("--debug", metavar=FLAG, help=DEBUG_HELP)]
OutDirOption = Annotated[str, typer.Option("--out-dir", help=OUT_DIR_HELP)]
JsonOption = Annotated[
    bool, typer.Option("--json", metavar=FLAG, help="Print the result as one JSON object.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N (GPU N) or mps.")]
RunDataRootOption = Annotated[
    str | None,
    typer.Option("--data-root", help="Look for the dataset here instead of the run's data.root."),
]
DataOverrideOption = Annotated[
    list[str] | None,
    typer.Option(
        "--override",
        "-o",
        metavar="KEY=VALUE",
        help="Change a data value of the checkpoint's config, or model.iterations (the routing "
        "iterations) (repeatable; the rest of the architecture comes from the checkpoint).",
    ),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from capsnet.checkpoint import CheckpointError
    from capsnet.config import ConfigError
    from capsnet.data import DataError
    from capsnet.export import ExportError
    from capsnet.routing import KernelCompileError
    from capsnet.trainer import TrainingError
    from capsnet.visualize import ExperimentError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        TrainingError,
        ExportError,
        ExperimentError,
        KernelCompileError,
    )


@contextlib.contextmanager
def _errors(debug: bool):
    """Known errors: message and exit code 2; anything else: exit code 1; tracebacks with --debug."""
    debug = debug or _state["debug"]
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        if isinstance(e, _user_errors()):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            # a folder or file the command was told to use that cannot be made, read or written
            from capsnet.runtime import os_error_reason

            typer.echo(f"error: could not use {e.filename}: {os_error_reason(e)}", err=True)
            raise typer.Exit(2) from None
        if _out_of_memory(e):
            typer.echo(
                f"error: not enough memory: {_first_line(e)}; use a smaller batch (--batch-size where the "
                "command has it, else -o train.batch_size=N or -o train.eval_batch_size=N)",
                err=True,
            )
            raise typer.Exit(2) from None
        typer.echo(
            f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True
        )
        raise typer.Exit(1) from None


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch's report that a tensor could not be allocated (on any device)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "DefaultCPUAllocator: not enough memory" in str(e)
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    # the CPU allocator's words without its source location ("[enforce fail at alloc_cpu.cpp:127] err == 0. ")
    return line.split("DefaultCPUAllocator: ", 1)[-1].rstrip(".")


def _print_version(asked: bool) -> None:
    if asked:
        import torch

        from capsnet import __version__

        typer.echo(f"capsnet {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _main(
    debug: DebugOption = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            metavar=FLAG,
            is_eager=True,
            callback=_print_version,
            help="Print capsnet's version, with torch's and Python's, and exit.",
        ),
    ] = False,
) -> None:
    _state["debug"] = debug


def _console_echo():
    """``typer.echo`` onto stdout until stdout is a pipe whose reader is gone, then onto stderr,
    and nowhere once stderr's reader is gone too.

    ``capsnet train ... | tee log`` stopped with Ctrl-C loses its ``tee`` at once, while training
    finishes its step and saves; a run piped into ``head`` loses its reader after a few lines. Either
    way the run goes on (or stops as it was asked to) and its remaining lines reach the terminal, or,
    with stderr in the same pipe (``2>&1 | head``), are dropped.
    """
    closed = {False: False, True: False}  # stdout, stderr

    def echo(message: str) -> None:
        for err in (False, True):
            if closed[err]:
                continue
            try:
                typer.echo(message, err=err)
                return
            except OSError as e:  # the reader is gone (a pipe), or the file is full or broken
                closed[err] = True
                if not err and not isinstance(e, BrokenPipeError) and not closed[True]:
                    with contextlib.suppress(OSError):
                        typer.echo(
                            f"warning: could not write to standard output ({e.strerror or e}): "
                            "the rest goes to standard error",
                            err=True,
                        )
                # what is still buffered, and later writes, go nowhere instead of failing
                stream = sys.stderr if err else sys.stdout
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)

    return echo


@app.command(cls=_Command)
def train(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML config (see configs/). Optional with --resume: the checkpoint's is used.",
        ),
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            "-o",
            metavar="KEY=VALUE",
            help="Change one config value: -o train.batch_size=64 (repeatable; the value is read as YAML, so -o 'model.caps_types=[16, 16]' gives a list and null means none).",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue from 'latest', 'best', a run directory, a .pt file, or a run name under "
            "logging.out_dir (RUN, or a file in it: RUN/step-000006.pt). "
            "With --run-name, 'latest' continues that run, or starts it when it has no checkpoint yet "
            "(for torchrun --max-restarts and requeued jobs). A run folder outside logging.out_dir "
            "continues in logging.out_dir under its folder's name and is left as it is.",
        ),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name",
            help="Run directory name (default: <config name>-<date>-<time>).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            metavar=FLAG,
            help="Replace an existing run directory of that name (and its TensorBoard events); refused while a "
            "process of this machine still trains that run.",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Train a model: checkpoints go to <logging.out_dir>/<run>/, TensorBoard events to <logging.tb_dir>/<run>/."""
    with _errors(debug):
        from capsnet.config import ConfigError, load_config
        from capsnet.distributed import launched_world_size
        from capsnet.trainer import TrainingInterrupted, config_for_resume, fit

        if config is None and resume is None:
            raise ConfigError(["--config is required (or --resume to continue a run with its own config)"])
        cfg = (
            load_config(config, override)
            if config is not None
            else config_for_resume(resume, override, run_name)
        )
        prefix = config.stem if config is not None else None
        try:
            fit(
                cfg,
                run_name=run_name,
                resume=resume,
                overwrite=overwrite,
                echo=_console_echo(),
                name_prefix=prefix,
            )
        except TrainingInterrupted as stopped:  # the checkpoint is saved and the resume command printed
            raise typer.Exit(stopped.exit_code) from None
        if launched_world_size() > 1:
            # A finished torchrun worker: every file is written and closed and the process
            # group is gone. Leave without the interpreter's teardown, where Gloo's
            # background threads were seen to abort a worker (SIGABRT, "terminate called
            # without an active exception") after a complete run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


@app.command("config", cls=_Command)
def config_(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config to show (default: the built-in defaults)."),
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            "-o",
            metavar="KEY=VALUE",
            help="Change one config value, as train's -o does (repeatable).",
        ),
    ] = None,
    changed: Annotated[
        bool,
        typer.Option("--changed", metavar=FLAG, help="Show only the keys whose value is not the default."),
    ] = False,
    plain: Annotated[
        bool, typer.Option("--plain", metavar=FLAG, help="Leave out the comment that explains each key.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Show a config as training would use it: every key with its value and what it does.

    The config is checked as train checks it, so a bad key or value is an error here too (whether this machine has the train.device it names is left to train). The output is YAML that --config reads back: capsnet config -c configs/small.yaml -o train.epochs=2 > mine.yaml.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.config import documented_yaml, load_config

        cfg = load_config(config, override)
        text = documented_yaml(cfg, only_changed=changed, comments=not plain)
    typer.echo(text, nl=False)


@app.command(cls=_Command)
def runs(
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            metavar=FLAG,
            help="Print the runs as one JSON list: [] for a folder that holds no run yet.",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """List the runs in --out-dir, the newest first: when each was last started or saved, its data and model, how far it got (done, or running, with the time left, while its training process still runs on this machine) and its best score.

    Each run is named as --ckpt and --resume take it (capsnet eval --ckpt RUN). Runs started with no checkpoint yet (in their first epoch, or stopped before their first save) follow, with their last logged step and whether they still run.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.checkpoint import is_run_folder, no_runs, run_summaries, runs_table

        rows = run_summaries(out_dir)
        folder = Path(out_dir).expanduser()
        # a script polling a folder gets [] until its first run saves; a folder that is not there
        # (a misspelt --out-dir) or one run's folder given in its place is an error either way
        if not rows and (not as_json or not folder.is_dir() or is_run_folder(folder)):
            raise no_runs(folder, listing=True)
        text = _json(rows) if as_json else runs_table(rows, out_dir)
    typer.echo(text)


@app.command("eval", cls=_Command)
def eval_(
    ckpt: Annotated[str, typer.Option("--ckpt", help=CKPT_HELP)] = "latest",
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="Split to evaluate: test, val (needs data.val_split > 0), or test_familiar "
            "(smallNORB viewpoint splits).",
        ),
    ] = "test",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            callback=_at_most_c_int,
            help="Evaluation batch size (default: the run's).",
        ),
    ] = None,
    as_json: JsonOption = False,
    data_root: RunDataRootOption = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            "-o",
            metavar="KEY=VALUE",
            help="Change a value of the checkpoint's config for this evaluation, e.g. -o data.root=/data, "
            "or score the model with another number of routing iterations, -o model.iterations=1 "
            "(repeatable; the rest of the architecture comes from the checkpoint).",
        ),
    ] = None,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    device: DeviceOption = "auto",
    crops: Annotated[
        int | None,
        typer.Option(
            "--crops",
            min=1,
            help="Also run the multi-crop test: average the class activations over N crops of each image "
            "(the centre crop plus a grid of shifted crops; 5: centre and corners, 9: a 3x3 grid) and report "
            "it beside the single-crop accuracy. N=1 is the single-crop test.",
        ),
    ] = None,
    crop_shift: Annotated[
        int | None,
        typer.Option(
            "--crop-shift",
            min=1,
            help="Largest crop offset in pixels (default: the room around the centre crop, 8 px on "
            "smallNORB; image size / 14 for datasets seen whole, whose shifted crops are padded with black).",
        ),
    ] = None,
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            metavar=FLAG,
            help="Also average the class activations of each image (or of each crop, with --crops) with "
            "those of its left-right mirror, and report that beside the single-crop accuracy: test-time "
            "flipping, for models trained with horizontal flips (data.flip; not for digits).",
        ),
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, help="Evaluate a seeded random subset of this many images (default: all)."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write a PNG bar chart of the per-class accuracy (single crop, multi-crop, familiar "
            "and novel viewpoints) to this file (needs matplotlib, the viz extra).",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Evaluate a checkpoint: accuracy, loss and a per-class table (the config travels inside it).

    With a smallNORB viewpoint split (data.split azimuth or elevation) the test set holds the novel viewpoints, and the accuracy on the familiar ones is reported beside it.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.evaluate import evaluate_checkpoint
        from capsnet.runtime import tune_allocator

        tune_allocator()
        if crop_shift is not None and crops is None:
            from capsnet.visualize import ExperimentError

            raise ExperimentError(
                "--crop-shift sets the shifts of the multi-crop test: give --crops N with it"
            )
        from capsnet.data import reported_data_warnings, tidy_made_folders

        figure_folder = None
        if plot is not None:
            from capsnet.visualize import check_writable, figure_path

            # matplotlib and a file name it can write, before the evaluation (which may take long)
            figure_folder = figure_path(plot).parent
        with reported_data_warnings(), tidy_made_folders(*[f for f in [figure_folder] if f is not None]):
            if figure_folder is not None:
                check_writable(figure_folder)
            report = evaluate_checkpoint(
                ckpt,
                out_dir,
                split,
                batch_size,
                data_root,
                device,
                override,
                crops=crops,
                crop_shift=crop_shift,
                limit=limit,
                mirror=mirror,
            )
    # the results first, so that a figure that cannot be written does not lose them
    typer.echo(_json(report.to_dict()) if as_json else report.summary())
    if plot is not None:
        with _errors(debug):
            from capsnet.visualize import plot_eval, save_figure

            written = save_figure(plot_eval(report), plot)
        # on stderr with --json, which keeps stdout one JSON object: the name may have gained .png
        typer.echo(f"wrote {written}", err=as_json)


def _json(value) -> str:
    """Standard JSON for --json (no NaN: an accuracy over no images is null)."""
    from capsnet.tracking import strict_json

    return strict_json(value)


@app.command(cls=_Command)
def predict(
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="PATH",
            help="Image files, or folders of them (searched recursively for the formats PIL reads).",
            show_default=False,
            readable=False,  # a file that cannot be read is skipped with the others, not a usage error
        ),
    ] = None,
    ckpt: Annotated[str, typer.Option("--ckpt", help=CKPT_HELP)] = "latest",
    top: Annotated[
        int,
        typer.Option("--top", "-k", min=1, help="Classes shown per image, most active first."),
    ] = 3,
    invert: Annotated[
        bool,
        typer.Option(
            "--invert",
            metavar=FLAG,
            help="Turn each pixel p into 255 - p first: for dark objects on a light ground given to a "
            "model of MNIST or Fashion-MNIST, whose images are light on black.",
        ),
    ] = False,
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            metavar=FLAG,
            help="Average each image's class activations with its left-right mirror's (for models "
            "trained with horizontal flips, data.flip).",
        ),
    ] = False,
    as_json: JsonOption = False,
    csv_path: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write one row per image to this CSV file: path, class, activation, then every "
            "class's activation (folders missing on its path are made).",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, callback=_at_most_c_int, help="Images decoded and classified at a time."
        ),
    ] = 64,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    device: DeviceOption = "auto",
    debug: DebugOption = False,
) -> None:
    """Classify image files with a trained checkpoint: the most active classes of each.

    Each file is prepared as the run's test images were scored (no augmentation), from the checkpoint alone: converted to grey or RGB as the model takes, resized to its input size as the run's dataset resized its images (the aspect ratio is not kept), and normalised with the statistics the run recorded (smallNORB models: resized to 1.5 times their input size, standardised per image, then centre-cropped). Files that are not readable images are skipped with a warning.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.data import reported_data_warnings
        from capsnet.predict import predict_files

        if csv_path is not None and csv_path.is_dir():
            from capsnet.data import DataError

            raise DataError(
                f"--csv {csv_path} is a folder: give a file name, such as {csv_path / 'predictions.csv'}"
            )
        from capsnet.data import tidy_made_folders
        from capsnet.visualize import check_writable

        csv_folder = [csv_path.parent] if csv_path is not None else []
        with reported_data_warnings(), tidy_made_folders(*csv_folder):
            for folder in csv_folder:  # before the scoring, which may take long
                check_writable(folder)
            report = predict_files(
                ckpt,
                images or [],
                out_dir,
                device,
                batch_size=batch_size,
                top=top,
                invert=invert,
                mirror=mirror,
                show_progress=True,
            )
    # the results first, so that a CSV file that cannot be written does not lose them
    typer.echo(_json(report.to_dict()) if as_json else report.summary())
    if csv_path is not None:
        with _errors(debug):
            from capsnet.checkpoint import atomic_write_bytes

            csv_path.parent.mkdir(parents=True, exist_ok=True)
            # a file name that is not UTF-8 is written as its bytes, as the file system holds it
            atomic_write_bytes(report.csv_text().encode(errors="surrogateescape"), csv_path)
        typer.echo(f"wrote {csv_path}", err=as_json)


@app.command(cls=_Command)
def export(
    ckpt: Annotated[str, typer.Option("--ckpt", help=CKPT_HELP)] = "latest",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx (dynamic batch size) or pt2 (torch.export archive).",
        ),
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output file (default: exports/<run>/model.onnx or model.pt2); a name with no suffix "
            "gets the format's (--out model: model.onnx).",
        ),
    ] = None,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            help="Dataset folder for the parity check's test batch (default: the run's data.root; an "
            "image-folder run reads its data.test_dir or data.train_dir, wherever this points).",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=2, callback=_at_most_c_int, help="Images in the parity-check batch."
        ),
    ] = 8,
    inputs: Annotated[
        str,
        typer.Option(
            "--inputs",
            help="pixels: the model takes pixels in [0, 1] (uint8 / 255) and normalises them itself, "
            "as the data pipeline does; normalised: the caller normalises (the file's metadata says how).",
        ),
    ] = "pixels",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            metavar=FLAG,
            help="Replace an existing file at the output path (once the new export passes).",
        ),
    ] = False,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    debug: DebugOption = False,
) -> None:
    """Export a checkpoint to ONNX or .pt2 and check its outputs against the eager model.

    The exported model takes pixels in [0, 1] and applies the dataset's normalisation itself (--inputs normalised leaves that to you); the file's metadata names the input, the preprocessing and the classes.
    The file reaches its name only once its outputs match the eager model's on test images, so a failed export leaves what was there.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.export import export_checkpoint

        report = export_checkpoint(
            ckpt,
            fmt,
            out,
            out_dir,
            data_root,
            batch_size,
            overwrite=overwrite,
            inputs=inputs,
            say=lambda line: typer.echo(line, err=True),
        )
    typer.echo(report.summary())


@app.command(cls=_Command)
def average(
    ckpt: Annotated[
        str,
        typer.Option(
            "--ckpt",
            help="The run whose checkpoints are averaged: 'latest', a run directory or a run name under "
            "--out-dir (its newest steps), or a file of the run: 'best', RUN/best.pt, RUN/step-000123.pt "
            "(the steps up to that file's).",
        ),
    ] = "latest",
    last: Annotated[
        int | None,
        typer.Option(
            "--last",
            min=2,
            help="Average this many of the run's checkpoints from the ends of epochs, the newest up to "
            "that step (default: every one the run kept, logging.keep).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The averaged checkpoint (default: average-<first step>-<last step>.pt in the run folder).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", metavar=FLAG, help="Replace an existing file at the output path."),
    ] = False,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Average the weights of a run's last checkpoints into one checkpoint, for eval, predict, export and train.init_from.

    Late in a run, with the learning rate low, the mean of the weights of a few checkpoints often scores a little above any one of them. Batch-norm statistics are averaged like the weights, not measured again. The file holds no optimiser state, so a run cannot be resumed from it; -o train.init_from=FILE starts a new one from its weights.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.averaging import average_run

        report = average_run(ckpt, out_dir, last, out, overwrite)
    typer.echo(_json(report.to_dict()) if as_json else report.summary())


@app.command(cls=_Command)
def bench(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config whose model is timed.")],
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            "-o",
            metavar="KEY=VALUE",
            help="Change one config value: -o model.iterations=2 (repeatable).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            callback=_at_most_c_int,
            help="Images per step (default: the config's train.batch_size).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps (the median is reported).")] = 10,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup",
            min=0,
            help="Untimed steps first (at least 3 with compiled routing, which compiles in them).",
        ),
    ] = 2,
    allocator: Annotated[
        str,
        typer.Option(
            "--allocator",
            help="tuned: freed memory stays in the heap, as in training; default: the C library's own behaviour.",
        ),
    ] = "tuned",
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", min=1, help="Image side length (default: the dataset's)."),
    ] = None,
    classes: Annotated[
        int | None, typer.Option("--classes", min=2, help="Number of classes (default: the dataset's).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="torch intra-op threads (default: the config's train.threads, else torch's).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu, cuda, cuda:N, mps or auto (CUDA, then MPS, then the CPU); default: the config's train.device.",
        ),
    ] = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Time training and inference steps of a config's model on random data of its geometry."""
    with _errors(debug):
        from capsnet.bench import run_benchmark
        from capsnet.config import ConfigError, load_config

        if allocator not in ("tuned", "default"):
            raise ConfigError([f"--allocator: {allocator!r} is not one of tuned, default"])
        cfg = load_config(config, override)
        result = run_benchmark(
            cfg,
            batch_size or cfg.train.batch_size,
            steps,
            warmup=warmup,
            image_size=image_size,
            classes=classes,
            device=device or cfg.train.device,
            threads=threads or cfg.train.threads,
            tune=allocator == "tuned",
        )
    if cfg.train.precision != "fp32":
        typer.echo(
            f"warning: bench times fp32 steps; train.precision {cfg.train.precision} is not applied", err=True
        )
    if cfg.train.compile:
        typer.echo(
            "warning: bench does not torch.compile the whole model; train.compile is not applied "
            "(train.compile_routing is)",
            err=True,
        )
    if result.warning is not None:
        typer.echo(f"warning: {result.warning}", err=True)
    typer.echo(_json(result.to_dict()) if as_json else result.summary())


REPORT_DIR_HELP = "Folder for the files written (default: {} in reports/<run>/)."
TB_DIR_HELP = "TensorBoard folder; events go to <it>/<run>/{} (default: the run's logging.tb_dir)."


@app.command(cls=_Command)
def attack(
    ckpt: Annotated[str, typer.Option("--ckpt", help=CKPT_HELP)] = "latest",
    method: Annotated[
        str,
        typer.Option("--method", "-m", help="fgsm (one step) or bim (iterative, --steps of --step-size)."),
    ] = "fgsm",
    eps: Annotated[
        str,
        typer.Option(
            "--eps",
            help="Comma-separated perturbation sizes: fractions of the pixel range [0, 1], or for smallNORB "
            "(standardised per image) units of the image's standard deviation.",
        ),
    ] = "0.01,0.05,0.1,0.2",
    targeted: Annotated[
        bool,
        typer.Option(
            "--targeted/--untargeted",
            metavar=FLAG,
            help="Push images towards a target class and report the success rate (default: untargeted, "
            "away from the true class, reporting accuracy).",
        ),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Targeted attacks: next (true class + 1; the default), random (another class, seeded) or "
            "least (the least active other class).",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, metavar="<int>", help="BIM: number of steps (default 10).")
    ] = None,
    step_size: Annotated[
        float | None,
        typer.Option(
            "--step-size",
            metavar="<float>",
            help="BIM: size of each step, in the units of --eps (not a multiple of eps: with --eps 0.1, "
            "--step-size 0.01 is a tenth of it; default 2.5 * eps / steps).",
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="Split to attack: test, val (needs data.val_split > 0), or test_familiar "
            "(smallNORB viewpoint splits).",
        ),
    ] = "test",
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            metavar="<int>",
            help="Attack a seeded random subset of this many images (default: all).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            callback=_at_most_c_int,
            metavar="<int>",
            help="Images per batch (default: the run's).",
        ),
    ] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help=REPORT_DIR_HELP.format("attack-<method>.json and .png, <method>-targeted for --targeted"),
        ),
    ] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option(
            "--tensorboard/--no-tensorboard",
            metavar=FLAG,
            help="Write attack/<method>/acc scalars (with --targeted: <method>-targeted, and /success "
            "too; step = eps x 1000, so epsilons must be 0.001 apart); "
            "default: if the run wrote TensorBoard events as it trained (its logging.tensorboard).",
            show_default=False,
        ),
    ] = None,
    tb_dir: Annotated[str | None, typer.Option("--tb-dir", help=TB_DIR_HELP.format("attack"))] = None,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot/--no-plot",
            metavar=FLAG,
            help="Write the PNG plot (needs matplotlib, the viz extra); --no-plot removes an earlier "
            "attack's plot of that name.",
        ),
    ] = True,
    as_json: JsonOption = False,
    data_root: RunDataRootOption = None,
    override: DataOverrideOption = None,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    device: DeviceOption = "auto",
    debug: DebugOption = False,
) -> None:
    """Adversarial robustness: accuracy (or targeted success) against epsilon for FGSM or BIM.

    Prints a table and writes JSON, a PNG plot and TensorBoard scalars.
    """
    with _errors(debug):
        from capsnet.attack import attack_checkpoint, parse_epsilons
        from capsnet.visualize import ExperimentError

        if target is not None and not targeted:
            raise ExperimentError(
                f"--target applies to targeted attacks: add --targeted (got --target {target})"
            )
        target = target or "next"
        if method.lower() == "fgsm" and (steps is not None or step_size is not None):
            given = "--steps" if steps is not None else "--step-size"
            raise ExperimentError(
                f"{given} sets the steps of BIM; FGSM takes one step of eps: use -m bim with it"
            )
        steps = 10 if steps is None else steps
        if step_size is not None and not math.isfinite(step_size):  # inf x a zero gradient entry is NaN
            raise ExperimentError(f"--step-size: must be a finite number, got {step_size:g}")
        if step_size is not None and not step_size > 0:
            raise ExperimentError(
                f"--step-size: must be above 0 (0 leaves every image as it is), got {step_size:g}"
            )
        report = attack_checkpoint(
            ckpt,
            out_dir,
            split,
            method,
            parse_epsilons(eps),
            targeted,
            target,
            steps,
            step_size,
            limit,
            batch_size,
            data_root,
            device,
            override,
            report_dir,
            tensorboard,
            tb_dir,
            plot,
        )
    typer.echo(_json(report.to_dict()) if as_json else report.summary())
    _note_replaced(report.replaced, report_dir)
    _note_removed(report.removed, "--no-plot draws none")


@app.command(cls=_Command)
def inspect(
    ckpt: Annotated[str, typer.Option("--ckpt", help=CKPT_HELP)] = "latest",
    index: Annotated[
        int, typer.Option("--index", "-i", min=0, help="Which image of the split (0-based).")
    ] = 0,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="Split the image comes from: test, val (needs data.val_split > 0), or test_familiar "
            "(smallNORB viewpoint splits).",
        ),
    ] = "test",
    layer: Annotated[
        str,
        typer.Option(
            "--layer", help="Routing layer of figure (c): class (default) or a ConvCaps layer (caps1, ...)."
        ),
    ] = "class",
    parent: Annotated[
        int | None,
        typer.Option(
            "--parent",
            min=0,
            help="Parent capsule of figure (c): a class index in the class layer (default: the predicted "
            "class), a capsule type in a ConvCaps layer (default: the most active).",
        ),
    ] = None,
    position: Annotated[
        str | None,
        typer.Option(
            "--position", help="ConvCaps layers: parent position ROW,COL (default: where it is most active)."
        ),
    ] = None,
    entries: Annotated[
        str,
        typer.Option(
            "--entries",
            help="Two pose entries (0..15 for 4x4 poses, row-major) to project the votes on, e.g. 3,7; "
            "auto: the two along which the votes spread most.",
        ),
    ] = "auto",
    perturb: Annotated[
        float,
        typer.Option(
            "--perturb", help="Figure (e): each pose entry moves from -perturb to +perturb (a positive size)."
        ),
    ] = 0.25,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Figure (e): images per pose entry.")] = 11,
    report_dir: Annotated[
        Path | None, typer.Option("--out", help=REPORT_DIR_HELP.format("inspect-<split>-<index>"))
    ] = None,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            metavar=FLAG,
            help="Also write the figures to TensorBoard (tags inspect/<split>/<figure> at step --index, and the "
            "report as text under inspect/<split>/summary); --tb-dir implies it.",
        ),
    ] = False,
    tb_dir: Annotated[str | None, typer.Option("--tb-dir", help=TB_DIR_HELP.format("inspect"))] = None,
    data_root: RunDataRootOption = None,
    override: DataOverrideOption = None,
    out_dir: OutDirOption = DEFAULT_OUT_DIR,
    device: DeviceOption = "auto",
    debug: DebugOption = False,
) -> None:
    """Figures of one image: input and reconstruction, class activations, EM routing, capsule maps, poses.

    (a) input and reconstruction, (b) class activations, (c) EM routing of one parent, iteration by iteration, (d) capsule activation maps, (e) pose perturbations through the decoder.
    """  # one line per help paragraph: the help keeps line breaks
    with _errors(debug):
        from capsnet.inspection import inspect_checkpoint, parse_pair

        result = inspect_checkpoint(
            ckpt,
            index,
            out_dir,
            split,
            layer,
            parent,
            parse_pair(position, "--position"),
            parse_pair(entries, "--entries"),
            perturb,
            steps,
            data_root,
            device,
            override,
            report_dir,
            tensorboard,
            tb_dir,
        )
    typer.echo(result.summary())
    _note_replaced(result.replaced, report_dir)
    _note_removed(result.removed, "this inspection does not draw it")


def _note_removed(files: list[str], why: str) -> None:
    if files:
        typer.echo(f"note: removed the earlier {', '.join(files)}, of other results ({why})", err=True)


def _note_replaced(files: list[str], out: Path | None) -> None:
    if files:
        how = "give another --out" if out is not None else "give --out DIR"
        typer.echo(f"note: replaced the earlier {', '.join(files)} ({how} to keep reports apart)", err=True)


def main() -> None:
    import errno

    try:
        app()
    except OSError as e:
        # what a command prints last, after its work (capsnet config > mine.yaml on a full disk): every
        # other failure is said by the command itself (_errors)
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT):
            raise
        with contextlib.suppress(OSError):
            print(f"error: could not write the output: {e.strerror or e}", file=sys.stderr)
        os._exit(2)  # without flushing the output that could not be written again


if __name__ == "__main__":
    main()
