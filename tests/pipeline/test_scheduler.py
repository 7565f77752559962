"""The job scheduler with real child processes (tiny Python one-liners, no training)."""

import sys

from nlm.pipeline.scheduler import Job, run_jobs


def py(code):
    return [sys.executable, "-c", code]


RECORD = ("import os, time; print('start', time.time(), os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('OMP_NUM_THREADS'));"
          "time.sleep(0.4); print('end', time.time())")


def spans(job):
    lines = job.log_path.read_text().split("\n")
    start = next(line.split() for line in lines if line.startswith("start"))
    end = next(line.split() for line in lines if line.startswith("end"))
    return float(start[1]), float(end[1]), start[2], start[3]


def test_a_failing_job_does_not_stop_the_others_and_parallel_caps_cpu_jobs(tmp_path):
    jobs = [Job(name=f"j{i}", command=py(RECORD), log_path=tmp_path / f"j{i}.log") for i in range(3)]
    jobs.insert(1, Job(name="bad", command=py("import sys; print('nlm: error: no training data'); sys.exit(2)"),
                       log_path=tmp_path / "bad.log"))
    run_jobs(jobs, parallel=2, gpus=[])
    bad = jobs[1]
    assert bad.returncode == 2 and bad.error == "error: no training data"
    good = [spans(job) for job in jobs if job.name != "bad"]
    assert all(job.returncode == 0 for job in jobs if job.name != "bad")
    events = sorted([(s, 1) for s, _, _, _ in good] + [(e, -1) for _, e, _, _ in good])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2
    assert all(threads == "1" or threads.isdigit() for *_, threads in good)  # CPU jobs share the cores


def test_gpu_jobs_get_disjoint_devices(tmp_path):
    jobs = [Job(name="two", command=py(RECORD), devices=2, log_path=tmp_path / "two.log"),
            Job(name="a", command=py(RECORD), log_path=tmp_path / "a.log"),
            Job(name="b", command=py(RECORD), log_path=tmp_path / "b.log"),
            Job(name="huge", command=py(RECORD), devices=3, log_path=tmp_path / "huge.log")]
    run_jobs(jobs, gpus=[0, 1])
    assert jobs[3].returncode == 2 and "devices: 3 but only 2 GPU(s)" in jobs[3].error
    seen = {job.name: spans(job) for job in jobs[:3]}
    assert seen["two"][2] == "0,1" and {seen["a"][2], seen["b"][2]} <= {"0", "1"}
    # Holding both GPUs, "two" never overlaps with the single-GPU jobs.
    assert all(seen["two"][1] <= seen[n][0] or seen[n][1] <= seen["two"][0] for n in ("a", "b"))
