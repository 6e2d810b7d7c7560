from bumblecore.model.bumblebee import Bumblebee, KVCache
from bumblecore.model.config import PRESETS, BumblebeeConfig

__all__ = ["Bumblebee", "BumblebeeConfig", "KVCache", "PRESETS"]
