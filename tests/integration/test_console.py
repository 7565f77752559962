"""What a user sees on a terminal during a default LoRA run: a progress bar, our log lines, no library noise."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

pytestmark = pytest.mark.slow


def _train_args(model_dirs, pc_file, out):
    return ["train", "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
            "--train_file", str(pc_file), "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
            "--per_device_train_batch_size", "4", "--device_preference", "cpu", "--lora.enabled"]


def _run_on_a_terminal(args):
    """Run `nlm ARGS` with stdout and stderr on a pseudo-terminal (isatty() is true, as in a shell)."""
    master, slave = pty.openpty()
    # A real terminal's size: tqdm's dynamic width reads it, and draws nothing on a 0-column terminal.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    process = subprocess.Popen([sys.executable, "-m", "nlm.cli", *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_terminal_run_shows_a_bar_and_log_lines_and_no_library_warnings(model_dirs, pc_file, tmp_path):
    text = _run_on_a_terminal(_train_args(model_dirs, pc_file, tmp_path / "tty"))
    assert "4/4 [" in text and ("it/s]" in text or "s/it]" in text)  # tqdm's bar, as the Trainer draws it
    assert "step 1/4" in text and "step 4/4" in text  # the line logs stay
    assert "FutureWarning" not in text and "UserWarning" not in text and "warnings.warn" not in text
    assert text.count("final model: ") == 1


# `nlm` with one library warning guaranteed: which warnings the installed libraries raise changes with their
# versions (a FutureWarning this test relied on is gone from today's releases), so a warning from a file outside
# nlm is raised once logging is set up, as a library would raise it.
NOISY_NLM = """
import sys, warnings
import nlm.config.logging_setup as logging_setup
route = logging_setup.route_warnings
def route_then_warn():
    route()
    exec(compile("warnings.warn('a library deprecation', FutureWarning)", "/opt/somelib/deprecated.py", "exec"),
         {"warnings": warnings})
logging_setup.route_warnings = route_then_warn
from nlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_piped_run_has_log_lines_and_no_bar_or_library_warnings(model_dirs, pc_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", NOISY_NLM, *_train_args(model_dirs, pc_file, tmp_path / "pipe")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1/4" in done.stderr and "it/s]" not in done.stderr and "s/it]" not in done.stderr
    assert "FutureWarning" not in done.stderr and "UserWarning" not in done.stderr
    assert "warning from libraries hidden (--log_level DEBUG shows them)" in done.stderr or "warnings from" in done.stderr
    debug = subprocess.run([sys.executable, "-c", NOISY_NLM, "--log_level", "DEBUG",
                            *_train_args(model_dirs, pc_file, tmp_path / "debug")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert "DEBUG py.warnings: FutureWarning" in debug.stderr  # still there for whoever asks
