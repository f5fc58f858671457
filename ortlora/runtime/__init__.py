"""The runtime side: trains from an artifact directory with onnxruntime and numpy. Never imports torch.

Not even through onnxruntime: the training package checks itself at import by importing ORTModule,
which imports torch whenever torch is installed (as it is wherever ``ortlora-build`` also runs).
Nothing the runtime uses needs it, and it costs about 230 MB of resident memory and over a second
of start-up (measured with torch 2.13 and onnxruntime-training-cpu 1.19.2), so onnxruntime is
imported here, once, with torch hidden. ORT treats the ImportError as "no ORTModule"; torch itself
stays importable afterwards.
"""

import sys


def _import_onnxruntime_without_torch() -> None:
    if "onnxruntime" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass  # not installed: whatever needs it says so
    finally:
        del sys.modules["torch"]


_import_onnxruntime_without_torch()
