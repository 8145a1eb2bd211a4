"""`python -m slidesparse.runtime.demo CKPT`: serve CKPT with `vllm serve` on loopback, ask it for
one OpenAI completion, print it, shut the server down (step 3 of tools/demo.sh)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(ckpt: str, timeout: float = 600) -> int:
    port = _free_port()
    vllm = str(Path(sys.executable).parent / "vllm")
    log_path = Path(ckpt).parent / "serve.log"
    cmd = [vllm, "serve", ckpt, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
           "--served-model-name", "demo"]
    print(f"[demo] {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    print(f"error: vllm serve exited ({proc.returncode}); see {log_path}", file=sys.stderr)
                    return 2
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        print(f"error: vllm serve not ready after {timeout:.0f} s; see {log_path}", file=sys.stderr)
                        return 2
                    time.sleep(1)
            body = {"model": "demo", "prompt": "SlideSparse turns 6:8 sparsity into", "max_tokens": 16,
                    "temperature": 0}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                out = json.loads(r.read())
            print(f"[demo] POST /v1/completions {body['prompt']!r} -> {out['usage']['completion_tokens']} tokens: "
                  f"{out['choices'][0]['text']!r}", flush=True)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            if "quantization=slidesparse" not in log_path.read_text():
                print(f"error: vLLM did not load the checkpoint through the slidesparse plugin; see {log_path}",
                      file=sys.stderr)
                return 2
            print("[demo] vllm serve loaded it with quantization=slidesparse and shut down cleanly", flush=True)
            return 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
