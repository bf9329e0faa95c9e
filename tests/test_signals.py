"""Interrupted runs: real `sparq compress` processes killed with SIGINT, SIGTERM or SIGKILL.

Whatever the moment, the output is absent, the complete previous output, or the complete new
one (byte-identical to an uninterrupted run); after SIGINT/SIGTERM no temporary file
(`.<name>.*.tmp`) is left and the exit code is 130/143 once the command is running.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import CONFIG, SPARQ, invoke

OUTPUT = "out.sparq.safetensors"
_EXPECTED_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_MESSAGES = {signal.SIGINT: "sparq: error: interrupted", signal.SIGTERM: "sparq: error: terminated"}


class Setup:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # ~4M values: the run takes about a second after start-up on 2 cores.
        self.source = folder / "big.safetensors"
        table = torch.randn(64_000, 64, generator=torch.Generator().manual_seed(7))
        save_file({"emb.weight": table, "other": torch.ones(3)}, str(self.source))
        self.config = folder / "cfg.yaml"
        self.config.write_text(CONFIG)
        # The complete outputs, made in-process (the installed sparq gives the same bytes).
        reference = folder / "reference.sparq.safetensors"
        started = time.perf_counter()
        done = invoke("compress", self.source, "--config", self.config, "-o", reference, "-q")
        self.seconds = time.perf_counter() - started + 1.5  # + the start-up of a process
        assert done.exit_code == 0, done.output
        self.reference = reference.read_bytes()
        previous = folder / "previous.sparq.safetensors"
        done = invoke(
            "compress", self.source, "--config", self.config, "-o", previous, "-q",
            "--set", "sparsity.level=0.3",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        self.previous = previous.read_bytes()
        assert self.previous != self.reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("signals"))


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".{OUTPUT}.*.tmp"))


def _interrupt(setup: Setup, folder: Path, sig: int, when: str, delay: float, previous: bool):
    """Starts `sparq compress`, sends `sig` at `when` (`after` `delay` seconds, or once the
    temporary output file exists plus `delay`), and checks what is left behind."""
    folder.mkdir()
    output = folder / OUTPUT
    extra: list[str] = []
    if previous:
        output.write_bytes(setup.previous)
        extra = ["--force"]
    command = [SPARQ, "compress", setup.source, "--config", setup.config, "-o", output, "-q"]
    process = subprocess.Popen(
        [str(part) for part in [*command, *extra]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writing = False
    if when == "writing":
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if _temporaries(folder):
                writing = True
                break
            time.sleep(0.001)
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"sparq did not stop within 60 s of signal {sig}") from None
    code = process.returncode
    label = f"{signal.Signals(sig).name} {when} +{delay:.3f}s previous={previous}: exit {code}"

    if output.exists():
        data = output.read_bytes()
        allowed = (setup.reference, setup.previous) if previous else (setup.reference,)
        assert data in allowed, f"{label}: output is neither the previous nor the complete new one"
    else:
        assert not previous, f"{label}: the previous output is gone"
    if code == 0:
        assert output.read_bytes() == setup.reference, label
        return code
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, label
        return code
    assert _temporaries(folder) == [], f"{label}: temporary files left"
    detail = f"{label}\n{stderr}"
    if writing:
        # Killed while the command ran (its temporary file existed): the handler's exit code
        # and its one line, naming the output unless it was already in place.
        assert code == _EXPECTED_CODES[sig], detail
        written = output.exists() and output.read_bytes() == setup.reference
        unwritten = "" if written else f"; {output} was not written"
        assert stderr == f"{_MESSAGES[sig]}{unwritten}\n", detail
        return code
    # Earlier or later the process may still be starting (Python, typer) or already shutting
    # down: the default handlers end it (-sig), typer exits 130 silently, or Python's own
    # start-up reports the KeyboardInterrupt (exit 1). Once sparq reports, it is one line.
    startup = sig == signal.SIGINT and code == 1 and stderr.rstrip().endswith("KeyboardInterrupt")
    assert code in (_EXPECTED_CODES[sig], -sig) or startup, detail
    if "sparq: error: " in stderr:
        unwritten = f"{_MESSAGES[sig]}; {output} was not written\n"
        assert stderr in (f"{_MESSAGES[sig]}\n", unwritten), detail
    if code == -sig and output.exists() and output.read_bytes() == setup.reference:
        # Signalled during the interpreter's shutdown, after the command: a plain end.
        assert "Traceback" not in stderr, detail
    return code


def _plan(count: int, seed: int, seconds: float) -> list[tuple[int, str, float, bool]]:
    rng = random.Random(seed)
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    plan = []
    for index in range(count):
        sig = signals[index % 3]
        previous = index % 2 == 1
        if rng.random() < 0.35:
            plan.append((sig, "writing", rng.uniform(0.0, 0.03), previous))
        else:  # from start-up (before the handlers exist) to past the end
            plan.append((sig, "after", rng.uniform(0.0, seconds * 1.1), previous))
    return plan


def _run_plan(setup: Setup, folder: Path, plan: list[tuple[int, str, float, bool]]) -> None:
    for index, (sig, when, delay, previous) in enumerate(plan):
        _interrupt(setup, folder / f"run{index}", sig, when, delay, previous)
        shutil.rmtree(folder / f"run{index}")


def test_interrupted_while_writing(setup, tmp_path):
    """The riskiest moment: the temporary output exists and is being written."""
    for index, sig in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]):
        # Writing takes milliseconds: a run may finish before the signal lands (every run's
        # outcome is checked all the same); one of a few must be caught while writing.
        for attempt in range(5):
            folder = tmp_path / f"w{index}-{attempt}"
            code = _interrupt(setup, folder, sig, "writing", 0.0, previous=True)
            if code != 0:
                break
        assert code != 0, "finished before the signal, 5 times"


def test_interrupted_at_random_moments(setup, tmp_path):
    _run_plan(setup, tmp_path, _plan(5, seed=1, seconds=setup.seconds))


@pytest.mark.slow
def test_interrupted_at_many_random_moments(setup, tmp_path):
    _run_plan(setup, tmp_path, _plan(45, seed=2, seconds=setup.seconds))
