"""Minimal extension (load_inline) that throws TORCH_CHECK_VALUE errors formatting different argument types,
each call in a subprocess: tells whether an error-path crash is torch's/toolchain's or StreamKL's."""

import subprocess
import sys
import tempfile

SRC = r"""
#include <torch/extension.h>
#include <string>
void throw_string() { TORCH_CHECK_VALUE(false, "plain ", std::string("text")); }
void throw_int() { TORCH_CHECK_VALUE(false, "an int ", int64_t(3)); }
void throw_double() { TORCH_CHECK_VALUE(false, "a double ", 0.5); }
void throw_to_string() { TORCH_CHECK_VALUE(false, "an int as text ", std::to_string(int64_t(3))); }
"""
FUNCS = ["throw_string", "throw_int", "throw_double", "throw_to_string"]


def main():
    build_dir = tempfile.mkdtemp()
    load = (f"from torch.utils.cpp_extension import load_inline; m = load_inline('c10str', cpp_sources={SRC!r}, "
            f"functions={FUNCS!r}, build_directory={build_dir!r}, extra_cflags=['-O3'])")
    subprocess.run([sys.executable, "-c", load], check=True, capture_output=True)
    for f in FUNCS:
        code = load + f"\ntry:\n    m.{f}()\nexcept Exception as e:\n    print('raised', type(e).__name__)"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(f"{f:18s} {run.stdout.strip() or f'CRASH rc={run.returncode}'}")


if __name__ == "__main__":
    main()
