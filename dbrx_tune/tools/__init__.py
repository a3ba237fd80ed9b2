"""End-user tools: the memory planner (`plan`), the LoRA merge (`merge`) and the launch checks (`launch`)."""
