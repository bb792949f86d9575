"""The main job: fine-tune all-MiniLM-L6-v2 on text classification tasks, merge, evaluate (see run.py)."""
