"""Shared flags and runs of the tests that run the `prealign` CLI in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request


def tiny_model_flags(max_len: int, vocab_size: int = 512) -> list[str]:
    """gin overrides for a decoder small enough that a CLI test trains it in seconds."""
    return [f"--gin.ModelConfig.vocab_size={vocab_size}", "--gin.ModelConfig.d_model=32",
            "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=4",
            "--gin.ModelConfig.num_kv_heads=2", "--gin.ModelConfig.mlp_dim=64",
            f"--gin.ModelConfig.max_len={max_len}"]


def cpu_env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train_tiny_run(workdir, max_len: int = 128, steps: int = 30) -> None:
    """A run of the tiny model trained for `steps` on a small prepared corpus (1 device)."""
    from prealign_jax.data import prepare

    prepare.prepare(workdir=str(workdir), num_scenarios=1500, vocab_size=512,
                    vocab_documents=1500, num_shards={"train": 2, "validation": 1})
    subprocess.run([sys.executable, "-m", "prealign_jax.main", "train",
                    "--gin_file=runs/cpu_demo.gin", f"--workdir={workdir}",
                    f"--gin.train.num_steps={steps}", "--gin.train.batch_size=8",
                    f"--gin.train.checkpoint_every={steps}", "--gin.train.eval_every=0",
                    "--gin.train.peak_flops_per_device=1e10", *tiny_model_flags(max_len)],
                   check=True, env=cpu_env(), capture_output=True, timeout=900)


KEY = "sk-test-4f1c"
WAIT_S = 300  # deadlock guards, not performance bounds


class Server:
    """A `prealign serve` process on a free port; its output is collected as it runs
    (tests/test_serve.py; the teacher of tests/test_synthesize_teacher.py)."""

    def __init__(self, run_dir, *flags):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prealign_jax.main", "serve", f"--workdir={run_dir}",
             "--port=0", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=cpu_env())
        self.lines, ready = [], threading.Event()
        self.url = None

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if " on http://" in line and self.url is None:
                    self.url = line.split(" on ")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(WAIT_S)
        assert self.url, "".join(self.lines)
        self.base = self.url.removesuffix("/v1")

    def client(self, key=KEY):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=WAIT_S)

    def post(self, path, body: bytes, key=KEY, content_type="application/json"):
        """(status, JSON body) of a raw POST."""
        headers = {"Content-Type": content_type}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.base + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=WAIT_S) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path) -> str:
        with urllib.request.urlopen(self.base + path, timeout=WAIT_S) as r:
            return r.read().decode()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)
