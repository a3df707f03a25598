"""errors.py: every exception class of the package crosses pickling, DataLoader workers, threads and processes
intact; OSErrors and running out of memory in words naming the path; the CLI's one line for them (no ``[Errno``,
no class names), exit codes; ``eval`` and ``train`` with ``--workers 2`` on broken datasets."""

from __future__ import annotations

import concurrent.futures
import errno
import importlib
import inspect
import multiprocessing
import os
import pickle
import pkgutil
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import invoke_cli
from PIL import Image

import av2ts_cli
from av2ts_cli import cli
from av2ts_cli.console import state as console_state
from av2ts_cli.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    Av2tsError,
    DataError,
    MediaError,
    UsageError,
    describe,
    describe_memory_error,
    describe_os_error,
)


# ------------------------------------------------------------------------------------ every class, found by walking
def _package_exceptions() -> dict[str, type]:
    """Every exception class defined in av2ts_cli (all modules imported), by qualified name."""
    found = {}
    for module_info in pkgutil.walk_packages(av2ts_cli.__path__, "av2ts_cli."):
        if module_info.name.endswith("__main__"):  # running it would start the CLI
            continue
        module = importlib.import_module(module_info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module_info.name:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


EXCEPTIONS = _package_exceptions()
# constructor arguments where "value 0", "value 1", ... do not fit the signature
SAMPLES = {
    "Interrupted": (signal.SIGTERM, "clip.mp4 left unfinished; 1 of 3 videos done or skipped, 1 not started"),
    "MediaError": ("clip [red].mp4", "no video stream\n(ffmpeg said more)"),
    "DataError": ("AVS/Single-source/x/0.png", "mask is 32x32, the video's first frame 64x64"),
    "CheckpointError": ("ckpt/model.safetensors", "truncated"),
}


def _sample(cls: type) -> BaseException:
    if cls.__name__ in SAMPLES:
        return cls(*SAMPLES[cls.__name__])
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                             p.POSITIONAL_OR_KEYWORD)]
    try:
        return cls(*(f"value {i}" for i in range(max(1, len(required)))))
    except Exception as err:  # a new class whose constructor needs other values
        pytest.fail(f"{cls.__qualname__}: add its constructor arguments to SAMPLES in tests/test_errors.py ({err})")


def test_the_walk_finds_the_known_classes():
    names = {cls.__qualname__ for cls in EXCEPTIONS.values()}
    assert {"Av2tsError", "MediaError", "DataError", "CheckpointError", "UsageError", "Interrupted",
            "KernelError", "KernelUnavailable"} <= names, names


def _same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert a.args == b.args and str(a) == str(b)
    assert a.__dict__ == b.__dict__  # path, reason, an instance's exit code (Interrupted: 128 + signal)
    assert getattr(a, "exit_code", None) == getattr(b, "exit_code", None)


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_every_exception_class_pickles_intact(name):
    err = _sample(EXCEPTIONS[name])
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        _same(pickle.loads(pickle.dumps(err, protocol=protocol)), err)


def test_an_interrupted_run_keeps_its_exit_code_across_pickling():
    err = _sample(next(cls for cls in EXCEPTIONS.values() if cls.__name__ == "Interrupted"))
    assert err.exit_code == 128 + signal.SIGTERM
    assert pickle.loads(pickle.dumps(err)).exit_code == 128 + signal.SIGTERM


PROJECT_CLASSES = sorted(name for name, cls in EXCEPTIONS.items() if issubclass(cls, Av2tsError))


@pytest.mark.parametrize("name", PROJECT_CLASSES)
def test_every_project_error_survives_torchs_worker_reraise(name):
    """torch re-raises a DataLoader worker's exception as ``type(message=<traceback text>)``
    (``torch._utils.ExceptionWrapper``): the same class and message come back, not a TypeError."""
    from torch._utils import ExceptionWrapper  # local: the one test of torch's re-raise protocol

    err = _sample(EXCEPTIONS[name])
    try:
        raise err
    except Av2tsError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(Av2tsError) as raised:
        wrapper.reraise()
    assert type(raised.value) is type(err) and raised.value.message == err.message
    assert type(raised.value).exit_code == type(err).exit_code
    if hasattr(err, "path"):
        assert (raised.value.path, raised.value.reason) == (err.path, err.reason)


def test_a_project_error_built_with_a_message_keyword_is_an_ordinary_one():
    assert Av2tsError(message="plain words").message == "plain words"
    assert UsageError(message="--x  and\n--y").message == "--x and --y"


class _BrokenDataset:
    """Item 1 names a file that is not there (raised in a DataLoader worker process)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> int:
        if index == 1:
            raise DataError("data/frames/000001.png", "missing frame")
        return index


def test_a_data_error_comes_out_of_dataloader_workers_intact():
    from torch.utils.data import DataLoader  # local: torch, for the one real worker test

    loader = DataLoader(_BrokenDataset(), batch_size=None, num_workers=2)
    with pytest.raises(DataError) as raised:
        list(loader)
    assert raised.value.message == "data/frames/000001.png: missing frame"
    assert (raised.value.path, raised.value.reason) == ("data/frames/000001.png", "missing frame")
    notes = "\n".join(getattr(raised.value, "__notes__", []))  # Python 3.11+: the worker's traceback, for --debug
    assert not hasattr(raised.value, "add_note") or "in DataLoader worker process" in notes


def _fail_in_child(kind: str):
    if kind == "data":
        raise DataError("clips/x.png", "truncated")
    raise _sample(next(cls for cls in EXCEPTIONS.values() if cls.__name__ == "Interrupted"))


@pytest.mark.parametrize("kind", ["data", "interrupted"])
def test_errors_cross_processes_pickled(kind):
    """What torchrun's processes and multiprocessing do: the error is pickled in the child, rebuilt here."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises(Av2tsError) as raised:
            pool.submit(_fail_in_child, kind).result()
    expected = DataError("clips/x.png", "truncated") if kind == "data" else _sample(
        next(cls for cls in EXCEPTIONS.values() if cls.__name__ == "Interrupted"))
    _same(raised.value, expected)


def test_the_decoding_thread_hands_its_error_over_intact(make_clip):
    """predict's WindowFeeder decodes in a thread and re-raises the thread's exception object in the caller."""
    from av2ts_cli import media, sampling  # local: torch, for the one thread test
    from av2ts_cli.predict import stream as predict_stream  # local: torch, for the one thread test

    clip = make_clip("two-seconds")
    schedule = sampling.video_schedule(media.probe(clip), fps=1, window=2)
    failure = MediaError(clip, "maskige missing")

    def maskige_for(_frame):
        raise failure

    feeder = predict_stream.WindowFeeder(clip, schedule, 32, media.decode_audio(clip), predict_stream.Timer(),
                                         maskige_for)
    try:
        with pytest.raises(MediaError) as raised:
            list(feeder)
    finally:
        feeder.close()
    assert raised.value is failure


# ------------------------------------------------------------------------------------------ the system's errors
def _os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename) if filename is not None else OSError(code, os.strerror(code))


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "no space left on device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.ENOENT, "no such file or folder"),
    (errno.EIO, "input/output error (a failing disk or a lost network mount)"),
])
def test_os_errors_in_words_naming_the_path(code, words):
    line = describe_os_error(_os_error(code, "full/out/x/masks/000001.png"))
    assert line == f"full/out/x/masks/000001.png: {words}"
    assert describe_os_error(_os_error(code)) == words
    assert describe_os_error(_os_error(code), path="clip.mp4") == f"clip.mp4: {words}"


def test_a_file_where_a_folder_is_expected(tmp_path):
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    try:
        (existing / "x" / "masks").mkdir(parents=True)
    except OSError as err:  # ENOTDIR on Linux
        assert describe_os_error(err) == f"{existing} is a file, not a folder"
        assert describe_os_error(err, options={"--out": existing}) == f"--out {existing} is a file, not a folder"
    with pytest.raises(FileExistsError) as raised:
        existing.mkdir(parents=True, exist_ok=True)
    assert describe_os_error(raised.value, options={"--out": str(existing), "--batch": 1}) == \
        f"--out {existing} is a file, not a folder"
    with pytest.raises(IsADirectoryError) as raised:
        open(tmp_path, "rb")  # noqa: SIM115 - the error is the point
    assert describe_os_error(raised.value) == f"{tmp_path} is a folder, not a file"
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError) as raised:
        (tmp_path / "folder").mkdir()
    assert describe_os_error(raised.value) == f"{tmp_path / 'folder'}: already exists"


def test_library_os_errors_lose_the_errno_text():
    assert describe_os_error(OSError("[Errno 5] Input/output error")) == "Input/output error"
    assert describe_os_error(OSError("cannot identify image file"), path="a.png") == "a.png: cannot identify image file"
    weird = OSError(9999, "Strange Failure", "f.bin")
    assert describe_os_error(weird) == "f.bin: strange Failure"


def test_memory_errors_name_the_options_that_lower_the_need():
    assert describe_memory_error() == "out of memory"
    assert describe_memory_error({"--batch": 4, "--window": None, "--out": "x"}) == \
        "out of memory: a smaller --batch or --window needs less"
    assert describe(MemoryError()) == "out of memory"
    assert describe(ValueError("a bug")) is None
    assert describe(UsageError("--x  y")) == "--x y"


# -------------------------------------------------------------------------------------------------- the CLI line
def _cli_raising(error_factory):
    app = typer.Typer()

    @app.command()
    @cli._reported
    def write(out: Path = typer.Option(..., "--out", "-o"), batch: int = typer.Option(1, "--batch")) -> None:
        error_factory(out)

    @app.command()
    def other() -> None:  # two commands: `write` is a subcommand, as in av2ts
        pass

    return app


def _one_line(app, args, code: int) -> str:
    from typer.testing import CliRunner  # local: only the CLI tests

    console_state["debug"] = False
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "[Errno" not in result.output and "Error:" not in result.output and "Traceback" not in result.output
    return lines[0]


def test_cli_a_file_where_the_out_folder_should_be(tmp_path):
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    app = _cli_raising(lambda out: (out / "clip").mkdir(parents=True, exist_ok=True))
    assert _one_line(app, ["write", "--out", str(existing)], EXIT_FAILURE) == \
        f"error: --out {existing} is a file, not a folder"


def test_cli_a_read_only_output_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        def write(out: Path) -> None:
            (out / "masks").mkdir()
            if os.geteuid() == 0:  # root writes anyway: the same failure, simulated
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out / "masks"))

        line = _one_line(_cli_raising(write), ["write", "--out", str(folder)], EXIT_FAILURE)
    finally:
        folder.chmod(0o755)
    assert line == f"error: {folder / 'masks'}: permission denied"


def test_cli_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC from the write itself (os.write, under every file object), simulated: no small tmpfs here."""
    real_write = os.write
    target = tmp_path / "full" / "out" / "x" / "masks" / "000001.png"

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(out: Path) -> None:
        target.parent.mkdir(parents=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT)
        try:
            monkeypatch.setattr(os, "write", full_disk)
            try:
                os.write(fd, b"png")
            except OSError as err:
                err.filename = str(target)  # as open().write() cannot: describe with the file being written
                raise
        finally:
            monkeypatch.setattr(os, "write", real_write)
            os.close(fd)

    line = _one_line(_cli_raising(write), ["write", "--out", str(tmp_path / "full" / "out")], EXIT_FAILURE)
    assert line == f"error: {target}: no space left on device"


def test_cli_full_disk_through_the_atomic_writer(tmp_path, monkeypatch):
    """A full disk under the project's one atomic writer, simulated as the kernel reports it to a buffered file
    (ENOSPC without a file name): the line names the file being written, nothing is left behind."""
    from av2ts_cli import files

    target = tmp_path / "full" / "out" / "x" / "masks" / "000001.png"
    target.parent.mkdir(parents=True)

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.file = open(*args, **kwargs)  # noqa: SIM115 - closed in __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(out: Path) -> None:
        monkeypatch.setattr(files, "open", FullDisk, raising=False)  # the module's open, not the builtin
        try:
            files.write_bytes(target, b"x" * 100_000)
        finally:
            monkeypatch.undo()

    line = _one_line(_cli_raising(write), ["write", "--out", str(tmp_path / "full" / "out")], EXIT_FAILURE)
    assert os.listdir(target.parent) == []
    assert line == f"error: {target}: no space left on device"


def test_cli_out_of_memory_names_the_levers(tmp_path):
    def write(out: Path) -> None:
        raise MemoryError

    line = _one_line(_cli_raising(write), ["write", "--out", str(tmp_path)], EXIT_FAILURE)
    assert line == "error: out of memory: a smaller --batch needs less"


def test_cli_debug_shows_the_traceback(tmp_path):
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.callback()
    def main(debug: bool = typer.Option(False, "--debug")) -> None:
        console_state["debug"] = debug

    @app.command()
    @cli._reported
    def write() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x.png")

    try:
        result = CliRunner().invoke(app, ["--debug", "write"])
    finally:
        console_state["debug"] = False
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.ENOSPC


def test_debug_shows_the_traceback_of_a_failure_inside_a_batch(capsys):
    from av2ts_cli import console

    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x.png")
    try:
        raise err
    except OSError:
        pass
    console.show_traceback(err)
    assert "Traceback" not in capsys.readouterr().err
    console_state["debug"] = True
    try:
        with console.console.capture() as captured:
            console.show_traceback(err)
    finally:
        console_state["debug"] = False
    assert "Traceback (most recent call last)" in captured.get() and "test_errors.py" in captured.get()


def test_cli_usage_errors_keep_exit_2():
    app = _cli_raising(lambda out: (_ for _ in ()).throw(UsageError("--out and --resume exclude each other")))
    assert _one_line(app, ["write", "--out", "x"], EXIT_USAGE) == "error: --out and --resume exclude each other"


# ------------------------------------------------------------------------- eval and train with workers, broken data
@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    """`av2ts data synth` S4 (64 px, few videos), to be broken one file at a time (restored after each test)."""
    root = tmp_path_factory.mktemp("broken")
    invoke_cli(["data", "synth", "--subset", "s4", "--out", str(root), "--videos", "4", "--val", "2", "--test", "2",
                "--size", "64", "--seed", "3", "--no-maskiges"])
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from av2ts_cli.config import get_preset
    from av2ts_cli.model import build_model
    from av2ts_cli.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "s4")
    cfg.input_size = 64
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("tiny") / "s4")


def _split_videos(root: Path, split: str):
    from av2ts_cli.data.layout import list_videos, resolve_root

    return list_videos(resolve_root(root, "s4"), "s4", split)


BREAKS = ["missing frame", "truncated label", "mis-sized label"]


def _break(root: Path, split: str, how: str) -> tuple[Path, str]:
    """Break one file of the second video of ``split``: (the file, what the line must say after ``path: ``)."""
    video = _split_videos(root, split)[1]
    if how == "missing frame":
        video.frames[0].unlink()
        return video.frames[0], "missing frame"
    labelled = [mask for mask in video.masks if mask is not None]
    mask = labelled[-1]  # a mis-sized label is found against the video's first one
    if how == "truncated label":
        mask.write_bytes(mask.read_bytes()[:40])
        return mask, "unreadable mask"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
    if len(labelled) == 1:  # an S4 training video: its one label is found against its frames
        return mask, "mask is 48x32, its frames are 64x64"
    return mask, "mask is 48x32, the video's first mask is 64x64"


@pytest.fixture()
def restore(broken_data):
    saved = broken_data.parent / f"{broken_data.name}-saved"
    if not saved.exists():
        shutil.copytree(broken_data, saved)
    yield broken_data
    shutil.rmtree(broken_data)
    shutil.copytree(saved, broken_data)


def _assert_error_line(output: str, path: Path, problem: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"error: {path}: {problem}"), output
    assert "Traceback" not in output and "TypeError" not in output and "worker process" not in output


@pytest.mark.parametrize("how", BREAKS)
def test_eval_with_two_workers_names_the_broken_file(restore, tiny_model, how):
    path, problem = _break(restore, "test", how)
    result = invoke_cli(["eval", "--subset", "s4", "--data", str(restore), "--model", str(tiny_model),
                         "--workers", "2", "--split", "test", "--json"], expect=EXIT_FAILURE)
    _assert_error_line(result.output, path, problem)


@pytest.mark.parametrize("how", BREAKS)
def test_train_with_two_workers_names_the_broken_file(restore, tmp_path, how):
    path, problem = _break(restore, "train", how)
    result = invoke_cli(["train", "--subset", "s4", "--data", str(restore), "--model", "av2ts-tiny", "--iters", "2",
                         "--batch", "4", "--eval-every", "0", "--workers", "2", "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--json"], expect=EXIT_FAILURE)
    _assert_error_line(result.output, path, problem)


def _commands(app: typer.Typer, prefix: str = ""):
    for command in app.registered_commands:
        yield f"{prefix}{command.name or command.callback.__name__}", command.callback
    for group in app.registered_groups:
        yield from _commands(group.typer_instance, f"{prefix}{group.name} ")


def test_every_verb_reports_through_the_one_handler():
    """The words for OSErrors and MemoryError apply to every verb: each command runs under ``cli._reported``."""
    commands = dict(_commands(cli.app))
    assert {"predict", "train", "eval", "info", "data synth", "bench media"} <= set(commands), sorted(commands)
    handler = cli._reported(lambda: None).__code__  # every wrapper made by _reported runs this code
    unwrapped = [name for name, callback in commands.items() if callback.__code__ is not handler]
    assert not unwrapped


class _BuggyDataset(_BrokenDataset):
    def __getitem__(self, index: int) -> int:
        raise RuntimeError("stack expects each tensor to be equal size,\n but got [5, 64] and [5, 32]")


def test_a_bug_in_a_worker_is_still_one_line(tmp_path):
    from torch.utils.data import DataLoader  # local: torch, for the one real worker test

    def write(out: Path) -> None:
        list(DataLoader(_BuggyDataset(), batch_size=None, num_workers=1))

    from typer.testing import CliRunner

    console_state["debug"] = False
    result = CliRunner().invoke(_cli_raising(write), ["write", "--out", str(tmp_path)])
    assert result.exit_code == EXIT_FAILURE
    assert result.output.strip() == ("error: RuntimeError: stack expects each tensor to be equal size, but got [5, 64] "
                                     "and [5, 32] (in a data-loading worker) (run with --debug for the traceback)")
