"""Peak host memory of `jaxft convert` against the size of the model it converts.

    .venv/bin/python bench/convert_memory.py [--layers 12] [--dim 768] [--vocab 16000] [--out DIR]

Builds a random HF Llama (~110M params, fp32 by default), saves it with save_pretrained, then
runs --from-hf and --to-hf each in a fresh subprocess and reports the peak RSS (VmHWM) of each,
that of a process that only imports the converter, and the difference in model sizes. Streaming holds
one copy of the params plus one tensor (import) or one shard (export): the extra should stay
near 1x the model, well below the 2x of loading the whole checkpoint and then converting it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM, not getrusage: ru_maxrss survives exec, so a child would inherit this process's peak.
CHILD = """
import sys
from jaxft.__main__ import main
rc = main(["convert", *sys.argv[1:]]) if len(sys.argv) > 1 else 0
hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(int(hwm) * 1024)  # kB
sys.exit(rc)
"""


def peak_rss(*argv: str) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"convert {' '.join(argv)} failed:\n{r.stderr}")
    return int(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="", help="work dir (default: a temp dir, removed after)")
    args = ap.parse_args()

    import torch
    import transformers

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="convert-mem-"))
    hf_dir = work / "hf"
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim,
                                   intermediate_size=args.ffn, num_hidden_layers=args.layers,
                                   num_attention_heads=args.dim // 64,
                                   num_key_value_heads=args.dim // 64)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(hf_dir)
    del model

    base = peak_rss()
    imp = peak_rss("--from-hf", str(hf_dir), "--out", str(work / "jx"), "--force")
    exp = peak_rss("--to-hf", str(work / "jx"), "--out", str(work / "back"), "--force",
                   "--max-shard-size", "100MB")
    mib = 2**20
    report = {
        "params": n_params, "model_MiB": round(n_bytes / mib, 1),
        "import_only_rss_MiB": round(base / mib, 1),
        "from_hf_peak_rss_MiB": round(imp / mib, 1),
        "to_hf_peak_rss_MiB": round(exp / mib, 1),
        "from_hf_extra_over_model": round((imp - base) / n_bytes, 2),
        "to_hf_extra_over_model": round((exp - base) / n_bytes, 2),
    }
    print(json.dumps(report, indent=2))
    if not args.out:
        import shutil
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
