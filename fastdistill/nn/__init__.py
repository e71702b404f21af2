"""Drop-in ``nn.Module`` wrappers around fastdistill's ops."""

__all__: list[str] = []

# One block per module file (each block: the import, then ``__all__ +=``).
# --- relational (RDD) ---
from .rdd import IntraSampleP2PLoss, MemoryP2PLoss, RCFDLoss, RDDLoss  # noqa: E402

__all__ += ["IntraSampleP2PLoss", "MemoryP2PLoss", "RCFDLoss", "RDDLoss"]
# --- moment matching ---
from .moment_matching import MomentMatchingDistiller  # noqa: E402

__all__ += ["MomentMatchingDistiller"]
# --- routing (O2MKD) ---
from .multi_student import MultiStudent  # noqa: E402

__all__ += ["MultiStudent"]
# --- attention ---
from .attention_distill import AttentionDistillLoss  # noqa: E402

__all__ += ["AttentionDistillLoss"]
# --- BOOT, Adv-KD ---
from .adversarial import AdversarialDistiller  # noqa: E402
from .boot import BootDistiller  # noqa: E402

__all__ += ["BootDistiller", "AdversarialDistiller"]
