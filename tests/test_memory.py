"""keep_freed_memory: freed activations are reused instead of page-faulted in again."""

import json
import platform
import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB tensor; reports glibc's mallinfo2 while it lives and after it is freed:
# hblkhd (bytes in blocks mmap'ed on their own, unmapped when freed) and arena (the heap's size).
_SNIPPET = """
import ctypes, json, sys
import torch
from maskformer.engine.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.empty(16 * 2**20).fill_(1.0)
live = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(json.dumps({"applied": applied, "live_mmapped": live.hblkhd, "freed_heap": freed.arena}))
"""


def _malloc_state(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SNIPPET, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_stays_in_the_process():
    default, kept = _malloc_state("default"), _malloc_state("keep")
    assert kept["applied"] and not default["applied"]
    size = 64 * 2**20
    # By default the block is mmap'ed on its own (and unmapped when freed: the next one faults in again) ...
    assert default["live_mmapped"] >= size
    # ... kept, it comes from the heap, which keeps the memory after the free for the next allocation.
    assert kept["live_mmapped"] < size and kept["freed_heap"] >= size


@pytest.mark.parametrize("keep", [True, False])
def test_training_applies_the_setting_when_configured(keep, monkeypatch, tmp_path):
    import maskformer.engine.trainer as trainer
    from tests.conftest import tiny_config

    class Stop(Exception):
        pass

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer, "build_maskformer", lambda cfg: (_ for _ in ()).throw(Stop()))  # stop there
    cfg = tiny_config("train.device=cpu", f"train.keep_freed_memory={str(keep).lower()}")
    with pytest.raises(Stop):
        trainer.train(cfg, output_dir=tmp_path)
    assert len(calls) == (1 if keep else 0)
    assert tiny_config().train.keep_freed_memory is True  # the default
