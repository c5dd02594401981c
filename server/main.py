"""Thin OpenAI-compatible entry point: `python -m server.main [vllm serve flags]
[--moba-attention-config JSON]`. The installed console script `moba-serve` runs the same function
(`moba_backend.integrations.vllm.serve:main`, inside the package so it is importable once
installed)."""

from moba_backend.integrations.vllm.serve import main

if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
