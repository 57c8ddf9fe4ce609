"""`python -m training.main`: OpenCLIP's trainer (open_clip_train) for Three Towers, LiT and the CLIP baseline."""
