"""Every test sees 8 emulated CPU devices, so every sharding path runs without an accelerator."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
