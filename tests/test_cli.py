"""The `prealign` command line: gin handling and one-line errors for user mistakes."""

import subprocess
import sys

import pytest

from prealign_jax import main


def test_policies_command_prints_every_policy(capsys):
    assert main.main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in ("grammar", "assistant", "human_only"):
        assert f"policy '{name}'" in out


@pytest.mark.parametrize("argv, needle", [
    (["policies", "--gin.no_such_thing.x=1"], "No configurable matching 'no_such_thing'"),
    (["policies", "--gin.x"], "--gin.x: a gin override needs a value"),
    (["policies", "--gin_file=does/not/exist.gin"], "--gin_file=does/not/exist.gin: no such file"),
])
def test_user_mistakes_are_one_line_errors(capsys, argv, needle):
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_gin_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("a = 1\nb = \n")
    assert main.main(["policies", f"--gin_file={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err


def test_console_script_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "prealign_jax.main", "policies",
                           "--gin.bogus.param=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("prealign: error:") and "Traceback" not in proc.stderr


def test_tf_is_kept_off_accelerators(monkeypatch):
    """import_tf() hides GPUs and TPUs from TF; asserted on the calls, since a CPU-only
    machine has no GPU to see either way."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices",
                        lambda devices, kind=None: calls.append((list(devices), kind)))
    assert tf_cpu.import_tf() is tf
    assert sorted(calls, key=str) == [([], "GPU"), ([], "TPU")]


def test_no_command_prints_usage_and_an_error_line(capsys):
    assert main.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prealign") and "prealign: error: no command given" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("prealign 0.")


def test_workdir_only_where_it_is_used(capsys):
    with pytest.raises(SystemExit):
        main.main(["plan", "--workdir=/tmp/x"])
    assert "unrecognized arguments: --workdir" in capsys.readouterr().err


NOISE = ("port.cc", "cudart_stub", "cuInit", "absl::InitializeLog", "normalizer.cc")


@pytest.mark.parametrize("verbosity, noisy", [(1, False), (2, True)])
def test_library_start_up_noise_is_quiet_unless_asked_for(verbosity, noisy):
    """TensorFlow's native start-up lines (printed straight to fd 2, whatever
    TF_CPP_MIN_LOG_LEVEL says) are off by default and back at --verbosity=2."""
    proc = subprocess.run([sys.executable, "-m", "prealign_jax.main", "policies",
                           f"--verbosity={verbosity}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "policy 'assistant'" in proc.stdout
    assert any(n in proc.stderr for n in NOISE) == noisy, proc.stderr


def test_native_stderr_filter_drops_known_noise_and_keeps_the_rest():
    """What the console script installs below --verbosity=2: routine native lines are
    dropped; errors, progress bars and a traceback at exit still reach stderr, in order."""
    code = "\n".join([
        "import os, sys",
        "from prealign_jax import console",
        "console.filter_native_stderr()",
        "os.write(2, b'E0000 00:00:17.9 29246 util.cc:131] oneDNN supports DT_INT64 only\\n')",
        "os.write(2, b'normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use x\\n')",
        "os.write(2, b'E0000 00:00:17.9 29246 util.cc:99] a real native error\\n')",
        "sys.stderr.write('progress 1\\r'); sys.stderr.write('progress 2\\r\\n')",
        "raise RuntimeError('boom')"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    err = proc.stderr.decode()  # (bytes: text mode would turn the \r into newlines)
    assert proc.returncode == 1
    assert "oneDNN" not in err and "normalizer" not in err
    lines = err.rstrip("\n").split("\n")
    assert lines[0].endswith("a real native error") and lines[1] == "progress 1\rprogress 2\r"
    assert lines[-1] == "RuntimeError: boom"
