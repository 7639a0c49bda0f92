"""Compile one Triton kernel for a GPU that is not present, and read what it costs on that GPU.

This module runs inside a clean worker process started by ``aot.py`` (``python aot_compile.py JOBS RESULTS``):
the test suite and the CPU path switch on Triton's interpreter, under which ``@triton.jit`` gives
interpreted functions that ``triton.compile`` cannot lower.  The worker switches the interpreter off before
it imports any kernel module, so every kernel (and every ``@triton.jit`` helper it calls) is a real
``JITFunction``.  It imports only the standard library and Triton, so it can be started by file path.

What is read, with no GPU and no driver:
- shared memory: ``metadata.shared`` (what Triton asks for at launch) plus the static shared memory of the
  binary (``cuobjdump --dump-resource-usage`` SHARED, or ``.group_segment_fixed_size`` of the AMDGCN);
- registers and spills: cuobjdump's REG / STACK / LOCAL on NVIDIA (ptxas puts spills in the stack frame);
  ``.vgpr_count``, ``.agpr_count``, ``.vgpr_spill_count``, ``.sgpr_spill_count``, ``ScratchSize`` and
  ``Occupancy`` on AMD;
- matrix instructions: ``mma.sync`` / ``wgmma.mma_async`` / ``tcgen05.mma`` in the PTX, ``v_mfma_*`` /
  ``v_wmma_*`` in the AMDGCN.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: A ``tl.constexpr`` that is itself a ``@triton.jit`` function (a generated score_mod / mask_mod) travels to
#: the worker as ``(JIT_MARKER, module, file, name)`` and is imported there.
JIT_MARKER = "triton.jit"

# Matrix-instruction families, most specific first, and the mnemonics that identify them.
MATRIX_FAMILIES: tuple[tuple[str, str], ...] = (
    ("tcgen05", r"tcgen05\.mma[\w.:]*"),
    ("wgmma", r"wgmma\.mma_async[\w.]*"),
    ("mma.sync", r"\bmma\.sync[\w.]*"),
    ("mfma", r"\bv_mfma_\w+"),
    ("wmma", r"\bv_wmma_\w+"),
)


def matrix_instructions(assembly: str) -> tuple[str, list[str]]:
    """(family, distinct mnemonics) of the matrix instructions in PTX or AMDGCN text; "none" if absent."""
    family, found = "none", []
    for name, pattern in MATRIX_FAMILIES:
        hits = sorted(set(re.findall(pattern, assembly)))
        if hits and family == "none":
            family = name
        found.extend(hits)
    return family, found


def parse_cuobjdump(text: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) function in ``cuobjdump --dump-resource-usage`` output."""
    values = {}
    for field in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{field}:(\d+)", text.split("Function", 1)[-1])
        values[field] = int(match.group(1)) if match else 0
    return values


def parse_amdgcn(text: str) -> dict[str, int | None]:
    """Register, spill, scratch, LDS and occupancy figures from the AMDGCN assembly's metadata lines."""
    patterns = {
        "vgpr_count": r"\.vgpr_count:\s+(\d+)",
        "vgpr_spill_count": r"\.vgpr_spill_count:\s+(\d+)",
        "agpr_count": r"\.agpr_count:\s+(\d+)",
        "sgpr_spill_count": r"\.sgpr_spill_count:\s+(\d+)",
        "scratch": r";\s*ScratchSize:\s+(\d+)",
        "occupancy": r";\s*Occupancy:\s+(\d+)",
        "static_lds": r"\.group_segment_fixed_size:\s+(\d+)",
    }
    values: dict[str, int | None] = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, text)
        values[name] = int(match.group(1)) if match else None
    return values


def _nvidia_resources(compiled) -> dict:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = triton.knobs.nvidia.cuobjdump.path
        dump = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
    usage = parse_cuobjdump(dump.stdout)
    family, mnemonics = matrix_instructions(compiled.asm["ptx"])
    return {
        "static_shared_bytes": usage["SHARED"],
        "registers": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"],
        "spill_count": None,
        "sgpr_spill_count": None,
        "agpr_count": None,
        "occupancy": None,
        "matrix_instr": family,
        "matrix_mnemonics": mnemonics,
    }


def _amd_resources(compiled) -> dict:
    amdgcn = compiled.asm["amdgcn"]
    usage = parse_amdgcn(amdgcn)
    family, mnemonics = matrix_instructions(amdgcn)
    return {
        "static_shared_bytes": usage["static_lds"] or 0,
        "registers": usage["vgpr_count"],
        "spill_bytes": usage["scratch"] or 0,
        "spill_count": usage["vgpr_spill_count"],
        "sgpr_spill_count": usage["sgpr_spill_count"],
        "agpr_count": usage["agpr_count"],
        "occupancy": usage["occupancy"],
        "matrix_instr": family,
        "matrix_mnemonics": mnemonics,
    }


def load_function(module: str, path: str, name: str):
    """The ``@triton.jit`` object ``name`` of ``module``, loaded from ``path`` if not importable by name."""
    loaded = sys.modules.get(module)
    if loaded is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).resolve() == Path(path).resolve():
            loaded = importlib.import_module(module)
        else:
            spec = importlib.util.spec_from_file_location(module, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
    return getattr(loaded, name)


def resolve_constexprs(constexprs: dict) -> dict:
    """Constants with every ``(JIT_MARKER, module, file, name)`` reference replaced by the loaded function."""
    return {
        key: load_function(*value[1:]) if isinstance(value, tuple) and value[:1] == (JIT_MARKER,) else value
        for key, value in constexprs.items()
    }


def _error_line(exc: BaseException) -> str:
    """The root cause's type and first message line (Triton wraps it in CompilationErrors that point at source)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
    message = lines[0] if lines else ""
    if len(message) > 200:  # Triton's long hints: keep the first sentence
        message = message.split(". ")[0] + "."
    return (type(exc).__name__ + (f": {message}" if message else ""))[:400]


def specialize(job: dict, target) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``job`` as Triton's launcher compiles the kernel on the device: an int argument
    equal to 1 becomes a constant, and a tensor or an int divisible by 16 is marked ``tt.divisibility`` 16 (on AMD a
    tensor also ``tt.pointer_range`` 32 when buffer operations are on, as for any tensor under 2 GiB).  Without this,
    loads are compiled for unknown strides and alignment: on sm_90 the forward at D=64, 128x128 w8 s3, with a bias
    table gathered through a clamp needed 182,272 B of shared memory here and 246,784 B on the device."""
    from triton import knobs
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    signature, constexprs, attrs = dict(job["signature"]), resolve_constexprs(job["constexprs"]), {}
    names = list(signature)
    def divisible(path: tuple, type_name: str) -> None:
        buffer_ops = type_name.startswith("*") and target.backend == "hip" and knobs.amd.use_buffer_ops
        attrs[path] = backend.parse_attr("D" + ("S" if buffer_ops else ""))

    for name, kind in job.get("specialization", {}).items():
        if isinstance(kind, (tuple, list)):  # a tuple argument (the captured tensors): its elements, by path
            for element, (element_kind, type_name) in enumerate(zip(kind, signature[name])):
                if element_kind == "D":
                    divisible((names.index(name), element), type_name)
        elif kind == "1":
            signature[name], constexprs[name] = "constexpr", 1
        elif kind == "D":
            divisible((names.index(name),), signature[name])
    return signature, constexprs, attrs


def compile_one(job: dict) -> dict:
    """Compile ``job`` (kernel reference, signature, constexprs, target, options); return its resources.

    Never raises: a failed compile returns ``{"error": "..."}`` naming the root cause (see ``_error_line``).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        fn = load_function(*job["ref"])
        target = GPUTarget(*job["target"])
        signature, constexprs, attrs = specialize(job, target)
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target, options=job["options"])
        resources = _nvidia_resources(compiled) if target.backend == "cuda" else _amd_resources(compiled)
        resources["shared_bytes"] = int(compiled.metadata.shared)
    except Exception as exc:  # a compiler error is a finding to report, not a crash
        resources = {"error": _error_line(exc)}
    resources["compile_seconds"] = round(time.perf_counter() - start, 3)
    return resources


def _start_worker(workdir: Path, index: int, python: str | None = None) -> subprocess.Popen:
    worker = Path(__file__).resolve()
    package_root = str(worker.parents[2])  # the folder holding the dispatchattn package
    stderr = open(workdir / f"stderr{index}.txt", "w")  # noqa: SIM115 - closed after the process ends
    argv = [python or sys.executable, str(worker), package_root, str(workdir)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)


def _collect(workdir: Path, count: int, codes: list[int | None]) -> list[dict]:
    tails = " | ".join(" ".join((workdir / f"stderr{i}.txt").read_text()[-200:].split()) for i in range(len(codes)))
    results = []
    for index in range(count):
        path = workdir / f"result-{index}.pkl"
        if path.exists():
            results.append(pickle.loads(path.read_bytes()))
        else:  # claimed by a worker that died while compiling it (or never reached)
            results.append({"error": f"compile worker exited {codes} on this job: {tails}", "transient": True})
    return results


def compile_in_workers(
    payloads: list[dict], workers: int | None = None, progress: Callable[[int, int], None] | None = None,
    python: str | None = None,
) -> list[dict]:
    """Compile ``payloads`` in ``workers`` (default: every usable CPU) clean processes running this file with the
    interpreter ``python`` (default: this one; another environment's, to compile with its Triton).

    Workers claim jobs one at a time (so long and short compiles balance); results come back in order.
    A job whose worker died gets an ``error`` result marked ``transient`` (not cached).
    ``progress(done, total)`` is called about once a second while compiling.
    """
    workers = max(1, min(workers or default_workers(), len(payloads)))
    with tempfile.TemporaryDirectory(prefix="dispatchattn-aot-") as tmp:
        workdir = Path(tmp)
        (workdir / "jobs.pkl").write_bytes(pickle.dumps(payloads))
        procs = [_start_worker(workdir, i, python) for i in range(workers)]
        while any(proc.poll() is None for proc in procs):
            if progress:
                progress(len(list(workdir.glob("result-*.pkl"))), len(payloads))
            time.sleep(1.0)
        for proc in procs:
            proc.stderr.close() if proc.stderr else None
        return _collect(workdir, len(payloads), [proc.returncode for proc in procs])


def default_workers() -> int:
    """Compile processes to start: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _claim(workdir: Path, index: int) -> bool:
    try:
        os.close(os.open(workdir / f"claim-{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def main(argv: list[str]) -> int:
    """``aot_compile.py PACKAGE_ROOT WORKDIR``: claim and compile jobs of WORKDIR/jobs.pkl until none is left."""
    package_root, workdir = argv[0], Path(argv[1])
    sys.path[0] = package_root  # not this file's folder: kernel modules are imported as package modules
    # This worker's own environment, before Triton is imported: with the interpreter on, ``@triton.jit``
    # (Triton's own library functions included) would give functions that cannot be compiled.
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    # A private Triton cache: every compile is real (honest compile seconds) and ~/.triton is not filled;
    # the records themselves are cached by ``aot.py``.
    triton.knobs.cache.dir = str(workdir / f"triton-cache-{os.getpid()}")
    jobs = pickle.loads((workdir / "jobs.pkl").read_bytes())
    for index, job in enumerate(jobs):
        if _claim(workdir, index):
            partial = workdir / f"result-{index}.tmp"
            partial.write_bytes(pickle.dumps(compile_one(job)))
            os.replace(partial, workdir / f"result-{index}.pkl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
