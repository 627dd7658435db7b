"""What a step costs: chip tables (peak FLOP/s, memory) and analytic FLOP counts, shared by
training's MFU and the fit tool."""
