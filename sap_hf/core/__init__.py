"""SAP itself: its configuration, the math, which layers, the statistics, trusted selection, the alpha search."""
