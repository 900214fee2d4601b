"""scft_fast: safety fine-tuning (SCFT + DeRTa) at the cost of plain instruction tuning."""
