"""DeepSpeed for DBRX: ZeRO-3 leaf modules and expert swaps on partitioned weights (`zero3`), the AutoEP preset
(`autoep`), checkpoint consolidation in the original DBRX layout (`checkpoint`), and launch checks (`launch`)."""
