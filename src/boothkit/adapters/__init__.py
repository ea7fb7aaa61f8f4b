"""What training adds to a model and generation loads back: adapter injection (inject), the LoRA file format (lora),
loading a file into a pipeline (apply), and Textual Inversion embeddings (embeddings). The LoRA API is re-exported
here for scripts: `from boothkit import adapters`."""
from .apply import apply_lora
from .inject import adapters_disabled, add_lora, lora_state_dict
from .lora import LORA_FILE, adapter_metadata, lora_header, read_lora_info, save_lora_file

__all__ = ["LORA_FILE", "adapter_metadata", "adapters_disabled", "add_lora", "apply_lora", "lora_header",
           "lora_state_dict", "read_lora_info", "save_lora_file"]
