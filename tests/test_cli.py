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


def test_tf_is_kept_off_accelerators():
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    assert tf.config.get_visible_devices("GPU") == []
