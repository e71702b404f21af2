"""Drop-in ``nn.Module`` wrappers around fastdistill's ops."""

__all__: list[str] = []

# One block per module file (each block: the import, then ``__all__ +=``).
# --- relational (RDD) ---
# --- moment matching ---
# --- routing (O2MKD) ---
# --- attention ---
# --- BOOT, Adv-KD ---
