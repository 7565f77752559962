"""The `nlm` command as a user runs it: a real subprocess for train, eval, generate and their errors."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def nlm(*args, env=None, check=True):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "nlm.cli", *args], capture_output=True, text=True, env=full_env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"nlm {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_train_eval_generate_through_the_command(model_dirs, pc_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"teacher_model: {model_dirs['teacher']}\nstudent_model: {model_dirs['student']}\n"
        f"train_file: {pc_file}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 4\nlogging_steps: 2\n"
        "per_device_train_batch_size: 4\nlora:\n  enabled: true\n  r: 4\n"
    )
    secret = "hf_cli_secret_value_99"
    trained = nlm("--log_format", "json", "train", "--config", str(config), "--learning_rate", "1e-3",
                  env={"NLM_HF_TOKEN": secret})
    records = [json.loads(line) for line in trained.stderr.splitlines() if line.startswith("{")]
    assert any(r.get("message", "").startswith("step 4/4") and "loss" in r for r in records)
    assert secret not in trained.stderr and secret not in trained.stdout
    final = tmp_path / "out" / "distill" / "final"
    assert f"final model: {final}" in trained.stdout
    assert secret not in (final / "training_metadata.json").read_text()

    scored = nlm("eval", "--model", str(final), "--data", str(pc_file), "--teacher", str(model_dirs["teacher"]), "--json")
    metrics = json.loads(scored.stdout)
    assert metrics["tokens"] > 0 and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-4)
    assert 0 <= metrics["teacher_agreement"] <= 1 and metrics["teacher_kl"] >= 0

    generated = nlm("generate", "--model", str(final), "--prompt", "question: what is 3 plus 3?", "--max_new_tokens", "5")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    ids = tokenizer("question: what is 3 plus 3?\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated.stdout == expected + "\n"

    again = nlm("train", "--config", str(config), check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("nlm: error:") and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    result = nlm("train", "--distillation.alpha", "7", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "nlm: error: distillation.alpha = '7' (from command line --distillation.alpha): Input should be less than or equal to 1"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = nlm("data", "inspect", str(bad), check=False)
    assert result.returncode == 2 and "none of its lines is a usable record" in result.stderr
    assert "Traceback" not in result.stderr
    result = nlm("--debug", "data", "inspect", str(bad), check=False)
    assert "Traceback" in result.stderr
