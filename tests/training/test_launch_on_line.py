"""run_logged's line hook: it sees each line as it arrives, and returning True stops the child there."""

import sys

from nlm.training.launch import child_environment, run_logged


def test_the_line_hook_stops_the_child(tmp_path):
    script = "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
    seen = []

    def on_line(line):
        seen.append(line.strip())
        return line.strip() == "3"

    code, error = run_logged([sys.executable, "-c", script], child_environment(), tmp_path / "child.log", on_line=on_line)
    assert seen == ["0", "1", "2", "3"] and code != 0 and error
    assert (tmp_path / "child.log").read_text().split() == ["0", "1", "2", "3"]


def test_without_a_stop_the_child_runs_to_its_end(tmp_path):
    code, error = run_logged([sys.executable, "-c", "print('a'); print('b')"], child_environment(),
                             on_line=lambda line: False)
    assert (code, error) == (0, None)
