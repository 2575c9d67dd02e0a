"""Compile DeepSpeed's CPU ops once, at install (`make install`): its CPU Adam (optimizer offload) and its shared-memory
collectives (the CPU accelerator's all-reduce). DeepSpeed otherwise builds them just in time, inside the first run
that needs them (about 70 s on 2 cores). On a GPU machine DeepSpeed builds its own ops as it needs them."""

from deepspeed.accelerator import get_accelerator

acc = get_accelerator()
if acc.device_name() == "cpu":
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        builder = acc.create_op_builder(name)
        if builder is not None:
            builder.load()
            print(f"deepspeed op built: {builder.NAME}")
