"""What a program costs: chip tables (peak FLOP/s, memory), analytic FLOP counts and the
compiled memory plan's report, shared by training's MFU and log line, the fit tool and bench."""
