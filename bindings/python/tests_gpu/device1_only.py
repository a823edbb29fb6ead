"""Issue 11, finding 4, on the real driver (needs two GPUs): a process that only uses device 1
reserves host memory ahead of a sleep, sleeps and wakes; it must never get a context on
device 0. nvidia-smi lists the GPUs on which this process holds a context.

    DEVMEM_LIBRARY=target/release/libdevmem.so PYTHONPATH=bindings/python \\
        python3 bindings/python/tests_gpu/device1_only.py
"""

import os
import subprocess
import sys

import devmem

MIB = 1 << 20


def gpus_with_this_process():
    uuids = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
        check=True, capture_output=True, text=True,
    ).stdout
    index = {u.strip(): int(i) for i, u in (line.split(",") for line in uuids.strip().splitlines())}
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
        check=True, capture_output=True, text=True,
    ).stdout
    mine = set()
    for line in apps.strip().splitlines():
        pid, uuid = (x.strip() for x in line.split(","))
        if int(pid) == os.getpid():
            mine.add(index[uuid])
    return sorted(mine)


def main():
    if devmem.device_count() < 2:
        print("SKIP: needs two GPUs")
        return 0
    with devmem.use_tag("weights"):
        p = devmem.malloc(256 * MIB, device=1)
    print("after malloc on device 1: contexts on GPUs", gpus_with_this_process())
    devmem.reserve_host_store(512 * MIB, wait=True)
    after_reserve = gpus_with_this_process()
    print("after reserve_host_store: contexts on GPUs", after_reserve)
    devmem.sleep("weights")
    devmem.wake_up()
    devmem.free(p)
    devmem.reserve_host_store(1024 * MIB, wait=True)  # nothing allocated: the current context
    final = gpus_with_this_process()
    print("after a reservation with nothing allocated: contexts on GPUs", final)
    ok = after_reserve == [1] and final == [1]
    print("PASS" if ok else "FAIL", "device 0 never got a context" if ok else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
