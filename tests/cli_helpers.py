"""Shared flags of the tests that run the `prealign` CLI in subprocesses."""


def tiny_model_flags(max_len: int, vocab_size: int = 512) -> list[str]:
    """gin overrides for a decoder small enough that a CLI test trains it in seconds."""
    return [f"--gin.ModelConfig.vocab_size={vocab_size}", "--gin.ModelConfig.d_model=32",
            "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=4",
            "--gin.ModelConfig.num_kv_heads=2", "--gin.ModelConfig.mlp_dim=64",
            f"--gin.ModelConfig.max_len={max_len}"]
