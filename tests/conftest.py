"""Every test sees 8 emulated CPU devices, so every sharding path runs without an accelerator."""
import os

# Must happen before jax is imported anywhere. Eight emulated devices share two cores, so a collective can wait
# long for a starved device thread on a loaded machine: give rendezvous minutes, not XLA's default 40 s.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
